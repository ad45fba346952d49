"""Upstream servers for the network-namespace tests (standard library only).

Runs in the "outside" namespace as a separate process. Every accepted TCP connection and every
UDP datagram is appended to a JSON-lines log *before* anything else happens, so a test can prove
that a denied connection never reached the upstream.

    python netns_upstream.py --log L --ready R --cert C --key K \
        --http 198.18.0.2:80 --https 198.18.0.2:443 --echo 198.18.0.4:5432 \
        --banner 198.18.0.4:3306 --udp 198.18.0.2:443

- http/https: HTTP/1.1 with keep-alive; the answer is JSON naming the local address, the Host
  header and the path; each request is logged with its headers.
- https: TLS is started after the accept is logged (so failed handshakes are recorded too), with
  the certificate given, whatever the SNI.
- echo: echoes bytes back (client speaks first). banner: sends a greeting first (like SMTP or
  MySQL) and then echoes.
- udp: logs the datagram and answers ``udp-ok``.
- capture: a stand-in for the sidecar's transparent listener (runs in the *pod* namespace): logs
  the original destination of each redirected connection (``SO_ORIGINAL_DST``), answers
  ``captured <destination>`` and closes. Proves what the iptables rules redirect.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

MAX_HEADER = 64 * 1024
IO_TIMEOUT = 15.0


class Log:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1, encoding="utf-8")

    def write(self, **record: Any) -> None:
        record["time"] = time.time()
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()


SO_ORIGINAL_DST = 80
SOL_IPV6 = 41


def original_dst(sock: socket.socket) -> str:
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return fmt((socket.inet_ntop(socket.AF_INET, packed), port))
    raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return fmt((socket.inet_ntop(socket.AF_INET6, packed), port))


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def fmt(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: Log, kind: str, local: str
) -> None:
    peer = fmt(writer.get_extra_info("peername"))
    for _ in range(1000):  # bounded keep-alive
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = ([*lines[0].split(" "), "", ""])[:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        log.write(
            event="request",
            kind=kind,
            local=local,
            peer=peer,
            method=method,
            target=target,
            headers=headers,
            body_len=len(body),
        )
        answer = json.dumps(
            {"server": "upstream", "kind": kind, "local": local, "host": headers.get("host", "")}
        ).encode()
        close = headers.get("connection", "").lower() == "close"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(answer)}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
            + answer
        )
        await writer.drain()
        if close:
            return


async def handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    log: Log,
    kind: str,
    tls: ssl.SSLContext | None,
) -> None:
    local = fmt(writer.get_extra_info("sockname"))
    log.write(event="accept", kind=kind, local=local, peer=fmt(writer.get_extra_info("peername")))
    try:
        if kind == "capture":
            sock = writer.get_extra_info("socket")
            dst = original_dst(sock)
            log.write(event="captured", kind=kind, local=local, original=dst)
            # Read what the client sent first: closing with unread data would reset.
            await asyncio.wait_for(reader.read(65536), IO_TIMEOUT)
            writer.write(f"captured {dst}\n".encode())
            await writer.drain()
            return
        if kind == "https":
            assert tls is not None
            await asyncio.wait_for(writer.start_tls(tls), IO_TIMEOUT)
            log.write(event="tls", kind=kind, local=local)
        if kind in ("http", "https"):
            await serve_http(reader, writer, log, kind, local)
            return
        if kind == "banner":
            writer.write(f"220 banner from {local}\r\n".encode())
            await writer.drain()
        for _ in range(10_000):
            data = await asyncio.wait_for(reader.read(65536), IO_TIMEOUT)
            if not data:
                return
            log.write(event="data", kind=kind, local=local, size=len(data))
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
        log.write(event="error", kind=kind, local=local, error=type(exc).__name__)
    finally:
        writer.close()


class Udp(asyncio.DatagramProtocol):
    def __init__(self, log: Log, local: str) -> None:
        self.log = log
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.log.write(event="datagram", kind="udp", local=self.local, peer=fmt(addr))
        if self.transport is not None:
            self.transport.sendto(b"udp-ok", addr)


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--ready", type=Path, required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    for kind in ("http", "https", "echo", "banner", "udp", "capture"):
        p.add_argument(f"--{kind}", action="append", default=[])
    args = p.parse_args(argv)
    log = Log(args.log)
    tls = None
    if args.https:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    servers = []
    for kind in ("http", "https", "echo", "banner", "capture"):
        for spec in getattr(args, kind):
            host, port = split_addr(spec)

            async def cb(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, kind: str = kind
            ) -> None:
                await handle(r, w, log, kind, tls)

            servers.append(await asyncio.start_server(cb, host, port, reuse_address=True))
    loop = asyncio.get_running_loop()
    for spec in args.udp:
        host, port = split_addr(spec)
        local = fmt((host, port))
        await loop.create_datagram_endpoint(
            functools.partial(Udp, log, local),
            local_addr=(host, port),
        )
    args.ready.write_text("ready\n")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
