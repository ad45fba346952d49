"""A connection made straight to the transparent port (no iptables redirect behind it) has no
original destination: it is closed, and a burst of them is one warning, not an ERROR each."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from pathlib import Path

from sidecar.proxy.listeners import UnredirectedConnections
from tests.proxy.lifecycle_support import Ports, launch


def test_a_burst_of_unredirected_connections_is_closed_and_logged_once(tmp_path: Path) -> None:
    sidecar = launch(tmp_path, Ports.free(), allowlist="allow: []\n")
    try:
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", sidecar.transparent_port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(5)
                # Closed unanswered (or reset: the request was left unread).
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""
        time.sleep(0.5)
        assert sidecar.health("/healthz/ready")[0] == 200
    finally:
        assert sidecar.stop() == 0
    lines = [json.loads(x) for x in sidecar.stderr if x.startswith("{")]
    assert not [x for x in lines if x["level"] == "error"], lines[-5:]
    warned = [x for x in lines if "not redirected" in x["msg"]]
    assert len(warned) == 1 and warned[0]["level"] == "warning", warned


def test_the_filter_counts_what_it_held_back() -> None:
    record = logging.LogRecord(
        "mitmproxy.proxy.mode_servers",
        logging.ERROR,
        "",
        0,
        "Transparent mode failure: x",
        (),
        None,
    )
    other = logging.LogRecord("m", logging.ERROR, "", 0, "something else", (), None)
    unredirected = UnredirectedConnections(interval=60)
    assert unredirected.filter(other) and other.levelno == logging.ERROR
    assert unredirected.filter(record) and record.levelno == logging.WARNING
    assert record.__dict__["times"] == 1
    for _ in range(5):
        again = logging.LogRecord(
            "mitmproxy.proxy.mode_servers",
            logging.ERROR,
            "",
            0,
            "Transparent mode failure",
            (),
            None,
        )
        assert not unredirected.filter(again)
