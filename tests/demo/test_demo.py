"""`make demo` end to end: scripts/demo run as a person runs it (offline, the real injector,
sidecar, plugin and clients), its outputs checked: the suggest round trip, the decisions, the
OTLP/JSON file."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.destinations import SeenDestination
from sidecar.kubectl.plan import destination_of
from sidecar.policy.model import Verdict
from sidecar.policy.parse import parse_allowlist

ROOT = Path(__file__).resolve().parents[2]
STAND_IN_RANGE = ipaddress.ip_network("127.0.77.0/24")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    done = subprocess.run(
        ["make", "-s", "demo"],
        cwd=ROOT,
        env={**os.environ, "DEMO_DIR": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, elapsed


def _allowlist(manifest_path: Path) -> Any:
    manifest = yaml.safe_load(manifest_path.read_text())
    text = manifest["data"]["allowlist.yaml"]
    return parse_allowlist(text, source="demo").with_extra_private_ranges([STAND_IN_RANGE])


def test_demo_runs_under_a_minute_with_progress_a_person_can_follow(
    demo: tuple[Path, str, float],
) -> None:
    out, stdout, elapsed = demo
    assert elapsed < 60, elapsed
    for n in range(1, 7):
        assert f"==> [{n}/6]" in stdout
    assert "done in" in stdout
    # The injection diff is shown, and the injected manifest has the sidecar.
    assert "added to the pod template: init containers egress-init, egress-sidecar" in stdout
    assert "+++ injected" in stdout
    injected = yaml.safe_load((out / "injected.yaml").read_text())
    pod = injected["spec"]["template"]["spec"]
    names = [c["name"] for c in pod.get("initContainers", []) + pod["containers"]]
    assert "egress-sidecar" in names and "egress-init" in names


def test_suggest_round_trip(demo: tuple[Path, str, float]) -> None:
    out, stdout, _ = demo
    seen = [SeenDestination.from_json(d) for d in json.loads((out / "seen.json").read_text())
            ["destinations"]]  # fmt: skip
    suggestion = json.loads((out / "suggest.json").read_text())
    added_hosts = {h for p in suggestion["proposals"] if p["added"] for h in p["hosts"]}
    assert added_hosts == {"hooks.slack.com", "api.openai.com"}, suggestion
    before = _allowlist(out / "suggested-allowlist.yaml")  # as proposed (audit)
    applied = _allowlist(out / "enforce-allowlist.yaml")  # as applied (enforce)
    assert applied.meta.mode.value == "enforce"
    # Every destination it was built from is allowed by the applied policy...
    built_from = [s for s in seen if s.host in added_hosts]
    assert len(built_from) == 2
    for s in built_from:
        assert applied.decide(destination_of(s)).verdict is Verdict.ALLOW, s
    # ... and so is every other one the app called in audit, except the deny rule's.
    for s in seen:
        if s.protocol not in ("CONNECT", "TLS", "TCP"):
            continue  # plain HTTP: its path is not kept; the sidecar's decisions below say
        decision = applied.decide(destination_of(s))
        if s.host == "upload.googleapis.com":
            assert decision.verdict is Verdict.DENY
            assert decision.reason.value == "matched deny rule"
        else:
            assert decision.verdict is Verdict.ALLOW, s
        assert before.decide(destination_of(s)).verdict == decision.verdict
    # Nothing else the demo called: the destination it never called in audit is denied, by the
    # policy and by the running sidecar.
    decisions = json.loads((out / "enforce-decisions.json").read_text())
    by_host = {d["host"]: d for d in decisions}
    assert set(by_host) == {s.host for s in seen} | {"exfil.example"}
    assert (by_host["exfil.example"]["decision"], by_host["exfil.example"]["reason"]) == (
        "deny",
        "no allow rule matches",
    )
    assert by_host["upload.googleapis.com"]["decision"] == "deny"
    allowed = {h for h, d in by_host.items() if d["decision"] == "allow"}
    assert allowed == {s.host for s in seen} - {"upload.googleapis.com"}
    assert by_host["hooks.slack.com"]["rule"] == "hooks.slack.com:443"
    # The decisions table was printed with its columns.
    assert "DECISION  REASON" in stdout and "exfil.example:443" in stdout


def _ids_to_base64(node: Any) -> None:
    # OTLP/JSON writes trace and span ids in hex; protobuf's JSON mapping of bytes is base64.
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                raw = bytes.fromhex(value)
                assert len(raw) == (16 if key == "traceId" else 8) or not raw, (key, value)
                node[key] = base64.b64encode(raw).decode()
            else:
                _ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _ids_to_base64(item)


def test_spans_file_is_one_otlp_json_export_request(demo: tuple[Path, str, float]) -> None:
    out, _, _ = demo
    doc = json.loads((out / "traces.otlp.json").read_text())
    _ids_to_base64(doc)
    request = json_format.Parse(json.dumps(doc), ExportTraceServiceRequest())
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    decisions = [
        json.loads(line)
        for line in (out / "decisions.jsonl").read_text().splitlines()
        if line.startswith("{")
    ]
    calls = [s for s in spans if any(a.key == "egress.decision" for a in s.attributes)]
    assert len(calls) == len(decisions) >= 15  # one span per decision
    # and one per policy load: the first version and the applied proposal.
    assert [s.name for s in spans if s not in calls] == ["policy reload"] * 2
    services = {
        a.value.string_value
        for rs in request.resource_spans
        for a in rs.resource.attributes
        if a.key == "service.name"
    }
    assert services == {"web"}
    denied = [
        s
        for s in spans
        if any(a.key == "egress.decision" and a.value.string_value == "deny" for a in s.attributes)
    ]
    assert len(denied) == 2
