# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test pytest lint bench soak venv clean help

help:
	@echo "make run    - run the sidecar locally on examples/allowlist.yaml (explicit proxy 127.0.0.1:15001)"
	@echo "make test   - lint (ruff, mypy --strict, import contracts) and the whole test suite"
	@echo "make lint   - only the linters"
	@echo "make bench  - throughput/latency/memory benchmark against Squid"
	@echo "make soak   - 500 clients for 5 min while the allowlist flips; exit 1 on a wrong decision or a leak"
	@echo "              (SOAK_ARGS=\"--duration 30\" for a quick run; python -m bench.soak --help)"

venv:
	@scripts/bootstrap-venv

run: venv
	$(BIN)/egress-sidecar run --allowlist-file examples/allowlist.yaml --health-listen 127.0.0.1:15021 --confdir $(CURDIR)/.venv/mitmproxy-confdir

lint: venv
	$(BIN)/ruff check sidecar injector bench tests
	$(BIN)/ruff format --check sidecar injector bench tests
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint pytest

bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

# Not part of `make test`: minutes of load. Loopback only; bounded in time and requests.
soak: venv
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
