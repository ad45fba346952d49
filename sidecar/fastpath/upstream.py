"""Connecting to a vetted upstream address, bounded in time, with a message that says what failed
(the span's error and error.type, the client's 502/504 come from it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from sidecar.telemetry.spans import error_type


class UpstreamError(Exception):
    """The upstream connect failed: ``str(err)`` says how, ``error_type`` is its category."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type(message)


async def dial[P: asyncio.BaseProtocol](
    address: str, port: int, factory: Callable[[], P], timeout: float
) -> tuple[asyncio.Transport, P]:
    """Open a TCP connection to ``address`` (an IP literal: names are resolved and vetted before)
    with ``factory``'s protocol; ``timeout`` <= 0 waits as long as the kernel does. ``Connect``
    awaited: for callers that are coroutines."""
    finished: asyncio.Future[UpstreamError | None] = asyncio.get_running_loop().create_future()

    def done(error: UpstreamError | None) -> None:
        if not finished.done():
            finished.set_result(error)

    connect = Connect(address, port, factory, timeout, done)
    try:
        error = await finished
    except BaseException:
        connect.cancel()  # cancelled: the client left or the sidecar is stopping
        raise
    if error is not None:
        raise error
    transport = connect.transport
    assert transport is not None
    protocol: P = transport.get_protocol()  # type: ignore[assignment]  # factory()'s
    return transport, protocol


class Connect[P: asyncio.BaseProtocol]:
    """``dial`` for callers that are not coroutines: a non-blocking connect whose outcome comes
    as one call of ``done`` (the transport's protocol already had connection_made), or never
    after ``cancel``. No task, no future and, where the kernel answers at once, no timer: for a
    new tunnel these were a fifth of its CPU on asyncio's selector loop. On another loop (uvloop)
    the loop's own create_connection connects, by address: no socket object of ours that a
    cancelled connect could leave holding a descriptor the loop closed (uvloop #645).
    """

    __slots__ = ("_address", "_done", "_factory", "_loop", "_sock", "_task", "_timer", "transport")

    def __init__(
        self,
        address: str,
        port: int,
        factory: Callable[[], P],
        timeout: float,
        done: Callable[[UpstreamError | None], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._address = (address, port)
        self._factory = factory
        self._done: Callable[[UpstreamError | None], None] | None = done
        self._timer: asyncio.TimerHandle | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[tuple[asyncio.Transport, P]] | None = None
        self.transport: asyncio.Transport | None = None
        if not isinstance(self._loop, asyncio.SelectorEventLoop):
            self._task = self._loop.create_task(
                self._loop.create_connection(factory, address, port)
            )
            self._task.add_done_callback(self._connected)
            if timeout > 0:
                self._timer = self._loop.call_later(timeout, self._timed_out, timeout)
            return
        try:
            sock = self._sock = socket.socket(
                socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM
            )
            sock.setblocking(False)
            sock.connect(self._address)
        except BlockingIOError:
            self._loop.add_writer(sock.fileno(), self._writable)
            if timeout > 0:
                self._timer = self._loop.call_later(timeout, self._timed_out, timeout)
        except OSError as err:
            self._fail(err)
        else:
            self._made()

    def cancel(self) -> None:
        """Stop: the socket (or the transport it became) is closed, ``done`` never called."""
        self._done = None
        self._stop_waiting()
        if self.transport is not None:
            self.transport.abort()
        elif self._task is not None:
            self._task.cancel()
        elif self._sock is not None:
            self._sock.close()
            self._sock = None

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None and self.transport is None:
            self._loop.remove_writer(self._sock.fileno())

    def _writable(self) -> None:
        self._stop_waiting()
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, f"Connect call failed {self._address}"))  # asyncio's words
        else:
            self._made()

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._stop_waiting()
        if self._task is not None:
            self._task.cancel()  # its outcome is no longer awaited: _done goes first
            self._finish(UpstreamError(f"connect timed out after {timeout:g} s"))
            return
        self._fail(TimeoutError(f"connect timed out after {timeout:g} s"))

    def _connected(self, task: asyncio.Task[tuple[asyncio.Transport, P]]) -> None:
        """The loop's create_connection ended (connection_made has been called)."""
        if task.cancelled():
            return  # cancel() or the timeout: done was called or is never to be
        self._stop_waiting()
        error = task.exception()
        if error is None:
            self.transport = task.result()[0]
            if self._done is None:
                self.transport.abort()  # cancelled while it completed
            self._finish(None)
        else:
            # the loop's own words ("[Errno 111] Connection refused" on uvloop), as mitmproxy's
            # connects on the same loop say it; error.type reads either wording alike
            self._finish(UpstreamError(str(error) or type(error).__name__))

    def _fail(self, err: OSError) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        message = str(err) if isinstance(err, TimeoutError) else (str(err) or type(err).__name__)
        self._loop.call_soon(self._finish, UpstreamError(message))

    def _made(self) -> None:
        # The loop's own transport, as create_connection makes it; its __init__ queues
        # connection_made (and TCP_NODELAY is set), so _finish, queued after, comes after it.
        self.transport = self._loop._make_socket_transport(  # type: ignore[attr-defined]
            self._sock, self._factory()
        )
        self._loop.call_soon(self._finish, None)

    def _finish(self, error: UpstreamError | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(error)
