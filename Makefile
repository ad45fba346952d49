# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test pytest pytest-asyncio-loop lint bench bench-image bench-inspect soak venv clean help image image-test e2e-kind demo

help:
	@echo "make run    - run the sidecar locally on examples/allowlist.yaml (explicit proxy 127.0.0.1:15001)"
	@echo "make demo   - offline walkthrough (root, < 1 min): inject, audit, suggest, enforce, spans (demo-out/)"
	@echo "make test   - lint (ruff, mypy --strict, import contracts) and the whole test suite"
	@echo "              (the fast path's suites a second time on asyncio's loop: make pytest-asyncio-loop)"
	@echo "make lint   - only the linters"
	@echo "make bench  - throughput/latency/memory benchmark against Squid"
	@echo "make bench-image - the same with the sidecar run from the image (its interpreter), as in a pod"
	@echo "make bench-inspect - inspected HTTPS (inspect: true) against Squid ssl-bump (needs squid-openssl)"
	@echo "make soak   - 500 clients for 5 min while the allowlist flips; exit 1 on a wrong decision or a leak"
	@echo "              (SOAK_ARGS=\"--duration 30\" for a quick run; python -m bench.soak --help)"
	@echo "make image  - build the container image (docker build, or buildah without a Docker engine)"
	@echo "make image-test - build the image, run a pod from it (root, buildah; CI)"
	@echo "make e2e-kind - build, load into kind, install, watch a denial (needs Docker and kind)"

venv:
	@scripts/bootstrap-venv

run: venv
	$(BIN)/egress-sidecar run --allowlist-file examples/allowlist.yaml --health-listen 127.0.0.1:15021 --confdir $(CURDIR)/.venv/mitmproxy-confdir

# Offline, no cluster: stand-ins on 127.0.77.1, names mapped in the sidecar's own mount
# namespace (root: unshare, ports 80/443). DEMO_DIR= for another output directory.
demo: venv
	scripts/demo

lint: venv
	$(BIN)/ruff check sidecar injector bench tests scripts/demo.py
	$(BIN)/ruff format --check sidecar injector bench tests scripts/demo.py
	$(BIN)/mypy
	$(BIN)/lint-imports

# tests/image runs a pod from the built image: it needs the image (and buildah), so `make
# image-test` runs it, not this target; .ci/run calls both.
# Two workers, one test module each at a time (module fixtures stay whole): most of the suite
# waits on processes it started, so two run in about half the time. PYTEST_WORKERS= runs it serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile

pytest: venv
	$(BIN)/pytest --ignore=tests/image $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The suite runs the sidecar on its default loop (uvloop); the fast path's own suites run again on
# asyncio's selector loop (--event-loop asyncio, the fallback), which they inherit from the env.
pytest-asyncio-loop: venv
	EGRESS_EVENT_LOOP=asyncio $(BIN)/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS) \
		tests/proxy/test_fast_tunnels.py tests/proxy/test_fast_http.py \
		tests/proxy/test_fast_units.py tests/netns/test_transparent_proxy.py

test: lint pytest pytest-asyncio-loop

bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

# The same bench with the sidecar as a pod runs it: chrooted into the image built from these
# sources (its interpreter: Debian's python3.13, built with PGO and LTO). Root and buildah.
bench-image: venv image
	IMAGE=$(IMAGE) scripts/bench-image $(BENCH_ARGS)

# HTTPS inspection (mitmproxy's tier) against Squid with ssl-bump: Debian's `squid-openssl` has it,
# the default GnuTLS `squid` does not (the report says so and measures the sidecar alone).
bench-inspect: venv
	$(BIN)/python -m bench.inspect $(BENCH_ARGS)

# Not part of `make test`: minutes of load. Loopback only; bounded in time and requests.
soak: venv
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

IMAGE ?= ghcr.io/egress-sidecar/egress-sidecar:0.1.0

image:
	IMAGE=$(IMAGE) scripts/build-image

# Always through `image` (layer cache: seconds when nothing changed), so the pod runs from the
# image of these sources, never a stale one.
image-test: venv image
	EGRESS_IMAGE=$(IMAGE) $(BIN)/pytest tests/image $(PYTEST_ARGS)

e2e-kind:
	scripts/e2e-kind

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-out
