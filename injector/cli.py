"""`egress-injector`: the admission webhook server, offline injection, webhook certificates."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from injector import __version__
from injector.config import ConfigError, InjectorConfig, config_from_dict
from sidecar import contract as c

CONFIG_KEY = "config.yaml"

EPILOG_CONFIG = """\
configuration (--config PATH, YAML; every key optional; shipped as the ConfigMap
egress-injector-config in config/injector/config.yaml):
  image: ghcr.io/egress-sidecar/egress-sidecar:0.1.0   sidecar and egress-init image
  imagePullPolicy: IfNotPresent
  sidecarStyle: native        native = init container with restartPolicy Always (k8s >= 1.29);
                              container = first regular container + postStart wait (older k8s)
  defaultCapture: transparent transparent (iptables init container) or explicit (proxy env vars)
  sidecarResources: {requests: {cpu: 50m, memory: 96Mi}, limits: {memory: 256Mi}}
  initResources: {requests: {cpu: 10m, memory: 32Mi}, limits: {cpu: 500m, memory: 128Mi}}
  clusterCIDRs: [10.0.0.0/8, ...]   never sent through the proxy (iptables exclusion, NO_PROXY)
  noProxy: [localhost, 127.0.0.1, ::1, .svc, .cluster.local]   NO_PROXY names (explicit capture)
  otelEnv: {OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger-collector.observability:4317,
            OTEL_EXPORTER_OTLP_PROTOCOL: grpc}   OTEL_* variables given to every sidecar
  injectorNamespace: egress-system   never injected (nor kube-system, kube-public, kube-node-lease)
  readyTimeoutSeconds: 120    how long a pod waits for its sidecar to become ready
The file may also be a ConfigMap manifest; its data key config.yaml is read.
"""


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages that already are JSON objects are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        try:
            parsed = json.loads(message)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            entry.update(parsed)
        else:
            entry["msg"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def load_config(path: str | None, args: argparse.Namespace) -> InjectorConfig:
    """The configuration file (bare document or ConfigMap), then command-line overrides."""
    doc: Any = None
    if path:
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not YAML: {exc}") from exc
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            data = doc.get("data") or {}
            if CONFIG_KEY not in data:
                raise ConfigError(f"{path}: ConfigMap has no data key {CONFIG_KEY}")
            doc = yaml.safe_load(data[CONFIG_KEY])
    try:
        cfg = config_from_dict(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    overrides: dict[str, Any] = {}
    if getattr(args, "image", None):
        overrides["image"] = args.image
    if getattr(args, "sidecar_style", None):
        overrides["sidecar_style"] = args.sidecar_style
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="injector configuration file (see below)")
    p.add_argument("--image", help="override the configuration's sidecar image")
    p.add_argument(
        "--sidecar-style",
        choices=("native", "container"),
        help="override the configuration: native (Kubernetes >= 1.29) or container",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-injector",
        description=(
            "Inject the egress-sidecar into the pods of workloads that opt in: as a Kubernetes "
            "mutating admission webhook (serve), into manifest files (inject); the webhook's "
            "certificates or a namespace's HTTPS inspection CA (certs); the trust bundle of "
            "inspecting pods (ca-bundle, their init step)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"egress-injector {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    serve = sub.add_parser(
        "serve",
        help="run the mutating admission webhook (HTTPS)",
        description=(
            "Serve AdmissionReview v1 over HTTPS: /mutate/pods (pods that opt in by annotation), "
            "/mutate/pods/namespace-enabled (pods of namespaces labelled "
            "egress-sidecar.io/injection=enabled), /mutate/workloads (copies a workload's "
            "egress-sidecar.io/* annotations into its pod template). Also /healthz, /readyz, "
            "/metrics. One JSON log line per review on stderr."
        ),
        epilog=EPILOG_CONFIG,
        formatter_class=formatter,
    )
    _add_config_options(serve)
    serve.add_argument("--listen", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8443, help="port (default 8443; 0 = any)")
    serve.add_argument("--tls-cert", required=True, metavar="PATH", help="serving certificate")
    serve.add_argument("--tls-key", required=True, metavar="PATH", help="its private key")
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=6 * 1024 * 1024,
        help="larger request bodies get 413 (default 6 MiB; the API server caps objects at 3)",
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds a connection may stay silent, TLS handshake included (default 10)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="concurrent connections; more are closed at once (default 64)",
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="after SIGTERM, keep serving this long with /readyz failing (default 5)",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    serve.set_defaults(func=cmd_serve)

    inject = sub.add_parser(
        "inject",
        help="inject the sidecar into manifest files (like istioctl kube-inject)",
        description=(
            "Like istioctl kube-inject: read multi-document YAML, inject every Pod, Deployment, "
            "StatefulSet, DaemonSet, ReplicaSet, Job and CronJob (and the items of a List), "
            "pass other documents through unchanged, write the result. Offline, everything is "
            "injected unless it opts out "
            '(egress-sidecar.io/inject: "false"); --require-opt-in injects only what opts in. '
            "A workload's own egress-sidecar.io/* annotations are copied into its template first. "
            "What was injected or skipped, and why, is reported on stderr."
        ),
        epilog=EPILOG_CONFIG
        + "\nexit status: 0 done; 1 unreadable input or configuration; 3 with --strict when "
        "a document was left unchanged because of an unsupported apiVersion or invalid spec.\n",
        formatter_class=formatter,
    )
    _add_config_options(inject)
    inject.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file, or - for stdin"
    )
    inject.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    inject.add_argument(
        "--require-opt-in",
        action="store_true",
        help='inject only objects annotated egress-sidecar.io/inject: "true"',
    )
    inject.add_argument("--strict", action="store_true", help="exit 3 if a document was not usable")
    inject.add_argument("-q", "--quiet", action="store_true", help="only print problems on stderr")
    inject.set_defaults(func=cmd_inject)

    certs = sub.add_parser(
        "certs",
        help="make the webhook's CA and serving certificate, or an inspection CA",
        description=(
            "Generate a CA and a serving certificate for the webhook Service's DNS names "
            "(<service>, <service>.<ns>, <service>.<ns>.svc, <service>.<ns>.svc.cluster.local). "
            "With --output-dir, write secret.yaml (a kubernetes.io/tls Secret), "
            "webhook-cabundle-patch.yaml (the caBundle for every webhook), a kustomization.yaml "
            "combining them with the install manifests (apply with kubectl apply -k DIR), and "
            "tls.crt, tls.key, ca.crt. Without it, print the Secret and the patch. The CA key is "
            "not kept: run again to renew (or use config/cert-manager).\n\n"
            "With --inspect-ca --namespace NS: instead, the namespace's HTTPS inspection CA, the "
            "kubernetes.io/tls Secret egress-ca (tls.crt, tls.key, ca.crt; P-256, CA:true, "
            "pathlen 0, keyCertSign) that pods annotated egress-sidecar.io/inspect-ca=true mount: "
            "printed, or with --output-dir written as egress-ca.yaml (mode 0600) and ca.crt. Its "
            "key is kept in the Secret (the sidecar signs leaf certificates with it): create it "
            "once (kubectl create, which refuses to replace it), or use "
            "config/inspect-ca-cert-manager."
        ),
        formatter_class=formatter,
    )
    certs.add_argument(
        "--inspect-ca",
        action="store_true",
        help="make the namespace's HTTPS inspection CA (Secret egress-ca) instead",
    )
    certs.add_argument(
        "-n",
        "--namespace",
        help="default egress-system; with --inspect-ca the pods' namespace, required",
    )
    certs.add_argument("--service", help="default egress-injector")
    certs.add_argument("--secret-name", help="default egress-injector-tls")
    certs.add_argument(
        "--dns-name", action="append", default=[], help="extra DNS name (repeatable)"
    )
    certs.add_argument("--ip", action="append", default=[], help="IP address SAN (repeatable)")
    certs.add_argument("--days", type=int, help="validity (default 365; 3650 with --inspect-ca)")
    certs.add_argument("--output-dir", metavar="DIR", help="write the files here")
    certs.add_argument(
        "--kustomize-base",
        metavar="PATH",
        help="the install manifests to build on (default ./config)",
    )
    certs.add_argument(
        "--print-ca-bundle", action="store_true", help="print only the base64 caBundle"
    )
    certs.set_defaults(func=cmd_certs)

    from injector.mutate import BUNDLE_PATH, CA_CERT_PATH

    bundle = sub.add_parser(
        "ca-bundle",
        help="write system roots + the egress CA certificate (the inspecting pods' init step)",
        description=(
            "Write a trust bundle: the system roots (--system; default the first of "
            "/etc/ssl/certs/ca-certificates.crt and the other usual paths, else certifi's "
            "Mozilla roots) followed by the namespace's egress CA certificate (--ca). The "
            "injected init container egress-ca-bundle runs it at pod start into an emptyDir the "
            "app containers mount read-only (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, "
            "CURL_CA_BUNDLE point at it). A --ca holding a private key, several certificates or "
            "a non-CA certificate is refused. The file is replaced at once, mode 0644."
        ),
        epilog="exit status: 0 written; 1 a file is missing or unusable (with --optional only "
        "the system bundle counts).",
        formatter_class=formatter,
    )
    bundle.add_argument(
        "--ca", default=CA_CERT_PATH, metavar="FILE", help=f"default {CA_CERT_PATH}"
    )
    bundle.add_argument("--out", default=BUNDLE_PATH, metavar="FILE", help=f"default {BUNDLE_PATH}")
    bundle.add_argument("--system", metavar="FILE", help="system roots (default: see above)")
    bundle.add_argument(
        "--optional",
        action="store_true",
        help="a missing or unusable --ca writes the system roots alone, with a warning, and "
        "exits 0 (the injected init container: the pod starts, inspected hosts are denied)",
    )
    bundle.set_defaults(func=cmd_ca_bundle)
    return parser


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    from injector.webhook import TLSFiles, serve

    _setup_logging(args.log_level)
    log = logging.getLogger("injector.cli")
    try:
        cfg = load_config(args.config, args)
        tls = TLSFiles(args.tls_cert, args.tls_key)
    except (ConfigError, OSError) as exc:
        print(f"egress-injector serve: {exc}", file=sys.stderr)
        return 1
    server = serve(
        cfg,
        args.listen,
        args.port,
        tls,
        max_body=args.max_request_bytes,
        timeout=args.timeout,
        max_connections=args.max_connections,
    )
    host, port = str(server.server_address[0]), int(server.server_address[1])
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            return
        stop.set()
        server.draining.set()
        log.info(json.dumps({"msg": "draining", "signal": signum, "seconds": args.drain_seconds}))
        timer = threading.Timer(args.drain_seconds, server.shutdown)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        json.dumps(
            {
                "msg": "listening",
                "address": f"https://{host}:{port}",
                "port": port,
                "image": cfg.image,
                "sidecar_style": cfg.sidecar_style,
                "version": __version__,
            }
        )
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info(json.dumps({"msg": "stopped"}))
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from injector.offline import ManifestError, inject_text

    try:
        cfg = load_config(args.config, args)
    except ConfigError as exc:
        print(f"egress-injector inject: {exc}", file=sys.stderr)
        return 1
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.filename).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"egress-injector inject: {args.filename}: cannot read: {exc}", file=sys.stderr)
        return 1
    try:
        output, report = inject_text(
            text, cfg, namespace_injection=None if args.require_opt_in else "enabled"
        )
    except ManifestError as exc:
        print(f"egress-injector inject: {args.filename}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(output, encoding="utf-8")
    else:
        sys.stdout.write(output)
    for line in report.unsupported + report.invalid:
        print(f"error: {line}", file=sys.stderr)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        for line in report.injected:
            print(f"injected: {line}", file=sys.stderr)
        for line in report.skipped:
            print(f"not injected: {line}", file=sys.stderr)
    if args.strict and (report.unsupported or report.invalid):
        return 3
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from injector import certs

    if args.inspect_ca:
        return _inspect_ca(args)
    namespace = args.namespace or "egress-system"
    service = args.service or "egress-injector"
    names = certs.service_dns_names(service, namespace) + list(args.dns_name)
    try:
        bundle = certs.generate(names, args.ip, days=365 if args.days is None else args.days)
    except ValueError as exc:
        print(f"egress-injector certs: {exc}", file=sys.stderr)
        return 1
    if args.print_ca_bundle and not args.output_dir:
        print(bundle.ca_bundle)
        return 0
    secret = certs.secret_manifest(bundle, args.secret_name or "egress-injector-tls", namespace)
    patch = certs.cabundle_patch(bundle)
    if not args.output_dir:
        sys.stdout.write("---\n" + certs.dump(secret) + "---\n" + certs.dump(patch))
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # kustomize only accepts a relative path to a base
    base = os.path.relpath(Path(args.kustomize_base or "config").resolve(), out.resolve())
    # secret.yaml holds the key too: written private from the start, like tls.key
    _write_private(out / "secret.yaml", certs.dump(secret).encode())
    files = {
        "webhook-cabundle-patch.yaml": certs.dump(patch),
        "kustomization.yaml": certs.dump(certs.kustomization(base)),
        "tls.crt": bundle.cert_pem.decode(),
        "ca.crt": bundle.ca_pem.decode(),
    }
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
    _write_private(out / "tls.key", bundle.key_pem)
    if args.print_ca_bundle:
        print(bundle.ca_bundle)
    else:
        print(
            f"wrote {', '.join(sorted([*files, 'secret.yaml', 'tls.key']))} to {out}; "
            f"install with: kubectl apply -k {out}",
            file=sys.stderr,
        )
    return 0


def _write_private(path: Path, content: bytes) -> None:
    """Write a file only its owner can read, even for a moment (it holds a private key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _inspect_ca(args: argparse.Namespace) -> int:
    from injector import certs

    # The webhook's options have no meaning for the inspection CA: refuse rather than ignore.
    webhook_only = {
        "--service": args.service,
        "--secret-name": args.secret_name,
        "--dns-name": args.dns_name,
        "--ip": args.ip,
        "--kustomize-base": args.kustomize_base,
        "--print-ca-bundle": args.print_ca_bundle,
    }
    given = [name for name, value in webhook_only.items() if value]
    if given:
        print(
            f"egress-injector certs: {', '.join(given)} cannot be used with --inspect-ca "
            f"(the Secret is always {c.INSPECT_CA_SECRET})",
            file=sys.stderr,
        )
        return 2
    if not args.namespace:
        print(
            "egress-injector certs: --inspect-ca needs --namespace (the namespace of the pods "
            "that inspect: the CA is per namespace)",
            file=sys.stderr,
        )
        return 2
    try:
        ca = certs.generate_inspection_ca(
            args.namespace, days=3650 if args.days is None else args.days
        )
    except ValueError as exc:
        print(f"egress-injector certs: {exc}", file=sys.stderr)
        return 1
    manifest = certs.dump(certs.inspection_ca_secret(ca, args.namespace))
    if not args.output_dir:
        sys.stdout.write(manifest)
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / "egress-ca.yaml", manifest.encode())
    (out / "ca.crt").write_bytes(ca.cert_pem)
    print(
        f"wrote egress-ca.yaml, ca.crt to {out}; install with: "
        f"kubectl create -f {out / 'egress-ca.yaml'}",
        file=sys.stderr,
    )
    return 0


def cmd_ca_bundle(args: argparse.Namespace) -> int:
    from injector import cabundle

    system = Path(args.system) if args.system else cabundle.default_system_bundle()
    out = Path(args.out)
    try:
        bundle = cabundle.make(system, Path(args.ca), optional=args.optional)
        cabundle.write(out, bundle.pem)
    except cabundle.BundleError as exc:
        print(f"egress-injector ca-bundle: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"egress-injector ca-bundle: {out}: cannot write: {exc.strerror}", file=sys.stderr)
        return 1
    for line in cabundle.describe(bundle, out, system):
        print(f"egress-injector ca-bundle: {line}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
