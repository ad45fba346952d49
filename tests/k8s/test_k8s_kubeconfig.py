"""Kubeconfig loading by the sidecar's own client: every way a kubeconfig names the server's CA
and the user's credentials, against the HTTPS test API server (and a server that demands a client
certificate), and clear refusals of what the sidecar does not run (exec, auth-provider)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.k8s.client import ClientOptions, KubeClient, KubeConfigError
from tests.support.kubeapi import FakeKubeAPI, wait_until
from tests.support.tls import TestCA

type Doc = dict[str, Any]


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(tls=True, workdir=tmp_path / "pki", token="token-1")
    api.start()
    api.put_configmap("dev", "x", {"a": "b"})
    yield api
    api.stop()


def kubeconfig(api: FakeKubeAPI, tmp_path: Path, edit: Callable[[Doc, Doc, Path], None]) -> str:
    """The test server's kubeconfig, its cluster and user sections changed by ``edit``."""
    (tmp_path / "conf").mkdir()
    path = api.write_kubeconfig(tmp_path / "conf" / "kubeconfig", namespace="dev")
    doc = yaml.safe_load(path.read_text())
    edit(doc["clusters"][0]["cluster"], doc["users"][0]["user"], path.parent)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ca_data(cluster: Doc, user: Doc, d: Path) -> None:
    cluster["certificate-authority-data"] = b64(
        Path(cluster.pop("certificate-authority")).read_bytes()
    )


def ca_relative(cluster: Doc, user: Doc, d: Path) -> None:
    (d / "ca.crt").write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    cluster["certificate-authority"] = "ca.crt"  # relative to the kubeconfig's directory


def insecure(cluster: Doc, user: Doc, d: Path) -> None:
    del cluster["certificate-authority"]
    cluster["insecure-skip-tls-verify"] = True


def token_file(cluster: Doc, user: Doc, d: Path) -> None:
    (d / "token").write_text(user.pop("token") + "\n")
    user["tokenFile"] = str(d / "token")


def server_name(cluster: Doc, user: Doc, d: Path) -> None:
    cluster["tls-server-name"] = "localhost"  # the certificate names it; we dial 127.0.0.1


VARIANTS = {
    "ca-file": lambda c, u, d: None,
    "ca-data": ca_data,
    "ca-relative": ca_relative,
    "insecure-skip-tls-verify": insecure,
    "token-file": token_file,
    "tls-server-name": server_name,
}


@pytest.mark.parametrize("edit", list(VARIANTS.values()), ids=list(VARIANTS))
def test_kubeconfig_forms_reach_the_server(
    tls_api: FakeKubeAPI, tmp_path: Path, edit: Callable[[Doc, Doc, Path], None]
) -> None:
    client = KubeClient(ClientOptions(kubeconfig=kubeconfig(tls_api, tmp_path, edit)), {})
    listed = client.list_configmaps("dev", timeout=(2, 5))
    assert [i["metadata"]["name"] for i in listed["items"]] == ["x"]
    # The server records a request after answering it.
    (request,) = wait_until(lambda: tls_api.requests)
    assert (request.authorization or "").lower() == "bearer token-1"


def test_a_tls_server_name_the_certificate_does_not_carry_is_refused(
    tls_api: FakeKubeAPI, tmp_path: Path
) -> None:
    def wrong_name(cluster: Doc, user: Doc, d: Path) -> None:
        cluster["tls-server-name"] = "api.elsewhere.test"

    client = KubeClient(ClientOptions(kubeconfig=kubeconfig(tls_api, tmp_path, wrong_name)), {})
    with pytest.raises(ssl.SSLCertVerificationError, match=r"api\.elsewhere\.test"):
        client.list_configmaps("dev", timeout=(2, 5))


@pytest.mark.parametrize(
    ("user", "plugin"),
    [
        ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}, "exec"),
        ({"auth-provider": {"name": "gcp"}}, "auth-provider"),
    ],
)
def test_plugin_users_are_refused_with_a_hint(
    tls_api: FakeKubeAPI, tmp_path: Path, user: Doc, plugin: str
) -> None:
    def use_plugin(cluster: Doc, u: Doc, d: Path) -> None:
        u.clear()
        u.update(user)

    path = kubeconfig(tls_api, tmp_path, use_plugin)
    with pytest.raises(KubeConfigError, match=rf"'{plugin}'.*in-cluster service account.*token"):
        KubeClient(ClientOptions(kubeconfig=path), {})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc.pop("current-context"), "no current-context"),
        (lambda doc: doc.update({"current-context": "nope"}), "no context named 'nope'"),
        (lambda doc: doc["clusters"][0].update({"name": "other"}), "no cluster named 'fake'"),
        (
            lambda doc: doc["clusters"][0]["cluster"].update({"server": "ftp://x"}),
            "not an http",
        ),
        (
            lambda doc: doc["clusters"][0]["cluster"].update({"certificate-authority-data": "%%%"}),
            "not valid base64",
        ),
    ],
)
def test_broken_kubeconfigs_are_clear_errors(
    tls_api: FakeKubeAPI, tmp_path: Path, change: Callable[[Doc], object], message: str
) -> None:
    path = tls_api.write_kubeconfig(tmp_path / "kubeconfig")
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError, match=message):
        KubeClient(ClientOptions(kubeconfig=str(path)), {})


def test_a_client_certificate_is_presented(tmp_path: Path) -> None:
    """A server that requires a client certificate signed by its CA, as kube-apiserver does
    for x509 users, sees the one the kubeconfig names inline (client-*-data)."""
    ca = TestCA("fake-kube-ca")
    server_cert, server_key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "server")
    client_ca, client_ca_key = _client_ca()
    client_cert, client_key = _client_cert(client_ca, client_ca_key, "system:node:worker-1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cadata=_pem(client_ca).decode())
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[Any] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            seen.append(tls.getpeercert())
            tls.recv(65536)
            body = json.dumps({"kind": "ConfigMapList", "metadata": {}, "items": []}).encode()
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "node"}}],
        "clusters": [
            {
                "name": "k",
                "cluster": {
                    "server": f"https://127.0.0.1:{listener.getsockname()[1]}",
                    "certificate-authority-data": b64(ca.cert_pem),
                },
            }
        ],
        "users": [
            {
                "name": "node",
                "user": {
                    "client-certificate-data": b64(client_cert),
                    "client-key-data": b64(client_key),
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    try:
        kube = KubeClient(ClientOptions(kubeconfig=str(path)), {})
        assert kube.list_configmaps("dev", timeout=(2, 5))["items"] == []
        server.join(5)
        subject = dict(x[0] for x in seen[0]["subject"])
        assert subject["commonName"] == "system:node:worker-1"
    finally:
        listener.close()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA for client certificates, as kube-apiserver's --client-ca-file names."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-client-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _client_cert(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _pem(cert), key_pem
