"""Which containers of a pod can undo or bypass egress capture (pure: a pod spec in, findings out).

The attacker of docs/security.md is code in the app's containers. With transparent capture the
pod's iptables rules are the boundary, and a container can get around them when it can

- rewrite the rules: ``privileged: true`` or capability ``NET_ADMIN`` (the pod's containers share
  one network namespace);
- send what the rules do not cover: capability ``NET_RAW`` (raw sockets: other IP protocols,
  crafted packets), which Docker and containerd grant by default;
- become UID 1337, whose traffic the rules exempt so the proxy does not loop: running as it, or
  running as root with ``CAP_SETUID`` (a runtime default), or reaching root through a setuid
  binary when ``allowPrivilegeEscalation`` is not false.

With explicit capture there are no rules: any container that ignores HTTP_PROXY bypasses the
sidecar, whatever its privileges. A host-network pod cannot be injected at all.

Each finding names the container and what to change; the injector reports them as admission
warnings (docs/injector.md lists them) and, with ``refuseCaptureBypass``, refuses the pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar import contract as c

# The capabilities Docker and containerd give a container that neither adds nor drops any
# (CRI-O's default set omits NET_RAW; assuming the larger set only means a warning too many).
RUNTIME_DEFAULT_CAPS: Final = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)

HOST_NETWORK: Final = (
    "host-network pod: not injected, so its egress is not controlled (its traffic is the node's); "
    "drop hostNetwork to get the sidecar"
)
EXPLICIT_CAPTURE: Final = (
    "explicit capture: a container that ignores HTTP_PROXY or opens its own sockets bypasses the "
    "sidecar; use transparent capture where the code is not trusted"
)


@dataclass(frozen=True)
class Risk:
    """One way one container can get around capture, and the change that closes it."""

    container: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"container {self.container}: {self.problem}; {self.fix}"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _cap_names(value: Any) -> frozenset[str]:
    # Kubernetes passes names through to the runtime, which accepts them with or without CAP_.
    if not isinstance(value, list):
        return frozenset()
    return frozenset(str(v).upper().removeprefix("CAP_") for v in value)


def has_capability(sc: Mapping[str, Any], name: str) -> bool:
    """Whether a container with this securityContext holds capability ``name`` in its bounding
    set: privileged holds all; ``add`` wins over ``drop`` (the runtime drops, then adds)."""
    if sc.get("privileged") is True:
        return True
    caps = _mapping(sc.get("capabilities"))
    added, dropped = _cap_names(caps.get("add")), _cap_names(caps.get("drop"))
    if name in added or "ALL" in added:
        return True
    if name in dropped or "ALL" in dropped:
        return False
    return name in RUNTIME_DEFAULT_CAPS


def container_risks(pod_sc: Mapping[str, Any], container: Mapping[str, Any]) -> list[Risk]:
    """How one container can get around transparent capture, given the pod's securityContext.

    A capability is a risk only where the process can use it: as root, or as a non-root user
    that can exec a setuid-root binary (``allowPrivilegeEscalation`` not false). Kubernetes sets
    no ambient capabilities, so a non-root process that cannot escalate holds none of them.
    """
    name = str(container.get("name"))
    sc = _mapping(container.get("securityContext"))
    if sc.get("privileged") is True:
        # Everything below follows from it; one finding, one fix.
        return [
            Risk(name, "privileged: it can remove the egress capture rules", "run it unprivileged")
        ]
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    risks: list[Risk] = []
    if uid == c.PROXY_UID:
        risks.append(
            Risk(
                name,
                f"runs as UID {c.PROXY_UID}, the proxy's: its traffic is not captured",
                "run it as another UID",
            )
        )
    held = [cap for cap in ("NET_ADMIN", "NET_RAW", "SETUID") if has_capability(sc, cap)]
    if uid == 0 or (uid is None and non_root is not True):
        if "NET_ADMIN" in held:
            risks.append(
                Risk(
                    name, "capability NET_ADMIN: it can remove the egress capture rules", "drop it"
                )
            )
        if "NET_RAW" in held:
            risks.append(
                Risk(
                    name,
                    "capability NET_RAW (a runtime default): raw sockets can send packets the "
                    "capture rules do not cover",
                    "add NET_RAW (or ALL) to capabilities.drop",
                )
            )
        if "SETUID" in held:
            runs = "runs as root" if uid == 0 else "may run as root (no runAsUser/runAsNonRoot)"
            risks.append(
                Risk(
                    name,
                    f"{runs} with CAP_SETUID: it can switch to UID {c.PROXY_UID}, "
                    "whose traffic is not captured",
                    "set runAsNonRoot: true, or drop SETUID (or ALL)",
                )
            )
    elif held and sc.get("allowPrivilegeEscalation") is not False:
        risks.append(
            Risk(
                name,
                "allowPrivilegeEscalation is not false: a setuid binary can make it root with "
                + ", ".join(held),
                "set allowPrivilegeEscalation: false, or drop ALL capabilities",
            )
        )
    return risks


def transparent_risks(
    spec: Mapping[str, Any], containers: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Every finding for these (the app's) containers of a pod spec, as warning texts."""
    pod_sc = _mapping(spec.get("securityContext"))
    return [str(risk) for container in containers for risk in container_risks(pod_sc, container)]
