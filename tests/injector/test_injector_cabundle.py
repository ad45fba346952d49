"""`egress-injector ca-bundle`, the command the injected init container egress-ca-bundle runs: on
a real system bundle, the result makes openssl, Python's ssl, curl, requests, httpx and Node trust
a leaf the egress CA signed (through the variables the injector sets), while the system bundle
alone does not; it never copies a key, and without a CA (--optional) it keeps the pod starting."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from injector import cabundle, certs
from injector.cli import build_parser
from injector.mutate import BUNDLE_PATH, CA_CERT_PATH, TRUST_ENV, ca_bundle_container
from tests.injector.support import config
from tests.support.tls import inspection_leaf
from tests.support.upstream import UpstreamServer

SYSTEM = Path("/etc/ssl/certs/ca-certificates.crt")
HOST = "api.stripe.test"  # resolved to 127.0.0.1 by each client, never by DNS


@dataclass(frozen=True)
class Files:
    ca: Path  # the Secret's tls.crt, as the init container sees it
    ca_key: Path
    leaf: Path
    leaf_key: Path


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    ca = certs.generate_inspection_ca("shop", days=30)
    # what the sidecar does for an inspected host: a short-lived leaf signed by the namespace CA
    leaf_pem, leaf_key_pem = inspection_leaf(ca.cert_pem, ca.key_pem, HOST)
    return Files(
        ca=_write_pem(tmp_path / "ca.crt", ca.cert_pem),
        ca_key=_write_pem(tmp_path / "ca.key", ca.key_pem),
        leaf=_write_pem(tmp_path / "leaf.crt", leaf_pem),
        leaf_key=_write_pem(tmp_path / "leaf.key", leaf_key_pem),
    )


def run_bundle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector.cli", "ca-bundle", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def bundle(files: Files, tmp_path: Path) -> Path:
    out = tmp_path / "ca-bundle" / "ca-certificates.crt"
    proc = run_bundle("--ca", str(files.ca), "--out", str(out), "--system", str(SYSTEM))
    assert proc.returncode == 0, proc.stderr
    assert "egress-sidecar inspection CA (shop)" in proc.stderr
    return out


@pytest.fixture
def upstream(files: Files) -> Iterator[UpstreamServer]:
    server = UpstreamServer("127.0.0.1", tls=(files.leaf, files.leaf_key), label="inspected")
    server.start()
    try:
        yield server
    finally:
        server.stop()


PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def test_the_bundle_is_the_system_roots_then_the_ca(files: Files, bundle: Path) -> None:
    system = PEM.findall(SYSTEM.read_bytes())
    got = PEM.findall(bundle.read_bytes())
    assert len(system) > 100  # a real bundle
    assert got[:-1] == system
    assert got[-1] == files.ca.read_bytes().strip()
    assert bundle.read_bytes().startswith(SYSTEM.read_bytes())
    assert bundle.stat().st_mode & 0o777 == 0o644  # app containers run as any UID
    assert b"PRIVATE KEY" not in bundle.read_bytes()
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]  # no temporary left


def _openssl_verify(cafile: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(cafile), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_openssl_verify_trusts_the_leaf_with_the_bundle_only(files: Files, bundle: Path) -> None:
    ok = _openssl_verify(bundle, files.leaf)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    without = _openssl_verify(SYSTEM, files.leaf)
    assert without.returncode != 0  # the system roots alone do not know the egress CA


def _handshake(context: ssl.SSLContext, port: int) -> str:
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_python_ssl_trusts_the_leaf_with_the_bundle(bundle: Path, upstream: UpstreamServer) -> None:
    strict = ssl.create_default_context(cafile=str(bundle))
    # Python 3.13's default (the image's python3): the CA must carry what strict checks want
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _handshake(strict, upstream.port) == HOST
    assert _handshake(ssl.create_default_context(cafile=str(bundle)), upstream.port) == HOST
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ssl.create_default_context(cafile=str(SYSTEM)), upstream.port)


def _client_env(bundle: Path, ca: Path) -> dict[str, str]:
    """The app container's environment as the injector writes it, with the paths of this test."""
    paths = {BUNDLE_PATH: str(bundle), CA_CERT_PATH: str(ca)}
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for var, value in TRUST_ENV:
        env[var] = paths[value]
    return env


URL = f"https://{HOST}:{{port}}/v1/charges"
CLIENTS = {
    "curl": ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
             f"{HOST}:{{port}}:127.0.0.1", URL],
    "requests": [sys.executable, "-c",
                 "import sys, socket, requests\n"
                 "real = socket.getaddrinfo\n"
                 "socket.getaddrinfo = lambda h, *a, **k: real('127.0.0.1' if h == sys.argv[2] "
                 "else h, *a, **k)\n"
                 "print(requests.get(sys.argv[1], timeout=10).status_code, end='')",
                 URL, HOST],
    "httpx": [sys.executable, "-c",
              "import sys, socket, httpx\n"
              "real = socket.getaddrinfo\n"
              "socket.getaddrinfo = lambda h, *a, **k: real('127.0.0.1' if h == sys.argv[2] "
              "else h, *a, **k)\n"
              "print(httpx.get(sys.argv[1], timeout=10).status_code, end='')",
              URL, HOST],
    "node": ["node", "-e",
             "const https = require('https');\n"
             "https.get(process.argv[1], {lookup: (h, o, cb) => o && o.all ? "
             "cb(null, [{address: '127.0.0.1', family: 4}]) : cb(null, '127.0.0.1', 4)}, "
             "r => { process.stdout.write(String(r.statusCode)); r.resume(); })"
             ".on('error', e => { console.error(e.code || e.message); process.exit(1); });",
             URL],
}  # fmt: skip


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_clients_trust_the_leaf_through_the_injected_variables(
    client: str, files: Files, bundle: Path, upstream: UpstreamServer
) -> None:
    """SSL_CERT_FILE (httpx), REQUESTS_CA_BUNDLE (requests), CURL_CA_BUNDLE (curl) at the bundle,
    NODE_EXTRA_CA_CERTS (Node) at the CA certificate alone; the same clients with the variables
    pointing at the system bundle fail their handshake."""
    argv = [a.replace("{port}", str(upstream.port)) for a in CLIENTS[client]]

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, env=env
        )

    ok = run(_client_env(bundle, files.ca))
    assert (ok.returncode, ok.stdout) == (0, "200"), ok.stderr
    assert upstream.seen.requests[-1]["path"] == "/v1/charges"
    refused = run(_client_env(SYSTEM, SYSTEM))
    assert refused.returncode != 0 and refused.stdout != "200"
    assert len(upstream.seen.requests) == 1  # the refused client sent no request


def test_optional_without_the_ca_writes_the_system_roots(tmp_path: Path) -> None:
    out = tmp_path / "b" / "ca-certificates.crt"
    missing = tmp_path / "absent" / "ca.crt"
    proc = run_bundle(
        "--ca", str(missing), "--out", str(out), "--system", str(SYSTEM), "--optional"
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "inspected hosts will fail" in proc.stderr
    assert out.read_bytes() == SYSTEM.read_bytes()
    strict = run_bundle("--ca", str(missing), "--out", str(out) + "2", "--system", str(SYSTEM))
    assert strict.returncode == 1 and "cannot read" in strict.stderr
    assert not Path(str(out) + "2").exists()


@pytest.mark.parametrize("optional", [False, True])
@pytest.mark.parametrize("wrong", ["key", "leaf", "two", "text"])
def test_a_key_or_a_non_ca_is_never_put_in_the_bundle(
    files: Files, tmp_path: Path, wrong: str, optional: bool
) -> None:
    content = {
        "key": files.ca.read_bytes() + files.ca_key.read_bytes(),  # a whole Secret, say
        "leaf": files.leaf.read_bytes(),
        "two": files.ca.read_bytes() + files.leaf.read_bytes(),
        "text": b"not a certificate\n",
    }[wrong]
    ca = _write_pem(tmp_path / "ca.crt", content)
    out = tmp_path / "out.crt"
    args = ["--ca", str(ca), "--out", str(out), "--system", str(SYSTEM)]
    proc = run_bundle(*args, *(["--optional"] if optional else []))
    if optional:
        assert proc.returncode == 0 and "warning:" in proc.stderr
        assert out.read_bytes() == SYSTEM.read_bytes()
    else:
        assert proc.returncode == 1, proc.stderr
        assert not out.exists()
    assert "ca-bundle:" in proc.stderr


def test_a_system_bundle_that_is_not_one_is_refused(files: Files, tmp_path: Path) -> None:
    empty = _write_pem(tmp_path / "empty.crt", b"")
    out = tmp_path / "out.crt"
    proc = run_bundle(
        "--ca", str(files.ca), "--out", str(out), "--system", str(empty), "--optional"
    )
    assert proc.returncode == 1 and "no PEM certificate" in proc.stderr
    assert not out.exists()


def test_default_system_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cabundle.default_system_bundle() == SYSTEM  # Debian's, on this machine
    # a system without a bundle of its own: certifi's Mozilla roots then
    monkeypatch.setattr(cabundle, "SYSTEM_BUNDLES", (str(tmp_path / "none.crt"),))
    import certifi

    assert cabundle.default_system_bundle() == Path(certifi.where())
    assert len(PEM.findall(Path(certifi.where()).read_bytes())) > 100


def test_the_injected_command_line_is_this_command() -> None:
    container = ca_bundle_container(config())
    assert container["command"] == ["egress-injector", "ca-bundle"]
    args = build_parser().parse_args(["ca-bundle", *container["args"]])
    assert (args.ca, args.out, args.optional, args.system) == (
        CA_CERT_PATH,
        BUNDLE_PATH,
        True,
        None,
    )
    assert args.func.__name__ == "cmd_ca_bundle"
