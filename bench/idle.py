"""Many idle CONNECT tunnels held open at once: what each costs a proxy in memory.

Each tunnel is a CONNECT to the explicit proxy and a full TLS handshake with the upstream
through it (so the proxy relays both ways and holds both sockets, as for an app's pooled HTTPS
connection), then nothing. The proxy's RSS is read before the first and while all are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from bench.configs import LOOPBACK

_HEAD_LIMIT = 16384


@dataclass(frozen=True)
class IdleResult:
    wanted: int
    held: int  # tunnels open, handshaken and still open when the RSS was read
    failed: int
    rss_before_mib: float
    rss_held_mib: float
    seconds_to_open: float

    @property
    def kib_per_connection(self) -> float:
        if self.held <= 0:
            return float("nan")
        return (self.rss_held_mib - self.rss_before_mib) * 1024 / self.held


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file soft limit to the hard one (children inherit it: nginx
    and Squid hold as many sockets as the bench); the soft limit now. Fails if the hard limit is
    below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RuntimeError(f"open-file hard limit {hard} < {wanted}: raise it (ulimit -Hn)")
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _client_tls() -> ssl.SSLContext:
    # The upstream is the bench's own nginx with a throwaway certificate: the proxy's memory is
    # measured, not the upstream's identity.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _open_tunnel(
    proxy_port: int, authority: str, tls: ssl.SSLContext, timeout: float
) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, proxy_port), timeout)
    try:
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if len(head) > _HEAD_LIMIT or not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise ConnectionError(f"CONNECT answered {head[:40]!r}")
        await asyncio.wait_for(writer.start_tls(tls, server_hostname=LOOPBACK), timeout)
    except BaseException:
        writer.transport.abort()
        raise
    return writer


async def _hold(
    proxy_port: int,
    authority: str,
    count: int,
    *,
    parallel: int,
    timeout: float,
    settle: float,
    rss: Callable[[], float],
) -> IdleResult:
    tls = _client_tls()
    gate = asyncio.Semaphore(parallel)
    loop = asyncio.get_running_loop()

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return await _open_tunnel(proxy_port, authority, tls, timeout)

    before = rss()
    t0 = loop.time()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    opened = loop.time() - t0
    writers = [r for r in results if isinstance(r, asyncio.StreamWriter)]
    try:
        await asyncio.sleep(settle)  # let the proxy finish its per-connection work
        # a tunnel the proxy or upstream closed meanwhile is not counted as held
        held = sum(1 for w in writers if not w.transport.is_closing() and not w.is_closing())
        during = rss()
    finally:
        for w in writers:
            with contextlib.suppress(Exception):
                w.transport.abort()
    return IdleResult(count, held, count - len(writers), before, during, opened)


def hold_idle_tunnels(
    proxy_port: int,
    upstream_port: int,
    count: int,
    rss: Callable[[], float],
    *,
    parallel: int = 64,
    timeout: float = 20.0,
    settle: float = 1.0,
    deadline: float = 120.0,
) -> IdleResult:
    """Open ``count`` tunnels through the proxy to the upstream, ``parallel`` at a time, hold
    them ``settle`` seconds, read ``rss()`` (the proxy's RSS, MiB), close them all."""
    raise_nofile(count + 256)
    coro = _hold(
        proxy_port,
        f"{LOOPBACK}:{upstream_port}",
        count,
        parallel=parallel,
        timeout=timeout,
        settle=settle,
        rss=rss,
    )
    return asyncio.run(asyncio.wait_for(coro, deadline))
