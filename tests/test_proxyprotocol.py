"""
Tests for L{mailproxy.proxyprotocol}: the PROXY header read before the wrapped protocol is
connected, in memory (StringTransport, Clock) and over real loopback sockets through the
service as twistd builds it.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy import stats as statsModule
from mailproxy import testing
from mailproxy.config import Config, Timeouts
from mailproxy.proxyprotocol import (
    V2_MAX_LENGTH,
    ProxyHeaderFactory,
    ProxyHeaderProtocol,
    Refusal,
)
from mailproxy.stats import Stats
from mailproxy.testing import RawClient, loopbackConfig
from tests.fakes import ProxyTestCase

BALANCER = IPv4Address("TCP", "127.0.0.1", 51000)
LISTENER = IPv4Address("TCP", "127.0.0.1", 25)
V1 = b"PROXY TCP4 192.0.2.5 198.51.100.1 40000 25\r\n"


def v2(
    source: tuple[str, int] = ("192.0.2.5", 40000),
    destination: tuple[str, int] = ("198.51.100.1", 25),
    *,
    local: bool = False,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    """A PROXY protocol v2 header: PROXY over TCP (IPv4 or IPv6), or LOCAL (no address)."""
    if local:
        command, family, block = 0x0, 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        family = 0x11 if src.version == 4 else 0x21
        size = 4 if src.version == 4 else 16
        block = struct.pack(f"!{size}s{size}sHH", src.packed, dst.packed, source[1], destination[1])
        command = 0x1
    body = block + tlvs
    return (
        V2Parser.PREFIX
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(body))
        + body
    )


class Recorder(Protocol):
    """A wrapped protocol that records what happens to it, and the peer it was built for."""

    def __init__(self, addr: IAddress) -> None:
        self.addr = addr
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.events.append(("made", self.transport.getPeer()))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.events.append(("lost",))


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append(("read lost",))

    def writeConnectionLost(self) -> None:
        self.events.append(("write lost",))


class RecorderFactory(Factory):
    def __init__(self, kind: type[Recorder] = Recorder) -> None:
        self.kind = kind
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: IAddress) -> Recorder:
        protocol = self.kind(addr)
        self.built.append(protocol)
        return protocol


def configWith(**proxy: Any) -> Config:
    timeouts = proxy.pop("timeouts", Timeouts())
    return Config(
        path="test.toml",
        listen=("haproxy:tcp:0",),
        upstream="tcp:host=127.0.0.1:port=1",
        hostname="proxy.test",
        spoolDir="/nonexistent",
        timeouts=timeouts,
        **proxy,
    )


class UnitTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.config = configWith()
        self.fresh()

    def fresh(self) -> None:
        """A new factory, clock and counters (the logs go on)."""
        self.clock = Clock()
        self.stats = Stats(self.clock)
        self.wrapped = RecorderFactory()
        self.factory = ProxyHeaderFactory(self.wrapped, self.clock, lambda: self.config, self.stats)

    def connect(self, peer: IAddress = BALANCER) -> tuple[ProxyHeaderProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(hostAddress=LISTENER, peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def refusals(self) -> dict[str, int]:
        return dict(self.stats.snapshot()["total"]["proxy_refused"])

    def refusalLogs(self) -> list[tuple[LogLevel, str]]:
        return [
            (e["log_level"], formatEvent(e))
            for e in self.events
            if str(formatEvent(e)).startswith("PROXY header refused")
        ]

    def assertRefused(
        self, transport: StringTransport, why: Refusal, logged: int | None = 1, msg: object = None
    ) -> None:
        """Closed without a byte written, nothing built behind it, counted once as C{why}
        (and C{logged} refusals logged in all)."""
        self.assertTrue(transport.disconnecting, msg)
        self.assertEqual(transport.value(), b"", msg)
        self.assertEqual(self.wrapped.built, [], msg)
        expected = dict.fromkeys(statsModule.PROXY_REFUSALS, 0)
        expected[why.value] = 1
        self.assertEqual(self.refusals(), expected, msg)
        if logged is not None:
            self.assertEqual(len(self.refusalLogs()), logged, msg)


class HeaderTests(UnitTestCase):
    """Accepted headers: the wrapped protocol starts only once the header is in."""

    def test_v1(self) -> None:
        """
        Before the header nothing is built; after a v1 header the wrapped protocol is built
        for the client it names, and in connectionMade its peer is that client.
        """
        protocol, transport = self.connect()
        self.assertEqual(self.wrapped.built, [])
        protocol.dataReceived(V1)
        [recorder] = self.wrapped.built
        client = IPv4Address("TCP", "192.0.2.5", 40000)
        self.assertEqual(recorder.addr, client)
        self.assertEqual(recorder.events, [("made", client)])
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "198.51.100.1", 25))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_v2IPv4(self) -> None:
        """A v2 PROXY header over IPv4 names the client the same way."""
        protocol, _ = self.connect()
        protocol.dataReceived(v2())
        [recorder] = self.wrapped.built
        self.assertEqual(recorder.events, [("made", IPv4Address("TCP", "192.0.2.5", 40000))])

    def test_v2IPv6Canonical(self) -> None:
        """
        A v2 header over IPv6 names the client in the canonical, compressed form
        (Twisted's parser writes every group out), as a direct connection would.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(v2(("2001:db8::5", 40000), ("2001:db8::1", 25)))
        [recorder] = self.wrapped.built
        self.assertEqual(recorder.events, [("made", IPv6Address("TCP", "2001:db8::5", 40000))])

    def test_v2WithTLVs(self) -> None:
        """TLVs after the addresses (here an authority and a unique id) are skipped."""
        tlvs = b"\x02\x00\x0bexample.org" + b"\x05\x00\x04abcd"
        protocol, _ = self.connect()
        protocol.dataReceived(v2(tlvs=tlvs) + b"EHLO x\r\n")
        [recorder] = self.wrapped.built
        self.assertEqual(recorder.events[1:], [("data", b"EHLO x\r\n")])

    def test_tinyWrites(self) -> None:
        """
        A header written one byte at a time (v1 and v2) is read whole: nothing starts
        before its last byte, and the wrapped protocol starts with it.
        """
        for header in (V1, v2(), v2(("2001:db8::5", 1), ("2001:db8::1", 25))):
            self.wrapped.built.clear()
            protocol, transport = self.connect()
            for i in range(len(header) - 1):
                protocol.dataReceived(header[i : i + 1])
            self.assertEqual(self.wrapped.built, [])
            protocol.dataReceived(header[-1:])
            [recorder] = self.wrapped.built
            self.assertEqual(recorder.events[0][0], "made")
            self.assertFalse(transport.disconnecting)

    def test_shortestV1(self) -> None:
        """C{PROXY UNKNOWN} (15 bytes, fewer than a v2 header's fixed part) is enough."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"PROXY UNKNOWN\r\n")
        self.assertEqual(len(self.wrapped.built), 1)

    def test_bytesAfterHeader(self) -> None:
        """
        Bytes that follow the header in the same packet reach the wrapped protocol after
        its connectionMade, and later bytes after them.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(V1 + b"EHLO client.example\r\n")
        protocol.dataReceived(b"QUIT\r\n")
        [recorder] = self.wrapped.built
        self.assertEqual(
            recorder.events,
            [
                ("made", IPv4Address("TCP", "192.0.2.5", 40000)),
                ("data", b"EHLO client.example\r\n"),
                ("data", b"QUIT\r\n"),
            ],
        )

    def test_local(self) -> None:
        """
        A v2 LOCAL header (HAProxy's health checks) and a v1 UNKNOWN one are served as the
        balancer's own address.
        """
        for header in (v2(local=True), b"PROXY UNKNOWN ignored stuff\r\n"):
            self.wrapped.built.clear()
            protocol, transport = self.connect()
            protocol.dataReceived(header)
            [recorder] = self.wrapped.built
            self.assertEqual(recorder.addr, BALANCER)
            self.assertEqual(recorder.events, [("made", BALANCER)])
            self.assertFalse(transport.disconnecting)
        self.assertEqual(sum(self.refusals().values()), 0)

    def test_writesPassThrough(self) -> None:
        """Once served, what the wrapped protocol writes goes out; its close closes."""
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        [recorder] = self.wrapped.built
        assert recorder.transport is not None
        recorder.transport.write(b"220 hello\r\n")
        self.assertEqual(transport.value(), b"220 hello\r\n")
        recorder.transport.loseConnection()
        self.assertTrue(transport.disconnecting)

    def test_connectionLostForwarded(self) -> None:
        """Once served, the wrapped protocol learns of the connection's end."""
        protocol, _ = self.connect()
        protocol.dataReceived(V1)
        protocol.connectionLost(Failure(Exception("gone")))
        [recorder] = self.wrapped.built
        self.assertEqual(recorder.events[-1], ("lost",))
        self.assertEqual(self.factory.protocols, {})

    def test_lostBeforeHeader(self) -> None:
        """
        A connection closed before its header is complete builds nothing, leaves no
        timer, and is no refusal.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(V1[:10])
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.wrapped.built, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.protocols, {})
        self.assertEqual(sum(self.refusals().values()), 0)

    def test_halfClose(self) -> None:
        """
        A half-close reaches a wrapped protocol that takes half-closes (the relay's: Exim
        sends its last commands, then shuts its side); another is closed.
        """
        self.wrapped.kind = HalfCloseRecorder
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        protocol.readConnectionLost()
        [recorder] = self.wrapped.built
        self.assertEqual(recorder.events[-1], ("read lost",))
        self.assertFalse(transport.disconnecting)

        self.wrapped.kind = Recorder
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_unixPeerTrusted(self) -> None:
        """A peer on a UNIX socket (haproxy:unix:...) is trusted: its permissions decide."""
        self.config = configWith(proxyProtocolFrom=())
        protocol, _ = self.connect(UNIXAddress(b"/run/mailproxy.sock"))
        protocol.dataReceived(V1)
        self.assertEqual(len(self.wrapped.built), 1)

    def test_reloadApplies(self) -> None:
        """The trusted networks are read as each connection starts: a reload applies."""
        self.config = configWith(proxyProtocolFrom=(ipaddress.ip_network("10.0.0.0/8"),))
        _, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        self.config = configWith()
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.wrapped.built), 1)

    def test_refusalsMatchCounters(self) -> None:
        """Every refusal has its counter, zero until it happens."""
        self.assertEqual([r.value for r in Refusal], list(statsModule.PROXY_REFUSALS))


class RefusalTests(UnitTestCase):
    """What is closed without a byte, logged once and counted."""

    def test_untrustedPeer(self) -> None:
        """
        A peer outside proxy.proxy_protocol_from is closed at once, before it sends
        anything; a header it sends after that is not read.
        """
        self.config = configWith(proxyProtocolFrom=(ipaddress.ip_network("127.0.0.2/32"),))
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        self.assertRefused(transport, Refusal.UNTRUSTED)
        self.assertEqual(
            self.refusalLogs(),
            [
                (
                    LogLevel.warn,
                    "PROXY header refused from [127.0.0.1]: not in proxy.proxy_protocol_from",
                )
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_untrustedIPv4Mapped(self) -> None:
        """An IPv4-mapped peer (a dual-stack listener) is checked as its IPv4 address."""
        protocol, transport = self.connect(IPv6Address("TCP", "::ffff:127.0.0.1", 5000))
        protocol.dataReceived(V1)
        self.assertEqual(len(self.wrapped.built), 1)
        self.assertFalse(transport.disconnecting)
        _, transport = self.connect(IPv6Address("TCP", "::ffff:192.0.2.1", 5000))
        self.assertTrue(transport.disconnecting)

    def test_garbage(self) -> None:
        """An SMTP command where the header should be is refused as invalid."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO client.example\r\n")
        self.assertRefused(transport, Refusal.INVALID)
        self.assertEqual(
            self.refusalLogs(),
            [(LogLevel.warn, "PROXY header refused from [127.0.0.1]: not a PROXY protocol header")],
        )

    def test_garbageEarly(self) -> None:
        """A first byte neither version starts with is enough to refuse."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"E")
        self.assertRefused(transport, Refusal.INVALID)

    def test_invalidV1(self) -> None:
        """
        v1 headers Twisted's parser rejects, or takes without checking (a port that is no
        number, a host that is no address, an IPv6 address under TCP4, a port out of
        range) are refused as invalid.
        """
        for header in (
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 25\r\n",
            b"PROXY TCP4 evil.example 5.6.7.8 1 25\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 25\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 25\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 25\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 25\r\n",
            b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 25\r\n",
        ):
            self.fresh()
            protocol, transport = self.connect()
            protocol.dataReceived(header + b"EHLO x\r\n")
            self.assertRefused(transport, Refusal.INVALID, logged=None, msg=header)
        self.assertEqual(len(self.refusalLogs()), 9)

    def test_v1TooLong(self) -> None:
        """
        A v1 header longer than the protocol's 107 bytes is refused, also when its CRLF
        came in the same packet (Twisted's parser only bounds one without CRLF).
        """
        long = b"PROXY TCP4 192.0.2.5 198.51.100.1 40000 25 " + b"x" * 70 + b"\r\n"
        protocol, transport = self.connect()
        protocol.dataReceived(long)
        self.assertRefused(transport, Refusal.INVALID)

    def test_v1NoEnd(self) -> None:
        """Bytes without CRLF are read up to the 107 bytes of the longest v1 header only."""
        protocol, transport = self.connect()
        for _ in range(10):
            protocol.dataReceived(b"PROXY " + b"1" * 20)
        self.assertRefused(transport, Refusal.INVALID)

    def test_v2TooLong(self) -> None:
        """
        A v2 header announcing more than L{V2_MAX_LENGTH} bytes is refused on its 16 fixed
        bytes, without waiting for (or buffering) the rest.
        """
        header = v2(tlvs=b"\x04" + struct.pack("!H", V2_MAX_LENGTH) + b"\x00" * V2_MAX_LENGTH)
        protocol, transport = self.connect()
        protocol.dataReceived(header[:16])
        self.assertRefused(transport, Refusal.INVALID)

    def test_v2AtLimit(self) -> None:
        """A v2 header of exactly L{V2_MAX_LENGTH} bytes after the fixed ones is read."""
        padding = V2_MAX_LENGTH - 12 - 3
        header = v2(tlvs=b"\x04" + struct.pack("!H", padding) + b"\x00" * padding)
        protocol, _ = self.connect()
        protocol.dataReceived(header)
        self.assertEqual(len(self.wrapped.built), 1)

    def test_v2BadVersion(self) -> None:
        """The v2 signature with another version is refused."""
        protocol, transport = self.connect()
        protocol.dataReceived(v2(version=3))
        self.assertRefused(transport, Refusal.INVALID)

    def test_v2BadFamily(self) -> None:
        """A v2 header with an unknown address family is refused."""
        header = bytearray(v2())
        header[13] = 0x41
        protocol, transport = self.connect()
        protocol.dataReceived(bytes(header))
        self.assertRefused(transport, Refusal.INVALID)

    def test_timeout(self) -> None:
        """
        A header not complete within timeouts.proxy_header seconds (here 5) is refused,
        logged at info level.
        """
        self.config = configWith(timeouts=attrs.evolve(Timeouts(), proxyHeader=5.0))
        protocol, transport = self.connect()
        protocol.dataReceived(V1[:20])
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertRefused(transport, Refusal.TIMEOUT)
        self.assertEqual(
            self.refusalLogs(),
            [
                (
                    LogLevel.info,
                    "PROXY header refused from [127.0.0.1]: not complete within 5 seconds",
                )
            ],
        )
        protocol.dataReceived(V1[20:])
        self.assertEqual(self.wrapped.built, [])

    def test_timerCancelledByHeader(self) -> None:
        """The header's arrival cancels its timer: the session is never cut by it."""
        protocol, transport = self.connect()
        protocol.dataReceived(V1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertFalse(transport.disconnecting)


class LoopbackTests(ProxyTestCase):
    """The PROXY protocol over real sockets on 127.0.0.1, through the service."""

    timeout = 15  # a connection left open where it should be closed fails soon

    def startHaproxy(self, extra: str = "") -> tuple[Any, int]:
        config = loopbackConfig(
            self.mtaPort, self.spool, extra, listen="haproxy:tcp:0:interface=127.0.0.1"
        )
        return testing.startProxy(self, config)

    async def connect(self, port: int, header: bytes, bind: str = "127.0.0.1") -> RawClient:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(bind, 0))
        await connectProtocol(endpoint, client)
        if header:
            client.send(header)
        return client

    DENY = '[filters.access]\ndeny_networks = ["192.0.2.0/24"]\n'

    def test_deniedClientRefusedAtConnect(self) -> defer.Deferred[None]:
        """
        A PROXY header (v1, then v2) naming 192.0.2.5, with deny_networks =
        ["192.0.2.0/24"], gets the access filter's refusal at connect, not 220; the MTA
        never hears of it.
        """

        async def run() -> None:
            _, port = self.startHaproxy(self.DENY)
            for header in (V1, v2()):
                client = await self.connect(port, header + b"EHLO x\r\n")
                [reply] = await client.expect(1)
                self.assertEqual(reply.code, 554)
                await client.lost
                self.assertIn(b"[192.0.2.5]", client.replies[0].lines[0])
                self.assertNotIn(220, client.codes)
            self.assertEqual(self.mta.transcripts, [])

        return defer.Deferred.fromCoroutine(run())

    def test_allowedClientServed(self) -> defer.Deferred[None]:
        """
        A PROXY header naming an allowed address is served: the MTA's 220, a session
        whose client (in the status and the logs) is that address, not the balancer's.
        """

        async def run() -> None:
            service, port = self.startHaproxy(self.DENY)
            client = await self.connect(port, v2(("198.51.100.7", 40000)))
            await client.expect(1)  # the banner first: EHLO behind the header would be early
            client.send(b"EHLO x\r\n")
            replies = await client.expect(2)
            self.assertEqual([r.code for r in replies], [220, 250])
            [(info, _)] = service.stats.sessions()
            self.assertEqual(info.client, "198.51.100.7")
            logged = " ".join(formatEvent(e) for e in self.events)
            self.assertIn("198.51.100.7", logged)
            client.send(b"QUIT\r\n")
            await client.lost

        return defer.Deferred.fromCoroutine(run())

    def test_untrustedPeerNoBanner(self) -> defer.Deferred[None]:
        """
        From 127.0.0.1 while proxy_protocol_from = ["127.0.0.2/32"]: no banner, closed,
        counted; from 127.0.0.2 the same header is served.
        """

        async def run() -> None:
            service, port = self.startHaproxy('proxy_protocol_from = ["127.0.0.2/32"]\n')
            client = await self.connect(port, V1)
            await client.lost
            self.assertEqual(bytes(client.received), b"")
            self.assertEqual(service.stats.snapshot()["today"]["proxy_refused"]["untrusted"], 1)
            trusted = await self.connect(port, V1, bind="127.0.0.2")
            replies = await trusted.expect(1)
            self.assertEqual(replies[0].code, 220)
            trusted.send(b"QUIT\r\n")
            await trusted.lost

        return defer.Deferred.fromCoroutine(run())

    def test_healthCheck(self) -> defer.Deferred[None]:
        """A v2 LOCAL header (HAProxy's check) is greeted, as the balancer itself."""

        async def run() -> None:
            service, port = self.startHaproxy()
            client = await self.connect(port, v2(local=True))
            replies = await client.expect(1)
            self.assertEqual(replies[0].code, 220)
            [(info, _)] = service.stats.sessions()
            self.assertEqual(info.client, "127.0.0.1")
            client.send(b"QUIT\r\n")
            await client.lost

        return defer.Deferred.fromCoroutine(run())
