"""A pod from the built image: a Deployment goes through `egress-injector inject`; then, from the
image `make image` built (tests/image/runtime.py), `egress-init` installs the capture rules with
the image's own iptables (nft backend), `egress-sidecar` starts as UID 1337 on a read-only root and
its startupProbe is polled as the kubelet does, and an app container (the same image's python3,
another UID) calls an allowed and a denied host through the transparent capture. The allowlist
comes from a ConfigMap of the fake API server; spans go to an OTLP receiver outside the pod.

Not part of the default `make test` run (it needs the image): `make image-test` builds the image
(from the layer cache when nothing changed) and runs this directory; `.ci/run` calls it. An
absent image is a failure here, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from injector.config import DEFAULT_IMAGE
from tests.image.runtime import ImagePodRunner, image_config, mounted_rootfs, started_ready
from tests.support import netns as h
from tests.support.injection import cluster_env, deployment, inject, service_account, start_api
from tests.support.netns import OUT4, POD4
from tests.support.netns_pod import in_netns
from tests.support.otlp import STATUS_ERROR, OtlpHttpReceiver, span_on

IMAGE = os.environ.get("EGRESS_IMAGE", DEFAULT_IMAGE)
WEB4, OTHER4, _ = OUT4
NAMESPACE, POD_NAME, NODE = "shop", "web-7d4b9c-x2x7q", "node-a"
APP_UID = 4242
CA_IN_POD = "/etc/egress-test/ca.pem"
# Start-to-ready of the sidecar from the image (process start → first 2xx of its startupProbe).
# Measured here on 2 cores shared with other test runs (load average 5-8), six runs of 3-4
# starts: 1.7-7.2 s per start, medians 2.4-6.4 s; importing the sidecar's modules alone took
# 3.6-5.0 s from the image and 4.1-6.2 s from the host's venv under that load. The budget is for
# such a machine; that the image never compiles a module at start (the regression that costs
# seconds) is checked exactly by test_the_image_imports_only_byte_compiled_modules.
READY_BUDGET_S = 10.0

ALLOWLIST = """\
allow:
  - web.test
privateRanges:
  - 198.18.0.0/15
"""

# The app: Python's urllib (a real HTTP/TLS client) from the image, no proxy settings: only the
# transparent capture stands between it and the destinations. One JSON line per call.
APP = """\
import json, ssl, urllib.error, urllib.request
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}),
    urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=CA)),
)
def call(name, url):
    out = {"call": name}
    try:
        with opener.open(url, timeout=10) as r:
            out.update(status=r.status, body=r.read().decode())
    except urllib.error.HTTPError as e:
        out.update(status=e.code, headers=dict(e.headers), body=e.read().decode())
    except OSError as e:
        out.update(error=type(e).__name__ + ": " + str(e))
    print(json.dumps(out), flush=True)
call("allowed", "http://web.test/app")
call("denied", "http://denied.test/app")
call("allowed-tls", "https://web.test/app")
call("denied-tls", "https://denied.test/app")
"""


def manifest() -> str:
    return deployment(
        NAMESPACE,
        {
            "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
            "containers": [
                {
                    "name": "app",
                    "image": IMAGE,
                    "command": ["python3", "-c", f"CA = {CA_IN_POD!r}\n{APP}"],
                }
            ],
        },
    )


@dataclass
class Pod:
    runner: ImagePodRunner
    spec: dict[str, Any]
    upstream: h.Upstream
    receiver: OtlpHttpReceiver
    init: subprocess.CompletedProcess[str]
    sidecar: subprocess.Popen[bytes]
    ready_s: float
    app: subprocess.CompletedProcess[str]
    sidecar_out: Path

    def calls(self) -> dict[str, dict[str, Any]]:
        return {d["call"]: d for d in map(json.loads, self.app.stdout.splitlines())}

    def decisions(self) -> list[dict[str, Any]]:
        return h.decisions(self.sidecar_out)


@pytest.fixture(scope="module")
def pod(reaped: list[str]) -> Iterator[Pod]:
    config = image_config(IMAGE)  # fails (does not skip) when the image was not built
    image_env = dict(e.split("=", 1) for e in config.get("Env", []))
    w = h.create_world()
    try:
        yield from _pod(w, image_env, config.get("User", ""))
    finally:
        w.close()


def _pod(w: h.World, image_env: dict[str, str], image_user: str) -> Iterator[Pod]:
    certs = h.make_certs(w.workdir, ["web.test", "denied.test"], [WEB4, OTHER4])
    upstream = w.start_servers(
        w.outside,
        "outside",
        certs,
        http=[f"{WEB4}:80", f"{OTHER4}:80"],
        https=[f"{WEB4}:443", f"{OTHER4}:443"],
    )
    receiver = in_netns(w.outside.name, lambda: OtlpHttpReceiver(host=OTHER4))
    api = in_netns(w.pod.name, lambda: start_api(w.workdir))
    try:
        api.put_configmap(NAMESPACE, "egress-allowlist", {"allowlist.yaml": ALLOWLIST})
        spec = inject(w.workdir, manifest(), {"otelEnv": receiver.exporter_env, "image": IMAGE})
        sa = service_account(w.workdir, api, NAMESPACE)
        names = [c["name"] for c in [*spec["initContainers"], *spec["containers"]]]
        assert names == ["egress-init", "egress-sidecar", "app"], names
        with (
            mounted_rootfs(IMAGE, f"{w.pod.name}-init") as init_root,
            mounted_rootfs(IMAGE, f"{w.pod.name}-sidecar") as sidecar_root,
            mounted_rootfs(IMAGE, f"{w.pod.name}-app") as app_root,
        ):
            runner = ImagePodRunner(
                w,
                spec,
                POD_NAME,
                NAMESPACE,
                NODE,
                POD4,
                files={
                    "/etc/hosts": h.hosts_file(
                        w.workdir / "hosts", {"web.test": WEB4, "denied.test": OTHER4}
                    ),
                    "/etc/resolv.conf": h.resolv_conf(w.workdir / "resolv.conf"),
                    CA_IN_POD: certs.ca_pem,
                },
                service_account=sa,
                cluster_env=cluster_env(api),
                image_env=image_env,
                image_user=image_user,
                roots={"egress-init": init_root, "egress-sidecar": sidecar_root, "app": app_root},
            )
            # The kubelet's order: egress-init to completion, the native sidecar until its
            # startupProbe passes, then the app.
            init = runner.run("egress-init")
            assert init.returncode == 0, init.stdout + init.stderr
            out = w.workdir / "sidecar.out"
            sidecar, ready_s = started_ready(runner, "egress-sidecar", out, 30)
            app = runner.run("app")
            yield Pod(runner, spec, upstream, receiver, init, sidecar, ready_s, app, out)
            w.pod.kill_all()  # before the root filesystems are unmounted
    finally:
        api.stop()
        receiver.stop()


def _container_pid(launcher: subprocess.Popen[bytes]) -> int:
    """The container's process: the child of `unshare --fork` (PID 1 of its PID namespace)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    (pid,) = map(int, children)
    return pid


def test_the_injected_spec_names_the_built_image(pod: Pod) -> None:
    images = {c["image"] for c in [*pod.spec["initContainers"], *pod.spec["containers"]]}
    assert images == {IMAGE}


def test_egress_init_applies_the_rules_with_the_images_iptables(pod: Pod) -> None:
    assert "capture rules applied" in pod.init.stderr, pod.init.stderr
    # read back with this machine's iptables-nft: the image's iptables wrote nftables rules
    save = pod.runner.world.pod.ok(["iptables-nft-save", "-t", "nat"])
    assert "-A EGRESS_SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN" in save
    assert "-j REDIRECT --to-ports 15002" in save


def test_the_sidecar_runs_as_1337_without_capabilities_on_a_read_only_root(pod: Pod) -> None:
    pid = _container_pid(pod.sidecar)
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["1337"] * 4
    assert status["Gid"].split() == ["1337"] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
    # its root is the image (Debian 13's python3.13 behind the venv), mounted read-only
    exe = os.readlink(f"/proc/{pid}/exe")
    assert re.fullmatch(
        r"/usr/bin/python3\.13", exe.removeprefix(str(pod.runner.roots["egress-sidecar"]))
    )
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    (root,) = [m.split() for m in mounts if m.split()[4] == "/"]
    assert "ro" in root[5].split(",")
    (tmp,) = [m.split() for m in mounts if m.split()[4] == "/tmp"]
    assert "rw" in tmp[5].split(",")


IMPORT_CHECK = """\
import importlib.util, json, os, sys
import sidecar.cli, sidecar.commands.run, injector.cli, kubernetes.client, mitmproxy.master
missing = sorted(
    m.__file__ for m in list(sys.modules.values())
    if (getattr(m, "__file__", None) or "").endswith(".py")
    and not os.path.exists(importlib.util.cache_from_source(m.__file__))
)
print(json.dumps(missing))
"""


def test_the_image_imports_only_byte_compiled_modules(pod: Pod) -> None:
    """The root is read-only and PYTHONDONTWRITEBYTECODE is set: a module without its .pyc in
    the image is compiled again at every start. None may be missing, stdlib included."""
    env = {**pod.runner.image_env, "HOME": "/"}
    root = str(pod.runner.roots["app"])
    proc = subprocess.run(
        ["chroot", "--userspec=1337:1337", root, "python3", "-c", IMPORT_CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_start_to_ready_within_budget(pod: Pod) -> None:
    print(f"sidecar start-to-ready from the image: {pod.ready_s:.2f} s")
    assert pod.ready_s < READY_BUDGET_S


def test_the_app_is_captured_and_decided(pod: Pod) -> None:
    assert pod.app.returncode == 0, pod.app.stderr
    calls = pod.calls()
    assert calls["allowed"]["status"] == 200, calls
    assert calls["allowed-tls"]["status"] == 200, calls
    denied = calls["denied"]
    assert denied["status"] == 403, calls
    headers = {k.lower(): v for k, v in denied["headers"].items()}
    assert headers["x-egress-decision"] == "deny"
    assert headers["x-egress-reason"] == "no allow rule matches"
    body = denied["body"].strip()
    assert "\n" not in body and "denied.test" in body and "no allow rule matches" in body
    assert "error" in calls["denied-tls"] and "status" not in calls["denied-tls"], calls
    # nothing reached the denied destination, the allowed one was served
    locals_ = {r["local"] for r in pod.upstream.records() if r["event"] == "request"}
    assert f"{WEB4}:80" in locals_ and f"{WEB4}:443" in locals_
    assert not any(r.get("local", "").startswith(f"{OTHER4}:") for r in pod.upstream.records())


def test_decisions_and_spans(pod: Pod) -> None:
    by = {(d.get("host"), d["protocol"]): d["decision"] for d in pod.decisions()}
    assert by[("web.test", "GET")] == "allow"
    assert by[("denied.test", "GET")] == "deny"
    assert by[("web.test", "TLS")] == "allow"
    assert by[("denied.test", "TLS")] == "deny"
    sink = pod.receiver.sink

    (allowed,) = sink.wait_for(span_on("web.test", "GET"))[-1:]
    (denied,) = sink.wait_for(span_on("denied.test", "GET"))[-1:]
    (denied_tls,) = sink.wait_for(span_on("denied.test", "TLS"))[-1:]
    assert allowed.attributes["egress.decision"] == "allow"
    for span in (denied, denied_tls):
        assert span.attributes["egress.decision"] == "deny"
        assert span.attributes["error.type"] == "egress_denied"
        assert span.status_code == STATUS_ERROR
    for span in (allowed, denied, denied_tls):
        assert span.attributes["egress.capture"] == "transparent"
        assert span.attributes["egress.policy.source"] == f"configmap:{NAMESPACE}/egress-allowlist"
        assert span.resource["service.name"] == "web"
        assert span.resource["k8s.pod.name"] == POD_NAME


def test_start_to_ready_median_of_restarts(pod: Pod) -> None:
    """Two more starts of the sidecar container from the image (after the pod's own), each
    until its startupProbe passes; the median is within the budget."""
    times = [pod.ready_s]
    for i in range(2):
        os.killpg(pod.sidecar.pid, signal.SIGTERM)  # its process group, as the runtime stops it
        pod.sidecar.wait(10)
        h.wait_for(lambda: not pod.runner.probe("egress-sidecar", "startupProbe"), 10, "stop")
        out = pod.sidecar_out.with_name(f"sidecar-{i}.out")
        pod.sidecar, ready_s = started_ready(pod.runner, "egress-sidecar", out, 30)
        times.append(ready_s)
    print(
        "start-to-ready (s): " + ", ".join(f"{t:.2f}" for t in times),
        f"median {statistics.median(times):.2f}",
    )
    assert statistics.median(times) < READY_BUDGET_S
