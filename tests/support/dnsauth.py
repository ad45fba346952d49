"""A small authoritative DNS server for the tests (dnspython), run as its own process.

    python dnsauth.py --zone Z.json --log L --ready R --listen 198.18.0.53:53 [--listen ...]

Z.json maps a name to records: ``{"api.allowed.test": [["A", "198.18.0.2", 300], ...]}``;
types A, AAAA, CNAME, TXT, SRV. A name with records of other types gets NOERROR with no answer;
an unknown name NXDOMAIN (authoritative). ``"*"`` as a name answers every name not listed (so
a test can prove that some query never got here). UDP and TCP on every ``--listen``; a UDP
answer larger than the client's payload is truncated (TC), as a real server does. Each query is
appended to the JSON-lines log (name, type, transport) *before* it is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class Zone:
    def __init__(self, data: dict[str, list[list[Any]]]) -> None:
        self.records: dict[dns.name.Name, list[tuple[str, str, int]]] = {}
        for name, records in data.items():
            key = dns.name.from_text(name) if name != "*" else dns.name.empty
            self.records[key] = [(str(t), str(v), int(ttl)) for t, v, ttl in records]

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        for _ in range(8):  # follow CNAMEs inside the zone, as an authoritative server does
            records = self.records.get(name, self.records.get(dns.name.empty))
            if records is None:
                if not response.answer:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            cnames = [r for r in records if r[0] == "CNAME"]
            if cnames and rdtype != dns.rdatatype.CNAME:
                _add(response, name, cnames)
                name = dns.name.from_text(cnames[0][1])
                continue
            wanted = [r for r in records if dns.rdatatype.from_text(r[0]) == rdtype]
            if wanted:
                _add(response, name, wanted)
            return response
        return response


def _add(response: dns.message.Message, name: dns.name.Name, records: list[Any]) -> None:
    rdtype = dns.rdatatype.from_text(records[0][0])
    rdatas = [
        dns.rdata.from_text(
            dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
        )
        for _, value, _ in records
    ]
    response.answer.append(dns.rrset.from_rdata_list(name, records[0][2], rdatas))


class Server:
    def __init__(self, zone: Zone, log: Path) -> None:
        self.zone = zone
        self.log = log.open("a", buffering=1, encoding="utf-8")

    def handle(self, wire: bytes, transport: str, limit: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        entry = {
            "name": question.name.to_text(omit_final_dot=True).lower(),
            "type": dns.rdatatype.to_text(question.rdtype),
            "transport": transport,
            "time": time.time(),
        }
        self.log.write(json.dumps(entry) + "\n")
        response = self.zone.answer(query)
        if limit is None:
            return response.to_wire()
        size = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=min(size, limit))
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return truncated.to_wire()


class Udp(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.server.handle(data, "udp", 65535)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


async def serve_tcp(
    server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        for _ in range(100):
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10))
            out = server.handle(await reader.readexactly(size), "tcp", None)
            if out is None:
                break
            writer.write(len(out).to_bytes(2) + out)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    server = Server(Zone(json.loads(Path(args.zone).read_text())), Path(args.log))
    loop = asyncio.get_running_loop()
    for item in args.listen:
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        await loop.create_datagram_endpoint(lambda: Udp(server), local_addr=(host, int(port)))
        await asyncio.start_server(
            lambda r, w: serve_tcp(server, r, w), host, int(port), reuse_address=True
        )
    Path(args.ready).write_text("ready\n")
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--zone", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--listen", action="append", required=True)
    asyncio.run(main(parser.parse_args()))
