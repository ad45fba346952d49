"""How the sidecar reaches the API server: in-cluster service account, or a kubeconfig file.

In a pod the token file is rotated by the kubelet (bound service account tokens expire after an
hour at most). The official client's in-cluster loader, with ``try_refresh_token=True``, re-reads
the file once a minute; on a 401 we also re-read it at once (``refresh_credentials``), so a
rotation never costs more than one rejected request.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as _k8s_config
from kubernetes.config import incluster_config as _incluster

from sidecar.contract import ENV_POD_NAMESPACE

# The client's config loaders carry no annotations; we call them through Any.
k8s_config: Any = _k8s_config
InClusterConfigLoader: Any = _incluster.InClusterConfigLoader
SERVICE_HOST_ENV_NAME: str = _incluster.SERVICE_HOST_ENV_NAME
SERVICE_PORT_ENV_NAME: str = _incluster.SERVICE_PORT_ENV_NAME

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where the token, ca.crt and namespace files are; overridable for tests and odd mounts.
ENV_SERVICEACCOUNT_DIR = "EGRESS_SERVICEACCOUNT_DIR"
USER_AGENT = "egress-sidecar"


class KubeConfigError(Exception):
    """No usable way to reach the API server; says which configuration was tried and why."""


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
        try:
            _, context = k8s_config.list_kube_config_contexts(config_file=opts.kubeconfig)
        except Exception:  # a broken kubeconfig is reported when we connect
            return None
        namespace = (context or {}).get("context", {}).get("namespace")
        return str(namespace) if namespace else "default"
    return None


class KubeClient:
    """One configured ``ApiClient`` shared by the watchers and the Event recorder."""

    def __init__(self, opts: ClientOptions, environ: Mapping[str, str] | None = None) -> None:
        self._opts = opts
        self._environ = dict(os.environ if environ is None else environ)
        self._lock = threading.Lock()
        self.incluster_loader: Any = None
        self.configuration = k8s.Configuration()
        self.mode = self._load(self.configuration)
        self.api_client: Any = k8s.ApiClient(self.configuration)
        self.api_client.user_agent = USER_AGENT

    @property
    def host(self) -> str:
        return str(self.configuration.host)

    def _load(self, configuration: Any) -> str:
        if self._opts.kubeconfig:
            try:
                k8s_config.load_kube_config(
                    config_file=self._opts.kubeconfig,
                    client_configuration=configuration,
                    persist_config=False,
                )
            except Exception as err:
                raise KubeConfigError(f"kubeconfig {self._opts.kubeconfig}: {err}") from err
            return "kubeconfig"
        if not self._environ.get(SERVICE_HOST_ENV_NAME):
            raise KubeConfigError(
                f"not running in a pod (${SERVICE_HOST_ENV_NAME} is unset) "
                "and no --kubeconfig given"
            )
        sa_dir = serviceaccount_dir(self._opts, self._environ)
        loader = InClusterConfigLoader(
            token_filename=str(sa_dir / "token"),
            cert_filename=str(sa_dir / "ca.crt"),
            try_refresh_token=True,
            environ=self._environ,
        )
        self.incluster_loader = loader  # its token_expires_at drives the periodic re-read
        try:
            loader.load_and_set(configuration)
        except Exception as err:
            raise KubeConfigError(
                f"in-cluster config (service account in {sa_dir}, API server "
                f"{self._environ.get(SERVICE_HOST_ENV_NAME)}:"
                f"{self._environ.get(SERVICE_PORT_ENV_NAME)}): {err}"
            ) from err
        return "in-cluster"

    def refresh_credentials(self) -> None:
        """Re-read the token (after a 401): the kubelet may have rotated it."""
        with self._lock:
            try:
                self._load(self.configuration)
            except KubeConfigError as err:
                log.warning("could not reload Kubernetes credentials: %s", err)

    def core_v1(self) -> Any:
        return k8s.CoreV1Api(self.api_client)

    def close(self) -> None:
        self.api_client.close()
