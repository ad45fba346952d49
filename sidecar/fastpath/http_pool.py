"""Upstream HTTP/1 connections of the fast path, kept alive between requests.

Pooled per (vetted address, port): a connection is only ever reused for the address it was
opened to, which a decision vetted. Bounded: at most MAX_IDLE_PER_KEY idle connections per key,
each closed after IDLE_SECONDS (below the 5 s keep-alive of common servers, e.g. Node's, so the
pool rarely hands out a connection the server is closing). An idle connection that gets EOF,
data or an error leaves the pool at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

IDLE_SECONDS = 4.0
MAX_IDLE_PER_KEY = 16

Key = tuple[str, int]


class UpstreamOwner(Protocol):
    """The exchange an upstream connection serves (asyncio.Protocol's events, forwarded)."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_pause_writing(self) -> None: ...

    def upstream_resume_writing(self) -> None: ...


class Upstream(asyncio.Protocol):
    __slots__ = ("closed", "eof", "key", "owner", "pool", "timer", "transport", "used")

    def __init__(self, pool: HttpPool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.closed = False
        self.used = 0  # requests sent on it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.upstream_data(data)
        else:
            self.pool.discard(self)  # an idle connection has nothing to say

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.owner is not None:
            self.owner.upstream_eof()
        else:
            self.pool.discard(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.owner is not None:
            owner, self.owner = self.owner, None
            owner.upstream_lost(exc)
        else:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and not self.eof
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.abort()


class HttpPool:
    def __init__(
        self, idle_seconds: float = IDLE_SECONDS, max_idle_per_key: int = MAX_IDLE_PER_KEY
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[Key, deque[Upstream]] = {}

    def take(self, key: Key) -> Upstream | None:
        """An idle connection to ``key`` that is still open (the newest first), or None."""
        idle = self._idle.get(key)
        while idle:
            up = idle.pop()
            if not idle:
                del self._idle[key]
            if up.timer is not None:
                up.timer.cancel()
                up.timer = None
            if up.usable:
                return up
            up.abort()
            idle = self._idle.get(key)
        return None

    def give(self, up: Upstream) -> None:
        """Keep ``up`` for the next request to its key (closed if the key has enough)."""
        up.owner = None
        if not up.usable:
            up.abort()
            return
        idle = self._idle.setdefault(up.key, deque())
        if len(idle) >= self.max_idle_per_key:
            oldest = idle.popleft()
            self._drop_timer(oldest)
            oldest.close()
        idle.append(up)
        up.timer = asyncio.get_running_loop().call_later(self.idle_seconds, self.discard, up)
        if up.transport is not None:
            up.transport.resume_reading()

    def discard(self, up: Upstream) -> None:
        self.forget(up)
        up.close()

    def forget(self, up: Upstream) -> None:
        self._drop_timer(up)
        idle = self._idle.get(up.key)
        if idle is not None and up in idle:
            idle.remove(up)
            if not idle:
                del self._idle[up.key]

    @staticmethod
    def _drop_timer(up: Upstream) -> None:
        if up.timer is not None:
            up.timer.cancel()
            up.timer = None

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        for idle in list(self._idle.values()):
            for up in list(idle):
                self.discard(up)
