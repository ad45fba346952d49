"""Offline injection of manifest files (``egress-injector inject -f``), like istioctl kube-inject.

Multi-document YAML of any kinds: Pods and workloads (Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob) are injected, ``kind: List`` items are walked, every other document
passes through unchanged. A workload kind under an apiVersion that current Kubernetes no longer
serves (``batch/v1beta1`` CronJob, ``extensions/v1beta1`` Deployment, ...) is left unchanged with a
message saying which apiVersion to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from injector.config import InjectorConfig
from injector.mutate import (
    TEMPLATE_PATHS,
    NamespaceInjection,
    NotAPodError,
    PodContext,
    inject_pod,
    inject_workload,
)

SUPPORTED_API_VERSIONS: Final[Mapping[str, str]] = {
    "Pod": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (scripts, embedded documents) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


class ManifestError(ValueError):
    """The input is not YAML or a document is not a Kubernetes object; names the document."""


@dataclass
class Report:
    """What happened to each document, for the messages on stderr."""

    injected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<object>: <reason>"
    unsupported: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # workload documents without a usable spec
    warnings: list[str] = field(default_factory=list)
    passed_through: int = 0


def _describe(doc: Mapping[str, Any], index: int) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return f"document {index} ({doc.get('kind')} {name or '<unnamed>'})"


def inject_object(
    doc: Any,
    cfg: InjectorConfig,
    report: Report,
    index: int,
    namespace_injection: NamespaceInjection,
) -> Any:
    """Inject one parsed document (recursing into ``kind: List``); returns the output document."""
    if doc is None or not isinstance(doc, Mapping):
        report.passed_through += 1
        return doc
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        out = dict(doc)
        out["items"] = [
            inject_object(item, cfg, report, index, namespace_injection) for item in doc["items"]
        ]
        return out
    if not isinstance(kind, str) or kind not in SUPPORTED_API_VERSIONS:
        report.passed_through += 1
        return doc
    what = _describe(doc, index)
    wanted = SUPPORTED_API_VERSIONS[kind]
    if doc.get("apiVersion") != wanted:
        report.unsupported.append(
            f"{what}: apiVersion {doc.get('apiVersion')!r} is not served by current Kubernetes "
            f"(1.25+) for {kind}; change it to {wanted!r} (same pod template) and run again. "
            "Left unchanged."
        )
        return doc
    try:
        if kind == "Pod":
            meta = doc.get("metadata")
            ns = meta.get("namespace") if isinstance(meta, Mapping) else None
            ctx = PodContext(
                namespace=ns if isinstance(ns, str) and ns else None,
                namespace_injection=namespace_injection,
            )
            result = inject_pod(doc, ctx, cfg)
        else:
            assert kind in TEMPLATE_PATHS
            result = inject_workload(doc, cfg, namespace_injection)
    except NotAPodError as exc:
        report.invalid.append(f"{what}: not a valid {kind}: {exc}. Left unchanged.")
        return doc
    if result.injected:
        report.injected.append(what)
    else:
        report.skipped.append(f"{what}: {result.reason}")
    report.warnings.extend(f"{what}: {w}" for w in result.warnings)
    return result.pod


def inject_text(
    text: str,
    cfg: InjectorConfig,
    namespace_injection: NamespaceInjection = "enabled",
) -> tuple[str, Report]:
    """Inject every document of a multi-document YAML text; returns the output text and report.

    ``namespace_injection="enabled"`` (the default offline) injects everything that does not opt
    out; pass None to inject only what carries ``egress-sidecar.io/inject: "true"``.
    """
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"input is not valid YAML: {exc}") from exc
    report = Report()
    out = [
        inject_object(doc, cfg, report, index, namespace_injection)
        for index, doc in enumerate(docs, start=1)
        if doc is not None
    ]
    rendered = yaml.dump_all(
        out, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=100, allow_unicode=True
    )
    return rendered, report
