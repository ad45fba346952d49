"""A small Kubernetes API server for tests: the wire protocol of what the sidecar uses.

There is no kube-apiserver on these machines (FIELD-NOTES), so this serves, on loopback and
optionally over HTTPS with its own CA:

- ConfigMaps: GET one, LIST (``fieldSelector=metadata.name=...``), WATCH with chunked
  responses (one JSON event per line, flushed per event), ``resourceVersion``,
  ``timeoutSeconds`` (the watch then ends normally), ``allowWatchBookmarks`` (BOOKMARK events),
  410 Gone for compacted versions (as an ERROR event in the stream, or as an HTTP 410),
- core/v1 and events.k8s.io/v1 Events: create (409 when the name exists), patch, get, list,
- bearer-token checks (401), an RBAC-like name restriction (403), Status bodies for errors,
- what `kubectl egress` reads: namespaces, pods (``labelSelector``, all namespaces), apps/v1
  Deployments, StatefulSets and DaemonSets (get, list), the pod proxy subresource
  ``/api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH`` (forwarded to a test-registered local
  address, status and body passed through, 503 Status when the pod cannot be reached), and
  per-resource RBAC refusals (403 Status, the API server's wording) via ``forbid``.

One global resourceVersion counter, as in etcd. Test controls change ConfigMaps, compact the
history, restart the server on the same port and rotate the accepted token. The sidecar code is
driven against it only through the official ``kubernetes`` client.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

type JSON = dict[str, Any]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    status: int


@dataclass
class HistoryEntry:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON


@dataclass
class _Generation:
    """One run of the server between start() and stop(); watches of an old run end."""

    stopped: threading.Event = field(default_factory=threading.Event)
    open_watches: int = 0
    sockets: set[socket.socket] = field(default_factory=set)


class _Server(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (slow where there is no DNS).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        host, port = self.socket.getsockname()[:2]
        self.server_address = (host, port)
        self.server_name, self.server_port = str(host), int(port)


def status_body(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: JSON, patch: JSON) -> JSON:
    """RFC 7386 merge patch (also good enough for the strategic merge patches we receive)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKubeAPI:
    """Start with ``start()``; ``url`` is then the API server's base URL."""

    def __init__(
        self,
        *,
        tls: bool = False,
        token: str | None = "token-1",
        gone_as_http: bool = False,
        bookmark_interval: float = 0.5,
        allowed_configmaps: set[tuple[str, str]] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.tls = tls
        self.gone_as_http = gone_as_http  # a too-old watch gets HTTP 410 instead of an ERROR event
        self.bookmark_interval = bookmark_interval
        # None: any ConfigMap may be read; a set: only these (namespace, name), as RBAC
        # resourceNames would allow; list/watch must then select the name with a field selector.
        self.allowed_configmaps = allowed_configmaps
        # None: any verb on events; a set: only these (RBAC), e.g. {"create", "patch"}.
        self.event_verbs: set[str] | None = None
        self._tokens: set[str] = {token} if token is not None else set()
        self.auth_required = token is not None
        self._lock = threading.Condition()
        self._rv = 100  # like a real cluster, versions do not start at 1
        self._compacted = 0  # watches from a version older than this get 410
        self._expire_epoch = 0  # bumped by expire_history(): open watches then get ERROR 410
        self._raw_lines: list[bytes] = []  # send_raw_watch_line(): bytes open watches then get
        self._configmaps: dict[tuple[str, str], JSON] = {}
        self._history: list[HistoryEntry] = []
        self.events: dict[tuple[str, str], JSON] = {}  # (namespace, name) -> core/v1 Event
        self.requests: list[RecordedRequest] = []
        # (resource, namespace, name) -> object; namespaces use namespace "".
        self._objects: dict[tuple[str, str, str], JSON] = {}
        # (namespace, pod, port) -> "http://127.0.0.1:PORT": where the pod proxy forwards.
        self._pod_ports: dict[tuple[str, str, int], str] = {}
        # (resource, verb) pairs RBAC refuses, e.g. ("pods/proxy", "get"), ("deployments", "list").
        self.forbidden: set[tuple[str, str]] = set()
        self.user = "alice"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._generation = _Generation()
        self.port = 0
        self.host = "127.0.0.1"
        self._workdir = workdir
        self.ca_path: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        if tls:
            if workdir is None:
                raise ValueError("a TLS FakeKubeAPI needs a workdir for its CA and key files")
            self.ca_path, cert, key = _make_ca_and_cert(workdir)
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(cert, key)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> None:
        api = self
        generation = _Generation()

        class Handler(_Handler):
            pass

        Handler.api = api
        Handler.generation = generation
        server = _Server((self.host, self.port), Handler)
        server.daemon_threads = True
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = server.server_address[1]
        self._server = server
        self._generation = generation
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a crashed or restarted server does."""
        server, self._server = self._server, None
        if server is None:
            return
        generation = self._generation
        generation.stopped.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets = list(generation.sockets)
            self._lock.notify_all()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start again on the same port; the stored state (the "etcd") survives."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> FakeKubeAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls --------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def put_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str] | None = None
    ) -> str:
        """Create or replace a ConfigMap; returns its new resourceVersion."""
        with self._lock:
            self._rv += 1
            key = (namespace, name)
            old = self._configmaps.get(key)
            if old is None:
                metadata: JSON = {
                    "name": name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": _now(),
                }
                kind = "ADDED"
            else:
                metadata = copy.deepcopy(old["metadata"])
                kind = "MODIFIED"
            metadata["resourceVersion"] = str(self._rv)
            if labels is not None:
                metadata["labels"] = dict(labels)
            obj: JSON = {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": metadata,
                "data": dict(data),
            }
            self._configmaps[key] = obj
            self._history.append(HistoryEntry(self._rv, kind, copy.deepcopy(obj)))
            self._lock.notify_all()
            return str(self._rv)

    def delete_configmap(self, namespace: str, name: str) -> str:
        with self._lock:
            obj = self._configmaps.pop((namespace, name))
            self._rv += 1
            gone = copy.deepcopy(obj)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._history.append(HistoryEntry(self._rv, "DELETED", gone))
            self._lock.notify_all()
            return str(self._rv)

    def get_configmap(self, namespace: str, name: str) -> JSON | None:
        with self._lock:
            obj = self._configmaps.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def put_object(self, resource: str, obj: JSON) -> JSON:
        """Create or replace a namespace, pod, deployment, statefulset or daemonset (given as a
        manifest); returns the stored object (uid, resourceVersion, creationTimestamp set)."""
        kind, api_version = OBJECT_KINDS[resource]
        meta = obj.get("metadata") or {}
        namespace = "" if resource == "namespaces" else str(meta.get("namespace") or "default")
        name = str(meta["name"])
        with self._lock:
            self._rv += 1
            stored = copy.deepcopy(obj)
            stored["kind"], stored["apiVersion"] = kind, api_version
            old = self._objects.get((resource, namespace, name))
            new_meta = stored.setdefault("metadata", {})
            new_meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
            new_meta.setdefault("creationTimestamp", _now())
            new_meta["resourceVersion"] = str(self._rv)
            if resource != "namespaces":
                new_meta["namespace"] = namespace
            self._objects[(resource, namespace, name)] = stored
            return copy.deepcopy(stored)

    def delete_object(self, resource: str, namespace: str, name: str) -> None:
        with self._lock:
            self._rv += 1
            self._objects.pop((resource, "" if resource == "namespaces" else namespace, name))

    def serve_pod_port(self, namespace: str, pod: str, port: int, target: str) -> None:
        """The pod proxy forwards ``pods/POD:PORT/proxy/...`` to ``target`` (http://host:port),
        as the API server would dial the pod's IP and port."""
        with self._lock:
            self._pod_ports[(namespace, pod, port)] = target.rstrip("/")

    def forbid(self, resource: str, verb: str) -> None:
        with self._lock:
            self.forbidden.add((resource, verb))

    def expire_history(self, *, notify_watchers: bool = True) -> None:
        """Compact: every version up to now is gone. Open watches get an ERROR 410 event."""
        with self._lock:
            self._compacted = self._rv + 1
            self._history.clear()
            if notify_watchers:
                self._expire_epoch += 1
            self._lock.notify_all()

    def send_raw_watch_line(self, line: bytes) -> None:
        """Every open watch stream gets ``line`` as it is, in a chunk of its own (a corrupt or
        truncated event, as a broken proxy or server might send); the watches then go on."""
        with self._lock:
            self._raw_lines.append(line)
            self._lock.notify_all()

    def rotate_token(self, new: str, *, keep_old: bool = False) -> None:
        with self._lock:
            self._tokens = ({*self._tokens, new}) if keep_old else {new}

    @property
    def open_watches(self) -> int:
        """Watch streams being served right now by this run of the server."""
        with self._lock:
            return self._generation.open_watches

    def watch_count(self) -> int:
        """Watch requests received so far (each reconnect is one)."""
        with self._lock:
            return sum(1 for r in self.requests if r.query.get("watch") in ("true", "1"))

    def requests_matching(self, pred: Callable[[RecordedRequest], bool]) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if pred(r)]

    def events_for(self, namespace: str, name: str) -> list[JSON]:
        with self._lock:
            return [
                copy.deepcopy(e)
                for (ns, _), e in self.events.items()
                if ns == namespace and e.get("involvedObject", {}).get("name") == name
            ]

    def write_kubeconfig(
        self, path: Path, *, token: str | None = None, namespace: str = "default"
    ) -> Path:
        cluster: JSON = {"server": self.url}
        if self.ca_path is not None:
            cluster["certificate-authority"] = str(self.ca_path)
        user: JSON = {"token": token if token is not None else next(iter(self._tokens), "")}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    # -- request handling (called from handler threads) ------------------------------------------

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _token_ok(self, authorization: str | None) -> bool:
        if not self.auth_required:
            return True
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            return scheme.lower() == "bearer" and token.strip() in self._tokens

    def _may_read(self, namespace: str, name: str | None) -> bool:
        if self.allowed_configmaps is None:
            return True
        return name is not None and (namespace, name) in self.allowed_configmaps

    def _list(self, namespace: str, name: str | None) -> JSON:
        with self._lock:
            items = [
                copy.deepcopy(obj)
                for (ns, n), obj in sorted(self._configmaps.items())
                if ns == namespace and (name is None or n == name)
            ]
            return {
                "kind": "ConfigMapList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def _watch_events(
        self,
        *,
        generation: _Generation,
        namespace: str,
        name: str | None,
        since: int | None,
        deadline: float,
        bookmarks: bool,
    ) -> Iterator[JSON | bytes]:
        """Yield watch events until the deadline, a restart, or a compaction (ERROR 410)."""
        with self._lock:
            epoch = self._expire_epoch
            generation.open_watches += 1
        try:
            yield from self._watch_events_counted(
                generation=generation,
                namespace=namespace,
                name=name,
                since=since,
                deadline=deadline,
                bookmarks=bookmarks,
                epoch=epoch,
            )
        finally:
            with self._lock:
                generation.open_watches -= 1

    def _watch_events_counted(
        self,
        *,
        generation: _Generation,
        namespace: str,
        name: str | None,
        since: int | None,
        deadline: float,
        bookmarks: bool,
        epoch: int,
    ) -> Iterator[JSON | bytes]:
        with self._lock:
            raw_sent = len(self._raw_lines)
            too_old = bool(since is not None and since + 1 < self._compacted)
            if since is None:  # "any version": synthetic ADDED events for the current state
                position = self._rv
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (ns, n), obj in sorted(self._configmaps.items())
                    if ns == namespace and (name is None or n == name)
                ]
            else:
                position = since
                initial = []
        if too_old:
            yield {"type": "ERROR", "object": _gone(position)}
            return
        yield from initial
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            with self._lock:
                if self._expire_epoch != epoch:
                    yield {"type": "ERROR", "object": _gone(position)}
                    return
                raw = self._raw_lines[raw_sent:]
                raw_sent = len(self._raw_lines)
            yield from raw
            with self._lock:
                pending = [
                    e
                    for e in self._history
                    if e.rv > position
                    and e.obj["metadata"]["namespace"] == namespace
                    and (name is None or e.obj["metadata"]["name"] == name)
                ]
                if pending:
                    position = max(e.rv for e in pending)
                elif self._history and self._history[-1].rv > position:
                    position = self._history[-1].rv
                if not pending:
                    now = time.monotonic()
                    if generation.stopped.is_set() or now >= deadline:
                        return
                    if bookmarks and now >= next_bookmark:
                        next_bookmark = now + self.bookmark_interval
                        position = self._rv
                        yield _bookmark(self._rv)
                        continue
                    wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                    self._lock.wait(timeout=max(0.0, min(wait, 0.25)))
                    continue
            for entry in pending:
                yield {"type": entry.type, "object": copy.deepcopy(entry.obj)}

    def _too_old(self, since: int | None) -> bool:
        with self._lock:
            return since is not None and since + 1 < self._compacted

    def _create_event(self, namespace: str, body: JSON, api: str) -> tuple[int, JSON]:
        if api == "events.k8s.io/v1":
            problems = [
                f"{key}: Required value"
                for key in (
                    "regarding",
                    "reason",
                    "type",
                    "eventTime",
                    "reportingController",
                    "reportingInstance",
                    "action",
                )
                if not body.get(key)
            ]
        else:
            problems = [
                f"{key}: Required value"
                for key in ("involvedObject", "reason", "type")
                if not body.get(key)
            ]
            involved = body.get("involvedObject") or {}
            problems += [
                f"involvedObject.{key}: Required value"
                for key in ("kind", "name", "namespace", "uid")
                if not involved.get(key)
            ]
        if body.get("type") not in (None, "Normal", "Warning"):
            problems.append("type: Unsupported value")
        if len(body.get("message", "") or body.get("note", "") or "") > 1024:
            problems.append("message: Too long: may not be longer than 1024")
        metadata = body.get("metadata") or {}
        name = str(metadata.get("name") or "")
        if not name:
            problems.append("metadata.name: Required value")
        if problems:
            return 422, status_body(422, "Invalid", "Event is invalid: " + "; ".join(problems))
        with self._lock:
            if (namespace, name) in self.events:
                return 409, status_body(409, "AlreadyExists", f'events "{name}" already exists')
            self._rv += 1
            stored = copy.deepcopy(body)
            stored.setdefault("kind", "Event")
            stored["apiVersion"] = api
            stored["metadata"] = {
                **metadata,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(self._rv),
                "creationTimestamp": _now(),
            }
            if api == "events.k8s.io/v1":  # the same object, seen through core/v1
                stored["involvedObject"] = stored.get("regarding")
                stored["message"] = stored.get("note")
            self.events[(namespace, name)] = stored
            self._lock.notify_all()
            return 201, copy.deepcopy(stored)

    def _patch_event(self, namespace: str, name: str, patch: JSON) -> tuple[int, JSON]:
        with self._lock:
            event = self.events.get((namespace, name))
            if event is None:
                return 404, status_body(404, "NotFound", f'events "{name}" not found')
            _merge(event, patch)
            self._rv += 1
            event["metadata"]["resourceVersion"] = str(self._rv)
            return 200, copy.deepcopy(event)

    def _get_event(self, namespace: str, name: str) -> tuple[int, JSON]:
        with self._lock:
            event = self.events.get((namespace, name))
            if event is None:
                return 404, status_body(404, "NotFound", f'events "{name}" not found')
            return 200, copy.deepcopy(event)

    def _list_events(self, namespace: str, selector: dict[str, str]) -> JSON:
        def matches(event: JSON) -> bool:
            for path, value in selector.items():
                node: Any = event
                for part in path.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if str(node or "") != value:
                    return False
            return True

        with self._lock:
            return {
                "kind": "EventList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": [
                    copy.deepcopy(e)
                    for (ns, _), e in sorted(self.events.items())
                    if ns == namespace and matches(e)
                ],
            }


def _resource(name: str, kind: str, verbs: list[str], short: list[str]) -> JSON:
    return {
        "name": name,
        "singularName": kind.lower(),
        "namespaced": True,
        "kind": kind,
        "verbs": verbs,
        "shortNames": short,
    }


def _discovery(host: str, port: int) -> dict[str, JSON]:
    """Legacy discovery documents for what we serve (kubectl reads these before anything)."""
    events_group = {
        "name": "events.k8s.io",
        "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "events.k8s.io/v1", "version": "v1"},
    }
    apps_group = {
        "name": "apps",
        "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
    }
    return {
        "/version": {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0",
            "platform": "linux/amd64",
        },
        "/api": {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{host}:{port}"}
            ],
        },
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [apps_group, events_group]},
        "/api/v1": {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                _resource("configmaps", "ConfigMap", ["get", "list", "watch"], ["cm"]),
                _resource("events", "Event", ["create", "get", "list", "patch"], ["ev"]),
                _resource("pods", "Pod", ["get", "list"], ["po"]),
                {**_resource("pods/proxy", "PodProxyOptions", ["get"], []), "singularName": ""},
                {
                    **_resource("namespaces", "Namespace", ["get", "list"], ["ns"]),
                    "namespaced": False,
                },
            ],
        },
        "/apis/apps/v1": {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apps/v1",
            "resources": [
                _resource("deployments", "Deployment", ["get", "list"], ["deploy"]),
                _resource("statefulsets", "StatefulSet", ["get", "list"], ["sts"]),
                _resource("daemonsets", "DaemonSet", ["get", "list"], ["ds"]),
            ],
        },
        "/apis/events.k8s.io/v1": {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "events.k8s.io/v1",
            "resources": [_resource("events", "Event", ["create", "get", "list", "patch"], ["ev"])],
        },
    }


def _gone(position: int) -> JSON:
    return status_body(410, "Expired", f"too old resource version: {position} (compacted)")


def _bookmark(rv: int) -> JSON:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(rv)},
        },
    }


EVENT_FIELDS = frozenset(
    {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "reason",
        "type",
    }
)


def _event_selector(selector: str | None) -> dict[str, str] | None:
    """The equality field selectors the API server supports on core/v1 Events."""
    terms: dict[str, str] = {}
    for term in (selector or "").split(","):
        if not term:
            continue
        key, sep, value = term.partition("=")
        if not sep or key.rstrip("=") not in EVENT_FIELDS:
            return None
        terms[key.rstrip("=")] = value.lstrip("=")
    return terms


def _field_name(selector: str | None) -> tuple[str | None, str | None]:
    """``metadata.name=x`` -> ("x", None); anything else we do not serve -> (None, error)."""
    if not selector:
        return None, None
    names: list[str] = []
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        key = key.rstrip("=")
        value = value.lstrip("=")
        if not sep or key != "metadata.name":
            return None, f'"{term}" is not a known field selector: only "metadata.name" is served'
        names.append(value)
    if len(set(names)) != 1:
        return "", None  # contradictory terms select nothing
    return names[0], None


OBJECT_KINDS: dict[str, tuple[str, str]] = {
    "namespaces": ("Namespace", "v1"),
    "pods": ("Pod", "v1"),
    "deployments": ("Deployment", "apps/v1"),
    "statefulsets": ("StatefulSet", "apps/v1"),
    "daemonsets": ("DaemonSet", "apps/v1"),
}


def _split_terms(selector: str) -> list[str]:
    """Split on the commas outside parentheses ("a in (x,y),b" is two terms)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms if t.strip()]


def _label_selector(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """The API server's label selector grammar: =, ==, !=, in, notin, exists, !exists."""
    reqs: list[tuple[str, str, frozenset[str]]] = []  # (op, key, values)
    for term in _split_terms(selector or ""):
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split("(", 1)[0].strip() in ("in", "notin"):
            op, _, values_text = words[1].partition("(")
            if not values_text.endswith(")"):
                raise ValueError(f"{term!r}: missing ')'")
            values = frozenset(v.strip() for v in values_text[:-1].split(","))
            reqs.append((op.strip(), words[0], values))
        elif "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            reqs.append(("notin", key, frozenset({value})))
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            reqs.append(("in", key, frozenset({value})))
        elif term.startswith("!"):
            reqs.append(("!exists", term[1:].strip(), frozenset()))
        elif all(ch.isalnum() or ch in "-_./" for ch in term):
            reqs.append(("exists", term, frozenset()))
        else:
            raise ValueError(f"{term!r}")

    def matches(labels: dict[str, str]) -> bool:
        for op, key, values in reqs:
            ok = {
                "in": labels.get(key) in values,
                "notin": labels.get(key) not in values,
                "exists": key in labels,
                "!exists": key not in labels,
            }[op]
            if not ok:
                return False
        return True

    return matches


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeKubeAPI
    generation: _Generation
    _request: RecordedRequest
    _recorded: bool
    _raw_body: bytes
    _query: dict[str, str]
    _status: int

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        # Headers and body go out in separate writes; without NODELAY, Nagle and delayed ACKs
        # add 40 ms to each response, as a real server's Go net/http does not.
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        with self.api._lock:
            self.generation.sockets.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.generation.sockets.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        # The client went away, or the server was stopped under it.
        with contextlib.suppress(OSError, ssl.SSLError):
            super().handle()

    # -- helpers --------------------------------------------------------------------------------

    def _send_json(self, code: int, body: JSON) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._status = code

    def _status_reply(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, status_body(code, reason, message))

    def _body(self) -> JSON:
        loaded = json.loads(self._raw_body or b"{}")
        if not isinstance(loaded, dict):
            raise ValueError("body is not a JSON object")
        return loaded

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._recorded = False
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        auth = self.headers.get("Authorization")
        self._request = RecordedRequest(method, parsed.path, query, auth, 200)
        # Read the body whatever the answer, or it would be taken for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        self._raw_body = self.rfile.read(length) if length else b""
        try:
            if self.generation.stopped.is_set():
                self.close_connection = True
                return
            if not self.api._token_ok(auth):
                self._status_reply(401, "Unauthorized", "Unauthorized")
                return
            self._query = query
            self._route(method, parsed.path, query)
        finally:
            if not self._recorded:
                self.api._record(RecordedRequest(method, parsed.path, query, auth, self._status))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        parts = [p for p in path.split("/") if p]
        discovery = _discovery(self.api.host, self.api.port).get(path.rstrip("/"))
        if method == "GET" and discovery is not None:  # what kubectl asks first
            self._send_json(200, discovery)
            return
        if method == "GET" and self._objects_route(parts, query):
            return
        # /api/v1/namespaces/{ns}/{resource}[/{name}]
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (5, 6):
            ns, resource = parts[3], parts[4]
            name = parts[5] if len(parts) == 6 else None
            if resource == "configmaps" and method == "GET":
                self._configmaps(ns, name, query)
                return
            if resource == "events":
                self._events(method, ns, name, "v1")
                return
        # /apis/events.k8s.io/v1/namespaces/{ns}/events[/{name}]
        if (
            parts[:4] == ["apis", "events.k8s.io", "v1", "namespaces"]
            and len(parts) in (6, 7)
            and parts[5] == "events"
        ):
            name = parts[6] if len(parts) == 7 else None
            self._events(method, parts[4], name, "events.k8s.io/v1")
            return
        self._status_reply(404, "NotFound", "the server could not find the requested resource")

    # -- namespaces, pods, workloads, the pod proxy ----------------------------------------------

    def _objects_route(self, raw_parts: list[str], query: dict[str, str]) -> bool:
        """Serve what `kubectl egress` reads; False when the path is not one of those."""
        # The API server routes on the decoded path (Go's URL.Path): the client sends the pod
        # proxy's "NAME:PORT" and "PATH" percent-encoded.
        parts = [urllib.parse.unquote(p) for p in raw_parts]
        if parts[:2] == ["api", "v1"]:
            rest, group = parts[2:], ""
        elif parts[:3] == ["apis", "apps", "v1"]:
            rest, group = parts[3:], "apps"
        else:
            return False
        if group == "" and rest[:1] == ["namespaces"] and len(rest) <= 2:
            self._get_or_list("namespaces", "", rest[1] if len(rest) == 2 else None, query, group)
            return True
        if len(rest) == 1:  # across namespaces: /api/v1/pods, /apis/apps/v1/deployments
            resource, ns, name = rest[0], None, None
        elif rest[:1] == ["namespaces"] and len(rest) in (3, 4):
            resource, ns, name = rest[2], rest[1], rest[3] if len(rest) == 4 else None
        elif rest[:1] == ["namespaces"] and len(rest) >= 5 and rest[2] == "pods" and group == "":
            if rest[4] != "proxy":
                return False
            self._pod_proxy(rest[1], rest[3], "/".join(rest[5:]))
            return True
        else:
            return False
        wanted = {"": ("pods",), "apps": ("deployments", "statefulsets", "daemonsets")}[group]
        if resource not in wanted:
            return False
        self._get_or_list(resource, ns, name, query, group)
        return True

    def _refuse(
        self, resource: str, verb: str, ns: str | None, group: str, name: str | None
    ) -> bool:
        if (resource, verb) not in self.api.forbidden:
            return False
        what = resource.split("/", maxsplit=1)[0]
        sub = resource.partition("/")[2]
        subject = f'{what} "{name}"' if name else what
        where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
        self._status_reply(
            403,
            "Forbidden",
            f'{subject} is forbidden: User "{self.api.user}" cannot {verb} resource "{what}"'
            + (f' subresource "{sub}"' if sub else "")
            + f' in API group "{group}"{where}',
        )
        return True

    def _get_or_list(
        self, resource: str, ns: str | None, name: str | None, query: dict[str, str], group: str
    ) -> None:
        api = self.api
        verb = "get" if name is not None else "list"
        if self._refuse(resource, verb, ns, group, name):
            return
        with api._lock:
            if name is not None:
                obj = api._objects.get((resource, ns or "", name))
                if obj is None:
                    self._status_reply(404, "NotFound", f'{resource} "{name}" not found')
                else:
                    self._send_json(200, copy.deepcopy(obj))
                return
            try:
                selector = _label_selector(query.get("labelSelector"))
            except ValueError as err:
                self._status_reply(400, "BadRequest", f"unable to parse requirement: {err}")
                return
            items = [
                copy.deepcopy(obj)
                for (res, obj_ns, _), obj in sorted(api._objects.items())
                if res == resource
                and (ns is None or obj_ns == ns)
                and selector((obj.get("metadata") or {}).get("labels") or {})
            ]
            kind, api_version = OBJECT_KINDS[resource]
            body = {
                "kind": f"{kind}List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(api._rv)},
                "items": items,
            }
        self._send_json(200, body)

    def _pod_proxy(self, ns: str, target: str, path: str) -> None:
        name, _, port_text = target.partition(":")
        if self._refuse("pods/proxy", "get", ns, "", name):
            return
        api = self.api
        with api._lock:
            pod = api._objects.get(("pods", ns, name))
            base = api._pod_ports.get((ns, name, int(port_text or 80)))
        if pod is None:
            self._status_reply(404, "NotFound", f'pods "{name}" not found')
            return
        url = f"{base}/{path}" if base else None
        if url is None:
            self._status_reply(
                503,
                "ServiceUnavailable",
                f"error trying to reach service: dial tcp 10.244.0.7:{port_text or 80}: "
                "connect: connection refused",
            )
            return
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                code, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
        except urllib.error.HTTPError as err:  # the pod's own error status passes through
            code, body, ctype = err.code, err.read(), err.headers.get("Content-Type")
        except OSError as err:
            self._status_reply(503, "ServiceUnavailable", f"error trying to reach service: {err}")
            return
        self.send_response(code)
        self.send_header("Content-Type", ctype or "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._status = code

    def _forbidden(self, verb: str, ns: str) -> None:
        self._status_reply(
            403,
            "Forbidden",
            f'configmaps is forbidden: User "system:serviceaccount:{ns}:egress-sidecar" cannot '
            f'{verb} resource "configmaps" in API group "" in the namespace "{ns}"',
        )

    def _configmaps(self, ns: str, name: str | None, query: dict[str, str]) -> None:
        api = self.api
        verb = "get" if name else "watch" if query.get("watch") in ("true", "1") else "list"
        if self._refuse("configmaps", verb, ns, "", name):
            return
        if name is not None:  # GET one
            if not api._may_read(ns, name):
                self._forbidden("get", ns)
                return
            obj = api.get_configmap(ns, name)
            if obj is None:
                self._status_reply(404, "NotFound", f'configmaps "{name}" not found')
                return
            self._send_json(200, obj)
            return
        selected, error = _field_name(query.get("fieldSelector"))
        if error is not None:
            self._status_reply(400, "BadRequest", error)
            return
        watching = query.get("watch") in ("true", "1")
        if not api._may_read(ns, selected):
            self._forbidden("watch" if watching else "list", ns)
            return
        if not watching:
            self._send_json(200, api._list(ns, selected))
            return
        rv_text = query.get("resourceVersion")
        since = int(rv_text) if rv_text not in (None, "", "0") else None
        if api.gone_as_http and api._too_old(since):
            self._send_json(410, _gone(since or 0))
            return
        timeout = float(query.get("timeoutSeconds", "1800"))
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._status = 200
        self._recorded = True  # a watch is recorded when it opens, not when it ends
        api._record(self._request)
        self._stream_watch(ns, selected, since, deadline, bookmarks)

    def _stream_watch(
        self, ns: str, selected: str | None, since: int | None, deadline: float, bookmarks: bool
    ) -> None:
        api = self.api
        for event in api._watch_events(
            generation=self.generation,
            namespace=ns,
            name=selected,
            since=since,
            deadline=deadline,
            bookmarks=bookmarks,
        ):
            line = event if isinstance(event, bytes) else json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        if self.generation.stopped.is_set():
            self.close_connection = True  # cut, as a dying server does: no terminating chunk
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _patch(self, ns: str, name: str) -> tuple[int, JSON]:
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        patch = json.loads(self._raw_body or b"null")
        if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                return 400, status_body(400, "BadRequest", "a merge patch must be a JSON object")
            return self.api._patch_event(ns, name, patch)
        if kind == "application/json-patch+json":
            if not isinstance(patch, list):
                return 400, status_body(400, "BadRequest", "a JSON patch must be a JSON array")
            code, current = self.api._get_event(ns, name)
            if code != 200:
                return code, current
            patched = jsonpatch.apply_patch(current, patch)
            return self.api._patch_event(ns, name, patched)
        return 415, status_body(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            f"application/json-patch+json, application/merge-patch+json (got {kind!r})",
        )

    def _events(self, method: str, ns: str, name: str | None, api_version: str) -> None:
        api = self.api
        verb = {"POST": "create", "PATCH": "patch"}.get(method, "get" if name else "list")
        if api.event_verbs is not None and verb not in api.event_verbs:
            self._status_reply(
                403,
                "Forbidden",
                f'events is forbidden: User "system:serviceaccount:{ns}:egress-sidecar" cannot '
                f'{verb} resource "events" in API group "" in the namespace "{ns}"',
            )
            return
        try:
            if method == "POST" and name is None:
                code, body = api._create_event(ns, self._body(), api_version)
            elif method == "PATCH" and name is not None:
                code, body = self._patch(ns, name)
            elif method == "GET" and name is not None:
                code, body = api._get_event(ns, name)
            elif method == "GET":
                selector = _event_selector(self._query.get("fieldSelector"))
                if selector is None:
                    code, body = 400, status_body(400, "BadRequest", "unsupported field selector")
                else:
                    code, body = 200, api._list_events(ns, selector)
            else:
                code, body = 405, status_body(405, "MethodNotAllowed", f"{method} is not supported")
        except ValueError as err:
            code, body = 400, status_body(400, "BadRequest", f"invalid body: {err}")
        self._send_json(code, body)


def _make_ca_and_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    from tests.support.tls import TestCA

    workdir.mkdir(parents=True, exist_ok=True)
    ca = TestCA("fake-kube-ca")
    cert_path, key_path = ca.issue("kube-apiserver", "localhost", "127.0.0.1").write(
        workdir, "apiserver"
    )
    return ca.write_ca(workdir / "ca.crt"), cert_path, key_path


def wait_until[T](predicate: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
