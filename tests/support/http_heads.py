"""Hypothesis strategies for raw HTTP/1 request heads: valid ones, mutated ones, and the shapes
request smuggling uses (TE+CL, duplicate framing, obs-fold, bare LF, duplicate Host)."""

from __future__ import annotations

from hypothesis import strategies as st

_TOKENS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "get", "G\x00T", ""])
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", "HTTP/x", ""])
_HOSTS = st.sampled_from(["web.test", "denied.test", "WEB.test.", "l7.test", "", "[::1]", "a b"])
_SMUGGLING = st.sampled_from(
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding: xchunked",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: -1",
        "Content-Length: 1e3",
        "X-Folded: a\r\n b",
        "Host: denied.test",
        "Host: web.test\r\nHost: denied.test",
        "Bad Header: x",
        ": empty-name",
        "X-Nul: a\x00b",
        "Connection: upgrade\r\nUpgrade: websocket",
        "Expect: 100-continue",
        "",
    ]
)


@st.composite
def request_heads(draw: st.DrawFn, ports: list[int]) -> bytes:
    """A request head to send raw, valid or not, ending with its blank line (and maybe a body)."""
    method = draw(_TOKENS)
    host = draw(_HOSTS)
    port = draw(st.sampled_from(ports))
    path = draw(st.sampled_from(["/", "/ok/1", "/admin", "/a/../admin", "/%2e%2e/x", "*", ""]))
    form = draw(st.sampled_from(["absolute", "origin", "https", "garbage"]))
    target = {
        "absolute": f"http://{host}:{port}{path}",
        "origin": path,
        "https": f"https://{host}{path}",
        "garbage": draw(st.text(max_size=20)),
    }[form]
    headers = draw(st.lists(_SMUGGLING, max_size=3))
    extra = draw(
        st.lists(
            st.tuples(
                st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
                st.text(max_size=20),
            ),
            max_size=3,
        )
    )
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    lines = [f"{method} {target} {draw(_VERSIONS)}", f"Host: {host}", *headers]
    lines += [f"{name}: {value}" for name, value in extra]
    lines.append("Connection: close")
    body = draw(st.sampled_from(["", "0\r\n\r\n", "zz\r\nnot chunked\r\n", "hello"]))
    raw = newline.join(lines) + newline + newline + body
    return raw.encode("utf-8", "surrogateescape")
