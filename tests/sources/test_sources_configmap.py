"""The ConfigMap source end to end below the proxy: the test API server, the official client,
the watcher, validation, the store. Decisions are taken from the store as the proxy takes them."""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sidecar.k8s.client import ClientOptions, KubeClient
from sidecar.k8s.events import EventRecorder
from sidecar.k8s.refs import ConfigMapRef
from sidecar.k8s.watch import WatchTuning
from sidecar.metrics import Metrics
from sidecar.policy.model import Destination, Reason, Verdict
from sidecar.policy.store import PolicyStore
from sidecar.sources import SourceSpec, open_source
from sidecar.sources.configmap import ConfigMapSource
from tests.support.kubeapi import FakeKubeAPI, wait_until

NS = "shop"
A = ConfigMapRef(NS, "egress-allowlist")
B = ConfigMapRef(NS, "extra-allowlist")
FAST = WatchTuning(
    backoff_initial=0.05, backoff_max=0.3, watch_timeout_min=30, watch_timeout_max=60
)


def allow(*hosts: str, deny: tuple[str, ...] = ()) -> dict[str, str]:
    doc = "allow:\n" + "".join(f"  - {h}\n" for h in hosts)
    if deny:
        doc += "deny:\n" + "".join(f"  - {h}\n" for h in deny)
    return {"allowlist.yaml": doc}


def verdict(store: PolicyStore, host: str) -> tuple[Verdict, Reason]:
    d = store.get().decide(Destination(host, 443))
    return d.verdict, d.reason


def metric(metrics: Metrics, line_start: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


SourceFactory = Callable[..., tuple[ConfigMapSource, PolicyStore, Metrics]]


@pytest.fixture
def make_source(
    kube_client: KubeClient, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> Iterator[SourceFactory]:
    made: list[ConfigMapSource] = []

    def make(
        refs: tuple[ConfigMapRef, ...] = (A,), **kwargs: object
    ) -> tuple[ConfigMapSource, PolicyStore, Metrics]:
        store, metrics = PolicyStore(), Metrics()
        source = ConfigMapSource(
            refs,
            kube_client,
            store,
            metrics,
            recorder=EventRecorder(kube_client, instance="web-7d9f-abcde", host="node-1"),
            tuning=FAST,
            tracer_provider=spans[0],
            **kwargs,  # type: ignore[arg-type]
        )
        source.start()
        made.append(source)
        return source, store, metrics

    yield make
    for source in made:
        source.stop()


def test_fails_closed_until_the_first_good_version(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    source, store, metrics = make_source()
    wait_until(lambda: source.watchers[0].lists >= 1)
    assert verdict(store, "api.test") == (Verdict.DENY, Reason.POLICY_NOT_LOADED)
    assert not source.ready()
    assert source.status()["sources"][0]["state"] == "pending"
    assert metric(metrics, "egress_policy_loaded") == 0
    rv = kubeapi.put_configmap(NS, A.name, allow("api.test"))
    wait_until(source.ready)
    assert verdict(store, "api.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)
    status = source.status()
    assert status["policy"] == {"source": "configmap:shop/egress-allowlist", "version": rv}
    assert status["sources"][0]["state"] == "loaded" and status["api_reachable"] is True
    text = metrics.render().decode()
    assert (
        f'egress_policy_info{{source="configmap:shop/egress-allowlist",version="{rv}"}} 1.0' in text
    )
    assert (
        'egress_policy_reloads_total{result="applied",source="configmap:shop/egress-allowlist"} 1.0'
        in text
    )


def test_edits_are_enforced_within_a_second(
    kubeapi: FakeKubeAPI, make_source: SourceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Time from the API write to the first decision taken under the new version."""
    kubeapi.put_configmap(NS, A.name, allow("v0.test"))
    source, store, _ = make_source()
    wait_until(source.ready)
    first_seen: dict[str, float] = {}
    mixed: list[str] = []
    stop = threading.Event()

    def decide_continuously() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            snap = store.get()  # one snapshot per decision, as a flow takes it
            decision = snap.decide(Destination(f"v{snap.version}.test", 443))
            now = time.monotonic()
            first_seen.setdefault(snap.version, now)
            if decision.verdict is not Verdict.ALLOW:
                mixed.append(snap.version)
            time.sleep(0.0005)

    edits = 40
    latencies: list[float] = []
    decider = threading.Thread(target=decide_continuously, daemon=True)
    try:
        # Each version allows only the host named after its own resourceVersion.
        next_rv = kubeapi.resource_version + 1
        kubeapi.put_configmap(NS, A.name, allow(f"v{next_rv}.test"))
        wait_until(lambda: store.get().version == str(next_rv))
        decider.start()
        for _ in range(edits):
            next_rv = kubeapi.resource_version + 1
            written = time.monotonic()
            rv = kubeapi.put_configmap(NS, A.name, allow(f"v{next_rv}.test"))
            assert rv == str(next_rv)
            wait_until(lambda: rv in first_seen, timeout=3, interval=0.001)  # noqa: B023
            latencies.append(first_seen[rv] - written)
    finally:
        stop.set()
        decider.join(5)
    assert mixed == []
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(latencies), cuts[98]
    with capsys.disabled():
        print(
            f"\nConfigMap edit -> first decision under the new version, {edits} edits: "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
        )
    assert p99 < 1.0


def test_an_invalid_edit_is_kept_out_and_reported(
    kubeapi: FakeKubeAPI,
    make_source: SourceFactory,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = kubeapi.put_configmap(NS, A.name, allow("api.test"))
    source, store, metrics = make_source()
    wait_until(source.ready)
    caplog.set_level(logging.INFO, logger="sidecar.sources")
    bad_doc = {"allowlist.yaml": "allow:\n  - api.test\n  - '*.*.example.com'\n"}
    bad = kubeapi.put_configmap(NS, A.name, bad_doc)
    uid = kubeapi.get_configmap(NS, A.name)["metadata"]["uid"]  # type: ignore[index]
    wait_until(lambda: metric(metrics, 'egress_policy_reloads_total{result="invalid"') == 1)
    # The last good version stays in force.
    assert store.get().version == good
    assert verdict(store, "api.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)
    assert metric(metrics, "egress_policy_last_invalid_timestamp_seconds") > time.time() - 60
    # The log line names the ConfigMap, the rejected version, the line and the problem.
    (record,) = [r for r in caplog.records if r.getMessage().startswith("allowlist rejected")]
    assert record.source == "configmap:shop/egress-allowlist"  # type: ignore[attr-defined]
    assert record.version == bad  # type: ignore[attr-defined]
    assert record.keeping_version == good  # type: ignore[attr-defined]
    assert record.problems[0]["line"] == 3  # type: ignore[attr-defined]
    assert "wildcard" in record.problem  # type: ignore[attr-defined]
    # Its own span, status ERROR, with the rejected version and the problem.
    reloads = [s for s in spans[1].get_finished_spans() if s.name == "policy reload"]
    failed = [s for s in reloads if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    attrs = failed[0].attributes or {}
    assert attrs["egress.policy.source"] == "configmap:shop/egress-allowlist"
    assert attrs["egress.policy.version"] == bad
    names = [e.name for e in failed[0].events]
    assert names[0] == "exception" and "allowlist.problem" in names
    problem = next(e for e in failed[0].events if e.name == "allowlist.problem")
    assert (problem.attributes or {})["line"] == 3
    # A Warning Event on the ConfigMap, naming the version and the problem.
    (event,) = wait_until(lambda: kubeapi.events_for(NS, A.name))
    assert event["reason"] == "InvalidAllowlist" and event["type"] == "Warning"
    assert event["involvedObject"]["uid"] == uid
    assert event["involvedObject"]["resourceVersion"] == bad
    assert "allowlist.yaml line 3" in event["message"] and f"version {good}" in event["message"]
    status = source.status()["sources"][0]
    assert (status["version"], status["rejected_version"]) == (good, bad)
    # The next good edit applies.
    fixed = kubeapi.put_configmap(NS, A.name, allow("api.test", "cdn.test"))
    wait_until(lambda: store.get().version == fixed)
    assert verdict(store, "cdn.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)


def test_a_configmap_without_the_key_is_rejected(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    kubeapi.put_configmap(NS, A.name, {"allow.yaml": "allow: [api.test]"})
    source, store, _metrics = make_source()
    wait_until(lambda: kubeapi.events_for(NS, A.name))
    assert not source.ready()
    assert verdict(store, "api.test") == (Verdict.DENY, Reason.POLICY_NOT_LOADED)
    assert (
        "no data key 'allowlist.yaml' (keys: allow.yaml)"
        in kubeapi.events_for(NS, A.name)[0]["message"]
    )
    assert "no earlier good version" in kubeapi.events_for(NS, A.name)[0]["message"]


def test_delete_denies_with_policy_deleted_until_recreated(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    kubeapi.put_configmap(NS, A.name, allow("api.test"))
    source, store, metrics = make_source()
    wait_until(source.ready)
    kubeapi.delete_configmap(NS, A.name)
    wait_until(lambda: store.get().policy is None)
    assert verdict(store, "api.test") == (Verdict.DENY, Reason.POLICY_DELETED)
    assert source.ready()  # loaded once; the deletion is enforced, not an outage
    assert source.status()["sources"][0]["state"] == "deleted"
    assert metric(metrics, 'egress_policy_reloads_total{result="deleted"') == 1
    rv = kubeapi.put_configmap(NS, A.name, allow("api.test"))
    wait_until(lambda: store.get().version == rv)
    assert verdict(store, "api.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)


def test_410_while_away_relists_and_applies_what_changed(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    kubeapi.put_configmap(NS, A.name, allow("old.test"))
    source, store, _ = make_source()
    wait_until(source.ready)
    kubeapi.stop()
    rv = kubeapi.put_configmap(NS, A.name, allow("new.test"))
    kubeapi.expire_history()
    kubeapi.start()
    wait_until(lambda: store.get().version == rv)
    assert source.watchers[0].lists == 2
    assert verdict(store, "new.test")[0] is Verdict.ALLOW
    assert verdict(store, "old.test")[0] is Verdict.DENY


def test_api_server_restart_keeps_the_last_good_version(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    good = kubeapi.put_configmap(NS, A.name, allow("api.test"))
    source, store, metrics = make_source(not_ready_when_api_unreachable=True, unreachable_after=0.2)
    wait_until(source.ready)
    kubeapi.stop()
    wait_until(lambda: not source.ready(), timeout=5)  # configured to say so
    # Still enforcing: the API being away changes no decision.
    assert store.get().version == good
    assert verdict(store, "api.test") == (Verdict.ALLOW, Reason.MATCHED_ALLOW)
    assert source.status()["api_reachable"] is False
    assert metric(metrics, "egress_policy_source_connected") == 0
    kubeapi.bookmark_interval = 3600  # no event at all on the new watch: accepted is enough
    kubeapi.start()
    wait_until(source.ready, timeout=5)
    assert source.status()["api_reachable"] is True
    rv = kubeapi.put_configmap(NS, A.name, allow("cdn.test"))
    wait_until(lambda: store.get().version == rv)
    assert metric(metrics, "egress_policy_source_connected") == 1
    assert metric(metrics, "egress_policy_source_errors_total") >= 1


def test_by_default_an_unreachable_api_does_not_make_the_pod_unready(
    kubeapi: FakeKubeAPI, make_source: SourceFactory
) -> None:
    kubeapi.put_configmap(NS, A.name, allow("api.test"))
    source, _, _ = make_source(unreachable_after=0.1)
    wait_until(source.ready)
    kubeapi.stop()
    wait_until(lambda: not source.api_reachable(), timeout=5)
    assert source.ready()
    kubeapi.start()


def test_union_of_two_configmaps(kubeapi: FakeKubeAPI, make_source: SourceFactory) -> None:
    kubeapi.put_configmap(NS, A.name, allow("only-a.test", "both.test", "contested.test"))
    source, store, _ = make_source((A, B))
    wait_until(lambda: source.watchers[1].lists >= 1)
    assert not source.ready()  # b does not exist yet: its deny rules are unknown
    assert verdict(store, "only-a.test") == (Verdict.DENY, Reason.POLICY_NOT_LOADED)
    rv_b = kubeapi.put_configmap(NS, B.name, allow("only-b.test", deny=("contested.test",)))
    wait_until(source.ready)
    snap = store.get()
    assert snap.source == "configmap:shop/egress-allowlist,configmap:shop/extra-allowlist"
    assert snap.version.endswith("," + rv_b)
    assert verdict(store, "only-a.test")[0] is Verdict.ALLOW
    assert verdict(store, "only-b.test")[0] is Verdict.ALLOW
    assert verdict(store, "contested.test") == (Verdict.DENY, Reason.MATCHED_DENY)  # deny wins
    kubeapi.delete_configmap(NS, B.name)
    wait_until(lambda: store.get().version.endswith(",deleted"))
    assert verdict(store, "only-b.test") == (Verdict.DENY, Reason.POLICY_DELETED)
    assert verdict(store, "only-a.test")[0] is Verdict.ALLOW
    assert verdict(store, "contested.test") == (Verdict.DENY, Reason.MATCHED_DENY)
    rv_b2 = kubeapi.put_configmap(NS, B.name, allow("only-b.test"))
    wait_until(lambda: store.get().version.endswith("," + rv_b2))
    assert verdict(store, "only-b.test")[0] is Verdict.ALLOW
    assert verdict(store, "contested.test")[0] is Verdict.ALLOW  # b no longer denies it


def test_open_source_in_a_pod_uses_the_service_account_and_its_namespace(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """What `run --configmap egress-allowlist` does in a pod: in-cluster config over HTTPS,
    the namespace from the service account mount, Events named after the pod."""
    api = FakeKubeAPI(tls=True, workdir=tmp_path / "pki", token="sa-token")
    api.start()
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    assert api.ca_path is not None
    shutil.copy(api.ca_path, sa / "ca.crt")
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text(NS)
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "EGRESS_SERVICEACCOUNT_DIR": str(sa),
        "POD_NAME": "checkout-7d9f-abcde",
        "NODE_NAME": "node-9",
    }
    api.put_configmap(NS, A.name, {"allowlist.yaml": "allow: ['*.*.test']\n"})
    store = PolicyStore()
    source = open_source(
        SourceSpec(configmaps=(A.name,), watch_tuning=FAST), store, Metrics(), environ=env
    )
    source.start()
    try:
        (event,) = wait_until(lambda: api.events_for(NS, A.name))
        assert event["reportingInstance"] == "checkout-7d9f-abcde"
        assert event["source"]["host"] == "node-9"
        rv = api.put_configmap(NS, A.name, allow("api.test"))
        wait_until(source.ready)
        assert source.status()["policy"] == {"source": A.source, "version": rv}
        # The auth scheme is case-insensitive (RFC 7235); client-go and we send "Bearer".
        assert all((r.authorization or "").lower() == "bearer sa-token" for r in api.requests)
    finally:
        source.stop()
        api.stop()


def test_kubectl_describe_shows_the_rejected_edit(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The operator's view: `kubectl describe cm` lists the InvalidAllowlist Warning."""
    api = FakeKubeAPI(tls=True, workdir=tmp_path / "pki")  # kubectl sends tokens only over TLS
    api.start()
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    client = KubeClient(ClientOptions(kubeconfig=str(kubeconfig)), environ={})
    store = PolicyStore()
    source = ConfigMapSource(
        (A,),
        client,
        store,
        Metrics(),
        recorder=EventRecorder(client, instance="web-1", host="node-1"),
        tuning=FAST,
        tracer_provider=spans[0],
    )
    source.start()
    try:
        good = api.put_configmap(NS, A.name, allow("api.test"))
        wait_until(source.ready)
        api.put_configmap(NS, A.name, {"allowlist.yaml": "allow:\n  - api.test\n  - 'a*.test'\n"})
        wait_until(lambda: api.events_for(NS, A.name))
        out = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(kubeconfig),
                "--cache-dir",
                str(tmp_path / "cache"),
                "describe",
                "configmap",
                A.name,
                "--namespace",
                NS,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        events = out.split("Events:", 1)[1]
        assert "Warning" in events and "InvalidAllowlist" in events
        assert "egress-sidecar" in events  # From
        assert "allowlist.yaml line 3" in " ".join(events.split())
        assert f"still enforcing version {good}" in " ".join(events.split())
    finally:
        source.stop()
        api.stop()
