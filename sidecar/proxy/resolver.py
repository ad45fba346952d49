"""Name resolution for vetting: every address a host resolves to, in the system's order.

Results are kept for a few seconds (``cache_ttl``; failures for ``negative_ttl``) and concurrent
lookups of one name share a single query: without that, every plain-HTTP request to a named host
would cost a thread-pool getaddrinfo. The addresses a decision vetted are still the ones the
proxy connects to; the cache only decides how fresh they are.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sidecar.policy.dns import LearnedAddresses
from sidecar.policy.model import IPAddress


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[IPAddress, ...]
    error: str | None = None


# loop.getaddrinfo's shape: (host, port, *, type, proto) -> [(family, type, proto, canon, addr)]
type GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


class _Expiring:
    """Answers by name, each for ``ttl`` seconds, at most ``max_entries`` (the oldest go first).

    A dict and one clock read: a cached answer is read on every request to a named host, and a
    generic TTL cache (cachetools') cost as much as the rest of that request's decision.
    """

    __slots__ = ("_entries", "_max", "_ttl")

    def __init__(self, max_entries: int, ttl: float) -> None:
        self._entries: dict[str, tuple[float, Resolution]] = {}
        self._max = max_entries
        self._ttl = ttl

    def get(self, key: str) -> Resolution | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] > time.monotonic():
            return entry[1]
        del self._entries[key]
        return None

    def __setitem__(self, key: str, value: Resolution) -> None:
        entries = self._entries
        entries.pop(key, None)  # re-inserted: now the newest
        if len(entries) >= self._max:
            now = time.monotonic()
            for stale in [k for k, (deadline, _) in entries.items() if deadline <= now]:
                del entries[stale]
            while len(entries) >= self._max:
                del entries[next(iter(entries))]
        entries[key] = (time.monotonic() + self._ttl, value)

    def __len__(self) -> int:
        return len(self._entries)


class Resolver:
    def __init__(
        self,
        timeout: float = 5.0,
        *,
        cache_ttl: float = 5.0,
        negative_ttl: float = 1.0,
        max_entries: int = 4096,
        getaddrinfo: GetAddrInfo | None = None,
        learned: LearnedAddresses | None = None,
    ) -> None:
        self.timeout = timeout
        # The other direction: addresses the pod's own DNS answers gave it, by name (the DNS
        # listener fills it; transparent raw streams are decided by it). None: no DNS listener.
        self.learned = learned
        self._getaddrinfo = getaddrinfo
        self._resolved: _Expiring | None = (
            _Expiring(max_entries, cache_ttl) if cache_ttl > 0 else None
        )
        self._failed: _Expiring | None = (
            _Expiring(max_entries, negative_ttl) if negative_ttl > 0 and cache_ttl > 0 else None
        )
        self._inflight: dict[str, asyncio.Task[Resolution]] = {}
        self.lookups = 0  # queries actually made (for tests and metrics)

    def cached(self, host: str) -> Resolution | None:
        """The answer still cached for ``host`` (a success or a failure), without waiting."""
        key = host.lower()
        for cache in (self._resolved, self._failed):
            if cache is not None and (hit := cache.get(key)) is not None:
                return hit
        return None

    async def resolve(self, host: str, port: int) -> Resolution:
        if (hit := self.cached(host)) is not None:
            return hit
        key = host.lower()
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._resolve_fqdn(host, port))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._store(key, t))
        # shield: a caller that goes away (client disconnect) does not cancel the shared query
        return await asyncio.shield(task)

    def _store(self, key: str, task: asyncio.Task[Resolution]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        resolution = task.result()
        cache = self._resolved if resolution.addresses else self._failed
        if cache is not None:
            cache[key] = resolution

    async def _resolve_fqdn(self, host: str, port: int) -> Resolution:
        resolution = await self._lookup(host, port)
        if not resolution.addresses and host.endswith(".") and len(host) > 1:
            # A fully qualified "name." resolves in DNS but not in a hosts file; the policy
            # already treats both spellings as one host.
            retry = await self._lookup(host[:-1], port)
            if retry.addresses:
                return retry
        return resolution

    async def _lookup(self, host: str, port: int) -> Resolution:
        self.lookups += 1
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await asyncio.wait_for(
                getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
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
