"""`kubectl egress` where the cluster is not in a happy state: a pod enforcing an older version
(it rejected the new one), a workload with several allowlists one of which is missing, an API
server that does not answer."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kubectl.world import NS, PORTS, World, build_world, deployment
from tests.support.kubeapi import FakeKubeAPI, wait_until
from tests.support.sidecar import BIN, free_port, sidecar_env

POD = "web-7d9f-55555"


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("states"))
    try:
        w.add_injected_pod(POD)
        yield w
    finally:
        w.stop()


def test_status_says_a_pod_is_stale_and_why(world: World) -> None:
    good = world.api.get_configmap(NS, "egress-allowlist")
    assert good is not None
    good_version = good["metadata"]["resourceVersion"]
    bad = world.api.put_configmap(NS, "egress-allowlist", {"allowlist.yaml": "allow:\n  - '*'\n"})

    def rejected() -> bool:
        body = json.loads(world.sidecars[POD].health("/healthz/ready")[1])
        return bool(body["sources"][0]["rejected_version"] == bad)

    wait_until(rejected, timeout=15)
    out = world.run("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    [row] = [r for r in json.loads(out.stdout)["items"] if r["pod"] == POD]
    assert row["policy"] == [
        {"source": f"configmap:{NS}/egress-allowlist", "in_pod": good_version, "current": bad}
    ]
    assert row["in_sync"] is False
    assert f"rejected configmap:{NS}/egress-allowlist version {bad}" in row["error"]
    assert "valid host pattern" in row["error"]
    table = world.run("status")
    line = next(x for x in table.stdout.splitlines() if POD in x)
    assert re.search(rf"\b{good_version}\s+{bad}\b", line) and "keeps enforcing" in line
    # check decides with what the API holds now, and says it is invalid.
    check = world.run("check", "deploy/web", "web.test")
    assert check.returncode == 2
    assert "holds an invalid allowlist" in check.stderr and "last good version" in check.stderr


def test_a_workload_with_two_allowlists_one_missing(world: World) -> None:
    world.api.put_configmap(
        NS, "payments", {"allowlist.yaml": f"allow:\n  - api.test:{PORTS['api']}\n"}
    )
    world.api.put_object(
        "deployments",
        deployment(
            "web",
            {
                "egress-sidecar.io/inject": "true",
                "egress-sidecar.io/allowlist": "egress-allowlist,payments,gone",
            },
        ),
    )
    out = world.run("check", "deploy/web", f"api.test:{PORTS['api']}", "-o", "json")
    assert out.returncode == 0, out.stderr  # allowed by the second allowlist
    result = json.loads(out.stdout)
    assert result["rule"] == f"api.test:{PORTS['api']}"
    assert result["policy_source"] == (
        f"configmap:{NS}/egress-allowlist,configmap:{NS}/payments,configmap:{NS}/gone"
    )
    assert f"configmap:{NS}/gone does not exist" in out.stderr
    assert world.get(POD, f"http://never.test:{PORTS['api']}/") == 200  # audit
    world.sidecars[POD].wait_decisions(lambda d: d.get("host") == "never.test")
    suggest = world.run("suggest", "deploy/web")
    assert suggest.returncode == 0, suggest.stderr
    assert f"other allowlists ({NS}/payments, {NS}/gone) stay as they are" in suggest.stdout
    manifest = yaml.safe_load(suggest.stdout)
    assert manifest["metadata"]["name"] == "egress-allowlist"
    assert f"never.test:{PORTS['api']}" in manifest["data"]["allowlist.yaml"]


def test_an_api_server_that_does_not_answer(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    api.port = free_port()  # nothing listens there
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")

    out = subprocess.run(
        [str(BIN / "kubectl-egress"), "status", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=120,
        env=sidecar_env(),
        check=False,
    )
    assert out.returncode == 2
    assert f"cannot reach the API server http://127.0.0.1:{api.port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_full_summary_is_said(world: World) -> None:
    small = "web-7d9f-66666"
    world.add_injected_pod(small, extra_args=("--destinations-max-entries", "8"))
    for port in range(1, 13):  # 12 destinations, nothing listens: audit lets them fail (502)
        assert world.connect(small, f"api.test:{port}").startswith(b"HTTP/1.1 502")
    world.sidecars[small].wait_decisions(count=12)
    out = world.run("suggest", "deploy/web", "-o", "table")
    assert out.returncode == 0, out.stderr
    assert f"{small}'s summary was full and let" in out.stderr
    assert "--destinations-max-entries keeps more" in out.stderr
    assert f"{POD}'s summary" not in out.stderr
