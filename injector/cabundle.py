"""``egress-injector ca-bundle``: the trust bundle of an inspecting pod's app containers.

Run by the injected init container ``egress-ca-bundle`` at pod start: system roots + the
namespace's egress CA certificate, written into an emptyDir that the app containers mount
read-only (their ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``). It reads the CA
*certificate* only: the init container mounts the Secret's ``tls.crt``, never its key.

The system roots are the first bundle found among the usual distribution paths (in the image,
Debian's ca-certificates), else certifi's (Mozilla's roots; mitmproxy's dependency, so always
installed).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

# Debian/Ubuntu/Alpine, Fedora/RHEL, openSUSE, and the OpenSSL default of some others.
SYSTEM_BUNDLES: Final = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


_PEM_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----"
)


class BundleError(ValueError):
    """A bundle could not be built; the message names the file and the problem."""


@dataclass(frozen=True)
class Bundle:
    pem: bytes
    system_roots: int  # certificates taken from the system bundle
    egress_ca: str | None  # the egress CA's subject, None when it was left out (optional)
    warning: str | None = None  # why the egress CA was left out


def default_system_bundle() -> Path:
    for candidate in SYSTEM_BUNDLES:
        path = Path(candidate)
        if path.is_file():
            return path
    import certifi  # only when the machine has no bundle of its own

    return Path(certifi.where())


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise BundleError(f"{what}: no PEM certificate in it ({exc})") from exc


def check_ca(pem: bytes, what: str) -> x509.Certificate:
    """The one CA certificate of ``pem``; a leaf, several certificates or a key are refused."""
    if b"PRIVATE KEY" in pem:
        # The app containers would read it: never copy a key into their bundle.
        raise BundleError(f"{what}: holds a private key; give the CA certificate alone")
    certs = _certificates(pem, what)
    if len(certs) != 1:
        raise BundleError(f"{what}: {len(certs)} certificates; expected the CA certificate alone")
    (cert,) = certs
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise BundleError(f"{what}: {cert.subject.rfc4514_string()} is not a CA (CA:true)")
    return cert


def build(system_pem: bytes, system_name: str, ca_pem: bytes | None, ca_name: str) -> Bundle:
    """The bundle text: the system bundle as it is, then the egress CA with a comment naming it
    (text between PEM blocks is skipped by OpenSSL, Go and Node alike).

    The system bundle's certificates are counted, not parsed: it is copied as it is, and real
    bundles hold roots that cryptography warns about (a negative serial) and may one day refuse.
    ``ca_pem`` None means the CA is to be left out (see ``make``)."""
    roots = _PEM_CERTIFICATE.findall(system_pem)
    if not roots:
        raise BundleError(f"{system_name}: no PEM certificate in it")
    body = system_pem if system_pem.endswith(b"\n") else system_pem + b"\n"
    if ca_pem is None:
        return Bundle(pem=body, system_roots=len(roots), egress_ca=None)
    cert = check_ca(ca_pem, ca_name)
    subject = cert.subject.rfc4514_string()
    ca_text = ca_pem if ca_pem.endswith(b"\n") else ca_pem + b"\n"
    pem = body + f"# egress-sidecar inspection CA: {subject}\n".encode() + ca_text
    return Bundle(pem=pem, system_roots=len(roots), egress_ca=subject)


def make(system: Path, ca: Path, *, optional: bool) -> Bundle:
    """Read the files and build the bundle. With ``optional``, a missing or unusable CA leaves
    the system roots alone, with a warning: the pod starts, and the sidecar denies the inspected
    hosts ("inspection CA not available") while every other host works."""
    try:
        system_pem = system.read_bytes()
    except OSError as exc:
        raise BundleError(f"{system}: cannot read: {exc.strerror}") from exc
    try:
        ca_pem: bytes | None = ca.read_bytes()
        problem = None
    except OSError as exc:
        if not optional:
            raise BundleError(f"{ca}: cannot read: {exc.strerror}") from exc
        ca_pem, problem = None, f"{ca}: cannot read: {exc.strerror}"
    if ca_pem is not None and optional:
        try:
            check_ca(ca_pem, str(ca))
        except BundleError as exc:
            ca_pem, problem = None, str(exc)
    bundle = build(system_pem, str(system), ca_pem, str(ca))
    if problem is None:
        return bundle
    return Bundle(
        pem=bundle.pem,
        system_roots=bundle.system_roots,
        egress_ca=None,
        warning=f"{problem}; the bundle holds the system roots alone (inspected hosts will fail)",
    )


def write(path: Path, data: bytes) -> None:
    """Replace ``path`` at once (a reader never sees half a bundle), readable by every UID: app
    containers run as any user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ca-bundle-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe(bundle: Bundle, out: Path, system: Path) -> Sequence[str]:
    """The lines printed on success (stderr, so a termination message shows them)."""
    lines = []
    if bundle.warning:
        lines.append(f"warning: {bundle.warning}")
    what = f"the egress CA ({bundle.egress_ca})" if bundle.egress_ca else "no egress CA"
    lines.append(f"wrote {out}: {bundle.system_roots} system roots from {system} + {what}")
    return lines
