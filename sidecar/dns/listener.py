"""The DNS listener: each query decided (sidecar.policy.dns), forwarded to the pod's own
resolvers when it may be, its answer screened by the address guard and learned, and reported
once (a span, a decision line, a metric sample) like every other decision.

- UDP and TCP, on 127.0.0.1:15053 (and ::1:15053) by default: transparent capture redirects
  the app's port 53 here.
- Forwarding: to the name servers of the pod's resolv.conf, read at start, in order; a UDP
  query is retried over TCP when the answer is truncated, a TCP query goes over TCP. Each
  server gets ``timeout`` seconds; when none answers the client gets SERVFAIL.
- At most ``max_inflight`` queries are forwarded at once; beyond that a query is answered
  SERVFAIL at once (a resolver that queues without bound is a memory leak under a flood).
- A denied query is answered NXDOMAIN with an Extended DNS Error "Blocked" (RFC 8914) whose
  text gives the reason, when the client speaks EDNS (why NXDOMAIN: sidecar.policy.dns).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from sidecar.fastpath.config import ListenSpec
from sidecar.fastpath.connection import peer_host
from sidecar.metrics import Metrics
from sidecar.policy.dns import (
    InternalNames,
    LearnedAddresses,
    QueryVerdict,
    answer_denial,
    decide_query,
    filter_addresses,
    still_learnable,
)
from sidecar.policy.model import Decision, IPAddress, Reason, Verdict
from sidecar.policy.store import PolicyStore, Snapshot, apply_mode
from sidecar.record import Capture, DecisionRecord
from sidecar.reporter import Reporter

log = logging.getLogger(__name__)

DNS_PORT = 53
CHAIN_LIMIT = 16  # CNAME links followed in an answer (a loop or a long chain ends there)
UDP_PLAIN_LIMIT = 512  # a client without EDNS accepts no more over UDP (RFC 1035)
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
TC_BIT = 0x02  # in the header's third byte: the answer was truncated


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[ListenSpec, ...]
    upstreams: tuple[IPAddress, ...]
    internal: InternalNames = field(default_factory=InternalNames.build)
    upstream_port: int = DNS_PORT
    timeout: float = 2.0  # per name server
    max_inflight: int = 256
    tcp_idle_timeout: float = 10.0


class ForwardError(Exception):
    pass


@dataclass(slots=True)
class _Outcome:
    """What one query came to: the answer's bytes and the record to report."""

    wire: bytes | None
    record: DecisionRecord | None


class DnsServer:
    def __init__(
        self,
        config: DnsConfig,
        store: PolicyStore,
        reporter: Reporter,
        metrics: Metrics,
        learned: LearnedAddresses,
    ) -> None:
        self.config = config
        self.store = store
        self.reporter = reporter
        self.metrics = metrics
        self.learned = learned
        self.addresses: list[str] = []
        self.failed: list[str] = []
        self.inflight = 0
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: Snapshot | None = None
        # The counter children, kept (labels() costs a lookup and a validation per call).
        self._counters: dict[tuple[str, str], Any] = {}

    # -- listeners ------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Listen on every configured address, UDP and TCP; False (``failed`` says why) if one
        failed."""
        loop = asyncio.get_running_loop()
        for spec in self.config.listen:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(spec.host, spec.port)
                )
                self._udp.append(transport)
                server = await asyncio.start_server(
                    self._serve_tcp, spec.host, spec.port, reuse_address=True
                )
                self._tcp.append(server)
            except OSError as err:
                self.failed.append(f"dns@{spec}: {err}")
                continue
            self.addresses += [f"dns@{spec.host}:{spec.port}"]
        if self.failed:
            log.warning("dns listeners failed to start", extra={"failed": "; ".join(self.failed)})
            self.close()
            return False
        log.info(
            "dns listening",
            extra={
                "listeners": ", ".join(self.addresses),
                "upstreams": ",".join(str(a) for a in self.config.upstreams),
                "internal": ",".join(sorted(self.config.internal.domains)),
            },
        )
        return True

    @property
    def running(self) -> bool:
        return bool(self._udp) and not self.failed

    def close(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        self._udp, self._tcp = [], []
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve_udp(
        self, data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport
    ) -> None:
        out = await self.answer(data, addr[0], tcp=False)
        if out is not None and not transport.is_closing():
            transport.sendto(out, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = peer_host(writer.transport)
        idle = self.config.tcp_idle_timeout
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), idle)
                body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head)), idle)
                out = await self.answer(body, client, tcp=True)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- one query ------------------------------------------------------------------------------

    async def answer(self, wire: bytes, client: str | None, *, tcp: bool) -> bytes | None:
        """The bytes to answer ``wire`` with (None: nothing, the query is unreadable)."""
        start_ns = time.time_ns()
        outcome = await self._answer(wire, client, tcp)
        if outcome.record is not None:
            self._report(outcome.record, start_ns)
        return outcome.wire

    async def _answer(self, wire: bytes, client: str | None, tcp: bool) -> _Outcome:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return _Outcome(_format_error(wire), None)
        if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY:
            return _Outcome(_reply(query, dns.rcode.NOTIMP, tcp), None)
        if len(query.question) != 1:
            return _Outcome(_reply(query, dns.rcode.FORMERR, tcp), None)
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True)
        qtype = dns.rdatatype.to_text(question.rdtype)
        snap = self.store.get()
        self._recheck(snap)
        verdict = decide_query(snap, qname, qtype, self.config.internal)
        rec = self._record(snap, verdict, qtype, client)
        if not verdict.decision.permits:
            return _Outcome(_blocked(query, verdict.decision, tcp), rec)
        if self.inflight >= self.config.max_inflight:
            rec.error = f"more than {self.config.max_inflight} queries in flight"
            return _Outcome(_reply(query, dns.rcode.SERVFAIL, tcp), rec)
        self.inflight += 1
        try:
            raw, response, server = await self._forward(wire, query, tcp)
        except ForwardError as err:
            rec.error = str(err)
            return _Outcome(_reply(query, dns.rcode.SERVFAIL, tcp), rec)
        finally:
            self.inflight -= 1
        rec.peer_address = server
        if verdict.internal or response.rcode() != dns.rcode.NOERROR:
            return _Outcome(_passed(query, raw, response, tcp), rec)
        decision, changed = self._screen(snap, verdict, response)
        rec.decision = _with_type(decision, qtype)
        if not decision.permits:
            return _Outcome(_blocked(query, decision, tcp), rec)
        if changed:
            return _Outcome(_to_wire(query, response, tcp), rec)
        return _Outcome(_passed(query, raw, response, tcp), rec)

    def _screen(
        self, snap: Snapshot, verdict: QueryVerdict, response: dns.message.Message
    ) -> tuple[Decision, bool]:
        """The guard over an allowed name's answer (rebinding), then what the pod learns. An
        answer whose asked name is left with no address is denied; other removed addresses
        (another record, glue) just go. Audit mode records the denial and changes nothing.
        Also whether ``response`` was changed."""
        filtered = filter_addresses(snap, _addresses(response.answer, response.additional))
        chain, ttl = _chain(response)
        kept = set(filtered.kept)
        decision = verdict.decision
        changed = False
        if filtered.removed:
            denial = apply_mode(answer_denial(filtered, verdict.name), snap.mode)
            if chain and not any(a in kept for a in chain):
                return denial, False
            if denial.verdict is Verdict.DENY:
                _remove(response, {a for a, _ in filtered.removed})
                changed = True
                gone = "; ".join(why for _, why in filtered.removed[:4])
                decision = replace(decision, detail=f"removed from the answer: {gone}")
        if decision.verdict is Verdict.ALLOW and ttl is not None:
            learnable = [a for a in chain if a in kept]
            if learnable:
                self.learned.learn(verdict.name, learnable, ttl)
                self.metrics.dns_learned.set(len(self.learned))
        return decision, changed

    async def _forward(
        self, wire: bytes, query: dns.message.Message, tcp: bool
    ) -> tuple[bytes, dns.message.Message, str]:
        """The client's own query bytes to each name server in turn (a fresh socket, so a
        fresh source port, per query); the first answer to this very question wins. UDP
        answers cut short (TC) are asked again over TCP, within the same time budget."""
        errors: list[str] = []
        port, timeout = self.config.upstream_port, self.config.timeout
        for server in self.config.upstreams:
            where = str(server)
            try:
                async with asyncio.timeout(timeout):
                    if tcp:
                        raw = await _tcp_exchange(wire, where, port)
                    else:
                        raw = await _udp_exchange(wire, where, port, server.version)
                        if len(raw) > 2 and raw[2] & TC_BIT:
                            raw = await _tcp_exchange(wire, where, port)
                response = dns.message.from_wire(raw)
            except TimeoutError:
                errors.append(f"{where}: no answer within {timeout:g}s")
                continue
            except (OSError, EOFError, asyncio.IncompleteReadError) as err:
                errors.append(f"{where}: {err or type(err).__name__}")
                continue
            except dns.exception.DNSException as err:
                errors.append(f"{where}: unreadable answer ({err})")
                continue
            if not query.is_response(response):
                errors.append(f"{where}: an answer to another question")
                continue
            return raw, response, where
        if not errors:
            raise ForwardError("no name server in resolv.conf")
        raise ForwardError("; ".join(errors))

    # -- reporting ------------------------------------------------------------------------------

    def _record(
        self, snap: Snapshot, verdict: QueryVerdict, qtype: str, client: str | None
    ) -> DecisionRecord:
        return DecisionRecord(
            decision=_with_type(verdict.decision, qtype),
            capture=Capture.TRANSPARENT,
            protocol="DNS",
            host=verdict.name,
            port=DNS_PORT,
            policy_source=snap.source,
            policy_version=snap.version,
            mode=snap.mode.value,
            client_address=client,
        )

    def _report(self, rec: DecisionRecord, start_ns: int) -> None:
        self.reporter.report(rec, start_ns=start_ns)
        d = rec.decision
        key = (d.verdict._value_, d.reason._value_)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.dns_queries.labels(*key)
        counter.inc()

    def _recheck(self, snap: Snapshot) -> None:
        """A new policy: learned addresses it no longer allows are forgotten (the decisions
        that use them consult the policy in force anyway; this keeps the table honest)."""
        if snap is self._seen:
            return
        first = self._seen is None
        self._seen = snap
        if not first and len(self.learned):
            self.learned.recheck(lambda name, address: still_learnable(snap, name, address))
            self.metrics.dns_learned.set(len(self.learned))


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a datagram transport (uvloop's is not registered as asyncio.DatagramTransport's subclass)
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._server.spawn(self._server.serve_udp(data, addr, self._transport))

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp error", extra={"error": str(exc)})


# -- messages -----------------------------------------------------------------------------------


def _with_type(decision: Decision, qtype: str) -> Decision:
    """The query type, where the decision line and span show it: the detail."""
    prefix = f"{qtype} query"
    if decision.detail is None:
        return replace(decision, detail=prefix)
    if decision.detail.startswith(prefix):
        return decision
    return replace(decision, detail=f"{prefix}: {decision.detail}")


def _addresses(*sections: Iterable[dns.rrset.RRset]) -> Iterable[IPAddress]:
    for section in sections:
        for rrset in section:
            if rrset.rdtype in ADDRESS_TYPES:
                for rdata in rrset:
                    yield ipaddress.ip_address(rdata.address)


def _chain(response: dns.message.Message) -> tuple[list[IPAddress], float | None]:
    """The addresses the asked name leads to through its CNAME chain, and the smallest TTL on
    the way (the name the app asked keeps them only as long as every link holds)."""
    name = response.question[0].name
    ttl: float | None = None
    for _ in range(CHAIN_LIMIT):
        cname = _find(response.answer, name, dns.rdatatype.CNAME)
        if cname is None:
            break
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        name = cname[0].target
    found: list[IPAddress] = []
    for rdtype in ADDRESS_TYPES:
        rrset = _find(response.answer, name, rdtype)
        if rrset is not None:
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
            found += [ipaddress.ip_address(r.address) for r in rrset]
    return found, ttl


def _find(
    section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.rrset.RRset | None:
    for rrset in section:
        if rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN and rrset.name == name:
            return rrset
    return None


def _remove(response: dns.message.Message, gone: set[IPAddress]) -> None:
    """Take ``gone`` out of every address record of the answer and additional sections."""
    for section in (response.answer, response.additional):
        for index, rrset in reversed(list(enumerate(section))):
            if rrset.rdtype not in ADDRESS_TYPES:
                continue
            left = [r for r in rrset if ipaddress.ip_address(r.address) not in gone]
            if not left:
                del section[index]
            elif len(left) != len(rrset):
                section[index] = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, left)


async def _udp_exchange(wire: bytes, server: str, port: int, version: int) -> bytes:
    """One datagram out, the reply with the query's id back (a connected socket takes
    datagrams from the server's address only)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((server, port))
        await loop.sock_sendall(sock, wire)
        while True:
            reply = await loop.sock_recv(sock, 65535)
            if reply[:2] == wire[:2]:
                return reply


async def _tcp_exchange(wire: bytes, server: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(server, port)
    try:
        writer.write(len(wire).to_bytes(2) + wire)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2))
        return await reader.readexactly(size)
    finally:
        writer.close()


def _passed(
    query: dns.message.Message, raw: bytes, response: dns.message.Message, tcp: bool
) -> bytes:
    """The name server's own bytes when they fit what the client takes, else re-rendered."""
    if tcp or len(raw) <= _udp_limit(query):
        return raw
    return _to_wire(query, response, tcp)


def _udp_limit(query: dns.message.Message) -> int:
    return max(UDP_PLAIN_LIMIT, query.payload if query.edns >= 0 else 0)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode, tcp: bool) -> bytes:
    response = dns.message.make_response(query, recursion_available=True)
    response.set_rcode(rcode)
    return _to_wire(query, response, tcp)


def _blocked(query: dns.message.Message, decision: Decision, tcp: bool) -> bytes:
    response = dns.message.make_response(query, recursion_available=True)
    response.set_rcode(dns.rcode.NXDOMAIN)
    if query.edns >= 0:
        text = f"egress-sidecar: {decision.reason.value}"
        if decision.reason is Reason.QUERY_TYPE:
            code = dns.edns.EDECode.PROHIBITED
        else:
            code = dns.edns.EDECode.BLOCKED
        response.use_edns(0, payload=response.payload, options=[dns.edns.EDEOption(code, text)])
    return _to_wire(query, response, tcp)


def _to_wire(query: dns.message.Message, response: dns.message.Message, tcp: bool) -> bytes:
    """The answer, within what a UDP client accepts; too big: truncated (TC), so the client
    asks again over TCP."""
    limit = 65535 if tcp else _udp_limit(query)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query, recursion_available=True)
        truncated.set_rcode(response.rcode())
        truncated.flags |= dns.flags.TC
        return truncated.to_wire(max_size=limit)


def _format_error(wire: bytes) -> bytes | None:
    """FORMERR for a message whose header can be read (its id echoed); else nothing."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    header = bytearray(wire[:12])
    header[2] = 0x80 | (header[2] & 0x78)  # QR, the opcode kept
    header[3] = 0x80 | dns.rcode.FORMERR  # RA
    header[4:12] = bytes(8)  # no sections
    return bytes(header)
