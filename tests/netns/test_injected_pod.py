"""End to end "pod": a Deployment goes through `egress-injector inject`; egress-init, the sidecar
and the app then run in the pod namespace with exactly the commands, arguments, environment,
user IDs and capabilities of the injected spec (tests/support/netns_pod.py emulates the
kubelet). The allowlist comes from a ConfigMap served by the fake API server; spans go to an
OTLP receiver in the "outside" namespace, configured through the injector's `otelEnv`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import netns as h
from tests.support.injection import cluster_env, deployment, inject, service_account, start_api
from tests.support.netns import OUT4, OUT6, POD4
from tests.support.netns_pod import PodRunner, in_netns
from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver, ReceivedSpan, span_on

WEB4, OTHER4, _ = OUT4
OTHER6 = OUT6[1]
NAMESPACE, POD_NAME, NODE = "shop", "web-7d4b9c-x2x7q", "node-a"
APP_UID = 4242

ALLOWLIST = """\
allow:
  - web.test
privateRanges:
  - 198.18.0.0/15
"""

APP_SCRIPT = (
    "curl -sS -o /dev/null -w 'web %{{http_code}}\\n' --resolve web.test:80:{web} "
    "http://web.test/app; "
    "curl -sS -o /dev/null -w 'denied %{{http_code}}\\n' --resolve denied.test:80:{other} "
    "http://denied.test/app; "
    "curl -sS -o /dev/null -w 'tls %{{http_code}}\\n' --cacert {ca} "
    "--resolve web.test:443:{web} https://web.test/app; "
    "curl -sS -o /dev/null -w 'v6 %{{http_code}}\\n' -g 'http://[{other6}]/cluster-internal'"
)


def manifest(ca: Path, automount: bool) -> str:
    script = APP_SCRIPT.format(web=WEB4, other=OTHER4, ca=ca, other6=OTHER6)
    return deployment(
        NAMESPACE,
        {
            **({} if automount else {"automountServiceAccountToken": False}),
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [{"name": "app", "image": "curl", "command": ["sh", "-c", script]}],
        },
    )


@dataclass
class Injected:
    pod: PodRunner
    spec: dict[str, Any]
    upstream: h.Upstream
    receiver: OtlpHttpReceiver
    init: subprocess.CompletedProcess[str]
    app: subprocess.CompletedProcess[str]
    sidecar_out: Path

    def decisions(self) -> list[dict[str, Any]]:
        return h.decisions(self.sidecar_out)


@pytest.fixture(scope="module", params=[True, False], ids=["automount", "no-automount"])
def injected(request: pytest.FixtureRequest, reaped: list[str]) -> Iterator[Injected]:
    """One pod per variant: with the kubelet's service-account mount, and with
    ``automountServiceAccountToken: false`` (the injector then projects a token for the
    sidecar alone)."""
    w = h.create_world()
    try:
        yield from _injected(w, automount=request.param)
    finally:
        w.close()


def _injected(w: h.World, *, automount: bool) -> Iterator[Injected]:
    certs = h.make_certs(w.workdir, ["web.test", "denied.test"], [WEB4, OTHER4])
    upstream = w.start_servers(
        w.outside,
        "outside",
        certs,
        http=[f"{WEB4}:80", f"{OTHER4}:80", f"[{OTHER6}]:80"],
        https=[f"{WEB4}:443"],
    )
    receiver = in_netns(w.outside.name, lambda: OtlpHttpReceiver(host=OTHER4))
    api = in_netns(w.pod.name, lambda: start_api(w.workdir))
    try:
        api.put_configmap(NAMESPACE, "egress-allowlist", {"allowlist.yaml": ALLOWLIST})
        spec = inject(
            w.workdir, manifest(certs.ca_pem, automount), {"otelEnv": receiver.exporter_env}
        )
        sa = service_account(w.workdir, api, NAMESPACE)
        pod = PodRunner(
            w,
            spec,
            POD_NAME,
            NAMESPACE,
            NODE,
            POD4,
            files={
                "/etc/hosts": h.hosts_file(w.workdir / "hosts", {"web.test": WEB4}),
                "/etc/resolv.conf": h.resolv_conf(w.workdir / "resolv.conf"),
            },
            service_account=sa,
            cluster_env=cluster_env(api),
        )

        # The kubelet's order: init containers one by one (a native sidecar is started and must
        # pass its startup probe before the next), then the app.
        names = [c["name"] for c in spec["initContainers"]]
        assert names == ["egress-init", "egress-sidecar"], names
        init = pod.run("egress-init")
        assert init.returncode == 0, init.stdout + init.stderr
        out = w.workdir / "sidecar.out"
        sidecar = pod.start("egress-sidecar", out)
        h.wait_for(lambda: pod.probe("egress-sidecar", "startupProbe"), 30, "sidecar", sidecar, out)
        app = pod.run("app")
        yield Injected(pod, spec, upstream, receiver, init, app, out)
    finally:
        api.stop()
        receiver.stop()


def test_the_injected_init_container_installs_the_capture_rules(injected: Injected) -> None:
    init = injected.pod.container("egress-init")
    assert init["command"] + init["args"][:1] == [
        "egress-sidecar",
        "iptables",
        "apply",
        "--proxy-uid",
    ]
    save = injected.pod.world.pod.ok(["iptables-save", "-t", "nat"])
    assert "-j REDIRECT --to-ports 15002" in save
    # Run with only NET_ADMIN/NET_RAW on a read-only root, as the spec says.
    assert "capture rules applied" in injected.init.stderr


def test_the_app_is_captured_and_decided_by_the_configmap_allowlist(injected: Injected) -> None:
    assert injected.app.returncode == 0, injected.app.stderr
    lines = injected.app.stdout.splitlines()
    assert lines[:3] == ["web 200", "denied 403", "tls 200"], (
        injected.app.stdout + injected.app.stderr
    )
    paths = {
        (r["local"], r["target"]) for r in injected.upstream.records() if r["event"] == "request"
    }
    assert (f"{WEB4}:80", "/app") in paths
    assert not any(local.startswith(f"{OTHER4}:") for local, _ in paths)


def test_cluster_cidrs_from_the_injector_are_not_captured(injected: Injected) -> None:
    """The injector excludes fc00::/7 by default: the app reaches fd00:e5::3 directly."""
    assert "v6 200" in injected.app.stdout.splitlines()
    records = injected.upstream.records()
    (req,) = [r for r in records if r.get("target") == "/cluster-internal"]
    assert "traceparent" not in req["headers"]


def test_decisions_and_spans_match_the_allowlist(injected: Injected) -> None:
    by_host = {(d.get("host"), d["protocol"]): d for d in injected.decisions()}
    assert by_host[("web.test", "GET")]["decision"] == "allow"
    assert by_host[("denied.test", "GET")]["decision"] == "deny"
    assert by_host[("web.test", "TLS")]["decision"] == "allow"
    for d in by_host.values():
        assert d["capture"] == "transparent"
        assert d["policy_source"] == f"configmap:{NAMESPACE}/egress-allowlist"

    sink = injected.receiver.sink

    (allowed,) = sink.wait_for(span_on("web.test", "GET"))[-1:]
    (denied,) = sink.wait_for(span_on("denied.test", "GET"))[-1:]
    (tls,) = sink.wait_for(span_on("web.test", "TLS"))[-1:]
    assert allowed.attributes["egress.decision"] == "allow"
    assert denied.attributes["egress.decision"] == "deny" and denied.status_code == STATUS_ERROR
    assert tls.attributes["egress.tls.passthrough"] is True
    span: ReceivedSpan
    for span in (allowed, denied, tls):
        assert span.attributes["egress.capture"] == "transparent"
        assert span.resource["service.name"] == "web"
        assert span.resource["k8s.namespace.name"] == NAMESPACE
        assert span.resource["k8s.pod.name"] == POD_NAME
        assert span.resource["k8s.deployment.name"] == "web"
