"""HTTPS inspection in transparent capture: iptables from `egress-sidecar iptables apply`, the
sidecar as UID 1337 in the pod namespace with the egress CA, the app as another UID with no
proxy variables, trusting the egress CA; the outside HTTPS servers have their own chain, which
the sidecar verifies (--inspect-upstream-ca-file)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.netns.conftest import APP_UID, iptables
from tests.support import netns as h
from tests.support.netns import OUT4
from tests.support.tls import TestCA

API4, PLAIN4, _ = OUT4
EGRESS_CA_NAME = "egress-sidecar netns inspection CA"

ALLOWLIST = """\
allow:
  - {host: api.inspected.test, inspect: true, methods: [GET], paths: ["/v1/*"]}
  - plain.test
"""
HOSTS = {"api.inspected.test": API4, "plain.test": PLAIN4}


@dataclass
class Pod:
    world: h.World
    certs: h.Certs
    upstream: h.Upstream
    out: Path
    egress_ca: Path

    def curl(self, *args: str) -> tuple[int, str, str]:
        return h.pod_curl(self.world, args, uid=APP_UID)

    def s_client(self, addr: str, sni: str, cafile: Path) -> str:
        argv = ["openssl", "s_client", "-connect", f"{addr}:443", "-servername", sni]
        argv += ["-showcerts", "-CAfile", str(cafile), "-verify_return_error"]
        proc = self.world.pod.run(argv, uid=APP_UID, timeout=15, input="")
        return proc.stdout + proc.stderr

    def requests(self, mark: int) -> list[dict[str, Any]]:
        return [r for r in self.upstream.since(mark) if r["event"] == "request"]

    def decision(self, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [d for d in h.decisions(self.out) if predicate(d)]
            if found:
                return found[-1]
            time.sleep(0.1)
        raise AssertionError(f"no such decision in {h.decisions(self.out)[-10:]}")


@pytest.fixture(scope="module")
def pod(world: h.World) -> Iterator[Pod]:
    w = world
    certs = h.make_certs(w.workdir, list(HOSTS), [API4, PLAIN4])
    upstream = w.start_servers(w.outside, "outside", certs, https=[f"{API4}:443", f"{PLAIN4}:443"])
    egress = TestCA(EGRESS_CA_NAME)
    # The Secret egress-ca as mounted into the sidecar container (readable by UID 1337 only
    # would be the pod's way; the test directory is world-readable).
    ca_dir = egress.write_tls_dir(w.workdir / "egress-ca")
    for path in (ca_dir, *ca_dir.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    egress_ca = egress.write_ca(w.workdir / "egress-ca.pem")
    egress_ca.chmod(0o644)
    proc = iptables(w, "apply")
    assert proc.returncode == 0, proc.stderr
    sidecar = h.start_pod_sidecar(
        w,
        ALLOWLIST,
        HOSTS,
        extra=[
            "--inspect-ca-dir",
            str(ca_dir),
            "--inspect-upstream-ca-file",
            str(certs.ca_pem),
        ],
    )
    yield Pod(w, certs, upstream, sidecar.out, egress_ca)


def test_allowed_request_inside_inspected_tls(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl(
        "--cacert",
        str(pod.egress_ca),
        "--resolve",
        f"api.inspected.test:443:{API4}",
        "https://api.inspected.test/v1/items",
    )
    assert code == 0, err
    answer = json.loads(body)
    assert answer["local"] == f"{API4}:443" and answer["host"] == "api.inspected.test"
    assert [r["target"] for r in pod.requests(mark)] == ["/v1/items"]
    line = pod.decision(lambda d: d.get("url") == "https://api.inspected.test/v1/items")
    assert line["capture"] == "transparent" and line["inspected"] is True
    assert line["decision"] == "allow" and line["method"] == "GET"
    channel = pod.decision(
        lambda d: d["protocol"] == "TLS" and d.get("host") == "api.inspected.test"
    )
    assert channel["inspected"] is True


def test_denied_method_is_403_inside_tls_and_never_sent(pod: Pod) -> None:
    mark = pod.upstream.mark()
    code, body, err = pod.curl(
        "-i",
        "-X",
        "POST",
        "--cacert",
        str(pod.egress_ca),
        "--resolve",
        f"api.inspected.test:443:{API4}",
        "https://api.inspected.test/v1/items",
    )
    assert code == 0, err
    head = body.lower()
    assert head.startswith(("http/1.1 403", "http/2 403")), body
    assert "x-egress-decision: deny" in head
    time.sleep(0.3)
    assert pod.requests(mark) == []


def test_leaf_is_the_egress_cas(pod: Pod) -> None:
    out = pod.s_client(API4, "api.inspected.test", pod.egress_ca)
    assert "Verify return code: 0 (ok)" in out, out
    leaf = h.pem_certificates(out)[0]
    issuer = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert issuer == EGRESS_CA_NAME


def test_a_host_not_inspected_shows_the_upstreams_own_certificate(pod: Pod) -> None:
    out = pod.s_client(PLAIN4, "plain.test", pod.certs.ca_pem)
    assert "Verify return code: 0 (ok)" in out, out
    leaf = h.pem_certificates(out)[0]
    assert leaf.fingerprint(hashes.SHA256()).hex() == pod.certs.leaf_der_sha256
    line = pod.decision(lambda d: d["protocol"] == "TLS" and d.get("host") == "plain.test")
    assert "inspected" not in line and line["decision"] == "allow"


def test_ca_missing_denies_the_inspected_sni_only(fresh_world: h.World) -> None:
    w = fresh_world
    certs = h.make_certs(w.workdir, list(HOSTS), [API4, PLAIN4])
    upstream = w.start_servers(w.outside, "outside", certs, https=[f"{API4}:443", f"{PLAIN4}:443"])
    assert iptables(w, "apply").returncode == 0
    sidecar = h.start_pod_sidecar(
        w, ALLOWLIST, HOSTS, extra=["--inspect-ca-dir", str(w.workdir / "no-ca")]
    )
    pod = Pod(w, certs, upstream, sidecar.out, certs.ca_pem)
    mark = upstream.mark()
    code, _, err = pod.curl(
        "--cacert",
        str(certs.ca_pem),
        "--resolve",
        f"api.inspected.test:443:{API4}",
        "https://api.inspected.test/v1/items",
    )
    assert code != 0, err  # closed before any byte reached the destination
    line = pod.decision(lambda d: d.get("host") == "api.inspected.test")
    assert (line["decision"], line["reason"]) == ("deny", "inspection CA not available")
    time.sleep(0.3)
    assert not [r for r in upstream.since(mark) if r["local"] == f"{API4}:443"]
    out = pod.s_client(PLAIN4, "plain.test", certs.ca_pem)
    assert "Verify return code: 0 (ok)" in out, out
