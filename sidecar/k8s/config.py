"""Where the API server is and how to authenticate: in-cluster service account or a kubeconfig.

The sidecar speaks the API's HTTP itself (sidecar.k8s.client) instead of importing the official
``kubernetes`` package, which costs ~20 MiB of RSS in every pod for the three calls we make.
This module reads the same configuration the official client reads:

- in cluster: ``$KUBERNETES_SERVICE_HOST``/``$KUBERNETES_SERVICE_PORT``, the service account's
  ``token`` (re-read once a minute, as client-go does, and at once after a 401: the kubelet
  rotates bound tokens) and ``ca.crt``;
- a kubeconfig: its current context's cluster (``server``, ``certificate-authority[-data]``,
  ``insecure-skip-tls-verify``, ``tls-server-name``) and user (``token``, ``tokenFile``,
  ``client-certificate[-data]``/``client-key[-data]``, ``username``/``password``).

An ``exec`` or ``auth-provider`` user needs a plugin binary or a cloud SDK: refused with an error
that points at in-cluster config or a token (the sidecar runs in a pod).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SERVICE_HOST_ENV_NAME = "KUBERNETES_SERVICE_HOST"
SERVICE_PORT_ENV_NAME = "KUBERNETES_SERVICE_PORT"
TOKEN_REFRESH_SECONDS = 60.0  # client-go's cached file token source re-reads once a minute


class KubeConfigError(Exception):
    """No usable way to reach the API server; says which configuration was tried and why."""


class TokenFile:
    """A bearer token read from a file, re-read when due or when forced (after a 401)."""

    def __init__(self, path: Path, refresh: float = TOKEN_REFRESH_SECONDS) -> None:
        self.path = path
        self.refresh = refresh
        self._lock = threading.Lock()
        self._token = self._read()
        self.expires_at = time.monotonic() + refresh  # tests move it to make a re-read due

    def _read(self) -> str:
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise KubeConfigError(f"token file does not exist: {self.path}") from None
        except OSError as err:
            raise KubeConfigError(f"cannot read token file {self.path}: {err}") from err
        if not token:
            raise KubeConfigError(f"token file is empty: {self.path}")
        return token

    def token(self) -> str:
        with self._lock:
            if time.monotonic() >= self.expires_at:
                try:
                    self._reload_locked()
                except KubeConfigError as err:
                    # Mid-rotation or a transient mount problem: the token we have may still
                    # be valid; a 401 forces another attempt, the next period retries anyway.
                    log.warning("could not re-read the Kubernetes token, keeping the last: %s", err)
            return self._token

    def reload(self) -> None:
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        # A failed re-read keeps the token we have: it may still be valid for a while.
        self.expires_at = time.monotonic() + self.refresh
        self._token = self._read()


@dataclass(frozen=True)
class ClusterAccess:
    """Everything needed to open an authenticated connection to the API server."""

    mode: str  # "in-cluster" | "kubeconfig"
    server: str  # scheme://host:port[/prefix], as configured
    ssl_context: ssl.SSLContext | None  # None for plain http
    server_hostname: str | None = None  # tls-server-name: the name the certificate must carry
    token: str | None = None
    token_file: TokenFile | None = None
    basic_auth: str | None = None  # "user:password"
    namespace: str | None = None  # the kubeconfig context's namespace

    def authorization(self) -> str | None:
        if self.token_file is not None:
            return f"Bearer {self.token_file.token()}"
        if self.token:
            return f"Bearer {self.token}"
        if self.basic_auth is not None:
            return "Basic " + base64.b64encode(self.basic_auth.encode()).decode("ascii")
        return None

    def reload_credentials(self) -> None:
        if self.token_file is not None:
            self.token_file.reload()


# -- in cluster ----------------------------------------------------------------------------------


def load_incluster(sa_dir: Path, environ: Mapping[str, str]) -> ClusterAccess:
    host = environ.get(SERVICE_HOST_ENV_NAME, "")
    port = environ.get(SERVICE_PORT_ENV_NAME, "")
    if not host or not port:
        raise KubeConfigError(
            f"${SERVICE_HOST_ENV_NAME} and ${SERVICE_PORT_ENV_NAME} must both be set"
        )
    token = TokenFile(sa_dir / "token")
    ca = sa_dir / "ca.crt"
    if not ca.is_file():
        raise KubeConfigError(f"service account CA file does not exist: {ca}")
    context = _tls_context(ca_file=str(ca))
    authority = f"[{host}]" if ":" in host else host
    return ClusterAccess("in-cluster", f"https://{authority}:{port}", context, token_file=token)


# -- kubeconfig ----------------------------------------------------------------------------------


def read_kubeconfig(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise KubeConfigError(f"cannot read: {err}") from err
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise KubeConfigError(f"not valid YAML: {err}") from err
    if not isinstance(doc, dict):
        raise KubeConfigError("not a kubeconfig (not a mapping)")
    return doc


def _named(doc: Mapping[str, Any], section: str, name: str, inner: str) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(inner) or {}
            if not isinstance(value, dict):
                raise KubeConfigError(f"{section} entry {name!r} has no {inner} mapping")
            return value
    raise KubeConfigError(f"no {section[:-1]} named {name!r}")


def current_context(doc: Mapping[str, Any]) -> dict[str, Any]:
    name = doc.get("current-context")
    if not name:
        raise KubeConfigError("no current-context set")
    return _named(doc, "contexts", str(name), "context")


def load_kubeconfig(path: str) -> ClusterAccess:
    doc = read_kubeconfig(path)
    base = Path(path).resolve().parent  # relative file names are relative to the kubeconfig
    context = current_context(doc)
    cluster = _named(doc, "clusters", str(context.get("cluster") or ""), "cluster")
    user = _named(doc, "users", str(context["user"]), "user") if context.get("user") else {}
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise KubeConfigError(
                f"the user of context {doc.get('current-context')!r} authenticates with "
                f"{plugin!r}, which the sidecar does not run: in a pod use the in-cluster "
                "service account (no --kubeconfig), or give the kubeconfig user a token or "
                "tokenFile"
            )
    if cluster.get("proxy-url"):
        raise KubeConfigError("the cluster's proxy-url is not supported")
    server = str(cluster.get("server") or "")
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise KubeConfigError(f"cluster server {server!r} is not an http(s) URL")
    context_ssl = None
    if parsed.scheme == "https":
        context_ssl = _tls_context(
            ca_file=_path(base, cluster.get("certificate-authority")),
            ca_data=_b64(cluster, "certificate-authority-data"),
            cert_file=_path(base, user.get("client-certificate")),
            cert_data=_b64(user, "client-certificate-data"),
            key_file=_path(base, user.get("client-key")),
            key_data=_b64(user, "client-key-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )
    token_file = None
    if user.get("tokenFile") and not user.get("token"):
        token_file = TokenFile(Path(_path(base, user["tokenFile"]) or ""))
    basic = None
    if user.get("username") and user.get("password"):
        basic = f"{user['username']}:{user['password']}"
    namespace = context.get("namespace")
    return ClusterAccess(
        "kubeconfig",
        server.rstrip("/"),
        context_ssl,
        server_hostname=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
        token=str(user["token"]) if user.get("token") else None,
        token_file=token_file,
        basic_auth=basic,
        namespace=str(namespace) if namespace else None,
    )


def kubeconfig_namespace(path: str) -> str | None:
    """The current context's namespace, "default" if it names none; None if unreadable."""
    try:
        namespace = current_context(read_kubeconfig(path)).get("namespace")
    except KubeConfigError:
        return None
    return str(namespace) if namespace else "default"


def _path(base: Path, value: Any) -> str | None:
    if not value:
        return None
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else base / path)


def _b64(section: Mapping[str, Any], key: str) -> bytes | None:
    value = section.get(key)
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as err:
        raise KubeConfigError(f"{key} is not valid base64: {err}") from err


def _tls_context(
    *,
    ca_file: str | None = None,
    ca_data: bytes | None = None,
    cert_file: str | None = None,
    cert_data: bytes | None = None,
    key_file: str | None = None,
    key_data: bytes | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    # A client context verifying host names; the system CA store only when the cluster names no
    # CA of its own: loading that store costs ~2 MiB of RSS.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif ca_file or ca_data:
            if ca_file:
                context.load_verify_locations(cafile=ca_file)
            if ca_data:
                context.load_verify_locations(cadata=ca_data.decode("ascii", "replace"))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cert_file or cert_data:
            if not (key_file or key_data):
                raise KubeConfigError("a client certificate without its client key")
            _load_client_cert(context, cert_file, cert_data, key_file, key_data)
    except (OSError, ssl.SSLError) as err:
        raise KubeConfigError(f"TLS configuration: {err}") from err
    return context


def _load_client_cert(
    context: ssl.SSLContext,
    cert_file: str | None,
    cert_data: bytes | None,
    key_file: str | None,
    key_data: bytes | None,
) -> None:
    # ssl loads a certificate chain only from files: inline data goes through a private,
    # short-lived directory (mode 0700) that is removed as soon as it is loaded.
    with tempfile.TemporaryDirectory(prefix="egress-kube-") as tmp:
        if cert_data is not None:
            cert_file = os.path.join(tmp, "client.crt")
            Path(cert_file).write_bytes(cert_data)
        if key_data is not None:
            key_file = os.path.join(tmp, "client.key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key_data)
        if cert_file is None or key_file is None:
            raise KubeConfigError("a client certificate without its client key")
        context.load_cert_chain(cert_file, key_file)
