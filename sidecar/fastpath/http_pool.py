"""Upstream HTTP/1 connections of the fast path, kept alive between requests.

Pooled per (vetted address, port): a connection is only ever reused for the address it was
opened to, which a decision vetted. Bounded: at most MAX_IDLE_PER_KEY idle connections per key,
each closed after IDLE_SECONDS (below the 5 s keep-alive of common servers, e.g. Node's, so the
pool rarely hands out a connection the server is closing). An idle connection that gets EOF,
data or an error leaves the pool at once; one found dead or expired when taken is closed and a
fresh one dialled instead, before any byte of the request was written. Once a request's head
went out on a connection, nothing is retried: the upstream may have acted on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

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
    __slots__ = ("closed", "eof", "idle_since", "key", "owner", "pool", "transport", "used")

    def __init__(self, pool: HttpPool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.idle_since = 0.0  # loop time it went back to the pool
        self.eof = False
        self.closed = False
        self.used = 0  # requests sent on it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not registered as asyncio.Transport's subclass)
        self.transport = cast(asyncio.Transport, transport)

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
        if self.pool.on_closed is not None and self.transport is not None:
            self.pool.on_closed(self.transport)  # once per connection, after all its requests
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
    """Idle connections by key; one sweep timer for all of them (a timer per request cost more
    than the rest of pooling), running only while something is idle."""

    def __init__(
        self, idle_seconds: float = IDLE_SECONDS, max_idle_per_key: int = MAX_IDLE_PER_KEY
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[Key, deque[Upstream]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Told of each upstream connection as it ends (the metrics count its bytes then).
        self.on_closed: Callable[[asyncio.BaseTransport], None] | None = None

    def take(self, key: Key) -> Upstream | None:
        """An idle connection to ``key`` that is still open and fresh (the newest first): a
        dead or expired one is closed and the next tried, before anything is written to it."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            up = idle.pop()
            if up.usable and now - up.idle_since < self.idle_seconds:
                if not idle:
                    del self._idle[key]
                return up
            up.abort()
        del self._idle[key]
        return None

    def give(self, up: Upstream) -> None:
        """Keep ``up`` for the next request to its key (closed if the key has enough)."""
        up.owner = None
        if not up.usable:
            up.abort()
            return
        idle = self._idle.get(up.key)
        if idle is None:
            idle = self._idle[up.key] = deque()
        elif len(idle) >= self.max_idle_per_key:
            idle.popleft().close()
        loop = asyncio.get_running_loop()
        up.idle_since = loop.time()
        idle.append(up)
        if up.transport is not None:
            # Paused while a slow client read the response: an idle connection must read, or
            # its EOF goes unseen and a dead connection is handed out.
            up.transport.resume_reading()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since >= self.idle_seconds:
                idle.popleft().close()  # the oldest first: a deque is in idle order
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.idle_seconds / 2, self._sweep
            )

    def discard(self, up: Upstream) -> None:
        self.forget(up)
        up.close()

    def forget(self, up: Upstream) -> None:
        idle = self._idle.get(up.key)
        if idle is not None and up in idle:
            idle.remove(up)
            if not idle:
                del self._idle[up.key]

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        for idle in list(self._idle.values()):
            for up in list(idle):
                self.discard(up)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
