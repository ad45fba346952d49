"""`kubectl egress check` on a host the workload's allowlist inspects (inspect: true): decided as
the sidecar decides it, the HTTPS request by its method and path."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.kubectl.world import NS, World, build_world, deployment


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("inspect"))
    try:
        yield w
    finally:
        w.stop()


def test_check_decides_the_request_inside_inspected_tls(world: World) -> None:
    allowlist = (
        "allow:\n  - {host: pay.test, inspect: true, methods: [POST], paths: [/v1/charges]}\n"
    )
    world.api.put_configmap(NS, "payments", {"allowlist.yaml": allowlist})
    world.api.put_object(
        "deployments",
        deployment(
            "web",
            {"egress-sidecar.io/inject": "true", "egress-sidecar.io/allowlist": "payments"},
        ),
    )
    url = "https://pay.test/v1/charges"
    allowed = world.run("check", "deploy/web", url, "-X", "POST", "-o", "json")
    assert allowed.returncode == 0, allowed.stderr
    result = json.loads(allowed.stdout)
    assert (result["decision"], result["inspected"]) == ("allow", True)
    denied = world.run("check", "deploy/web", url, "-o", "json")  # GET
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["detail"].startswith("method GET not allowed")
    channel = world.run("check", "deploy/web", "pay.test:443", "-o", "json")
    assert channel.returncode == 0, channel.stdout  # the TLS channel: its requests decide
