"""The lean exporter's connection to the collector, against scripted servers on real sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.telemetry.collector import (
    MAX_RESPONSE,
    CollectorConnection,
    CollectorProtocolError,
    valid_field,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Request:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int  # which accepted connection carried it (0, 1, ...)


@dataclass
class Script:
    """A collector that answers the n-th request with ``answers[n]`` (bytes written in
    pieces, one write each; after the last answer: 200), closing after it if n in ``close``."""

    answers: list[list[bytes]] = field(default_factory=list)
    close: set[int] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    accepted: int = 0


class _Reader:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def _serve(script: Script, listener: socket.socket, stop: threading.Event) -> None:
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        number = script.accepted
        script.accepted += 1
        threading.Thread(target=_answer, args=(script, conn, number), daemon=True).start()


def _answer(script: Script, conn: socket.socket, number: int) -> None:
    conn.settimeout(10)
    with conn:
        while True:
            reader = _Reader()
            parser = httptools.HttpRequestParser(reader)
            try:
                while not reader.done:
                    data = conn.recv(65536)
                    if not data:
                        return
                    parser.feed_data(data)
            except OSError:
                return
            index = len(script.requests)
            request = Request(
                parser.get_method(), reader.url, reader.headers, bytes(reader.body), number
            )
            script.requests.append(request)
            for piece in script.answers[index] if index < len(script.answers) else [OK]:
                conn.sendall(piece)
            if index in script.close:
                return


@pytest.fixture
def served() -> Iterator[tuple[Script, int]]:
    script = Script()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(script, listener, stop), daemon=True)
    thread.start()
    yield script, listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def _connection(port: int, headers: list[tuple[str, str]] | None = None) -> CollectorConnection:
    return CollectorConnection("http", "127.0.0.1", port, "/v1/traces", headers or [], 5.0, None)


@pytest.mark.parametrize("size", [0, 10, 16 * 1024, 16 * 1024 + 1, 300_000])
def test_the_request_reaches_the_collector_as_written(
    served: tuple[Script, int], size: int
) -> None:
    script, port = served
    body = bytes(i % 251 for i in range(size))
    conn = _connection(port, [("authorization", "Bearer t0k"), ("x-tenant", "a b")])
    assert conn.post(body, gzipped=False) == 200
    assert conn.post(body, gzipped=True) == 200
    conn.close()
    first, second = script.requests
    assert (first.method, first.url, first.body) == (b"POST", b"/v1/traces", body)
    assert first.headers == [
        (b"Host", f"127.0.0.1:{port}".encode()),
        (b"authorization", b"Bearer t0k"),
        (b"x-tenant", b"a b"),
        (b"Content-Type", b"application/x-protobuf"),
        (b"Content-Length", str(size).encode()),
    ]
    assert (b"Content-Encoding", b"gzip") in second.headers
    assert (b"Content-Encoding", b"gzip") not in first.headers
    assert second.body == body
    assert (first.connection, second.connection) == (0, 0)  # kept alive


ANSWERS = [
    # (pieces written, status, connection kept for the next POST)
    ([OK], 200, True),
    ([OK[:9], OK[9:30], OK[30:]], 200, True),  # a head in pieces
    ([b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhello"], 202, True),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"], 200, True),
    ([b"HTTP/1.1 503 Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"], 503, True),
    ([b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nnope"], 400, True),
    ([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"], 200, False),
    ([b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"], 200, False),
    ([b"HTTP/1.1 100 Continue\r\n\r\n" + OK], 200, True),  # an interim answer, one write
    ([b"HTTP/1.1 100 Continue\r\n\r\n", OK], 200, True),  # and in two
]


@pytest.mark.parametrize(("pieces", "status", "kept"), ANSWERS)
def test_the_final_answer_is_read_and_the_connection_kept_as_it_says(
    served: tuple[Script, int], pieces: list[bytes], status: int, kept: bool
) -> None:
    script, port = served
    script.answers = [pieces]
    if not kept:
        script.close = {0}
    conn = _connection(port)
    assert conn.post(b"x", gzipped=False) == status
    assert conn.connected is kept
    assert conn.post(b"y", gzipped=False) == 200  # the next POST, on a new connection if closed
    assert [r.connection for r in script.requests] == [0, 0 if kept else 1]
    conn.close()


def test_a_body_read_to_the_close_ends_with_it(served: tuple[Script, int]) -> None:
    script, port = served
    script.answers = [[b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome body"]]
    script.close = {0}
    conn = _connection(port)
    assert conn.post(b"x", gzipped=False) == 200
    assert not conn.connected


_LONG = MAX_RESPONSE + 1
UNREADABLE = [
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], CollectorProtocolError, "mid-answer"),
    ([b"HTTP/1.1 200 OK\r\nContent-"], CollectorProtocolError, "mid-answer"),
    ([b"SSH-2.0-OpenSSH_9.2\r\n"], CollectorProtocolError, "unreadable answer"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"], CollectorProtocolError, "unreadable"),
    (
        [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"],
        CollectorProtocolError,
        "switched protocols",
    ),
    (
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _LONG, b"x" * _LONG],
        CollectorProtocolError,
        "response body over",
    ),
    ([], ConnectionResetError, "closed the connection"),
]


@pytest.mark.parametrize(("pieces", "error", "message"), UNREADABLE)
def test_an_answer_that_cannot_be_read_is_an_error_and_closes_the_connection(
    served: tuple[Script, int], pieces: list[bytes], error: type[Exception], message: str
) -> None:
    script, port = served
    script.answers = [pieces]
    script.close = {0}
    conn = _connection(port)
    with pytest.raises(error, match=message):
        conn.post(b"x", gzipped=False)
    assert not conn.connected
    assert conn.post(b"y", gzipped=False) == 200  # a new connection works


def test_a_kept_alive_connection_the_collector_closed_fails_as_a_connection_error(
    served: tuple[Script, int],
) -> None:
    # What the exporter retries once on a new connection (test_lean): a stale connection.
    script, port = served
    script.close = {0}  # answers 200 (keep-alive implied), then closes
    conn = _connection(port)
    assert conn.post(b"x", gzipped=False) == 200
    assert conn.connected
    with pytest.raises(OSError):  # reset, broken pipe or EOF: the OS decides
        for _ in range(3):  # the close may not be seen by the first write
            conn.post(b"y" * 100_000, gzipped=False)
    assert not conn.connected


def test_a_collector_that_never_answers_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        conn = CollectorConnection(
            "http", "127.0.0.1", listener.getsockname()[1], "/v1/traces", [], 0.3, None
        )
        with pytest.raises(TimeoutError):
            conn.post(b"x", gzipped=False)
        assert not conn.connected
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("host", "port", "scheme", "field"),
    [
        ("collector", 4318, "http", "collector:4318"),
        ("collector", 80, "http", "collector"),
        ("collector", 443, "https", "collector"),
        ("collector", 443, "http", "collector:443"),
        ("::1", 4318, "http", "[::1]:4318"),
        ("fd00::5", 443, "https", "[fd00::5]"),
    ],
)
def test_the_host_field_is_what_http_client_wrote(
    host: str, port: int, scheme: str, field: str
) -> None:
    conn = CollectorConnection(scheme, host, port, "/v1/traces", [], 1.0, None)
    assert conn._head.split(b"\r\n")[1] == b"Host: " + field.encode()


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("authorization", "Bearer abc", True),
        ("x-api-key", "", True),
        ("x-weird_name.1~", "v=1; w=2", True),
        ("bad name", "v", False),
        ("", "v", False),
        ("x-a:b", "v", False),
        ("x-a", "v\r\nx-injected: 1", False),
        ("x-a", "v\nb", False),
        ("x-a", "v\x00", False),
        ("x-a", "v\x08", False),
        ("x-a", "v\x7f", False),
        ("x-a", "tab\there ü", True),
    ],
)
def test_valid_field(name: str, value: str, ok: bool) -> None:
    assert valid_field(name, value) is ok


@pytest.mark.parametrize(
    ("value", "written"),
    [("v", b"v"), ("v\t", b"v"), ("\t v \t", b"v"), ("a\tb c", b"a\tb c"), ("", b"")],
)
def test_a_field_is_written_without_the_blanks_around_its_value(value: str, written: bytes) -> None:
    conn = CollectorConnection("http", "c", 80, "/v1/traces", [("x-a", value)], 1.0, None)
    assert b"\r\nx-a: " + written + b"\r\n" in conn._head


_FIELD_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)


@settings(max_examples=300, deadline=None)
@given(name=_FIELD_TEXT, value=_FIELD_TEXT)
@example(name="0", value="0\t")  # found by this test: llhttp keeps a trailing tab
def test_a_valid_field_is_one_field_to_a_strict_parser(name: str, value: str) -> None:
    # Whatever valid_field lets through, llhttp reads back as exactly that one field (a value's
    # surrounding blanks are not part of it, as RFC 9110 says), after our Host.
    if not valid_field(name, value):
        return
    conn = CollectorConnection("http", "c", 80, "/v1/traces", [(name, value)], 1.0, None)
    reader = _Reader()
    parser = httptools.HttpRequestParser(reader)
    parser.feed_data(conn._head + b"Content-Length: 0\r\n\r\n")
    assert reader.done
    assert reader.headers[1] == (
        name.encode("latin-1"),
        value.strip(" \t").encode("latin-1"),
    )
    assert len(reader.headers) == 4
