"""
The relay in memory: client, proxy and the stand-in MTA joined by iosim, with a Clock.

These tests check what a user would: the replies the client saw, and the bytes the MTA
received.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, ClassVar

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import relay, wire
from mailproxy import session as core
from mailproxy.config import Config, Limits, Timeouts
from mailproxy.filters import HeaderEdit, IFilter, Stage, Verdict
from mailproxy.filters.access import AccessFilterFactory
from mailproxy.localmta import LocalMTA
from mailproxy.spool import Spool
from mailproxy.testing import FakeFilter, MemoryProxy, RawClient, pipelineOf

MESSAGE = b"Subject: hello\r\n\r\nHello, world.\r\n.dot line\r\n"
STUFFED = b"Subject: hello\r\n\r\nHello, world.\r\n..dot line\r\n.\r\n"


def envelope(sender: bytes = b"a@example.org", *rcpts: bytes) -> bytes:
    rcpts = rcpts or (b"b@example.net",)
    return b"MAIL FROM:<%s>\r\n" % sender + b"".join(b"RCPT TO:<%s>\r\n" % r for r in rcpts)


class Harness:
    """
    A proxy with the given filters in front of an MTA (a LocalMTA unless C{mta} is given:
    anything with C{buildFactory()}, such as a L{mailproxy.testing.ScriptedMTA}), all in
    memory.
    """

    def __init__(
        self, case: SynchronousTestCase, *filters: IFilter, mta: Any = None, **config: object
    ) -> None:
        spool = case.mktemp()
        os.makedirs(spool)
        self.spoolDir = spool
        limits = attrs.evolve(Limits(), **config.pop("limits", {}))  # type: ignore[arg-type]
        timeouts = attrs.evolve(Timeouts(), **config.pop("timeouts", {}))  # type: ignore[arg-type]
        self.config = Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream="tcp:host=127.0.0.1:port=1",
            hostname="proxy.test",
            spoolDir=spool,
            limits=limits,
            timeouts=timeouts,
            **config,  # type: ignore[arg-type]
        )
        self.clock = Clock()
        self.mta = LocalMTA() if mta is None else mta
        pipeline = pipelineOf(filters, clock=self.clock)
        self.memory = MemoryProxy(self.config, pipeline, self.mta.buildFactory(), self.clock)

    def connect(self, address: str = "127.0.0.1") -> RawClient:
        client, _ = self.memory.connect(address)
        return client

    def send(self, client: RawClient, data: bytes) -> None:
        self.memory.send(client, data)

    def greeted(self) -> RawClient:
        client = self.connect()
        self.send(client, b"EHLO client.example\r\n")
        return client

    def spooled(self) -> list[str]:
        return os.listdir(self.spoolDir)


class RelayTests(SynchronousTestCase):
    def test_cleanMessage(self) -> None:
        """
        A clean message reaches the MTA byte for byte, and the client gets the MTA's own
        250 with its queue id.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250])
        [message] = h.mta.messages
        self.assertEqual(message.content, MESSAGE)
        self.assertIn(message.queueId.encode(), client.replies[-1].lines[0])
        self.assertIn(b"DATA\r\n" + STUFFED, bytes(h.mta.transcripts[0]))
        self.assertEqual(h.spooled(), [])

    def test_capabilitiesEdited(self) -> None:
        """
        The client sees the MTA's EHLO reply without XCLIENT, XFORWARD or STARTTLS, with
        SIZE lowered to our limit, and CHUNKING once (ours).
        """
        h = Harness(self, limits={"messageSize": 1000})
        h.mta.extensions = {
            b"CHUNKING": [],
            b"XCLIENT": [b"ADDR"],
            b"XFORWARD": [b"ADDR"],
            b"STARTTLS": [],
            b"SIZE": [b"50000000"],
            b"PIPELINING": [],
        }
        client = h.greeted()
        ehlo = client.replies[1]
        keywords = [line.split(b" ")[0] for line in ehlo.lines[1:]]
        self.assertEqual(keywords.count(b"CHUNKING"), 1)
        self.assertNotIn(b"XCLIENT", keywords)
        self.assertNotIn(b"XFORWARD", keywords)
        self.assertNotIn(b"STARTTLS", keywords)
        self.assertIn(b"PIPELINING", keywords)
        self.assertIn(b"SIZE 1000", ehlo.lines)

    def test_refusedMessageNeverReachesMTA(self) -> None:
        """
        A message a filter refuses gets 550 5.7.1 with the filter's text, never reaches
        the MTA (whose transaction is reset), and the next message on the same
        connection is relayed.
        """
        spam = FakeFilter(verdicts={Stage.MESSAGE: lambda: Verdict.accept()})
        answers = iter([Verdict.reject("Looks like spam"), Verdict.accept()])
        spam.verdicts[Stage.MESSAGE] = lambda: next(answers)
        h = Harness(self, spam)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, b"Subject: spam\r\n\r\nbuy\r\n.\r\n")
        self.assertEqual(client.replies[-1].code, 550)
        self.assertEqual(client.replies[-1].lines, (b"5.7.1 Looks like spam",))
        self.assertEqual(h.mta.messages, [])
        self.assertNotIn(b"buy", bytes(h.mta.transcripts[0]))
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, STUFFED)
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual([m.content for m in h.mta.messages], [MESSAGE])
        self.assertEqual(h.spooled(), [])

    def test_pipelined(self) -> None:
        """
        MAIL, RCPT, RCPT and DATA sent in one write get their replies in order, and the
        MTA receives the commands as one batch.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, envelope(b"a@example.org", b"b@example.net", b"c@example.net") + b"DATA\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 250, 354])
        h.send(client, STUFFED + b"QUIT\r\n")
        self.assertEqual(client.codes[-2:], [250, 221])
        self.assertEqual(h.mta.messages[0].recipients, ["b@example.net", "c@example.net"])
        self.assertFalse(client.connected)

    def test_dataWithoutRecipients(self) -> None:
        """DATA with no accepted recipient answers 554 5.5.1 and the MTA never sees DATA."""
        h = Harness(self)
        h.mta.refuseRecipients = lambda r: True
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        self.assertEqual(client.codes[-2:], [550, 554])
        self.assertEqual(client.replies[-1].lines[0][:5], b"5.5.1")
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))

    def test_dataWithoutMail(self) -> None:
        """DATA before MAIL answers 503 and the MTA never sees it."""
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"DATA\r\n")
        self.assertEqual(client.codes[-1], 503)
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))

    def test_oversizeDeclared(self) -> None:
        """MAIL with SIZE= over the limit is refused early with 552 5.3.4."""
        h = Harness(self, limits={"messageSize": 100})
        client = h.greeted()
        h.send(client, b"MAIL FROM:<a@example.org> SIZE=101\r\n")
        self.assertEqual(
            client.replies[-1],
            client.replies[-1].make(552, "5.3.4", "Error: message size exceeds fixed limit"),
        )
        self.assertNotIn(b"MAIL", bytes(h.mta.transcripts[0]))

    def test_oversizeMessage(self) -> None:
        """
        A message over the limit is read to its end, refused with 552 5.3.4, never
        reaches the MTA, and leaves no spool file.
        """
        h = Harness(self, limits={"messageSize": 100})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(client.codes[-2:], [552, 250])
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])

    def test_tooManyRecipients(self) -> None:
        """RCPT beyond the limit answers 452 4.5.3 and is not relayed."""
        h = Harness(self, limits={"recipients": 2})
        client = h.greeted()
        h.send(client, envelope(b"a@x", b"r1@y", b"r2@y", b"r3@y") + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[2:], [250, 250, 250, 452, 354, 250])
        self.assertEqual(h.mta.messages[0].recipients, ["r1@y", "r2@y"])
        self.assertNotIn(b"r3@y", bytes(h.mta.transcripts[0]))

    def test_longCommandLine(self) -> None:
        """A command line over the limit answers 500 5.5.2; the next command is relayed."""
        h = Harness(self, limits={"lineLength": 512})
        client = h.greeted()
        h.send(client, b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(client.codes[-2:], [500, 250])
        self.assertEqual(client.replies[-2].lines[0][:5], b"5.5.2")

    def test_longBodyLine(self) -> None:
        """
        A body line far longer than the command line limit stays message content: the
        session never drops out of DATA mode, and the line arrives intact.
        """
        h = Harness(self, limits={"lineLength": 512})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        body = b"Subject: x\r\n\r\n" + b"MAIL FROM:<evil@x> " * 500 + b"\r\n"
        for i in range(0, len(body), 333):
            h.send(client, body[i : i + 333])
        h.send(client, b".\r\n")
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(h.mta.messages[0].content, body)
        self.assertEqual(len(h.mta.messages), 1)

    def test_bdat(self) -> None:
        """
        A message sent in BDAT chunks reaches an MTA without CHUNKING after DATA,
        dot-stuffed, and one with CHUNKING as one BDAT LAST: either stores exactly the
        chunks' bytes. The client gets our 250 for each chunk but the last, the MTA's own
        250 (its queue id) for the last, and no spool file is left.
        """
        chunks = [b"Subject: chunks\r\n\r\n.\r\n", b"..\r\nQUIT\r\n", b"end\r\n"]
        stream = b"".join(b"BDAT %d\r\n%s" % (len(c), c) for c in chunks[:-1])
        stream += b"BDAT %d LAST\r\n%s" % (len(chunks[-1]), chunks[-1])
        for chunking in (False, True):
            h = Harness(self)
            if chunking:
                h.mta.extensions[b"CHUNKING"] = []
            client = h.greeted()
            h.send(client, envelope() + stream + b"NOOP\r\n")
            self.assertEqual(client.codes, [220, 250, 250, 250, 250, 250, 250, 250])
            [message] = h.mta.messages
            self.assertEqual(message.content, b"".join(chunks))
            self.assertIn(message.queueId.encode(), client.replies[-2].lines[0])
            transcript = bytes(h.mta.transcripts[0])
            self.assertEqual(b"BDAT %d LAST\r\n" % len(message.content) in transcript, chunking)
            self.assertEqual(b"DATA\r\n" in transcript, not chunking)
            self.assertEqual(h.spooled(), [])

    def test_mtaDownAtConnect(self) -> None:
        """With the MTA unreachable, the client gets 421 4.3.2 and is disconnected."""
        h = Harness(self)
        h.memory.endpoint.refuse = True
        client = h.connect()
        self.assertEqual(client.codes, [421])
        self.assertEqual(client.replies[0].lines[0][:5], b"4.3.2")
        self.assertFalse(client.connected)

    def test_mtaDiesMidData(self) -> None:
        """
        The MTA dying while the message is released gives the client a 4xx, never 250,
        and leaves no spool file.
        """
        h = Harness(self)
        h.mta.dropAfterDataBytes = 10
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, b"Subject: x\r\n\r\n" + b"line\r\n" * 100 + b".\r\n")
        self.assertEqual(client.codes[-1] // 100, 4)
        self.assertNotIn(250, client.codes[4:])
        self.assertEqual(h.spooled(), [])

    def test_filterTimeout(self) -> None:
        """A message filter that never answers is timed out: 451 4.7.1, MTA reset."""
        slow = FakeFilter(verdicts={Stage.MESSAGE: lambda: Deferred()})
        h = Harness(self, slow)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-1], 354)
        h.clock.advance(31)
        h.memory.flush()
        self.assertEqual(client.codes[-1], 451)
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.7.1")
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])

    def test_mtaSilentAfterData(self) -> None:
        """An MTA that never answers the final dot: the client gets 421 after mta_reply."""
        h = Harness(self, timeouts={"mtaReply": 60.0})
        h.mta.silentAfterData = True
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertNotIn(250, client.codes[4:])
        h.clock.advance(61)
        h.memory.flush()
        self.assertEqual(client.codes[-1], 421)
        self.assertFalse(client.connected)

    def test_mtaKeptAwake(self) -> None:
        """
        While a slow client sends its message, the MTA gets a NOOP every mta_keepalive
        seconds (so its own idle timeout does not drop us); the client never sees those
        replies, and the message is released as usual.
        """
        h = Harness(self, timeouts={"mtaKeepalive": 60.0, "clientIdle": 100.0})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        for line in (b"Subject: slow\r\n", b"\r\n", b"one\r\n"):
            h.clock.advance(61)
            h.memory.flush()
            h.send(client, line)
        h.send(client, b".\r\n")
        transcript = bytes(h.mta.transcripts[0])
        self.assertEqual(transcript.count(b"NOOP\r\n"), 3)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250])
        self.assertEqual(h.mta.messages[0].content, b"Subject: slow\r\n\r\none\r\n")
        h.clock.advance(300)
        h.memory.flush()
        self.assertEqual(bytes(h.mta.transcripts[0]).count(b"NOOP\r\n"), 3)

    def test_idleClient(self) -> None:
        """An idle client gets 421 4.4.2 and is disconnected."""
        h = Harness(self, timeouts={"clientIdle": 10.0})
        client = h.greeted()
        h.clock.advance(11)
        h.memory.flush()
        self.assertEqual(client.codes[-1], 421)
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.4.2")
        self.assertFalse(client.connected)

    def test_connectionLimits(self) -> None:
        """Past the per-client connection limit a new client gets 421 4.7.0."""
        h = Harness(self, limits={"connectionsPerClient": 2})
        first, second, third = h.connect(), h.connect(), h.connect()
        self.assertEqual([first.codes, second.codes], [[220], [220]])
        self.assertEqual(third.codes, [421])
        self.assertEqual(third.replies[0].lines[0][:5], b"4.7.0")
        fourth = h.connect("127.0.0.2")
        self.assertEqual(fourth.codes, [220])

    def test_rcptFilter(self) -> None:
        """A recipient a filter refuses gets its 550 and is never relayed; others are."""
        f = FakeFilter(verdicts={Stage.RCPT: lambda: Verdict.accept()})
        answers = iter([Verdict.reject("No such user here"), Verdict.accept()])
        f.verdicts[Stage.RCPT] = lambda: next(answers)
        h = Harness(self, f)
        client = h.greeted()
        h.send(client, envelope(b"a@x", b"bad@y", b"good@y") + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[2:], [250, 550, 250, 354, 250])
        self.assertEqual(h.mta.messages[0].recipients, ["good@y"])
        self.assertNotIn(b"bad@y", bytes(h.mta.transcripts[0]))

    def test_earlyHeadersKept(self) -> None:
        """
        Headers added at connect, HELO, MAIL and RCPT reach the released message, in
        that order, and those of a finished transaction do not reach the next one.
        """
        f = FakeFilter(
            verdicts={
                Stage.CONNECT: Verdict.accept((("X-Connect", "1"),)),
                Stage.HELO: Verdict.accept((("X-Helo", "2"),)),
                Stage.MAIL: Verdict.accept((("X-Mail", "3"),)),
                Stage.RCPT: Verdict.accept((("X-Rcpt", "4"),)),
                Stage.MESSAGE: Verdict.accept((("X-Message", "5"),)),
            }
        )
        h = Harness(self, f)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        h.send(client, b"MAIL FROM:<a@x>\r\nDATA\r\n")
        self.assertEqual(
            h.mta.messages[0].content,
            b"X-Connect: 1\r\nX-Helo: 2\r\nX-Mail: 3\r\nX-Rcpt: 4\r\nX-Message: 5\r\n" + MESSAGE,
        )
        f.verdicts[Stage.MAIL] = Verdict.accept()
        f.verdicts[Stage.RCPT] = Verdict.accept()
        h.send(client, b"RSET\r\n" + envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(
            h.mta.messages[1].content, b"X-Connect: 1\r\nX-Helo: 2\r\nX-Message: 5\r\n" + MESSAGE
        )

    def test_headersAdded(self) -> None:
        """Headers from accepting filters are prepended to the released message."""
        f = FakeFilter(verdicts={Stage.MESSAGE: Verdict.accept((("X-Checked", "yes"),))})
        h = Harness(self, f)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(h.mta.messages[0].content, b"X-Checked: yes\r\n" + MESSAGE)

    def test_spoolWriteFails(self) -> None:
        """
        A spool write failure (disk full) answers 452 4.3.1 once the client has sent
        the message; nothing reaches the MTA and no spool file is left.
        """
        h = Harness(self)

        class FullDisk(Spool):
            def write(self, data: bytes) -> None:
                self.error = OSError(errno.ENOSPC, "No space left on device")

        self.patch(relay, "Spool", FullDisk)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED + b"NOOP\r\n")
        self.assertEqual(client.codes[-2:], [452, 250])
        self.assertEqual(client.replies[-2].lines[0][:5], b"4.3.1")
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])

    def test_mtaFinalReplyRelayedVerbatim(self) -> None:
        """The MTA's own refusal at end of data reaches the client word for word."""
        h = Harness(self)
        h.mta.refuseMessage = lambda message: (554, "5.7.1 Rejected by the MTA itself")
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.replies[-1].code, 554)
        self.assertEqual(client.replies[-1].lines, (b"5.7.1 Rejected by the MTA itself",))

    def test_clientGoneWhileFiltering(self) -> None:
        """
        A client that disconnects while its message is being checked never has it
        delivered (it will retry), and its spool file is removed.
        """
        held: Deferred[Verdict] = Deferred()
        h = Harness(self, FakeFilter(verdicts={Stage.MESSAGE: lambda: held}))
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(len(h.spooled()), 1)
        assert client.transport is not None
        client.transport.loseConnection()
        h.memory.flush()
        self.assertEqual(h.spooled(), [])
        self.assertEqual(h.mta.messages, [])

    def test_connectRefused(self) -> None:
        """A client in a denied network gets 554 5.7.1 at connect and is closed."""
        access = AccessFilterFactory().build(
            {"deny_networks": ["10.0.0.0/8", "2001:db8::/32"]}, Clock()
        )
        h = Harness(self, access)
        for address in ("10.1.2.3", "2001:db8::1"):
            client = h.connect(address)
            self.assertEqual(client.codes, [554])
            self.assertFalse(client.connected)
        self.assertEqual(h.connect("127.0.0.1").codes, [220])
        self.assertEqual(len(h.mta.transcripts), 1)

    def test_heloRefused(self) -> None:
        """A HELO name a filter refuses gets 550 and the MTA never sees it."""
        access = AccessFilterFactory().build({"deny_helo": ["*.invalid"]}, Clock())
        h = Harness(self, access)
        client = h.connect()
        h.send(client, b"EHLO bad.invalid\r\nEHLO good.example\r\n")
        self.assertEqual(client.codes, [220, 550, 250])
        self.assertNotIn(b"bad.invalid", bytes(h.mta.transcripts[0]))

    def test_otherCommandsRelayed(self) -> None:
        """
        NOOP, HELP and VRFY (the default relay_commands) are relayed and answered by the
        MTA; an unknown command gets 502 5.5.2 from mailproxy and never reaches the MTA.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"NOOP\r\nHELP\r\nVRFY postmaster\r\nXYZZY\r\n")
        self.assertEqual(len(client.codes), 6)
        self.assertEqual(client.codes[-1], 502)
        self.assertEqual(client.replies[-1].lines[0][:5], b"5.5.2")
        transcript = bytes(h.mta.transcripts[0])
        for verb in (b"NOOP", b"HELP", b"VRFY postmaster"):
            self.assertIn(verb + b"\r\n", transcript)
        self.assertNotIn(b"XYZZY", transcript)

    def test_notForClients(self) -> None:
        """STARTTLS, XCLIENT and XFORWARD from a client get 502 and are not relayed."""
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"STARTTLS\r\nXCLIENT ADDR=1.2.3.4\r\nXFORWARD ADDR=1.2.3.4\r\n")
        self.assertEqual(client.codes[2:], [502, 502, 502])
        self.assertNotIn(b"1.2.3.4", bytes(h.mta.transcripts[0]))

    def test_quit(self) -> None:
        """QUIT gets the MTA's 221; nothing pipelined after it is relayed."""
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"QUIT\r\nNOOP\r\n")
        self.assertEqual(client.codes[-1], 221)
        self.assertFalse(client.connected)
        self.assertTrue(bytes(h.mta.transcripts[0]).endswith(b"QUIT\r\n"))


class RecordingStuffer(wire.Stuffer):
    """A Stuffer that notes the size of each chunk it searches for dots to stuff."""

    searched: ClassVar[list[int]] = []

    def __call__(self, chunk: bytes) -> bytes:
        self.searched.append(len(chunk))
        return super().__call__(chunk)


class DotLineReleaseTests(SynchronousTestCase):
    """
    After DATA, the MTA gets every line starting with a dot stuffed, whether it is in
    the client's content or in what goes on top of it; the spool is searched for dots
    only when the scanner saw a dot line, and a message without one arrives byte for byte.
    """

    LINE = b"x" * 76 + b"\r\n"

    def setUp(self) -> None:
        RecordingStuffer.searched = []
        self.patch(wire, "Stuffer", RecordingStuffer)

    def released(self, h: Harness, content: bytes) -> bytes:
        """Send C{content} dot-stuffed after DATA; the bytes the MTA got after its 354."""
        client = h.greeted()
        stuffed = content.replace(b"\r\n.", b"\r\n..")
        h.send(client, envelope() + b"DATA\r\n" + stuffed + b".\r\n")
        self.assertEqual(client.codes[-1], 250)
        transcript = bytes(h.mta.transcripts[-1])
        start = transcript.index(b"\r\nDATA\r\n") + len(b"\r\nDATA\r\n")
        return transcript[start : transcript.index(b"\r\n.\r\n", start) + len(b"\r\n.\r\n")]

    def test_noDotLine(self) -> None:
        """
        A message with no dot line, larger than a release chunk: the MTA gets the added
        header and the content exactly as spooled; only the added header is searched.
        """
        f = FakeFilter(verdicts={Stage.MESSAGE: Verdict.accept((("X-Checked", "yes"),))})
        h = Harness(self, f)
        content = b"Subject: big\r\n\r\n" + b"Hello. A line with a dot.\r\n" + self.LINE * 8000
        head = b"X-Checked: yes\r\n"
        self.assertEqual(self.released(h, content), head + content + b".\r\n")
        self.assertEqual(h.mta.messages[0].content, head + content)
        self.assertEqual(RecordingStuffer.searched, [len(head)])

    def test_stuffedLine(self) -> None:
        """A client's stuffed line C{..foo} reaches the MTA stuffed, in a large message too."""
        for lines in (0, 8000):
            h = Harness(self)
            content = b"Subject: dots\r\n\r\n" + self.LINE * lines + b".foo\r\n" + self.LINE
            self.assertEqual(
                self.released(h, content), content.replace(b"\r\n.foo", b"\r\n..foo") + b".\r\n"
            )
            self.assertEqual(h.mta.messages[0].content, content)
            self.assertGreater(sum(RecordingStuffer.searched), len(content) - 2, lines)
            RecordingStuffer.searched = []

    def test_dotLineOnTop(self) -> None:
        """
        Without a dot line in the spool, what goes on top is stuffed all the same: a
        filter's added field that starts with a dot, and the edited header block.
        """
        edits = (HeaderEdit.add(".Dotted", "on top"), HeaderEdit.remove("X-Spam"))
        f = FakeFilter(verdicts={Stage.MESSAGE: Verdict.accept(edits=edits)})
        h = Harness(self, f)
        content = b"X-Spam: yes\r\nSubject: hi\r\n\r\nbody\r\n" + self.LINE * 8000
        released = self.released(h, content)
        self.assertEqual(
            released,
            b"..Dotted: on top\r\nSubject: hi\r\n\r\nbody\r\n" + self.LINE * 8000 + b".\r\n",
        )
        self.assertEqual(h.mta.messages[0].content, b".Dotted: on top\r\n" + content[13:])
        self.assertEqual(RecordingStuffer.searched, [len(b".Dotted: on top\r\nSubject: hi\r\n")])


class ChunkingTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60))
    def test_anyChunking(self, sizes: list[int]) -> None:
        """
        However the client's byte stream is split, the MTA receives the same bytes and
        the client the same replies.
        """
        stream = (
            b"EHLO c.example\r\n"
            + envelope(b"a@x", b"b@y", b"c@y")
            + b"DATA\r\n"
            + STUFFED
            + b"RSET\r\nNOOP\r\n"
            + envelope()
            + b"DATA\r\n"
            + b".\r\n"
            + b"QUIT\r\n"
        )
        reference = self._replay([stream])
        chunks, i = [], 0
        for size in sizes:
            chunks.append(stream[i : i + size])
            i += size
        chunks.append(stream[i:])
        self.assertEqual(self._replay(chunks), reference)

    def _replay(self, chunks: list[bytes]) -> tuple[list[int], bytes, list[bytes]]:
        h = Harness(self)
        client = h.connect()
        for chunk in chunks:
            if chunk:
                # The client waits for 354 before sending the message, as RFC 5321 says.
                h.send(client, chunk)
        return client.codes, bytes(h.mta.transcripts[0]), [m.content for m in h.mta.messages]


class TimerReuseTests(SynchronousTestCase):
    """The session's timers share one delayed call, moved, not made anew per command."""

    def sessionTimers(self, h: Harness) -> list[object]:
        """The delayed calls scheduled for the sessions' timers."""
        return [
            call for call in h.clock.getDelayedCalls() if getattr(call.func, "__name__", "") == "_ring"
        ]

    def test_secondMessageNoNewTimers(self) -> None:
        """
        A second message on the connection schedules no new timer: those the first one
        started and cancelled (the MTA's reply timer, for every command) are moved.
        """
        h = Harness(self)
        made: list[object] = []
        callLater = h.clock.callLater

        def counting(delay: float, f: Any, *a: object, **kw: object) -> Any:
            made.append(f)
            return callLater(delay, f, *a, **kw)

        h.clock.callLater = counting  # type: ignore[method-assign]
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        first = [f for f in made if getattr(f, "__name__", "") == "_ring"]
        del made[:]
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 250, 250, 354, 250])
        self.assertTrue(first)
        self.assertEqual([f for f in made if getattr(f, "__name__", "") == "_ring"], [])
        self.assertEqual(len(h.mta.messages), 2)

    def test_disarmedTimerDoesNothing(self) -> None:
        """
        The MTA's reply timer, cancelled by the MTA's reply, may come due while the client
        is idle: nothing happens, and the session goes on.
        """
        h = Harness(self, timeouts={"mtaReply": 10.0, "clientIdle": 100.0})
        client = h.greeted()
        h.clock.advance(11)
        h.memory.flush()
        self.assertEqual(client.codes, [220, 250])
        self.assertTrue(client.connected)
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-1], 250)

    def test_dueTogether(self) -> None:
        """
        Timers due at one ring fire earliest first, and one that an earlier one's firing
        stopped, or started again for later, does not fire then.
        """
        h = Harness(self)
        client, server = h.memory.connect()
        h.memory.flush()
        fired: list[core.Timer] = []

        def timerFired(timer: core.Timer) -> list[core.Effect]:
            fired.append(timer)
            if timer is core.Timer.IDLE:
                server._cancelTimer(core.CancelTimer(core.Timer.COMMAND))
                server._startTimer(core.StartTimer(core.Timer.KEEPALIVE, 10.0))
            return []

        server.machine.timerFired = timerFired  # type: ignore[method-assign]
        for timer, seconds in [
            (core.Timer.COMMAND, 3.0),
            (core.Timer.KEEPALIVE, 2.0),
            (core.Timer.IDLE, 1.0),
            (core.Timer.MTA_REPLY, 3.0),
        ]:
            server._startTimer(core.StartTimer(timer, seconds))
        h.clock.advance(5)
        self.assertEqual(fired, [core.Timer.IDLE, core.Timer.MTA_REPLY])
        h.clock.advance(10)
        self.assertEqual(fired, [core.Timer.IDLE, core.Timer.MTA_REPLY, core.Timer.KEEPALIVE])
        self.assertEqual(len(self.sessionTimers(h)), 1)  # the session's own, still armed
        client.transport.loseConnection()

    def test_noTimerLeftAfterQuit(self) -> None:
        """Once the client has quit, none of its session's timers is left scheduled."""
        h = Harness(self)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        h.memory.flush()
        self.assertFalse(client.connected)
        self.assertEqual(self.sessionTimers(h), [])


class RecordingDescriptor(FileDescriptor):
    """A socket transport's write path without a socket: what it sends, recorded."""

    def __init__(self) -> None:
        super().__init__(MemoryReactor())
        self.connected = True
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)


class SendNowTests(SynchronousTestCase):
    """
    L{relay._sendNow}: a batch's bytes go straight to the socket only when nothing waits
    in Twisted's buffer before them, and only under wrappers that pass writes through.
    """

    def connection(self) -> tuple[tcp.Connection, socket.socket]:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        conn = tcp.Connection(ours, Protocol(), MemoryReactor())
        conn.connected = True
        return conn, peer

    def received(self, peer: socket.socket, size: int) -> bytes:
        peer.settimeout(1)
        got = b""
        while len(got) < size:
            got += peer.recv(size - len(got))
        return got

    def test_sentAtOnce(self) -> None:
        """With nothing waiting, the bytes are sent now, and the socket is not watched."""
        conn, peer = self.connection()
        self.assertTrue(relay._sendNow(conn, b"250 2.1.0 Ok\r\n"))
        self.assertEqual(self.received(peer, 14), b"250 2.1.0 Ok\r\n")
        self.assertNotIn(conn, conn.reactor.getWriters())  # type: ignore[attr-defined]

    def test_afterWhatWaits(self) -> None:
        """Bytes already in Twisted's buffer go first: the new ones queue behind them."""
        conn, peer = self.connection()
        conn.write(b"250 first\r\n")
        self.assertFalse(relay._sendNow(conn, b"250 second\r\n"))
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 100)
        conn.doWrite()
        self.assertEqual(self.received(peer, 23), b"250 first\r\n250 second\r\n")

    def test_partlyTaken(self) -> None:
        """What the socket does not take is left to Twisted, in order, nothing lost."""
        conn, peer = self.connection()
        data = os.urandom(2 << 20)  # more than one send takes; aperiodic, so a repeat shows
        self.assertFalse(relay._sendNow(conn, data))
        self.assertIn(conn, conn.reactor.getWriters())  # type: ignore[attr-defined]
        got = b""
        peer.settimeout(1)
        while len(got) < len(data):
            got += peer.recv(1 << 20)
            conn.doWrite()
        self.assertEqual(got, data)
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 100)  # and nothing more

    def test_tlsKeepsItsWrites(self) -> None:
        """Under TLS the bytes go through the transport's own write, to be encrypted."""
        conn, _ = self.connection()
        conn.TLS = True
        written: list[bytes] = []
        self.patch(conn, "write", written.append)
        self.patch(conn, "writeSomeData", lambda data: self.fail("sent in clear"))
        self.assertFalse(relay._sendNow(conn, b"250 ok\r\n"))
        self.assertEqual(written, [b"250 ok\r\n"])

    def test_wrappers(self) -> None:
        """
        A wrapper that passes writes through (the PROXY protocol's) is looked under; one
        with a write of its own (TLS's) is given the bytes.
        """
        conn, peer = self.connection()
        passing = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        passing.makeConnection(conn)
        self.assertTrue(relay._sendNow(passing, b"220 hello\r\n"))
        self.assertEqual(self.received(peer, 11), b"220 hello\r\n")

        written: list[bytes] = []

        class Own(ProtocolWrapper):
            def write(self, data: bytes) -> None:
                written.append(data)

        own = Own(WrappingFactory(Factory()), Protocol())
        own.makeConnection(conn)
        self.assertFalse(relay._sendNow(own, b"220 secret\r\n"))
        self.assertEqual(written, [b"220 secret\r\n"])


class WriteNowTests(SynchronousTestCase):
    """L{relay._writeNow}: a batch's writes leave at once, not at the reactor's next turn."""

    def test_sentAtOnce(self) -> None:
        """What a batch wrote is sent in one send, and the transport stops waiting to write."""
        fd = RecordingDescriptor()
        fd.write(b"250 2.1.0 Ok\r\n")
        fd.write(b"250 2.1.5 Ok\r\n")
        relay._writeNow(fd)
        self.assertEqual(fd.sent, [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"])
        self.assertNotIn(fd, fd.reactor.getWriters())  # type: ignore[attr-defined]

    def test_underAWrapper(self) -> None:
        """The socket under TLS or the PROXY protocol's wrapper is the one written."""
        fd = RecordingDescriptor()
        fd.write(b"221 Bye\r\n")
        wrapper = type("Wrapper", (), {"transport": fd})()
        relay._writeNow(wrapper)
        self.assertEqual(fd.sent, [b"221 Bye\r\n"])

    def test_leftToTheReactor(self) -> None:
        """A transport closing, or holding nothing, is not written: the reactor does it."""
        idle = RecordingDescriptor()
        relay._writeNow(idle)
        self.assertEqual(idle.sent, [])
        closing = RecordingDescriptor()
        closing.write(b"421 closing\r\n")
        closing.disconnecting = True
        relay._writeNow(closing)
        self.assertEqual(closing.sent, [])
