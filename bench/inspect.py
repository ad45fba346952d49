"""Bench scenario on its own: inspected HTTPS (``inspect: true``) through the sidecar, against
Squid with ssl-bump when the installed Squid is built with OpenSSL (Debian's ``squid-openssl``;
the GnuTLS ``squid`` cannot bump).

Both proxies terminate the client's TLS with a leaf from a CA of their own, open their own TLS
to nginx (a certificate for ``inspected.bench`` by a private CA both verify), allow GET only,
and are measured with ``hey -x`` (keep-alive: many requests per tunnel; and a new tunnel, so two
TLS handshakes, per request). CPU is the proxy's process tree's utime+stime across each run.

    python -m bench.inspect [--seconds 5] [--connections 16] [--out .bench/inspect.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bench.configs import LOOPBACK, UpstreamPorts, nginx_conf
from bench.loadgen import Generators, LoadResult
from bench.procstat import cpu_seconds
from bench.runner import plan_pinning
from bench.servers import Server, _spawn, free_port, port_open, start_sidecar
from bench.tools import find_tools
from injector.certs import CertificateAuthority

NAME = "inspected.bench"
# nginx on port 443 of an address of its own: the proxies' bumped requests carry a Host without a
# port (hey's -host sets the Host header and the TLS server name alike), which means 443.
UPSTREAM = "127.0.0.77"


@dataclass(frozen=True)
class Row:
    proxy: str
    load: str
    result: LoadResult
    cpu_s: float

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / self.result.ok if self.result.ok else float("nan")


def squid_can_bump(squid: str) -> bool:
    out = subprocess.run([squid, "-v"], capture_output=True, text=True, check=False).stdout
    return "--with-openssl" in out and "--enable-ssl-crtd" in out


def squid_bump_conf(workdir: Path, port: int, ca_pem: Path, upstream_ca: Path, https: int) -> str:
    """Squid as a bumping forward proxy: peek at the ClientHello, bump, verify the upstream
    against ``upstream_ca``, allow GET to the bench host's HTTPS port only."""
    return f"""\
http_port {LOOPBACK}:{port} ssl-bump generate-host-certificates=on \
dynamic_cert_mem_cache_size=16MB tls-cert={ca_pem}
sslcrtd_program /usr/lib/squid/security_file_certgen -s {workdir}/ssl_db -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={upstream_ca}
acl bench_port port {https}
acl bench_host dstdomain {NAME}
acl get_only method GET
http_access allow CONNECT bench_host bench_port
http_access allow bench_host bench_port get_only
http_access deny all
hosts_file {workdir}/hosts
cache deny all
cache_mem 0 MB
pid_filename {workdir}/squid.pid
access_log stdio:{workdir}/access.log
cache_log {workdir}/squid-cache.log
cache_store_log none
coredump_dir {workdir}
visible_hostname egress-bench
shutdown_lifetime 0 seconds
pinger_enable off
"""


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _warm_up(gen: Generators, https: int, proxy_port: int) -> None:
    """A second of light load first: mitmproxy loads on the first inspected connection and both
    proxies fill their leaf caches, so the measured runs see neither."""
    gen.hey_https(
        upstream_port=https,
        proxy_port=proxy_port,
        connections=2,
        seconds=1,
        new_connection_each=False,
        max_qps_per_worker=50,
        address=NAME,
        name=NAME,  # hey: the Host header and the TLS server name, without a port
    )


def _measure(
    gen: Generators, pid: int, port: int, https: int, args: argparse.Namespace
) -> list[tuple[str, LoadResult, float]]:
    out = []
    for load, new_each in (("keep-alive", False), ("new tunnel per request", True)):
        cpu0 = cpu_seconds(pid)
        result = gen.hey_https(
            upstream_port=https,
            proxy_port=port,
            connections=args.connections,
            seconds=args.seconds,
            new_connection_each=new_each,
            max_qps_per_worker=100_000,
            address=NAME,
            name=NAME,  # hey: the Host header and the TLS server name, without a port
        )
        out.append((load, result, cpu_seconds(pid) - cpu0))
    return out


def run(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    tools = find_tools()
    pin = plan_pinning(tools, not args.no_pin)
    notes = [f"pinning: {pin.description}"]
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-inspect-"))
    workdir.chmod(0o755)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)
    upstream_ca = CertificateAuthority("egress-bench upstream CA", start, end)
    leaf = upstream_ca.issue([NAME], [UPSTREAM], not_before=start, not_after=end)
    egress_ca = CertificateAuthority("egress-bench inspection CA", start, end)
    egress_key = egress_ca._key.private_bytes(  # the bench's own CA: its key is needed here
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ca_dir = workdir / "egress-ca"
    ca_dir.mkdir()
    _write(ca_dir / "tls.crt", egress_ca.cert_pem)
    _write(ca_dir / "tls.key", egress_key, 0o600)
    upstream_ca_pem = _write(workdir / "upstream-ca.pem", upstream_ca.cert_pem)
    # nginx, the config the main bench uses, with a certificate for the bench host name.
    nginx_dir = workdir / "nginx"
    for sub in ("www", "nginx-temp/body", "nginx-temp/proxy", "nginx-temp/fastcgi"):
        (nginx_dir / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("uwsgi", "scgi"):
        (nginx_dir / "nginx-temp" / sub).mkdir(parents=True, exist_ok=True)
    cert = _write(nginx_dir / "upstream.crt", leaf.cert_pem + upstream_ca.cert_pem)
    key = _write(nginx_dir / "upstream.key", leaf.key_pem, 0o600)
    ports = UpstreamPorts(free_port(), 443)
    (nginx_dir / "nginx.conf").write_text(nginx_conf(nginx_dir, ports, cert, key, UPSTREAM))
    servers: list[Server] = []
    rows: list[Row] = []
    gen = Generators(tools.wrk, tools.hey, tools.curl, pin.load, workdir)
    try:
        nginx = _spawn(
            "nginx",
            [*pin.load, tools.nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf")],
            nginx_dir / "nginx.log",
        )
        servers.append(nginx)
        nginx.wait(lambda: port_open(ports.https, UPSTREAM), 15)

        allowlist = (
            f"allow:\n  - {{host: {NAME}, ports: [{ports.https}], inspect: true, methods: [GET]}}\n"
        )
        sidecar = start_sidecar(
            pin.proxy,
            workdir / "sidecar",
            ports,
            allowlist=allowlist,
            names={NAME: UPSTREAM},
            env={
                "EGRESS_INSPECT_CA_DIR": str(ca_dir),
                "EGRESS_INSPECT_UPSTREAM_CA_FILE": str(upstream_ca_pem),
            },
        )
        servers.append(sidecar.server)
        _warm_up(gen, ports.https, sidecar.port)
        for load, result, cpu in _measure(gen, sidecar.server.pid, sidecar.port, ports.https, args):
            rows.append(Row("egress-sidecar (inspect: true)", load, result, cpu))
        sidecar.server.stop()

        if not squid_can_bump(tools.squid):
            notes.append(
                f"{tools.squid} is not built with OpenSSL (Debian's GnuTLS `squid`): no ssl-bump "
                "row; `apt-get install squid-openssl` provides one"
            )
            return rows, notes
        squid_dir = workdir / "squid"
        squid_dir.mkdir()
        ca_pem = _write(squid_dir / "bump-ca.pem", egress_ca.cert_pem + egress_key)
        (squid_dir / "hosts").write_text(f"{UPSTREAM} {NAME}\n")
        certgen = "/usr/lib/squid/security_file_certgen"
        subprocess.run(
            [certgen, "-c", "-s", str(squid_dir / "ssl_db"), "-M", "16MB"],
            check=True,
            capture_output=True,
        )
        if os.geteuid() == 0:
            user = pwd.getpwnam("proxy")
            for path in [squid_dir, *squid_dir.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        port = free_port()
        conf = squid_dir / "squid.conf"
        conf.write_text(squid_bump_conf(squid_dir, port, ca_pem, upstream_ca_pem, ports.https))
        squid = _spawn(
            "squid", [*pin.proxy, tools.squid, "-N", "-f", str(conf)], squid_dir / "squid.log"
        )
        servers.append(squid)
        squid.wait(lambda: port_open(port), 20)
        _warm_up(gen, ports.https, port)
        for load, result, cpu in _measure(gen, squid.pid, port, ports.https, args):
            rows.append(Row("Squid 5.7 ssl-bump (squid-openssl)", load, result, cpu))
        return rows, notes
    finally:
        for server in reversed(servers):
            server.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            notes.append(f"workdir kept: {workdir}")


def render(rows: list[Row], notes: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"Inspected HTTPS, GET through `hey -x`, c={args.connections}, {args.seconds} s per run",
        "",
        "| proxy | load | req/s | CPU ms per request | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        lines.append(
            f"| {row.proxy} | {row.load} | {r.rate:,.0f} | {row.cpu_ms_per_request:.2f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} |"
        )
    lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inspect", description=__doc__)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--out", type=Path, default=Path(".bench/inspect.md"))
    args = p.parse_args(argv)
    rows, notes = run(args)
    text = render(rows, notes, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
