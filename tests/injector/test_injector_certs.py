"""`egress-injector certs`: a serving certificate the API server will accept, and its manifests."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from injector import certs
from sidecar import contract as c
from tests.injector.support import REPO, validate


def test_serving_certificate_is_signed_by_the_ca_for_the_service_names() -> None:
    names = certs.service_dns_names("egress-injector", "egress-system")
    bundle = certs.generate(names, ["127.0.0.1"], days=30)
    ca = x509.load_pem_x509_certificate(bundle.ca_pem)
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "egress-injector",
        "egress-injector.egress-system",
        "egress-injector.egress-system.svc",
        "egress-injector.egress-system.svc.cluster.local",
    ]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=30) == lifetime
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert base64.b64decode(bundle.ca_bundle) == bundle.ca_pem


@pytest.mark.parametrize(("names", "days"), [([], 1), (["a"], 0)])
def test_generate_rejects_bad_input(names: list[str], days: int) -> None:
    with pytest.raises(ValueError):
        certs.generate(names, days=days)


def test_secret_and_patch_manifests_validate() -> None:
    bundle = certs.generate(["x"])
    secret = certs.secret_manifest(bundle, "egress-injector-tls", "egress-system")
    validate(secret)
    assert base64.b64decode(secret["data"]["tls.key"]) == bundle.key_pem
    patch = certs.cabundle_patch(bundle)
    webhooks = yaml.safe_load(
        (REPO / "config" / "injector" / "mutatingwebhookconfiguration.yaml").read_text()
    )["webhooks"]
    assert [w["name"] for w in patch["webhooks"]] == [w["name"] for w in webhooks]


def test_cli_output_dir_renders_with_kustomize(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "injector.cli",
            "certs",
            "--output-dir",
            str(out),
            "--kustomize-base",
            str(REPO / "config"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "tls.key").stat().st_mode & 0o077 == 0
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    hook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
    ca = (out / "ca.crt").read_bytes()
    for webhook in hook["webhooks"]:
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == ca
        assert webhook["clientConfig"]["service"]["name"] == "egress-injector"
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["namespace"] == "egress-system"
    for doc in docs:
        validate(doc)


def test_cli_prints_manifests_without_output_dir() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "injector.cli", "certs", "--namespace", "ns", "--service", "svc"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    secret, patch = yaml.safe_load_all(proc.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "ns"
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "svc.ns.svc" in san.get_values_for_type(x509.DNSName)
    assert patch["kind"] == "MutatingWebhookConfiguration"


# --------------------------------------------------------------------------- inspection CA


def _load(ca: certs.InspectionCA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def test_inspection_ca_signs_leaves_only() -> None:
    ca = certs.generate_inspection_ca("shop", days=30)
    cert, key = _load(ca)
    assert cert.public_key() == key.public_key()  # the key in the Secret is this CA's
    assert cert.issuer == cert.subject  # self-signed root
    cert.verify_directly_issued_by(cert)
    assert "shop" in cert.subject.rfc4514_string()
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is True and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign
    assert dt.timedelta(days=30) == cert.not_valid_after_utc - cert.not_valid_before_utc


def _pem_file(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _signed(
    subject: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def test_inspection_ca_pathlen_0_is_enforced_by_openssl(tmp_path: Path) -> None:
    """A leaf it signs verifies; a leaf under a sub-CA it signed does not (pathlen 0)."""
    ca_cert, ca_key = _load(certs.generate_inspection_ca("shop"))
    leaf, _ = _signed("api.stripe.com", ca_cert, ca_key, ca=False)
    sub, sub_key = _signed("rogue intermediate", ca_cert, ca_key, ca=True)
    under_sub, _ = _signed("api.github.com", sub, sub_key, ca=False)
    cafile = _pem_file(tmp_path / "ca.pem", ca_cert)

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", cafile, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    ok = verify("-x509_strict", _pem_file(tmp_path / "leaf.pem", leaf))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = verify(
        "-untrusted", _pem_file(tmp_path / "sub.pem", sub), _pem_file(tmp_path / "u.pem", under_sub)
    )
    assert bad.returncode != 0
    assert "path length" in (bad.stdout + bad.stderr).lower()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "injector.cli", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_inspect_ca_prints_the_egress_ca_secret() -> None:
    proc = _cli("--inspect-ca", "--namespace", "shop")
    assert proc.returncode == 0, proc.stderr
    (secret,) = yaml.safe_load_all(proc.stdout)
    validate(secret)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == c.INSPECT_CA_SECRET == "egress-ca"
    assert secret["metadata"]["namespace"] == "shop"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"tls.crt", "tls.key", "ca.crt"}
    assert data["ca.crt"] == data["tls.crt"]
    cert, _ = _load(certs.InspectionCA(cert_pem=data["tls.crt"], key_pem=data["tls.key"]))
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=3650)  # the --inspect-ca default


def test_cli_inspect_ca_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "ca"
    proc = _cli("--inspect-ca", "-n", "shop", "--days", "90", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "kubectl create -f" in proc.stderr
    assert (out / "egress-ca.yaml").stat().st_mode & 0o077 == 0  # it holds the key
    secret = yaml.safe_load((out / "egress-ca.yaml").read_text())
    assert base64.b64decode(secret["data"]["tls.crt"]) == (out / "ca.crt").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "egress-ca.yaml"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--inspect-ca"], 2, "needs --namespace"),
        (["--inspect-ca", "-n", "shop", "--ip", "127.0.0.1"], 2, "--ip cannot be used"),
        (["--inspect-ca", "-n", "shop", "--secret-name", "x"], 2, "--secret-name cannot"),
        (["--inspect-ca", "-n", "shop", "--print-ca-bundle"], 2, "--print-ca-bundle cannot"),
        (["--inspect-ca", "-n", "Not_A_Namespace"], 1, "not a namespace name"),
        (["--inspect-ca", "-n", "shop", "--days", "0"], 1, "days must be positive"),
    ],
)
def test_cli_inspect_ca_refuses(args: list[str], code: int, message: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert proc.stdout == ""
