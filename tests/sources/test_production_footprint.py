"""The sidecar in its production configuration imports only what that configuration uses.

`egress-sidecar run --configmap NS/NAME` as a real process, configured in-cluster (service
account token and CA over HTTPS, against the test API server), exporting spans over OTLP
http/protobuf to a local receiver. It must enforce the ConfigMap, export a span, and never load
the official ``kubernetes`` client (~20 MiB), ``grpc`` (the gRPC exporter's), or ``requests``
(the OTLP exporter's default transport). Python's own import log (PYTHONPROFILEIMPORTTIME) says
what was imported, the process's memory map what native code was loaded. RSS is printed, not
asserted (too noisy for a test; issue 9's bench measures it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.faults import rss_bytes
from tests.support.kubeapi import FakeKubeAPI, wait_until
from tests.support.otlp import OtlpHttpReceiver
from tests.support.sidecar import Sidecar, start_sidecar

NS, NAME = "shop", "egress-allowlist"
NEVER_IMPORTED = ("kubernetes", "grpc", "requests", "urllib3")


@dataclass
class Production:
    sidecar: Sidecar
    kubeapi: FakeKubeAPI
    receiver: OtlpHttpReceiver


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    tmp = tmp_path_factory.mktemp("footprint")
    kubeapi = FakeKubeAPI(tls=True, workdir=tmp / "pki", token="sa-token")
    kubeapi.start()
    kubeapi.put_configmap(NS, NAME, {"allowlist.yaml": "allow:\n  - api.example.test:443\n"})
    sa = tmp / "serviceaccount"
    sa.mkdir()
    assert kubeapi.ca_path is not None
    shutil.copy(kubeapi.ca_path, sa / "ca.crt")
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text(NS)
    receiver = OtlpHttpReceiver()
    sidecar = start_sidecar(
        tmp,
        args=["--configmap", f"{NS}/{NAME}"],
        env={
            **receiver.exporter_env,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(kubeapi.port),
            "EGRESS_SERVICEACCOUNT_DIR": str(sa),
            "PYTHONPROFILEIMPORTTIME": "1",  # every import, on stderr
        },
    )
    yield Production(sidecar, kubeapi, receiver)
    code = sidecar.stop()
    receiver.stop()
    kubeapi.stop()
    assert code == 0, sidecar.stderr[-20:]


def imported(sidecar: Sidecar) -> set[str]:
    """Modules the process imported so far, from its import-time log."""
    names = set()
    for line in list(sidecar.stderr):
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the log's header line
                names.add(name)
    return names


def test_the_production_configuration_loads_no_unused_library(production: Production) -> None:
    sidecar, kubeapi, receiver = production.sidecar, production.kubeapi, production.receiver
    assert "/egress-sidecar" in Path(f"/proc/{sidecar.proc.pid}/cmdline").read_text()
    # It works: the ConfigMap's allowlist is enforced (read in-cluster over HTTPS with the
    # token), and the denial's span reaches the collector over OTLP/HTTP.
    status = sidecar.health("/healthz/ready")
    assert status[0] == 200 and f"configmap:{NS}/{NAME}" in status[1]
    assert all((r.authorization or "").lower() == "bearer sa-token" for r in kubeapi.requests), (
        kubeapi.requests
    )
    denied = requests.get(
        "http://denied.example.test/", proxies={"http": sidecar.proxy_url}, timeout=10
    )
    assert denied.status_code == 403
    (span,) = receiver.sink.wait_for(lambda s: s.attributes.get("egress.decision") == "deny")
    assert span.resource.get("service.name")
    # What it loaded to do so.
    modules = imported(sidecar)
    assert "sidecar.k8s.watch" in modules and "sidecar.telemetry.lean" in modules
    unwanted = sorted(m for m in modules if m.split(".")[0] in NEVER_IMPORTED)
    assert unwanted == [], unwanted
    maps = Path(f"/proc/{sidecar.proc.pid}/maps").read_text()
    native = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    assert not [path for path in native if "grpc" in path], native
    rss = rss_bytes(sidecar.proc.pid) / 2**20
    mitmproxy = any(m.split(".")[0] == "mitmproxy" for m in modules)
    print(
        f"\nsidecar idle in the production configuration: RSS {rss:.1f} MiB, "
        f"{len(modules)} modules imported (mitmproxy {'loaded' if mitmproxy else 'not loaded'})"
    )


def test_an_edit_arrives_on_the_watch_already_open(production: Production) -> None:
    """A new version still arrives over the same production path (watch, not polling)."""
    kubeapi, sidecar = production.kubeapi, production.sidecar
    watches = kubeapi.watch_count()
    rv = kubeapi.put_configmap(NS, NAME, {"allowlist.yaml": "allow:\n  - b.example.test:443\n"})
    wait_until(lambda: rv in sidecar.policy_version(), timeout=10)
    assert kubeapi.watch_count() == watches  # delivered on the watch already open
