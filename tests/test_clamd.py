"""
Tests for the clamd filter: zINSTREAM framing and replies in pure code and over a
StringTransport, its options, and the filter in the running proxy against an in-process
clamd over loopback TCP and a UNIX socket.
"""

from __future__ import annotations

import struct

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.envelope import Message
from mailproxy.filters import FilterError, IFilter, OptionError, Stage, Verdict
from mailproxy.filters.clamd import (
    ClamdAnswer,
    ClamdFilter,
    ClamdFilterFactory,
    _ClamdProtocol,
    chunk,
    parseReply,
)
from mailproxy.filters.spamd import SpamdFilterFactory
from mailproxy.testing import FakeFilter
from tests.fakes import FakeClamd, FakeSpamd, ProxyTestCase

#: EICAR's test string, put together here so that this file itself is no test virus.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURES = {EICAR: "Eicar-Test-Signature"}

CLEAN = (
    b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: report\r\n\r\n"
    b"Attached.\r\n.\r\n..dots\r\n"
)
INFECTED = b"From: <a@example.org>\r\nSubject: eicar\r\n\r\n" + EICAR + b"\r\n.hidden\r\n"


class ReplyTests(SynchronousTestCase):
    """clamd's replies (as clamd 1.4.6 writes them), parsed without I/O."""

    def test_clean(self) -> None:
        """C{stream: OK} is clean."""
        self.assertEqual(parseReply(b"stream: OK\0", False), ClamdAnswer(None, "stream: OK"))

    def test_found(self) -> None:
        """C{stream: NAME FOUND} names the virus."""
        answer = parseReply(b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0", False)
        assert answer is not None
        self.assertEqual(answer.virus, "Eicar-Test-Signature.UNOFFICIAL")

    def test_incomplete(self) -> None:
        """A reply without its NUL is incomplete; with the connection closed it is taken."""
        self.assertIsNone(parseReply(b"stream: O", False))
        self.assertEqual(parseReply(b"stream: OK\n", True), ClamdAnswer(None, "stream: OK"))
        self.assertRaises(FilterError, parseReply, b"", True)

    def test_errors(self) -> None:
        """Errors and unexpected replies are FilterErrors quoting clamd."""
        for data, message in [
            (
                b"INSTREAM size limit exceeded. ERROR\0",
                "clamd answered: INSTREAM size limit exceeded. ERROR",
            ),
            (
                b"stream: Can't allocate memory ERROR\0",
                "clamd answered: stream: Can't allocate memory ERROR",
            ),
            (b"UNKNOWN COMMAND\0", "clamd answered something unexpected: UNKNOWN COMMAND"),
            (b"stream: \x01\xff FOUND?\0", "unexpected: stream: ?\\xff FOUND?"),
        ]:
            with self.assertRaises(FilterError) as caught:
                parseReply(data, False)
            self.assertIn(message, str(caught.exception))

    def test_unprintable(self) -> None:
        """Bytes that could break an SMTP reply never reach the virus name."""
        answer = parseReply(b"stream: Bad\r\n250 Name FOUND\0", False)
        assert answer is not None
        self.assertEqual(answer.virus, "Bad??250 Name")

    def test_chunk(self) -> None:
        """A chunk is its length as 4 bytes big-endian, then the data."""
        self.assertEqual(chunk(b"abc"), b"\0\0\0\x03abc")
        self.assertEqual(chunk(b"x" * 70000)[:4], struct.pack(">I", 70000))


class StreamingTests(SynchronousTestCase):
    """The exchange over a StringTransport: chunks as the transport asks for them."""

    def test_chunked(self) -> None:
        """
        zINSTREAM, the spooled message in length-prefixed chunks of at most 16 KiB, pulled
        by the transport, then the zero-length chunk; the reply settles the scan.
        """
        path = self.mktemp()
        content = b"x" * 40000
        with open(path, "wb") as f:
            f.write(content)
        answer: defer.Deferred[ClamdAnswer] = defer.Deferred()
        protocol = _ClamdProtocol(Message(path, len(content)), answer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"zINSTREAM\0")
        pulls = 0
        while transport.producer is not None and pulls < 10:
            transport.producer.resumeProducing()
            pulls += 1
        self.assertEqual(pulls, 4)  # three chunks, then the end of the file
        expected = (
            b"zINSTREAM\0"
            + chunk(b"x" * 16384)
            + chunk(b"x" * 16384)
            + chunk(b"x" * (40000 - 32768))
            + b"\0\0\0\0"
        )
        self.assertEqual(transport.value(), expected)
        protocol.dataReceived(b"stream: OK\0")
        self.assertEqual(self.successResultOf(answer).virus, None)
        self.assertTrue(transport.disconnecting)

    def test_sizeLimitMidStream(self) -> None:
        """clamd's size-limit error mid-stream: FilterError, connection aborted."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x" * 100000)
        answer: defer.Deferred[ClamdAnswer] = defer.Deferred()
        protocol = _ClamdProtocol(Message(path, 100000), answer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.producer.resumeProducing()
        protocol.dataReceived(b"INSTREAM size limit exceeded. ERROR\0")
        failure = self.failureResultOf(answer, FilterError)
        self.assertIn("INSTREAM size limit exceeded", str(failure.value))
        self.assertTrue(transport.disconnected)


class OptionsTests(SynchronousTestCase):
    """The [filters.clamd] options."""

    def test_defaults(self) -> None:
        """By default: Debian's clamd socket, every message scanned, run for allowed sessions."""
        built = ClamdFilterFactory().build({}, Clock())
        self.assertTrue(verifyObject(IFilter, built))
        assert isinstance(built, ClamdFilter)
        self.assertEqual(built.client.address, "unix:/run/clamav/clamd.ctl")
        self.assertEqual(built.maxSize, 0)
        self.assertTrue(built.always)

    def test_bad(self) -> None:
        """Bad values name their key."""
        for options, key in [
            ({"clamd": "tcp:"}, "clamd"),
            ({"clamd": ""}, "clamd"),
            ({"max_size": -1}, "max_size"),
            ({"socket": "/x"}, "socket"),
        ]:
            with self.assertRaises(OptionError) as caught:
                ClamdFilterFactory().build(options, Clock())
            self.assertEqual(caught.exception.key, key, options)


class ClamdThroughProxyTests(ProxyTestCase):
    """The proxy with [filters.clamd], an in-process clamd, and the stand-in MTA."""

    def clamd(self, fake: FakeClamd, options: str = "", unix: bool = False) -> int:
        where = self.serve(fake.buildFactory(), unix)
        return self.startProxy(f'[filters.clamd]\nclamd = "{where}"\n{options}')

    async def test_virusRefused(self) -> None:
        """
        A message with EICAR in it is refused with 550 5.7.1 Virus found: NAME, never reaches
        the MTA, and clamd received the message exactly as the client meant it, in chunks.
        """
        fake = FakeClamd(SIGNATURES)
        port = self.clamd(fake)
        client = await self.sendMessage(port, INFECTED)
        last = client.replies[-1]
        self.assertEqual(last.code, 550)
        self.assertEqual(last.lines, (b"5.7.1 Virus found: Eicar-Test-Signature",))
        self.assertEqual(self.mta.messages, [])
        [scan] = fake.scans
        self.assertEqual(
            (scan.command, scan.data, scan.chunks), (b"zINSTREAM", INFECTED, [len(INFECTED)])
        )
        self.assertEqual(bytes(fake.received), b"zINSTREAM\0" + chunk(INFECTED) + b"\0\0\0\0")
        self.assertTrue(self.logged("clamd: stream: Eicar-Test-Signature FOUND"))

    async def test_cleanPassesOverUnixSocket(self) -> None:
        """A clean message, scanned over a UNIX socket, is relayed byte-identical."""
        fake = FakeClamd(SIGNATURES)
        port = self.clamd(fake, unix=True)
        client = await self.sendMessage(port, CLEAN)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, CLEAN)
        self.assertEqual(fake.scans[0].data, CLEAN)

    async def test_bigMessageChunked(self) -> None:
        """A 1 MB message reaches clamd whole, in chunks of at most 16 KiB."""
        fake = FakeClamd(SIGNATURES)
        port = self.clamd(fake)
        content = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1000
        client = await self.sendMessage(port, content)
        self.assertEqual(client.replies[-1].code, 250)
        [scan] = fake.scans
        self.assertEqual(scan.data, content)
        self.assertLessEqual(max(scan.chunks), 16384)
        self.assertEqual(sum(scan.chunks), len(content))

    async def test_clamdDown(self) -> None:
        """clamd unreachable: 451 4.7.1 and nothing relayed; with on_error = "accept", relayed."""
        dead = self.deadPort()
        port = self.startProxy(f'[filters.clamd]\nclamd = "tcp:host=127.0.0.1:port={dead}"\n')
        client = await self.sendMessage(port, CLEAN)
        self.assertEqual(
            (client.replies[-1].code, client.replies[-1].lines[0][:5]), (451, b"4.7.1")
        )
        self.assertEqual(self.mta.messages, [])
        self.assertTrue(self.logged("clamd at tcp:host=127.0.0.1:port"))
        port = self.startProxy(
            f'[filters.clamd]\nclamd = "tcp:host=127.0.0.1:port={dead}"\non_error = "accept"\n'
        )
        client = await self.sendMessage(port, CLEAN)
        self.assertEqual(client.replies[-1].code, 250)

    async def test_clamdErrors(self) -> None:
        """clamd's ERROR replies, its size limit, a hang-up and silence all give 451."""
        for fake in [
            FakeClamd(SIGNATURES, error="Can't allocate memory"),
            FakeClamd(SIGNATURES, streamMaxLength=100),
            FakeClamd(SIGNATURES, behaviour="hangup"),
            FakeClamd(SIGNATURES, behaviour="silent"),
        ]:
            port = self.clamd(fake, "timeout = 0.5\n")
            client = await self.sendMessage(port, INFECTED)
            self.assertEqual(client.replies[-1].code, 451, fake)
        self.assertEqual(self.mta.messages, [])
        self.assertTrue(self.logged("clamd answered: stream: Can't allocate memory ERROR"))
        self.assertTrue(self.logged("clamd answered: INSTREAM size limit exceeded. ERROR"))

    async def test_maxSize(self) -> None:
        """With max_size, bigger messages are relayed unscanned (and it is logged)."""
        fake = FakeClamd(SIGNATURES)
        port = self.clamd(fake, f"max_size = {len(INFECTED) - 1}\n")
        client = await self.sendMessage(port, INFECTED)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(fake.scans, [])
        self.assertTrue(self.logged("clamd: not scanned"))

    async def test_runsForAllowedSessions(self) -> None:
        """
        clamd runs even after another filter allowed the session (always = True): with an
        allow-listing filter first, a virus is still refused while spamd is skipped.
        """
        clamd = FakeClamd(SIGNATURES)
        spamd = FakeSpamd(score=50.0)
        clamdPort = self.listenTCP(clamd.buildFactory())
        spamdPort = self.listenTCP(spamd.buildFactory())
        allow = FakeFilter("allow", {Stage.MAIL: Verdict.allow()})
        port = self.proxyWith(
            allow,
            ClamdFilterFactory().build({"clamd": f"tcp:host=127.0.0.1:port={clamdPort}"}, reactor),
            SpamdFilterFactory().build({"spamd": f"tcp:host=127.0.0.1:port={spamdPort}"}, reactor),
        )
        client = await self.sendMessage(port, INFECTED)
        self.assertEqual(client.replies[-1].code, 550)
        self.assertEqual(len(clamd.scans), 1)
        self.assertEqual(spamd.requests, [])
