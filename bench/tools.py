"""The external programs the benchmark drives, found on PATH (and the sbin directories)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

# program -> Debian package that ships it
PACKAGES: dict[str, str] = {
    "squid": "squid",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "hey": "hey",
    "curl": "curl",
    "cc": "gcc",  # builds bench/tunload.c, the long-lived tunnels' load generator
}

_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class MissingToolsError(RuntimeError):
    """Some programs the benchmark needs are not installed; the message says how to get them."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        packages = " ".join(sorted({PACKAGES[m] for m in missing}))
        super().__init__(
            f"bench: missing program(s): {', '.join(missing)}.\n"
            f"  Install them (Debian/Ubuntu, as root):  apt-get install -y {packages}\n"
            "  (a package's service does not need to run: the benchmark starts its own "
            "instances on loopback with generated configs)"
        )


@dataclass(frozen=True)
class Tools:
    squid: str
    nginx: str
    wrk: str
    hey: str
    curl: str
    cc: str
    taskset: str | None  # None: no CPU pinning


def which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_DIRS)
    return shutil.which(name, path=path)


def find_tools() -> Tools:
    found = {name: which(name) for name in PACKAGES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise MissingToolsError(missing)
    return Tools(
        squid=str(found["squid"]),
        nginx=str(found["nginx"]),
        wrk=str(found["wrk"]),
        hey=str(found["hey"]),
        curl=str(found["curl"]),
        cc=str(found["cc"]),
        taskset=which("taskset"),
    )
