"""The pieces of HTTPS inspection without a proxy: the CA check, the fail-closed decision without
it, and the leaf store's expiry."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from mitmproxy import certs

from sidecar.fastpath.vetting import Vetted, without_ca
from sidecar.inspection import InspectionCA
from sidecar.policy.model import Decision, Mode, Reason, Verdict
from sidecar.proxy.inspect_tls import LEAF_LIFETIME, LeafStore
from tests.support.tls import TestCA

ADDRESS = ipaddress.ip_address("203.0.113.7")
ALLOWED = Vetted(Decision(Verdict.ALLOW, Reason.MATCHED_ALLOW, "a.test"), ADDRESS)


def test_without_ca_denies_what_would_pass_and_audit_lets_it_through_uninspected() -> None:
    denied = without_ca(ALLOWED, "{host: a.test, inspect: true}", "no dir", Mode.ENFORCE)
    assert denied.decision.verdict is Verdict.DENY and denied.address is None
    assert denied.decision.reason is Reason.INSPECTION_CA_UNAVAILABLE
    assert (denied.decision.rule, denied.decision.detail) == (
        "{host: a.test, inspect: true}",
        "no dir",
    )
    audited = without_ca(ALLOWED, "r", "no dir", Mode.AUDIT)
    assert audited.decision.verdict is Verdict.AUDIT and audited.address == ADDRESS
    # A decision that already denies keeps its own reason (a deny rule says more).
    already = Vetted(Decision(Verdict.DENY, Reason.MATCHED_DENY, "a.test"), None)
    assert without_ca(already, "r", "no dir", Mode.ENFORCE) is already


def _write(directory: Path, cert: bytes, key: bytes) -> Path:
    directory.mkdir()
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    return directory


def test_ca_load_says_why_it_is_not_available(tmp_path: Path) -> None:
    ca, other = TestCA("inspection"), TestCA("other")
    good = InspectionCA.load(_write(tmp_path / "good", ca.cert_pem, ca.key_pem))
    assert good.available and good.subject == "CN=inspection" and good.problem is None
    missing = InspectionCA.load(tmp_path / "nowhere")
    assert not missing.available and missing.problem is not None
    assert missing.problem.endswith("nowhere does not exist")
    cases = {
        "mismatch": (ca.cert_pem, other.key_pem, "is not the key of tls.crt"),
        "garbage": (b"not pem", ca.key_pem, "tls.crt is not a PEM certificate"),
        "leaf": (ca.issue("a.test").cert_pem, ca.issue("a.test").key_pem, ""),
    }
    for name, (cert, key, why) in cases.items():
        loaded = InspectionCA.load(_write(tmp_path / name, cert, key))
        assert not loaded.available, name
        assert loaded.problem is not None and why in loaded.problem, loaded.problem
    leaf = InspectionCA.load(tmp_path / "leaf")
    assert leaf.problem is not None  # a leaf's key is not the leaf's: mismatch or not a CA
    unreadable = tmp_path / "nokey"
    unreadable.mkdir()
    (unreadable / "tls.crt").write_bytes(ca.cert_pem)
    problem = InspectionCA.load(unreadable).problem
    assert problem is not None and problem.startswith("cannot read the CA")
    no_upstream = InspectionCA.load(tmp_path / "good", tmp_path / "missing.pem")
    assert not no_upstream.available and "upstream CA file" in (no_upstream.problem or "")


def test_leaves_are_short_lived_cached_and_issued_again_near_their_end(tmp_path: Path) -> None:
    ca = TestCA("inspection")
    store = LeafStore.from_ca(
        InspectionCA.load(_write(tmp_path / "ca", ca.cert_pem, ca.key_pem)), tmp_path
    )
    first = store.get_cert("a.test", [x509.DNSName("a.test")])
    left = first.cert.notafter - dt.datetime.now(dt.UTC)
    assert LEAF_LIFETIME - dt.timedelta(minutes=1) < left <= LEAF_LIFETIME
    assert store.get_cert("a.test", [x509.DNSName("a.test")]) is first  # cached
    # An entry close to its end (the test CA's leaf has a day left; renewal patched to two) is
    # replaced by a fresh one.
    old = certs.CertStoreEntry(
        certs.Cert.from_pem(ca.issue("b.test").cert_pem), first.privatekey, None, []
    )
    key = ("b.test", x509.GeneralNames([x509.DNSName("b.test")]))
    store.certs[key] = old
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sidecar.proxy.inspect_tls.LEAF_RENEW_BEFORE", dt.timedelta(days=2))
        fresh = store.get_cert("b.test", [x509.DNSName("b.test")])
    assert fresh is not old and fresh.cert.serial != old.cert.serial
