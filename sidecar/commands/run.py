"""`egress-sidecar run`: the proxy, its health server, its policy source and its telemetry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import contract
from sidecar.commands.options import add_policy_options, env_ranges
from sidecar.inspection import (
    DEFAULT_INSPECT_CA_DIR,
    ENV_INSPECT_UPSTREAM_CA_FILE,
    InspectionCA,
)
from sidecar.proxy.headlimits import HeadLimits

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.fastpath.accept import AcceptGate, OpenFiles
    from sidecar.telemetry.lean import LeanTracerProvider

log = logging.getLogger("sidecar.run")
# The head limits' defaults, written once (sidecar.proxy.headlimits is pure and small).
HEAD_DEFAULTS = HeadLimits()

ENV_DRAIN_TIMEOUT = "EGRESS_DRAIN_TIMEOUT"
DEFAULT_DRAIN_TIMEOUT = 20.0  # below Kubernetes' default terminationGracePeriodSeconds of 30
ENV_FLUSH_TIMEOUT = "EGRESS_FLUSH_TIMEOUT"
# Drain plus flush stay below the 30 s grace period even when the collector is a blackhole (the
# SDK would otherwise wait up to 30 s for the batch processor, plus the exporter's own timeout).
DEFAULT_FLUSH_TIMEOUT = 5.0
ENV_EVENT_LOOP = "EGRESS_EVENT_LOOP"  # uvloop or asyncio
ENV_DNS_LISTEN = "EGRESS_DNS_LISTEN"  # HOST:PORT[,...] or off
ENV_DNS_INTERNAL_DOMAINS = "EGRESS_DNS_INTERNAL_DOMAINS"  # comma-separated

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run the egress proxy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run the egress proxy: an explicit HTTP proxy (HTTP_PROXY/HTTPS_PROXY point here), a\n"
            "transparent listener for iptables-redirected connections, and health/metrics.\n"
            "Every outbound call is decided against the allowlist, logged as one JSON line on\n"
            "stdout and traced as one OpenTelemetry span (export set by the OTEL_* variables:\n"
            "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf, ...).\n"
            "TLS is never decrypted, except to hosts a rule inspects (inspect: true).\n\n"
            "The open-file soft limit is raised to the hard one at start; the proxy holds at most\n"
            "as many client connections as that leaves room for (the start line's\n"
            "connection_limit), further ones wait in the listen queue. SIGTERM drains (see\n"
            "--drain-timeout).\n\n"
            "examples:\n"
            "  egress-sidecar run --allowlist-file examples/allowlist.yaml\n"
            "  egress-sidecar run --configmap shop/egress-allowlist"
        ),
    )
    source = parser.add_argument_group("policy source (one of)")
    add_policy_options(parser, file_required=False, file_group=source)
    source.add_argument(
        "--configmap",
        metavar="[NS/]NAME[,...]",
        default=os.environ.get(contract.ENV_CONFIGMAPS),
        help="ConfigMap(s) holding allowlist.yaml, watched and hot-reloaded; several = union "
        f"(env {contract.ENV_CONFIGMAPS}; namespace defaults to the pod's own)",
    )
    source.add_argument(
        "--not-ready-when-api-unreachable",
        action="store_true",
        help="report not-ready while the API server has been unreachable for longer than "
        "--api-unreachable-after (the last good policy is enforced either way)",
    )
    source.add_argument(
        "--api-unreachable-after",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="see --not-ready-when-api-unreachable (default %(default)s)",
    )
    source.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig for running outside a cluster (default: in-cluster service account)",
    )
    listen = parser.add_argument_group("listeners")
    listen.add_argument(
        "--explicit-listen",
        metavar="HOST:PORT",
        action="append",
        help=f"explicit HTTP proxy listener (default 127.0.0.1:{contract.EXPLICIT_PORT})",
    )
    listen.add_argument(
        "--transparent-listen",
        metavar="HOST:PORT",
        action="append",
        help=f"transparent listener (default 127.0.0.1:{contract.TRANSPARENT_PORT})",
    )
    listen.add_argument(
        "--transparent-listen6",
        metavar="HOST:PORT",
        default=None,
        help=f"IPv6 transparent listener (default ::1:{contract.TRANSPARENT_PORT} when the "
        "host has IPv6 loopback; 'off' to disable)",
    )
    listen.add_argument(
        "--no-transparent",
        action="store_true",
        default=os.environ.get(contract.ENV_CAPTURE, "") == "explicit",
        help="explicit capture only: no transparent listener "
        f"(env {contract.ENV_CAPTURE}=explicit)",
    )
    dns = parser.add_argument_group(
        "DNS (the app's port 53 is redirected here in transparent capture)"
    )
    dns.add_argument(
        "--dns-listen",
        metavar="HOST:PORT",
        action="append",
        help=f"DNS listener, UDP and TCP (default 127.0.0.1:{contract.DNS_LISTEN_PORT} in "
        f"transparent capture; 'off' to disable; env {ENV_DNS_LISTEN})",
    )
    dns.add_argument(
        "--dns-listen6",
        metavar="HOST:PORT",
        default=None,
        help=f"IPv6 DNS listener (default ::1:{contract.DNS_LISTEN_PORT} with the DNS listener "
        "when the host has IPv6 loopback; 'off' to disable)",
    )
    dns.add_argument(
        "--dns-resolv-conf",
        metavar="PATH",
        type=Path,
        default=Path("/etc/resolv.conf"),
        help="read at start: its name servers are where allowed queries go, its search domains "
        "are internal names (default %(default)s)",
    )
    dns.add_argument(
        "--dns-internal-domain",
        metavar="DOMAIN",
        action="append",
        default=[],
        help="names equal to or under DOMAIN are forwarded whatever the policy, like the "
        "search domains and svc.cluster.local (repeatable; env "
        f"{ENV_DNS_INTERNAL_DOMAINS}, comma-separated)",
    )
    dns.add_argument(
        "--dns-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="per name server; when none answers the client gets SERVFAIL (default %(default)s)",
    )
    dns.add_argument(
        "--dns-max-inflight",
        type=int,
        default=256,
        metavar="N",
        help="queries forwarded at once; more are answered SERVFAIL (default %(default)s)",
    )
    dns.add_argument(
        "--dns-min-ttl",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a learned address (raw TCP to a host rule's ports) is kept at least this long, "
        "whatever the answer's TTL (default %(default)s)",
    )
    dns.add_argument(
        "--dns-learned-max",
        type=int,
        default=10_000,
        metavar="N",
        help="most (name, address) pairs kept; the least recently learned go (default %(default)s)",
    )
    listen.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        default=f"0.0.0.0:{contract.HEALTH_PORT}",
        help="health and metrics: /healthz/live, /healthz/ready, /metrics (default %(default)s)",
    )
    out = parser.add_argument_group("telemetry and logging")
    out.add_argument("--trace-console", action="store_true", help="also print spans on stderr")
    out.add_argument(
        "--trace-file",
        metavar="PATH",
        type=Path,
        help="also append spans to PATH as OTLP JSON lines (Jaeger's UI can load the file)",
    )
    out.add_argument(
        "--destinations-max-entries",
        type=int,
        default=1024,
        metavar="N",
        help="keep a summary of up to N destinations decided since start (host or address, port, "
        "decision, reason, rule, count, first and last seen; least recently seen evicted "
        f"first), served read-only at {contract.DEBUG_DESTINATIONS_PATH} on the health port "
        "for `kubectl egress suggest|diff`; 0 turns it off (default %(default)s)",
    )
    out.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        default=os.environ.get("EGRESS_CONFDIR", "~/.mitmproxy"),
        help="a writable directory for mitmproxy's state (an emptyDir in a pod)",
    )
    inspect = parser.add_argument_group(
        "HTTPS inspection (hosts whose allow rule says inspect: true; see docs/inspection.md)"
    )
    inspect.add_argument(
        "--inspect-ca-dir",
        metavar="DIR",
        default=os.environ.get(contract.ENV_INSPECT_CA_DIR, DEFAULT_INSPECT_CA_DIR),
        help="the CA that issues leaf certificates for inspected hosts: tls.crt and tls.key "
        "(PEM; the Secret egress-ca mounted read-only). Missing or unreadable: inspected hosts "
        "are denied (inspection CA not available), others unaffected "
        f"(env {contract.ENV_INSPECT_CA_DIR}; default %(default)s)",
    )
    inspect.add_argument(
        "--inspect-upstream-ca-file",
        metavar="PATH",
        default=os.environ.get(ENV_INSPECT_UPSTREAM_CA_FILE) or None,
        help="a PEM bundle of private CAs trusted for inspected upstreams besides the system trust "
        f"store (env {ENV_INSPECT_UPSTREAM_CA_FILE})",
    )
    parser.add_argument(
        "--engine",
        choices=["fast", "mitmproxy"],
        default=os.environ.get("EGRESS_ENGINE", "fast"),
        help="fast: ordinary calls (CONNECT, transparent TLS/TCP, plain HTTP/1) on our own fast "
        "path, the rest (Upgrade, h2c, Expect: 100-continue) handed to mitmproxy, loaded on first "
        "need; mitmproxy: every connection through mitmproxy, the reference the fast path is "
        "tested against (env EGRESS_ENGINE; default %(default)s)",
    )
    parser.add_argument(
        "--event-loop",
        choices=["uvloop", "asyncio"],
        default=os.environ.get(ENV_EVENT_LOOP, "uvloop"),
        help="uvloop: libuv's event loop, about 30 %% less CPU per new tunnel than asyncio's "
        "(docs/benchmark.md); asyncio: Python's own selector loop, the fallback (env "
        "EGRESS_EVENT_LOOP; default %(default)s)",
    )
    parser.add_argument(
        "--resolve-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="DNS timeout (default %(default)s)",
    )
    parser.add_argument(
        "--dns-cache-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="keep resolved addresses this long (failures 1 s); 0 resolves for every call "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--first-byte-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="transparent capture: the client's first flight (a whole TLS ClientHello, an HTTP "
        "method) must arrive within this long; a client that sends nothing (a server-speaks-"
        "first protocol to an address no cidr rule allows) is then decided as raw TCP on its "
        "original address, one that stopped part-way is refused (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="an upstream connection not established within this long fails; a CONNECT is "
        "then answered 504 (default %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_non_negative,
        default=os.environ.get(ENV_DRAIN_TIMEOUT, str(DEFAULT_DRAIN_TIMEOUT)),  # type applies
        metavar="SECONDS",
        help="on SIGTERM: stop accepting connections (readiness turns 503, liveness stays 200), "
        "let in-flight requests and tunnels finish for up to this long, then cut the rest, "
        "flush the spans and exit 0; a second SIGTERM or SIGINT cuts at once. Keep it below "
        "the pod's terminationGracePeriodSeconds (30 s by default) "
        f"(env {ENV_DRAIN_TIMEOUT}; default %(default)s)",
    )
    parser.add_argument(
        "--flush-timeout",
        type=_non_negative,
        default=os.environ.get(ENV_FLUSH_TIMEOUT, str(DEFAULT_FLUSH_TIMEOUT)),  # type applies
        metavar="SECONDS",
        help="on exit: wait at most this long for the spans still queued to be exported; what "
        "an absent or hung collector has not taken by then is dropped (logged) "
        f"(env {ENV_FLUSH_TIMEOUT}; default %(default)s)",
    )
    heads = parser.add_argument_group(
        "plain-HTTP request heads (refused with 414, 431 or 408 and closed; never passed on)"
    )
    heads.add_argument(
        "--max-request-line",
        type=int,
        default=HEAD_DEFAULTS.request_line,
        metavar="BYTES",
        help="longest request line; longer: 414 (default %(default)s)",
    )
    heads.add_argument(
        "--max-header-line",
        type=int,
        default=HEAD_DEFAULTS.field_line,
        metavar="BYTES",
        help="longest header field line; longer: 431 (default %(default)s)",
    )
    heads.add_argument(
        "--max-request-head",
        type=int,
        default=HEAD_DEFAULTS.head,
        metavar="BYTES",
        help="largest request head, all lines; larger: 431 (default %(default)s)",
    )
    heads.add_argument(
        "--max-header-fields",
        type=int,
        default=HEAD_DEFAULTS.fields,
        metavar="N",
        help="most header fields in one request; more: 431 (default %(default)s)",
    )
    heads.add_argument(
        "--request-head-timeout",
        type=float,
        default=HEAD_DEFAULTS.timeout,
        metavar="SECONDS",
        help="time from a request head's first byte to its end; longer: 408 (default %(default)s)",
    )
    parser.set_defaults(func=run)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _pod_namespace() -> str | None:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return os.environ.get(contract.ENV_POD_NAMESPACE) or None


def run(args: argparse.Namespace) -> int:
    from sidecar.decision_log import configure_logging

    configure_logging(args.log_level)
    from sidecar.fastpath.config import ListenSpec, check_distinct

    if args.allowlist_file and args.configmap:
        print("egress-sidecar run: give --allowlist-file or --configmap, not both", file=sys.stderr)
        return 2
    if not args.allowlist_file and not args.configmap:
        if _pod_namespace() is None:
            print(
                "egress-sidecar run: no policy source: give --allowlist-file PATH or "
                "--configmap [NS/]NAME (in a pod the default is the ConfigMap "
                f"{contract.DEFAULT_ALLOWLIST_CONFIGMAP})",
                file=sys.stderr,
            )
            return 2
        args.configmap = contract.DEFAULT_ALLOWLIST_CONFIGMAP
    try:
        explicit = tuple(
            ListenSpec.parse(s)
            for s in (args.explicit_listen or [f"127.0.0.1:{contract.EXPLICIT_PORT}"])
        )
        transparent: tuple[ListenSpec, ...] = ()
        if not args.no_transparent:
            transparent = tuple(
                ListenSpec.parse(s)
                for s in (args.transparent_listen or [f"127.0.0.1:{contract.TRANSPARENT_PORT}"])
            )
            v6 = args.transparent_listen6
            if v6 is None and _ipv6_loopback():
                v6 = f"::1:{contract.TRANSPARENT_PORT}"
            if v6 and v6 != "off":
                transparent += (ListenSpec.parse(v6),)
        health = ListenSpec.parse(args.health_listen)
        dns_specs = _dns_specs(args)
        check_distinct(
            [("--explicit-listen", spec) for spec in explicit]
            + [
                ("--transparent-listen6" if ":" in spec.host else "--transparent-listen", spec)
                for spec in transparent
            ]
            + [("--health-listen", health)]
            + [("--dns-listen6" if ":" in s.host else "--dns-listen", s) for s in dns_specs]
        )
    except ValueError as err:
        print(f"egress-sidecar run: {err}", file=sys.stderr)
        return 2
    from sidecar.fastpath.accept import AcceptGate, OpenFiles, connection_limit, open_fds
    from sidecar.fastpath.loops import LoopKind, new_loop

    files = OpenFiles.raise_soft_limit()
    gate = AcceptGate(connection_limit(files.soft, open_fds()))
    kind = LoopKind(args.event_loop)
    with asyncio.Runner(loop_factory=lambda: new_loop(kind, gate)) as runner:
        return runner.run(
            _serve(args, explicit, transparent, health, files=files, gate=gate, dns=dns_specs)
        )


def _dns_specs(args: argparse.Namespace) -> tuple[Any, ...]:
    """The DNS listeners: --dns-listen (or its env), by default 127.0.0.1:15053 in transparent
    capture, plus ::1:15053 when the host has IPv6 loopback and no address was given."""
    from sidecar.fastpath.config import ListenSpec

    given = args.dns_listen or (
        [os.environ[ENV_DNS_LISTEN]] if os.environ.get(ENV_DNS_LISTEN) else None
    )
    if given is None:
        given = [] if args.no_transparent else [f"127.0.0.1:{contract.DNS_LISTEN_PORT}"]
    items = [part.strip() for text in given for part in text.split(",") if part.strip()]
    specs = tuple(ListenSpec.parse(item) for item in items if item != "off")
    if not specs:
        return ()
    v6 = args.dns_listen6
    if v6 is None and args.dns_listen is None and _ipv6_loopback():
        v6 = f"::1:{contract.DNS_LISTEN_PORT}"
    if v6 and v6 != "off":
        specs += (ListenSpec.parse(v6),)
    return specs


async def _serve(
    args: argparse.Namespace,
    explicit: tuple[Any, ...],
    transparent: tuple[Any, ...],
    health_spec: Any,
    *,
    files: OpenFiles,
    gate: AcceptGate,
    dns: tuple[Any, ...] = (),
) -> int:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.decision_log import DecisionLog
    from sidecar.destinations import DestinationSummary
    from sidecar.fastpath.config import ProxyConfig
    from sidecar.fastpath.server import Engine, FrontDoor
    from sidecar.health import HealthServer
    from sidecar.metrics import Metrics
    from sidecar.policy.dns import LearnedAddresses
    from sidecar.policy.model import Mode
    from sidecar.policy.store import PolicyStore
    from sidecar.reporter import Reporter
    from sidecar.sources import SourceConfigError, SourceSpec, open_source
    from sidecar.telemetry.lean import LeanTracerProvider
    from sidecar.telemetry.setup import TelemetryConfigError, build_tracer_provider
    from sidecar.telemetry.spans import DecisionSpans

    try:
        head_limits = HeadLimits(
            request_line=args.max_request_line,
            field_line=args.max_header_line,
            head=args.max_request_head,
            fields=args.max_header_fields,
            timeout=args.request_head_timeout,
        )
    except ValueError as err:
        print(f"egress-sidecar run: {err}", file=sys.stderr)
        return 2
    metrics = Metrics()
    try:
        provider, plan = build_tracer_provider(
            console=args.trace_console, file=args.trace_file, on_drop=metrics.spans_dropped.inc
        )
    except TelemetryConfigError as err:
        print(f"egress-sidecar run: {err}", file=sys.stderr)
        return 2
    trace.set_tracer_provider(provider)
    store = PolicyStore(Mode(args.mode) if args.mode else None)
    decision_log = DecisionLog()
    if args.destinations_max_entries < 0:
        print("egress-sidecar run: --destinations-max-entries must be >= 0", file=sys.stderr)
        return 2
    destinations = (
        DestinationSummary(args.destinations_max_entries) if args.destinations_max_entries else None
    )
    reporter = Reporter(
        DecisionSpans(provider.get_tracer("egress-sidecar")), decision_log, metrics, destinations
    )
    configmaps = tuple(p.strip() for p in (args.configmap or "").split(",") if p.strip())
    spec = SourceSpec(
        allowlist_file=args.allowlist_file,
        configmaps=configmaps,
        kubeconfig=args.kubeconfig,
        extra_private_ranges=tuple(args.allow_private_range) + tuple(env_ranges()),
        not_ready_when_api_unreachable=args.not_ready_when_api_unreachable,
        unreachable_after=args.api_unreachable_after,
    )
    try:
        source = open_source(spec, store, metrics)
    except SourceConfigError as err:
        print(f"egress-sidecar run: {err}", file=sys.stderr)
        return 2
    learned = LearnedAddresses(max(1, args.dns_learned_max), min_ttl=max(0.0, args.dns_min_ttl))
    dns_server = None
    if dns:
        try:
            dns_server = _dns_server(
                args, dns, store=store, reporter=reporter, metrics=metrics, learned=learned
            )
        except (OSError, ValueError) as err:
            print(f"egress-sidecar run: DNS: {err}", file=sys.stderr)
            return 2
    inspection = InspectionCA.load(args.inspect_ca_dir, args.inspect_upstream_ca_file)
    config = ProxyConfig(
        explicit=explicit,
        transparent=transparent,
        confdir=args.confdir,
        resolve_timeout=args.resolve_timeout,
        dns_cache_ttl=args.dns_cache_ttl,
        first_byte_timeout=args.first_byte_timeout,
        connect_timeout=args.connect_timeout,
        head_limits=head_limits,
        learned=learned if dns_server is not None else None,
        inspection=inspection,
    )
    front = FrontDoor(config, store, reporter, engine=Engine(args.engine))
    # Read when scraped: the proxy's hot path updates nothing for these.
    metrics.open_connections.set_function(lambda: front.open_connections)
    metrics.open_tunnels.set_function(lambda: reporter.open_tunnels)

    def dns_running() -> bool:
        return dns_server is None or dns_server.running

    def readiness() -> tuple[bool, dict[str, Any]]:
        # Ready = every source had a good version (a deleted ConfigMap is a policy being
        # enforced, not an outage) and every listener accepts connections.
        # The source's status names the policy in force and each source's state.
        body: dict[str, Any] = {
            **source.status(),
            "mode": store.get().mode.value,
            "listeners": front.addresses + (dns_server.addresses if dns_server else []),
            "listening": front.all_running and dns_running() and not front.draining,
            # --allow-private-range / EGRESS_ALLOW_PRIVATE_RANGES: where the guard steps aside
            # beyond the documents' privateRanges (`kubectl egress` re-decides with them).
            "extra_private_ranges": [str(n) for n in spec.extra_private_ranges],
            "draining": front.draining,
        }
        ready = source.ready() and front.all_running and dns_running() and not front.draining
        body["ready"] = ready
        return ready, body

    try:
        health = HealthServer(
            (health_spec.host, health_spec.port), readiness, metrics, destinations
        )
    except OSError as err:
        print(f"egress-sidecar run: health listener {health_spec}: {err}", file=sys.stderr)
        return 1
    health.start()
    log.info(
        "starting",
        extra={
            "explicit": ",".join(f"{s.host}:{s.port}" for s in explicit),
            "transparent": ",".join(f"{s.host}:{s.port}" for s in transparent),
            "health": f"{health_spec.host}:{health_spec.port}",
            "trace_export": f"{plan.protocol} {plan.endpoint}" if plan.protocol else "none",
            "open_files_limit": files.soft,
            **({"open_files_raised_from": files.raised_from} if files.raised_from else {}),
            "connection_limit": gate.limit,
            "event_loop": args.event_loop,
        },
    )
    # Whether inspect: true rules can be honoured; when not, their hosts are denied. A warning
    # only for a CA directory that is there but unusable (most pods inspect nothing).
    broken = not inspection.available and inspection.directory.is_dir()
    (log.warning if broken else log.info)(
        "HTTPS inspection available"
        if inspection.available
        else "HTTPS inspection not available: hosts whose rule says inspect: true are denied "
        "(inspection CA not available)",
        extra=inspection.describe(),
    )
    source.start()
    loop = asyncio.get_running_loop()
    cut_short = asyncio.Event()
    stopping: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        try:
            if front.all_running:
                await front.drain(args.drain_timeout, cut_short)
        finally:
            front.stop()

    def on_signal(signum: signal.Signals) -> None:
        if stopping:
            log.info("second signal: cutting what is in flight", extra={"signal": signum.name})
            cut_short.set()
            return
        log.info("stopping", extra={"signal": signum.name, "drain_timeout_s": args.drain_timeout})
        stopping.append(loop.create_task(drain_then_stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if (dns_server is None or await dns_server.start()) and await front.start():
            await front.wait_stopped()
    finally:
        if dns_server is not None:
            dns_server.close()
        await front.shutdown()
        source.stop()
        health.shutdown()
        health.server_close()
        decision_log.flush()  # the lines of the last ~20 ms, before anything that can hang
        if isinstance(provider, TracerProvider | LeanTracerProvider):
            _flush_spans(provider, args.flush_timeout)
        log.info("stopped")
    return 0 if not front.failed and not (dns_server and dns_server.failed) else 1


def _dns_server(
    args: argparse.Namespace,
    specs: tuple[Any, ...],
    *,
    store: Any,
    reporter: Any,
    metrics: Any,
    learned: Any,
) -> Any:
    """The DNS listener, configured from the pod's resolv.conf (read now, once)."""
    from sidecar.dns.listener import DnsConfig, DnsServer
    from sidecar.dns.resolvconf import ResolvConf
    from sidecar.policy.dns import InternalNames

    try:
        resolv = ResolvConf.read(args.dns_resolv_conf)
    except FileNotFoundError:
        # As the C library without one: nothing to forward to (allowed queries get SERVFAIL),
        # and the sidecar still serves everything else.
        log.warning(
            "no resolv.conf: DNS queries cannot be forwarded",
            extra={"path": str(args.dns_resolv_conf)},
        )
        resolv = ResolvConf((), ())
    extra = list(args.dns_internal_domain) + [
        part.strip()
        for part in os.environ.get(ENV_DNS_INTERNAL_DOMAINS, "").split(",")
        if part.strip()
    ]
    if args.dns_max_inflight < 1 or not args.dns_timeout > 0:
        raise ValueError("--dns-max-inflight must be >= 1 and --dns-timeout > 0")
    config = DnsConfig(
        listen=specs,
        upstreams=resolv.nameservers,
        internal=InternalNames.build(resolv.search, extra),
        timeout=args.dns_timeout,
        max_inflight=args.dns_max_inflight,
    )
    return DnsServer(config, store, reporter, metrics, learned)


def _flush_spans(provider: TracerProvider | LeanTracerProvider, timeout: float) -> None:
    """Shut the tracer provider down (flushing the batch processors), bounded by ``timeout``.

    The SDK's own shutdown waits up to 30 s for the batch processor, then the exporter's timeout:
    a hung collector would hold the pod past its grace period and lose everything else. Its
    export thread is a daemon, so whatever is still pending goes with the process.
    """
    flushing = threading.Thread(target=provider.shutdown, name="span-flush", daemon=True)
    flushing.start()
    flushing.join(timeout)
    if flushing.is_alive():
        log.warning(
            "span export did not finish before --flush-timeout; the spans still queued are dropped",
            extra={"flush_timeout_s": timeout},
        )
