"""The front door: owns the proxy listeners, gives each connection to the fast path (or to
mitmproxy, the second tier), and drains both tiers on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

from sidecar.fastpath.accept import PROXY_LISTEN_BACKLOG
from sidecar.fastpath.config import ListenSpec, ProxyConfig
from sidecar.fastpath.connection import ClientConnection
from sidecar.fastpath.handover import SecondTier
from sidecar.fastpath.services import Services
from sidecar.policy.store import PolicyStore
from sidecar.proxy.resolver import Resolver
from sidecar.record import Capture
from sidecar.reporter import Reporter

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
CUT_WAIT_SECONDS = 2.0  # for cut connections to end their spans and close
SHUTDOWN_MESSAGE = "egress-sidecar shut down before the transfer completed"


class Engine(StrEnum):
    FAST = "fast"  # ordinary calls on the fast path, the rest handed to mitmproxy
    MITMPROXY = "mitmproxy"  # every connection handed to mitmproxy: the reference engine


# How a connection accepted on a listener of this capture starts on the fast path.
Entry = Callable[[ClientConnection, Services], None]


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    in_flight: int  # connections with something in flight when the drain began
    drained: int  # of those, finished within the drain timeout
    cut: int  # still in flight at the end, closed by the sidecar
    seconds: float


class FrontDoor:
    def __init__(
        self,
        config: ProxyConfig,
        store: PolicyStore,
        reporter: Reporter,
        *,
        engine: Engine = Engine.FAST,
    ) -> None:
        self.config = config
        self.engine = engine
        second_tier = SecondTier(config, store, reporter)
        self.services = Services(
            config,
            store,
            reporter,
            Resolver(
                config.resolve_timeout, cache_ttl=config.dns_cache_ttl, learned=config.learned
            ),
            second_tier,
        )
        self.services.http_pool.on_closed = partial(reporter.upstream_closed, "http")
        self._servers: list[asyncio.Server] = []
        self._conns: set[ClientConnection] = set()
        self.failed: list[str] = []
        self.addresses: list[str] = []
        self.draining = False
        self._stopped = asyncio.Event()
        self._entries = _entries()

    @property
    def all_running(self) -> bool:
        return bool(self._servers) and not self.failed and not self._stopped.is_set()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> bool:
        """Listen on every configured address; False (and ``failed`` says why) if one failed."""
        loop = asyncio.get_running_loop()
        if self.engine is Engine.MITMPROXY:
            await self.services.second_tier.load("engine mitmproxy")
        for capture, specs in (
            (Capture.EXPLICIT, self.config.explicit),
            (Capture.TRANSPARENT, self.config.transparent),
        ):
            for spec in specs:
                try:
                    server = await loop.create_server(
                        self._factory(capture, spec),
                        spec.host,
                        spec.port,
                        backlog=PROXY_LISTEN_BACKLOG,
                        reuse_address=True,
                    )
                except OSError as err:
                    self.failed.append(f"{capture.value}@{spec}: {err}")
                    continue
                self._servers.append(server)
                kind = "regular" if capture is Capture.EXPLICIT else "transparent"
                self.addresses += [
                    f"{kind}@{sock.getsockname()[0]}:{sock.getsockname()[1]}"
                    for sock in server.sockets
                ]
        if self.failed:
            log.warning("proxy listeners failed to start", extra={"failed": "; ".join(self.failed)})
            self._close_servers()
            return False
        log.info(
            "proxy listening",
            extra={"listeners": ", ".join(self.addresses), "engine": self.engine.value},
        )
        return True

    def _factory(self, capture: Capture, spec: ListenSpec) -> Callable[[], ClientConnection]:
        def make() -> ClientConnection:
            return ClientConnection(capture, spec, self._made, self._lost)

        return make

    def _made(self, conn: ClientConnection) -> None:
        if self.draining:
            conn.abort()  # accepted just before the listeners closed: nothing was sent on it
            return
        self._conns.add(conn)
        if self.engine is Engine.MITMPROXY:
            self.services.second_tier.hand_over(conn, b"", "engine mitmproxy")
        else:
            self._entries[conn.capture](conn, self.services)

    def _lost(self, conn: ClientConnection) -> None:
        self._conns.discard(conn)

    def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._close_servers()
        self._stopped.set()

    async def shutdown(self) -> None:
        """After the drain (or instead of it): close everything, stop mitmproxy."""
        self._close_servers()
        for conn in list(self._conns):
            conn.abort()
        self.services.http_pool.close_all()
        await self.services.second_tier.stop()

    # -- the drain --------------------------------------------------------------------------

    def _own_busy(self) -> set[ClientConnection]:
        return {c for c in self._conns if c.busy and not c.handed_over}

    def _close_own_idle(self) -> None:
        for conn in list(self._conns):
            if not conn.busy and not conn.handed_over:
                conn.close()

    async def drain(self, timeout: float, cut_short: asyncio.Event) -> DrainOutcome:
        """Stop accepting, wait up to ``timeout`` s for in-flight work, cut what is left."""
        started = time.monotonic()
        self.draining = True
        self.services.front.draining = True  # responses from now on say connection: close
        self.services.http_pool.close_all()
        self._close_servers()
        second = self.services.second_tier.drain
        in_flight = len(self._own_busy()) + (second.begin() if second is not None else 0)
        log.info(
            "draining: new connections are refused",
            extra={"in_flight": in_flight, "timeout_s": timeout},
        )
        deadline = started + timeout
        while True:
            self._close_own_idle()
            if second is not None:
                second.close_idle()
            busy = len(self._own_busy()) + (second.busy() if second is not None else 0)
            if not busy:
                break
            left = deadline - time.monotonic()
            if left <= 0 or cut_short.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut_short.wait(), min(left, POLL_SECONDS))
        remaining = len(self._own_busy()) + (second.busy() if second is not None else 0)
        await self._cut_all()
        if second is not None:
            await second.cut_all()
        outcome = DrainOutcome(
            in_flight=in_flight,
            drained=max(0, in_flight - remaining),
            cut=remaining,
            seconds=round(time.monotonic() - started, 3),
        )
        log.info(
            "drained" if not outcome.cut else "drain timeout: cut what was still in flight",
            extra={
                "in_flight": outcome.in_flight,
                "drained": outcome.drained,
                "cut": outcome.cut,
                "seconds": outcome.seconds,
                "cut_short": cut_short.is_set(),
            },
        )
        return outcome

    async def _cut_all(self) -> None:
        for conn in list(self._conns):
            if conn.handed_over:
                continue
            if conn.cutter is not None:
                conn.cutter.cut(SHUTDOWN_MESSAGE)
            conn.abort()
        deadline = time.monotonic() + CUT_WAIT_SECONDS
        while any(not c.handed_over for c in self._conns) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS / 5)


def _entries() -> dict[Capture, Entry]:
    from sidecar.fastpath import explicit, transparent

    return {Capture.EXPLICIT: explicit.start, Capture.TRANSPARENT: transparent.start}
