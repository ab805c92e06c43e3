"""
BDAT/CHUNKING from clients (RFC 3030) in the session core: events in, effects out, and
hypothesis over where the client's bytes are cut and in which order events arrive.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.config import BareLineEndings, Config, Limits
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply, ReplyParser
from tests.test_session import CONFIG, World, visible

PLAIN = (b"mta.test", b"PIPELINING", b"ENHANCEDSTATUSCODES")
CHUNKING = (*PLAIN, b"CHUNKING")


def machine(config: Config = CONFIG) -> core.Session:
    return core.Session(config, SessionInfo("S1", "192.0.2.7", 40000))


def greeted(mta: tuple[bytes, ...] = PLAIN, config: Config = CONFIG) -> core.Session:
    """A session whose client said EHLO to an MTA offering C{mta}."""
    s = machine(config)
    s.start()
    s.verdict(Stage.CONNECT, Verdict.accept())
    s.mtaConnected()
    s.mtaReply(Reply(220, (b"mta.test",)))
    s.clientData(b"EHLO c.example\r\n")
    s.verdict(Stage.HELO, Verdict.accept())
    s.mtaReply(Reply(250, mta))
    return s


def inTransaction(mta: tuple[bytes, ...] = PLAIN, config: Config = CONFIG) -> core.Session:
    """A session with MAIL and one RCPT accepted, at the MTA too."""
    s = greeted(mta, config)
    s.clientData(b"MAIL FROM:<a@x>\r\n")
    s.verdict(Stage.MAIL, Verdict.accept())
    s.mtaReply(Reply(250, (b"2.1.0 ok",)))
    s.clientData(b"RCPT TO:<b@y>\r\n")
    s.verdict(Stage.RCPT, Verdict.accept())
    s.mtaReply(Reply(250, (b"2.1.5 ok",)))
    return s


def sent(effects: list[core.Effect], kind: type[Any]) -> list[bytes]:
    return [e.data for e in effects if isinstance(e, kind)]


def codes(effects: list[core.Effect]) -> list[int]:
    return [r.code for r in ReplyParser().feed(b"".join(sent(effects, core.SendClient)))]


OK5 = core.SendClient(b"250 2.0.0 Ok: 5 octets received\r\n")


class ChunkTests(SynchronousTestCase):
    def test_chunkingOffered(self) -> None:
        """CHUNKING is offered to the client though the MTA does not offer it."""
        s = machine()
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.mtaConnected()
        s.mtaReply(Reply(220, (b"mta.test",)))
        s.clientData(b"EHLO c.example\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        [reply] = sent(s.mtaReply(Reply(250, PLAIN)), core.SendClient)
        self.assertIn(b"250 CHUNKING\r\n", reply)

    def test_chunksSpooledReleasedWithBdat(self) -> None:
        """
        The first BDAT opens the spool; each chunk's bytes go there as they come, none to
        the MTA; our 250 answers each chunk but the last; at BDAT LAST the filters run and
        an MTA offering CHUNKING gets the message in one BDAT (the headers and the
        spooled bytes, whose size the driver counts); its own reply is relayed.
        """
        s = inTransaction(CHUNKING)
        self.assertEqual(visible(s.clientData(b"BDAT 5\r\nA:l")), [core.SpoolOpen()])
        self.assertEqual(visible(s.spoolOpened()), [core.SpoolWrite(b"A:l")])
        self.assertIs(s.state, core.State.CHUNK)
        self.assertEqual(
            visible(s.clientData(b"lo")),
            [core.SpoolWrite(b"lo"), OK5],
        )
        self.assertEqual(visible(s.clientData(b"BDAT 2 LAST\r\n\r\n")), [
            core.SpoolWrite(b"\r\n"), core.SpoolClose()
        ])  # fmt: skip
        [check] = visible(s.spoolClosed())
        assert isinstance(check, core.RunCheck)
        self.assertEqual(check.stage, Stage.MESSAGE)
        effects = visible(s.verdict(Stage.MESSAGE, Verdict.accept(headers=(("X-A", "b"),))))
        self.assertEqual(effects, [core.Release((("X-A", "b"),), len(b"A:llo\r\n"), chunked=True)])
        self.assertEqual(visible(s.releaseSent()), [core.Report(core.Counted.RELEASED)])
        effects = visible(s.mtaReply(Reply(250, (b"2.0.0 queued as Q1",))))
        self.assertIn(core.SendClient(b"250 2.0.0 queued as Q1\r\n"), effects)
        self.assertIn(core.SpoolRemove(), effects)
        self.assertIs(s.state, core.State.COMMAND)

    def test_releasedWithData(self) -> None:
        """
        An MTA without CHUNKING gets DATA, then the message (the relay dot-stuffs it); a
        last line without CRLF gets one in the spool first, so that the MTA reads what
        the filters read.
        """
        s = inTransaction(PLAIN)
        s.clientData(b"BDAT 8 LAST\r\n")
        self.assertEqual(
            visible(s.spoolOpened() + s.clientData(b"a:\r\n\r\n.b")),
            [core.SpoolWrite(b"a:\r\n\r\n.b"), core.SpoolWrite(b"\r\n"), core.SpoolClose()],
        )
        s.spoolClosed()
        self.assertEqual(
            visible(s.verdict(Stage.MESSAGE, Verdict.accept())), [core.SendMta(b"DATA\r\n")]
        )
        self.assertEqual(visible(s.mtaReply(Reply(354, (b"go",)))), [core.Release((), 10)])

    def test_noCrlfAddedForBdat(self) -> None:
        """Released with BDAT, the content stays exactly as sent, last line and all."""
        s = inTransaction(CHUNKING)
        s.clientData(b"BDAT 5 LAST\r\n")
        self.assertEqual(
            visible(s.spoolOpened() + s.clientData(b"a\r\n.b")),
            [core.SpoolWrite(b"a\r\n.b"), core.SpoolClose()],
        )

    def test_earlyMtaReplyNotRelayed(self) -> None:
        """An MTA that answers the BDAT before all of it is sent: 451 4.3.0, never its 250."""
        s = inTransaction(CHUNKING)
        s.clientData(b"BDAT 2 LAST\r\nx:")
        s.spoolOpened()
        s.spoolClosed()
        s.verdict(Stage.MESSAGE, Verdict.accept())
        effects = s.mtaReply(Reply(250, (b"2.0.0 queued as EARLY",)))
        self.assertNotIn(b"EARLY", b"".join(sent(effects, core.SendClient)))
        self.assertEqual(codes(effects), [451])
        self.assertIn(core.AbortMta(), effects)

    def test_releaseWaitsForKeepalive(self) -> None:
        """A keepalive NOOP still unanswered holds the BDAT back until its reply is in."""
        s = inTransaction(CHUNKING)
        s.clientData(b"BDAT 2 LAST\r\nx:")
        s.spoolOpened()
        self.assertIn(core.SendMta(b"NOOP\r\n"), s.timerFired(core.Timer.KEEPALIVE))
        s.spoolClosed()
        self.assertEqual(visible(s.verdict(Stage.MESSAGE, Verdict.accept())), [])
        self.assertEqual(visible(s.mtaReply(Reply(250, (b"ok",)))), [core.Release((), 2, chunked=True)])

    def test_keepalivesBetweenChunks(self) -> None:
        """Between chunks, as in DATA, the MTA gets keepalive NOOPs, never shown to the client."""
        s = inTransaction(CHUNKING)
        s.clientData(b"BDAT 1\r\nx")
        s.spoolOpened()
        effects = s.timerFired(core.Timer.KEEPALIVE)
        self.assertIn(core.SendMta(b"NOOP\r\n"), effects)
        self.assertEqual(visible(s.mtaReply(Reply(250, (b"ok",)))), [])

    def test_commandsAfterTheChunkAreCommands(self) -> None:
        """
        Bytes inside a chunk are content, whatever they look like; those pipelined after
        it are commands again.
        """
        s = inTransaction(PLAIN)
        content = b"RSET\r\n.\r\nQUIT\r\n"
        s.clientData(b"BDAT %d\r\n%sNOOP\r\n" % (len(content), content))
        effects = visible(s.spoolOpened())
        self.assertEqual(
            effects,
            [
                core.SpoolWrite(content),
                core.SendMta(b"NOOP\r\n"),
                core.SendClient(b"250 2.0.0 Ok: 15 octets received\r\n"),
            ],
        )

    def test_syntax(self) -> None:
        """
        BDAT's grammar is strict: 501 5.5.4 for anything but digits and an optional
        LAST (any case) after one SP; a size that was readable still has its bytes
        read and discarded, and the transaction has failed.
        """
        for bad in (b"BDAT", b"BDAT x", b"BDAT +3", b"BDAT 1e3", b"BDAT 0x10", b"BDAT 3  LAST",
                    b"BDAT 3 LAST x", b"BDAT 3 FIRST", b"BDAT " + b"1" * 21, b"BDAT -1"):  # fmt: skip
            s = inTransaction()
            effects = s.clientData(bad + b"\r\nabcNOOP\r\n")
            self.assertEqual(codes(effects)[:1], [501], bad)
            self.assertNotIn(core.SpoolOpen(), effects)
        s = inTransaction()
        effects = s.clientData(b"BDAT 3 LASTX\r\nabcNOOP\r\nBDAT 1 LAST\r\nx")
        effects += s.mtaReply(Reply(250, (b"ok",)))
        self.assertEqual(sent(effects, core.SendMta), [b"NOOP\r\n"])
        self.assertEqual(codes(effects), [501, 250, 503])
        for good in (b"BDAT 3 last", b"BDAT 003 LaSt", b"bdat 3 LAST"):
            s = inTransaction()
            self.assertEqual(visible(s.clientData(good + b"\r\nabc")), [core.SpoolOpen()], good)

    def test_noTransaction(self) -> None:
        """BDAT without MAIL: 503 5.5.1, and the chunk's bytes are discarded, not commands."""
        s = greeted()
        effects = s.clientData(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
        self.assertEqual(sent(effects, core.SendMta), [b"NOOP\r\n"])
        self.assertEqual(codes(effects), [503])

    def test_noRecipients(self) -> None:
        """
        BDAT decides once every earlier reply is in: with no recipient accepted, 554
        5.5.1; the bytes of it and of the BDATs pipelined after it are discarded, and
        those get 503 5.5.1 until RSET; no spool is ever opened.
        """
        s = greeted()
        s.clientData(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 3\r\nabcBDAT 3 LAST\r\ndefRSET\r\n")
        effects = s.verdict(Stage.MAIL, Verdict.accept())
        effects += s.verdict(Stage.RCPT, Verdict.accept())
        effects += s.mtaReply(Reply(250, (b"2.1.0 ok",)))
        effects += s.mtaReply(Reply(550, (b"5.1.1 unknown",)))
        effects += s.mtaReply(Reply(250, (b"2.0.0 ok",)))
        self.assertEqual(codes(effects), [250, 550, 554, 503, 250])
        self.assertNotIn(core.SpoolOpen(), effects)
        self.assertEqual(
            sent(effects, core.SendMta), [b"MAIL FROM:<a@x>\r\n", b"RCPT TO:<b@y>\r\n", b"RSET\r\n"]
        )

    def test_mixingDataAndBdat(self) -> None:
        """DATA, MAIL, RCPT or EHLO between BDAT chunks: 503 5.5.1; the chunks go on."""
        s = inTransaction()
        s.clientData(b"BDAT 2\r\nx:")
        effects = s.spoolOpened()
        effects += s.clientData(
            b"DATA\r\nEHLO c\r\nRCPT TO:<c@y>\r\nMAIL FROM:<z@x>\r\nBDAT 1 LAST\r\ny"
        )
        self.assertEqual(codes(effects), [250, 503, 503, 503, 503])
        self.assertEqual(sent(effects, core.SpoolWrite), [b"x:", b"y", b"\r\n"])
        self.assertIn(core.SpoolClose(), effects)
        self.assertEqual(sent(effects, core.SendMta), [])

    def test_rsetMidChunks(self) -> None:
        """RSET between chunks removes the spool file; the MTA gets the RSET."""
        s = inTransaction()
        s.clientData(b"BDAT 1\r\nx")
        s.spoolOpened()
        effects = s.clientData(b"RSET\r\n")
        self.assertIn(core.SpoolRemove(), effects)
        self.assertEqual(sent(effects, core.SendMta), [b"RSET\r\n"])

    def test_clientGoneMidChunk(self) -> None:
        """A client gone in the middle of a chunk leaves no spool file, and the MTA no message."""
        s = inTransaction()
        s.clientData(b"BDAT 10 LAST\r\nabc")
        s.spoolOpened()
        effects = s.clientLost()
        self.assertIn(core.SpoolRemove(), effects)
        self.assertEqual([e for e in effects if isinstance(e, core.Release)], [])

    def test_clientEndsMidChunk(self) -> None:
        """A client that half-closes in the middle of a chunk: closed, and no spool file left."""
        s = inTransaction()
        s.clientData(b"BDAT 10 LAST\r\nabc")
        s.spoolOpened()
        effects = s.clientEnded()
        self.assertIn(core.SpoolRemove(), effects)
        self.assertIn(core.CloseClient(), effects)

    def test_spoolNotCreated(self) -> None:
        """
        A spool file that cannot be created: 452 4.3.1 once the chunk is read, and the
        transaction's later BDATs are refused, their bytes discarded.
        """
        s = inTransaction()
        s.clientData(b"BDAT 3\r\nabcBDAT 2 LAST\r\nde")
        effects = s.spoolFailed("disk full")
        self.assertEqual(codes(effects), [452, 503])
        self.assertEqual(sent(effects, core.SendMta), [])

    def test_sizeLimit(self) -> None:
        """
        The size limit counts chunk bytes: past it nothing more is spooled, the chunks
        are still read and answered, and BDAT LAST gets 552 5.3.4; the MTA an RSET.
        """
        config = attrs.evolve(CONFIG, limits=Limits(messageSize=4))
        s = inTransaction(config=config)
        s.clientData(b"BDAT 3\r\nabc")
        effects = s.spoolOpened()
        effects += s.clientData(b"BDAT 3\r\ndefBDAT 1 LAST\r\ng")
        effects += s.spoolClosed()
        self.assertEqual(codes(effects), [250, 250, 552])
        self.assertEqual(sent(effects, core.SpoolWrite), [b"abc"])
        self.assertIn(core.SpoolRemove(), effects)
        self.assertEqual(sent(effects, core.SendMta), [b"RSET\r\n"])

    def test_bareLineEndingsRefused(self) -> None:
        """
        A bare LF or CR in chunk content is refused at BDAT LAST (554 5.6.0); a CRLF cut
        between two chunks is no bare CR.
        """
        for chunks, code in [
            ((b"a\nb",), 554), ((b"a\rb",), 554), ((b"a\r",), 554), ((b"a:\r", b"\nb:"), None),
        ]:  # fmt: skip
            s = inTransaction()
            effects: list[core.Effect] = []
            for i, chunk in enumerate(chunks):
                last = b" LAST" if i == len(chunks) - 1 else b""
                effects += s.clientData(b"BDAT %d%s\r\n%s" % (len(chunk), last, chunk))
                if i == 0:
                    effects += s.spoolOpened()
            effects += s.spoolClosed()
            refused = [c for c in codes(effects) if c != 250]
            self.assertEqual(refused, [code] if code else [], chunks)
            if code is None:
                self.assertEqual(b"".join(sent(effects, core.SpoolWrite)), b"a:\r\nb:\r\n")

    def test_bareLineEndingsNormalised(self) -> None:
        """With bare_line_endings = normalise, every bare CR or LF is spooled as CRLF."""
        config = attrs.evolve(CONFIG, bareLineEndings=BareLineEndings.NORMALISE)
        s = inTransaction(config=config)
        s.clientData(b"BDAT 5\r\na\nb\rc")
        effects = s.spoolOpened() + s.clientData(b"BDAT 1 LAST\r\n\r")
        self.assertEqual(b"".join(sent(effects, core.SpoolWrite)), b"a\r\nb\r\nc\r\n")

    def test_binaryMime(self) -> None:
        """
        BINARYMIME is offered only when the MTA offers it with CHUNKING; then BODY=
        BINARYMIME is allowed, DATA refused (503 5.5.1), and the content spooled as it is:
        NUL, bare CR and LF, 8-bit bytes in its body included.
        """
        s = greeted((*PLAIN, b"BINARYMIME"))
        self.assertEqual(codes(s.clientData(b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n")), [555])
        s = inTransaction((*CHUNKING, b"8BITMIME", b"BINARYMIME"))
        s.clientData(b"RSET\r\n")
        s.mtaReply(Reply(250, (b"ok",)))
        s.clientData(b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n")
        self.assertIn(
            core.SendMta(b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n"),
            s.verdict(Stage.MAIL, Verdict.accept()),
        )
        s.mtaReply(Reply(250, (b"ok",)))
        s.clientData(b"RCPT TO:<b@y>\r\n")
        s.verdict(Stage.RCPT, Verdict.accept())
        s.mtaReply(Reply(250, (b"ok",)))
        self.assertEqual(codes(s.clientData(b"DATA\r\n")), [503])
        s.clientData(b"BDAT 12 LAST\r\nA: b\r\n\r\n\x00\n\r\xff")
        effects = s.spoolOpened() + s.spoolClosed()
        self.assertEqual(sent(effects, core.SpoolWrite), [b"A: b\r\n\r\n\x00\n\r\xff"])
        self.assertEqual(
            visible(s.verdict(Stage.MESSAGE, Verdict.accept())), [core.Release((), 12, chunked=True)]
        )

    def test_afterLast(self) -> None:
        """A BDAT after BDAT LAST belongs to no transaction: 503, its bytes discarded."""
        s = inTransaction(CHUNKING)
        s.clientData(b"BDAT 2 LAST\r\nx:BDAT 4\r\nRSETNOOP\r\n")
        s.spoolOpened()
        s.spoolClosed()
        s.verdict(Stage.MESSAGE, Verdict.accept())
        s.releaseSent()
        effects = s.mtaReply(Reply(250, (b"2.0.0 queued",)))
        self.assertEqual(codes(effects), [250, 503])
        self.assertEqual(sent(effects, core.SendMta), [b"NOOP\r\n"])


# -- hypothesis: any cut, any order ------------------------------------------------------


class ChunkWorld(World):
    """L{World} with an MTA that may offer CHUNKING; it also keeps what each spool file received."""

    def __init__(self, chunking: bool) -> None:
        super().__init__()
        self.chunking = chunking
        if chunking:
            self.extensions = (b"PIPELINING", b"CHUNKING")
        self.spools: list[bytes] = []
        self._spool: bytearray | None = None
        self._spoolClosed = False

    def handle(self, e: core.Effect) -> list[core.Effect]:
        if isinstance(e, core.SpoolOpen):
            assert self._spool is None
            self._spool, self._spoolClosed = bytearray(), False
        elif isinstance(e, core.SpoolWrite):
            assert self._spool is not None
            self._spool += e.data
        elif isinstance(e, core.SpoolClose):
            assert self._spool is not None
            self.spools.append(bytes(self._spool))
            self._spoolClosed = True
        elif isinstance(e, core.SpoolRemove):
            if self._spool is not None and not self._spoolClosed:
                self.spools.append(b"(removed) " + bytes(self._spool))
            self._spool = None
        return super().handle(e)

    def released(self, e: core.Release) -> bytes:
        return b"<message %r %r>" % (e.chunked, e.spooled)


def bdat(content: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n%s" % (len(content), b" LAST" if last else b"", content)


STREAM = (
    b"EHLO c.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
    + bdat(b"Subject: x\r\n\r\n.\r\nline\r")
    + b"NOOP\r\n"
    + bdat(b"\n..\r\nRSET\r\nBDAT 3\r\nQUIT\r\n")
    + bdat(b"", last=True)
    + b"MAIL FROM:<d@x>\r\nRCPT TO:<e@y>\r\n"
    + bdat(b"abcde")
    + b"RSET\r\n"
    + bdat(b"DATA\r\n", last=True)
    + b"MAIL FROM:<f@x>\r\nRCPT TO:<g@y>\r\n"
    + bdat(b"e:nd\r\n", last=True)
    + b"MAIL FROM:<h@x>\r\nRCPT TO:<i@y>\r\nDATA\r\nb:ody\r\n.\r\nQUIT\r\n"
)


class ChunkOrderTests(SynchronousTestCase):
    def replay(self, chunking: bool, cuts: list[int], choices: list[int]) -> tuple[Any, ...]:
        w = ChunkWorld(chunking)
        replies = w.replay(STREAM, cuts, choices)
        return bytes(w.mtaReceived), replies, w.spools

    def test_reference(self) -> None:
        """
        The stream's messages: two chunks and an empty LAST, spooled as sent (a CRLF cut
        between chunks included); one removed by RSET; a BDAT after it refused with its
        bytes discarded; a one-chunk message; then a DATA message. Released with BDAT to
        an MTA with CHUNKING and with DATA to one without.
        """
        for chunking in (False, True):
            mta, replies, spools = self.replay(chunking, [], [])
            self.assertEqual(
                replies,
                [220, 250, 250, 250, 250, 250, 250, 250, 250, 250, 250, 250, 503,
                 250, 250, 250, 250, 250, 354, 250, 221],
            )  # fmt: skip
            first = b"Subject: x\r\n\r\n.\r\nline\r\n..\r\nRSET\r\nBDAT 3\r\nQUIT\r\n"
            self.assertEqual(spools, [first, b"(removed) abcde", b"e:nd\r\n", b"b:ody\r\n"])
            self.assertNotIn(b"BDAT", mta)
            self.assertEqual(mta.count(b"<message False"), 1 if chunking else 3)
            if chunking:
                self.assertIn(b"<message True %d>" % len(first), mta)

    @settings(max_examples=150, deadline=None)
    @given(
        st.booleans(),
        st.lists(st.integers(0, 400), max_size=12),
        st.lists(st.integers(0, 50), max_size=80),
    )
    def test_anyOrder(self, chunking: bool, cuts: list[int], choices: list[int]) -> None:
        """
        Wherever the client's bytes are cut (inside BDAT lines, inside chunks, between
        them) and in whatever order MTA replies, verdicts and client bytes arrive, each
        spool gets exactly the chunks' bytes, the client the same replies, and the MTA
        the same commands.
        """
        self.assertEqual(self.replay(chunking, cuts, choices), self.replay(chunking, [], []))
