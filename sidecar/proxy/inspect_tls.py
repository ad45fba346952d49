"""HTTPS inspection's TLS, both sides, for the connections the layering chose to inspect (the
only ones that ever get TLS layers: every other connection passes through undecrypted).

- client side: a leaf certificate for the inspected host name, issued by the namespace's CA
  (``--inspect-ca-dir``), short-lived and cached (``LeafStore``);
- server side: TLS to the vetted address with SNI = the host, verified against the system trust
  store (plus ``--inspect-upstream-ca-file``), established *before* the client's handshake is
  answered, so the client is offered the ALPN (h2, http/1.1) the upstream chose.

mitmproxy's own TlsConfig does the pyOpenSSL work; what it decides by default (a CA generated
in confdir, certificate names copied from the upstream's, certifi's roots, a CRL endpoint) is
replaced here.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509
from mitmproxy import certs, tls
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.proxy import context

from sidecar.inspection import InspectionCA, system_trust_file
from sidecar.proxy.connections import Connections

log = logging.getLogger(__name__)

# Leaves are valid this long from issue (mitmproxy also backdates them 2 days for clock skew)
# and issued again once less than LEAF_RENEW_BEFORE is left: a leaf never outlives a day, and
# a cached one is never served expired.
LEAF_LIFETIME = dt.timedelta(hours=24)
LEAF_RENEW_BEFORE = dt.timedelta(hours=1)
# mitmproxy's dummy_cert reads this module global for not_after - not_before.
certs.CERT_EXPIRY = LEAF_LIFETIME - certs.CERT_VALIDITY_OFFSET


class LeafStore(certs.CertStore):
    """mitmproxy's CertStore (leaves cached by name, at most STORE_CAP of them, the oldest
    dropped first), with leaves that expire: one close to its end is issued again."""

    @classmethod
    def from_ca(cls, ca: InspectionCA, confdir: Path) -> LeafStore:
        assert ca.cert_pem is not None and ca.key_pem is not None
        key = certs.load_pem_private_key(ca.key_pem, None)
        cert = certs.Cert.from_pem(ca.cert_pem)
        confdir.mkdir(parents=True, exist_ok=True)
        dhparams = cls.load_dhparam(confdir / "inspection-dhparam.pem")
        return cls(key, cert, None, certs.dummy_crl(key, cert.to_cryptography()), dhparams)

    def get_cert(
        self,
        commonname: str | None,
        sans: list[x509.GeneralName],  # type: ignore[override]
        organization: str | None = None,
        crl_url: str | None = None,
    ) -> certs.CertStoreEntry:
        entry = super().get_cert(commonname, sans, organization, crl_url)
        if entry.cert.notafter - dt.datetime.now(dt.UTC) > LEAF_RENEW_BEFORE:
            return entry
        self.certs = {k: v for k, v in self.certs.items() if v is not entry}
        return super().get_cert(commonname, sans, organization, crl_url)


def upstream_trust_file(ca: InspectionCA, confdir: Path) -> str:
    """The bundle upstream certificates are verified against: the system trust store, and the
    private CAs of ``--inspect-upstream-ca-file`` when given (one file, written to confdir)."""
    system = system_trust_file()
    if ca.upstream_ca_file is None:
        return system
    combined = confdir / "inspection-upstream-trust.pem"
    confdir.mkdir(parents=True, exist_ok=True)
    parts = [Path(system).read_bytes(), b"\n", ca.upstream_ca_file.read_bytes()]
    combined.write_bytes(b"".join(parts))
    return str(combined)


class InspectTls(TlsConfig):
    """mitmproxy's TLS addon for inspected connections only (see the module docstring)."""

    name = "tlsconfig"
    # No CRL endpoint answered inside inspected TLS: every request would pass through it.
    request = None  # type: ignore[assignment]

    def __init__(self, ca: InspectionCA, confdir: Path, connections: Connections) -> None:
        super().__init__()
        self._connections = connections
        self.certstore = LeafStore.from_ca(ca, confdir)

    def configure(self, updated: set[str]) -> None:
        pass  # the store is ours (from the CA), never confdir's generated one

    def running(self) -> None:
        pass

    def _host(self, conn_context: context.Context) -> str:
        info = self._connections.get(conn_context.client)
        assert info.inspect_host is not None, "TLS layers on a connection that is not inspected"
        return info.inspect_host

    def tls_clienthello(self, tls_clienthello: tls.ClientHelloData) -> None:
        # The upstream first: its certificate is verified before the client is answered, and the
        # client is offered the ALPN the upstream chose.
        tls_clienthello.establish_server_tls_first = True

    def get_cert(self, conn_context: context.Context) -> certs.CertStoreEntry:
        # The inspected host's name only (never the upstream's other names or an address).
        host = self._host(conn_context)
        return self.certstore.get_cert(host, [x509.DNSName(host)])

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        # SNI and hostname verification against the decided host, never the pinned address.
        tls_start.conn.sni = self._host(tls_start.context)
        super().tls_start_server(tls_start)
