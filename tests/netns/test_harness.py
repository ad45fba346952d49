"""The namespace harness itself: teardown, stale-run reaping, UID switching, address guard."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.netns.conftest import APP_UID
from tests.support import netns as h


def _names() -> set[str]:
    return {line.split()[0] for line in h.sh(["ip", "netns", "list"]).splitlines() if line}


def test_close_kills_processes_and_removes_namespaces(reaped: list[str]) -> None:
    w = h.create_world()
    proc = w.pod.popen(["sleep", "60"], output=w.workdir / "sleep.out")
    # A process started in the namespace some other way is found through `ip netns pids`.
    stray = subprocess.Popen(["ip", "netns", "exec", w.outside.name, "sleep", "60"])
    time.sleep(0.2)
    assert {w.pod.name, w.outside.name} <= _names()
    w.close()
    assert not {w.pod.name, w.outside.name} & _names()
    assert proc.poll() is not None
    stray.wait(5)
    assert not w.workdir.exists()


def test_stale_namespaces_of_a_dead_run_are_reaped(reaped: list[str]) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{h.PREFIX}{dead.pid}-dead00-pod"
    h.sh(["ip", "netns", "add", name])
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        time.sleep(0.2)
        live = f"{h.PREFIX}{os.getpid()}-live00-pod"  # our own run: must be left alone
        h.sh(["ip", "netns", "add", live])
        try:
            assert name in h.reap_stale()
            assert name not in _names() and live in _names()
            sleeper.wait(5)
            assert sleeper.returncode is not None
        finally:
            h.sh(["ip", "netns", "del", live], check=False)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        h.sh(["ip", "netns", "del", name], check=False)


def test_commands_run_as_the_given_uid_without_proxy_variables(world: h.World) -> None:
    os.environ["HTTPS_PROXY"] = "http://127.0.0.1:9"
    try:
        out = world.pod.ok(
            [sys.executable, "-c", "import os; print(os.getuid(), os.getgid(), os.getgroups(),"
             " sorted(k for k in os.environ if 'proxy' in k.lower()))"],
            uid=APP_UID,
        )  # fmt: skip
    finally:
        del os.environ["HTTPS_PROXY"]
    assert out.strip() == f"{APP_UID} {APP_UID} [] []"


def test_the_pod_sees_only_its_own_interfaces(world: h.World) -> None:
    out = world.pod.ok(["ip", "-o", "addr", "show"])
    assert h.POD4 in out and h.POD6 in out
    assert all(addr not in out for addr in h.OUT4)


def test_binds_give_one_process_its_own_hosts_file(world: h.World) -> None:
    hosts = h.hosts_file(world.workdir / "hosts-test", {"only-here.test": "198.18.0.9"})
    resolv = h.resolv_conf(world.workdir / "resolv-test")  # DNS on loopback: nothing leaves
    binds = {"/etc/hosts": hosts, "/etc/resolv.conf": resolv}
    out = world.pod.ok(["getent", "hosts", "only-here.test"], binds=binds)
    assert out.split()[0] == "198.18.0.9"
    plain = world.pod.run(
        ["getent", "hosts", "only-here.test"], binds={"/etc/resolv.conf": resolv}, timeout=10
    )
    assert plain.returncode != 0  # the machine's /etc/hosts is untouched


@pytest.mark.parametrize("addr", ["10.0.0.1", "8.8.8.8", "2001:db8::1"])
def test_only_test_ranges_are_accepted(addr: str) -> None:
    with pytest.raises(h.HarnessError, match="outside"):
        h._check_address(addr)
