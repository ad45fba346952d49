"""suggest's round trip: the app runs in audit mode, `kubectl egress suggest` proposes an
allowlist, it is applied (switched to enforce), and the same sidecar then allows every
destination the proposal was built from and nothing else the app called."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kubectl.world import NS, PORTS, World, build_world
from tests.support.kubeapi import wait_until

POD = "web-7d9f-44444"


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("roundtrip"))
    try:
        w.add_injected_pod(POD)
        yield w
    finally:
        w.stop()


def _policy_version(w: World) -> str:
    code, body = w.sidecars[POD].health("/healthz/ready")
    assert code == 200, body
    return str(json.loads(body)["policy"]["version"])


@pytest.mark.parametrize("wildcards", [False, True])
def test_the_proposal_allows_what_it_came_from_and_nothing_else(
    world: World, wildcards: bool
) -> None:
    api, cdn, db, web = PORTS["api"], PORTS["cdn"], PORTS["db"], PORTS["web"]
    learned = [
        f"http://web.test:{web}/",
        f"http://api.test:{api}/v1/charges",
        f"http://img.cdn.test:{cdn}/a.png",
        f"http://js.cdn.test:{cdn}/app.js",
        f"http://css.cdn.test:{cdn}/site.css",
    ]
    for url in [*learned, f"http://db.test:{db}/"]:
        assert world.get(POD, url) == 200  # audit: everything goes through, and is summarised
    world.sidecars[POD].wait_decisions(count=6)

    args = ["suggest", "deploy/web", *(["--wildcards"] if wildcards else [])]
    out = world.run(*args)
    assert out.returncode == 0, out.stderr
    manifest = yaml.safe_load(out.stdout)
    document = manifest["data"]["allowlist.yaml"].replace("mode: audit", "mode: enforce")
    before = _policy_version(world)
    version = world.api.put_configmap(
        NS, manifest["metadata"]["name"], {"allowlist.yaml": document}
    )
    wait_until(lambda: _policy_version(world) == version, timeout=15)
    assert version != before

    for url in learned:  # every destination the proposal was built from
        assert world.get(POD, url) == 200, url
    # Nothing else the app called: the private database was left out (and said so) ...
    assert "db.test is a private address" in out.stderr
    assert world.get(POD, f"http://db.test:{db}/") == 403
    # ... and nothing it did not call, but a subdomain under a wildcard the user asked for.
    assert world.get(POD, f"http://never.test:{api}/") == 403
    assert world.get(POD, f"http://api.test:{web}/") == 403  # another port
    assert world.get(POD, f"http://fonts.cdn.test:{cdn}/") == (200 if wildcards else 403)

    # Decision lines leave in batches (~20 ms): wait for all of them before reading the tail.
    decisions = world.sidecars[POD].wait_decisions(count=6 + len(learned) + 4)[-len(learned) - 4 :]
    allowed = [d for d in decisions if d["decision"] == "allow"]
    assert {d["host"] for d in allowed} >= {"web.test", "api.test", "img.cdn.test"}

    # Once applied, suggest proposes only what was denied since, nothing it already allows.
    again = world.run("suggest", "deploy/web", "-o", "json")
    assert again.returncode == 0, again.stderr
    proposals = json.loads(again.stdout)["proposals"]
    assert {p["rule"] for p in proposals if p["added"]} == {
        f"never.test:{api}",
        f"api.test:{web}",
        *([] if wildcards else [f"fonts.cdn.test:{cdn}"]),
    }


def _uncommented(text: str) -> list[str]:
    """A manifest without its header comment (which names the source: pods or sidecars)."""
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_from_url_proposes_what_the_cluster_path_proposes(world: World, tmp_path: Path) -> None:
    """--from-url reads the same sidecar on its health port directly (no API server) and the
    current allowlist from a file: the same proposal, the same diff."""
    api, cdn, web = PORTS["api"], PORTS["cdn"], PORTS["web"]
    for url in (
        f"http://web.test:{web}/",
        f"http://api.test:{api}/x",
        f"http://js.cdn.test:{cdn}/",
    ):
        assert world.get(POD, url) == 200
    world.sidecars[POD].wait_decisions(count=3)
    current = tmp_path / "current.yaml"
    current.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "egress-allowlist", "namespace": NS},
                "data": {"allowlist.yaml": world.allowlist()},
            }
        )
    )
    url = f"http://127.0.0.1:{world.sidecars[POD].health_port}"
    for output in ("json", "manifest"):
        via_cluster = world.run("suggest", "deploy/web", "-o", output)
        # No KUBECONFIG at all: nothing may try the API server.
        local = world.run(
            "suggest", "deploy/web", "-o", output, "--from-url", url,
            "--allowlist-file", str(current), env={"KUBECONFIG": str(tmp_path / "none")},
        )  # fmt: skip
        assert via_cluster.returncode == local.returncode == 0, local.stderr
        if output == "json":
            assert (
                json.loads(local.stdout)["proposals"] == json.loads(via_cluster.stdout)["proposals"]
            )
            assert len(json.loads(local.stdout)["proposals"]) == 2
        else:
            assert _uncommented(local.stdout) == _uncommented(via_cluster.stdout)
            assert "its 1 sidecar saw" in local.stdout
    proposed = tmp_path / "proposed.yaml"
    proposed.write_text(world.run("suggest", "deploy/web").stdout)
    via_cluster = world.run("diff", "deploy/web", "-f", str(proposed), "-o", "json")
    local = world.run("diff", "deploy/web", "-f", str(proposed), "-o", "json", "--from-url", url)
    assert local.returncode == via_cluster.returncode == 0, local.stderr
    assert json.loads(local.stdout) == json.loads(via_cluster.stdout)


def test_from_url_errors_are_clear(world: World, tmp_path: Path) -> None:
    closed = "http://127.0.0.1:9"  # discard: nothing listens
    out = world.run("suggest", "deploy/web", "--from-url", closed)
    assert out.returncode == 2
    assert "no sidecar of http://127.0.0.1:9 answered /debug/destinations" in out.stderr
    out = world.run("suggest", "deploy/web", "--from-url", "127.0.0.1:15021")
    assert (out.returncode, "give the health port's URL" in out.stderr) == (2, True)
    out = world.run("suggest", "deploy/web", "--allowlist-file", str(tmp_path / "x.yaml"))
    assert out.returncode == 2
    assert "--allowlist-file goes with --from-url" in out.stderr
