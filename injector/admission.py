"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's logic without the server.

Whatever the input, a review that carries a ``request.uid`` is answered ``allowed: true`` — with a
patch when the core injected, with a warning when the input could not be understood — so that a
surprise in a pod spec never turns into an HTTP 500 (and, with ``failurePolicy: Fail``, into a
rejected pod). Only a body that is not an AdmissionReview at all gets an HTTP 400.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from injector.config import InjectorConfig
from injector.mutate import (
    TEMPLATE_PATHS,
    NamespaceInjection,
    NotAPodError,
    PodContext,
    inject_pod,
    make_patch,
    pod_template,
    read_settings,
    sync_workload_annotations,
)
from sidecar import contract as c

log = logging.getLogger("injector.admission")

Route = Literal["pods", "pods-namespace-enabled", "workloads"]
# Paths the MutatingWebhookConfiguration calls. The pod webhook whose namespaceSelector matches
# namespaces labelled egress-sidecar.io/injection=enabled calls the second path: that is how the
# server knows the label without reading Namespaces from the API (it needs no RBAC at all).
ROUTES: Final[Mapping[str, Route]] = {
    "/mutate/pods": "pods",
    "/mutate/pods/namespace-enabled": "pods-namespace-enabled",
    "/mutate/workloads": "workloads",
}
MAX_WARNING_CHARS: Final = 250
MAX_REFUSAL_CHARS: Final = 1000
Outcome = Literal["injected", "skipped", "patched", "unchanged", "not-understood", "refused"]


class BadReviewError(ValueError):
    """The request body is not an AdmissionReview with a request.uid (answered with HTTP 400)."""


@dataclass
class ReviewResult:
    """The response document, and the fields of the structured log line for this review."""

    response: dict[str, Any]
    outcome: Outcome
    log: dict[str, Any] = field(default_factory=dict)


def _response(
    api_version: str,
    uid: str,
    patch: list[dict[str, Any]] | None,
    warnings: list[str],
    refusal: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"uid": uid, "allowed": refusal is None}
    if refusal is not None:
        body["status"] = {"code": 403, "reason": "Forbidden", "message": refusal}
    elif patch:
        body["patchType"] = "JSONPatch"
        body["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
    if warnings:
        body["warnings"] = [_short("egress-injector: " + w) for w in warnings]
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": body}


def _short(text: str, limit: int = MAX_WARNING_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_review(body: bytes) -> tuple[str, dict[str, Any]]:
    """The review's apiVersion and request; raises BadReviewError when there is none."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReviewError(f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        raise BadReviewError("body is not an AdmissionReview")
    api_version = doc.get("apiVersion")
    if api_version not in ("admission.k8s.io/v1", "admission.k8s.io/v1beta1"):
        raise BadReviewError(f"AdmissionReview apiVersion {api_version!r} is not supported")
    request = doc.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReviewError("AdmissionReview has no request.uid")
    return str(api_version), request


def review(body: bytes, route: Route, cfg: InjectorConfig) -> ReviewResult:
    """Answer one AdmissionReview. Raises BadReviewError only for bodies without a request.uid."""
    started = time.monotonic()
    api_version, request = parse_review(body)
    uid: str = request["uid"]
    kind = request.get("kind") if isinstance(request.get("kind"), Mapping) else {}
    obj = request.get("object")
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = request.get("namespace") if isinstance(request.get("namespace"), str) else None
    fields: dict[str, Any] = {
        "uid": uid,
        "route": route,
        "operation": request.get("operation"),
        "kind": (kind or {}).get("kind"),
        "namespace": namespace,
        "name": meta.get("name") or meta.get("generateName") or request.get("name"),
        "dry_run": bool(request.get("dryRun")),
    }
    try:
        patch, outcome, reason, warnings = _decide(request, route, cfg, namespace)
    except Exception as exc:  # never a 500: answer allowed, say why, keep the traceback in the log
        log.exception("review %s failed", uid)
        patch, outcome = None, "not-understood"
        reason = f"internal error: {type(exc).__name__}"
        warnings = [f"could not process this object ({type(exc).__name__}); not injected"]
    fields.update(
        outcome=outcome,
        reason=reason,
        patch_ops=len(patch or []),
        warnings=warnings,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
    )
    refusal = None
    if outcome == "refused":
        # The refusal names every reason; the warnings repeat them one per line for kubectl.
        refusal = _short(f"egress-injector: {reason}", MAX_REFUSAL_CHARS)
    return ReviewResult(_response(api_version, uid, patch, warnings, refusal), outcome, fields)


def _decide(
    request: Mapping[str, Any], route: Route, cfg: InjectorConfig, namespace: str | None
) -> tuple[list[dict[str, Any]] | None, Outcome, str, list[str]]:
    kind = request.get("kind")
    kind_name = kind.get("kind") if isinstance(kind, Mapping) else None
    operation = request.get("operation")
    obj = request.get("object")
    if route in ("pods", "pods-namespace-enabled"):
        if kind_name != "Pod" or request.get("subResource"):
            return (
                None,
                "not-understood",
                f"unexpected kind {kind_name!r}",
                [f"expected a Pod on this path, got {kind_name!r}; not injected"],
            )
        if operation != "CREATE":
            return None, "skipped", f"operation {operation} (only CREATE is injected)", []
        if not isinstance(obj, Mapping):
            return None, "not-understood", "no object", ["the review carries no Pod; not injected"]
        injection: NamespaceInjection = "enabled" if route == "pods-namespace-enabled" else None
        ctx = PodContext(namespace=namespace, namespace_injection=injection)
        try:
            result = inject_pod(obj, ctx, cfg)
        except NotAPodError as exc:
            return None, "not-understood", str(exc), [f"pod spec not understood ({exc})"]
        if cfg.refuse_capture_bypass and result.risks:
            reason = "refused (refuseCaptureBypass): " + "; ".join(result.risks)
            return None, "refused", reason, list(result.warnings)
        if not result.injected:
            return None, "skipped", result.reason, list(result.warnings)
        return make_patch(obj, result.pod), "injected", result.reason, list(result.warnings)
    # workloads: copy the workload's egress-sidecar.io/* annotations into its pod template
    if kind_name not in TEMPLATE_PATHS:
        return (
            None,
            "not-understood",
            f"unexpected kind {kind_name!r}",
            [f"expected a workload on this path, got {kind_name!r}; unchanged"],
        )
    if operation not in ("CREATE", "UPDATE"):
        return None, "unchanged", f"operation {operation}", []
    if not isinstance(obj, Mapping):
        return None, "not-understood", "no object", ["the review carries no object; unchanged"]
    try:
        updated, changed = sync_workload_annotations(obj, kind_name)
    except NotAPodError as exc:
        return None, "not-understood", str(exc), [f"workload not understood ({exc}); unchanged"]
    if not changed:
        return None, "unchanged", "template annotations already in sync", []
    reason = "copied workload annotations into the pod template: " + ", ".join(changed)
    warnings = _template_warnings(updated, cfg, namespace)
    return make_patch(obj, updated), "patched", reason, warnings


def _template_warnings(
    workload: Mapping[str, Any], cfg: InjectorConfig, namespace: str | None
) -> list[str]:
    """Problems with the template, told to whoever annotated the workload (the pods' own
    warnings only reach the controller that creates them): its annotations, and, when it opts
    in, every way its pods could bypass capture. Warnings only: refusing an UPDATE could block
    a workload's deletion (finalizers); ``refuseCaptureBypass`` refuses the pods."""
    template = pod_template(workload) or {}
    meta = template.get("metadata")
    raw = meta.get("annotations") if isinstance(meta, Mapping) else None
    annotations = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
    inject = annotations.get(c.ANNOTATION_INJECT)
    warnings: list[str] = []
    if inject == "true":
        try:
            # The namespace label is unknown on this path: judge the template as opted in by
            # its annotation, which it is.
            result = inject_pod(template, PodContext(namespace=namespace), cfg)
        except NotAPodError:
            pass  # no pod shape yet: only the annotations can be judged
        else:
            if result.injected:
                return list(result.warnings)  # its annotations' warnings included
            # Not injected (already injected offline, an excluded namespace, host network):
            # what it says (host network) and what the annotations say, both.
            warnings = list(result.warnings)
    warnings += [w for w in read_settings(annotations, cfg).warnings if w not in warnings]
    if inject not in (None, "true", "false"):
        warnings.append(f'{c.ANNOTATION_INJECT}={inject!r} is neither "true" nor "false"')
    return warnings
