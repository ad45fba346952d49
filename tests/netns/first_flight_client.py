"""A real TLS client that sends its first flight the slow way (standard library only).

Run as the app's UID inside the pod namespace; prints one JSON object.

    tls HOST PORT SNI CAFILE [--piece N] [--stall-after B --stall S]
        A ClientHello written by Python's ssl (OpenSSL) for SNI, sent N bytes per write (1 by
        default, TCP_NODELAY: one segment each), optionally pausing S seconds after B bytes;
        then the handshake is finished with whoever answers, the certificate verified against
        CAFILE (hostname not checked: the fingerprint is reported), and one HTTP request sent.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import ssl
import sys
import time
from typing import Any

TIMEOUT = 5.0


def tls(args: argparse.Namespace) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=args.cafile)
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=args.sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()
    hello = outgoing.read()
    out: dict[str, Any] = {"hello_size": len(hello), "sent": 0, "fingerprint": None}
    out.update(status=None, error=None)
    try:
        with socket.create_connection((args.host, args.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(hello), args.piece):
                if args.stall_after is not None and i == args.stall_after:
                    time.sleep(args.stall)
                sock.sendall(hello[i : i + args.piece])
                out["sent"] = i + args.piece
                time.sleep(0.001)
            for _ in range(100):
                try:
                    conn.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if pending := outgoing.read():
                        sock.sendall(pending)
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed during the handshake") from None
                    incoming.write(data)
            der = conn.getpeercert(binary_form=True)
            out["fingerprint"] = hashlib.sha256(der).hexdigest() if der else None
            ask = f"GET /dribbled HTTP/1.1\r\nHost: {args.sni}\r\nConnection: close\r\n\r\n"
            conn.write(ask.encode())
            sock.sendall(outgoing.read())
            response = b""
            for _ in range(100):
                try:
                    response += conn.read(65536)
                    if b"\r\n\r\n" in response:
                        break
                except ssl.SSLWantReadError:
                    data = sock.recv(65536)
                    if not data:
                        break
                    incoming.write(data)
            out["status"] = int(response.split(b" ", 2)[1]) if response else None
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tls")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("sni")
    t.add_argument("cafile")
    t.add_argument("--piece", type=int, default=1)
    t.add_argument("--stall-after", type=int)
    t.add_argument("--stall", type=float, default=0.0)
    print(json.dumps(tls(p.parse_args(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
