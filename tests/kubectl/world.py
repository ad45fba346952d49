"""A namespace `shop` in the API stand-in, with workloads whose injected pods' health ports are
served by real sidecars (started here, reading their allowlist ConfigMap from the stand-in), real
upstreams on loopback, and `kubectl-egress` run as the user runs it (a subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from sidecar.kubectl.cli import main as plugin_main
from tests.support.kubeapi import FakeKubeAPI
from tests.support.sidecar import BIN, Sidecar, sidecar_env, start_sidecar
from tests.support.upstream import UpstreamServer

NS = "shop"
# Upstreams on loopback addresses of their own, on fixed ports (below the ephemeral range, so
# no test's random port takes them) so that golden files hold them. The pods' sidecars let the
# guard step aside on 127.0.13.0/29 only: DB stays a private address, as a cluster-internal
# database would be.
WEB, API, CDN, DB = "127.0.13.3", "127.0.13.2", "127.0.13.4", "127.0.13.9"
# The upstreams' ports as the golden files and docs/kubectl-egress.md show them; each pytest-xdist
# worker serves them 10 higher per worker number (golden.normalize writes them back).
CANONICAL_PORTS = {"web": 18181, "api": 18182, "cdn": 18183, "db": 18184}
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
PORTS = {label: port + 10 * _WORKER for label, port in CANONICAL_PORTS.items()}
PRIVATE_RANGE = "127.0.13.0/29"
HOSTS = {
    "web.test": WEB,
    "api.test": API,
    "img.cdn.test": CDN,
    "js.cdn.test": CDN,
    "css.cdn.test": CDN,
    "fonts.cdn.test": CDN,
    "db.test": DB,
    "never.test": API,
    # The names docs/kubectl-egress.md uses.
    "api.stripe.com": API,
    "api.github.com": API,
    "img.shopcdn.net": CDN,
    "js.shopcdn.net": CDN,
    "css.shopcdn.net": CDN,
    "db.shop.internal": DB,
}
STATUS = json.dumps(
    {
        "version": "0.1.0",
        "capture": "explicit",
        "allowlist": ["egress-allowlist"],
        "mode": "default",
    }
)


def deployment(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
            },
        },
    }


def pod(name: str, app: str, annotations: dict[str, str]) -> dict[str, Any]:
    containers = [{"name": "app", "image": "example/app:1"}]
    if "egress-sidecar.io/status" in annotations:
        containers.append({"name": "egress-sidecar", "image": "egress-sidecar:0.1.0"})
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app": app, "pod-template-hash": "7d9f"},
            "annotations": annotations,
        },
        "spec": {"containers": containers},
        "status": {"phase": "Running", "podIP": "10.244.0.7"},
    }


@dataclass
class World:
    api: FakeKubeAPI
    kubeconfig: Path
    workdir: Path
    web: UpstreamServer
    api_up: UpstreamServer
    cdn: UpstreamServer
    db: UpstreamServer
    sidecars: dict[str, Sidecar] = field(default_factory=dict)

    def allowlist(self, mode: str = "audit", extra: str = "") -> str:
        return f"mode: {mode}\nallow:\n  - host: web.test\n    ports: [{self.web.port}]\n{extra}"

    def add_injected_pod(
        self, name: str, app: str = "web", extra_args: tuple[str, ...] = ()
    ) -> Sidecar:
        sidecar = start_sidecar(
            self.workdir / name,
            hosts=HOSTS,
            args=[
                "--configmap",
                f"{NS}/egress-allowlist",
                "--kubeconfig",
                str(self.kubeconfig),
                "--allow-private-range",
                PRIVATE_RANGE,
                *extra_args,
            ],
            env={"POD_NAMESPACE": NS, "POD_NAME": name},
        )
        self.sidecars[name] = sidecar
        annotations = {"egress-sidecar.io/inject": "true", "egress-sidecar.io/status": STATUS}
        self.api.put_object("pods", pod(name, app, annotations))
        self.api.serve_pod_port(NS, name, 15021, f"http://127.0.0.1:{sidecar.health_port}")
        return sidecar

    def get(self, pod_name: str, url: str) -> int:
        proxy = self.sidecars[pod_name].proxy_url
        return requests.get(url, proxies={"http": proxy, "https": proxy}, timeout=10).status_code

    def connect(self, pod_name: str, authority: str) -> bytes:
        sock, head = self.sidecars[pod_name].connect_tunnel(authority)
        sock.close()
        return head.split(b"\r\n", 1)[0]

    def run(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl-egress ARGS` through the function its console script calls, in this process
        (the interpreter's start-up with the kubernetes client was most of each test's time):
        its exit status, stdout and stderr. ``run_process`` runs the installed script."""
        out, err = io.StringIO(), io.StringIO()
        overrides = {"KUBECONFIG": str(self.kubeconfig), **(env or {})}
        saved = {key: os.environ.get(key) for key in overrides}
        os.environ.update(overrides)
        saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin or "")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = plugin_main(list(args))
                except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            sys.stdin = saved_stdin
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return subprocess.CompletedProcess(
            ["kubectl-egress", *args], code, out.getvalue(), err.getvalue()
        )

    def run_process(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl-egress ARGS` as the user runs it: the installed script, a process of its
        own."""
        return subprocess.run(
            [str(BIN / "kubectl-egress"), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
            env=sidecar_env({"KUBECONFIG": str(self.kubeconfig), **(env or {})}),
            check=False,
        )

    def stop(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.stop()
        for up in (self.web, self.api_up, self.cdn, self.db):
            up.stop()
        self.api.stop()


def build_world(workdir: Path) -> World:
    api = FakeKubeAPI()
    api.start()
    kubeconfig = api.write_kubeconfig(workdir / "kubeconfig", namespace=NS)
    ups = [
        UpstreamServer(addr, PORTS[label], label=label).start()
        for addr, label in ((WEB, "web"), (API, "api"), (CDN, "cdn"), (DB, "db"))
    ]
    world = World(api, kubeconfig, workdir, ups[0], ups[1], ups[2], ups[3])
    api.put_object("namespaces", {"metadata": {"name": NS}})
    api.put_configmap(NS, "egress-allowlist", {"allowlist.yaml": world.allowlist()})
    api.put_object("deployments", deployment("web", {"egress-sidecar.io/inject": "true"}))
    api.put_object("deployments", deployment("legacy", {"egress-sidecar.io/inject": "true"}))
    api.put_object("deployments", deployment("plain"))
    api.put_object("pods", pod("legacy-7d9f-aaaaa", "legacy", {"egress-sidecar.io/inject": "true"}))
    api.put_object("pods", pod("plain-7d9f-bbbbb", "plain", {}))
    return world
