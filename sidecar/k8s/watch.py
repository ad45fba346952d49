"""List-then-watch of one ConfigMap, by name, through the sidecar's own API client.

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

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.k8s.client import ApiError, KubeClient, WatchLineTooLongError, WatchStream
from sidecar.k8s.refs import ConfigMapRef

log = logging.getLogger(__name__)

HTTP_GONE = 410
HTTP_UNAUTHORIZED = 401
HEALTHY_WATCH_SECONDS = 1.0  # a watch open this long proves the server works


class CorruptWatchEventError(ValueError):
    """A watch stream line that is not a watch event: not JSON, not an object, no ``type`` or
    no ``object`` mapping, or longer than any event could be."""

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
        self._stream: WatchStream | None = None
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
        stream = self._stream
        if stream is not None:
            stream.abort()  # shuts the socket down: unblocks a read in progress
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch_once()
            except CorruptWatchEventError as err:
                if self._stop.is_set():
                    break
                # What the bad line carried is unknown (perhaps an edit of ours): LIST again.
                self.resource_version = None
                self._pause(str(err))
            except ApiError as err:
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
                self._pause(str(err))
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

    @property
    def _selector(self) -> str:
        # RBAC resourceNames authorizes list and watch only when they select the name.
        return f"metadata.name={self.ref.name}"

    def _list(self) -> None:
        self.lists += 1
        result = self.client.list_configmaps(
            self.ref.namespace,
            field_selector=self._selector,
            timeout=(self.tuning.connect_timeout, self.tuning.list_timeout),
        )
        self.listener.on_connection(self.ref, ok=True, error=None)
        list_rv = str((result.get("metadata") or {}).get("resourceVersion") or "")
        items = [
            i
            for i in (result.get("items") or [])
            if isinstance(i, Mapping) and (i.get("metadata") or {}).get("name") == self.ref.name
        ]
        if items:
            self._report(_to_object(self.ref, items[0]))
        else:
            self._report_absent(list_rv, deleted=False)
        self.resource_version = list_rv

    def _watch_once(self) -> None:
        timeout = self._rng.randint(self.tuning.watch_timeout_min, self.tuning.watch_timeout_max)
        if self._stop.is_set():
            return
        self.watches += 1
        opened: float | None = None  # when the server accepted the watch
        events = 0
        try:
            stream = self.client.watch_configmaps(
                self.ref.namespace,
                field_selector=self._selector,
                resource_version=self.resource_version,
                timeout_seconds=timeout,
                # A silent dead peer is noticed a little after the server's own timeout.
                timeout=(self.tuning.connect_timeout, timeout + self.tuning.read_grace),
            )
            opened = time.monotonic()
            self._stream = stream
            try:
                if self._stop.is_set():  # stop() ran before the stream was known to it
                    return
                # The server accepted the watch (a non-2xx raised above): reachable again,
                # even if no event or bookmark comes for minutes.
                self.listener.on_connection(self.ref, ok=True, error=None)
                for event in _events(stream, self.ref):
                    if self._stop.is_set():
                        break
                    self._handle(event)
                    events += 1
            finally:
                self._stream = None
                stream.close()
        finally:
            # However it ended, a watch that delivered something or stayed open proves the
            # server healthy: the next failure starts the backoff from its first step again.
            healthy = events > 0 or (
                opened is not None and time.monotonic() - opened >= HEALTHY_WATCH_SECONDS
            )
            if healthy:
                self._backoff.reset()
        # One that ended at once without events must not turn into a tight reconnect loop.
        if not healthy and not self._stop.is_set():
            self._stop.wait(self._backoff.next_delay())

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        raw = event.get("object")
        if not isinstance(kind, str) or not isinstance(raw, Mapping):
            raise CorruptWatchEventError(self.ref, f"type {kind!r}, object {_excerpt(raw)}")
        rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":  # a Status: 410 Gone when our version was compacted
            raise ApiError.from_status(500, raw)
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


def _events(stream: WatchStream, ref: ConfigMapRef) -> Iterator[Mapping[str, Any]]:
    """The stream's events, one JSON object a line; anything else is CorruptWatchEventError."""
    lines = stream.lines()
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except WatchLineTooLongError as err:
            raise CorruptWatchEventError(ref, str(err)) from err
        try:
            event = json.loads(line)
        except ValueError as err:  # not JSON, or truncated
            raise CorruptWatchEventError(ref, f"{err}: {_excerpt(line)}") from err
        if not isinstance(event, Mapping):
            raise CorruptWatchEventError(ref, "a line that is not a JSON object")
        yield event


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
