"""`egress-sidecar check` on hosts a rule inspects: the request inside the TLS is decided by
its method and path, and the output says whether the TLS is inspected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.cli import main

DOC = """\
allow:
  - {host: api.stripe.com, inspect: true, methods: [POST], paths: ["/v1/charges"]}
  - {host: api.stripe.com, inspect: true, methods: [GET], paths: ["/v1/customers/*"]}
  - plain.test
"""


@pytest.mark.parametrize(
    ("argv", "code", "lines"),
    [
        (
            ["https://api.stripe.com/v1/charges", "-X", "POST"],
            0,
            ["allow api.stripe.com:443 POST /v1/charges", "  tls:    inspected by {host: api"],
        ),
        (
            ["https://api.stripe.com/v1/charges"],  # GET by default
            1,
            ["deny api.stripe.com:443 GET /v1/charges", "  reason: no allow rule matches"],
        ),
        (
            ["https://api.stripe.com/v1/customers/cus_1?expand=x"],
            0,
            ["allow api.stripe.com:443 GET /v1/customers/cus_1"],
        ),
        (["api.stripe.com"], 0, ["allow api.stripe.com:443", "(the TLS channel)"]),
        (["https://plain.test/x", "-X", "DELETE"], 0, ["  tls:    passthrough (not inspected)"]),
    ],
)
def test_check_shows_inspection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, lines: list[str]
) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(DOC)
    assert main(["check", "--allowlist-file", str(path), *argv]) == code
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, out


def test_check_json_says_inspected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(DOC)
    argv = ["check", "--allowlist-file", str(path), "--json", "-X", "post"]
    assert main([*argv, "https://api.stripe.com/v1/charges"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["inspected"] is True
    assert (shown["method"], shown["path"]) == ("POST", "/v1/charges")
    assert main([*argv, "https://plain.test/"]) == 0
    assert json.loads(capsys.readouterr().out)["inspected"] is False
