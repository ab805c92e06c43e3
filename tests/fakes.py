"""
In-process stand-ins for the daemons the content filters talk to, speaking their wire
protocols byte for byte as the real ones do (checked against spamd 4.0.1, clamd 1.4.6 and
p0f 3.09b on Debian 12), and recording everything they received:

  - L{FakeSpamd}: SpamAssassin's spamd (SPAMC/SPAMD: SYMBOLS, CHECK, PING);
  - L{FakeClamd}: ClamAV's clamd (zINSTREAM, zPING);
  - L{FakeP0f}: p0f 3's API socket.

And L{ProxyTestCase}, for integration tests: the stand-in MTA and the proxy, built from a
configuration file (or from filter objects), on real loopback sockets.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailproxy import testing
from mailproxy.config import Config, Limits
from mailproxy.filters import IFilter
from mailproxy.localmta import LocalMTA
from mailproxy.relay import RelayFactory, Settings
from mailproxy.testing import RawClient, closeSessions, loopbackConfig, pipelineOf
from mailproxy.wire import Reply


def portOf(listening: IListeningPort) -> int:
    return int(listening.getHost().port)  # type: ignore[attr-defined]


# -- spamd -------------------------------------------------------------------------------

_SPAMD_METHOD = re.compile(rb"(PROCESS|CHECK|SYMBOLS|REPORT|HEADERS|REPORT_IFSPAM) SPAMC/(.*)")


@attrs.define
class SpamdRequest:
    """One request as spamd read it: the command line, its headers, the message."""

    command: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _SpamdProtocol(Protocol):
    def __init__(self, fake: FakeSpamd) -> None:
        self._fake = fake
        self._buffer = b""
        self._request: SpamdRequest | None = None
        self._length: int | None = None
        self._inBody = False
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        self._fake.received += data
        self._buffer += data
        while not self._done:
            if not self._inBody:
                if b"\n" not in self._buffer:
                    return
                line, self._buffer = self._buffer.split(b"\n", 1)
                self._line(line.rstrip(b"\r"))
                continue
            assert self._request is not None and self._length is not None
            if len(self._buffer) < self._length:
                return
            # spamd reads whole lines until it has Content-length bytes; the client sends
            # exactly that many.
            self._request.body = self._buffer[: self._length]
            self._buffer = b""
            self._answer(self._request)

    def _line(self, line: bytes) -> None:
        """One line of the request before the message: the command, then headers."""
        if self._request is None:
            if line == b"PING SPAMC/1.5":
                self._close(b"SPAMD/1.5 0 PONG\r\n")
            elif _SPAMD_METHOD.fullmatch(line) is None:
                self._close(b"SPAMD/1.0 76 Bad header line: " + line + b"\r\n")
            else:
                self._request = SpamdRequest(line, [], b"")
            return
        if not line:  # end of headers
            if self._length is None:
                self._close(b"SPAMD/1.0 76 Bad header line: (this fake needs Content-length)\r\n")
            else:
                self._inBody = True
            return
        name, sep, value = line.partition(b":")
        if not sep:
            self._close(b"SPAMD/1.0 76 Bad header line: (header not in 'Name: value' format)\r\n")
            return
        value = value.lstrip()
        self._request.headers.append((name, value))
        if name == b"Content-length":
            if not value.isdigit():
                self._close(
                    b"SPAMD/1.0 76 Bad header line: (Content-Length contains non-numeric bytes)\r\n"
                )
                return
            self._length = int(value)

    def _close(self, answer: bytes = b"") -> None:
        assert self.transport is not None
        self._done = True
        if answer:
            self.transport.write(answer)
        self.transport.loseConnection()

    def _answer(self, request: SpamdRequest) -> None:
        assert self.transport is not None
        self._done = True
        self._fake.requests.append(request)
        behaviour = self._fake.behaviour
        if behaviour == "silent":
            return
        if behaviour == "hangup":
            self._close()
        elif behaviour == "garbage":
            self._close(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        else:
            self._close(self._fake.answerTo(request))


@attrs.define
class FakeSpamd:
    """
    SpamAssassin's spamd, as far as SYMBOLS and CHECK go: answers every message with
    C{score} against C{required}, naming C{tests}; records each request in C{requests}
    and every byte received in C{received}.

    @ivar behaviour: C{"answer"}; C{"silent"} (reads the message, never answers);
        C{"hangup"} (closes without a word); C{"garbage"} (answers HTTP).
    """

    score: float = 0.0
    required: float = 5.0
    tests: tuple[str, ...] = ()
    behaviour: str = "answer"
    requests: list[SpamdRequest] = attrs.Factory(list)
    received: bytearray = attrs.Factory(bytearray)

    def answerTo(self, request: SpamdRequest) -> bytes:
        """spamd's answer, as C{Mail::SpamAssassin}'s spamd writes it for protocol 1.5."""
        spam = b"True" if self.score >= self.required else b"False"
        header = b"Spam: %s ; %.1f / %.1f" % (spam, self.score, self.required)
        status = b"SPAMD/1.1 0 EX_OK\r\n"
        if request.command.startswith(b"CHECK "):
            return status + header + b"\r\n\r\n"
        body = ",".join(self.tests).encode()
        return status + b"Content-length: %d\r\n" % len(body) + header + b"\r\n\r\n" + body

    def buildFactory(self) -> ServerFactory:
        return ServerFactory.forProtocol(lambda: _SpamdProtocol(self))


# -- clamd -------------------------------------------------------------------------------


@attrs.define
class ClamdScan:
    """One INSTREAM as clamd read it: the command, the reassembled data, the chunk sizes."""

    command: bytes
    data: bytes = b""
    chunks: list[int] = attrs.Factory(list)


class _ClamdProtocol(Protocol):
    def __init__(self, fake: FakeClamd) -> None:
        self._fake = fake
        self._buffer = b""
        self._scan: ClamdScan | None = None
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        self._fake.received += data
        if self._done:
            return
        self._buffer += data
        if self._scan is None:
            command, nul, self._buffer = self._buffer.partition(b"\0")
            if not nul:
                self._buffer = command
                return
            if command == b"zPING":
                self._reply(b"PONG")
                return
            if command != b"zINSTREAM":
                self._reply(b"UNKNOWN COMMAND")
                return
            self._scan = ClamdScan(command)
            self._fake.scans.append(self._scan)
        data_ = bytearray()
        while len(self._buffer) >= 4:
            (length,) = struct.unpack(">I", self._buffer[:4])
            if length == 0:
                self._scan.data += bytes(data_)
                self._finish()
                return
            if len(self._buffer) < 4 + length:
                break
            self._scan.chunks.append(length)
            data_ += self._buffer[4 : 4 + length]
            self._buffer = self._buffer[4 + length :]
            if len(self._scan.data) + len(data_) > self._fake.streamMaxLength:
                self._scan.data += bytes(data_)
                self._reply(b"INSTREAM size limit exceeded. ERROR")
                return
        self._scan.data += bytes(data_)

    def _finish(self) -> None:
        assert self._scan is not None
        fake = self._fake
        if fake.behaviour == "silent":
            self._done = True
            return
        if fake.behaviour == "hangup":
            self._done = True
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if fake.error is not None:
            self._reply(b"stream: " + fake.error.encode() + b" ERROR")
            return
        for signature, name in fake.signatures.items():
            if signature in self._scan.data:
                self._reply(b"stream: " + name.encode() + b" FOUND")
                return
        self._reply(b"stream: OK")

    def _reply(self, text: bytes) -> None:
        assert self.transport is not None
        self._done = True
        self.transport.write(text + b"\0")
        self.transport.loseConnection()


@attrs.define
class FakeClamd:
    """
    ClamAV's clamd, as far as zINSTREAM and zPING go: a stream containing one of
    C{signatures} (bytes → name) is a virus; C{error} makes every scan answer
    C{stream: ERROR-TEXT ERROR}; more than C{streamMaxLength} bytes answers the size limit
    error and closes, as clamd does. Records each scan in C{scans}.

    @ivar behaviour: C{"answer"}, C{"silent"} (never answers) or C{"hangup"}.
    """

    signatures: Mapping[bytes, str] = attrs.Factory(dict)
    error: str | None = None
    streamMaxLength: int = 25 * 1024 * 1024
    behaviour: str = "answer"
    scans: list[ClamdScan] = attrs.Factory(list)
    received: bytearray = attrs.Factory(bytearray)

    def buildFactory(self) -> ServerFactory:
        return ServerFactory.forProtocol(lambda: _ClamdProtocol(self))


# -- p0f ---------------------------------------------------------------------------------

#: p0f's api.h, written out again here (not imported from the filter under test).
_P0F_QUERY = struct.Struct("=IB16s")
_P0F_ANSWER = struct.Struct("=IIIIIIIIIhBB32s32s32s32s32s32s")


@attrs.frozen
class P0fHost:
    """What p0f knows of a host (the API's fields)."""

    os: str = "Linux"
    flavor: str = "2.2.x-3.x"
    distance: int = 0
    link: str = "Ethernet or modem"
    firstSeen: int = 1_700_000_000
    lastSeen: int = 1_700_000_100
    totalConn: int = 3
    uptimeMin: int = 0
    upModDays: int = 0
    lastNat: int = 0
    lastChg: int = 0
    badSw: int = 0
    osMatchQ: int = 0
    httpName: str = ""
    httpFlavor: str = ""
    language: str = ""


def p0fAnswer(status: int, host: P0fHost | None = None) -> bytes:
    """A 232-byte answer as p0f 3.09b writes it (unused fields zero)."""
    if host is None:
        return _P0F_ANSWER.pack(0x50304602, status, *([0] * 7), 0, 0, 0, *([b""] * 6))
    return _P0F_ANSWER.pack(
        0x50304602,
        status,
        host.firstSeen,
        host.lastSeen,
        host.totalConn,
        host.uptimeMin,
        host.upModDays,
        host.lastNat,
        host.lastChg,
        host.distance,
        host.badSw,
        host.osMatchQ,
        host.os.encode(),
        host.flavor.encode(),
        host.httpName.encode(),
        host.httpFlavor.encode(),
        host.link.encode(),
        host.language.encode(),
    )


class _P0fProtocol(Protocol):
    def __init__(self, fake: FakeP0f) -> None:
        self._fake = fake
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _P0F_QUERY.size:
            raw, self._buffer = self._buffer[: _P0F_QUERY.size], self._buffer[_P0F_QUERY.size :]
            self._fake.queries.append(raw)
            assert self.transport is not None
            self.transport.write(self._fake.answerTo(raw))


@attrs.define
class FakeP0f:
    """
    p0f's API socket: answers each 21-byte query from C{hosts} (address text → L{P0fHost};
    0x10 OK), 0x20 "no match" for others, 0x00 "bad query" for a bad magic or address type;
    records each query's bytes in C{queries}. C{answer} overrides every answer.
    """

    hosts: dict[str, P0fHost] = attrs.Factory(dict)
    queries: list[bytes] = attrs.Factory(list)
    answer: bytes | None = None

    def answerTo(self, raw: bytes) -> bytes:
        if self.answer is not None:
            return self.answer
        magic, kind, address = _P0F_QUERY.unpack(raw)
        if magic != 0x50304601 or kind not in (4, 6):
            return p0fAnswer(0x00)
        ip = ipaddress.ip_address(address[:4] if kind == 4 else address)
        host = self.hosts.get(str(ip))
        return p0fAnswer(0x20) if host is None else p0fAnswer(0x10, host)

    def buildFactory(self) -> Factory:
        return Factory.forProtocol(lambda: _P0fProtocol(self))


# -- the proxy on loopback ---------------------------------------------------------------


class ProxyTestCase(TestCase):
    """
    The stand-in MTA and the proxy on 127.0.0.1, the proxy built from a configuration file
    as twistd builds it (filters found as plugins, options checked), and fakes to listen.
    """

    def setUp(self) -> None:
        self.mta = LocalMTA()
        self.mtaPort = self.listenTCP(self.mta.buildFactory())
        self.spool = os.path.abspath(self.mktemp())
        os.makedirs(self.spool)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def listenTCP(self, factory: Factory) -> int:
        """Listen on a free port of 127.0.0.1 until the test ends; return the port."""
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return portOf(port)

    def listenUNIX(self, factory: Factory) -> str:
        """Listen on a new UNIX socket until the test ends; return its absolute path, in a
        private directory under the system's temporary directory (trial's own can be too
        deep for a socket path's 107 bytes)."""
        directory = tempfile.mkdtemp(prefix="mailproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "socket")
        port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return path

    def serve(self, factory: Factory, unix: bool = False) -> str:
        """Listen with C{factory} until the test ends, on a UNIX socket or a TCP port of
        127.0.0.1; return the client endpoint string that reaches it."""
        if unix:
            return "unix:" + self.listenUNIX(factory)
        return f"tcp:host=127.0.0.1:port={self.listenTCP(factory)}"

    def deadPort(self) -> int:
        """A port on 127.0.0.1 where nothing listens (a moment ago something did)."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        number = portOf(port)
        port.stopListening()
        return number

    def startProxy(self, extra: str = "") -> int:
        """Start the proxy with C{extra} (TOML sections: C{[filters.NAME]}, C{[limits]}) in
        its configuration file, as twistd builds it; return its port."""
        _, port = testing.startProxy(self, loopbackConfig(self.mtaPort, self.spool, extra))
        return port

    def proxyWith(self, *filters: IFilter, filterTimeout: float = 30.0, **limits: int) -> int:
        """Start the proxy with these filters (each with C{filterTimeout}, on_error
        tempfail) and these C{[limits]}; return its port."""
        config = Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream=f"tcp:host=127.0.0.1:port={self.mtaPort}",
            hostname="proxy.test",
            spoolDir=self.spool,
            limits=attrs.evolve(Limits(), **limits),
        )
        factory = RelayFactory(
            Settings(
                config,
                pipelineOf(filters, reactor, timeout=filterTimeout),  # type: ignore[arg-type]
                upstream=TCP4ClientEndpoint(reactor, "127.0.0.1", self.mtaPort),
            ),
            reactor,  # type: ignore[arg-type]
        )
        self.addCleanup(closeSessions, factory)
        #: The relay factory of the last proxy started (its sessions, for tests that look).
        self.factory = factory
        return self.listenTCP(factory)

    async def connect(self, port: int) -> RawClient:
        """A raw client connected to the proxy, past its 220 (or whatever it said first)."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport and client.transport.loseConnection())
        await client.expect(1)
        return client

    async def send(self, client: RawClient, data: bytes, replies: int) -> list[Reply]:
        """Send C{data}; return the replies received once there are C{replies} in all."""
        client.send(data)
        return await client.expect(replies)

    @staticmethod
    def lines(replies: Iterable[Reply]) -> list[str]:
        """Each reply as C{"CODE first-line"}, as a person reads a transcript."""
        return [
            f"{r.code} {r.lines[0].decode('utf-8', 'replace') if r.lines else ''}".strip()
            for r in replies
        ]

    async def sendMessage(self, port: int, content: bytes) -> RawClient:
        """
        One transaction: EHLO, MAIL, RCPT, DATA, then C{content} (CRLF lines, sent
        dot-stuffed) and the final dot. Returns the client once the final reply is in.
        """
        client = await self.connect(port)
        client.send(
            b"EHLO client.example\r\n"
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        )
        await client.expect(5)
        stuffed = content.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        client.send(stuffed + b".\r\n")
        await client.expect(6)
        return client

    def logged(self, text: str) -> list[str]:
        """The formatted log lines containing C{text}."""
        lines = [formatEvent(event) for event in self.events]
        return [line for line in lines if text in line]
