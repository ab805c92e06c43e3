"""
The one header grammar (contract 12): every ambiguity class refused with its line, or
normalised; the valid tricky cases passing; streamed a buffer at a time as whole; and,
under hypothesis, the filters' readers and the standard library reading what it reads.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from email.parser import BytesHeaderParser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import headergrammar as g
from mailproxy import wire
from mailproxy.filters.mime import walk
from mailproxy.filters.support import (
    AmbiguousHeaderError,
    LineReader,
    parseHeaders,
    readHeaderBlock,
    unfold,
)

P = g.Problem


def streamed(
    content: bytes, normalise: bool, cuts: list[int] | None = None, **kw: object
) -> tuple[bytes, g.HeaderChecker]:
    """C{content} through a L{g.HeaderChecker}, cut where C{cuts} says (default: whole)."""
    checker = g.HeaderChecker(normalise, **kw)  # type: ignore[arg-type]
    out = []
    last = 0
    for cut in [*sorted({c % (len(content) + 1) for c in cuts or []}), len(content)]:
        if cut >= last:
            out.append(checker.feed(content[last:cut]))
            last = cut
    out.append(checker.end())
    return b"".join(out), checker


#: Each ambiguity class: a message, the problem, its line, and the normalised message.
AMBIGUOUS = [
    (b"From: a\r\nX\xffY: b\r\n\r\nbody\r\n", P.FIELD_NAME, 2, b"From: a\r\n\r\nX\xffY: b\r\n\r\nbody\r\n"),
    (b"X\x01: b\r\n\r\n", P.FIELD_NAME, 1, b"\r\nX\x01: b\r\n\r\n"),
    (b"A: 1\r\nX Y: b\r\n\r\n", P.FIELD_NAME, 2, b"A: 1\r\n\r\nX Y: b\r\n\r\n"),
    (b"A: 1\r\nX\tY: b\r\n\r\n", P.FIELD_NAME, 2, b"A: 1\r\n\r\nX\tY: b\r\n\r\n"),
    (b"A: 1\r\n: empty name\r\n\r\n", P.FIELD_NAME, 2, b"A: 1\r\n\r\n: empty name\r\n\r\n"),
    (b"A: 1\r\nSubject : x\r\n\r\n", P.SPACE_BEFORE_COLON, 2, b"A: 1\r\nSubject: x\r\n\r\n"),
    (b"Subject\t \t: x\r\n\r\n", P.SPACE_BEFORE_COLON, 1, b"Subject: x\r\n\r\n"),
    (b"A: 1\r\nno colon here\r\nB: 2\r\n\r\n", P.NO_COLON, 2, b"A: 1\r\n\r\nno colon here\r\nB: 2\r\n\r\n"),
    (b"just a body line\r\n", P.NO_COLON, 1, b"\r\njust a body line\r\n"),
    (b" lead\r\nA: 1\r\n\r\n", P.LEADING_CONTINUATION, 1, b"\r\n lead\r\nA: 1\r\n\r\n"),
    (b"\tlead: x\r\n\r\n", P.LEADING_CONTINUATION, 1, b"\r\n\tlead: x\r\n\r\n"),
    (b"A: 1\r\n \t \r\n more\r\n\r\n", P.BLANK_CONTINUATION, 2, b"A: 1\r\n more\r\n\r\n"),
]
#: Refused in both modes.
UNSAFE = [
    (b"A: 1\r\nB: x\x00y\r\n\r\n", P.NUL, 2),
    (b"\x00\r\n\r\n", P.NUL, 1),
    (b"A: 1\r\nB: x\ny\r\n\r\n", P.BARE_LINE_ENDING, 2),
    (b"A: x\ry\r\n\r\n", P.BARE_LINE_ENDING, 1),
]
#: Valid, however they look.
VALID = [
    b"Subject: folded\r\n over\r\n\tlines\r\n\r\nbody",
    b"Empty:\r\nAlso-Empty: \r\nX:\r\n folded into an empty one\r\n\r\n",
    b"Long: " + b"x" * 20000 + b"\r\n\r\n",
    b"!#$%&'*+-.^_`|~09AZaz=?@[]{}/<>,\x22\x7e: every printable name byte\r\n\r\n",
    b"Subject: 8-bit \xc3\xa9t\xc3\xa9 and \xff in a value\r\n\r\n",
    b"Subject: obs-utext \x01\x0b\x0c\x7f controls in a value\r\n\r\n",
    b"Subject:no space after the colon\r\nX:\t tab\r\n\r\n",
    b"A: 1\r\nB: 2",  # no body, no empty line, no last CRLF (BDAT)
    b"A: 1\r\n",
    b"",
    b"\r\nno header at all, the body starts at once\r\nX Y: body, not header\r\n",
    b"A: 1\r\n\r\nbody: with\x00 anything\r\n\r\n \r\nX\xff: y\r\n",
]


class GrammarTests(SynchronousTestCase):
    def test_pure(self) -> None:
        """The grammar imports nothing from Twisted: the session core uses it."""
        code = "import sys, mailproxy.headergrammar; print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
        )
        self.assertEqual(out.stdout.strip(), "[]")

    def test_ambiguousRefused(self) -> None:
        """Each ambiguity class is found, at its line, streamed or whole; the bytes pass unchanged."""
        for message, problem, line, _ in AMBIGUOUS + [(m, p, n, b"") for m, p, n in UNSAFE]:
            out, checker = streamed(message, normalise=False)
            self.assertEqual(checker.finding, g.Finding(problem, line), message)
            self.assertEqual(out, message)
            block = message.split(b"\r\n\r\n", 1)[0]
            self.assertEqual(g.check(block), g.Finding(problem, line), message)

    def test_replyText(self) -> None:
        """The reply names the problem and the line."""
        self.assertEqual(
            g.Finding(P.FIELD_NAME, 3).text, "Error: ambiguous header field name in line 3"
        )
        self.assertEqual(
            g.Finding(P.TOO_LARGE, 0, 100).text,
            "Error: message header block too large (limit 100 bytes)",
        )

    def test_normalised(self) -> None:
        """
        Normalising: whitespace before the colon and whitespace-only lines removed; an
        empty line before the first line that is not a field, so that it is body for
        every reader; nothing else changes, and the result is unambiguous.
        """
        for message, problem, line, normalised in AMBIGUOUS:
            out, checker = streamed(message, normalise=True)
            self.assertEqual(out, normalised, message)
            self.assertIsNone(checker.finding)
            self.assertEqual(checker.normalised, [g.Finding(problem, line)])
            self.assertIsNone(streamed(out, normalise=False)[1].finding)

    def test_unsafeRefusedWhenNormalising(self) -> None:
        """A NUL (unless stripped) and a bare CR or LF are refused in normalise mode too."""
        for message, problem, line in UNSAFE:
            _, checker = streamed(message, normalise=True)
            self.assertEqual(checker.finding, g.Finding(problem, line), message)

    def test_nulStripped(self) -> None:
        """With stripNul, the header block's NULs go (a line of only NULs is then empty: the
        block's end); the body's stay."""
        out, checker = streamed(b"A: x\x00y\r\n\r\nb\x00dy", normalise=False, stripNul=True)
        self.assertEqual((out, checker.finding), (b"A: xy\r\n\r\nb\x00dy", None))
        out, checker = streamed(b"A: 1\r\n\x00\r\nB: 2\r\n", normalise=False, stripNul=True)
        self.assertEqual((out, checker.finding), (b"A: 1\r\n\r\nB: 2\r\n", None))

    def test_valid(self) -> None:
        """Folded fields, empty bodies, long lines, 8-bit and controls in values pass as they are."""
        for message in VALID:
            for normalise in (False, True):
                out, checker = streamed(message, normalise, cuts=[1, 7, 30])
                self.assertEqual((out, checker.finding, checker.normalised), (message, None, []))
            self.assertIsNone(g.check(message.split(b"\r\n\r\n", 1)[0]), message)

    def test_tooLarge(self) -> None:
        """A header block over the limit is refused in both modes, without holding it all."""
        message = b"A: 1\r\n" + b"B: " + b"x" * 300 + b"\r\n\r\nbody"
        for normalise in (False, True):
            out, checker = streamed(message, normalise, cuts=[50, 100], limit=200)
            self.assertEqual(checker.finding, g.Finding(P.TOO_LARGE, 0, 200))
            self.assertEqual(out, message)
        huge = g.HeaderChecker(True, limit=1000)
        held = huge.feed(b"A: " + b"x" * 999)
        self.assertEqual(huge.finding, g.Finding(P.TOO_LARGE, 0, 1000))
        self.assertEqual(len(held), 1002)  # given back at once, not kept
        self.assertIsNone(streamed(b"A: " + b"x" * 190 + b"\r\n\r\n" + b"y" * 999, False, limit=200)[1].finding)

    def test_rejectModePassesBuffersAtOnce(self) -> None:
        """Refusing, nothing is held back: each buffer is spooled as it came."""
        checker = g.HeaderChecker(False)
        self.assertEqual(checker.feed(b"Subj"), b"Subj")
        self.assertEqual(checker.feed(b"ect: x\r\n\r\nbo"), b"ect: x\r\n\r\nbo")
        self.assertEqual(checker.end(), b"")

    def test_fields(self) -> None:
        """Fields: names as written, values unfolded without the whitespace after the colon."""
        self.assertEqual(
            g.fields(b"Subject: a\r\n b\r\nX:\r\n\tc\r\nY:z\r\n"),
            [("Subject", "a b"), ("X", "\tc"), ("Y", "z")],
        )
        # Of a refused block, the fields before the first refused line.
        self.assertEqual(g.fields(b"A: 1\r\nB : 2\r\nC: 3\r\n"), [("A", "1")])


# -- hypothesis: random header blocks -------------------------------------------------

LINES = st.sampled_from(
    [
        b"Subject: hello",
        b"Content-Type: multipart/mixed; boundary=b",
        b"Content-Disposition: attachment; filename=a.exe",
        b"Authentication-Results: mx.example.org; spf=pass",
        b"X:",
        b"X-Empty: ",
        b" folded",
        b"\tfolded",
        b"  ",
        b"Subject : spaced",
        b"Sub ject: inner space",
        b"X\xff: 8-bit",
        b"X\x01: control",
        b": no name",
        b"no colon",
        b"A: \xc3\xa9\x7f\x0c",
        b"A: nul \x00 here",
        b"A: bare \n LF",
        b"A: bare \r CR",
        b"",
    ]
)
#: Lines with dots where they may come to start a line.
DOTTED = st.sampled_from([b".dotted: x", b"X: a.b", b" .folded", b". : spaced", b"\x00.nul", b"\t."])
BLOCKS = st.lists(LINES, max_size=12).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
#: What the filters can get: the session refused or normalised bare CR and LF before.
SPOOLED = BLOCKS.filter(lambda block: b"\r" not in block.replace(b"\r\n", b"") and b"\n" not in block.replace(b"\r\n", b""))


def stdlibFields(block: bytes) -> list[tuple[str, str]]:
    parsed = BytesHeaderParser(policy=compat32).parsebytes(block + b"\r\n")
    return [(name, unfold(value)) for name, value in parsed.raw_items()]


class AgreementTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(BLOCKS, st.lists(st.integers(0, 400), max_size=6), st.booleans())
    def test_streamedAsWhole(self, content: bytes, cuts: list[int], normalise: bool) -> None:
        """
        Wherever the content is cut, the verdict and the output are the same, never a
        crash; refusing, the output is the input; normalised output is never ambiguous.
        """
        whole, first = streamed(content, normalise)
        out, checker = streamed(content, normalise, cuts)
        self.assertEqual((out, checker.finding, checker.normalised), (whole, first.finding, first.normalised))
        if not normalise:
            self.assertEqual(out, content)
        elif checker.finding is None:
            self.assertIsNone(streamed(out, False)[1].finding)

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(st.one_of(LINES, DOTTED), max_size=12).map(lambda ls: b"".join(line + b"\r\n" for line in ls)),
        st.lists(st.integers(0, 400), max_size=6),
        st.booleans(),
        st.booleans(),
    )
    def test_noDotLineMade(
        self, content: bytes, cuts: list[int], normalise: bool, stripNul: bool
    ) -> None:
        """
        What the grammar spools has a line starting with a dot only if its input has
        one: the DATA scanner's dotLines, read before it, holds for the spool (the
        release skips searching it). (That scanner removes NULs itself, if any are.)
        """
        if stripNul:
            content = content.replace(b"\x00", b"")
        out, _ = streamed(content, normalise, cuts, stripNul=stripNul)
        if wire.Stuffer()(content) == content:
            self.assertEqual(wire.Stuffer()(out), out)

    @settings(max_examples=500, deadline=None)
    @given(SPOOLED, st.sampled_from([b"", b"\r\nbody\r\nX : y\r\n", b"\r\n"]))
    def test_filtersReadWhatTheGrammarReads(self, block: bytes, body: bytes) -> None:
        """
        On any message as spooled (CRLF lines), the filters' header reader refuses exactly what the session's
        grammar refuses (the same problem, the same line); on what it accepts they read
        the grammar's fields, and so does the standard library's parser; the mime walk
        sees the same Content-Type.
        """
        content = block + body
        _, checker = streamed(content, False)
        reader = LineReader(io.BytesIO(content))
        try:
            read = readHeaderBlock(reader, g.MAX_HEADER_BYTES)
        except AmbiguousHeaderError as e:
            self.assertEqual(e.finding, checker.finding)
            with self.assertRaises(AmbiguousHeaderError):
                list(walk(io.BytesIO(content)))
            return
        self.assertIsNone(checker.finding, content)
        fields = g.fields(read)
        self.assertEqual(parseHeaders(read), fields)
        self.assertEqual(stdlibFields(read), fields)
        types = [v for n, v in fields if n.lower() == "content-type"]
        top = next(walk(io.BytesIO(content)))
        self.assertEqual(top.contentTypes[0], "multipart/mixed" if types else "text/plain")
