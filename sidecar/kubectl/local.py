"""Sidecars read directly on their health port, without a cluster (`--from-url`): a sidecar on
this machine (`make demo`, `egress-sidecar run` on a laptop) or one reached through
`kubectl port-forward pod/NAME 15021`. The same two documents the pod proxy serves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sidecar import contract
from sidecar.kubectl.cluster import JSON, PluginError, PodSummary, PodUnreachable, summary_of

TIMEOUT = 10.0


def _base(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PluginError(
            f"--from-url {url!r}: give the health port's URL, e.g. http://127.0.0.1:15021"
        )
    return f"{parts.scheme}://{parts.netloc}"


def get_json(url: str, path: str) -> tuple[int, JSON]:
    """GET the health port's PATH: (status, JSON body); its 503 (not ready) comes with its
    body, as through the pod proxy."""
    target = _base(url) + path
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT) as resp:
            status, data = int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        status, data = int(err.code), err.read()
    except (urllib.error.URLError, OSError) as err:
        raise PodUnreachable(f"{target}: {getattr(err, 'reason', err)}") from None
    try:
        body = json.loads(data or b"")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PodUnreachable(f"HTTP {status} from {target}, not JSON")
    return status, body


def destinations(url: str) -> PodSummary:
    return summary_of(*get_json(url, contract.DEBUG_DESTINATIONS_PATH))


def ready_body(url: str) -> JSON:
    try:
        return get_json(url, contract.HEALTH_READY_PATH)[1]
    except PodUnreachable:
        return {}


@dataclass(frozen=True)
class LocalAllowlist:
    """The current allowlist given as a file: its text and the ConfigMap it is (or would be)."""

    text: str | None  # None: no file, a first allowlist is proposed
    namespace: str
    name: str


def read_allowlist(path: str | None, namespace: str | None) -> LocalAllowlist:
    """A ConfigMap manifest (its name, namespace and allowlist.yaml) or a bare allowlist (the
    default ConfigMap name, in ``namespace``)."""
    ns = namespace or "default"
    if path is None:
        return LocalAllowlist(None, ns, contract.DEFAULT_ALLOWLIST_CONFIGMAP)
    try:
        text = Path(path).read_text("utf-8")
        doc: Any = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PluginError(f"cannot read {path}: {err}") from None
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        meta = doc.get("metadata") or {}
        inner = (doc.get("data") or {}).get(contract.ALLOWLIST_KEY)
        if not isinstance(inner, str):
            raise PluginError(f"{path}: the ConfigMap has no {contract.ALLOWLIST_KEY} key")
        return LocalAllowlist(
            inner,
            namespace or str(meta.get("namespace") or "default"),
            str(meta.get("name") or contract.DEFAULT_ALLOWLIST_CONFIGMAP),
        )
    return LocalAllowlist(text, ns, contract.DEFAULT_ALLOWLIST_CONFIGMAP)
