"""
Header edits on release (issue 11): the pure editing of a header block
(L{mailproxy.headeredit}), by hypothesis; the release that applies them, over real
loopback sockets to the stand-in MTA, after DATA and with BDAT; and the headers filter's
one Authentication-Results, forged ones removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy import headeredit, headergrammar
from mailproxy import session as core
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, EditKind, HeaderEdit, IFilter, Stage, Verdict
from mailproxy.filters.headers import HeadersFilterFactory, authservId, claiming
from mailproxy.testing import FakeFilter, RawClient, pipelineOf
from mailproxy.wire import Reply
from tests.fakes import ProxyTestCase
from tests.test_chunking import CHUNKING, PLAIN, inTransaction
from tests.test_headers import Results

# -- the pure editing ---------------------------------------------------------------------

NAMES = ["Subject", "SUBJECT", "X-Spam", "x-spam", "Received", "Authentication-Results", ".Dot"]
_PIECES = [b"a", b"B", b" ", b"\t", b";", b".", b"(", b")", b'"', b"\xc3\xa9", b"\xff", b"\x7f"]
_PIECES += [b"mx.example.org", b"MX.Example.Org", b"w" * 90]


@st.composite
def fieldBytes(draw: st.DrawFn) -> bytes:
    """A field as a client may send it: its first line, and continuation lines."""
    name = draw(st.sampled_from(NAMES)).encode()
    first = b"".join(draw(st.lists(st.sampled_from(_PIECES), max_size=8)))
    continued = [
        draw(st.sampled_from([b" ", b"\t", b"  "]))
        + draw(st.sampled_from([b"a", b"(", b".", b"\xff", b"mx.example.org;"]))
        + b"".join(draw(st.lists(st.sampled_from(_PIECES), max_size=4)))
        for _ in range(draw(st.integers(0, 2)))
    ]
    return b"\r\n".join([name + b":" + first, *continued]) + b"\r\n"


blocks = st.lists(fieldBytes(), max_size=8).map(b"".join)
#: Bodies that dot-stuffing and end-of-data care about: dot lines, a CRLF.CRLF, no final CRLF.
bodies = st.lists(
    st.sampled_from([b".", b"..", b"\r\n", b".\r\n", b"\r\n.\r\n", b"Subject: no\r\n", b"x", b"\xff"]),
    max_size=8,
).map(b"".join)
values = st.lists(
    st.sampled_from(["a", "b;", " ", "\t", "mx.example.org;", "é", "\udcff", "x" * 90, "."]),
    max_size=20,
).map("".join)
_PATTERNS = [re.compile("a"), re.compile("^$"), claiming("mx.example.org")]
edits = st.lists(
    st.one_of(
        st.builds(HeaderEdit.add, st.sampled_from(NAMES), values),
        st.builds(
            HeaderEdit.remove,
            st.sampled_from(NAMES),
            st.integers(-3, 3),
            st.one_of(st.none(), st.sampled_from(_PATTERNS)),
        ),
        st.builds(HeaderEdit.replace, st.sampled_from(NAMES), values, st.integers(-3, 3)),
    ),
    max_size=6,
)


def written(value: str) -> str:
    """A value we write, as the filters read it back (L{headergrammar.fields})."""
    return value.strip(" \t").encode("utf-8", "surrogateescape").decode("ascii", "surrogateescape")


def picked(fields: Sequence[tuple[str, str]], edit: HeaderEdit) -> list[int]:
    """The client's fields an edit picks, counted another way than the code does."""
    named = [
        index
        for index, (name, value) in enumerate(fields)
        if name.lower() == edit.name.lower()
        and (
            edit.matching is None
            or (
                edit.matching.search(value) is not None
                if isinstance(edit.matching, re.Pattern)
                else edit.matching(value)
            )
        )
    ]
    if edit.occurrence == 0:
        return named
    if edit.occurrence > 0:
        return [index for n, index in enumerate(named, 1) if n == edit.occurrence]
    return [index for n, index in enumerate(reversed(named), 1) if n == -edit.occurrence]


def model(
    fields: Sequence[tuple[str, str]], edits: Sequence[HeaderEdit]
) -> tuple[list[tuple[str, str]], set[int]]:
    """What the released fields read as, and which of the client's fields edits touched."""
    top: list[tuple[str, str]] = []
    now: list[tuple[str, str] | None] = list(fields)
    touched: set[int] = set()
    for edit in edits:
        if edit.kind is EditKind.ADD:
            assert edit.value is not None
            top.append((edit.name, written(edit.value)))
            continue
        chosen = picked(fields, edit)
        touched.update(chosen)
        if edit.kind is EditKind.REPLACE:
            assert edit.value is not None
            new = (edit.name, written(edit.value))
            if not chosen:
                top.append(new)
            for index in chosen:
                now[index] = new
        else:
            for index in chosen:
                now[index] = None
    return top + [f for f in now if f is not None], touched


def lineLengthsOk(field: bytes) -> bool:
    """Every line within 78 columns, or one word that cannot be folded."""
    lines = field.removesuffix(b"\r\n").split(b"\r\n")
    for number, line in enumerate(lines):
        words = line.split(b":", 1)[1].strip(b" \t") if number == 0 else line.strip(b" \t")
        if len(line) > headeredit.WIDTH and re.search(rb"[ \t]", words):
            return False
    return True


class HeaderEditTests(SynchronousTestCase):
    """The header block the release writes, from the client's and the filters' edits."""

    def test_addedFlattened(self) -> None:
        """
        The filters' added headers are CRLF lines; a CR or LF in a value cannot start a new
        field (a header injection), and a NUL is dropped.
        """
        self.assertEqual(
            headeredit.addedBytes(
                (("X-Spam-Status", "No, score=1.0"), ("X-Evil", "a\r\nBcc: x@y\n\tz\0"))
            ),
            b"X-Spam-Status: No, score=1.0\r\nX-Evil: a Bcc: x@y z\r\n",
        )

    @settings(max_examples=400, deadline=None)
    @given(blocks, bodies, edits, st.booleans())
    def test_anyEdits(
        self, block: bytes, body: bytes, edits: list[HeaderEdit], emptyLine: bool
    ) -> None:
        """
        For any header block and any edits: the body after the block is unchanged byte
        for byte; the result parses with the header grammar; removed fields are gone;
        replaced ones read as the new value, in their place; additions are on top in
        order; every field no edit chose keeps its bytes and its order.
        """
        content = block + b"\r\n" + body if emptyLine else block
        end = headeredit.headerEnd(content, complete=True)
        self.assertEqual(end, len(block))
        assert end is not None
        edited = headeredit.editBlock(content[:end], edits)
        released = edited + content[end:]
        # The body, byte for byte, right after the edited block.
        self.assertEqual(headeredit.headerEnd(released, complete=True), len(edited))
        self.assertEqual(released[len(edited) :], content[len(block) :])
        # The grammar reads the released header block, and finds what the model says.
        self.assertIsNone(headergrammar.check(edited))
        checker = headergrammar.HeaderChecker(normalise=False)
        checker.feed(released)
        checker.end()
        self.assertIsNone(checker.finding)
        client = headergrammar.fields(block)
        expected, touched = model(client, edits)
        self.assertEqual(headergrammar.fields(edited), expected)
        # Untouched fields: the same bytes, in the same order.
        raws = iter(f.raw for f in headeredit.splitFields(edited))
        kept = [f.raw for i, f in enumerate(headeredit.splitFields(block)) if i not in touched]
        self.assertTrue(all(raw in raws for raw in kept), (kept, edited))
        # A name all of whose client fields were removed, and that no edit writes: gone.
        writes = {e.name.lower() for e in edits if e.kind is not EditKind.REMOVE}
        for edit in edits:
            if edit.kind is EditKind.REMOVE and edit.occurrence == 0 and edit.matching is None:
                if edit.name.lower() not in writes:
                    names = [name.lower() for name, _ in headergrammar.fields(edited)]
                    self.assertNotIn(edit.name.lower(), names)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(NAMES), values)
    def test_folded(self, name: str, value: str) -> None:
        """
        A field we write parses with the header grammar, reads back as the value (its
        ends' whitespace aside), and is folded to 78 columns wherever it has whitespace.
        """
        field = headeredit.fieldBytes(name, value)
        self.assertIsNone(headergrammar.check(field))
        self.assertEqual(headergrammar.fields(field), [(name, written(value))])
        self.assertTrue(lineLengthsOk(field), field)

    def test_foldBetweenResults(self) -> None:
        """An Authentication-Results is folded after a ";", between results (RFC 8601 2.2)."""
        value = (
            "mx.example.org; spf=pass smtp.mailfrom=example.org; dkim=pass "
            "header.d=example.org header.s=sel header.b=AbCdEf12; dmarc=pass header.from=example.org"
        )
        self.assertEqual(
            headeredit.fieldBytes("Authentication-Results", value),
            b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org;\r\n"
            b" dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12;\r\n"
            b" dmarc=pass header.from=example.org\r\n",
        )

    def test_occurrences(self) -> None:
        """Occurrence 0, N from the top, -N from the bottom; beyond them, nothing."""
        block = b"X-A: 1\r\nx-a: 2\r\nSubject: s\r\nX-A: 3\r\n"

        def after(*edits: HeaderEdit) -> bytes:
            return headeredit.editBlock(block, edits)

        self.assertEqual(after(HeaderEdit.remove("X-A")), b"Subject: s\r\n")
        self.assertEqual(after(HeaderEdit.remove("X-A", 2)), b"X-A: 1\r\nSubject: s\r\nX-A: 3\r\n")
        self.assertEqual(after(HeaderEdit.remove("X-A", -1)), b"X-A: 1\r\nx-a: 2\r\nSubject: s\r\n")
        self.assertEqual(after(HeaderEdit.remove("X-A", 4), HeaderEdit.remove("X-A", -4)), block)
        self.assertEqual(
            after(HeaderEdit.remove("X-A", matching=re.compile("^[23]$")), HeaderEdit.remove("x-a", 1)),
            b"Subject: s\r\n",
        )
        self.assertEqual(
            after(HeaderEdit.replace("subject", "new"), HeaderEdit.replace("X-B", "b")),
            b"X-B: b\r\nX-A: 1\r\nx-a: 2\r\nsubject: new\r\nX-A: 3\r\n",
        )

    def test_notAHeaderBlock(self) -> None:
        """A block the grammar refuses is never edited (it cannot have come from the spool)."""
        with self.assertRaises(headeredit.HeaderBlockError):
            headeredit.editBlock(b"X : y\r\n", (HeaderEdit.remove("X"),))
        self.assertIsNone(headeredit.headerEnd(b"X: y\r\n", complete=False))


class ClaimingTests(SynchronousTestCase):
    def test_claims(self) -> None:
        """
        A value claims our authserv-id (any case, quoted or not) whatever comments come
        before it, nested as RFC 5322 nests them, with ";" or quotes inside; a value whose
        id is another, or that names ours only in its results, does not.
        """
        claims = claiming("mx.example")
        for value in [
            "mx.example; spf=pass",
            "MX.Example 1; dkim=pass",
            '"mx.example"; none',
            "(c) mx.example;",
            "((x)) mx.example; dkim=pass",
            '(a; "b" (c) \\) d) mx.example; arc=pass',
            "(" * 500 + ")" * 500 + " mx.example; none",
        ]:
            self.assertTrue(claims(value), value)
        for value in [
            "other.example; spf=pass smtp.mailfrom=mx.example",
            "mx.example.org; none",
            "(mx.example) other.example; none",
            "(unclosed mx.example; none",
        ]:
            self.assertFalse(claims(value), value)


# -- who carries the edits: the pipeline, the session ------------------------------------

REMOVE_A = HeaderEdit.remove("X-A")
ADD_B = HeaderEdit.add("X-B", "b")


class CarriedTests(SynchronousTestCase):
    """How a filter's edits reach the release: the pipeline, then the session's Release."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_pipelineGathers(self) -> None:
        """
        At the message stage, the accepting filters' edits are gathered in filter order,
        beside their headers; at an earlier stage they are ignored, and that is logged.
        """
        first = FakeFilter(
            name="first",
            verdicts={
                Stage.MESSAGE: Verdict.accept(headers=(("X-H", "1"),), edits=(REMOVE_A,)),
                Stage.RCPT: Verdict.accept(headers=(("X-R", "r"),), edits=(ADD_B,)),
            },
        )
        second = FakeFilter(name="second", verdicts={Stage.MESSAGE: Verdict.accept(edits=(ADD_B,))})
        pipeline = pipelineOf([first, second], Clock())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"X-A: a\r\n\r\n")
        session, envelope = Session("S1", "192.0.2.1", 25), Envelope("a@x")
        verdict = self.successResultOf(
            pipeline.checkMessage(session, envelope, Message(path, 10))
        )
        self.assertEqual(verdict, Verdict.accept(headers=(("X-H", "1"),), edits=(REMOVE_A, ADD_B)))
        verdict = self.successResultOf(pipeline.checkRcpt(session, envelope, "b@y"))
        self.assertEqual(verdict, Verdict.accept(headers=(("X-R", "r"),)))
        [logged] = [e for e in self.events if "header edits" in formatEvent(e)]
        self.assertEqual(logged["filter"], "first")

    def test_sessionReleases(self) -> None:
        """
        The message stage's edits ride in the Release with every stage's headers and the
        spooled size, after DATA and with BDAT (whose count the driver makes).
        """
        edits = (REMOVE_A, ADD_B)
        for mta, chunked in ((PLAIN, False), (CHUNKING, True)):
            s = inTransaction(mta)
            s.clientData(b"BDAT 8 LAST\r\nX-A: a\r\n")
            s.spoolOpened()
            s.spoolClosed()
            effects = s.verdict(Stage.MESSAGE, Verdict.accept(headers=(("X-H", "1"),), edits=edits))
            if not chunked:
                effects = s.mtaReply(Reply(354, (b"go",)))
            [release] = [e for e in effects if isinstance(e, core.Release)]
            self.assertEqual(release, core.Release((("X-H", "1"),), 8, edits=edits, chunked=chunked))


# -- the release, over loopback ----------------------------------------------------------

#: A message as a client sends it: trace fields, a folded subject, spam verdicts from
#: elsewhere; a body whose lines start with dots.
MESSAGE = (
    b"Received: from a by b; Tue, 1 Dec 2026 19:00:00 +0000\r\n"
    b"Subject: a subject\r\n folded\r\n"
    b"X-Spam: yes\r\n"
    b"To: <b@example.net>\r\n"
    b"x-spam: very\r\n"
    b"\r\n"
    b".first body line\r\n"
    b"..\r\n"
    b".\r\n"
    b"last line\r\n"
)
EDITS = (
    HeaderEdit.remove("X-Spam"),
    HeaderEdit.replace("Subject", "a new subject that is long enough to be folded at the release, " * 2),
    HeaderEdit.add(".Dotted", "a field whose line starts with a dot"),
    HeaderEdit.add("X-Added", "yes"),
)
EDITED = (
    b".Dotted: a field whose line starts with a dot\r\n"
    b"X-Added: yes\r\n"
    b"Received: from a by b; Tue, 1 Dec 2026 19:00:00 +0000\r\n"
    b"Subject: a new subject that is long enough to be folded at the release, a new\r\n"
    b" subject that is long enough to be folded at the release,\r\n"
    b"To: <b@example.net>\r\n"
)


def editing(*edits: HeaderEdit, headers: tuple[tuple[str, str], ...] = ()) -> FakeFilter:
    return FakeFilter(verdicts={Stage.MESSAGE: Verdict.accept(headers=headers, edits=edits)})


def bodyOf(message: bytes) -> bytes:
    return message[message.index(b"\r\n\r\n") + 2 :]


class Delivering(ProxyTestCase):
    """The stand-in MTA, with or without CHUNKING, and what it received."""

    async def deliver(self, port: int, message: bytes, bdat: bool = False) -> RawClient:
        """One transaction, sent with DATA (dot-stuffed) or one BDAT LAST; 250 expected."""
        client = await self.connect(port)
        await self.send(client, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n", 4)
        if bdat:
            client.send(b"BDAT %d LAST\r\n" % len(message) + message + b"QUIT\r\n")
        else:
            stuffed = message.replace(b"\r\n.", b"\r\n..")
            stuffed = b"." + stuffed if stuffed.startswith(b".") else stuffed
            client.send(b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n")
        await client.lost
        self.assertEqual(client.codes[-2:], [250, 221], client.replies)
        return client

    def chunking(self, offered: bool) -> None:
        """Whether the stand-in MTA offers CHUNKING (BDAT) from the next connection on."""
        if offered:
            self.mta.extensions[b"CHUNKING"] = []
        else:
            self.mta.extensions.pop(b"CHUNKING", None)

    def releasedWith(self) -> bytes:
        """How the (last) message went to the MTA: b"BDAT" or b"DATA"."""
        transcript = bytes(self.mta.transcripts[-1])
        return b"BDAT" if re.search(rb"\r\nBDAT \d+ LAST\r\n", transcript) else b"DATA"

    def assertBdatCount(self) -> None:
        """The BDAT count is exactly the bytes of the message the MTA stored."""
        transcript = bytes(self.mta.transcripts[-1])
        [count] = re.findall(rb"\r\nBDAT (\d+) LAST\r\n", transcript)
        self.assertEqual(int(count), len(self.mta.messages[-1].content))


class ReleaseTests(Delivering):
    """Edits applied while the spool streams to the stand-in MTA, after DATA and with BDAT."""

    def test_editsAfterData(self) -> defer.Deferred[None]:
        """
        A filter removes, replaces and adds fields: the MTA gets the client's header block
        edited (the replaced field in its place, folded; the added ones on top, below the
        filters' headers, a dot line stuffed), then the body byte for byte, dot lines and
        all, after DATA.
        """

        async def go() -> None:
            port = self.proxyWith(editing(*EDITS, headers=(("X-Header", "first"),)))
            await self.deliver(port, MESSAGE)
            self.assertEqual(self.releasedWith(), b"DATA")
            [received] = self.mta.messages
            self.assertEqual(received.content, b"X-Header: first\r\n" + EDITED + bodyOf(MESSAGE))
            transcript = bytes(self.mta.transcripts[0])
            self.assertIn(b"X-Header: first\r\n..Dotted: a field", transcript)
            self.assertIn(b"\r\n\r\n..first body line\r\n...\r\n..\r\nlast line\r\n.\r\n", transcript)

        return defer.Deferred.fromCoroutine(go())

    def test_editsWithBdat(self) -> defer.Deferred[None]:
        """
        The same, sent by the client in BDAT to an MTA offering CHUNKING: one BDAT LAST,
        its count that of the edited message, raw (no stuffing), byte for byte.
        """

        async def go() -> None:
            self.chunking(True)
            port = self.proxyWith(editing(*EDITS))
            await self.deliver(port, MESSAGE, bdat=True)
            self.assertEqual(self.releasedWith(), b"BDAT")
            [received] = self.mta.messages
            self.assertEqual(received.content, EDITED + bodyOf(MESSAGE))
            self.assertBdatCount()

        return defer.Deferred.fromCoroutine(go())

    def test_bdatToMtaWithoutChunking(self) -> defer.Deferred[None]:
        """Sent in BDAT to an MTA without CHUNKING: released after DATA, edited alike."""

        async def go() -> None:
            port = self.proxyWith(editing(*EDITS))
            await self.deliver(port, MESSAGE, bdat=True)
            self.assertEqual(self.releasedWith(), b"DATA")
            self.assertEqual(self.mta.messages[0].content, EDITED + bodyOf(MESSAGE))

        return defer.Deferred.fromCoroutine(go())

    def test_firstBodyLineDot(self) -> defer.Deferred[None]:
        """
        A message whose first body line is a lone dot, and whose header block edits
        empty: the dot is stuffed, never read as the end of data, DATA and BDAT alike.
        """

        async def go() -> None:
            message = b"X-Spam: yes\r\n\r\n.\r\nQUIT\r\n"
            for chunking in (False, True):
                self.chunking(chunking)
                port = self.proxyWith(editing(HeaderEdit.remove("X-Spam")))
                await self.deliver(port, message, bdat=chunking)
                self.assertEqual(self.mta.messages[-1].content, b"\r\n.\r\nQUIT\r\n")
            self.assertEqual(len(self.mta.messages), 2)

        return defer.Deferred.fromCoroutine(go())

    def test_noFinalCrlf(self) -> defer.Deferred[None]:
        """
        A message without a final CRLF (BDAT): to an MTA with CHUNKING exactly those
        bytes, edited; to one without, after DATA, with the CRLF end of data needs. Its
        only header field, without a CRLF, replaced, gets one.
        """

        async def go() -> None:
            message = b"Subject: x\r\nX-Spam: yes\r\n\r\nno end"
            for chunking, ending in ((True, b""), (False, b"\r\n")):
                self.chunking(chunking)
                port = self.proxyWith(editing(HeaderEdit.remove("X-Spam", -1)))
                await self.deliver(port, message, bdat=True)
                self.assertEqual(self.mta.messages[-1].content, b"Subject: x\r\n\r\nno end" + ending)
                if chunking:
                    self.assertBdatCount()
            self.chunking(True)
            port = self.proxyWith(editing(HeaderEdit.replace("Subject", "y")))
            await self.deliver(port, b"Subject: x", bdat=True)
            self.assertEqual(self.mta.messages[-1].content, b"Subject: y\r\n")
            self.assertBdatCount()

        return defer.Deferred.fromCoroutine(go())

    def test_bigBodyByteIdentical(self) -> defer.Deferred[None]:
        """
        A 1 MB body (long lines, dot lines, bytes of every value but NUL, CR and LF) arrives
        byte for byte after the edits, DATA and BDAT alike.
        """

        async def go() -> None:
            line = bytes(b for b in range(256) if b not in (0, 10, 13)) + b"\r\n"
            chunk = b".dot line\r\n" + line * 3 + b"\r\n.\r\n" + b"y" * 5000 + b"\r\n"
            body = chunk * (2**20 // len(chunk) + 1)
            message = b"X-Spam: yes\r\nSubject: big\r\n\r\n" + body
            for chunking in (False, True):
                self.chunking(chunking)
                port = self.proxyWith(editing(HeaderEdit.remove("X-Spam")), messageSize=2**22)
                await self.deliver(port, message, bdat=chunking)
                received = self.mta.messages[-1].content
                self.assertEqual(received, b"Subject: big\r\n\r\n" + body)
            self.assertBdatCount()

        return defer.Deferred.fromCoroutine(go())

    def test_headerBlockAtTheLimit(self) -> defer.Deferred[None]:
        """
        A header block of exactly the header grammar's limit (its empty line included):
        edits reach its last field, and the body follows it intact.
        """

        async def go() -> None:
            last = b"X-Spam: last\r\n"
            filler = b"X-Filler: " + b"f" * 60 + b"\r\n"
            count, rest = divmod(headergrammar.MAX_HEADER_BYTES - len(last) - 2, len(filler))
            pad = b"X-Pad: " + b"p" * (rest - len(b"X-Pad: \r\n")) + b"\r\n"
            block = filler * count + pad + last
            self.assertEqual(len(block) + 2, headergrammar.MAX_HEADER_BYTES)
            message = block + b"\r\nbody\r\n"
            for chunking in (False, True):
                self.chunking(chunking)
                port = self.proxyWith(editing(HeaderEdit.remove("X-Spam")), messageSize=2**20)
                await self.deliver(port, message, bdat=chunking)
                self.assertEqual(
                    self.mta.messages[-1].content, filler * count + pad + b"\r\nbody\r\n"
                )
            self.assertBdatCount()

        return defer.Deferred.fromCoroutine(go())

    def test_spoolNotEndingALine(self) -> defer.Deferred[None]:
        """
        Whatever the spool holds, end of data is CRLF.CRLF: a spool whose last line has
        lost its CRLF (a filter overwrote it, keeping the size) still ends at its end.
        """

        def overwrite(message: Message) -> None:
            with open(message.path, "r+b") as f:
                f.seek(-2, 2)
                f.write(b"!!")

        async def go() -> None:
            filter = Overwriting(overwrite, Verdict.accept(edits=(HeaderEdit.add("X-Added", "yes"),)))
            port = self.proxyWith(filter)
            await self.deliver(port, b"Subject: x\r\n\r\nend\r\n")
            self.assertEqual(self.mta.messages[0].content, b"X-Added: yes\r\nSubject: x\r\n\r\nend!!\r\n")

        return defer.Deferred.fromCoroutine(go())


    def test_spoolOfAnotherSize(self) -> defer.Deferred[None]:
        """
        A spool that is not the size the session counted (something wrote to it) is never
        sent: with BDAT that count would end the message early or late. The client gets
        421, the MTA no message.
        """

        def grow(message: Message) -> None:
            with open(message.path, "ab") as f:
                f.write(b"more\r\n")

        async def go() -> None:
            for chunking in (False, True):
                self.chunking(chunking)
                filter = Overwriting(grow, Verdict.accept(edits=(HeaderEdit.remove("X"),)))
                port = self.proxyWith(filter)
                client = await self.connect(port)
                await self.send(client, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n", 4)
                client.send(b"BDAT 14 LAST\r\nX: y\r\n\r\nbody\r\n")
                await client.lost
                self.assertEqual(client.codes[-1], 421)
            self.assertEqual(self.mta.messages, [])

        return defer.Deferred.fromCoroutine(go())


@implementer(IFilter)
@attrs.define
class Overwriting(BaseFilter):
    """A message filter that does something to the spooled message, then answers."""

    action: Callable[[Message], None]
    answer: Verdict
    name = "overwriting"
    stages = frozenset({Stage.MESSAGE})

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        self.action(message)
        return self.answer


# -- the one Authentication-Results --------------------------------------------------------


class ResultsTests(Delivering):
    """The headers filter and the release: exactly one Authentication-Results with our id."""

    FORGED = (
        b"Authentication-Results: MX.example.org; spf=pass smtp.mailfrom=paypal.example\r\n"
        b"Subject: pay\r\n"
        b"Authentication-Results: mx.sender.example; dkim=pass header.d=sender.example\r\n"
        b"Authentication-Results: (forged) mx.example.org;\r\n dkim=pass header.d=paypal.example\r\n"
        b"\r\n"
        b".body\r\n"
    )
    NOTED = (
        "dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12",
        "dmarc=pass header.from=example.org",
    )

    def test_forgedRemoved(self) -> defer.Deferred[None]:
        """
        A message arriving with Authentication-Results claiming our authserv-id (any
        case, after a comment, folded): the delivered copy has exactly one with our id,
        ours, on top, gathering the results noted, folded; the other host's stays in
        place; the body is intact. DATA and BDAT alike.
        """

        async def go() -> None:
            headers = HeadersFilterFactory().build({"authserv_id": "mx.example.org"}, reactor)
            for chunking in (False, True):
                self.chunking(chunking)
                port = self.proxyWith(Results(message=self.NOTED), headers)
                await self.deliver(port, self.FORGED, bdat=chunking)
                received = self.mta.messages[-1].content
                self.assertEqual(
                    received,
                    b"Authentication-Results: mx.example.org;\r\n"
                    b" dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12;\r\n"
                    b" dmarc=pass header.from=example.org\r\n"
                    b"Subject: pay\r\n"
                    b"Authentication-Results: mx.sender.example; dkim=pass header.d=sender.example\r\n"
                    b"\r\n"
                    b".body\r\n",
                )
                ours = [
                    v for n, v in headergrammar.fields(received.split(b"\r\n\r\n")[0])
                    if n.lower() == "authentication-results" and authservId(v) == "mx.example.org"
                ]  # fmt: skip
                self.assertEqual(len(ours), 1)
            self.assertEqual(len(self.logged("(removed on release)")), 2)

        return defer.Deferred.fromCoroutine(go())

    def test_startedFromConfiguration(self) -> defer.Deferred[None]:
        """
        [filters.headers] in the configuration file, as twistd builds it, with no
        forged_results: the forged field is removed (the default), ours is the one.
        """

        async def go() -> None:
            port = self.startProxy('[filters.headers]\nauthserv_id = "mx.example.org"\n')
            await self.sendMessage(port, self.FORGED)
            self.assertEqual(
                self.mta.messages[0].content,
                b"Authentication-Results: mx.example.org; none\r\n"
                b"Subject: pay\r\n"
                b"Authentication-Results: mx.sender.example; dkim=pass header.d=sender.example\r\n"
                b"\r\n"
                b".body\r\n",
            )

        return defer.Deferred.fromCoroutine(go())
