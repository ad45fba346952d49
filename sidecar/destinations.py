"""What the sidecar saw: a bounded summary of the destinations it decided since start.

Pure data (no I/O): the reporter feeds it one decision record at a time, the health server
renders it as JSON at /debug/destinations, and `kubectl egress suggest|diff` read it back.

One entry per (host-or-address, port, capture, protocol, decision, reason, rule), with a count,
the first and last time seen and the last address connected to. Never a path, a query string or a
URL: only what the decision was taken on. Bounded in entries and in (estimated) bytes; when full,
the least recently seen entries go first, and ``evicted`` says how many went.

Cost per decision, which every call in every pod pays: one tuple of strings that already exist,
one dict lookup, a counter and two attribute updates. Eviction is done in batches (an eighth of
the entries at once) so its sort is paid once per many new destinations, not per decision.

Threads: ``add`` runs on the proxy's event loop, ``snapshot`` on the health server's thread.
``snapshot`` copies the dict in one C-level call (atomic under the GIL) and retries if an insert
raced it; an entry's count read while it is being bumped is off by one at most, which a summary
tolerates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sidecar.record import DecisionRecord

DEFAULT_MAX_ENTRIES: Final = 1024
DEFAULT_MAX_BYTES: Final = 1 << 20
# A rough size of one entry besides its strings: the key tuple, the entry object, the dict slot.
ENTRY_OVERHEAD: Final = 400

type Key = tuple[str, int, str, str, str, str, str | None]


@dataclass(slots=True)
class Entry:
    count: int
    first: float  # epoch seconds
    last: float
    address: str | None  # the address connected to (or that would have been), last seen
    size: int  # estimated bytes, for the memory bound


@dataclass(frozen=True, slots=True)
class SeenDestination:
    """One summarised destination, as served and as read back by the plugin."""

    host: str  # the name asked for, or the address when no name was known
    port: int
    capture: str
    protocol: str  # HTTP method, CONNECT, TLS or TCP
    decision: str
    reason: str
    rule: str | None
    count: int
    first_seen: str  # RFC 3339, UTC
    last_seen: str
    address: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "capture": self.capture,
            "protocol": self.protocol,
            "decision": self.decision,
            "reason": self.reason,
            "rule": self.rule,
            "address": self.address,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_json(cls, item: Any) -> SeenDestination:
        """Read one entry of /debug/destinations; ValueError when it is not one."""
        if not isinstance(item, dict):
            raise ValueError("a destination is not a JSON object")
        try:
            host, port, count = item["host"], item["port"], item["count"]
            texts = [item[k] for k in ("capture", "protocol", "decision", "reason")]
            first, last = item["first_seen"], item["last_seen"]
        except KeyError as err:
            raise ValueError(f"a destination has no {err.args[0]!r}") from None
        rule, address = item.get("rule"), item.get("address")
        if not (
            isinstance(host, str)
            and isinstance(port, int)
            and isinstance(count, int)
            and all(isinstance(t, str) for t in (*texts, first, last))
            and (rule is None or isinstance(rule, str))
            and (address is None or isinstance(address, str))
        ):
            raise ValueError(f"a destination has a field of the wrong type: {item!r:.200}")
        capture, protocol, decision, reason = texts
        return cls(
            host, port, capture, protocol, decision, reason, rule, count, first, last, address
        )


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DestinationSummary:
    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1 or max_bytes < ENTRY_OVERHEAD:
            raise ValueError("a destination summary needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: dict[Key, Entry] = {}
        self._bytes = 0
        self.evicted = 0
        self.since = clock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def estimated_bytes(self) -> int:
        return self._bytes

    def add(self, rec: DecisionRecord) -> None:
        d = rec.decision
        host = rec.host or rec.peer_address or rec.original_address
        if host is None:
            return  # nothing to name it by (an unreadable first flight with no address)
        # The StrEnum members themselves, not their values: they are str (hashed and compared
        # as str, C-level), and reading no attribute saves ~3 lookups per decision.
        key = (host, rec.port, rec.capture, rec.protocol, d.verdict, d.reason, d.rule)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            entry.count += 1
            entry.last = now
            entry.address = rec.peer_address
            return
        self._insert(key, now, rec.peer_address)

    def _insert(self, key: Key, now: float, address: str | None) -> None:
        host, _, _, protocol, _, _, rule = key
        # Hosts and rules can be long (a garbage Host header, a long rule): count their bytes.
        size = ENTRY_OVERHEAD + len(host) + len(protocol) + len(rule or "") + 64
        if len(self._entries) >= self.max_entries or self._bytes + size > self.max_bytes:
            self._evict(size)
        self._entries[key] = Entry(1, now, now, address, size)
        self._bytes += size

    def _evict(self, incoming: int) -> None:
        """Drop the least recently seen eighth (at least one), then more until ``incoming``
        fits the byte bound."""
        by_age = sorted(self._entries.items(), key=lambda item: item[1].last)
        batch = max(1, self.max_entries // 8)
        dropped = 0
        for key, entry in by_age:
            fits = self._bytes + incoming <= self.max_bytes
            if dropped >= batch and fits and len(self._entries) < self.max_entries:
                break
            del self._entries[key]
            self._bytes -= entry.size
            dropped += 1
        self.evicted += dropped

    def snapshot(self) -> list[SeenDestination]:
        """The entries, most recently seen first."""
        for _ in range(100):
            try:
                items = list(self._entries.items())
                break
            except RuntimeError:  # an insert on the event loop raced the copy: copy again
                continue
        else:
            items = []
        out = [
            SeenDestination(
                host=k[0],
                port=k[1],
                capture=str(k[2]),
                protocol=k[3],
                decision=str(k[4]),
                reason=str(k[5]),
                rule=k[6],
                count=e.count,
                first_seen=rfc3339(e.first),
                last_seen=rfc3339(e.last),
                address=e.address,
            )
            for k, e in sorted(items, key=lambda item: -item[1].last)
        ]
        return out

    def to_json(self) -> dict[str, Any]:
        entries = self.snapshot()
        return {
            "since": rfc3339(self.since),
            "max_entries": self.max_entries,
            "entries": len(entries),
            "evicted": self.evicted,
            "destinations": [e.to_json() for e in entries],
        }
