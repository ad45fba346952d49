"""Kubernetes Events on the ConfigMap, so `kubectl describe cm` shows a rejected edit.

We write core/v1 Events (not events.k8s.io/v1):

- `kubectl describe` lists core/v1 Events by ``involvedObject``; the events.k8s.io/v1 form is
  converted to that on the server, so both show, but core/v1 needs no conversion and no
  ``eventTime``/``action``/``reportingController`` fields;
- one Event per rejected ConfigMap version, shared by every sidecar that reads that ConfigMap:
  its name is derived from the ConfigMap's uid, resourceVersion and the reason, so the first
  sidecar creates it and the others (409 AlreadyExists) patch ``count``/``lastTimestamp``, as the
  kubelet's event correlator does. N replicas rejecting one edit give one Event "xN", not N Events.
  That is why the RBAC has ``create`` and ``patch`` on events (no ``get``: the patch answers with
  the current count).

Posting happens on a background thread with a bounded queue: a slow or unreachable API server
never delays a policy swap.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sidecar.k8s.client import KubeClient

log = logging.getLogger(__name__)

HTTP_CONFLICT = 409
MAX_MESSAGE = 1024  # the API server rejects longer Event messages
COMPONENT = "egress-sidecar"


@dataclass(frozen=True, slots=True)
class InvolvedObject:
    kind: str
    api_version: str
    namespace: str
    name: str
    uid: str
    resource_version: str


@dataclass(frozen=True, slots=True)
class EventRequest:
    obj: InvolvedObject
    reason: str
    message: str
    type: str = "Warning"


def event_name(obj: InvolvedObject, reason: str) -> str:
    """Deterministic per (object uid, version, reason): replicas converge on one Event."""
    digest = hashlib.sha256(f"{obj.uid}/{obj.resource_version}/{reason}".encode()).hexdigest()
    return f"{obj.name[:200]}.{digest[:16]}"


def truncate_message(message: str) -> str:
    data = message.encode("utf-8")
    if len(data) <= MAX_MESSAGE:
        return message
    return data[: MAX_MESSAGE - 3].decode("utf-8", "ignore") + "..."


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


class EventRecorder:
    def __init__(
        self,
        client: KubeClient,
        *,
        instance: str,
        host: str | None = None,
        max_queue: int = 64,
    ) -> None:
        self._client = client
        self._instance = instance[:128]
        self._host = host
        self._queue: queue.Queue[EventRequest | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.posted = 0  # Events created or patched (for tests and status)
        self.failed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="k8s-event-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def warn(self, obj: InvolvedObject, reason: str, message: str) -> None:
        """Queue a Warning Event; dropped (and logged) if the queue is full."""
        try:
            self._queue.put_nowait(EventRequest(obj, reason, message))
        except queue.Full:
            self.failed += 1
            log.warning(
                "dropped a Kubernetes Event: queue full",
                extra={"reason": reason, "object": f"{obj.namespace}/{obj.name}"},
            )

    def _run(self) -> None:
        api = self._client.core_v1()
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                self.record(api, request)
                self.posted += 1
            except Exception as err:
                self.failed += 1
                log.warning(
                    "could not record a Kubernetes Event",
                    extra={
                        "reason": request.reason,
                        "object": f"{request.obj.namespace}/{request.obj.name}",
                        "error": str(err),
                    },
                )

    def record(self, api: Any, request: EventRequest) -> str:
        """Create the Event, or bump the count of the one another sidecar created."""
        obj = request.obj
        name = event_name(obj, request.reason)
        now = _now()
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name=name, namespace=obj.namespace),
            involved_object=k8s.V1ObjectReference(
                kind=obj.kind,
                api_version=obj.api_version,
                namespace=obj.namespace,
                name=obj.name,
                uid=obj.uid,
                resource_version=obj.resource_version,
            ),
            reason=request.reason,
            message=truncate_message(request.message),
            type=request.type,
            source=k8s.V1EventSource(component=COMPONENT, host=self._host),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=COMPONENT,
            reporting_instance=self._instance,
        )
        try:
            api.create_namespaced_event(obj.namespace, body, _request_timeout=(5, 10))
            return name
        except ApiException as err:
            if err.status != HTTP_CONFLICT:
                raise
        # Without `get` on events (least privilege): the first patch returns the current count.
        merge = "application/merge-patch+json"
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        current = api.patch_namespaced_event(
            name,
            obj.namespace,
            {"lastTimestamp": stamp},
            _content_type=merge,
            _request_timeout=(5, 10),
        )
        api.patch_namespaced_event(
            name,
            obj.namespace,
            {"count": int(current.count or 1) + 1},
            _content_type=merge,
            _request_timeout=(5, 10),
        )
        return name
