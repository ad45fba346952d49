"""The inspection CA: read once at start, shared by both tiers (the fast path routes inspected
hosts to mitmproxy only when it is available; both deny them, fail closed, when it is not).

The CA comes from a directory holding ``tls.crt`` and ``tls.key`` (the keys of a
``kubernetes.io/tls`` Secret, ``egress-ca``, mounted read-only into the sidecar container only).
``cryptography`` is imported only when that directory exists: a pod without inspection pays
nothing for it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.contract import INSPECT_CA_DIR

# The injector mounts the Secret there (contract.py); one name for both sides.
DEFAULT_INSPECT_CA_DIR = INSPECT_CA_DIR
ENV_INSPECT_UPSTREAM_CA_FILE = "EGRESS_INSPECT_UPSTREAM_CA_FILE"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# Where Debian (and the image) keep the system trust store, when Python's OpenSSL names none.
_DEBIAN_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def system_trust_file() -> str:
    """The system trust store's bundle file: what upstream certificates are verified against
    (the image installs Debian's ca-certificates). Without one, certifi's bundle (a dependency
    of mitmproxy): Mozilla's roots too, rather than verifying against nothing."""
    import ssl  # only where inspection is set up

    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, _DEBIAN_BUNDLE):
        if candidate and os.path.isfile(candidate):
            return candidate
    import certifi

    return str(certifi.where())


@dataclass(frozen=True, slots=True)
class InspectionCA:
    """Whether inspection is available, and why not when it is not."""

    directory: Path
    upstream_ca_file: Path | None = None  # a private CA bundle trusted besides the system's
    cert_pem: bytes | None = None  # the CA certificate; None: not available
    key_pem: bytes | None = None
    problem: str | None = None  # why it is not available
    subject: str | None = None
    not_after: dt.datetime | None = None

    @property
    def available(self) -> bool:
        return self.cert_pem is not None and self.key_pem is not None

    @classmethod
    def unavailable(cls, directory: Path, problem: str) -> InspectionCA:
        return cls(directory, problem=problem)

    @classmethod
    def load(
        cls, directory: str | Path, upstream_ca_file: str | Path | None = None
    ) -> InspectionCA:
        """Read and check the CA: a CA certificate, its own key, valid now. Never raises."""
        where = Path(directory)
        upstream = Path(upstream_ca_file) if upstream_ca_file else None
        if not where.is_dir():
            return cls(where, upstream, problem=f"{where} does not exist")
        try:
            cert_pem = (where / CERT_FILE).read_bytes()
            key_pem = (where / KEY_FILE).read_bytes()
        except OSError as err:
            return cls(where, upstream, problem=f"cannot read the CA: {err}")
        problem, subject, not_after = _check(cert_pem, key_pem)
        if problem is not None:
            return cls(where, upstream, problem=problem)
        if upstream is not None and not upstream.is_file():
            return cls(where, upstream, problem=f"upstream CA file {upstream} does not exist")
        return cls(where, upstream, cert_pem, key_pem, None, subject, not_after)

    def describe(self) -> dict[str, str]:
        """The start line's fields."""
        if not self.available:
            return {
                "inspection": "not available",
                "inspection_ca_dir": str(self.directory),
                "inspection_problem": self.problem or "-",
            }
        return {
            "inspection": "available",
            "inspection_ca_dir": str(self.directory),
            "inspection_ca": self.subject or "-",
            "inspection_ca_not_after": self.not_after.isoformat() if self.not_after else "-",
            "inspection_upstream_trust": system_trust_file()
            + (f" + {self.upstream_ca_file}" if self.upstream_ca_file else ""),
        }


def _check(cert_pem: bytes, key_pem: bytes) -> tuple[str | None, str | None, dt.datetime | None]:
    """(problem, subject, not after) of a CA certificate and key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        return f"{CERT_FILE} is not a PEM certificate ({err})", None, None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as err:
        return f"{KEY_FILE} is not an unencrypted PEM private key ({err})", None, None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return f"{KEY_FILE}: only RSA and EC keys can issue leaf certificates", None, None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        return f"{KEY_FILE} is not the key of {CERT_FILE}", None, None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        return f"{CERT_FILE} is not a CA certificate (basicConstraints CA:TRUE)", None, None
    now = dt.datetime.now(dt.UTC)
    subject = cert.subject.rfc4514_string()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return (
            f"the CA {subject} is not valid now ({cert.not_valid_before_utc.isoformat()} .. "
            f"{cert.not_valid_after_utc.isoformat()})",
            None,
            None,
        )
    return None, subject, cert.not_valid_after_utc
