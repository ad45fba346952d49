"""A small client for the few Kubernetes API calls the sidecar makes, over ``http.client``.

ConfigMap list and watch, Event create and patch: JSON over HTTP/1.1, one connection per
request (a watch lasts minutes, a list or an Event is rare), so there is no pool to manage and a
watch can be cut from another thread by shutting its socket down. The official ``kubernetes``
package stays the project's library for the injector, the CLIs and the tests; importing it here
would cost every pod ~20 MiB of RSS (see sidecar.k8s.config).

No proxy variables are read: the API server is reached directly, never through the sidecar.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.contract import ENV_POD_NAMESPACE
from sidecar.k8s.config import (
    SERVICE_HOST_ENV_NAME,
    SERVICE_PORT_ENV_NAME,
    ClusterAccess,
    KubeConfigError,
    kubeconfig_namespace,
    load_incluster,
    load_kubeconfig,
)

__all__ = [
    "ApiError",
    "ClientOptions",
    "KubeClient",
    "KubeConfigError",
    "WatchStream",
    "default_namespace",
]

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where the token, ca.crt and namespace files are; overridable for tests and odd mounts.
ENV_SERVICEACCOUNT_DIR = "EGRESS_SERVICEACCOUNT_DIR"
USER_AGENT = "egress-sidecar"
MAX_BODY = 8 * 1024 * 1024  # a list of one ConfigMap (<= 1 MiB of data) with room to spare
MAX_ERROR_BODY = 64 * 1024
MAX_WATCH_LINE = 4 * 1024 * 1024  # one event: a 1 MiB ConfigMap, JSON-escaped

type Timeout = tuple[float, float]  # (connect, read) seconds


class ApiError(Exception):
    """The API server answered with an error status (HTTP, or an ERROR event in a watch)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status}: {reason}" + (f": {message}" if message else ""))

    @classmethod
    def from_status(cls, code: int, body: bytes | Mapping[str, Any]) -> ApiError:
        """From a ``Status`` object (or whatever the body was: proxies answer HTML)."""
        status: Any = body
        if isinstance(body, bytes):
            try:
                status = json.loads(body)
            except ValueError:
                text = body.decode("utf-8", "replace").strip()
                return cls(code, http.client.responses.get(code, "Error"), text[:300])
        if not isinstance(status, Mapping):
            return cls(code, http.client.responses.get(code, "Error"), repr(status)[:300])
        code = int(status.get("code") or code)
        reason = str(status.get("reason") or http.client.responses.get(code, "Error"))
        return cls(code, reason, str(status.get("message") or "")[:300])


class WatchLineTooLongError(ValueError):
    """A watch stream line longer than any event we could accept."""


@dataclass(frozen=True, slots=True)
class ClientOptions:
    kubeconfig: str | None = None
    serviceaccount_dir: str | None = None  # None: $EGRESS_SERVICEACCOUNT_DIR or the standard mount


def serviceaccount_dir(opts: ClientOptions, environ: Mapping[str, str]) -> Path:
    return Path(
        opts.serviceaccount_dir or environ.get(ENV_SERVICEACCOUNT_DIR) or SERVICEACCOUNT_DIR
    )


def default_namespace(opts: ClientOptions, environ: Mapping[str, str] | None = None) -> str | None:
    """The pod's own namespace: the service account mount's file, then $POD_NAMESPACE, then the
    kubeconfig context's namespace (local use)."""
    env = os.environ if environ is None else environ
    ns_file = serviceaccount_dir(opts, env) / "namespace"
    try:
        text = ns_file.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    if text:
        return text
    if env.get(ENV_POD_NAMESPACE):
        return env[ENV_POD_NAMESPACE]
    if opts.kubeconfig:
        return kubeconfig_namespace(opts.kubeconfig)  # a broken one is reported on connect
    return None


class WatchStream:
    """An open watch response: ``lines()`` yields its lines; ``abort()`` cuts it from any
    thread (a blocked read then returns)."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        on_close: Callable[[WatchStream], None] = lambda _: None,
    ) -> None:
        self._conn = conn
        self._response = response
        self._on_close = on_close

    def lines(self) -> Iterator[bytes]:
        """Each line without its newline; ends when the server ends the response."""
        while True:
            line = self._response.readline(MAX_WATCH_LINE + 1)
            if not line:
                return
            if not line.endswith(b"\n"):
                if len(line) > MAX_WATCH_LINE:
                    raise WatchLineTooLongError(f"a watch event longer than {MAX_WATCH_LINE} B")
                # The response ended inside a line: the connection was cut mid-event.
                raise ConnectionError("the watch stream ended in the middle of an event")
            line = line.strip()
            if line:
                yield line

    def abort(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            # socket.socket's own shutdown, also for an SSLSocket: the reading thread gets EOF;
            # the TLS object stays intact until that thread is done with it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self._on_close(self)
        self._response.close()
        self._conn.close()


class KubeClient:
    """The API server's address and credentials, and the requests the sidecar makes."""

    def __init__(self, opts: ClientOptions, environ: Mapping[str, str] | None = None) -> None:
        self._opts = opts
        self._environ = dict(os.environ if environ is None else environ)
        self.access = self._load()
        self.mode = self.access.mode
        url = urllib.parse.urlsplit(self.access.server)
        self._https = url.scheme == "https"
        self._hostname = url.hostname or ""
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._lock = threading.Lock()
        self._streams: set[WatchStream] = set()

    @property
    def host(self) -> str:
        return self.access.server

    def _load(self) -> ClusterAccess:
        if self._opts.kubeconfig:
            try:
                return load_kubeconfig(self._opts.kubeconfig)
            except KubeConfigError as err:
                raise KubeConfigError(f"kubeconfig {self._opts.kubeconfig}: {err}") from err
        if not self._environ.get(SERVICE_HOST_ENV_NAME):
            raise KubeConfigError(
                f"not running in a pod (${SERVICE_HOST_ENV_NAME} is unset) "
                "and no --kubeconfig given"
            )
        sa_dir = serviceaccount_dir(self._opts, self._environ)
        try:
            return load_incluster(sa_dir, self._environ)
        except KubeConfigError as err:
            raise KubeConfigError(
                f"in-cluster config (service account in {sa_dir}, API server "
                f"{self._environ.get(SERVICE_HOST_ENV_NAME)}:"
                f"{self._environ.get(SERVICE_PORT_ENV_NAME)}): {err}"
            ) from err

    def refresh_credentials(self) -> None:
        """Re-read the token file now (after a 401): the kubelet may have rotated it."""
        try:
            self.access.reload_credentials()
        except KubeConfigError as err:
            log.warning("could not reload Kubernetes credentials: %s", err)

    def close(self) -> None:
        """Cut any watch still open (their watchers are stopping)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.abort()

    # -- the calls the sidecar makes ------------------------------------------------------------

    def list_configmaps(
        self, namespace: str, *, field_selector: str | None = None, timeout: Timeout = (5, 30)
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{_seg(namespace)}/configmaps"
        query = {"fieldSelector": field_selector} if field_selector else None
        return self.request("GET", path, query, timeout=timeout)

    def watch_configmaps(
        self,
        namespace: str,
        *,
        field_selector: str,
        resource_version: str | None,
        timeout_seconds: int,
        timeout: Timeout,
    ) -> WatchStream:
        query = {
            "fieldSelector": field_selector,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if resource_version:
            query["resourceVersion"] = resource_version
        path = f"/api/v1/namespaces/{_seg(namespace)}/configmaps"
        return self.open_stream(path, query, timeout=timeout)

    def create_event(
        self, namespace: str, body: Mapping[str, Any], *, timeout: Timeout
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{_seg(namespace)}/events"
        return self.request("POST", path, body=body, timeout=timeout)

    def patch_event(
        self, namespace: str, name: str, patch: Mapping[str, Any], *, timeout: Timeout
    ) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{_seg(namespace)}/events/{_seg(name)}"
        return self.request(
            "PATCH",
            path,
            body=patch,
            content_type="application/merge-patch+json",
            timeout=timeout,
        )

    # -- HTTP -----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: Timeout = (5.0, 30.0),
    ) -> dict[str, Any]:
        """One request; the JSON object answered, or ApiError for a non-2xx status."""
        conn, response = self._send(
            method, path, query, body=body, content_type=content_type, timeout=timeout
        )
        try:
            data = response.read(MAX_BODY + 1)
        finally:
            conn.close()
        if len(data) > MAX_BODY:
            raise ValueError(f"{method} {path}: response larger than {MAX_BODY} B")
        decoded = json.loads(data)
        if not isinstance(decoded, dict):
            raise ValueError(f"{method} {path}: the response is not a JSON object")
        return decoded

    def open_stream(self, path: str, query: Mapping[str, str], *, timeout: Timeout) -> WatchStream:
        conn, response = self._send(
            "GET", path, query, body=None, content_type="application/json", timeout=timeout
        )
        stream = WatchStream(conn, response, self._forget)
        with self._lock:
            self._streams.add(stream)
        return stream

    def _forget(self, stream: WatchStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        *,
        body: Mapping[str, Any] | None,
        content_type: str,
        timeout: Timeout,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        url = self._prefix + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        authorization = self.access.authorization()
        if authorization is not None:
            headers["Authorization"] = authorization
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = content_type
        conn = self._connect(timeout)
        try:
            conn.request(method, url, body=payload, headers=headers)
            response = conn.getresponse()
            if not 200 <= response.status < 300:
                raise ApiError.from_status(response.status, response.read(MAX_ERROR_BODY))
        except BaseException:
            conn.close()
            raise
        return conn, response

    def _connect(self, timeout: Timeout) -> http.client.HTTPConnection:
        connect_timeout, read_timeout = timeout
        conn = http.client.HTTPConnection(self._hostname, self._port, timeout=connect_timeout)
        conn.connect()
        try:
            if self._https:
                context = self.access.ssl_context
                if context is None:
                    raise KubeConfigError("an https server without a TLS configuration")
                # The handshake is bounded by the connect timeout, still set on the socket.
                conn.sock = context.wrap_socket(
                    conn.sock, server_hostname=self.access.server_hostname or self._hostname
                )
            conn.sock.settimeout(read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn


def _seg(value: str) -> str:
    """One path segment (names are DNS labels; quoting keeps a bad one from escaping)."""
    return urllib.parse.quote(value, safe="")
