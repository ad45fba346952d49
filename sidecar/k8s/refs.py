"""``[namespace/]name`` references to ConfigMaps, as given by --configmap and the annotation."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# DNS-1123: a namespace is a label, a ConfigMap name a subdomain.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class ConfigMapRefError(ValueError):
    """A --configmap entry that is not ``[namespace/]name``; names the entry at fault."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid ConfigMap reference {text!r}: {reason}")


@dataclass(frozen=True, slots=True, order=True)
class ConfigMapRef:
    namespace: str
    name: str

    @property
    def source(self) -> str:
        """The policy source name on spans, logs and metrics (DESIGN: configmap:ns/name)."""
        return f"configmap:{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_ref(text: str, default_namespace: str | None) -> ConfigMapRef:
    entry = text.strip()
    namespace, sep, name = entry.rpartition("/")
    if not sep:
        if default_namespace is None:
            raise ConfigMapRefError(text, "no namespace given and the pod's own is unknown")
        namespace = default_namespace
    if "/" in namespace:
        raise ConfigMapRefError(text, "more than one '/'")
    if not namespace:
        raise ConfigMapRefError(text, "empty namespace before '/'")
    if len(namespace) > 63 or not _LABEL.fullmatch(namespace):
        raise ConfigMapRefError(text, f"namespace {namespace!r} is not a DNS-1123 label")
    if not name:
        raise ConfigMapRefError(text, "empty name")
    if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        raise ConfigMapRefError(text, f"name {name!r} is not a DNS-1123 subdomain")
    return ConfigMapRef(namespace, name)


def parse_refs(entries: Iterable[str], default_namespace: str | None) -> tuple[ConfigMapRef, ...]:
    """Each entry may itself be comma-separated; duplicates are dropped, order is kept."""
    refs: list[ConfigMapRef] = []
    for entry in entries:
        for part in entry.split(","):
            if not part.strip():
                continue
            ref = parse_ref(part, default_namespace)
            if ref not in refs:
                refs.append(ref)
    return tuple(refs)


def needs_default_namespace(entries: Iterable[str]) -> bool:
    return any("/" not in part for e in entries for part in e.split(",") if part.strip())
