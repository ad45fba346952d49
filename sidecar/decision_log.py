"""One JSON line per decision on stdout; the rest of the logging is JSON on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from sidecar.record import DecisionRecord

_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def decision_line(rec: DecisionRecord, *, now: float | None = None) -> str:
    d = rec.decision
    entry: dict[str, Any] = {
        "ts": _iso(time.time() if now is None else now),
        "msg": "egress decision",
        "decision": d.verdict.value,
        "reason": d.reason.value,
        "rule": d.rule,
        "capture": rec.capture.value,
        "protocol": rec.protocol,
        "host": rec.host,
        "port": rec.port,
        "address": rec.peer_address or rec.original_address,
        "method": rec.method,
        "url": rec.url,
        "status": rec.status_code,
        "client": rec.client_address,
        "policy_source": rec.policy_source,
        "policy_version": rec.policy_version,
        "mode": rec.mode,
    }
    if d.detail:
        entry["detail"] = d.detail
    if rec.error:
        entry["error"] = rec.error
    return json.dumps({k: v for k, v in entry.items() if v is not None}, separators=(",", ":"))


class DecisionLog:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout

    def write(self, rec: DecisionRecord) -> None:
        self._stream.write(decision_line(rec) + "\n")
        self._stream.flush()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # mitmproxy logs every client and server connection at INFO: per-request noise. The decision
    # line is the per-request record; mitmproxy's own lines only at debug level.
    logging.getLogger("mitmproxy").setLevel("DEBUG" if level == "debug" else "WARNING")
