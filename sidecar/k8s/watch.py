"""List-then-watch of one ConfigMap, by name, through the official client.

The loop, per ConfigMap (one thread each):

1. LIST with ``fieldSelector=metadata.name=NAME`` (RBAC ``resourceNames`` only authorizes list
   and watch that select the name), report the object or its absence, remember the list's
   resourceVersion;
2. WATCH from that version with bookmarks and a server-side ``timeoutSeconds`` (randomised, as
   client-go does, so that many sidecars do not reconnect in step). A watch that ends normally is
   resumed from the last version seen (event or bookmark) without a new LIST;
3. 410 Gone (an ERROR event or an HTTP 410) means the version was compacted: LIST again;
4. a corrupt event (not JSON, truncated, no object): the stream can no longer be trusted to
   have delivered everything, so LIST again after the backoff;
5. any other failure (connection refused, reset, timeout, 5xx, 401, 403): wait a capped
   exponential backoff with jitter, then resume from the last version, or LIST if we have none.
   A 401 first re-reads the service account token.

The backoff starts again from its first step as soon as the API server has shown it works: a
watch that delivered an event (bookmarks included) or stayed open for a second, however that
watch then ended. A successful LIST alone does not reset it, so that a server that answers lists
but breaks every watch at once is retried ever more slowly instead of in a tight loop.

The listener is called from the watcher's thread; it must not block for long.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import watch as _k8s_watch
from kubernetes.client.exceptions import ApiException

from sidecar.k8s.client import KubeClient
from sidecar.k8s.refs import ConfigMapRef

log = logging.getLogger(__name__)

Watch: Any = _k8s_watch.Watch  # unannotated in the client

HTTP_GONE = 410
HTTP_UNAUTHORIZED = 401
HEALTHY_WATCH_SECONDS = 1.0  # a watch open this long proves the server works


class CorruptWatchEventError(ValueError):
    """A watch stream line that is not a watch event (the official client yields None for a
    line that is not JSON, and raises KeyError/TypeError/ValueError for other malformed ones)."""

    def __init__(self, ref: ConfigMapRef, detail: str) -> None:
        super().__init__(f"corrupt watch event for ConfigMap {ref}: {detail}")


@dataclass(frozen=True, slots=True)
class ConfigMapObject:
    """The parts of a ConfigMap the sidecar uses."""

    ref: ConfigMapRef
    uid: str
    resource_version: str
    data: Mapping[str, str] = field(default_factory=dict)


class WatchListener(Protocol):
    def on_configmap(self, obj: ConfigMapObject) -> None:
        """The ConfigMap as it is now (listed, added or modified)."""

    def on_absent(self, ref: ConfigMapRef, resource_version: str, *, deleted: bool) -> None:
        """The ConfigMap does not exist: ``deleted`` when a watch saw it go, else listed absent."""

    def on_connection(self, ref: ConfigMapRef, *, ok: bool, error: str | None) -> None:
        """The API server answered (ok) or could not be reached / refused us (error)."""


@dataclass(frozen=True, slots=True)
class WatchTuning:
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    watch_timeout_min: int = 300  # server-side timeoutSeconds range, as client-go's 5-10 min
    watch_timeout_max: int = 600
    connect_timeout: float = 5.0
    read_grace: float = 30.0  # client read timeout = timeoutSeconds + this (a silent dead peer)
    list_timeout: float = 30.0


class Backoff:
    """Capped exponential backoff with "equal jitter": half fixed, half random."""

    def __init__(self, initial: float, cap: float, rng: random.Random) -> None:
        self.initial = initial
        self.cap = cap
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.failures = 0


def _to_object(ref: ConfigMapRef, raw: Mapping[str, Any]) -> ConfigMapObject:
    metadata = raw.get("metadata") or {}
    data = raw.get("data") or {}
    return ConfigMapObject(
        ref=ref,
        uid=str(metadata.get("uid") or ""),
        resource_version=str(metadata.get("resourceVersion") or ""),
        data={str(k): str(v) for k, v in data.items()},
    )


class ConfigMapWatcher:
    def __init__(
        self,
        client: KubeClient,
        ref: ConfigMapRef,
        listener: WatchListener,
        tuning: WatchTuning | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.ref = ref
        self.listener = listener
        self.tuning = tuning or WatchTuning()
        self._rng = rng or random.Random()
        self._backoff = Backoff(self.tuning.backoff_initial, self.tuning.backoff_max, self._rng)
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self.resource_version: str | None = None  # where the next watch resumes; None: LIST
        self.lists = 0  # LIST requests made (tests and status read these)
        self.watches = 0
        self._last_seen: tuple[str, str] | None = (
            None  # (uid, rv) last reported, or ("", "") absent
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"watch-configmap-{self.ref}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # shuts the socket down: unblocks a read in progress
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        api = self.client.core_v1()
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list(api)
                self._watch_once(api)
            except CorruptWatchEventError as err:
                if self._stop.is_set():
                    break
                # What the bad line carried is unknown (perhaps an edit of ours): LIST again.
                self.resource_version = None
                self._pause(str(err))
            except ApiException as err:
                if self._stop.is_set():
                    break
                if err.status == HTTP_GONE:
                    # Compacted: the only way back is a fresh LIST. Immediately the first time;
                    # a server that keeps answering 410 gets the backoff.
                    log.info(
                        "watch expired, listing again",
                        extra={
                            "configmap": str(self.ref),
                            "resource_version": self.resource_version,
                        },
                    )
                    self.resource_version = None
                    if self._backoff.failures > 0:
                        self._pause(f"410 Gone: {err.reason}")
                    else:
                        self._backoff.failures += 1
                    continue
                if err.status == HTTP_UNAUTHORIZED:
                    self.client.refresh_credentials()
                self._pause(f"HTTP {err.status}: {_reason(err)}")
            except Exception as err:  # connection refused/reset, read timeout, bad response
                if self._stop.is_set():
                    break
                self._pause(f"{type(err).__name__}: {err}")

    def _pause(self, error: str) -> None:
        delay = self._backoff.next_delay()
        log.warning(
            "Kubernetes API request failed, retrying",
            extra={"configmap": str(self.ref), "error": error, "retry_in_s": round(delay, 3)},
        )
        self.listener.on_connection(self.ref, ok=False, error=error)
        self._stop.wait(delay)

    def _list(self, api: Any) -> None:
        self.lists += 1
        result = api.list_namespaced_config_map(
            self.ref.namespace,
            field_selector=f"metadata.name={self.ref.name}",
            _request_timeout=(self.tuning.connect_timeout, self.tuning.list_timeout),
        )
        self.listener.on_connection(self.ref, ok=True, error=None)
        list_rv = str(result.metadata.resource_version)
        items = [i for i in (result.items or []) if i.metadata.name == self.ref.name]
        if items:
            item = items[0]
            self._report(
                ConfigMapObject(
                    ref=self.ref,
                    uid=str(item.metadata.uid or ""),
                    resource_version=str(item.metadata.resource_version or ""),
                    data=dict(item.data or {}),
                )
            )
        else:
            self._report_absent(list_rv, deleted=False)
        self.resource_version = list_rv

    def _watch_once(self, api: Any) -> None:
        timeout = self._rng.randint(self.tuning.watch_timeout_min, self.tuning.watch_timeout_max)
        watch = Watch()
        self._watch = watch
        if self._stop.is_set():
            return
        self.watches += 1
        opened: list[float] = []  # when the server accepted the watch
        events = 0

        @functools.wraps(api.list_namespaced_config_map)
        def open_watch(*args: Any, **kwargs: Any) -> Any:
            response = api.list_namespaced_config_map(*args, **kwargs)
            opened.append(time.monotonic())
            # The server accepted the watch (a non-2xx raised above): reachable again, even if
            # no event or bookmark comes for minutes.
            self.listener.on_connection(self.ref, ok=True, error=None)
            return response

        try:
            # timeout_seconds also turns off Watch.stream's own retry, so that a 410 reaches us.
            stream = watch.stream(
                open_watch,
                self.ref.namespace,
                field_selector=f"metadata.name={self.ref.name}",
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=(
                    self.tuning.connect_timeout,
                    timeout + self.tuning.read_grace,
                ),
            )
            for event in _checked(stream, self.ref):
                if self._stop.is_set():
                    break
                self._handle(event)
                events += 1
        finally:
            self._watch = None
            # However it ended, a watch that delivered something or stayed open proves the
            # server healthy: the next failure starts the backoff from its first step again.
            healthy = events > 0 or (
                bool(opened) and time.monotonic() - opened[0] >= HEALTHY_WATCH_SECONDS
            )
            if healthy:
                self._backoff.reset()
        # One that ended at once without events must not turn into a tight reconnect loop.
        if not healthy and not self._stop.is_set():
            self._stop.wait(self._backoff.next_delay())

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        raw = event.get("raw_object")
        if not isinstance(kind, str) or not isinstance(raw, Mapping):
            raise CorruptWatchEventError(self.ref, f"type {kind!r}, object {_excerpt(raw)}")
        rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":  # Watch.stream raises for these; kept for safety
            raise ApiException(status=int(raw.get("code") or 500), reason=str(raw.get("reason")))
        name = (raw.get("metadata") or {}).get("name")
        if name != self.ref.name:
            return
        if kind in ("ADDED", "MODIFIED"):
            self._report(_to_object(self.ref, raw))
        elif kind == "DELETED":
            self._report_absent(rv, deleted=True)
        if rv:
            self.resource_version = rv

    def _report(self, obj: ConfigMapObject) -> None:
        key = (obj.uid, obj.resource_version)
        if key == self._last_seen:
            return  # the same version again (a relist after 410): nothing changed
        self._last_seen = key
        self.listener.on_configmap(obj)

    def _report_absent(self, rv: str, *, deleted: bool) -> None:
        if self._last_seen == ("", ""):
            return
        self._last_seen = ("", "")
        self.listener.on_absent(self.ref, rv, deleted=deleted)


def _checked(stream: Iterator[Any], ref: ConfigMapRef) -> Iterator[Mapping[str, Any]]:
    """The stream's events; a line the client could not decode becomes CorruptWatchEventError."""
    while True:
        try:
            event = next(stream)
        except StopIteration:
            return
        except (KeyError, TypeError, ValueError) as err:  # raised while decoding a line
            raise CorruptWatchEventError(ref, f"{type(err).__name__}: {err}") from err
        if not isinstance(event, Mapping):
            raise CorruptWatchEventError(ref, "a line that is not a JSON object")
        yield event


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reason(err: ApiException) -> str:
    body = getattr(err, "body", None)
    if body:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return f"{err.reason}: {text[:300]}"
    return str(err.reason)
