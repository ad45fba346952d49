"""Generated configuration text for the upstream, Squid, the sidecar and wrk (pure functions)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
BODY = "hello from the benchmark upstream\n"
BIG_PATH = "/big.bin"


@dataclass(frozen=True)
class UpstreamPorts:
    http: int
    https: int


def nginx_conf(
    workdir: Path, ports: UpstreamPorts, cert: Path, key: Path, address: str = LOOPBACK
) -> str:
    """One nginx process (no master), plain HTTP and TLS on ``address`` (loopback, or the outside
    address of the transparent scenario's namespaces), a tiny body and a big file on both.
    The big file over plain HTTP goes out with sendfile, so that the download through a tunnel
    costs the load generators' core little more than curl's reads: the proxy is its bound.

    keepalive_requests is raised so that a keep-alive client (or a proxy's pooled upstream
    connection) is never closed by nginx mid-run: reconnections would blur req/s.
    """
    temp = workdir / "nginx-temp"
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    default_type text/plain;
    server {{
        listen {address}:{ports.http} backlog=4096;
        root {workdir}/www;
        sendfile on;
        location = {BIG_PATH} {{ }}
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}
    server {{
        listen {address}:{ports.https} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {workdir}/www;
        location = {BIG_PATH} {{ }}
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}
}}
"""


def squid_conf(workdir: Path, port: int, upstream: UpstreamPorts) -> str:
    """Squid as a forward proxy allowing exactly the upstream (both ports), nothing cached."""
    return f"""\
http_port {LOOPBACK}:{port}
acl bench_dst dst {LOOPBACK}/32
acl bench_ports port {upstream.http} {upstream.https}
http_access allow bench_dst bench_ports
http_access deny all
cache deny all
cache_mem 0 MB
pid_filename {workdir}/squid.pid
access_log stdio:{workdir}/squid-access.log
cache_log {workdir}/squid-cache.log
cache_store_log none
coredump_dir {workdir}
visible_hostname egress-bench
shutdown_lifetime 0 seconds
dns_v4_first on
pinger_enable off
"""


def allowlist_yaml(upstream: UpstreamPorts) -> str:
    """The same destinations for the sidecar, by address (the upstream is an IP literal)."""
    return f"""\
mode: enforce
allow:
  - cidr: {LOOPBACK}/32
    ports: [{upstream.http}, {upstream.https}]
"""


def named_allowlist_yaml(host: str, port: int) -> str:
    """The small allowlist of the rules comparison: one host rule for the name requested."""
    return f"""\
mode: enforce
allow:
  - host: {host}
    ports: [{port}]
"""


def big_allowlist_yaml(rules: int, host: str, port: int) -> str:
    """``rules`` host rules (``host`` among them, in the middle) and, on top, one wildcard and
    one cidr per hundred (prefix lengths /16 to /32 in 10.0.0.0/8, so the decision has many
    per-prefix-length lookups to make) and a few deny rules: what a large
    organisation's generated allowlist looks like. The request is decided by the host rule."""
    wildcards = max(rules // 100, 1)
    cidrs = max(rules // 100, 1)
    hosts = max(rules, 1)
    lines = ["mode: enforce", "allow:"]
    middle = hosts // 2
    for i in range(hosts):
        name = host if i == middle else f"svc-{i:05d}.team-{i % 97:02d}.rules.bench.test"
        lines += [f"  - host: {name}", f"    ports: [{port}, 443]"]
    lines += [f'  - "*.zone-{i:04d}.wild.bench.test"' for i in range(wildcards)]
    for i in range(cidrs):
        net = ipaddress.ip_network(f"10.{i % 256}.{i // 256}.0/{16 + i % 17}", strict=False)
        lines += [f"  - cidr: {net}", "    ports: [5432]"]
    lines += ["deny:", *(f"  - blocked-{i:03d}.rules.bench.test" for i in range(20))]
    return "\n".join(lines) + "\n"


def wrk_script(*, url: str, host: str, limit: int) -> str:
    """wrk Lua: one fixed request (absolute-form when ``url`` is absolute, i.e. via a proxy).

    Each thread stops after ``limit`` requests (wrk itself only bounds time). ``done`` prints
    one machine-readable line so nothing depends on wrk's human summary format.
    """
    return f"""\
local n = 0
local req = nil
init = function(args)
  req = wrk.format("GET", "{url}", {{ ["Host"] = "{host}" }})
end
request = function()
  n = n + 1
  if n > {limit} then wrk.thread:stop() end
  return req
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d "
    .. "p50_us=%d p99_us=%d mean_us=%.1f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def write_self_signed(cert_path: Path, key_path: Path) -> None:
    """An ECDSA P-256 certificate for 127.0.0.1 (cheap handshakes: the proxies are measured)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress-bench upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
