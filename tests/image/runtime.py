"""Run the containers of a pod spec from the built image, as a container runtime would.

``podman run`` cannot start containers on these machines (crun cannot set rlimits), so this does
what the runtime does, with the same kernel features: each container gets its own root filesystem
from the image (a buildah working container, mounted: a copy-on-write layer over the image, so one
container's writes are not another's), and starts in fresh mount and PID namespaces inside the
pod's one network namespace, chrooted into that filesystem, with ``/proc``, a minimal ``/dev``, the
pod's ``/etc/hosts`` and ``/etc/resolv.conf``, its volumes, a read-only root when the spec says
so, and the container's user, group, capabilities and no_new_privs applied by the image's own
``setpriv`` (util-linux) right before the command. The environment is the image's (``PATH``) with
the container's on top. Everything else (env expansion, users, volumes, probes) is the kubelet
emulation of :class:`tests.support.netns_pod.PodRunner`, unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import netns as h
from tests.support.netns_pod import SA_DIR, PodRunner, PodSpecError

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class ImageError(RuntimeError):
    """The image named in the message cannot be used (absent, or buildah failed)."""


def _buildah(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise ImageError(f"buildah {shlex.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def image_config(image: str) -> dict[str, Any]:
    """The OCI config of ``image`` (Env, User, Cmd...); ImageError when it is not built."""
    try:
        text = _buildah("inspect", "--type", "image", image)
    except ImageError as exc:
        raise ImageError(f"image {image} is not built here (run `make image`): {exc}") from exc
    config: dict[str, Any] = json.loads(text)["OCIv1"]["config"]
    return config


def reap_stale_roots() -> list[str]:
    """Remove working containers that runs which died left behind (named after their pod
    namespace, ``egsc-<pid>-...``, like the namespaces tests/support/netns.py reaps)."""
    names = _buildah("containers", "--noheading", "--format", "{{.ContainerName}}").split()
    reaped = []
    for name in names:
        owner = name.removeprefix(h.PREFIX).split("-")[0]
        if name.startswith(h.PREFIX) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            subprocess.run(["buildah", "rm", name], capture_output=True, timeout=60, check=False)
            reaped.append(name)
    return reaped


@contextmanager
def mounted_rootfs(image: str, name: str) -> Iterator[Path]:
    """A writable copy-on-write root filesystem of ``image`` (a buildah working container)."""
    ctr = _buildah("from", "--pull-never", "--quiet", "--name", name, image)
    try:
        yield Path(_buildah("mount", ctr))
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=60, check=False)


def in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with symlinks resolved as the container sees them (the image's
    /var/run is a link to /run: an absolute link is relative to ``root``, never to this
    machine's root). Components that do not exist yet are kept as they are."""
    parts = list(Path(path).parts[1:])
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageError(f"{path}: too many symbolic links in {root}")
            target = Path(os.readlink(candidate))
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            if target.is_absolute():
                current = root
        elif part == "..":
            current = current.parent if current != root else root
        else:
            current = candidate
    return current


@dataclass
class ImagePodRunner(PodRunner):
    """PodRunner whose containers run from ``roots`` (container name → mounted image root)."""

    image_env: Mapping[str, str] = field(default_factory=dict)
    roots: Mapping[str, Path] = field(default_factory=dict)
    image_user: str = ""  # the image's USER ("1337:1337"): used where the spec names no user
    # secret and configMap volumes: name → a directory holding what the kubelet would project
    provided: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        volumes = self.spec.get("volumes", [])
        self.spec = {**self.spec, "volumes": [v for v in volumes if v["name"] not in self.provided]}
        super().__post_init__()
        self.spec = {**self.spec, "volumes": volumes}
        self.volumes.update(self.provided)

    def ids(self, c: Mapping[str, Any]) -> tuple[int, int]:
        """The spec's user, else the image's (as the kubelet does; runAsNonRoot is checked
        against the image's user then)."""
        pod_sc = self.spec.get("securityContext", {})
        sc = c.get("securityContext", {})
        if "runAsUser" in sc or "runAsUser" in pod_sc or not self.image_user:
            return super().ids(c)
        user, _, group = self.image_user.partition(":")
        if not user.isdigit() or not (group or user).isdigit():
            raise PodSpecError(f"image user {self.image_user!r} is not numeric")
        uid = int(user)
        gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", group or user)))
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
            raise PodSpecError(f"container {c['name']}: runAsNonRoot and the image runs as root")
        return uid, gid

    def probe(self, name: str, kind: str) -> bool:
        """An httpGet probe as the kubelet sends it: to the pod IP, a named port looked up in the
        container's ports, HTTPS without verifying the certificate."""
        c = self.container(name)
        get = c[kind]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
        url = f"{get.get('scheme', 'HTTP').lower()}://{self.pod_ip}:{port}{get['path']}"
        proc = self.world.pod.run(
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", url],
            timeout=5,
        )
        return proc.stdout.startswith("2")

    def env(self, c: Mapping[str, Any]) -> dict[str, str]:
        env = super().env(c)
        declared = {item["name"] for item in c.get("env", [])}
        # The image's environment under the container's: PATH is the image's, not this machine's.
        for key, value in self.image_env.items():
            if key not in declared:
                env[key] = value
        return env

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        c = self.container(name)
        env = self.env(c)
        uid, gid = self.ids(c)
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        root = self.roots[name]
        q = shlex.quote
        r = q(str(root))
        mounts = [(m["mountPath"], self.volumes[m["name"]]) for m in c.get("volumeMounts", [])]
        automount = self.spec.get("automountServiceAccountToken", True)
        if automount and all(dst != SA_DIR for dst, _ in mounts):
            mounts.insert(0, (SA_DIR, self.service_account))
        script = [
            "set -e",
            # the root a mount point of its own, so that it alone can be made read-only
            f"mount --bind {r} {r}",
            f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc",
            f"mount -t tmpfs -o nosuid,mode=755 tmpfs {r}/dev",
            f"mkdir {r}/dev/shm && mount -t tmpfs -o nosuid,nodev tmpfs {r}/dev/shm",
        ]
        for dev in DEVICES:
            script.append(f"touch {r}/dev/{dev} && mount --bind /dev/{dev} {r}/dev/{dev}")
        for dst, src in self.files.items():
            path = in_root(root, dst)
            target, parent = q(str(path)), q(str(path.parent))
            script.append(f"mkdir -p {parent} && {{ [ -e {target} ] || touch {target}; }}")
            script.append(f"mount --bind {q(str(src))} {target}")
        read_only = {m["mountPath"] for m in c.get("volumeMounts", []) if m.get("readOnly")}
        for dst, src in mounts:
            target = q(str(in_root(root, dst)))
            script.append(f"mkdir -p {target} && mount --bind {q(str(src))} {target}")
            if dst in read_only:
                script.append(f"mount -o remount,bind,ro {target}")
        if sc.get("readOnlyRootFilesystem"):
            script.append(f"mount -o remount,bind,ro {r}")
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if "ALL" in caps.get("drop", []):
            keep = "".join(f",+{cap.lower()}" for cap in caps.get("add", []))
            setpriv += [f"--bounding-set=-all{keep}", "--inh-caps=-all"]
        if sc.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        # chroot (this machine's, as root), then the image's setpriv drops to the spec's user
        script.append(f'cd / && exec chroot {r} "$@"')
        inner = [*setpriv, "--", *self.argv(c, env)]
        argv = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--"]
        argv += ["sh", "-c", "\n".join(script), "sh", *inner]
        return argv, env


def started_ready(
    pod: ImagePodRunner, name: str, output: Path, timeout: float, probe: str = "startupProbe"
) -> tuple[subprocess.Popen[bytes], float]:
    """Start container ``name`` and poll its startupProbe as the kubelet does (HTTP GET to the pod
    IP), every 50 ms rather than every ``periodSeconds`` so that the time is measured closely.
    Returns the process and the seconds from start to the first 2xx."""
    began = time.monotonic()
    proc = pod.start(name, output)
    h.wait_for(lambda: pod.probe(name, probe), timeout, name, proc, output)
    return proc, time.monotonic() - began
