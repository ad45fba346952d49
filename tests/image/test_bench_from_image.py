"""`make bench-image`'s sidecar: the bench starts the image's own sidecar chrooted into the
image's filesystem (its interpreter, its code), and it serves through it as a pod's would."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from bench.configs import UpstreamPorts
from bench.servers import start_sidecar
from tests.image.runtime import mounted_rootfs
from tests.image.test_pod_from_image import IMAGE
from tests.support.upstream import UpstreamServer


def test_the_bench_runs_the_image_sidecar(tmp_path: Path) -> None:
    upstream = UpstreamServer("127.0.0.1").start()
    try:
        with mounted_rootfs(IMAGE, f"egress-bench-{os.getpid()}") as root:
            ports = UpstreamPorts(http=upstream.port, https=upstream.port)
            allowlist = f"allow:\n  - cidr: 127.0.0.1/32\n    ports: [{upstream.port}]\n"
            sidecar = start_sidecar((), tmp_path / "sidecar", ports, allowlist=allowlist, root=root)
            try:
                exe = Path(os.readlink(f"/proc/{sidecar.server.proc.pid}/exe"))
                # The image's interpreter (Debian's), not this venv's.
                assert str(exe).startswith(str(root)) and exe.name.startswith("python3")
                proxies = {"http": f"http://127.0.0.1:{sidecar.port}"}
                answer = requests.get(
                    f"http://127.0.0.1:{upstream.port}/bench", proxies=proxies, timeout=10
                )
                assert answer.status_code == 200
                denied = requests.get("http://127.0.0.1:1/", proxies=proxies, timeout=10)
                assert denied.status_code == 403
            finally:
                sidecar.server.stop()
    finally:
        upstream.stop()
    assert upstream.seen.requests and upstream.seen.requests[-1]["path"] == "/bench"
    decisions = (tmp_path / "sidecar" / "decisions.jsonl").read_text()
    assert '"decision":"allow"' in decisions and '"decision":"deny"' in decisions
