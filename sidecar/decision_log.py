"""One JSON line per decision on stdout; the rest of the logging is JSON on stderr."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import IO, Any

from sidecar.memo import remember
from sidecar.record import DecisionRecord

_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def decision_line_reference(rec: DecisionRecord, *, now: float | None = None) -> str:
    """The line as json.dumps of a dict writes it: the definition decision_line must match."""
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
    if rec.tls_inspected:
        entry["inspected"] = True
    if d.detail:
        entry["detail"] = d.detail
    if rec.error:
        entry["error"] = rec.error
    return json.dumps({k: v for k, v in entry.items() if v is not None}, separators=(",", ":"))


# The line's fixed stretches, quoted once: a decision's own fields with where it went, and the
# policy's. Keyed by every value they hold; bounded in count (cleared when full) and in length
# because a host is the caller's to choose.
_SEGMENTS_MAX = 1024
_SEGMENT_CHARS = 1024  # so the caches hold at most a few MiB, whatever the hosts
_heads: dict[tuple[object, ...], str] = {}
_tails: dict[tuple[str, str, str], str] = {}


def decision_line(rec: DecisionRecord, *, now: float | None = None) -> str:
    """decision_line_reference's bytes, about 4x cheaper: no dict, no generic encoder dispatch,
    and the stretches that repeat from call to call quoted once.

    json.dumps escapes strings with this same C function (ensure_ascii) and writes ints with
    int.__repr__, so fixed keys in the same order give the same line. Enum members are read
    through ``_value_``, the plain attribute behind the ``value`` descriptor (~1 us a read).
    """
    d = rec.decision
    q = _quote
    key = (d.verdict, d.reason, d.rule, rec.capture, rec.protocol, rec.host, rec.port)
    head = _heads.get(key)
    if head is None:
        parts = [
            '","msg":"egress decision","decision":',
            q(d.verdict._value_),
            ',"reason":',
            q(d.reason._value_),
        ]
        if d.rule is not None:
            parts += ',"rule":', q(d.rule)
        parts += ',"capture":', q(rec.capture._value_), ',"protocol":', q(rec.protocol)
        if rec.host is not None:
            parts += ',"host":', q(rec.host)
        parts += ',"port":', int.__repr__(rec.port)
        head = "".join(parts)
        if len(head) <= _SEGMENT_CHARS:  # a long host or rule: quoted each time, not kept
            remember(_heads, key, head, _SEGMENTS_MAX)
    policy = (rec.policy_source, rec.policy_version, rec.mode)
    tail = _tails.get(policy)
    if tail is None:
        tail = ',"policy_source":{},"policy_version":{},"mode":{}'.format(*map(q, policy))
        if len(tail) <= _SEGMENT_CHARS:
            remember(_tails, policy, tail, _SEGMENTS_MAX)
    parts = ['{"ts":"', _iso(time.time() if now is None else now), head]
    address = rec.peer_address or rec.original_address
    if address is not None:
        parts += ',"address":', q(address)
    if rec.method is not None:
        parts += ',"method":', q(rec.method)
    if rec.url is not None:
        parts += ',"url":', q(rec.url)
    if rec.status_code is not None:
        parts += ',"status":', int.__repr__(rec.status_code)
    if rec.client_address is not None:
        parts += ',"client":', q(rec.client_address)
    parts.append(tail)
    if rec.tls_inspected:
        parts.append(',"inspected":true')
    if d.detail:
        parts += ',"detail":', q(d.detail)
    if rec.error:
        parts += ',"error":', q(rec.error)
    parts.append("}")
    return "".join(parts)


# Decision lines leave at most this long after being written (tests and `kubectl logs -f` read
# them live), or sooner when this many characters are waiting.
FLUSH_INTERVAL_S = 0.02
FLUSH_AT_CHARS = 64 * 1024


class DecisionLog:
    """Decision lines on stdout, written in batches: one write+flush per ~20 ms, not per line.

    A flush per line cost ~9 us of a decision's ~90 us. Lines written from an event loop are
    buffered and flushed by a call_later on that loop; from outside any loop (a CLI, a test) they
    go out at once. flush() (called at exit, after the drain) writes whatever is left.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout
        self._pending: list[str] = []
        self._chars = 0
        self._scheduled = False
        self._lock = threading.Lock()  # write() may come from a thread (mitmproxy's, tests')
        atexit.register(self.flush)

    def write(self, rec: DecisionRecord) -> None:
        line = decision_line(rec) + "\n"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(line)
            self._chars += len(line)
            if loop is not None and self._chars < FLUSH_AT_CHARS:
                if not self._scheduled:
                    self._scheduled = True
                    loop.call_later(FLUSH_INTERVAL_S, self._flush_scheduled)
                return
        self.flush()

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            self._chars = 0
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # stdout closed or gone at exit: nothing to tell
                pass


# [(second, its text)]: one tuple, so that threads logging at once never pair a stale text with
# a newer second.
_iso_cache: list[tuple[int, str]] = [(-1, "")]


def _iso(ts: float) -> str:
    # strftime+gmtime was most of the cost; the second changes rarely, so cache its text.
    second = int(ts)
    cached = _iso_cache[0]
    if cached[0] == second:
        prefix = cached[1]
    else:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
        _iso_cache[0] = (second, prefix)
    return prefix + _MILLIS[int(ts % 1 * 1000)]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # formatting them cost ~1 us a line


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
