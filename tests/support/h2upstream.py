"""A real HTTPS upstream that speaks HTTP/2 only (ALPN h2), on the h2 library: each request is
answered 200 with a JSON echo of its method, path and protocol, and recorded."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Seen:
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class H2Upstream:
    def __init__(self, host: str, cert: Path, key: Path, *, label: str = "h2") -> None:
        self.label = label
        self.seen = H2Seen()
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(cert), str(key))
        self._tls.set_alpn_protocols(["h2"])
        self._sock = socket.create_server((host, 0))
        self.port = int(self._sock.getsockname()[1])
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name=f"h2-{label}").start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            with self.seen.lock:
                self.seen.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self._tls.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with conn:
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            conn.sendall(h2c.data_to_send())
            heads: dict[int, dict[str, str]] = {}
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        heads[event.stream_id] = {
                            (k.decode() if isinstance(k, bytes) else k): (
                                v.decode() if isinstance(v, bytes) else v
                            )
                            for k, v in event.headers
                        }
                    elif isinstance(event, h2.events.DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self._answer(h2c, event.stream_id, heads.pop(event.stream_id, {}))
                conn.sendall(h2c.data_to_send())

    def _answer(
        self, h2c: h2.connection.H2Connection, stream_id: int, head: dict[str, str]
    ) -> None:
        record = {
            "method": head.get(":method"),
            "path": head.get(":path"),
            "protocol": "h2",
            "headers": {k: v for k, v in head.items() if not k.startswith(":")},
        }
        with self.seen.lock:
            self.seen.requests.append(record)
        body = json.dumps({"upstream": self.label, **record}).encode()
        h2c.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        h2c.send_data(stream_id, body, end_stream=True)

    def stop(self) -> None:
        self._stopped.set()
        self._sock.close()
