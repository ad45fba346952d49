"""`egress-sidecar iptables print` golden output, option errors, backend detection."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.iptables import apply as adapter
from sidecar.iptables import cli, rules
from sidecar.iptables.apply import Backend, IptablesError
from sidecar.iptables.rules import Family

GOLDEN = Path(__file__).parent / "golden"
RESOLV_CONF = GOLDEN / "resolv.conf"  # every case reads it, unless --dns-servers overrides

CASES: dict[str, list[str]] = {
    "default": ["--ipv6", "on"],
    "ipv4_only": ["--ipv6", "off"],
    "cluster_excludes": [
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,10.244.0.0/16,fd00:10:96::/112",
        "--exclude-outbound-ports",
        "15020,22,9000-9100",
    ],
    "include_ports": ["--ipv6", "on", "--include-outbound-ports", "80,443,5432"],
    "include_no_443": ["--ipv6", "off", "--include-outbound-ports", "80,8080"],
    "exclude_443": ["--ipv6", "off", "--exclude-outbound-ports", "443"],
    "no_quic_gid_port": [
        "--ipv6",
        "on",
        "--no-quic-reject",
        "--proxy-uid",
        "2000",
        "--proxy-gid",
        "2001",
        "--proxy-port",
        "16000",
    ],
    "udp_open": [
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,fd00:10:96::/112",
        "--exclude-outbound-udp-ports",
        "51820,8125",
        "--exclude-outbound-udp-cidrs",
        "198.18.5.0/24,fd00:5::/64",
    ],
    "dns_servers_override": ["--ipv6", "on", "--dns-servers", "198.18.0.2,fd00:e5::2"],
    "dns_servers_none": ["--ipv6", "off", "--dns-servers", ""],
    "no_dns_redirect": ["--ipv6", "on", "--no-dns-redirect"],
    "dns_port_gid": ["--ipv6", "off", "--dns-port", "16053", "--proxy-gid", "2001"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_print_matches_golden(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["print", *CASES[name], "--resolv-conf", str(RESOLV_CONF)]) == 0
    out = capsys.readouterr().out.replace(str(GOLDEN), "tests/iptables/golden")
    assert out == (GOLDEN / f"{name}.rules").read_text()


def test_print_without_a_resolv_conf_lets_no_dns_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No file: the C library asks 127.0.0.1, which loopback rules cover; nothing else."""
    assert cli.main(["print", "--ipv6", "off", "--resolv-conf", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# DNS (UDP 53) let out to: none (from {tmp_path / 'none'} (missing))")
    dns = [line for line in out.splitlines() if line.startswith("-A EGRESS_SIDECAR_DNS")]
    assert dns == ["-A EGRESS_SIDECAR_DNS -j REJECT --reject-with icmp-port-unreachable"]


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.rules")} == set(CASES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--exclude-outbound-cidrs", "10.0.0.0/33"], "--exclude-outbound-cidrs: '10.0.0.0/33'"),
        (["--exclude-outbound-ports", "*"], "--exclude-outbound-ports"),
        (["--include-outbound-ports", "80,http"], "--include-outbound-ports: 'http'"),
        (["--proxy-port", "0"], "proxy port"),
        (["--exclude-outbound-udp-ports", "0"], "--exclude-outbound-udp-ports: '0'"),
        (["--exclude-outbound-udp-ports", "*"], "--exclude-outbound-udp-ports"),
        (["--exclude-outbound-udp-cidrs", "fd00::/129"], "--exclude-outbound-udp-cidrs: 'fd00"),
        (["--dns-servers", "10.96.0.0/12"], "--dns-servers: '10.96.0.0/12'"),
        (["--resolv-conf", "/"], "--resolv-conf: cannot read /"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["print", "--ipv6", "off", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_include_star_and_empty_mean_all() -> None:
    args = ["print", "--ipv6", "off", "--include-outbound-ports"]
    outputs = []
    for value in ("*", "", " * "):
        ns = _parse([*args, value])
        outputs.append(cli.render_print(cli.options_from_args(ns), [Family.IPV4]))
    assert outputs[0] == outputs[1] == outputs[2]
    assert "-p tcp -j REDIRECT --to-ports 15002" in outputs[0]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["iptables", *argv])


def test_registers_under_the_main_cli_with_func() -> None:
    ns = _parse(["apply", "--backend", "legacy", "--ipv6", "off", "--dry-run"])
    assert ns.func is not None and ns.backend == "legacy" and ns.dry_run
    assert _parse(["clean"]).backend == "auto"


@pytest.mark.parametrize(
    ("version", "backend"),
    [
        ("iptables v1.8.9 (nf_tables)\n", Backend.NFT),
        ("iptables v1.8.7 (legacy)\n", Backend.LEGACY),
        ("iptables v1.6.1\n", Backend.LEGACY),
        ("iptables-restore v1.8.9 (nf_tables)", Backend.NFT),
    ],
)
def test_detect_backend(version: str, backend: Backend) -> None:
    assert adapter.detect_backend(version) is backend


def test_detect_backend_refuses_unknown_output() -> None:
    with pytest.raises(IptablesError, match="cannot tell"):
        adapter.detect_backend("iptables v2.0.0 (something)")


@pytest.mark.parametrize(
    ("ipv6", "expected"), [("on", [Family.IPV4, Family.IPV6]), ("off", [Family.IPV4])]
)
def test_families(ipv6: str, expected: list[Family]) -> None:
    assert adapter.families(ipv6) == expected


def test_cli_module_keeps_heavy_imports_out() -> None:
    """The init container runs this: importing it must not pull in mitmproxy & co."""
    code = (
        "import sys, sidecar.iptables.cli; "
        "heavy = ('mitmproxy', 'kubernetes', 'opentelemetry', 'yaml'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("has_v6", "expected"), [(True, 2), (False, 1)])
def test_ipv6_auto_follows_the_kernel(
    monkeypatch: pytest.MonkeyPatch, has_v6: bool, expected: int
) -> None:
    monkeypatch.setattr(adapter, "kernel_has_ipv6", lambda: has_v6)
    assert len(adapter.families("auto")) == expected


def test_legacy_lock_stays_on_run_when_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(adapter.LOCK_ENV, raising=False)
    monkeypatch.setattr(adapter, "DEFAULT_LOCK", str(tmp_path / "xtables.lock"))
    assert adapter.legacy_lock_env((adapter.DEFAULT_LOCK, str(tmp_path / "other"))) == ()


def test_legacy_lock_moves_when_run_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(adapter.LOCK_ENV, raising=False)
    unwritable = str(tmp_path / "missing-dir" / "xtables.lock")
    fallback = str(tmp_path / "xtables.lock")
    assert adapter.legacy_lock_env((unwritable, fallback)) == ((adapter.LOCK_ENV, fallback),)
    monkeypatch.setenv(adapter.LOCK_ENV, "/somewhere/else")
    assert adapter.legacy_lock_env((unwritable, fallback)) == ()  # the user's choice wins


def test_apply_reports_unreadable_save_output_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(adapter, "resolve_backend", lambda choice: Backend.NFT)
    monkeypatch.setattr(adapter, "tools_for", lambda fam, backend: adapter.Tools("save", "restore"))
    monkeypatch.setattr(adapter, "_run", lambda argv, stdin=None, env=(): "garbage line\n")
    assert cli.main(["apply", "--ipv6", "off"]) == 1
    assert "iptables-save line 1" in capsys.readouterr().err


def test_apply_loads_exactly_the_planned_text(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[tuple[list[str], str | None]] = []

    def fake_run(argv: list[str], stdin: str | None = None, env: object = ()) -> str:
        loaded.append((argv, stdin))
        return ""  # an empty namespace

    monkeypatch.setattr(adapter, "resolve_backend", lambda choice: Backend.LEGACY)
    monkeypatch.setattr(adapter, "tools_for", lambda fam, backend: adapter.Tools("s", "r"))
    monkeypatch.setattr(adapter, "_run", fake_run)
    assert cli.main(["apply", "--ipv6", "off", "--resolv-conf", str(RESOLV_CONF)]) == 0
    (save_call, restore_call) = loaded
    assert save_call == (["s"], None)
    assert restore_call[0] == ["r", "--noflush", "--wait", "10"]
    servers = rules.parse_addresses("10.96.0.10,fd00:10:96::a")  # read at run time
    expected = rules.render_rules(rules.CaptureOptions(dns_servers=servers), Family.IPV4)
    assert restore_call[1] == expected
    # the name servers read at run time: their queries redirected to the DNS listener
    assert (
        "-A EGRESS_SIDECAR_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 "
        "-j REDIRECT --to-ports 15053\n"
    ) in expected
