"""The API server answering 500 or 429 (with Retry-After) to every request for a while, behind
a relay in front of the test API server, seen through a running `egress-sidecar run --configmap`:
the last good policy stays enforced, the pod stays ready, the sidecar backs off instead of
hammering the server, and an edit made during the outage is applied once the server is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import yaml

from tests.support.faults import FlakyFront
from tests.support.kubeapi import FakeKubeAPI, wait_until
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream import UpstreamServer

NS, NAME = "shop", "egress-allowlist"
WEB = "127.0.0.3"
OUTAGE = 4.0  # seconds of errors


@dataclass
class World:
    kubeapi: FakeKubeAPI
    front: FlakyFront
    sidecar: Sidecar
    web: UpstreamServer


def _doc(*hosts: str, port: int) -> dict[str, str]:
    return {"allowlist.yaml": "allow:\n" + "".join(f"  - {h}:{port}\n" for h in hosts)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("api-faults")
    kubeapi = FakeKubeAPI(bookmark_interval=1.0)
    kubeapi.start()
    web = UpstreamServer(WEB, label="web").start()
    kubeapi.put_configmap(NS, NAME, _doc("a.test", port=web.port))
    front = FlakyFront((kubeapi.host, kubeapi.port))
    kubeconfig = kubeapi.write_kubeconfig(tmp / "kubeconfig", namespace=NS)
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = front.url  # the sidecar talks to the relay
    kubeconfig.write_text(yaml.safe_dump(config))
    sidecar = start_sidecar(
        tmp,
        hosts={"a.test": WEB, "b.test": WEB},
        args=[
            "--configmap",
            f"{NS}/{NAME}",
            "--kubeconfig",
            str(kubeconfig),
            "--allow-private-range",
            "127.0.0.0/8",
        ],
        env={"POD_NAME": "checkout-7d9f-abcde", "POD_NAMESPACE": NS},
    )
    yield World(kubeapi, front, sidecar, web)
    code = sidecar.stop()
    front.stop()
    web.stop()
    kubeapi.stop()
    assert code == 0, sidecar.stderr[-20:]


def _status(world: World, host: str) -> int:
    r = requests.get(
        f"http://{host}:{world.web.port}/x", proxies={"http": world.sidecar.proxy_url}, timeout=5
    )
    return r.status_code


def _version(world: World) -> str:
    return world.sidecar.policy_version()


@pytest.mark.parametrize("status", [500, 429])
def test_api_errors_keep_the_last_good_policy_and_recover(world: World, status: int) -> None:
    port = world.web.port
    good = world.kubeapi.put_configmap(NS, NAME, _doc("a.test", port=port))
    wait_until(lambda: good in _version(world), timeout=10)
    before = world.front.answered
    world.front.fail_with(status)  # the open watch is cut and every new request gets `status`
    edited = world.kubeapi.put_configmap(NS, NAME, _doc("b.test", port=port))
    started = time.monotonic()
    decided: list[tuple[int, int, int]] = []  # (a.test, b.test, readiness) during the outage
    # At least OUTAGE seconds, and until the sidecar has met the error twice (a watcher still
    # backing off from an earlier failure may take a few seconds to come back), at most 20 s.
    while time.monotonic() - started < 20 and (
        time.monotonic() - started < OUTAGE or world.front.answered - before < 2
    ):
        decided.append(
            (
                _status(world, "a.test"),
                _status(world, "b.test"),
                world.sidecar.health("/healthz/ready")[0],
            )
        )
        time.sleep(0.2)
    errors = world.front.answered - before
    outage = time.monotonic() - started
    world.front.fail_with(None)
    recovered = time.monotonic()
    wait_until(lambda: edited in _version(world), timeout=15)
    took = time.monotonic() - recovered
    print(
        f"\nAPI {status} for {outage:.1f} s: {errors} requests answered {status}, "
        f"{len(decided)} calls decided by the last good version, edit applied {took:.1f} s "
        "after recovery"
    )
    # The last good version decided every call during the outage; the pod stayed ready.
    assert set(decided) == {(200, 403, 200)}, set(decided)
    # The sidecar came back for more (the watch was cut) but backed off: not a request storm.
    assert 2 <= errors <= 20, errors
    assert took < 10, took
    assert (_status(world, "a.test"), _status(world, "b.test")) == (403, 200)
