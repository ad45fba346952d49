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

from sidecar.k8s.client import ApiError, KubeClient

log = logging.getLogger(__name__)

HTTP_CONFLICT = 409
TIMEOUT = (5.0, 10.0)  # (connect, read) seconds: an Event is never worth a long wait
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
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                self.record(request)
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

    def body(self, request: EventRequest, now: datetime.datetime) -> dict[str, Any]:
        """The core/v1 Event, as the API server's JSON spells it."""
        obj = request.obj
        stamp = _stamp(now)
        source = {"component": COMPONENT}
        if self._host:
            source["host"] = self._host
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": event_name(obj, request.reason), "namespace": obj.namespace},
            "involvedObject": {
                "kind": obj.kind,
                "apiVersion": obj.api_version,
                "namespace": obj.namespace,
                "name": obj.name,
                "uid": obj.uid,
                "resourceVersion": obj.resource_version,
            },
            "reason": request.reason,
            "message": truncate_message(request.message),
            "type": request.type,
            "source": source,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
        }

    def record(self, request: EventRequest) -> str:
        """Create the Event, or bump the count of the one another sidecar created."""
        obj = request.obj
        name = event_name(obj, request.reason)
        now = _now()
        try:
            self._client.create_event(obj.namespace, self.body(request, now), timeout=TIMEOUT)
            return name
        except ApiError as err:
            if err.status != HTTP_CONFLICT:
                raise
        # Without `get` on events (least privilege): the first patch returns the current count.
        current = self._client.patch_event(
            obj.namespace, name, {"lastTimestamp": _stamp(now)}, timeout=TIMEOUT
        )
        count = current.get("count")
        self._client.patch_event(
            obj.namespace,
            name,
            {"count": (count if isinstance(count, int) and count > 0 else 1) + 1},
            timeout=TIMEOUT,
        )
        return name


def _stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
