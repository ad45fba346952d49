"""--configmap [NAMESPACE/]NAME[,...] parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.k8s.refs import ConfigMapRef, ConfigMapRefError, parse_ref, parse_refs

LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("egress-allowlist", "shop", ConfigMapRef("shop", "egress-allowlist")),
        ("other/egress-allowlist", "shop", ConfigMapRef("other", "egress-allowlist")),
        (" prod/a.b ", None, ConfigMapRef("prod", "a.b")),
    ],
)
def test_valid_refs(text: str, default: str | None, expected: ConfigMapRef) -> None:
    assert parse_ref(text, default) == expected


@pytest.mark.parametrize(
    ("text", "default", "reason"),
    [
        ("name", None, "namespace"),
        ("a/b/c", "x", "more than one '/'"),
        ("/name", "x", "empty namespace"),
        ("ns/", "x", "empty name"),
        ("NS/name", "x", "DNS-1123 label"),
        ("ns/Name", "x", "DNS-1123 subdomain"),
        ("ns/-a", "x", "DNS-1123 subdomain"),
        ("ns/" + "a" * 254, "x", "DNS-1123 subdomain"),
    ],
)
def test_invalid_refs_name_the_entry(text: str, default: str | None, reason: str) -> None:
    with pytest.raises(ConfigMapRefError, match=reason) as info:
        parse_ref(text, default)
    assert info.value.text == text


def test_lists_split_commas_and_drop_duplicates() -> None:
    refs = parse_refs(["a,shop/a, b", "other/c,"], "shop")
    assert refs == (
        ConfigMapRef("shop", "a"),
        ConfigMapRef("shop", "b"),
        ConfigMapRef("other", "c"),
    )
    assert refs[0].source == "configmap:shop/a"


@given(LABEL, LABEL)
def test_round_trip(namespace: str, name: str) -> None:
    ref = parse_ref(f"{namespace}/{name}", None)
    assert parse_ref(str(ref), "elsewhere") == ref
    assert parse_ref(name, namespace) == ref
