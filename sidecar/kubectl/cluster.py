"""What `kubectl egress` reads from the cluster, through the official ``kubernetes`` client and
the user's kubeconfig: workloads, their pods, namespaces, ConfigMaps, and each sidecar's health
port through the API server's pod proxy (``pods/NAME:15021/proxy/PATH``), so the user needs no
port-forward and no network path to the pods, only RBAC ``get pods/proxy``.

Every failure becomes a ``PluginError`` with a message a person can act on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError as Urllib3Error

from sidecar import contract
from sidecar.destinations import SeenDestination
from sidecar.kubectl.plan import WorkloadRef, label_selector

type JSON = dict[str, Any]

# A hung API server must not hang the command: (connect, read) seconds.
TIMEOUT = (10, 30)


class PluginError(Exception):
    """A failure to report on stderr, with a non-zero exit."""


@dataclass(frozen=True)
class Workload:
    ref: WorkloadRef
    namespace: str
    obj: JSON

    @property
    def template_annotations(self) -> dict[str, str]:
        """The pod template's egress-sidecar.io/* annotations over the workload's own (the
        injector copies the workload's into the template; a template value wins)."""
        own = (self.obj.get("metadata") or {}).get("annotations") or {}
        template = ((self.obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
        merged = {k: v for k, v in own.items() if k.startswith(contract.PREFIX)}
        merged.update(template.get("annotations") or {})
        return merged


@dataclass
class PodHealth:
    """One pod's sidecar as read through the pod proxy; ``error`` when it could not be."""

    ready: bool | None = None
    body: JSON | None = None
    error: str | None = None


def _reason(err: ApiException) -> str:
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return f"HTTP {err.status} {err.reason or ''}".strip()


class Cluster:
    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        configuration = client.Configuration()
        # $KUBECONFIG read now, as kubectl reads it (the client library read it once, when it
        # was imported); a colon-separated list is merged by the library either way.
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        try:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except (ConfigException, OSError) as err:
            raise PluginError(f"cannot load the kubeconfig: {err}") from None
        chosen = (
            next((c for c in contexts if c.get("name") == context), None) if context else active
        )
        default_ns = ((chosen or {}).get("context") or {}).get("namespace") or "default"
        self.namespace: str = namespace or default_ns
        self.server: str = configuration.host
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self._namespace_labels: dict[str, str | None] = {}
        self._configmaps: dict[tuple[str, str], JSON | None] = {}

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> JSON:
        """One API call, its JSON body as a dict; errors said in a person's words."""
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs)
            body = json.loads(resp.data)
        except ApiException as err:
            if err.status == 403:
                raise PluginError(f"forbidden: {_reason(err)} (RBAC: you need to {what})") from None
            if err.status == 401:
                raise PluginError(
                    f"unauthorized by the API server {self.server}: {_reason(err)} "
                    "(is the kubeconfig's credential still valid?)"
                ) from None
            raise NotFound(what, err.status, _reason(err)) from None
        except (Urllib3Error, OSError) as err:
            raise PluginError(f"cannot reach the API server {self.server}: {err}") from None
        except ValueError as err:
            raise PluginError(f"the API server's answer to {what} is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise PluginError(f"the API server's answer to {what} is not an object")
        return body

    # -- reads ------------------------------------------------------------------------------------

    def workload(self, ref: WorkloadRef, namespace: str | None = None) -> Workload:
        ns = namespace or self.namespace
        read = {
            "deployments": self.apps.read_namespaced_deployment,
            "statefulsets": self.apps.read_namespaced_stateful_set,
            "daemonsets": self.apps.read_namespaced_daemon_set,
        }[ref.kind.resource]
        try:
            obj = self._call(f"get {ref.kind.resource} in namespace {ns}", read, ref.name, ns)
        except NotFound as err:
            if err.status == 404:
                raise PluginError(
                    f"no such workload: {ref.kind.kind} {ref.name!r} not found in namespace "
                    f"{ns!r} (-n NAMESPACE to look elsewhere)"
                ) from None
            raise PluginError(str(err)) from None
        return Workload(ref, ns, obj)

    def workloads(self, namespace: str | None, warn: Callable[[str], None]) -> Iterator[Workload]:
        """Every Deployment, StatefulSet and DaemonSet of a namespace (None: of all). A kind
        RBAC hides is skipped with a warning (many users may list only some); all hidden is
        an error."""
        from sidecar.kubectl.plan import WORKLOAD_KINDS

        refused: list[str] = []
        for kind in WORKLOAD_KINDS:
            method = {
                "deployments": "deployment",
                "statefulsets": "stateful_set",
                "daemonsets": "daemon_set",
            }[kind.resource]
            where = f"in namespace {namespace}" if namespace else "in all namespaces"
            args: tuple[str, ...] = (namespace,) if namespace else ()
            if namespace:
                fn = getattr(self.apps, f"list_namespaced_{method}")
            else:
                fn = getattr(self.apps, f"list_{method}_for_all_namespaces")
            try:
                listing = self._get(f"list {kind.resource} {where}", fn, *args)
            except PluginError as err:
                if not str(err).startswith("forbidden"):
                    raise
                refused.append(str(err))
                if len(refused) == len(WORKLOAD_KINDS):
                    raise PluginError("; ".join(refused)) from None
                warn(f"{kind.resource} skipped: {err}")
                continue
            for obj in listing.get("items") or []:
                meta = obj.get("metadata") or {}
                yield Workload(WorkloadRef(kind, meta["name"]), meta["namespace"], obj)

    def pods(self, workload: Workload) -> list[JSON]:
        try:
            selector = label_selector((workload.obj.get("spec") or {}).get("selector"))
        except ValueError as err:
            raise PluginError(f"{workload.ref}: {err}") from None
        listing = self._get(
            f"list pods in namespace {workload.namespace}",
            self.core.list_namespaced_pod,
            workload.namespace,
            label_selector=selector,
        )
        return sorted(
            listing.get("items") or [], key=lambda p: str((p.get("metadata") or {}).get("name"))
        )

    def namespace_label(self, namespace: str) -> str | None:
        """The namespace's egress-sidecar.io/injection label; None when unset or not readable
        (reading namespaces is a cluster-scoped right many users lack; "why" then says less)."""
        if namespace in self._namespace_labels:
            return self._namespace_labels[namespace]
        self._namespace_labels[namespace] = None
        try:
            obj = self._call("get namespaces", self.core.read_namespace, namespace)
        except (PluginError, NotFound):
            return None
        labels = (obj.get("metadata") or {}).get("labels") or {}
        value = labels.get(contract.LABEL_INJECTION)
        self._namespace_labels[namespace] = value if isinstance(value, str) else None
        return self._namespace_labels[namespace]

    def configmap(self, namespace: str, name: str) -> JSON | None:
        """The ConfigMap, or None when it does not exist."""
        try:
            return self._call(
                f"get configmaps in namespace {namespace}",
                self.core.read_namespaced_config_map,
                name,
                namespace,
            )
        except NotFound as err:
            if err.status == 404:
                return None
            raise PluginError(str(err)) from None

    def configmap_cached(self, namespace: str, name: str) -> JSON | None:
        """``configmap`` read once per command (status asks for it once per pod)."""
        key = (namespace, name)
        if key not in self._configmaps:
            self._configmaps[key] = self.configmap(namespace, name)
        return self._configmaps[key]

    def _get(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> JSON:
        try:
            return self._call(what, fn, *args, **kwargs)
        except NotFound as err:
            raise PluginError(str(err)) from None

    def pod_health(self, namespace: str, pod: str, path: str) -> tuple[int, JSON]:
        """GET the sidecar's health port PATH through the pod proxy: (status, JSON body).
        The sidecar's own status (503 = not ready) comes back with its body."""
        target = f"{pod}:{contract.HEALTH_PORT}"
        try:
            # _preload_content=False: the raw response (typed as str, it is urllib3's).
            resp: Any = self.core.connect_get_namespaced_pod_proxy_with_path(
                target,
                namespace,
                path.lstrip("/"),
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
            status, data = int(resp.status), resp.data
        except ApiException as err:
            if err.status == 403:
                raise PluginError(
                    f"forbidden: {_reason(err)} (RBAC: you need to get pods/proxy in namespace "
                    f"{namespace} to read the sidecars' health port)"
                ) from None
            status, data = int(err.status or 0), err.body
        except (Urllib3Error, OSError) as err:
            raise PluginError(f"cannot reach the API server {self.server}: {err}") from None
        try:
            body = json.loads(data or b"")
        except (TypeError, ValueError):
            body = None
        if not isinstance(body, dict):
            raise PodUnreachable(f"HTTP {status} from {path}, not JSON: {str(data)[:120]!r}")
        if body.get("kind") == "Status":  # the API server's own answer, not the sidecar's
            raise PodUnreachable(str(body.get("message") or f"HTTP {status}"))
        return status, body

    def readiness(self, namespace: str, pod: str) -> PodHealth:
        try:
            status, body = self.pod_health(namespace, pod, contract.HEALTH_READY_PATH)
        except PodUnreachable as err:
            return PodHealth(error=str(err))
        return PodHealth(ready=status == 200 and bool(body.get("ready")), body=body)

    def destinations(self, namespace: str, pod: str) -> PodSummary:
        return summary_of(*self.pod_health(namespace, pod, contract.DEBUG_DESTINATIONS_PATH))


def summary_of(status: int, body: JSON) -> PodSummary:
    """A sidecar's answer to /debug/destinations (through the pod proxy or read directly)."""
    items = body.get("destinations")
    if status != 200 or not isinstance(items, list):
        raise PodUnreachable(f"HTTP {status} from {contract.DEBUG_DESTINATIONS_PATH}")
    try:
        seen = [SeenDestination.from_json(item) for item in items]
    except ValueError as err:
        raise PodUnreachable(f"{contract.DEBUG_DESTINATIONS_PATH}: {err}") from None
    evicted = body.get("evicted")
    since = body.get("since")
    return PodSummary(
        seen,
        since if isinstance(since, str) else None,
        evicted if isinstance(evicted, int) else 0,
    )


@dataclass(frozen=True)
class PodSummary:
    """One sidecar's /debug/destinations: what it saw since ``since``, less ``evicted``."""

    seen: list[SeenDestination]
    since: str | None
    evicted: int


class NotFound(Exception):  # noqa: N818 (an API answer, not a bug)
    """The API server answered an error other than 401/403 (most often 404)."""

    def __init__(self, what: str, status: int | None, message: str) -> None:
        super().__init__(f"cannot {what}: {message}")
        self.status = status


class PodUnreachable(Exception):  # noqa: N818
    """A pod's sidecar could not be read through the pod proxy (not running, no sidecar, ...)."""
