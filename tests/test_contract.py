"""
The promises the session core keeps against real peers and hostile ones, in memory:
client, proxy and an MTA (the stand-in, or a scripted hostile one) joined by iosim.

Each test asserts what a postmaster would check: the replies the client saw, the bytes
the MTA received, the spool directory afterwards.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import relay, wire
from mailproxy.filters import (
    Action,
    EditKind,
    HeaderEdit,
    IFilter,
    InvalidVerdictError,
    Stage,
    Verdict,
)
from mailproxy.filters.access import AccessFilterFactory
from mailproxy.filters.size import SizeFilter
from mailproxy.spool import RELEASE_CHUNK
from mailproxy.testing import (
    FakeFilter,
    MemoryEndpoint,
    ScriptedMTA,
    pipelineOf,
)
from tests.test_relay import MESSAGE, STUFFED, Harness, envelope

#: How a lenient MTA finds the end of data (any line ending around the dot).
LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def scripted(
    case: SynchronousTestCase, *filters: IFilter, mta: ScriptedMTA | None = None, **limits: int
) -> Harness:
    """A L{Harness} in front of a hostile L{ScriptedMTA}."""
    return Harness(case, *filters, mta=mta or ScriptedMTA(), limits=limits)


def refusingMessages(text: str = "Refused by policy") -> FakeFilter:
    return FakeFilter(name="policy", verdicts={Stage.MESSAGE: lambda: Verdict.reject(text)})


class VerdictTests(SynchronousTestCase):
    def test_constructorsOnly(self) -> None:
        """
        A verdict whose code contradicts its action cannot be made: a reject with the
        default (no) code, an accept with a code, a tempfail with a 5xx.
        """
        for bad in (
            lambda: Verdict(Action.REJECT, text="no"),
            lambda: Verdict(Action.ACCEPT, 250, "2.0.0"),
            lambda: Verdict.tempfail("later", 550, "5.7.1"),
            lambda: Verdict.reject("no", 550, "4.7.1"),
            lambda: Verdict.reject("no", 250, "2.0.0"),
            lambda: Verdict.reject(""),
        ):
            self.assertRaises(InvalidVerdictError, bad)
        self.assertEqual(Verdict.reject("no").code, 550)

    def test_headerEditsChecked(self) -> None:
        """
        A header edit that could break the header block cannot be made: a name with a
        colon, a space or a line break (as an edit or an added header), a value with CR, LF or NUL, a removal with a value, an addition
        without one; and a refusal changes no header.
        """
        for bad in (
            lambda: HeaderEdit.add("X-Spam:", "yes"),
            lambda: HeaderEdit.add("X Spam", "yes"),
            lambda: HeaderEdit.add("X-Spam", "yes\r\nBcc: victim@example.org"),
            lambda: HeaderEdit.replace("Subject", "a\nb"),
            lambda: HeaderEdit.add("X-Spam", "\0"),
            lambda: HeaderEdit(EditKind.REMOVE, "X-Spam", "yes"),
            lambda: HeaderEdit(EditKind.ADD, "X-Spam"),
            lambda: HeaderEdit(EditKind.ADD, "X-Spam", "yes", matching=re.compile("y")),
            lambda: Verdict(Action.REJECT, 550, "5.7.1", "no", edits=(HeaderEdit.remove("X"),)),
            lambda: Verdict(Action.TEMPFAIL, 451, "4.7.1", "later", headers=(("X", "y"),)),
            lambda: Verdict.accept(headers=(("X\r\nBcc", "victim@example.org"),)),
            lambda: Verdict.accept(headers=(("X-Spam:", "yes"),)),
        ):
            self.assertRaises(InvalidVerdictError, bad)
        edit = HeaderEdit.remove("X-Spam", -1, re.compile("yes"))
        self.assertEqual(Verdict.accept(edits=(edit,)).edits, (edit,))

    def test_invalidVerdictNeverAccepts(self) -> None:
        """
        A filter that builds an invalid verdict (a reject with no code, which once gave
        the client "250 2.0.0 no") is a bug: the client gets 451 4.3.0, the MTA an RSET
        and never the message, and the traceback is logged.
        """
        lying = FakeFilter(verdicts={Stage.MESSAGE: lambda: Verdict(Action.REJECT, text="no")})
        h = Harness(self, lying)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.replies[-1].code, 451)
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.3.0")
        self.assertNotIn(250, client.codes[5:])
        self.assertEqual(h.mta.messages, [])
        self.assertTrue(bytes(h.mta.transcripts[0]).endswith(b"RSET\r\n"))
        self.assertEqual(len(self.flushLoggedErrors(InvalidVerdictError)), 1)


class ReplyClassTests(SynchronousTestCase):
    """An MTA reply of the wrong class, or unasked, is never relayed."""

    def test_dataAnswered250(self) -> None:
        """An MTA answering DATA with 250: 451 4.3.0 to the client, the MTA leg aborted."""
        mta = ScriptedMTA()
        mta.answer = lambda line: b"250 2.0.0 sure\r\n" if line == b"DATA" else None
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 451])
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.3.0")
        self.assertFalse(client.connected)
        self.assertEqual(mta.lost, 1)
        self.assertEqual(mta.messages, [])
        self.assertNotIn(b"Hello, world", bytes(mta.received))

    def test_answerBeforeTheDot(self) -> None:
        """
        An MTA that answers the message before it has been sent (a 250 right after its
        354): the client gets 451 4.3.0, never that 250, and the MTA leg is aborted.
        """
        mta = ScriptedMTA()
        mta.answer = lambda line: b"354 go\r\n250 2.0.0 early\r\n" if line == b"DATA" else None
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 451])
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.3.0")
        self.assertFalse(client.connected)
        self.assertEqual(mta.lost, 1)

    def test_rcptAnswered354(self) -> None:
        """A 3xx to RCPT: 451 4.3.0 in its place, nothing after it relayed."""
        mta = ScriptedMTA()
        mta.answer = lambda line: b"354 what\r\n" if line.startswith(b"RCPT") else None
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 451])
        self.assertFalse(client.connected)
        self.assertNotIn(b"DATA", bytes(mta.received))

    def test_unaskedReply(self) -> None:
        """A reply nobody asked for: 451 4.3.0 to the client, which is closed; the MTA leg aborted."""
        mta = ScriptedMTA()
        mta.answer = lambda line: (
            b"250 2.0.0 ok\r\n250 2.0.0 and more\r\n" if line == b"NOOP" else None
        )
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, b"NOOP\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 451])
        self.assertFalse(client.connected)
        self.assertEqual(mta.lost, 1)

    def test_unasked421(self) -> None:
        """An MTA that says 421 on its own is leaving: the client gets our 421 4.4.2."""
        mta = ScriptedMTA()
        mta.answer = lambda line: (
            b"250 ok\r\n421 4.4.2 mta.test timeout\r\n" if line == b"NOOP" else None
        )
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, b"NOOP\r\n")
        self.assertEqual(client.codes[-1], 421)
        self.assertIn(b"proxy.test", client.replies[-1].lines[0])


class PeerTests(SynchronousTestCase):
    """What real peers do: half-close, no PIPELINING, junk-command limits, PRDR."""

    def test_halfClose(self) -> None:
        """
        A client that writes the final dot and QUIT, then shuts down its side (Exim) gets
        the MTA's 250 and 221, and its message is delivered.
        """
        checking: Deferred[Verdict] = Deferred()
        h = Harness(self, FakeFilter(verdicts={Stage.MESSAGE: lambda: checking}))
        client, proxy = h.memory.connect()
        h.send(client, b"EHLO exim.example\r\n" + envelope() + b"DATA\r\n")
        h.send(client, STUFFED + b"QUIT\r\n")
        proxy.readConnectionLost()  # while the filters still read the message
        h.memory.flush()
        self.assertTrue(client.connected)
        checking.callback(Verdict.accept())
        h.memory.flush()
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual([m.content for m in h.mta.messages], [MESSAGE])
        self.assertFalse(client.connected)

    def test_halfCloseMidMessage(self) -> None:
        """A client that shuts down before its final dot: nothing delivered, no spool left."""
        h = Harness(self)
        client, proxy = h.memory.connect()
        h.send(client, b"EHLO c\r\n" + envelope() + b"DATA\r\nSubject: cut\r\n")
        proxy.readConnectionLost()
        h.memory.flush()
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        self.assertFalse(client.connected)

    def test_refusedHeloKeepsTheTransaction(self) -> None:
        """
        An EHLO a filter refuses never reaches the MTA, so the transaction it would have
        reset goes on, here as at the MTA: the message after it is delivered.
        """
        answers = iter([Verdict.accept(), Verdict.reject("Not that name")])
        h = Harness(self, FakeFilter(verdicts={Stage.HELO: lambda: next(answers)}))
        client = h.greeted()
        h.send(client, envelope() + b"EHLO bad.example\r\nDATA\r\n" + STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 550, 354, 250])
        self.assertEqual([m.content for m in h.mta.messages], [MESSAGE])

    def test_spoolNotCreatedKeepsTheTransaction(self) -> None:
        """
        A spool file that cannot be created answers DATA with 452 4.3.1; the transaction
        stays open, at the MTA as here, so the client's next DATA goes through.
        """
        h = Harness(self)
        real = relay.Spool
        failures = [OSError(28, "No space left on device")]

        def spool(directory: str, maxSize: int) -> relay.Spool:
            if failures:
                raise failures.pop()
            return real(directory, maxSize)

        self.patch(relay, "Spool", spool)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        self.assertEqual(client.codes[-1], 452)
        self.assertEqual(client.replies[-1].lines[0][:5], b"4.3.1")
        h.send(client, b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-2:], [354, 250])
        self.assertEqual([m.content for m in h.mta.messages], [MESSAGE])
        self.assertEqual(h.spooled(), [])

    def test_noPipeliningMta(self) -> None:
        """
        With an MTA that did not offer PIPELINING (OpenSMTPD), commands reach it one at a
        time even when the client pipelines them, our RSET after a refusal included.
        """
        mta = ScriptedMTA(extensions=[b"ENHANCEDSTATUSCODES"])
        answers = iter([Verdict.reject("No"), Verdict.accept()])
        h = scripted(self, FakeFilter(verdicts={Stage.MESSAGE: lambda: next(answers)}), mta=mta)
        client = h.greeted()
        h.send(client, envelope(b"a@x", b"b@y", b"c@y") + b"DATA\r\n")
        h.send(client, STUFFED + envelope() + b"DATA\r\n")
        h.send(client, STUFFED)
        self.assertEqual(client.codes, [220, 250, 250, 250, 250, 354, 550, 250, 250, 354, 250])
        self.assertEqual(mta.collisions, [])
        self.assertEqual(mta.messages, [MESSAGE])
        self.assertIn(b"RSET\r\nMAIL FROM:<a@example.org>\r\n", bytes(mta.received))

    def test_junkLimitReconnects(self) -> None:
        """
        Past mta_junk_commands, a refusal is followed by a fresh MTA connection (banner,
        the client's EHLO again) instead of one more RSET; the session goes on.
        """
        policy = refusingMessages()
        h = scripted(self, policy, mtaJunkCommands=3)
        client = h.greeted()
        for _ in range(8):  # RSET three times, reconnect, three RSETs, reconnect
            h.send(client, envelope() + b"DATA\r\n")
            h.send(client, STUFFED)
        self.assertEqual(client.codes.count(550), 8)
        self.assertTrue(client.connected)
        self.assertEqual(h.mta.connections, 3)
        for leg in bytes(h.mta.received).split(b"EHLO client.example\r\n")[1:]:
            self.assertLessEqual(len(re.findall(rb"^(?:RSET|NOOP)\r$", leg, re.M)), 3)
        policy.verdicts[Stage.MESSAGE] = Verdict.accept()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(h.mta.messages, [MESSAGE])

    def test_keepalivesBounded(self) -> None:
        """
        A long upload gets NOOP keepalives every mta_keepalive seconds, but no more than
        mta_junk_commands less one (kept for an RSET), whatever its length.
        """
        h = Harness(
            self, timeouts={"mtaKeepalive": 1.0, "clientIdle": 100.0}, limits={"mtaJunkCommands": 4}
        )
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\nSubject: long\r\n\r\n")
        for _ in range(20):
            h.clock.advance(1)
            h.memory.flush()
            h.send(client, b"line\r\n")
        h.send(client, b".\r\n")
        self.assertEqual(bytes(h.mta.transcripts[0]).count(b"NOOP\r\n"), 3)
        self.assertEqual(client.codes[-1], 250)

    def test_unimplementedExtensionsRemoved(self) -> None:
        """
        EHLO passes only the extensions mailproxy implements: PRDR, PIPECONNECT, AUTH and
        unknown ones are removed, and their MAIL parameters refused with 555; CHUNKING is
        ours.
        """
        h = Harness(self)
        h.mta.extensions.update(
            {
                b"PRDR": [],
                b"PIPECONNECT": [],
                b"CHUNKING": [],
                b"AUTH": [b"PLAIN"],
                b"XNEW": [],
                b"DSN": [],
            }
        )
        client = h.greeted()
        keywords = {line.split(b" ")[0] for line in client.replies[1].lines[1:]}
        self.assertEqual(
            keywords,
            {b"PIPELINING", b"8BITMIME", b"SIZE", b"ENHANCEDSTATUSCODES", b"DSN", b"CHUNKING"},
        )
        h.send(
            client,
            b"MAIL FROM:<a@x> PRDR\r\nMAIL FROM:<a@x> AUTH=<>\r\nMAIL FROM:<a@x> RET=HDRS\r\n",
        )
        self.assertEqual(client.codes[2:], [555, 555, 250])
        self.assertNotIn(b"PRDR", bytes(h.mta.transcripts[0]))

    def test_sizeIsTheSmallestLimit(self) -> None:
        """EHLO's SIZE is the smallest of the MTA's, message_size and the size filter's."""
        h = Harness(self, SizeFilter(25_000_000), limits={"messageSize": 50_000_000})
        client = h.greeted()
        self.assertIn(b"SIZE 25000000", client.replies[1].lines)

    def test_enhancedCodesOnlyWhenOffered(self) -> None:
        """Our own replies carry enhanced codes only when the MTA offers ENHANCEDSTATUSCODES."""
        h = Harness(self)
        del h.mta.extensions[b"ENHANCEDSTATUSCODES"]
        client = h.greeted()
        h.send(client, b"DATA\r\nXYZZY\r\n")
        self.assertEqual(client.replies[-2].lines, (b"Error: need MAIL command",))
        self.assertEqual(client.replies[-1].lines, (b"Error: command not recognized",))

    def test_settingsTakenAtAccept(self) -> None:
        """
        A reload while a session's connect filters decide does not move it: it still
        reaches the MTA it was accepted under, and new sessions reach the new one.
        """
        held: Deferred[Verdict] = Deferred()
        h = Harness(self, FakeFilter(verdicts={Stage.CONNECT: lambda: held}))
        client, _ = h.memory.connect()
        other = ScriptedMTA()
        otherEndpoint = MemoryEndpoint(other.buildFactory(), h.clock)
        old = h.memory.factory.settings
        h.memory.factory.settings = relay.Settings(
            old.config, pipelineOf([], h.clock), upstream=otherEndpoint
        )
        held.callback(Verdict.accept())
        h.memory.flush()
        self.assertEqual(client.codes, [220])
        self.assertEqual(len(h.mta.transcripts), 1)
        self.assertEqual(other.connections, 0)


class SmugglingTests(SynchronousTestCase):
    def test_leniently(self) -> None:
        """
        Read as a lenient MTA reads it (an end of data at any line ending around the dot),
        the MTA's transcript of each released message has its end at the real one only, in
        both bare_line_endings modes, for every smuggling sequence.
        """
        from mailproxy.config import BareLineEndings

        for mode in BareLineEndings:
            for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n"):
                h = Harness(self, bareLineEndings=mode)
                client = h.greeted()
                h.send(client, envelope() + b"DATA\r\n")
                h.send(
                    client, b"Subject: real\r\n\r\nhi" + fake + b"MAIL FROM:<evil@x>\r\n\r\n.\r\n"
                )
                transcript = bytes(h.mta.transcripts[0])
                if b"DATA\r\n" not in transcript:
                    self.assertEqual(client.codes[-1], 554, (mode, fake))
                    continue
                data = transcript.split(b"DATA\r\n", 1)[1]
                first = LENIENT_END.search(b"\r\n" + data)
                assert first is not None
                self.assertEqual(data[first.end() - 2 :], b"", (mode, fake, data))


#: Verbs mailproxy knows, and stray bytes around them.
VERBS = [b"MAIL FROM:<denied@evil.example>", b"RCPT TO:<v@example.net>", b"EHLO x.example",
         b"HELO x.example", b"DATA", b"RSET", b"QUIT", b"NOOP", b"VRFY a", b"HELP",
         b"XCLIENT ADDR=192.0.2.1", b"XFORWARD ADDR=192.0.2.1", b"BDAT 3 LAST", b"STARTTLS"]  # fmt: skip
SEPARATORS = [b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\x00", b"\r", b" \t", b"\xa0", b""]


def lenientParse(line: bytes) -> tuple[bytes, bytes]:
    """How Postfix reads a command: split at the first whitespace (SP, TAB, VT, FF, CR), any case."""
    parts = re.split(rb"[ \t\x0b\x0c\r]+", line.strip(b" \t\x0b\x0c\r"), maxsplit=1)
    return parts[0].upper(), parts[1] if len(parts) > 1 else b""


class GrammarTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(VERBS),
        st.sampled_from(SEPARATORS),
        st.sampled_from([str.lower, str.upper, str.title, lambda s: s]),
        st.sampled_from([b"", b" ", b"\t", b"\x00", b"\r"]),
    )
    def test_mtaHearsOnlyWhatWasParsed(
        self, command: bytes, sep: bytes, case: object, tail: bytes
    ) -> None:
        """
        However a command is written (any separator byte, case, stray byte), the MTA
        receives nothing, or a line that is exactly the command as mailproxy parsed it:
        the same verb and arguments a lenient MTA reads in the client's line, one SP.
        """
        verb, _, argument = command.partition(b" ")
        verb = case(verb.decode()).encode()  # type: ignore[operator]
        line = verb + (sep + argument if argument else b"") + tail
        h = Harness(
            self, AccessFilterFactory().build({"deny_senders": ["denied@evil.example"]}, Clock())
        )
        client = h.greeted()
        before = len(h.mta.transcripts[0])
        h.send(client, b"MAIL FROM:<ok@example.org>\r\n" if b"RCPT" in verb.upper() else b"")
        before = len(h.mta.transcripts[0])
        h.send(client, line + b"\r\n")
        relayed = bytes(h.mta.transcripts[0])[before:]
        if not relayed:
            return
        self.assertTrue(relayed.endswith(b"\r\n"), relayed)
        sent = relayed[:-2]
        self.assertNotIn(b"\r\n", sent)
        self.assertEqual(lenientParse(sent), lenientParse(line), (line, sent))
        self.assertIsNone(re.search(rb"[\x00-\x1f\x7f]", sent))
        self.assertNotIn(b"denied@evil.example", sent)
        self.assertNotIn(lenientParse(sent)[0], (b"XCLIENT", b"XFORWARD", b"BDAT", b"STARTTLS"))


class QueueIdTests(SynchronousTestCase):
    def test_formats(self) -> None:
        """Queue ids are found in Postfix's, Exim's, OpenSMTPD's and Sendmail's replies."""
        for line, expected in [
            (b"2.0.0 Ok: queued as 4XyZ1b2C3dz", "4XyZ1b2C3dz"),
            (b"OK id=1rABCd-000123-4X", "1rABCd-000123-4X"),
            (b"2.0.0 0f9f4ae5 Message accepted for delivery", "0f9f4ae5"),
            (b"2.0.0 4B1Hx0aB012345 Message accepted for delivery", "4B1Hx0aB012345"),
            (b"Ok", None),
        ]:
            self.assertEqual(wire.queueId(wire.Reply(250, (line,))), expected, line)


def chunked(*chunks: bytes) -> bytes:
    """A message in BDAT chunks, the last one LAST."""
    out = [b"BDAT %d\r\n%s" % (len(c), c) for c in chunks[:-1]]
    return b"".join(out) + b"BDAT %d LAST\r\n%s" % (len(chunks[-1]), chunks[-1])


#: Chunks that an MTA reading DATA could end early, were they not dot-stuffed.
TRICKY = (
    b"Subject: chunks\r\n\r\nfirst\r\n.\r\n",
    b"MAIL FROM:<evil@x>\r\n..\r\n",
    b".\r\nend\r\n",
)
CHUNKING = (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING")


class ChunkingTests(SynchronousTestCase):
    """BDAT from clients, released to MTAs with and without CHUNKING, hostile ones too."""

    def test_dataForMtaWithoutChunking(self) -> None:
        """
        An MTA without CHUNKING gets the message after DATA, dot-stuffed: chunks holding
        CRLF.CRLF and CRLF..CRLF arrive unchanged once unstuffed, and a lenient reader
        finds the end of data only at the real one.
        """
        h = scripted(self)
        client = h.greeted()
        h.send(client, envelope() + chunked(*TRICKY))
        self.assertEqual(client.codes, [220, 250, 250, 250, 250, 250, 250])
        self.assertIn(b"SCRIPTED1", client.replies[-1].lines[0])
        self.assertEqual(h.mta.messages, [b"".join(TRICKY)])
        transcript = bytes(h.mta.received)
        self.assertNotIn(b"BDAT", transcript)
        data = transcript.split(b"DATA\r\n", 1)[1]
        first = LENIENT_END.search(b"\r\n" + data)
        assert first is not None
        self.assertEqual(data[first.end() - 2 :], b"")

    def test_oneBdatForChunkingMta(self) -> None:
        """
        An MTA with CHUNKING gets one BDAT n LAST, n the number of bytes after it: the
        filters' headers and the chunks' bytes, as sent; nothing else follows.
        """
        tagging = FakeFilter(
            verdicts={Stage.MESSAGE: lambda: Verdict.accept(headers=(("X-Tag", "yes"),))}
        )
        h = scripted(self, tagging, mta=ScriptedMTA(CHUNKING))
        client = h.greeted()
        h.send(client, envelope() + chunked(*TRICKY))
        self.assertEqual(client.codes, [220, 250, 250, 250, 250, 250, 250])
        self.assertIn(b"SCRIPTED1", client.replies[-1].lines[0])
        transcript = bytes(h.mta.received)
        self.assertEqual(transcript.count(b"BDAT"), 1)
        self.assertNotIn(b"DATA", transcript)
        match = re.search(rb"BDAT ([0-9]+) LAST\r\n", transcript)
        assert match is not None
        message = transcript[match.end() :]
        self.assertEqual(len(message), int(match.group(1)))
        self.assertEqual(message, b"X-Tag: yes\r\n" + b"".join(TRICKY))
        self.assertEqual(h.mta.messages, [message])

    def test_earlyAnswerNotRelayed(self) -> None:
        """
        An MTA that answers BDAT LAST before the message has been sent (it is longer than
        one write of the release): the client gets 451 4.3.0, never that 250, and the MTA
        leg is aborted.
        """
        mta = ScriptedMTA(CHUNKING)
        mta.answer = lambda line: (
            b"250 2.0.0 Ok: queued as EARLY\r\n" if line.startswith(b"BDAT") else None
        )
        h = scripted(self, mta=mta)
        client = h.greeted()
        h.send(client, envelope() + chunked(b"Subject: big\r\n\r\n" + b"x" * (3 * RELEASE_CHUNK) + b"\r\n"))
        self.assertEqual(client.codes, [220, 250, 250, 250, 451])
        self.assertNotIn(b"EARLY", bytes(client.received))
        self.assertFalse(client.connected)
        self.assertEqual(mta.lost, 1)
        self.assertEqual(h.spooled(), [])

    def test_refusedNeverReachesMta(self) -> None:
        """A message in chunks that a filter refuses: 550, the MTA gets RSET, never the content."""
        h = scripted(self, refusingMessages(), mta=ScriptedMTA(CHUNKING))
        client = h.greeted()
        h.send(client, envelope() + chunked(*TRICKY))
        self.assertEqual(client.codes[-1], 550)
        self.assertNotIn(b"first", bytes(h.mta.received))
        self.assertTrue(bytes(h.mta.received).endswith(b"RSET\r\n"))
        self.assertEqual(h.spooled(), [])
