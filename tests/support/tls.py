"""Test certificates: a private CA and server certificates for upstream test servers.

The CA is the injector's own (``injector.certs.CertificateAuthority``), valid for two days.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from injector.certs import CertificateAuthority


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    fingerprint_sha256: str  # of the leaf's DER, hex, lower case
    ca_pem: bytes

    def write(self, directory: Path, stem: str, *, chain: bool = False) -> tuple[Path, Path]:
        """Write ``stem.crt`` (leaf, plus the CA when ``chain``) and ``stem.key``."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem + (self.ca_pem if chain else b""))
        key.write_bytes(self.key_pem)
        return cert, key


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "egress-sidecar test CA") -> None:
        now = dt.datetime.now(dt.UTC)
        self._start, self._end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=2)
        self._ca = CertificateAuthority(name, self._start, self._end)

    @property
    def cert_pem(self) -> bytes:
        return self._ca.cert_pem

    @property
    def common_name(self) -> str:
        return str(self._ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    @property
    def key_pem(self) -> bytes:
        key = self._ca._key  # the tests' CA: its key is what the inspection CA is made of
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write_tls_dir(self, directory: Path) -> Path:
        """``directory`` as a mounted kubernetes.io/tls Secret: tls.crt and tls.key (the CA)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tls.crt").write_bytes(self.cert_pem)
        (directory / "tls.key").write_bytes(self.key_pem)
        return directory

    def issue(self, *names: str) -> Issued:
        """A leaf for host names and IP addresses (the first one is its CN)."""
        bundle = self._ca.issue(
            [n for n in names if not _is_ip(n)],
            [n for n in names if _is_ip(n)],
            not_before=self._start,
            not_after=self._end - dt.timedelta(days=1),
        )
        leaf = x509.load_pem_x509_certificate(bundle.cert_pem)
        return Issued(
            bundle.cert_pem,
            bundle.key_pem,
            leaf.fingerprint(hashes.SHA256()).hex(),
            bundle.ca_pem,
        )


def inspection_leaf(ca_cert_pem: bytes, ca_key_pem: bytes, host: str) -> tuple[bytes, bytes]:
    """(certificate, key) PEM of what the sidecar shows for an inspected ``host``: a one-hour
    serverAuth leaf signed by the inspection CA. Its Authority Key Identifier comes from the
    CA's Subject Key Identifier, as in mitmproxy's leaves: Python 3.13's default context
    verifies strictly (VERIFY_X509_STRICT) and refuses a leaf without one."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return leaf.public_bytes(serialization.Encoding.PEM), key_pem
