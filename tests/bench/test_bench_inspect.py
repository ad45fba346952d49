"""bench.inspect's pieces: the Squid ssl-bump configuration is one the installed Squid accepts
(`squid -k parse`) when it can bump, the table renders what was measured."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from bench.inspect import NAME, Row, render, squid_bump_conf, squid_can_bump
from bench.loadgen import LoadResult
from bench.tools import which
from tests.support.tls import TestCA


def test_squid_accepts_the_bump_configuration(tmp_path: Path) -> None:
    squid = which("squid")
    assert squid is not None
    bump = TestCA("bump")
    ca = tmp_path / "bump-ca.pem"
    ca.write_bytes(bump.cert_pem + bump.key_pem)  # Squid's tls-cert: the CA and its key
    conf = tmp_path / "squid.conf"
    conf.write_text(squid_bump_conf(tmp_path, 3128, ca, tmp_path / "upstream-ca.pem", 443))
    (tmp_path / "hosts").write_text(f"127.0.0.77 {NAME}\n")
    parsed = subprocess.run(
        [squid, "-k", "parse", "-f", str(conf)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = parsed.stdout + parsed.stderr
    if squid_can_bump(squid):
        assert parsed.returncode == 0, output
        assert "FATAL" not in output and "ERROR" not in output, output
    else:
        # The GnuTLS build refuses ssl-bump: the scenario then says so instead of measuring.
        assert parsed.returncode != 0 or "ssl-bump" in output


def test_render_shows_rate_and_cpu_per_request() -> None:
    result = LoadResult(ok=1000, errors=0, seconds=5.0, p50_ms=1.5, p99_ms=9.0)
    args = argparse.Namespace(connections=16, seconds=5)
    text = render([Row("egress-sidecar (inspect: true)", "keep-alive", result, 2.5)], ["n"], args)
    assert "| egress-sidecar (inspect: true) | keep-alive | 200 | 2.50 | 1.5 | 9.0 | 0 |" in text
    assert text.rstrip().endswith("- n")
