"""Limits on an HTTP/1 request head, checked while its bytes arrive. Pure: no I/O, no mitmproxy.

mitmproxy buffers a request head until its blank line with no bound at all (its Http1Server
says "FIXME: protect against header size DoS"): a header that never ends grows the proxy's
memory for as long as the client sends. The scanner below looks at each received byte once,
whatever the chunking, so a client that sends its head one byte at a time costs linear time,
and it rejects a head as soon as it crosses a limit, before the head is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.model import Reason

# After refusing a head the proxy stops writing but keeps reading (and discarding) this long, so
# that the client reads the answer instead of a reset caused by its unread bytes (RFC 9112 9.6).
# Both engines linger this long.
LINGER_SECONDS = 2.0

_LF = 0x0A
_CR = 0x0D


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds on one request head (sizes in bytes, without line endings unless stated)."""

    request_line: int = 8 * 1024
    field_line: int = 16 * 1024  # one header field line
    head: int = 64 * 1024  # the whole head, line endings and the blank line included
    fields: int = 100  # header field lines
    timeout: float = 10.0  # seconds from the head's first byte to its blank line

    def __post_init__(self) -> None:
        for name in ("request_line", "field_line", "head", "fields"):
            if getattr(self, name) < 1:
                raise ValueError(f"head limit {name} must be at least 1")
        if self.timeout <= 0:
            raise ValueError("head limit timeout must be positive")


@dataclass(frozen=True, slots=True)
class HeadRejection:
    """Why a request head is refused, and the status that says so."""

    status: int  # 414, 431 or 408
    reason: Reason
    detail: str


def timeout_rejection(limits: HeadLimits) -> HeadRejection:
    # 408 (RFC 9110 15.5.9): the server did not receive a complete request in the time it was
    # prepared to wait; the connection is then closed.
    return HeadRejection(
        408, Reason.HEAD_TIMEOUT, f"request head not complete within {limits.timeout:g} s"
    )


class HeadScanner:
    """Scans one request head in a buffer that grows; ``scan`` is called after each arrival.

    ``scan`` gets the whole buffer received so far for this head (it may run past the head into
    a body or the next request: scanning stops at the blank line). Empty lines before the
    request line are skipped, as servers do (RFC 9112 2.2).
    """

    __slots__ = ("_complete", "_fields", "_head_start", "_line_start", "_pos", "limits")

    def __init__(self, limits: HeadLimits) -> None:
        self.limits = limits
        self._pos = 0  # next byte to look at
        self._head_start: int | None = None  # first byte of the request line
        self._line_start = 0
        self._fields = 0
        self._complete = False

    @property
    def started(self) -> bool:
        """Whether a byte of the request line has arrived."""
        return self._head_start is not None

    @property
    def complete(self) -> bool:
        """Whether the head's blank line has arrived (within the limits)."""
        return self._complete

    @property
    def scanned(self) -> int:
        """How many bytes of the buffer were looked at; a shorter buffer means a new head."""
        return self._pos

    def scan(self, data: bytes | bytearray) -> HeadRejection | None:
        if self._pos == 0 and self._whole(data):
            return None
        limits = self.limits
        end = len(data)
        pos = self._pos
        while not self._complete and pos < end:
            if self._head_start is None:
                if data[pos] in (_CR, _LF):
                    pos += 1
                    continue
                self._head_start = self._line_start = pos
            head_start = self._head_start
            newline = data.find(b"\n", pos)
            is_request_line = self._line_start == head_start
            limit = limits.request_line if is_request_line else limits.field_line
            if newline < 0:
                # An unfinished line: its last byte may be the CR of its CRLF.
                pos = end
                if end - self._line_start > limit + 1:
                    self._pos = pos
                    return self._line_too_long(is_request_line)
                if end - head_start > limits.head:
                    self._pos = pos
                    return self._head_too_large()
                break
            content_end = newline
            if newline > self._line_start and data[newline - 1] == _CR:
                content_end -= 1
            pos = newline + 1
            self._pos = pos
            if content_end - self._line_start > limit:
                return self._line_too_long(is_request_line)
            if pos - head_start > limits.head:
                return self._head_too_large()
            if content_end == self._line_start and not is_request_line:
                self._complete = True
            elif not is_request_line:
                self._fields += 1
                if self._fields > limits.fields:
                    return HeadRejection(
                        431, Reason.HEAD_TOO_LARGE, f"more than {limits.fields} header fields"
                    )
            self._line_start = pos
        self._pos = pos
        return None

    def _whole(self, data: bytes | bytearray) -> bool:
        """The usual head, whole in the first bytes scanned: read with a few searches instead of
        line by line, when that cannot differ from the loop's reading. True: complete."""
        limits = self.limits
        blank = data.find(b"\r\n\r\n")
        size = blank + 4
        if (
            blank < 0
            or data[0] in (_CR, _LF)  # empty lines first: the loop skips them
            or size > limits.head
            or size > limits.request_line  # then no line can be longer than a limit
            or size > limits.field_line
            or data.find(b"\n\n", 0, size) >= 0  # an earlier bare-LF blank line
            or data.find(b"\n\r\n", 0, blank + 3) >= 0  # or an earlier CRLF one
        ):
            return False
        fields = data.count(b"\n", 0, blank + 2) - 1
        if fields > limits.fields:
            return False  # the loop says which line crossed the count
        self._head_start = 0
        self._pos = self._line_start = size
        self._fields = fields
        self._complete = True
        return True

    def _line_too_long(self, request_line: bool) -> HeadRejection:
        if request_line:
            return HeadRejection(
                414,
                Reason.REQUEST_LINE_TOO_LONG,
                f"request line longer than {self.limits.request_line} bytes",
            )
        return HeadRejection(
            431,
            Reason.HEAD_TOO_LARGE,
            f"a header field line longer than {self.limits.field_line} bytes",
        )

    def _head_too_large(self) -> HeadRejection:
        return HeadRejection(
            431, Reason.HEAD_TOO_LARGE, f"request head larger than {self.limits.head} bytes"
        )


def request_line_start(data: bytes | bytearray) -> tuple[str | None, str | None]:
    """The method and request-target of a (possibly unfinished) head, where they can be read.

    For the decision record of a refused head: the method names the span, an absolute-form
    target names the destination. Never raises; anything unreadable is None.
    """
    first = bytes(data[: 8 * 1024 + 16]).lstrip(b"\r\n")
    line = first.split(b"\n", 1)[0]
    parts = line.split(b" ")
    method = parts[0].decode("ascii", "replace") if parts and parts[0] else None
    if method is not None and not (method.isascii() and method.isalpha() and len(method) <= 16):
        method = None
    target = None
    if len(parts) >= 2 and b"\n" in first and parts[1]:
        target = parts[1].decode("ascii", "replace")
    return method, target
