"""`egress-sidecar validate` and `check` on hostile input, and the round trip: every document
the parser accepts is valid to `validate`, re-renders to the same rules, and `check` decides
by it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.cli import main
from sidecar.policy.engine import Policy, Rule
from sidecar.policy.errors import AllowlistError
from sidecar.policy.parse import parse_allowlist
from tests.policy.hostile import laughs

BIN = Path(sys.executable).parent / "egress-sidecar"
# `validate` of a hostile document, as a process of its own: wall time and peak RSS.
MAX_SECONDS = 5.0
MAX_RSS_KIB = 120 * 1024


# Runs the command and writes its peak RSS: measured from a small process, because a child
# forked from pytest starts its ru_maxrss at pytest's own size.
_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(*args: str, stdin: str | None = None) -> tuple[int, str, float, int]:
    """(exit code, stdout + stderr, seconds, peak RSS in KiB) of one egress-sidecar run."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, str(rss_file), str(BIN), *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one group: a runaway parse is killed with its wrapper
        )
        try:
            output, _ = proc.communicate(stdin, timeout=30)
        except subprocess.TimeoutExpired as err:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"egress-sidecar {args[0]} still running after 30 s") from err
        elapsed = time.monotonic() - started
        return proc.returncode, output, elapsed, int(rss_file.read_text())


@pytest.mark.parametrize("field", ["host", "ports", "paths"])
def test_validate_refuses_billion_laughs_fast_in_bounded_memory(field: str, tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(field))
    code, output, elapsed, rss = run_measured("validate", str(path))
    assert code == 1, output
    assert f"{path}:2: aliases (*name) of the anchor on this line expand" in output
    assert elapsed < MAX_SECONDS and rss < MAX_RSS_KIB, (elapsed, rss)


def test_validate_refuses_an_oversized_document_with_a_short_message(tmp_path: Path) -> None:
    huge_host = ".".join(["h" * 60] * 35_000)  # 2.1 MB in one host name
    path = tmp_path / "huge.yaml"
    path.write_text(f"allow:\n  - {huge_host}\n")
    code, output, elapsed, rss = run_measured("validate", str(path))
    assert code == 1
    assert max(len(line) for line in output.splitlines()) < 200, output[:500]
    assert "larger than 1048576 bytes" in output
    assert elapsed < MAX_SECONDS and rss < MAX_RSS_KIB, (elapsed, rss)


def test_validate_clips_a_long_host_in_its_message() -> None:
    host = "a" * 900_000  # under the size limit: the parser gets to the host itself
    code, output, _, _ = run_measured("validate", "-", stdin=f"allow:\n  - {host}.test\n")
    assert code == 1
    assert f'-:2: "{"a" * 80}…" (900005 characters) is not a valid host' in output
    assert max(len(line) for line in output.splitlines()) < 300


def test_check_clips_a_2mib_target_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process: one command-line argument cannot exceed 128 KiB on Linux.
    allowlist = tmp_path / "a.yaml"
    allowlist.write_text("allow: [a.test]\n")
    for target in ("http://" + "a" * 2 * 1024 * 1024 + "/", "b" * 2 * 1024 * 1024 + ":443"):
        assert main(["check", "--allowlist-file", str(allowlist), target]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err) < 400 and "… (209715" in captured.err, captured.err


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("api.test:443", 1),  # a CONNECT: the rule's methods cannot be seen there
        ("https://api.test/", 1),
        ("http://api.test/", 0),
    ],
)
def test_check_decides_host_port_as_the_proxy_decides_a_connect(
    tmp_path: Path, target: str, code: int
) -> None:
    allowlist = tmp_path / "a.yaml"
    allowlist.write_text("allow:\n  - host: api.test\n    methods: [GET]\n")
    argv = ["check", "--allowlist-file", str(allowlist), "-X", "GET", target]
    assert main([*argv, "--allow-private-range", "0.0.0.0/0"]) == code


def test_validate_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text("allow:\n  - '*.github.io'\n  - {cidr: 2.0.0.0/7, ports: [443]}\n")
    code, output, _, _ = run_measured("validate", str(path))
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith(f'{path}:2: warning: "*.github.io": "github.io" is a public suffix')
    assert lines[1].startswith(f"{path}:3: warning: 2.0.0.0/7 is very wide")
    assert lines[2].startswith(f"{path}: valid (2 rules")


def test_validate_refuses_broad_rules_naming_the_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "broad.yaml"
    path.write_text("allow:\n  - '*.com'\n  - {cidr: '::/0'}\n")
    code, output, _, _ = run_measured("validate", str(path))
    assert code == 1
    assert f'{path}:2: "*.com" matches every name under the public suffix "com"' in output
    assert f"{path}:3: ::/0 matches every address" in output
    assert output.count("broad: true") == 2


# -- round trip --------------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
HOST = st.lists(LABEL, min_size=2, max_size=3).map(".".join)
PORTS = st.lists(st.integers(1, 65535), min_size=1, max_size=3, unique=True)
PATH = st.from_regex(r"/[a-z0-9/*._-]{0,12}", fullmatch=True)
RULE: st.SearchStrategy[Any] = st.one_of(
    HOST,
    HOST.map(lambda h: f"*.{h}"),
    st.tuples(HOST, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.builds(
        lambda host, wild, ports, methods, paths, broad: {
            "host": f"*.{host}" if wild else host,
            **({"ports": ports} if ports else {}),
            **({"methods": methods} if methods else {}),
            **({"paths": paths} if paths else {}),
            **({"broad": broad} if broad is not None else {}),
        },
        HOST,
        st.booleans(),
        st.none() | PORTS,
        st.none() | st.lists(st.sampled_from(["GET", "post", "HEAD"]), min_size=1, max_size=2),
        st.none() | st.lists(PATH, min_size=1, max_size=2),
        st.none() | st.booleans(),
    ),
    st.builds(
        lambda net, prefix, ports, broad: {
            "cidr": f"{net}/{prefix}",
            **({"ports": ports} if ports else {}),
            **({"broad": broad} if broad is not None else {}),
        },
        st.sampled_from(["0.0.0.0", "10.0.0.0", "2.0.0.0", "::", "fd00::"]),
        st.sampled_from([0, 7, 8, 16, 24]),
        st.none() | PORTS,
        st.none() | st.booleans(),
    ),
)
# Mutations that turn a valid document into a doubtful one: the property holds either way.
MUTATION = st.sampled_from(
    [
        lambda d: d,
        lambda d: {**d, "allow": [*d.get("allow", []), "*.com"]},
        lambda d: {**d, "deny": [*d.get("allow", [])[:1], "*.co.uk"]},
        lambda d: {**d, "privateRanges": ["0.0.0.0/0"]},
        lambda d: {**d, "allow": [*d.get("allow", []), {"host": "a.test", "broad": "yes"}]},
        lambda d: {**d, "mode": "audit"},
    ]
)


def render(rule: Rule) -> dict[str, Any]:
    """A rule written back out from what the policy holds (not from its text)."""
    out: dict[str, Any] = {}
    if rule.host is not None:
        out["host"] = f"*.{rule.host}" if rule.wildcard else rule.host
    else:
        assert rule.network is not None
        out["cidr"] = str(rule.network)
    if rule.ports is not None:
        out["ports"] = sorted(rule.ports)
    if rule.methods is not None:
        out["methods"] = sorted(rule.methods)
    if rule.paths is not None:
        out["paths"] = [p.text for p in rule.paths]
    out["broad"] = True  # the policy no longer says whether it was needed; it never hurts
    return out


def sample_destination(rule: Rule) -> str:
    host = rule.host if rule.host is not None else str(rule.network and rule.network[1])
    if rule.wildcard:
        host = f"x.{host}"
    port = min(rule.ports) if rule.ports else 443
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(RULE, min_size=1, max_size=5), st.lists(HOST, max_size=2), MUTATION)
def test_accepted_documents_round_trip_through_validate_and_check(
    tmp_path: Path, allow: list[Any], deny: list[str], mutate: Any
) -> None:
    document = mutate({"allow": allow, "deny": deny})
    text = yaml.safe_dump(document, sort_keys=False)
    try:
        policy = parse_allowlist(text, source="gen")
    except AllowlistError:
        assume(False)  # refused: nothing to round-trip (never an unhandled exception)
        return
    path = tmp_path / "gen.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 0
    again = parse_allowlist(
        yaml.safe_dump(
            {
                "allow": [render(r) for r in policy.allow_rules],
                "deny": [render(r) for r in policy.deny_rules],
                "privateRanges": [str(n) for n in policy.private_ranges],
            }
        ),
        source="again",
    )
    assert_same_rules(policy, again)
    for rule in policy.allow_rules:
        code = main(["check", "--allowlist-file", str(path), sample_destination(rule)])
        assert code in (0, 1)  # decided: deny rules or L7 conditions may still refuse it


def assert_same_rules(a: Policy, b: Policy) -> None:
    assert [r.key for r in a.allow_rules] == [r.key for r in b.allow_rules]
    assert [r.key for r in a.deny_rules] == [r.key for r in b.deny_rules]
    assert a.private_ranges == b.private_ranges
