"""Run the containers of a pod spec in the "pod" network namespace, as a kubelet would.

What is taken from the spec, exactly: ``command`` + ``args`` (with ``$(VAR)`` expansion),
``env`` (``value`` and ``valueFrom.fieldRef`` for the pod's name, namespace, node and IP, in
order, with ``$(VAR)`` references to earlier entries), the user and group
(container ``securityContext`` over the pod's), capabilities (``drop: [ALL]`` + ``add``: the
bounding set), ``allowPrivilegeEscalation: false`` (no_new_privs), ``readOnlyRootFilesystem``,
``emptyDir`` volume mounts, and the service account mount the kubelet adds
(``/var/run/secrets/kubernetes.io/serviceaccount``: token, ca.crt, namespace) unless
``automountServiceAccountToken: false``, and ``projected`` volumes of a service-account token,
the ``kube-root-ca.crt`` ConfigMap and the downward API.

What stands in for the rest: the "image" is this machine's root filesystem with the project's
virtualenv first on PATH (``egress-sidecar`` is its console script); each container gets its
own private mount namespace (``unshare -m``) where a tmpfs over /run holds the mount points,
and /etc/hosts and /etc/resolv.conf are the pod's own files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import netns as h

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# What stands in for the container image: the virtualenv and the sources it installs (editable).
IMAGE_PATHS = (Path(sys.prefix).resolve(), Path(__file__).resolve().parents[2])
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodSpecError(ValueError):
    """The pod spec asks for something this runner does not emulate; the message says what."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(sub, text)


def in_netns[T](name: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a thread switched into network namespace ``name``: sockets it binds (and
    threads it starts) live there, while the test keeps talking to the objects in-process."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join(30)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise h.HarnessError(f"call in netns {name} did not finish")
    result: T = box["value"]
    return result


@dataclass
class PodRunner:
    world: h.World
    spec: dict[str, Any]
    pod_name: str
    namespace: str
    node_name: str
    pod_ip: str
    files: Mapping[str, Path]  # e.g. {"/etc/hosts": ..., "/etc/resolv.conf": ...}
    service_account: Path  # directory with token, ca.crt, namespace
    cluster_env: Mapping[str, str]  # KUBERNETES_SERVICE_HOST/PORT, as the kubelet sets them
    volumes: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for vol in self.spec.get("volumes", []):
            path = self.world.workdir / f"volume-{vol['name']}"
            path.mkdir()
            if "emptyDir" in vol:
                path.chmod(0o777)  # as the kubelet creates an emptyDir
            elif "projected" in vol:
                self._project(vol["name"], vol["projected"], path)
            else:
                raise PodSpecError(f"volume {vol['name']!r}: only emptyDir/projected emulated")
            self.volumes[vol["name"]] = path

    def _fields(self) -> dict[str, str]:
        return {
            "metadata.name": self.pod_name,
            "metadata.namespace": self.namespace,
            "spec.nodeName": self.node_name,
            "status.podIP": self.pod_ip,
        }

    def _project(self, name: str, projected: Mapping[str, Any], path: Path) -> None:
        """A projected service-account volume: token, the cluster CA, the namespace."""
        mode = int(projected.get("defaultMode", 0o644))
        for src in projected.get("sources", []):
            if "serviceAccountToken" in src:
                files = {src["serviceAccountToken"]["path"]: (self.service_account / "token")}
                for rel, origin in files.items():
                    (path / rel).write_bytes(origin.read_bytes())
            elif src.get("configMap", {}).get("name") == "kube-root-ca.crt":
                for item in src["configMap"].get("items", []):
                    ca = (self.service_account / "ca.crt").read_bytes()
                    (path / item["path"]).write_bytes(ca)
            elif "downwardAPI" in src:
                for item in src["downwardAPI"]["items"]:
                    value = self._fields()[item["fieldRef"]["fieldPath"]]
                    (path / item["path"]).write_text(value)
            else:
                raise PodSpecError(f"volume {name!r}: projected source {sorted(src)} not emulated")
        for f in path.iterdir():
            f.chmod(mode)

    def container(self, name: str) -> dict[str, Any]:
        for c in [*self.spec.get("initContainers", []), *self.spec.get("containers", [])]:
            if c["name"] == name:
                container: dict[str, Any] = c
                return container
        raise PodSpecError(f"no container {name!r} in the pod spec")

    def env(self, c: Mapping[str, Any]) -> dict[str, str]:
        fields = self._fields()
        env: dict[str, str] = dict(self.cluster_env)
        for item in c.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(str(item["value"]), env)
            elif "fieldRef" in item.get("valueFrom", {}):
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise PodSpecError(f"env {item['name']}: fieldPath {path} not emulated")
                env[item["name"]] = fields[path]
            else:
                raise PodSpecError(f"env {item['name']}: only value and fieldRef are emulated")
        if c.get("envFrom"):
            raise PodSpecError("envFrom is not emulated")
        # The "image": this machine with the project's virtualenv first on PATH.
        env.setdefault("PATH", f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin")
        env.setdefault("HOME", "/")
        return env

    def argv(self, c: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
        words = [*c.get("command", []), *c.get("args", [])]
        if not words:
            raise PodSpecError(f"container {c['name']}: no command (image entrypoint unknown)")
        return [expand(str(w), env) for w in words]

    def ids(self, c: Mapping[str, Any]) -> tuple[int, int]:
        pod_sc = self.spec.get("securityContext", {})
        sc = c.get("securityContext", {})
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", 0))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
            raise PodSpecError(f"container {c['name']}: runAsNonRoot with UID 0 would not start")
        return int(uid), int(gid)

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The full command line for container ``name`` and its environment."""
        c = self.container(name)
        env = self.env(c)
        uid, gid = self.ids(c)
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        mounts = [(m["mountPath"], self.volumes[m["name"]]) for m in c.get("volumeMounts", [])]
        # The kubelet's service-account mount, unless the pod opts out or a volume is mounted there.
        automount = self.spec.get("automountServiceAccountToken", True)
        if automount and all(dst != SA_DIR for dst, _ in mounts):
            mounts.insert(0, (SA_DIR, self.service_account))
        binds = [*self.files.items(), *mounts]
        # A mount over a directory holding the sources (an emptyDir on /tmp) goes last.
        sources = [Path(src) for _, src in binds]
        binds.sort(key=lambda b: any(src.is_relative_to(b[0]) for src in sources))
        script = ["set -e", "mount -t tmpfs -o mode=755 tmpfs /run"]
        # The "image" (virtualenv and sources) may live under a mount point of the pod, e.g. a
        # clone in /tmp with an emptyDir mounted on /tmp: keep it reachable at its own path.
        image = [p for p in IMAGE_PATHS if any(p.is_relative_to(dst) for dst, _ in binds)]
        for i, path in enumerate(image):
            stash = f"/run/image-{i}"
            script.append(f"mkdir -p {stash} && mount --bind {shlex.quote(str(path))} {stash}")
        for dst, src in binds:
            if not Path(dst).exists() or str(Path(dst).resolve()).startswith("/run/"):
                script.append(f"mkdir -p {shlex.quote(dst)}")
            script.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}")
        for i, path in enumerate(image):
            quoted = shlex.quote(str(path))
            script.append(f"mkdir -p {quoted} && mount --bind /run/image-{i} {quoted}")
        if sc.get("readOnlyRootFilesystem"):
            script += ["mount -o remount,bind,ro /", "mount -o remount,ro /run"]
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if "ALL" in caps.get("drop", []):
            keep = [f"+{cap.lower()}" for cap in caps.get("add", [])]
            setpriv += [f"--bounding-set=-all{''.join(',' + k for k in keep)}"]
            setpriv += ["--inh-caps=-all"]
        if sc.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        script.append('exec "$@"')
        inner = [*setpriv, "--", *self.argv(c, env)]
        argv = ["unshare", "-m", "--propagation", "private", "--"]
        argv += ["sh", "-c", "\n".join(script), "sh", *inner]
        return argv, env

    def run(self, name: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a container to completion (an init container, the app's command)."""
        argv, env = self.command(name)
        return subprocess.run(
            ["ip", "netns", "exec", self.world.pod.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            cwd="/",
        )

    def start(self, name: str, output: Path) -> subprocess.Popen[bytes]:
        """Start a long-running container (the sidecar)."""
        argv, env = self.command(name)
        with output.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.world.pod.name, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd="/",
            )
        self.world.pod.procs.append(proc)
        return proc

    def probe(self, name: str, kind: str) -> bool:
        """A container's httpGet probe, sent to the pod IP as the kubelet does."""
        get = self.container(name)[kind]["httpGet"]
        url = f"{get.get('scheme', 'HTTP').lower()}://{self.pod_ip}:{get['port']}{get['path']}"
        proc = self.world.pod.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", url],
            timeout=5,
        )
        return proc.stdout.startswith("2")
