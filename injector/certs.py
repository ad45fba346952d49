"""A CA and a serving certificate for the webhook Service, and the manifests that carry them;
and the per-namespace CA of opt-in HTTPS inspection.

``egress-injector certs`` writes a ``kubernetes.io/tls`` Secret (tls.crt, tls.key, ca.crt) and a
kustomize patch setting the webhook's ``caBundle``. The CA's private key signs the serving
certificate and is then thrown away: renewing means running the command again, which replaces
both (the cert-manager overlay in config/cert-manager/ renews automatically instead).

``egress-injector certs --inspect-ca --namespace NS`` makes the namespace's inspection CA instead:
the Secret ``egress-ca`` whose key the sidecar keeps to issue leaf certificates (so this key is
kept, in the Secret); config/inspect-ca-cert-manager/ is the cert-manager alternative.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar import contract as c

WEBHOOK_CONFIGURATION: Final = "egress-injector"
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
WEBHOOK_NAMES: Final = (
    "namespace.pods.egress-sidecar.io",
    "annotation.pods.egress-sidecar.io",
    "workloads.egress-sidecar.io",
)


@dataclass(frozen=True)
class CertBundle:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_bundle(self) -> str:
        """The base64 of the CA certificate, as MutatingWebhookConfiguration's caBundle wants."""
        return base64.b64encode(self.ca_pem).decode("ascii")


def service_dns_names(service: str, namespace: str) -> list[str]:
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A P-256 CA held in memory, issuing serving certificates (also the tests' CA)."""

    def __init__(self, common_name: str, not_before: dt.datetime, not_after: dt.datetime) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA's private key (PKCS#8 PEM, unencrypted: a Secret is its protection)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def issue(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> CertBundle:
        """A serving certificate for the names and addresses (the first one is its CN)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name([*dns_names, *ip_addresses][0]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return CertBundle(
            ca_pem=self.cert_pem,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def generate(
    dns_names: list[str],
    ip_addresses: list[str] | None = None,
    days: int = 365,
    now: dt.datetime | None = None,
) -> CertBundle:
    """A fresh P-256 CA and a serving certificate for ``dns_names`` (and IPs) signed by it.

    The CA's key is not kept: renewing means generating both again.
    """
    if not dns_names:
        raise ValueError("at least one DNS name is needed for the serving certificate")
    if days < 1:
        raise ValueError(f"days must be positive, got {days}")
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)  # clock skew
    end = start + dt.timedelta(days=days)
    ca = CertificateAuthority("egress-injector CA", start, end)
    return ca.issue(dns_names, ip_addresses or [], not_before=start, not_after=end)


def secret_manifest(bundle: CertBundle, name: str, namespace: str) -> dict[str, Any]:
    return _tls_secret(
        name,
        namespace,
        "egress-injector",
        cert_pem=bundle.cert_pem,
        key_pem=bundle.key_pem,
        ca_pem=bundle.ca_pem,
    )


def _tls_secret(
    name: str, namespace: str, app: str, *, cert_pem: bytes, key_pem: bytes, ca_pem: bytes
) -> dict[str, Any]:
    """A kubernetes.io/tls Secret with the ca.crt key cert-manager also writes."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": app},
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(cert_pem), "tls.key": b64(key_pem), "ca.crt": b64(ca_pem)},
    }


@dataclass(frozen=True)
class InspectionCA:
    """A namespace's inspection CA: its certificate and the key the sidecar signs leaves with."""

    cert_pem: bytes
    key_pem: bytes


def inspection_ca_name(namespace: str) -> str:
    # The namespace in the name: a client's "unknown issuer" error then says which CA it met.
    return f"egress-sidecar inspection CA ({namespace})"


def generate_inspection_ca(
    namespace: str, days: int = 3650, now: dt.datetime | None = None
) -> InspectionCA:
    """A fresh P-256 CA for ``namespace``: basicConstraints CA:true with pathlen 0 (it signs
    leaves only, never another CA) and keyUsage keyCertSign (+ cRLSign, digitalSignature).

    No name constraints: the allowlist decides which names are inspected, and the CA is only
    trusted by the pods of its namespace."""
    if not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a namespace name")
    if days < 1:
        raise ValueError(f"days must be positive, got {days}")
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)  # clock skew
    ca = CertificateAuthority(inspection_ca_name(namespace), start, start + dt.timedelta(days=days))
    return InspectionCA(cert_pem=ca.cert_pem, key_pem=ca.key_pem)


def inspection_ca_secret(ca: InspectionCA, namespace: str) -> dict[str, Any]:
    """The ``egress-ca`` Secret (kubernetes.io/tls) the injector mounts into the sidecar.

    ``ca.crt`` repeats the certificate, as cert-manager writes it for a self-signed CA, so that
    both ways of making the Secret have the same keys."""

    return _tls_secret(
        c.INSPECT_CA_SECRET,
        namespace,
        "egress-sidecar",
        cert_pem=ca.cert_pem,
        key_pem=ca.key_pem,
        ca_pem=ca.cert_pem,
    )


def cabundle_patch(bundle: CertBundle) -> dict[str, Any]:
    """A strategic-merge patch (webhooks merge by name) setting every webhook's caBundle."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION},
        "webhooks": [
            {"name": name, "clientConfig": {"caBundle": bundle.ca_bundle}} for name in WEBHOOK_NAMES
        ],
    }


def kustomization(base: str) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base, "secret.yaml"],
        "patches": [{"path": "webhook-cabundle-patch.yaml"}],
    }


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)
