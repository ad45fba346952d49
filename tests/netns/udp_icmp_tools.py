"""Small real endpoints for the UDP/ICMP capture tests (standard library only).

dns-server --log L --ready R ADDR:PORT...   a tiny DNS responder standing in for the pod's
                                            resolver: A → 198.18.0.9, AAAA → fd00:e5::9,
                                            every query logged (JSON lines) before answering
ping HOST [--payload TEXT]                  one ICMP echo through an unprivileged ping socket
                                            (what `ping` uses without privileges; needs
                                            net.ipv4.ping_group_range), prints JSON
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, TextIO

ANSWER_A = ipaddress.IPv4Address("198.18.0.9")
ANSWER_AAAA = ipaddress.IPv6Address("fd00:e5::9")
TYPE_A, TYPE_AAAA = 1, 28
IP_RECVERR, IPV6_RECVERR = 11, 25  # <linux/in.h>, <linux/in6.h>


def split_addr(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]"), int(port)


def question_end(msg: bytes) -> tuple[str, int, int]:
    """The query name, its type and where the question ends (no compression in queries)."""
    pos, labels = 12, []
    while msg[pos]:
        labels.append(msg[pos + 1 : pos + 1 + msg[pos]].decode("ascii", "replace"))
        pos += 1 + msg[pos]
    qtype = struct.unpack_from("!H", msg, pos + 1)[0]
    return ".".join(labels), qtype, pos + 5


def answer(query: bytes) -> tuple[str, int, bytes]:
    name, qtype, end = question_end(query)
    rdata = {TYPE_A: ANSWER_A.packed, TYPE_AAAA: ANSWER_AAAA.packed}.get(qtype)
    # Header: same id, QR + RD + RA, one question, one answer when we have one.
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if rdata else 0, 0, 0)
    reply = header + query[12:end]
    if rdata:
        reply += struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
    return name, qtype, reply


class Dns(asyncio.DatagramProtocol):
    def __init__(self, log: TextIO, local: str) -> None:
        self.log, self.local = log, local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            name, qtype, reply = answer(data)
        except (IndexError, struct.error):
            name, qtype, reply = "", 0, b""
        record = {"event": "dns", "local": self.local, "qname": name, "qtype": qtype}
        self.log.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.log.flush()
        if reply and self.transport is not None:
            self.transport.sendto(reply, addr)


async def dns_server(log_path: Path, ready: Path, specs: list[str]) -> None:
    log = log_path.open("a", encoding="utf-8")
    loop = asyncio.get_running_loop()
    for spec in specs:
        host, port = split_addr(spec)
        await loop.create_datagram_endpoint(
            functools.partial(Dns, log, spec), local_addr=(host, port)
        )
    ready.write_text("ready\n")
    await asyncio.Event().wait()


def ping(host: str, payload: str) -> dict[str, Any]:
    v6 = ":" in host
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    out: dict[str, Any] = {"reply": False, "error": None}
    start = time.monotonic()
    try:
        with socket.socket(family, socket.SOCK_DGRAM, proto) as sock:
            sock.settimeout(2.0)
            # As iputils ping does: ICMP errors about our echo (the REJECT's answer) are
            # reported to the socket; without it an IPv6 ping socket only times out.
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            # The kernel fills in the identifier and the checksum of a ping socket's echo.
            echo = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + payload.encode()
            sock.sendto(echo, (host, 0))
            data = sock.recv(2048)
            out["reply"] = data[0] == (129 if v6 else 0) and data.endswith(payload.encode())
    except OSError as exc:
        out["error"] = type(exc).__name__
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dns-server")
    d.add_argument("--log", type=Path, required=True)
    d.add_argument("--ready", type=Path, required=True)
    d.add_argument("listen", nargs="+")
    g = sub.add_parser("ping")
    g.add_argument("host")
    g.add_argument("--payload", default="exfiltrated-bytes")
    a = p.parse_args(argv)
    if a.cmd == "dns-server":
        asyncio.run(dns_server(a.log, a.ready, a.listen))
    else:
        print(json.dumps(ping(a.host, a.payload)))


if __name__ == "__main__":
    main(sys.argv[1:])
