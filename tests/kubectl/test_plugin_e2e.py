"""`kubectl-egress` as a user runs it (a subprocess, the user's kubeconfig) against the API
stand-in, whose pod proxy reaches real sidecars that decided real calls; outputs against golden
files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kubectl.golden import assert_golden
from tests.kubectl.world import NS, PORTS, STATUS, World, build_world, deployment, pod

P1, P2 = "web-7d9f-11111", "web-7d9f-22222"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("kubectl"))
    try:
        w.api.put_object("deployments", deployment("strict", {"egress-sidecar.io/mode": "enforce"}))
        w.add_injected_pod(P1)
        w.add_injected_pod(P2)
        web, api, cdn, db = (PORTS[k] for k in ("web", "api", "cdn", "db"))
        # The calls the app makes (audit mode: all go through, each decided and summarised).
        assert w.get(P1, f"http://web.test:{web}/orders?session=s3cr3t") == 200
        for _ in range(2):
            assert w.get(P1, f"http://api.test:{api}/v1/charges") == 200
        assert w.get(P2, f"http://api.test:{api}/v1/refunds") == 200
        for host in ("img", "js", "css"):
            assert w.get(P2, f"http://{host}.cdn.test:{cdn}/app") == 200
        assert w.get(P2, f"http://db.test:{db}/") == 200
        assert w.connect(P1, "db.test:5432").startswith(b"HTTP/1.1 502")  # nothing listens
        w.sidecars[P1].wait_decisions(count=4)
        w.sidecars[P2].wait_decisions(count=5)
        yield w
    finally:
        w.stop()


def test_help_for_every_command(world: World) -> None:
    top = world.run("--help")
    assert top.returncode == 0
    for command in ("status", "check", "suggest", "diff"):
        assert command in top.stdout
        out = world.run(command, "--help")
        assert out.returncode == 0, out.stderr
        for option in ("--kubeconfig", "--context", "--namespace", "--output"):
            assert option in out.stdout, (command, option)


def test_status(world: World) -> None:
    out = world.run_process("status")  # the installed script, as the user runs it
    assert out.returncode == 0, out.stderr
    assert_golden("status.txt", out.stdout)
    everywhere = world.run("status", "-A")
    assert everywhere.returncode == 0, everywhere.stderr
    assert_golden("status-all-namespaces.txt", everywhere.stdout)


def test_status_as_json_and_yaml(world: World) -> None:
    out = world.run("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    items = {(i["workload"], i["pod"]): i for i in json.loads(out.stdout)["items"]}
    web = items[("deploy/web", P1)]
    assert web["injected"] is True
    assert web["capture"] == "explicit"
    assert web["mode"] == "audit"
    assert web["ready"] is True
    cm = world.api.get_configmap(NS, "egress-allowlist")
    assert cm is not None
    version = cm["metadata"]["resourceVersion"]
    assert web["policy"] == [
        {"source": f"configmap:{NS}/egress-allowlist", "in_pod": version, "current": version}
    ]
    assert web["in_sync"] is True
    legacy = items[("deploy/legacy", "legacy-7d9f-aaaaa")]
    assert legacy["injected"] is False
    assert "opted in" in legacy["why"] and "rollout restart" in legacy["why"]
    plain = items[("deploy/plain", "plain-7d9f-bbbbb")]
    assert plain["why"] == "not opted in (no pod annotation, namespace not labelled)"
    as_yaml = world.run("status", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == json.loads(out.stdout)


def test_check(world: World) -> None:
    out = world.run("check", "deploy/web", f"http://api.test:{PORTS['api']}/v1/charges")
    assert out.returncode == 0, out.stderr  # audit: it would go through
    assert_golden("check-audit.txt", out.stdout)
    allowed = world.run("check", "deploy/web", f"web.test:{PORTS['web']}", "-o", "json")
    assert allowed.returncode == 0
    result = json.loads(allowed.stdout)
    assert (result["decision"], result["reason"]) == ("allow", "matched allow rule")
    assert result["rule"] == f"{{host: web.test, ports: [{PORTS['web']}]}}"
    denied = world.run("check", "deploy/strict", "never.test", "-o", "table")
    assert denied.returncode == 1  # the strict workload's annotation enforces
    assert_golden("check-deny-table.txt", denied.stdout)


def test_suggest(world: World) -> None:
    out = world.run("suggest", "deploy/web")
    assert out.returncode == 0, out.stderr
    assert_golden("suggest.yaml", out.stdout)
    assert "private address" in out.stderr and "--wildcards would propose" in out.stderr
    manifest = yaml.safe_load(out.stdout)
    assert manifest["kind"] == "ConfigMap"
    assert "s3cr3t" not in out.stdout and "/v1/charges" not in out.stdout
    table = world.run("suggest", "deploy/web", "--wildcards", "-o", "table")
    assert table.returncode == 0, table.stderr
    assert_golden("suggest-wildcards-table.txt", table.stdout)
    as_json = json.loads(world.run("suggest", "deploy/web", "--private", "-o", "json").stdout)
    rules = [p["rule"] for p in as_json["proposals"] if p["added"]]
    assert {"cidr": "127.0.13.9/32", "ports": [5432, PORTS["db"]]} in rules
    assert as_json["configmap"]["metadata"] == {"name": "egress-allowlist", "namespace": NS}


NEW = f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: egress-allowlist
  namespace: {NS}
data:
  allowlist.yaml: |
    mode: enforce
    allow:
      - api.test:{PORTS["api"]}
      - host: web.test
        ports: [{PORTS["web"]}]
        paths: ["/v2/*"]
"""


def test_diff(world: World, tmp_path: Path) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(NEW)
    out = world.run("diff", "deploy/web", "-f", str(new), "--color", "never")
    assert out.returncode == 0, out.stderr
    assert_golden("diff.txt", out.stdout)
    assert "destinations seen by deploy/web" in out.stderr
    everything = world.run("diff", "deploy/web", "-f", "-", "--all", "--color", "never", stdin=NEW)
    assert_golden("diff-all.txt", everything.stdout)
    red = world.run("diff", "deploy/web", "-f", str(new), "--color", "always", "--exit-code")
    assert red.returncode == 1  # what goes through in audit today would be denied
    assert red.stdout.splitlines()[1].startswith("\x1b[31maudit→deny")
    breaking = NEW.replace(f"- api.test:{PORTS['api']}", "- api.test:1")
    tighter = world.run(
        "diff",
        "deploy/web",
        "-f",
        "-",
        "--color",
        "always",
        "--exit-code",
        stdin=breaking.replace('paths: ["/v2/*"]', "methods: [POST]"),
    )
    assert tighter.returncode == 1, tighter.stderr  # web.test GET: allow -> deny
    first = tighter.stdout.splitlines()[1]
    assert first.startswith("\x1b[31mallow→deny") and "web.test" in first
    as_json = json.loads(world.run("diff", "deploy/web", "-f", str(new), "-o", "json").stdout)
    kinds = {(i["host"], i["port"]): i["change"] for i in as_json["items"]}
    assert kinds[("api.test", PORTS["api"])] == "audit→allow"
    assert kinds[("img.cdn.test", PORTS["cdn"])] == "audit→deny"
    assert kinds[("web.test", PORTS["web"])] == "depends on path"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "deploy/nope", "x.test"], "no such workload: Deployment 'nope' not found"),
        (["suggest", "deploy/nope"], "no such workload"),
        (["suggest", "deploy/legacy"], "pod not injected: no pod of deploy/legacy"),
        (["diff", "deploy/plain", "-f", "-"], "pod not injected"),
        (["suggest", "cronjob/x"], "'cronjob' is not a workload kind"),
        (["check", "deploy/web", "http://"], "error:"),
        (["suggest", "deploy/web", "-n", "elsewhere"], "not found in namespace 'elsewhere'"),
    ],
)
def test_clear_errors_and_non_zero_exits(world: World, args: list[str], message: str) -> None:
    out = world.run(*args, stdin="allow: [x.test]\n")
    assert out.returncode == 2, out
    assert message in out.stderr
    assert out.stdout == ""


def test_an_invalid_new_allowlist_is_refused_with_its_line(world: World) -> None:
    out = world.run("diff", "deploy/web", "-f", "-", stdin="allow:\n  - '*'\n")
    assert out.returncode == 2
    assert "stdin is not a valid allowlist" in out.stderr
    assert 'stdin:2: "*" is not a valid host pattern' in out.stderr


@pytest.mark.parametrize(
    ("resource", "verb", "args", "message"),
    [
        (
            "pods/proxy",
            "get",
            ["suggest", "deploy/web"],
            'cannot get resource "pods" subresource "proxy"',
        ),
        ("pods", "list", ["diff", "deploy/web", "-f", "-"], "RBAC: you need to list pods"),
        ("deployments", "get", ["check", "deploy/web", "x.test"], "forbidden"),
        ("configmaps", "get", ["check", "deploy/web", "x.test"], "forbidden"),
    ],
)
def test_rbac_refusals_are_said(
    world: World, resource: str, verb: str, args: list[str], message: str
) -> None:
    world.api.forbid(resource, verb)
    try:
        out = world.run(*args, stdin="allow: [x.test]\n")
    finally:
        world.api.forbidden.discard((resource, verb))
    assert out.returncode == 2
    assert "forbidden" in out.stderr and message in out.stderr, out.stderr


def test_status_skips_the_kinds_rbac_hides_and_fails_when_it_hides_all(world: World) -> None:
    world.api.forbid("deployments", "list")
    try:
        out = world.run("status")
        assert out.returncode == 0, out.stderr
        assert out.stdout == ""  # only Deployments here
        assert (
            'deployments skipped: forbidden: deployments is forbidden: User "alice" cannot '
            'list resource "deployments" in API group "apps"'
        ) in out.stderr
        world.api.forbid("statefulsets", "list")
        world.api.forbid("daemonsets", "list")
        refused = world.run("status", "-A")
        assert refused.returncode == 2
        error = refused.stderr.splitlines()[-1]
        assert error.startswith("kubectl egress status: error: forbidden")
        assert all(
            f'resource "{kind}"' in error for kind in ("deployments", "statefulsets", "daemonsets")
        )
        assert "at the cluster scope" in refused.stderr
    finally:
        for kind in ("deployments", "statefulsets", "daemonsets"):
            world.api.forbidden.discard((kind, "list"))


def test_a_kubeconfig_that_does_not_load(world: World, tmp_path: Path) -> None:
    out = world.run("status", "--kubeconfig", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "cannot load the kubeconfig" in out.stderr
    bad_context = world.run("status", "--context", "nope")
    assert bad_context.returncode == 2 and "nope" in bad_context.stderr


def test_a_pod_whose_sidecar_cannot_be_reached(world: World) -> None:
    # Injected, but nothing answers its health port (crash-looping, or its node is gone).
    world.api.put_object(
        "pods",
        pod(
            "web-7d9f-33333",
            "web",
            {"egress-sidecar.io/inject": "true", "egress-sidecar.io/status": STATUS},
        ),
    )
    try:
        status = world.run("status", "-o", "json")
        items = {i["pod"]: i for i in json.loads(status.stdout)["items"]}
        assert "sidecar not reachable through the pod proxy" in items["web-7d9f-33333"]["error"]
        suggest = world.run("suggest", "deploy/web", "-o", "table")
        assert suggest.returncode == 0  # the two others answered
        assert "skipped pod web-7d9f-33333: error trying to reach service" in suggest.stderr
    finally:
        world.api.delete_object("pods", NS, "web-7d9f-33333")
