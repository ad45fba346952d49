"""Adapter: run ``iptables-save``/``iptables-restore`` (and the ip6tables twins) for a backend.

``apply`` reads what of ours is loaded, then feeds ``rules.render_apply`` to
``*-restore --noflush`` (one COMMIT per table: atomic; other rules untouched). ``clean`` does
the same with ``rules.render_clean``. Backends: ``nft`` (iptables-nft-*), ``legacy``
(iptables-legacy-*), ``auto`` = the one ``iptables --version`` names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from enum import Enum
from typing import Final

from sidecar.iptables import rules
from sidecar.iptables.rules import CaptureOptions, Family

TIMEOUT_S: Final = 30.0
LOCK_WAIT_S: Final = 10  # xtables lock (legacy): wait rather than fail when another tool holds it


class IptablesError(RuntimeError):
    """An iptables tool is missing or failed; the message names the command and its stderr."""


class Backend(Enum):
    NFT = "nft"
    LEGACY = "legacy"


@dataclass(frozen=True)
class Tools:
    save: str
    restore: str
    env: tuple[tuple[str, str], ...] = ()  # extra environment for both tools


LOCK_ENV: Final = "XTABLES_LOCKFILE"
DEFAULT_LOCK: Final = "/run/xtables.lock"


def legacy_lock_env(candidates: tuple[str, ...] | None = None) -> tuple[tuple[str, str], ...]:
    """The legacy tools take a lock file, /run/xtables.lock, and fail when they cannot create
    it, as on a read-only root filesystem (the egress-init container's). Use the first lock
    location that can be created: /run, else /dev/shm (a writable tmpfs in containers), else
    /tmp. An explicit $XTABLES_LOCKFILE is left alone."""
    if LOCK_ENV in os.environ:
        return ()
    paths = candidates or (DEFAULT_LOCK, "/dev/shm/xtables.lock", "/tmp/xtables.lock")
    for path in paths:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
        except OSError:
            continue
        return () if path == DEFAULT_LOCK else ((LOCK_ENV, path),)
    return ()


def detect_backend(version_output: str) -> Backend:
    """``iptables v1.8.9 (nf_tables)`` → nft; ``(legacy)`` or a pre-1.8 version → legacy."""
    if "nf_tables" in version_output:
        return Backend.NFT
    if "legacy" in version_output or re.search(r"\bv1\.[0-7]\.", version_output):
        return Backend.LEGACY
    raise IptablesError(f"cannot tell the iptables backend from {version_output.strip()!r}")


def resolve_backend(choice: str) -> Backend:
    if choice != "auto":
        return Backend(choice)
    exe = shutil.which("iptables")
    if exe is None:
        raise IptablesError(
            "iptables not found in PATH (install iptables; needed for --backend auto)"
        )
    out = _run([exe, "--version"])
    return detect_backend(out)


def tools_for(family: Family, backend: Backend) -> Tools:
    """``iptables-nft-restore`` etc.; falls back to plain ``iptables-restore`` when only that
    exists and its version names the same backend (distributions shipping one variant)."""
    base = family.restore_command
    env = legacy_lock_env() if backend is Backend.LEGACY else ()
    specific = Tools(f"{base}-{backend.value}-save", f"{base}-{backend.value}-restore", env)
    if shutil.which(specific.save) and shutil.which(specific.restore):
        return specific
    plain = Tools(f"{base}-save", f"{base}-restore", env)
    if (
        shutil.which(plain.save)
        and shutil.which(plain.restore)
        and detect_backend(_run([plain.restore, "--version"])) is backend
    ):
        return plain
    raise IptablesError(f"{specific.restore} not found in PATH (backend {backend.value})")


def kernel_has_ipv6() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def families(ipv6: str) -> list[Family]:
    """``--ipv6 on|off|auto`` → the families to handle (auto: when the kernel has IPv6)."""
    if ipv6 == "on" or (ipv6 == "auto" and kernel_has_ipv6()):
        return [Family.IPV4, Family.IPV6]
    return [Family.IPV4]


def read_state(tools: Tools) -> rules.SavedState:
    return rules.parse_save(_run([tools.save], env=tools.env))


def plan_apply(opts: CaptureOptions, family: Family, tools: Tools) -> str:
    return rules.render_apply(opts, family, read_state(tools))


def plan_clean(tools: Tools) -> str:
    return rules.render_clean(read_state(tools))


def restore(tools: Tools, text: str) -> None:
    if text:
        _run([tools.restore, "--noflush", "--wait", str(LOCK_WAIT_S)], stdin=text, env=tools.env)


def _run(argv: list[str], stdin: str | None = None, env: tuple[tuple[str, str], ...] = ()) -> str:
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
            env={**os.environ, **dict(env)} if env else None,
        )
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{' '.join(argv)} did not finish in {TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise IptablesError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc.stdout
