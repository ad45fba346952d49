"""Small real clients for the network-namespace tests (standard library only).

Run as the app's UID inside the pod namespace; each prints one JSON object.

    tcp HOST PORT [--send TEXT]       raw socket: connect, optionally send, read until EOF/timeout
    udp HOST PORT                     connected UDP socket: send, wait for a reply or an ICMP error
    keepalive HOST PORT HOST1 HOST2   two HTTP/1.1 requests on one connection, Host HOST1 then HOST2
    raw HOST PORT TEXT                send TEXT (backslash escapes: \r\n) at once, read until EOF
    urllib URL [--host H] [--cafile F] Python urllib (no proxy variables), status and body
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT = 5.0


def tcp(host: str, port: int, send: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"connected": False, "received": "", "error": None}
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            out["connected"] = True
            if send is not None:
                sock.sendall(send.encode())
            data = b""
            for _ in range(100):
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
                # Echo: stop once it is all back. Server speaks first: its greeting is enough.
                if send is None or data.endswith(send.encode()):
                    break
            out["received"] = data.decode("utf-8", "replace")
    except OSError as exc:
        out["error"] = type(exc).__name__
    return out


def udp(host: str, port: int) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect((host, port))
        try:
            sock.send(b"quic?")
            return {"reply": sock.recv(1024).decode(), "error": None}
        except OSError as exc:
            return {"reply": None, "error": type(exc).__name__}


def keepalive(host: str, port: int, names: list[str]) -> dict[str, Any]:
    statuses: list[int | None] = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        for name in names:
            try:
                sock.sendall(f"GET /ka HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
                status_line = reader.readline()
                if not status_line:
                    statuses.append(None)
                    break
                statuses.append(int(status_line.split()[1]))
                length = 0
                for _ in range(200):
                    line = reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
            except OSError:
                statuses.append(None)
                break
    return {"statuses": statuses}


def raw(host: str, port: int, text: str) -> dict[str, Any]:
    payload = text.encode().decode("unicode_escape").encode("latin-1")
    out: dict[str, Any] = {"received": "", "error": None}
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(payload)
            data = b""
            for _ in range(1000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            out["received"] = data.decode("utf-8", "replace")
    except OSError as exc:
        out["error"] = type(exc).__name__
    return out


def fetch(url: str, host: str | None, cafile: str | None) -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    try:
        with opener.open(req, timeout=TIMEOUT) as resp:
            return {"status": resp.status, "body": resp.read().decode(), "error": None}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(), "error": None}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"status": None, "body": "", "error": f"{type(reason).__name__}: {reason}"}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tcp")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--send")
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    k = sub.add_parser("keepalive")
    k.add_argument("host")
    k.add_argument("port", type=int)
    k.add_argument("names", nargs="+")
    r = sub.add_parser("raw")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("text")
    f = sub.add_parser("urllib")
    f.add_argument("url")
    f.add_argument("--host")
    f.add_argument("--cafile")
    a = p.parse_args(argv)
    if a.cmd == "tcp":
        result = tcp(a.host, a.port, a.send)
    elif a.cmd == "udp":
        result = udp(a.host, a.port)
    elif a.cmd == "keepalive":
        result = keepalive(a.host, a.port, a.names)
    elif a.cmd == "raw":
        result = raw(a.host, a.port, a.text)
    else:
        result = fetch(a.url, a.host, a.cafile)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
