"""
Tests for L{mailproxy.wire}: the sans-IO SMTP layer.

Parsers are fed every split of their input, because TCP may cut a stream anywhere; the
DATA path (L{DataScanner} and L{Stuffer}) is checked with hypothesis against small
reference readers, since it is what stands between a client and SMTP smuggling.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import wire
from mailproxy.wire import (
    TOO_LONG,
    BdatSyntaxError,
    ChunkScanner,
    CommandBuffer,
    DataScanner,
    PathSyntaxError,
    ProtocolError,
    Reply,
    ReplyParser,
    Stuffer,
    editCapabilities,
    parseBdat,
    parseCommand,
    parsePath,
    queueId,
    sizeParameter,
)

END = b"\r\n.\r\n"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")
SMUGGLING = (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n")
COMMANDS = b"MAIL FROM:<attacker@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
FAST = settings(max_examples=200, deadline=None)


# -- reference readers, written for clarity rather than speed -----------------------------


def splits(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """C{data} cut at the given offsets."""
    points = sorted({0, len(data), *(min(max(c, 0), len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def stuffWhole(content: bytes) -> bytes:
    """RFC 5321 4.5.2 dot-stuffing of CRLF lines, one line at a time."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def unstuffLines(raw: bytes) -> bytes:
    """Remove the transparency dot of each CRLF line of C{raw} (which ends in CRLF)."""
    lines = raw.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def strictRead(stream: bytes) -> tuple[bytes, bytes] | None:
    """
    What an MTA that ends DATA only at CRLF.CRLF receives: the message and the bytes
    after it, or C{None} if the message never ends.
    """
    framed = b"\r\n" + stream
    end = framed.find(END)
    if end < 0:
        return None
    return unstuffLines(framed[2 : end + 2]), framed[end + len(END) :]


def scan(chunks: Sequence[bytes], normalise: bool) -> tuple[bytes, bytes | None, bool, int, bool]:
    """
    Feed C{chunks} to a new L{DataScanner} as a relay would: the chunks after the end
    are part of what follows the message.

    @return: content, bytes after the end (C{None} if not seen), bare, size, done.
    """
    scanner = DataScanner(normalise)
    content = []
    rest: bytes | None = None
    for i, chunk in enumerate(chunks):
        out, after = scanner.feed(chunk)
        content.append(out)
        if after is not None:
            rest = after + b"".join(chunks[i + 1 :])
            break
    return b"".join(content), rest, scanner.bare, scanner.size, scanner.done


def stuffChunks(chunks: Iterable[bytes]) -> bytes:
    stuffer = Stuffer()
    return b"".join(stuffer(chunk) for chunk in chunks)


class ReferenceDataScanner:
    """
    L{DataScanner} as it was before one split replaced its find and replace and two
    translates its three counts: what the new one must give, byte for byte, for every
    input in every chunking. Three whole-buffer counts find bare line endings; a find,
    then a replace, the end and the stuffing.
    """

    def __init__(self, normalise: bool, stripNul: bool = False) -> None:
        self._normalise = normalise
        self._stripNul = stripNul
        self.nul = False
        self._tail = b"\r\n"
        self._skip = 2
        self._carry = b""
        self._lineStart = True
        self.size = 0
        self.bare = False
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        buffer = self._tail + data
        end = buffer.find(END)
        if end >= 0:
            raw, rest = buffer[: end + 2], buffer[end + len(END) :]
            self._tail = b""
            self.done = True
        else:
            split = max(0, len(buffer) - (len(END) - 1))
            raw, self._tail, rest = buffer[:split], buffer[split:], None
        if self._skip:
            dropped = min(self._skip, len(raw))
            raw, self._skip = raw[dropped:], self._skip - dropped
        self.size += len(raw)
        return self._content(raw), rest

    def _content(self, raw: bytes) -> bytes:
        text, self._carry = self._carry + raw, b""
        if not self.done and text.endswith(b"\r"):
            text, self._carry = text[:-1], b"\r"
        if not text:
            return text
        if self._normalise:
            text = re.sub(rb"\r\n|\r|\n", b"\r\n", text)
        elif not self.bare:
            crlf = text.count(b"\r\n")
            self.bare = text.count(b"\r") != crlf or text.count(b"\n") != crlf
        startsLine, self._lineStart = self._lineStart, text.endswith(b"\r\n")
        if startsLine and text.startswith(b"."):
            text = text[1:]
        text = text.replace(b"\r\n.", b"\r\n")
        if self._stripNul:
            text = text.replace(b"\x00", b"")
        else:
            self.nul = self.nul or b"\x00" in text
        return text


# -- strategies ---------------------------------------------------------------------------

#: One line of a canonical message (no CR or LF), often starting with dots, sometimes long.
lines = st.one_of(
    st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.tuples(st.sampled_from([b".", b"..", b"...", b". "]), st.binary(max_size=8)).map(
        lambda t: (t[0] + t[1]).replace(b"\r", b"").replace(b"\n", b"")
    ),
    st.integers(min_value=900, max_value=3000).map(lambda n: b"x" * n),
    st.just(b""),
)
#: Canonical message content: CRLF lines.
contents = st.lists(lines, max_size=12).map(lambda ls: b"".join(line + b"\r\n" for line in ls))
#: Arbitrary bytes, rich in the pieces that matter at a boundary.
rawBytes = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\r", b"\n", b".", b"\x00", b"a", b"\r\n", b"\r\n.", b".\r\n", END, b"..", *SMUGGLING]
        ),
        st.binary(max_size=6),
    ),
    max_size=30,
).map(b"".join)
cutLists = st.lists(st.integers(min_value=0, max_value=4000), max_size=12)
#: What the DATA path must get right, often: CR, LF, dots, NULs, the end, stuffed lines,
#: a NUL that hides a dot line; and lines long enough that a buffer has no CRLF dot.
dataBytes = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\r", b"\n", b".", b"\x00", b"a", b"\r\n", b"\r\n.", b"\r\n..", b".\r\n", END,
             b"..", b"\r\n\x00.", b"\x00\r", *SMUGGLING]
        ),
        st.binary(max_size=6),
        st.integers(min_value=1, max_value=90).map(lambda n: b"x" * n + b"\r\n"),
    ),
    max_size=40,
).map(b"".join)  # fmt: skip
#: Cuts dense enough to split every piece of a short stream somewhere.
denseCuts = st.lists(st.integers(min_value=0, max_value=300), max_size=40)


# -- replies -------------------------------------------------------------------------------


class ReplyTests(SynchronousTestCase):
    def test_make(self) -> None:
        """A reply of ours carries its enhanced code, and its text is kept on one line."""
        self.assertEqual(
            Reply.make(550, "5.7.1", "Refused\r\nby policy").toBytes(),
            b"550 5.7.1 Refused  by policy\r\n",
        )
        self.assertEqual(Reply.make(451, "4.7.1", "").toBytes(), b"451 4.7.1\r\n")

    def test_toBytesMultiLine(self) -> None:
        """Every line but the last has a hyphen after the code; each ends in CRLF."""
        reply = Reply(250, (b"mx.example", b"PIPELINING", b"SIZE 1000"))
        self.assertEqual(reply.toBytes(), b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")

    def test_positive(self) -> None:
        """2xx and 3xx replies are positive; 4xx and 5xx are not."""
        self.assertEqual(
            [Reply(code, (b"",)).positive for code in (250, 354, 421, 550)],
            [True, True, False, False],
        )

    def test_queueIdPostfix(self) -> None:
        """The queue id is read from Postfix's "queued as" reply."""
        reply = Reply(250, (b"2.0.0 Ok: queued as 4Zb2Xk0f3Sz9",))
        self.assertEqual(queueId(reply), "4Zb2Xk0f3Sz9")

    def test_queueIdExim(self) -> None:
        """The queue id is read from Exim's "id=" reply, on any line."""
        reply = Reply(250, (b"OK", b"id=1tXabc-000Abc-Zz"))
        self.assertEqual(queueId(reply), "1tXabc-000Abc-Zz")

    def test_queueIdAbsent(self) -> None:
        """A reply that names no queue id gives C{None}."""
        self.assertIsNone(queueId(Reply(250, (b"2.0.0 Ok",))))


class ReplyParserTests(SynchronousTestCase):
    STREAM = (
        b"220 mx.example ESMTP\r\n"
        b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
        b"250 2.1.0 Ok\n"
        b"354\r\n"
    )
    EXPECTED: ClassVar[list[Reply]] = [
        Reply(220, (b"mx.example ESMTP",)),
        Reply(250, (b"mx.example", b"PIPELINING", b"SIZE 10240000", b"8BITMIME")),
        Reply(250, (b"2.1.0 Ok",)),
        Reply(354, (b"",)),
    ]

    def test_replies(self) -> None:
        """Single and multi-line replies, with CRLF or bare LF, come out whole and in order."""
        self.assertEqual(ReplyParser().feed(self.STREAM), self.EXPECTED)

    def test_everySplit(self) -> None:
        """Wherever the stream is cut, in two or into single bytes, the replies are the same."""
        for i in range(len(self.STREAM) + 1):
            parser = ReplyParser()
            got = parser.feed(self.STREAM[:i]) + parser.feed(self.STREAM[i:])
            self.assertEqual(got, self.EXPECTED, f"cut at {i}")
        parser = ReplyParser()
        got = []
        for i in range(len(self.STREAM)):
            got.extend(parser.feed(self.STREAM[i : i + 1]))
        self.assertEqual(got, self.EXPECTED)

    def test_partial(self) -> None:
        """A multi-line reply is only returned once its last line has come."""
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-mx\r\n250-PIPELINING\r\n250 SIZ"), [])
        self.assertEqual(parser.feed(b"E\r\n"), [Reply(250, (b"mx", b"PIPELINING", b"SIZE"))])

    def test_badLines(self) -> None:
        """A line that is not three digits and a space, hyphen or end is a ProtocolError."""
        for bad in (
            b"hello\r\n",
            b"\r\n",
            b"25\r\n",
            b"25 ok\r\n",
            b"2500 ok\r\n",
            b"250_ok\r\n",
            b"-250 ok\r\n",
            b"2x0 ok\r\n",
        ):
            self.assertRaises(ProtocolError, ReplyParser().feed, bad)

    def test_codeChanges(self) -> None:
        """A multi-line reply whose lines disagree on the code is a ProtocolError."""
        self.assertRaises(ProtocolError, ReplyParser().feed, b"250-mx\r\n251 ok\r\n")

    def test_lineTooLong(self) -> None:
        """A line over the limit is refused, whether or not its end has come."""
        self.assertRaises(
            ProtocolError, ReplyParser(maxLine=20).feed, b"250 " + b"x" * 17 + b"\r\n"
        )
        parser = ReplyParser(maxLine=20)
        self.assertEqual(parser.feed(b"250 " + b"x" * 10), [])
        self.assertRaises(ProtocolError, parser.feed, b"x" * 10)

    def test_longestLineEverySplit(self) -> None:
        """A line of exactly the limit is accepted wherever the stream is cut."""
        line = b"250 " + b"x" * 16
        data = line + b"\r\n"
        for i in range(len(data) + 1):
            parser = ReplyParser(maxLine=len(line))
            got = parser.feed(data[:i]) + parser.feed(data[i:])
            self.assertEqual(got, [Reply(250, (b"x" * 16,))], f"cut at {i}")

    def test_unendingLineBounded(self) -> None:
        """Megabytes without a newline are refused after the limit, not buffered."""
        parser = ReplyParser(maxLine=1000)
        chunk = b"2" * 600
        self.assertEqual(parser.feed(chunk), [])
        self.assertRaises(ProtocolError, parser.feed, chunk)

    def test_tooManyLines(self) -> None:
        """A multi-line reply longer than the limit is a ProtocolError."""
        parser = ReplyParser(maxLines=3)
        self.assertRaises(ProtocolError, parser.feed, b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n")


# -- commands ------------------------------------------------------------------------------


def drain(buffer: CommandBuffer) -> list[bytes | object]:
    """Every line the buffer can give now."""
    out: list[bytes | object] = []
    while (line := buffer.nextLine()) is not None:
        out.append(line)
    return out


class CommandBufferTests(SynchronousTestCase):
    def test_lines(self) -> None:
        """Lines end in CRLF or a bare LF; the terminator is not returned."""
        buffer = CommandBuffer(512)
        buffer.feed(b"EHLO client.example\r\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\r\nDA")
        self.assertEqual(
            drain(buffer), [b"EHLO client.example", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"]
        )
        buffer.feed(b"TA\r\n")
        self.assertEqual(drain(buffer), [b"DATA"])
        self.assertEqual(len(buffer), 0)

    def test_everySplit(self) -> None:
        """Wherever the stream is cut, the lines and TOO_LONG reports are the same."""
        stream = b"NOOP\r\n" + b"x" * 14 + b"\r\n" + b"y" * 15 + b"\r\n" + b"z" * 15 + b"\nQUIT\r\n"
        expected = [b"NOOP", b"x" * 14, TOO_LONG, b"z" * 15, b"QUIT"]
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1, 5):
                buffer = CommandBuffer(16)
                got = []
                for piece in splits(stream, (i, j)):
                    buffer.feed(piece)
                    got.extend(drain(buffer))
                self.assertEqual(got, expected, f"cut at {i}, {j}")

    def test_tooLongOnce(self) -> None:
        """An over-long line is reported once, however it arrives, and the next is parsed."""
        buffer = CommandBuffer(16)
        got = []
        for _ in range(10):
            buffer.feed(b"x" * 7)
            got.extend(drain(buffer))
        buffer.feed(b"\r\nRSET\r\n")
        got.extend(drain(buffer))
        self.assertEqual(got, [TOO_LONG, b"RSET"])

    def test_tenMegabytesBounded(self) -> None:
        """
        Ten megabytes without a newline never leave more than the line limit buffered
        once lines are taken; the line is then reported once and the next is parsed.
        """
        buffer = CommandBuffer(2048)
        chunk = b"A" * 65536
        for _ in range(160):
            buffer.feed(chunk)
            self.assertEqual(drain(buffer), [])
            self.assertLessEqual(len(buffer), 2048)
        buffer.feed(b"A" * 10 * 1024 * 1024)
        self.assertEqual(drain(buffer), [])
        self.assertLessEqual(len(buffer), 2048)
        buffer.feed(b"AAAA\r\nQUIT\r\n")
        self.assertEqual(drain(buffer), [TOO_LONG, b"QUIT"])

    def test_takeRest(self) -> None:
        """After DATA, what follows the command line is the start of the message."""
        buffer = CommandBuffer(512)
        buffer.feed(b"DATA\r\nSubject: x\r\n\r\nbody")
        self.assertEqual(buffer.nextLine(), b"DATA")
        self.assertEqual(buffer.takeRest(), b"Subject: x\r\n\r\nbody")
        self.assertEqual(len(buffer), 0)
        self.assertIsNone(buffer.nextLine())

    def test_parseCommand(self) -> None:
        """The verb is upper-cased; the argument keeps its case."""
        command = parseCommand(b"mail FROM:<A@B> SIZE=10 ")
        self.assertEqual((command.verb, command.argument), ("MAIL", b"FROM:<A@B> SIZE=10"))


def path(argument: bytes, keyword: bytes = b"FROM:") -> tuple[str, bytes]:
    """The address and the parameters as relayed, of a parsed path."""
    parsed = parsePath(argument, keyword)
    return parsed.address, parsed.parameterBytes()


class PathTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """C{FROM:<addr>} gives the address and no parameters."""
        self.assertEqual(path(b"FROM:<a@example.org>"), ("a@example.org", b""))

    def test_nullSender(self) -> None:
        """C{<>} is the null sender: the empty address."""
        self.assertEqual(path(b"FROM:<> SIZE=10"), ("", b"SIZE=10"))

    def test_params(self) -> None:
        """The parameters after the path, keywords upper-cased, one SP between each."""
        self.assertEqual(
            path(b"FROM:<a@b> SIZE=1000  body=8BITMIME"), ("a@b", b"SIZE=1000 BODY=8BITMIME")
        )
        self.assertEqual(
            parsePath(b"FROM:<a@b>   SIZE=1 SMTPUTF8", b"FROM:").toArgument(b"FROM:"),
            b"FROM:<a@b> SIZE=1 SMTPUTF8",
        )

    def test_spaceAndCase(self) -> None:
        """C{from: <x>}, with a space and in lower case, is accepted as clients send it."""
        self.assertEqual(path(b"from: <a@b>"), ("a@b", b""))
        self.assertEqual(path(b"To: <c@d>", b"TO:"), ("c@d", b""))

    def test_unbracketed(self) -> None:
        """An address without angle brackets is taken up to the first space."""
        self.assertEqual(path(b"TO:c@d NOTIFY=NEVER", b"TO:"), ("c@d", b"NOTIFY=NEVER"))

    def test_trailingDot(self) -> None:
        """A domain's trailing dot is dropped, as Postfix drops it, so filters see what the MTA sees."""
        self.assertEqual(path(b"FROM:<x@denied.example.>"), ("x@denied.example", b""))
        self.assertEqual(path(b"TO:<x@denied.example..>", b"TO:"), ("x@denied.example", b""))

    def test_sourceRoute(self) -> None:
        """An RFC 5321 source route is dropped; the mailbox is kept."""
        self.assertEqual(path(b"TO:<@relay1,@relay2:c@d>", b"TO:"), ("c@d", b""))

    def test_garbage(self) -> None:
        """Missing keyword, unclosed or nested brackets, spaces and NULs are refused."""
        for bad in (
            b"<a@b>",
            b"TO:<a@b>",
            b"FROM:",
            b"FROM:<a@b",
            b"FROM:<<a@b>>",
            b"FROM:<a b@c>",
            b"FROM:<a\x00b>",
            b"FROM a@b",
            b"FROM:<a@b>x",
            b"FROM:<a@b> SIZE=1=",
            b"FROM:<a@b> -X",
            b"FROM:<a@b> S=",
        ):
            self.assertRaises(PathSyntaxError, parsePath, bad, b"FROM:")

    def test_sizeParameter(self) -> None:
        """SIZE= is read case-insensitively among other parameters; bad values are ignored."""
        self.assertEqual(sizeParameter(b"BODY=8BITMIME size=12345"), 12345)
        self.assertIsNone(sizeParameter(b""))
        self.assertIsNone(sizeParameter(b"SIZE=big"))
        self.assertIsNone(sizeParameter(b"SIZE="))
        self.assertIsNone(sizeParameter(b"SIZE=-5"))
        self.assertIsNone(sizeParameter(b"SIZE=" + b"9" * 5000))  # int() would raise


class CapabilityTests(SynchronousTestCase):
    EHLO = Reply(
        250,
        (
            b"mx.example",
            b"PIPELINING",
            b"SIZE 10240000",
            b"STARTTLS",
            b"XCLIENT NAME ADDR PROTO HELO",
            b"XFORWARD NAME ADDR PROTO HELO",
            b"8BITMIME",
            b"chunking",
            b"BINARYMIME",
            b"SMTPUTF8",
        ),
    )

    def test_hidden(self) -> None:
        """
        XCLIENT, XFORWARD and the MTA's STARTTLS are removed; the MTA's CHUNKING too, and
        ours offered instead; BINARYMIME kept, as the MTA offers CHUNKING.
        """
        edited = editCapabilities(self.EHLO, 50_000_000)
        self.assertEqual(
            edited,
            Reply(
                250,
                (
                    b"mx.example", b"PIPELINING", b"8BITMIME", b"BINARYMIME", b"SMTPUTF8",
                    b"SIZE 10240000", b"CHUNKING",
                ),
            ),
        )  # fmt: skip

    def test_chunkingAlways(self) -> None:
        """
        CHUNKING is offered whatever the MTA offers (mailproxy implements it); BINARYMIME
        only when the MTA offers it with CHUNKING, since only BDAT can release it.
        """
        for mta, expected in [
            ((b"mx", b"BINARYMIME"), (b"mx", b"SIZE 5000", b"CHUNKING")),
            ((b"mx", b"CHUNKING"), (b"mx", b"SIZE 5000", b"CHUNKING")),
            (
                (b"mx", b"BINARYMIME", b"CHUNKING"),
                (b"mx", b"BINARYMIME", b"SIZE 5000", b"CHUNKING"),
            ),
        ]:
            self.assertEqual(editCapabilities(Reply(250, mta), 5000).lines, expected, mta)

    def test_sizeCapped(self) -> None:
        """The MTA's SIZE is capped at ours."""
        edited = editCapabilities(self.EHLO, 1000)
        self.assertIn(b"SIZE 1000", edited.lines)
        self.assertNotIn(b"SIZE 10240000", edited.lines)

    def test_sizeZeroOrBare(self) -> None:
        """An MTA with no limit (C{SIZE 0}, bare C{SIZE}, or an absurd number) advertises ours."""
        for line in (b"SIZE 0", b"SIZE", b"SIZE " + b"9" * 5000):  # the last: int() would raise
            edited = editCapabilities(Reply(250, (b"mx", line)), 5000)
            self.assertEqual(edited.lines, (b"mx", b"SIZE 5000", b"CHUNKING"))

    def test_sizeAdded(self) -> None:
        """An MTA that says nothing of SIZE gets ours added, even to a one-line reply."""
        self.assertEqual(
            editCapabilities(Reply(250, (b"mx",)), 5000).lines, (b"mx", b"SIZE 5000", b"CHUNKING")
        )

    def test_startTLS(self) -> None:
        """STARTTLS is offered when mailproxy terminates TLS, whatever the MTA said."""
        edited = editCapabilities(Reply(250, (b"mx", b"PIPELINING")), 5000, startTLS=True)
        self.assertEqual(
            edited.lines, (b"mx", b"PIPELINING", b"SIZE 5000", b"CHUNKING", b"STARTTLS")
        )

    def test_refusalUntouched(self) -> None:
        """A 4xx or 5xx answer to EHLO is passed on as it is."""
        for code in (421, 502, 554):
            reply = Reply(code, (b"5.5.1 no", b"STARTTLS", b"CHUNKING"))
            self.assertIs(editCapabilities(reply, 5000, startTLS=True), reply)


# -- end of data and dot-stuffing: SMTP smuggling --------------------------------------------


class DataScannerTests(SynchronousTestCase):
    def test_emptyMessage(self) -> None:
        """A lone C{.} line right after DATA is an empty message."""
        self.assertEqual(scan([b".\r\nQUIT\r\n"], False), (b"", b"QUIT\r\n", False, 0, True))

    def test_unstuffed(self) -> None:
        """The client's transparency dots are removed, the first line's included."""
        content, rest, bare, _, done = scan([b"..a\r\nb\r\n...\r\n.\r\n"], False)
        self.assertEqual((content, rest, bare, done), (b".a\r\nb\r\n..\r\n", b"", False, True))

    def test_everyByte(self) -> None:
        """Fed one byte at a time, the scanner gives the same as fed the whole."""
        stream = b".x\r\n\r\n..\r\na\rb\nc\r\n\r\n.\r\nRSET\r\n"
        for normalise in (False, True):
            whole = scan([stream], normalise)
            self.assertEqual(scan([bytes([b]) for b in stream], normalise), whole)

    def test_bareRejectMode(self) -> None:
        """In reject mode a bare CR or LF is noted, not changed."""
        for raw in (b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\nb\r\n"):
            _, _, bare, _, done = scan([raw + b".\r\n"], False)
            self.assertTrue(bare, raw)
            self.assertTrue(done)

    def test_normalise(self) -> None:
        """In normalise mode each bare CR or LF becomes CRLF and nothing is noted."""
        content, rest, bare, _, _ = scan([b"a\nb\rc\r\r\nd\r\n.\r\n"], True)
        self.assertEqual((content, rest, bare), (b"a\r\nb\r\nc\r\n\r\nd\r\n", b"", False))

    @FAST
    @given(contents, cutLists, st.binary(max_size=20), st.booleans())
    def test_stuffedContentComesBack(
        self, content: bytes, cuts: list[int], after: bytes, normalise: bool
    ) -> None:
        """
        Canonical content, dot-stuffed and ended with C{.CRLF}, comes back exactly from
        any chunking, with the bytes after the end returned as the rest.
        """
        stream = stuffWhole(content) + b".\r\n" + after
        got, rest, bare, size, done = scan(splits(stream, cuts), normalise)
        self.assertEqual((got, rest, bare, done), (content, after, False, True))
        self.assertEqual(size, len(stuffWhole(content)))

    @FAST
    @given(rawBytes, cutLists, st.booleans())
    def test_anyBytesAnyChunking(self, stream: bytes, cuts: list[int], normalise: bool) -> None:
        """
        For any bytes in any chunking: the same result as unchunked; the end found at the
        first raw CRLF.CRLF (data starting after a CRLF) and nowhere else; no bare CR or LF
        in normalised content; in reject mode C{bare} exactly when the content has one.
        """
        whole = scan([stream], normalise)
        self.assertEqual(scan(splits(stream, cuts), normalise), whole)
        content, rest, bare, size, done = whole
        framed = b"\r\n" + stream
        end = framed.find(END)
        self.assertEqual(done, end >= 0)
        if normalise:
            self.assertIsNone(BARE.search(content))
            self.assertFalse(bare)
        if end < 0:
            self.assertIsNone(rest)
            return
        raw = framed[2 : end + 2]
        self.assertEqual(rest, framed[end + len(END) :])
        self.assertEqual(size, len(raw))
        if normalise:
            self.assertEqual(content, unstuffLines(re.sub(rb"\r\n|\r|\n", b"\r\n", raw)))
        else:
            self.assertEqual(bare, BARE.search(raw) is not None)
            if not bare:
                self.assertEqual(content, unstuffLines(raw))

    @FAST
    @given(rawBytes, st.booleans())
    def test_everyByteAnyBytes(self, stream: bytes, normalise: bool) -> None:
        """Any bytes, fed one at a time, give the same result as fed whole."""
        self.assertEqual(scan([bytes([b]) for b in stream], normalise), scan([stream], normalise))


class ScannerEquivalenceTests(SynchronousTestCase):
    """
    L{DataScanner} gives exactly what L{ReferenceDataScanner} gives, after every buffer,
    for any bytes cut anywhere, in both modes, NULs stripped or not, however many dot
    lines a buffer has; and its C{dotLines} is never wrong to say there are none.
    """

    def compare(
        self,
        stream: bytes,
        cuts: list[int],
        normalise: bool,
        stripNul: bool,
        few: int,
        block: int = 32 * 1024,
    ) -> None:
        scanner = DataScanner(normalise, stripNul=stripNul)
        scanner._fewDotLines = few
        self.patch(wire, "_MASK_BLOCK", block)
        reference = ReferenceDataScanner(normalise, stripNul=stripNul)
        content = b""
        for chunk in splits(stream, cuts):
            got = scanner.feed(chunk)
            self.assertEqual(got, reference.feed(chunk))
            self.assertEqual(
                (scanner.bare, scanner.nul, scanner.size, scanner.done),
                (reference.bare, reference.nul, reference.size, reference.done),
            )
            content += got[0]
            if not scanner.dotLines:
                self.assertEqual(Stuffer()(content), content)
            if not scanner.bare and not (stripNul and b"\x00" in stream):
                # Exact: dotLines says True only of content the Stuffer changes.
                self.assertEqual(scanner.dotLines, Stuffer()(content) != content)

    @settings(max_examples=1500, deadline=None)
    @given(
        dataBytes,
        denseCuts,
        st.booleans(),
        st.booleans(),
        st.sampled_from([0, 1, 2, 32]),
        st.sampled_from([1, 2, 7, 32 * 1024]),
    )
    def test_sameAsReference(
        self,
        stream: bytes,
        cuts: list[int],
        normalise: bool,
        stripNul: bool,
        few: int,
        block: int,
    ) -> None:
        """
        Every buffer's content and rest, and bare, nul, size and done after it, are the
        reference's (with few dot lines handled one by one, or none; masks in blocks of
        any size).
        """
        self.compare(stream, cuts, normalise, stripNul, few, block)

    @FAST
    @given(dataBytes, st.booleans(), st.booleans())
    def test_sameAsReferenceByteByByte(
        self, stream: bytes, normalise: bool, stripNul: bool
    ) -> None:
        """Fed a byte at a time, too (feeding on after the end included)."""
        self.compare(stream, list(range(len(stream))), normalise, stripNul, 32)

    @FAST
    @given(contents, cutLists, st.booleans())
    def test_noDotLines(self, content: bytes, cuts: list[int], normalise: bool) -> None:
        """Canonical content with no line starting with a dot is seen to have none."""
        content = b"".join(line.lstrip(b".") + b"\r\n" for line in content.split(b"\r\n")[:-1])
        scanner = DataScanner(normalise)
        got = b"".join(scanner.feed(c)[0] for c in splits(stuffWhole(content) + b".\r\n", cuts))
        self.assertEqual((got, scanner.done, scanner.dotLines), (content, True, False))

    def test_dotLines(self) -> None:
        """A stuffed line is a dot line, wherever the buffers are cut; an unstuffed dot is removed."""
        stream = b"a\r\n..b\r\n.\r\n"
        for cut in range(len(stream) + 1):
            scanner = DataScanner(normalise=False)
            scanner.feed(stream[:cut])
            scanner.feed(stream[cut:])
            self.assertEqual((scanner.done, scanner.dotLines), (True, True), cut)
        scanner = DataScanner(normalise=False)
        self.assertEqual(scanner.feed(b"a\r\n.b\r\n.\r\n"), (b"a\r\nb\r\n", b""))
        self.assertFalse(scanner.dotLines)

    def test_strippedNulMakesDotLine(self) -> None:
        """With NULs stripped a NUL before a dot leaves a dot line: dotLines is True."""
        scanner = DataScanner(normalise=False, stripNul=True)
        self.assertEqual(scanner.feed(b"a\r\n\x00.b\r\n.\r\n"), (b"a\r\n.b\r\n", b""))
        self.assertTrue(scanner.dotLines)

    @FAST
    @given(rawBytes, st.sampled_from([1, 2, 3, 5, 32 * 1024]))
    def test_hasBare(self, text: bytes, block: int) -> None:
        """
        The translate check finds a bare CR or LF exactly when the regular expression
        does, whatever the block size (a CRLF across two blocks included).
        """
        self.patch(wire, "_MASK_BLOCK", block)
        self.assertEqual(wire._hasBare(text), BARE.search(text) is not None)

    @FAST
    @given(dataBytes, st.booleans())
    def test_lineEndings(self, text: bytes, bare: bool) -> None:
        """
        What both scanners do with line endings is what three counts and an unconditional
        substitution did (L{ChunkScanner}'s BDAT path included).
        """
        crlf = text.count(b"\r\n")
        counted = bare or text.count(b"\r") != crlf or text.count(b"\n") != crlf
        self.assertEqual(wire._lineEndings(text, False, bare), (text, counted))
        normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", text)
        self.assertEqual(wire._lineEndings(text, True, bare), (normalised, bare))


class StufferTests(SynchronousTestCase):
    def test_stuffing(self) -> None:
        """Each line starting with a dot gets one more, the first line's included."""
        self.assertEqual(Stuffer()(b".a\r\nb\r\n.\r\n..c\r\n"), b"..a\r\nb\r\n..\r\n...c\r\n")

    @FAST
    @given(contents, cutLists)
    def test_anyChunking(self, content: bytes, cuts: list[int]) -> None:
        """The stuffed output of any chunking equals the stuffing of the whole."""
        self.assertEqual(stuffChunks(splits(content, cuts)), stuffWhole(content))
        self.assertEqual(Stuffer()(content), stuffWhole(content))

    @FAST
    @given(st.lists(rawBytes.filter(lambda chunk: b"\n." not in chunk), max_size=8))
    def test_dotFree(self, chunks: list[bytes]) -> None:
        """For chunks with no LF dot inside, dotFree gives what calling the Stuffer does."""
        stuffer, light = Stuffer(), Stuffer()
        for chunk in chunks:
            self.assertEqual(light.dotFree(chunk), stuffer(chunk))

    @FAST
    @given(rawBytes, cutLists, cutLists, st.booleans())
    def test_roundTrip(
        self, stream: bytes, cuts: list[int], cuts2: list[int], normalise: bool
    ) -> None:
        """
        What the scanner takes in, the Stuffer sends on so that a scanner (and a strict
        CRLF.CRLF reader) on the far side reads the same content, ending exactly there.
        """
        scanner = DataScanner(normalise)
        pieces = [scanner.feed(chunk)[0] for chunk in splits(stream + END, cuts)]
        if scanner.bare:
            return  # refused in reject mode: never released
        content = b"".join(pieces)
        self.assertTrue(content == b"" or content.endswith(b"\r\n"))
        released = stuffChunks(pieces) + b".\r\n"
        self.assertEqual(
            scan(splits(released, cuts2), normalise), (content, b"", False, len(released) - 3, True)
        )
        self.assertEqual(strictRead(released), (content, b""))


class SmugglingTests(SynchronousTestCase):
    """
    The sequences of the 2023 SMTP smuggling attacks never end a message early: what the
    proxy releases is one message to any reader, identical to what it scanned.
    """

    def release(self, stream: bytes, cuts: Iterable[int] = ()) -> tuple[bytes, bytes, bytes]:
        """Scan C{stream} in normalise mode; return the content, the rest, and the release."""
        scanner = DataScanner(normalise=True)
        pieces = []
        chunks = splits(stream, cuts)
        for i, chunk in enumerate(chunks):
            out, rest = scanner.feed(chunk)
            pieces.append(out)
            if rest is not None:
                return (
                    b"".join(pieces),
                    rest + b"".join(chunks[i + 1 :]),
                    stuffChunks(pieces) + b".\r\n",
                )
        self.fail("the end of the message was not found")

    def assertOneMessage(self, content: bytes, released: bytes) -> None:
        self.assertEqual(strictRead(released), (content, b""))
        # No bare CR or LF is left, so a lenient MTA sees the same single boundary.
        self.assertIsNone(BARE.search(released))
        first = LENIENT_END.search(b"\r\n" + released)
        assert first is not None
        self.assertEqual(first.start(), len(released) - 3)

    def test_sequences(self) -> None:
        """Each smuggling sequence stays inside the message; only the real end ends it."""
        for sequence in SMUGGLING:
            stream = (
                b"Subject: hi\r\n\r\nhello" + sequence + COMMANDS + b"smuggled\r\n.\r\nQUIT\r\n"
            )
            content, rest, released = self.release(stream)
            self.assertEqual(rest, b"QUIT\r\n", sequence)
            self.assertIn(b"MAIL FROM:<attacker@evil.example>\r\n", content)
            self.assertTrue(content.endswith(b"smuggled\r\n"), sequence)
            self.assertOneMessage(content, released)

    def test_rejectMode(self) -> None:
        """In reject mode every smuggling sequence is seen as a bare line ending."""
        for sequence in SMUGGLING:
            stream = b"hello" + sequence + COMMANDS + b"x\r\n" + END
            _, _, bare, _, done = scan([stream], normalise=False)
            self.assertEqual((bare, done), (True, True), sequence)

    @FAST
    @given(
        st.lists(st.tuples(contents, st.sampled_from(SMUGGLING)), min_size=1, max_size=4),
        contents,
        cutLists,
    )
    def test_anySmuggling(
        self, parts: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
    ) -> None:
        """Smuggling sequences and injected commands anywhere, in any chunking: one message."""
        body = b"".join(stuffWhole(text) + sequence + COMMANDS for text, sequence in parts)
        stream = body + stuffWhole(tail) + b"tail\r\n.\r\nRSET\r\n"
        content, rest, released = self.release(stream, cuts)
        self.assertEqual(rest, b"RSET\r\n")
        self.assertTrue(content.endswith(b"tail\r\n"))
        self.assertOneMessage(content, released)


# -- BDAT (RFC 3030) -------------------------------------------------------------------------


class BdatTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """C{<digits> [LAST]}, LAST in any case; the size bounded as SIZE's is."""
        self.assertEqual(parseBdat(b"0"), (0, False))
        self.assertEqual(parseBdat(b"10 LAST"), (10, True))
        self.assertEqual(parseBdat(b"007 last"), (7, True))
        self.assertEqual(parseBdat(b"9" * 20), (int(b"9" * 20), False))

    def test_refused(self) -> None:
        """Anything else is a syntax error, which keeps the size when it could be read."""
        for bad, size in [(b"", None), (b"x", None), (b"+1", None), (b"1e3", None),
                          (b"-1", None), (b"\xd9\xa1", None), (b"9" * 21, None),
                          (b"3  LAST", 3), (b"3 LASTX", 3), (b"3 LAST 4", 3), (b"3 FIRST", 3)]:  # fmt: skip
            with self.assertRaises(BdatSyntaxError) as caught:
                parseBdat(bad)
            self.assertEqual(caught.exception.size, size, bad)

    def test_chunkScanner(self) -> None:
        """
        Chunk content is kept as it is (dots and all), a CRLF cut between two buffers
        is no bare CR, and bare CR or LF are noted, or normalised to CRLF.
        """
        scanner = ChunkScanner(normalise=False)
        out = scanner.feed(b".\r\n..\r\nx\r") + scanner.feed(b"\n.") + scanner.end()
        self.assertEqual(out, b".\r\n..\r\nx\r\n.")
        self.assertFalse(scanner.bare)
        self.assertFalse(scanner.endsLine)
        for bare in (b"a\nb", b"a\rb", b"a\r", b"\n"):
            scanner = ChunkScanner(normalise=False)
            scanner.feed(bare)
            scanner.end()
            self.assertTrue(scanner.bare, bare)
        scanner = ChunkScanner(normalise=True)
        out = scanner.feed(b"a\nb\r") + scanner.feed(b"c\r") + scanner.end()
        self.assertEqual(out, b"a\r\nb\r\nc\r\n")
        self.assertTrue(scanner.endsLine)
        raw = ChunkScanner(normalise=True, raw=True)
        self.assertEqual(raw.feed(b"\x00\n\r") + raw.end(), b"\x00\n\r")
