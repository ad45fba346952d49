"""Name resolution for vetting: every address a host resolves to, in the system's order."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from sidecar.policy.model import IPAddress


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[IPAddress, ...]
    error: str | None = None


class Resolver:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout

    async def resolve(self, host: str, port: int) -> Resolution:
        resolution = await self._resolve(host, port)
        if not resolution.addresses and host.endswith(".") and len(host) > 1:
            # A fully qualified "name." resolves in DNS but not in a hosts file; the policy
            # already treats both spellings as one host.
            retry = await self._resolve(host[:-1], port)
            if retry.addresses:
                return retry
        return resolution

    async def _resolve(self, host: str, port: int) -> Resolution:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
                self.timeout,
            )
        except TimeoutError:
            return Resolution((), f"resolving {host} timed out after {self.timeout:g}s")
        except (socket.gaierror, UnicodeError, OSError) as err:
            return Resolution((), f"resolving {host} failed: {err}")
        seen: dict[IPAddress, None] = {}
        for _family, _type, _proto, _canon, sockaddr in infos:
            # Scope ids ("fe80::1%eth0") are dropped: the guard classifies the address itself.
            text = str(sockaddr[0]).split("%", 1)[0]
            seen.setdefault(ipaddress.ip_address(text))
        return Resolution(tuple(seen))
