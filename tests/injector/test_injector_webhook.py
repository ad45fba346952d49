"""AdmissionReview round trips over real HTTPS against `egress-injector serve` (a subprocess on
127.0.0.1 with a certificate from `egress-injector certs`): the returned patch, applied with
jsonpatch, equals the pure function's result. Also: health, metrics, limits, timeouts, logs,
bad input, draining on SIGTERM."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from injector.cli import load_config
from injector.mutate import (
    PodContext,
    Workload,
    inject_pod,
    pod_template,
    sync_workload_annotations,
)
from injector.risks import EXPLICIT_CAPTURE, HOST_NETWORK
from sidecar import contract as c
from tests.injector.strategies import valid_pods, weird_pods
from tests.injector.support import GOLDEN, OTEL_ENV, REAL_WORLD

SERVER_CONFIG = {
    "sidecarStyle": "native",
    "otelEnv": dict(OTEL_ENV),
    "clusterCIDRs": ["10.96.0.0/12", "10.244.0.0/16"],
}


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    ca: Path
    config_path: Path
    logs: list[str] = field(default_factory=list)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def connect(self, timeout: float = 10.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(), timeout=timeout
        )

    def review_logs(self, uid: str, wait: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = [json.loads(line) for line in list(self.logs) if uid in line]
            if found:
                return found
            time.sleep(0.02)
        return []


def _certs(tmp: Path) -> Path:
    out = tmp / "certs"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "injector.cli",
            "certs",
            "--dns-name",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--output-dir",
            str(out),
            "--kustomize-base",
            str(tmp),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def start_server(tmp: Path, *extra: str, config: dict[str, Any] | None = None) -> Server:
    certs = tmp / "certs" if (tmp / "certs" / "tls.crt").exists() else _certs(tmp)
    config_path = tmp / "injector-config.yaml"
    config_path.write_text(yaml.safe_dump(config or SERVER_CONFIG))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "injector.cli",
            "serve",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-cert",
            str(certs / "tls.crt"),
            "--tls-key",
            str(certs / "tls.key"),
            "--config",
            str(config_path),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    logs: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            logs.append(line)
            if '"msg": "listening"' in line:
                port.append(json.loads(line)["port"])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(30) or not port:
        proc.kill()
        raise AssertionError("server did not start: " + "".join(logs))
    return Server(proc, port[0], certs / "ca.crt", config_path, logs)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("webhook"), "--timeout", "2", "--drain-seconds", "0")
    yield srv
    stop_server(srv)


@pytest.fixture
def conn(server: Server) -> Iterator[http.client.HTTPSConnection]:
    # per test: the server closes connections idle for longer than its --timeout (2 s here)
    connection = server.connect()
    yield connection
    connection.close()


def admission_review(
    obj: Any,
    kind: str = "Pod",
    *,
    namespace: str = "shop",
    operation: str = "CREATE",
    group: str = "",
    version: str = "v1",
) -> dict[str, Any]:
    resource = {"Pod": "pods"}.get(kind, kind.lower() + "s")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


def post(
    conn: http.client.HTTPSConnection, path: str, body: bytes | dict[str, Any]
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload


def apply_response(obj: Any, review: dict[str, Any], answer: dict[str, Any]) -> Any:
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(obj), patch)


def _cfg(server: Server) -> Any:
    import argparse

    return load_config(str(server.config_path), argparse.Namespace(image=None, sidecar_style=None))


def _as_pod(doc: dict[str, Any]) -> tuple[dict[str, Any], Workload | None]:
    """A pod the API server would see for this document (as created by its controller)."""
    if doc["kind"] == "Pod":
        return doc, None
    synced, _ = sync_workload_annotations(doc)
    template = copy.deepcopy(dict(pod_template(synced) or {}))
    meta = template.setdefault("metadata", {})
    name = doc["metadata"]["name"]
    owner_kind, owner = doc["kind"], name
    if doc["kind"] == "Deployment":
        owner_kind, owner = "ReplicaSet", f"{name}-7d4b9c8f5"
        meta.setdefault("labels", {})["pod-template-hash"] = "7d4b9c8f5"
    elif doc["kind"] == "CronJob":
        owner_kind, owner = "Job", f"{name}-29400120"
    meta["generateName"] = owner + "-"
    meta["ownerReferences"] = [
        {"apiVersion": "v1", "kind": owner_kind, "name": owner, "uid": "u", "controller": True}
    ]
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    return pod, None


GOLDEN_INPUTS = sorted((GOLDEN / "input").glob("*.yaml"))
REAL_WORLD_INPUTS = sorted(REAL_WORLD.glob("*.yaml"))


@pytest.mark.parametrize("source", GOLDEN_INPUTS, ids=lambda p: p.stem)
def test_pod_round_trip_matches_the_pure_function(
    server: Server, conn: http.client.HTTPSConnection, source: Path
) -> None:
    doc = yaml.safe_load(source.read_text())
    pod, _ = _as_pod(doc)
    review = admission_review(pod)
    status, answer = post(conn, "/mutate/pods?timeout=5s", review)
    assert status == 200
    patched = apply_response(pod, review, answer)
    expected = inject_pod(pod, PodContext(namespace="shop"), _cfg(server))
    assert expected.injected
    assert patched == expected.pod
    (sidecar,) = [x for x in patched["spec"]["initContainers"] if x["name"] == "egress-sidecar"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == dict(OTEL_ENV)["OTEL_EXPORTER_OTLP_ENDPOINT"]
    if doc["kind"] == "Deployment":
        # the ReplicaSet hash is stripped
        assert env["EGRESS_WORKLOAD_NAME"] == doc["metadata"]["name"]
    if doc["kind"] == "CronJob":
        assert (env["EGRESS_WORKLOAD_KIND"], env["EGRESS_WORKLOAD_NAME"]) == ("CronJob", "report")
    (log,) = server.review_logs(review["request"]["uid"])
    assert log["outcome"] == "injected" and log["patch_ops"] >= 1 and log["duration_ms"] >= 0


@pytest.mark.parametrize("source", REAL_WORLD_INPUTS, ids=lambda p: p.stem)
def test_real_world_pods_round_trip_in_an_enabled_namespace(
    server: Server, conn: http.client.HTTPSConnection, source: Path
) -> None:
    cfg = _cfg(server)
    count = 0
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc or pod_template(doc) is None or doc["apiVersion"] == "batch/v1beta1":
            continue
        pod, _ = _as_pod(doc)
        review = admission_review(pod)
        status, answer = post(conn, "/mutate/pods/namespace-enabled", review)
        assert status == 200
        expected = inject_pod(pod, PodContext("shop", "enabled"), cfg)
        assert expected.injected
        assert apply_response(pod, review, answer) == expected.pod
        # the same pod through the annotation path is not opted in
        review = admission_review(pod)
        status, answer = post(conn, "/mutate/pods", review)
        assert status == 200 and "patch" not in answer["response"]
        count += 1
    assert count >= 1 or "legacy" in source.stem


def _deployment(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx"}]},
            },
        },
    }


def test_workload_annotate_and_unannotate_round_trip(conn: http.client.HTTPSConnection) -> None:
    deploy = _deployment({c.ANNOTATION_INJECT: "true", c.ANNOTATION_MODE: "audit"})
    review = admission_review(deploy, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert status == 200
    patched = apply_response(deploy, review, answer)
    assert patched == sync_workload_annotations(deploy)[0]
    annotations = patched["spec"]["template"]["metadata"]["annotations"]
    assert annotations[c.ANNOTATION_INJECT] == "true" and annotations[c.ANNOTATION_MODE] == "audit"
    # kubectl annotate deploy web egress-sidecar.io/inject-
    del patched["metadata"]["annotations"][c.ANNOTATION_INJECT]
    review = admission_review(patched, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    again = apply_response(patched, review, answer)
    annotations = again["spec"]["template"]["metadata"]["annotations"]
    assert c.ANNOTATION_INJECT not in annotations and annotations[c.ANNOTATION_MODE] == "audit"
    # in sync: no patch
    review = admission_review(again, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert status == 200 and "patch" not in answer["response"]
    # a typo reaches the user who annotated the workload
    again["metadata"]["annotations"][c.ANNOTATION_MODE] = "Audit"
    review = admission_review(again, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert "patch" in answer["response"]
    assert any("'Audit' is not enforce or audit" in w for w in answer["response"]["warnings"])


@pytest.mark.parametrize(
    ("path", "obj", "kind", "operation", "warning"),
    [
        ("/mutate/pods", "not a pod", "Pod", "CREATE", "no Pod"),
        ("/mutate/pods", {"spec": {"containers": 7}}, "Pod", "CREATE", "spec.containers"),
        ("/mutate/pods", {"metadata": {}}, "Service", "CREATE", "expected a Pod"),
        ("/mutate/pods", None, "Pod", "DELETE", None),
        ("/mutate/workloads", {"kind": "Deployment", "metadata": {}}, "Deployment", "CREATE", None),
        ("/mutate/workloads", {"metadata": {}}, "ConfigMap", "CREATE", "expected a workload"),
        (
            "/mutate/workloads",
            {
                "kind": "Deployment",
                "metadata": {"annotations": {c.ANNOTATION_INJECT: "true"}},
                "spec": {"template": 3},
            },
            "Deployment",
            "UPDATE",
            "not understood",
        ),
    ],
)
def test_inputs_it_cannot_understand_are_allowed_with_a_warning(
    conn: http.client.HTTPSConnection,
    *,
    path: str,
    obj: Any,
    kind: str,
    operation: str,
    warning: str | None,
) -> None:
    review = admission_review(obj, kind, operation=operation)
    status, answer = post(conn, path, review)
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is True and "patch" not in response
    if warning:
        assert any(warning in w for w in response["warnings"]), response
    else:
        assert "warnings" not in response


HARDENED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
PRIVILEGED = (
    "container web: privileged: it can remove the egress capture rules; run it unprivileged"
)
SETUID_1337 = (
    "container web: runs as root with CAP_SETUID: it can switch to UID 1337, whose traffic is "
    "not captured; set runAsNonRoot: true, or drop SETUID (or ALL)"
)


def _web_pod(
    sc: dict[str, Any], annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "annotations": annotations or {c.ANNOTATION_INJECT: "true"}},
        "spec": {"containers": [{"name": "web", "image": "x", "securityContext": sc}], **spec},
    }


BYPASS_CASES = [
    # (path, pod, patched, the warnings kubectl shows)
    ("/mutate/pods", _web_pod(HARDENED), True, []),
    ("/mutate/pods", _web_pod({**HARDENED, "privileged": True}), True, [PRIVILEGED]),
    (
        "/mutate/pods",
        _web_pod({"runAsUser": 0, "capabilities": {"drop": ["NET_RAW"]}}),
        True,
        [SETUID_1337],
    ),
    ("/mutate/pods", _web_pod(HARDENED, hostNetwork=True), False, [HOST_NETWORK]),
    (
        "/mutate/pods/namespace-enabled",
        _web_pod(HARDENED, {}, hostNetwork=True),
        False,
        [HOST_NETWORK],
    ),
    (
        "/mutate/pods",
        _web_pod(
            {"privileged": True}, {c.ANNOTATION_INJECT: "true", c.ANNOTATION_CAPTURE: "explicit"}
        ),
        True,
        [EXPLICIT_CAPTURE],
    ),
]


@pytest.mark.parametrize(("path", "pod", "patched", "warnings"), BYPASS_CASES)
def test_capture_bypass_warnings_arrive(
    server: Server,
    conn: http.client.HTTPSConnection,
    *,
    path: str,
    pod: dict[str, Any],
    patched: bool,
    warnings: list[str],
) -> None:
    review = admission_review(pod)
    status, answer = post(conn, path, review)
    assert status == 200
    response = answer["response"]
    assert response["allowed"] is True and ("patch" in response) is patched
    assert response.get("warnings", []) == ["egress-injector: " + w for w in warnings]
    (log,) = server.review_logs(review["request"]["uid"])
    assert log["warnings"] == warnings


def test_workload_path_warns_about_the_template(conn: http.client.HTTPSConnection) -> None:
    deploy = _deployment({c.ANNOTATION_INJECT: "true"})
    deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    review = admission_review(deploy, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert status == 200 and "patch" in answer["response"]
    assert answer["response"]["warnings"] == ["egress-injector: " + PRIVILEGED]
    deploy["spec"]["template"]["spec"]["hostNetwork"] = True
    review = admission_review(deploy, "Deployment", group="apps", operation="CREATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert answer["response"]["allowed"] is True  # the workload path warns, never refuses
    assert answer["response"]["warnings"] == ["egress-injector: " + HOST_NETWORK]


def test_the_workload_path_warns_about_annotations_of_a_template_it_does_not_inject(
    conn: http.client.HTTPSConnection,
) -> None:
    # Its template injected offline already (a status annotation): the bad mode the workload
    # now asks for is still worth telling.
    deploy = _deployment({c.ANNOTATION_INJECT: "true", c.ANNOTATION_MODE: "bogus"})
    deploy["spec"]["template"]["metadata"]["annotations"] = {c.ANNOTATION_STATUS: "{}"}
    review = admission_review(deploy, "Deployment", group="apps", operation="UPDATE")
    status, answer = post(conn, "/mutate/workloads", review)
    assert status == 200
    warnings = answer["response"].get("warnings", [])
    assert [w for w in warnings if c.ANNOTATION_MODE in w and "bogus" in w], warnings


def test_refuse_capture_bypass_refuses_those_pods_only(tmp_path: Path) -> None:
    srv = start_server(tmp_path, config={**SERVER_CONFIG, "refuseCaptureBypass": True})
    try:
        with closing(srv.connect()) as connection:
            for path, pod, patched, warnings in BYPASS_CASES:
                review = admission_review(pod)
                status, answer = post(connection, path, review)
                assert status == 200
                response = answer["response"]
                refused = bool(warnings) and warnings != [EXPLICIT_CAPTURE]
                assert response["allowed"] is not refused, (pod, response)
                assert response.get("warnings", []) == ["egress-injector: " + w for w in warnings]
                if refused:
                    assert "patch" not in response
                    assert response["status"]["code"] == 403
                    assert response["status"]["message"] == (
                        "egress-injector: refused (refuseCaptureBypass): " + "; ".join(warnings)
                    )
                    (log,) = srv.review_logs(review["request"]["uid"])
                    assert log["outcome"] == "refused"
                else:
                    assert ("patch" in response) is patched and "status" not in response
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        assert 'egress_injector_reviews_total{outcome="refused",route="pods"} 3.0' in text
    finally:
        stop_server(srv)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"kind": "Pod"}', 400),
        (b'{"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview", "request": {}}', 400),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}', 400),
        (b"\xff\xfe", 400),
    ],
)
def test_bodies_that_are_not_reviews_get_400(
    conn: http.client.HTTPSConnection, body: bytes, status: int
) -> None:
    got, answer = post(conn, "/mutate/pods", body)
    assert got == status and "error" in answer


def test_limits_and_paths(server: Server) -> None:
    with closing(server.connect()) as connection:
        connection.putrequest("POST", "/mutate/pods")
        connection.putheader("Content-Length", str(7 * 1024 * 1024))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        response.read()
    with closing(server.connect()) as connection:
        status, answer = post(connection, "/mutate/nothing", admission_review({}))
        assert status == 404 and "/mutate/pods" in answer["error"]
    with closing(server.connect()) as connection:
        connection.putrequest("POST", "/mutate/pods", skip_accept_encoding=True)
        connection.endheaders()  # no Content-Length
        response = connection.getresponse()
        assert response.status == 411


def test_health_readiness_and_metrics(server: Server, conn: http.client.HTTPSConnection) -> None:
    for path, expected in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
        conn.request("GET", path)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, expected)
    review = admission_review({"metadata": {}, "spec": {"containers": []}})
    post(conn, "/mutate/pods", review)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200
    assert 'egress_injector_reviews_total{outcome="skipped",route="pods"}' in text
    assert "egress_injector_review_duration_seconds_bucket" in text


def test_keep_alive_serves_many_reviews_on_one_connection(server: Server) -> None:
    pod = {
        "metadata": {"annotations": {c.ANNOTATION_INJECT: "true"}},
        "spec": {"containers": [{"name": "a", "image": "x"}]},
    }
    latencies = []
    with closing(server.connect()) as connection:
        for _ in range(50):
            started = time.perf_counter()
            status, answer = post(connection, "/mutate/pods", admission_review(pod))
            latencies.append(time.perf_counter() - started)
            assert status == 200 and "patch" in answer["response"]
    # ~2.5 ms here; a reply split over two TCP writes stalls ~40 ms on delayed ACKs (Nagle)
    median = sorted(latencies)[len(latencies) // 2]
    assert median < 0.025, f"median review latency {median * 1000:.1f} ms"


def test_tls_is_real(server: Server) -> None:
    untrusted = ssl.create_default_context()  # system CAs only: our CA is not among them
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        untrusted.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # plaintext
        try:
            data = raw.recv(1024)
        except ConnectionResetError:
            data = b""
        assert not data.startswith(b"HTTP/")


def test_a_silent_client_neither_blocks_others_nor_stays_forever(server: Server) -> None:
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        with closing(server.connect(timeout=5)) as connection:  # served while the silent one waits
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200
        started = time.monotonic()
        assert silent.recv(1) == b""  # the server closes it after --timeout 2
        assert time.monotonic() - started < 8
    finally:
        silent.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=valid_pods() | weird_pods())
def test_random_pods_over_https_never_fail(server: Server, pod: Any) -> None:
    review = admission_review(pod)
    with closing(server.connect()) as connection:
        status, answer = post(connection, "/mutate/pods/namespace-enabled", review)
    assert status == 200
    patched = apply_response(pod, review, answer)  # the patch applies to what was sent
    if "patch" in answer["response"]:
        expected = inject_pod(pod, PodContext("shop", "enabled"), _cfg(server))
        assert patched == expected.pod


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--drain-seconds", "1")
    try:
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        seen_503 = False
        while time.monotonic() < deadline and not seen_503:
            with closing(srv.connect(timeout=2)) as connection:
                connection.request("GET", "/readyz")
                seen_503 = connection.getresponse().status == 503
        assert seen_503
        assert srv.proc.wait(10) == 0
        assert any('"msg": "stopped"' in line for line in srv.logs)
    finally:
        stop_server(srv)


def test_serve_refuses_a_bad_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sidecarStyle: sideways\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "injector.cli",
            "serve",
            "--config",
            str(bad),
            "--tls-cert",
            "x",
            "--tls-key",
            "y",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "sidecarStyle" in proc.stderr


def test_certificate_rotation_is_picked_up(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        with closing(srv.connect()) as connection:
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200
        old_ca = srv.context()
        _certs(tmp_path)  # a new CA and serving certificate, written over the old files
        deadline = time.monotonic() + 10
        rotated = False
        while time.monotonic() < deadline and not rotated:
            time.sleep(0.3)
            try:
                with (
                    socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
                    old_ca.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    pass
            except ssl.SSLCertVerificationError:
                rotated = True
        assert rotated, "the server kept presenting the old certificate"
        with closing(srv.connect()) as connection:  # srv.ca now holds the new CA
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 200
        assert any("reloaded TLS certificate" in line for line in srv.logs)
    finally:
        stop_server(srv)
