"""What the DNS listener takes from the pod's /etc/resolv.conf (as the kubelet wrote it): the
name servers to forward to and the search domains whose names are internal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.iptables.rules import parse_resolv_conf
from sidecar.policy.model import IPAddress


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[IPAddress, ...]
    search: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> ResolvConf:
        """The name servers as the C library reads them (the iptables rules' reading: the same
        servers the capture lets through), and the last ``search`` (or ``domain``) line's
        domains, as glibc keeps only the last one."""
        search: tuple[str, ...] = ()
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("search", "domain"):
                search = tuple(w for w in words[1:] if w != ".")
        return cls(parse_resolv_conf(text), search)

    @classmethod
    def read(cls, path: Path) -> ResolvConf:
        return cls.parse(path.read_text())
