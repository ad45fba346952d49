"""The second tier: mitmproxy, loaded on first need, handed client connections by the front door.

A connection the fast path does not handle itself (an Upgrade, h2c, ``Expect: 100-continue``,
and every one with ``--engine mitmproxy``) is given to mitmproxy with the bytes already read from
it, before any of them went upstream: mitmproxy's layers read them as if they had just arrived.
Nothing of mitmproxy is imported until then, so an idle sidecar never pays its ~35 MiB.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from sidecar.record import Capture

if TYPE_CHECKING:
    from sidecar.fastpath.config import ListenSpec, ProxyConfig
    from sidecar.fastpath.connection import ClientConnection
    from sidecar.policy.store import PolicyStore
    from sidecar.proxy.drain import Drain
    from sidecar.proxy.master import Proxy
    from sidecar.reporter import Reporter

log = logging.getLogger(__name__)

# mitmproxy's own stream reader buffer: what it reads from a client at a time.
_READ_LIMIT = 2**16


class SecondTier:
    def __init__(self, config: ProxyConfig, store: PolicyStore, reporter: Reporter) -> None:
        self._config = config
        self._store = store
        self._reporter = reporter
        self._proxy: Proxy | None = None
        self._loading: asyncio.Task[Proxy] | None = None
        self._run: asyncio.Task[None] | None = None
        self._instances: dict[tuple[str, ListenSpec], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def loaded(self) -> bool:
        return self._proxy is not None

    @property
    def drain(self) -> Drain | None:
        return self._proxy.drain if self._proxy is not None else None

    def hand_over(self, conn: ClientConnection, buffered: bytes, why: str) -> None:
        """Give ``conn`` to mitmproxy, with ``buffered`` (read from it, sent nowhere) first."""
        assert conn.transport is not None
        conn.handed_over = True
        conn.busy = False
        conn.transport.pause_reading()  # until mitmproxy reads: nothing may be lost meanwhile
        task = asyncio.get_running_loop().create_task(self._serve(conn, buffered, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: ClientConnection, buffered: bytes, why: str) -> None:
        try:
            proxy = await self._load(why)
        except Exception:
            log.exception("mitmproxy could not be started; the connection is closed")
            conn.abort()
            return
        transport = conn.transport
        if transport is None or conn.closed:
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        conn.switch(protocol)
        protocol.connection_made(transport)
        if buffered:
            reader.feed_data(buffered)
        if conn.eof:
            reader.feed_eof()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        transport.resume_reading()
        kind = "transparent" if conn.capture is Capture.TRANSPARENT else "regular"
        instance = self._instances.get((kind, conn.listen))
        if instance is None:
            instance = self._instances[(kind, conn.listen)] = proxy.instance(kind, conn.listen)
        await instance.handle_stream(reader, writer)

    async def load(self, why: str) -> None:
        """Load mitmproxy now (the mitmproxy engine does at start: no first call waits for it)."""
        await self._load(why)

    async def _load(self, why: str) -> Proxy:
        if self._proxy is not None:
            return self._proxy
        loading = self._loading
        if loading is None or (
            loading.done() and (loading.cancelled() or loading.exception() is not None)
        ):
            # One start for every connection that waits on it; a failed one is tried again.
            loading = self._loading = asyncio.get_running_loop().create_task(self._start(why))
        return await asyncio.shield(loading)

    async def _start(self, why: str) -> Proxy:
        started = time.monotonic()
        # Imported here, never at start: mitmproxy is the cost an idle sidecar does not pay.
        from sidecar.proxy.master import build_master

        proxy = build_master(self._config, self._store, self._reporter)
        self._run = asyncio.get_running_loop().create_task(proxy.master.run())
        waiting = asyncio.ensure_future(proxy.running.event.wait())
        await asyncio.wait({self._run, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not proxy.running.event.is_set():
            waiting.cancel()
            self._run.result()  # raises what stopped it
            raise RuntimeError("mitmproxy stopped while starting")
        self._proxy = proxy
        log.info(
            "loaded mitmproxy (second tier)",
            extra={"reason": why, "seconds": round(time.monotonic() - started, 3)},
        )
        return proxy

    async def stop(self) -> None:
        if self._proxy is None or self._run is None:
            return
        self._proxy.master.shutdown()
        try:
            await asyncio.wait_for(asyncio.shield(self._run), 5.0)
        except (TimeoutError, asyncio.CancelledError):
            self._run.cancel()
        except Exception:
            log.exception("mitmproxy stopped with an error")
