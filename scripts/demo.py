"""`make demo`: from a first look to a tight allowlist, offline, on this machine, in under a minute.

1. inject examples/demo-workload.yaml offline (`egress-injector inject`) and show the diff;
2. start local stand-ins for the demo's upstreams (HTTPS and HTTP on 127.0.77.1, certificates
   from a throw-away CA) and `egress-sidecar run` in audit mode on examples/allowlist.yaml;
3. run the demo app's calls through the sidecar (explicit proxy, as HTTPS_PROXY does);
4. `kubectl egress suggest --from-url` proposes an allowlist from what the sidecar saw
   (its /debug/destinations), and `kubectl egress diff` says what it would change;
5. apply it (the sidecar reloads the file) in enforce mode, run the calls again, plus one the
   app never made in audit, and print the decisions (decision, reason, rule);
6. write the spans as one OTLP/JSON ExportTraceServiceRequest that Jaeger's UI opens
   (Search, "Upload JSON file").

Demo host names resolve to the stand-ins only inside the sidecar's own mount namespace: a
hosts file bind-mounted over /etc/hosts there (`unshare --mount`, as the test harness and the
bench start their sidecars), so nothing in the product needs a switch that could be left on in
a pod, and no query leaves the machine. Needs root (unshare, ports 80 and 443 on 127.0.77.1).
Everything it writes goes to $DEMO_DIR (default demo-out/).
"""

from __future__ import annotations

import datetime
import difflib
import gc
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hosts import hosts_file, with_hosts  # noqa: E402 (the repository's own helper)

BIN = Path(sys.executable).parent
OUT = Path(os.environ.get("DEMO_DIR") or ROOT / "demo-out").resolve()
STAND_IN = "127.0.77.1"  # every demo host name resolves here, in the sidecar's namespace only
STAND_IN_RANGE = "127.0.77.0/24"  # the sidecar's --allow-private-range: host rules decide
NAMESPACE = "shop"

# The demo app's calls (as the demo workload would make them).
AUDIT_CALLS = (
    "https://api.github.com/zen",
    "https://api.stripe.com/v1/charges",
    "https://storage.googleapis.com/bucket/object",
    "https://upload.googleapis.com/upload",
    "http://httpbin.org/get",
    "https://hooks.slack.com/services/T000/B000",
    "https://api.openai.com/v1/models",
)
# Enforce: the same, and one destination the app never called while the sidecar learned.
NEW_CALL = "https://exfil.example/collect"
ENFORCE_CALLS = (*AUDIT_CALLS, NEW_CALL)
HOSTS = sorted({u.split("/")[2] for u in ENFORCE_CALLS})

STEPS = 6
_started = time.monotonic()


def step(n: int, text: str) -> None:
    print(f"\n==> [{n}/{STEPS}] {text}  (t+{time.monotonic() - _started:.1f}s)", flush=True)


def say(text: str = "") -> None:
    for line in text.splitlines() or [""]:
        print(f"    {line}", flush=True)


def run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=False, text=True, capture_output=True, timeout=60, **kw)


# -- 1. offline injection ----------------------------------------------------------------------


def inject() -> None:
    step(1, "inject examples/demo-workload.yaml offline (egress-injector inject)")
    source = ROOT / "examples" / "demo-workload.yaml"
    done = run([str(BIN / "egress-injector"), "inject", "-f", str(source), "-q"])
    if done.returncode != 0:
        raise SystemExit(f"egress-injector inject failed: {done.stderr}")
    (OUT / "injected.yaml").write_text(done.stdout)
    before = yaml.safe_dump(yaml.safe_load(source.read_text()), sort_keys=False).splitlines()
    after = yaml.safe_dump(yaml.safe_load(done.stdout), sort_keys=False).splitlines()
    diff = list(difflib.unified_diff(before, after, "demo-workload.yaml", "injected", lineterm=""))
    (OUT / "injected.diff").write_text("\n".join(diff) + "\n")
    spec = yaml.safe_load(done.stdout)["spec"]["template"]["spec"]
    added = [c["name"] for c in spec.get("initContainers", [])]
    say(
        f"added to the pod template: init containers {', '.join(added)}; volumes "
        + ", ".join(v["name"] for v in spec.get("volumes", []))
    )
    shown = 40
    say("\n".join(diff[:shown]))
    if len(diff) > shown:
        say(f"... {len(diff) - shown} more lines in {OUT / 'injected.diff'}")


# -- 2. stand-ins and the sidecar ---------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs() -> tuple[Path, Path, Path]:
    """A throw-away CA and one certificate for every demo host name: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("egress-sidecar demo CA"))
        .issuer_name(_name("egress-sidecar demo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("demo stand-in"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = OUT / "ca.pem", OUT / "stand-in.pem", OUT / "stand-in.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"stand_in_for": self.headers.get("host"), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StandIn(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        super().__init__((STAND_IN, port), _Answer)
        self.tls = tls
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sidecar:
    """`egress-sidecar run` with the demo's hosts file, its decision lines kept."""

    def __init__(self, allowlist: Path) -> None:
        self.proxy_port, self.health_port = free_port(), free_port()
        argv = [
            str(BIN / "egress-sidecar"),
            "run",
            "--allowlist-file",
            str(allowlist),
            "--explicit-listen",
            f"127.0.0.1:{self.proxy_port}",
            "--transparent-listen",
            f"127.0.0.1:{free_port()}",
            "--transparent-listen6",
            "off",
            "--dns-listen",
            "off",
            "--health-listen",
            f"127.0.0.1:{self.health_port}",
            "--confdir",
            str(OUT / "confdir"),
            "--allow-private-range",
            STAND_IN_RANGE,
            "--drain-timeout",
            "5",
            "--trace-file",
            str(OUT / "spans.jsonl"),
        ]
        (OUT / "hosts").mkdir(exist_ok=True)
        hosts = hosts_file(OUT / "hosts" / "hosts", dict.fromkeys(HOSTS, STAND_IN))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HTTP"))}
        env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy")}
        env.update(OTEL_SERVICE_NAME="web", OTEL_RESOURCE_ATTRIBUTES="k8s.namespace.name=shop")
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._err = open(OUT / "sidecar.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            with_hosts(hosts, argv),
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=env,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(OUT / "decisions.jsonl", "w") as sink:
            for line in self.proc.stdout:
                sink.write(line)
                if line.startswith("{"):
                    with self._cond:
                        self.lines.append(json.loads(line))
                        self._cond.notify_all()

    def ready_body(self) -> dict[str, Any]:
        try:
            with requests.get(self.url + "/healthz/ready", timeout=2) as resp:
                body: dict[str, Any] = resp.json()
                return body
        except (requests.RequestException, ValueError):
            return {}

    def wait_ready(self, version: str | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """The ready body once ready (and, given ``version``, in force with another one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            body = self.ready_body()
            policy = body.get("policy") or {}
            if body.get("ready") and (version is None or policy.get("version") != version):
                return body
            time.sleep(0.1)
        raise SystemExit(f"the sidecar did not get ready; see {OUT / 'sidecar.log'}")

    def wait_decisions(self, version: str, count: int, timeout: float = 10.0) -> list[Any]:
        """The decision lines under policy ``version`` once there are ``count`` (the sidecar
        writes them in batches)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [d for d in self.lines if d.get("policy_version") == version]
                if len(found) >= count or time.monotonic() > deadline:
                    return found
                self._cond.wait(0.2)

    def metric(self, name: str) -> float:
        with requests.get(self.url + "/metrics", timeout=5) as resp:
            for line in resp.text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise SystemExit(f"the sidecar exports no {name}")

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Until the app's last connections are closed (the gauges say so): SIGTERM then finds
        nothing in flight to drain."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            self.metric("egress_open_connections") or self.metric("egress_open_tunnels")
        ):
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()


# -- 3. the demo app ----------------------------------------------------------------------------


def app_calls(sidecar: Sidecar, urls: Sequence[str], ca: Path) -> None:
    proxies = {"http": f"http://127.0.0.1:{sidecar.proxy_port}"}
    proxies["https"] = proxies["http"]
    for url in urls:
        try:
            resp = requests.get(url, proxies=proxies, verify=str(ca), timeout=10)
            outcome = f"{resp.status_code}"
            reason = resp.headers.get("x-egress-reason")
            if reason:
                outcome += f" ({reason})"
        except requests.exceptions.ProxyError as err:
            # A denied CONNECT: the 403 is the proxy's answer; requests reports it as an error.
            outcome = "403 from the proxy" if "403" in str(err) else f"failed: {err}"
        say(f"GET {url:<48} -> {outcome}")
    # requests leaves the socket of a refused CONNECT to the garbage collector: closed now, so
    # that the sidecar is not left waiting for that client to hang up.
    gc.collect()


def decisions_table(lines: Sequence[dict[str, Any]]) -> str:
    rows = [("DECISION", "REASON", "RULE", "DESTINATION")]
    for d in lines:
        dest = f"{d.get('method') or d.get('protocol')} {d.get('host')}:{d.get('port')}"
        rule = str(d.get("rule") or "-")
        rule = rule if len(rule) <= 40 else rule[:37] + "..."
        rows.append((d["decision"], d["reason"], rule, dest))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row))
        for row in rows
    )


# -- 6. spans as one OTLP/JSON file -------------------------------------------------------------


def otlp_file(lines_path: Path, out: Path) -> int:
    """--trace-file writes one ExportTraceServiceRequest per line; Jaeger's upload takes one
    document: their resourceSpans together. Returns the number of spans."""
    resource_spans: list[Any] = []
    for line in lines_path.read_text().splitlines():
        if line.strip():
            resource_spans += json.loads(line).get("resourceSpans", [])
    out.write_text(json.dumps({"resourceSpans": resource_spans}, indent=1) + "\n")
    return sum(len(s.get("spans", [])) for rs in resource_spans for s in rs.get("scopeSpans", []))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ("spans.jsonl", "decisions.jsonl"):
        (OUT / stale).unlink(missing_ok=True)
    print(f"egress-sidecar demo: offline, no cluster; files in {OUT}")
    inject()

    step(2, f"stand-ins for {len(HOSTS)} upstreams on {STAND_IN}, the sidecar in audit mode")
    ca, cert, key = make_certs()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert), str(key))
    servers = [StandIn(443, tls), StandIn(80)]
    example = (ROOT / "examples" / "allowlist.yaml").read_text()
    allowlist = OUT / "allowlist.yaml"
    allowlist.write_text(example.replace("mode: enforce", "mode: audit", 1))
    say(f"allowlist: examples/allowlist.yaml with mode: audit -> {allowlist}")
    sidecar = Sidecar(allowlist)
    try:
        body = sidecar.wait_ready()
        audit_version = str(body["policy"]["version"])
        say(f"sidecar ready: proxy 127.0.0.1:{sidecar.proxy_port}, health {sidecar.url}")
        say(f"policy {body['policy']['source']} version {audit_version}, mode {body['mode']}")

        step(3, "the demo app's calls (audit: everything goes through, and is recorded)")
        app_calls(sidecar, AUDIT_CALLS, ca)
        audit_lines = sidecar.wait_decisions(audit_version, len(AUDIT_CALLS))
        say()
        say(decisions_table(audit_lines))
        with requests.get(sidecar.url + "/debug/destinations", timeout=5) as resp:
            (OUT / "seen.json").write_text(json.dumps(resp.json(), indent=1) + "\n")

        step(4, "kubectl egress suggest --from-url (what the sidecar saw -> an allowlist)")
        plugin = [str(BIN / "kubectl-egress")]
        common = ["deploy/web", "-n", NAMESPACE, "--from-url", sidecar.url]
        suggested = run([*plugin, "suggest", *common, "--allowlist-file", str(allowlist)])
        if suggested.returncode != 0:
            raise SystemExit(f"kubectl egress suggest failed: {suggested.stderr}")
        (OUT / "suggested-allowlist.yaml").write_text(suggested.stdout)
        say(suggested.stdout.rstrip())
        say(suggested.stderr.rstrip())
        as_json = run(
            [*plugin, "suggest", *common, "--allowlist-file", str(allowlist), "-o", "json"]
        )
        (OUT / "suggest.json").write_text(as_json.stdout)
        enforce = OUT / "enforce-allowlist.yaml"
        # The proposal keeps the current mode (audit); the step after learning is enforce.
        # Edited as text: the rules' comments (count, last seen) stay.
        text, switched = re.subn(
            r"^(\s+)mode: audit$", r"\1mode: enforce", suggested.stdout, count=1, flags=re.M
        )
        if not switched:
            raise SystemExit("the proposal has no 'mode: audit' line to switch")
        enforce.write_text(text)
        say()
        say("kubectl egress diff: what the proposal, in enforce mode, changes for what was seen")
        changed = run([*plugin, "diff", *common, "-f", str(enforce), "--color=never"])
        say(changed.stdout.rstrip())
        say(changed.stderr.rstrip())

        step(5, "apply it in enforce mode (the sidecar reloads its file), the calls again")
        tmp = allowlist.with_suffix(".tmp")
        tmp.write_text(enforce.read_text())
        os.replace(tmp, allowlist)  # atomic, as the kubelet swaps a mounted ConfigMap
        body = sidecar.wait_ready(version=audit_version)
        enforce_version = str(body["policy"]["version"])
        say(f"policy version {enforce_version} in force, mode {body['mode']}")
        say(f"the app's calls, and one it never made while the sidecar learned: {NEW_CALL}")
        app_calls(sidecar, ENFORCE_CALLS, ca)
        enforce_lines = sidecar.wait_decisions(enforce_version, len(ENFORCE_CALLS))
        (OUT / "enforce-decisions.json").write_text(json.dumps(enforce_lines, indent=1) + "\n")
        say()
        say(decisions_table(enforce_lines))
        sidecar.wait_idle()
    finally:
        sidecar.stop()
        for server in servers:
            server.shutdown()
            server.server_close()

    step(6, "the spans as an OTLP/JSON file")
    count = otlp_file(OUT / "spans.jsonl", OUT / "traces.otlp.json")
    say(f"{count} spans -> {OUT / 'traces.otlp.json'}")
    say("Jaeger UI: Search -> Upload JSON file -> that file; Service web,")
    say("Tags egress.decision=deny for the blocked calls.")
    print(f"\ndone in {time.monotonic() - _started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
