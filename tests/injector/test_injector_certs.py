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
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from injector import certs
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
