"""Name resolution for a sidecar on loopback without touching the machine's files: a hosts file
bind-mounted over /etc/hosts in a mount namespace of its own (`unshare -m`), nsswitch at files
only and resolv.conf at loopback, so no DNS query leaves the machine. The bench, the soak and
the test harness (tests/support/sidecar.py) start their sidecars this way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# `exec` all the way down: the PID the caller holds (and samples) is the command's own.
MOUNT_HOSTS = (
    'mount --bind "$0" /etc/hosts && '
    'mount --bind "$(dirname "$0")/nsswitch.conf" /etc/nsswitch.conf && '
    'mount --bind "$(dirname "$0")/resolv.conf" /etc/resolv.conf && exec "$@"'
)


def hosts_file(path: Path, names: Mapping[str, str], extra: Sequence[str] = ()) -> Path:
    """``path`` as a hosts file for ``names`` (name → address), with the nsswitch.conf and
    resolv.conf that MOUNT_HOSTS mounts beside it."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"{address} {name}" for name, address in names.items()]
    lines += list(extra)
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "nsswitch.conf").write_text("hosts: files\n")
    (path.parent / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    return path


def with_hosts(hosts: Path, argv: Sequence[str], unshare: str = "unshare") -> list[str]:
    """argv run in its own mount namespace where /etc/hosts is ``hosts``."""
    return [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        MOUNT_HOSTS,
        str(hosts),
        *argv,
    ]


# An image's root filesystem as the sidecar's root: the bench's work directory bind-mounted at
# the same path inside it, /proc and /dev, and (when given) the hosts file and its companions
# over the image's own. `exec chroot` keeps the PID the caller samples the sidecar's.
IN_ROOT = (
    "r=$0 w=$1 h=$2; shift 2; "
    'mkdir -p "$r$w" "$r/proc" "$r/dev" && mount --bind "$w" "$r$w" && '
    'mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" && '
    'if [ -n "$h" ]; then for f in hosts nsswitch.conf resolv.conf; do '
    'touch "$r/etc/$f" && mount --bind "$(dirname "$h")/$f" "$r/etc/$f" || exit 1; done; '
    "fi; "
    'exec chroot "$r" "$@"'
)

# What the image's ENV sets for its commands (Dockerfile).
IMAGE_ENV = {
    "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}


def in_root(root: Path, workdir: Path, argv: Sequence[str], hosts: Path | None = None) -> list[str]:
    """argv run chrooted in ``root`` (an image's filesystem), in its own mount namespace, with
    ``workdir`` visible at its own path and, when given, /etc/hosts from ``hosts`` (hosts_file
    wrote its nsswitch.conf and resolv.conf beside it)."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        IN_ROOT,
        str(root),
        str(workdir),
        str(hosts) if hosts is not None else "",
        *argv,
    ]
