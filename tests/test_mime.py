"""
Tests for the mime filter: the streaming MIME walker on crafted and random messages, the
filter's refusals through the in-memory proxy, and one session over real loopback sockets.
"""

from __future__ import annotations

import email
import io
import os
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from email.policy import compat32
from itertools import count
from typing import IO, Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import IFilter, OptionError, Stage, Verdict, mime
from mailproxy.filters.mime import MimeFilter, MimeFilterFactory, Part, walk
from mailproxy.filters.support import (
    AmbiguousHeaderError,
    LineReader,
    MimeStructureError,
    readHeaderBlock,
)
from mailproxy.localmta import LocalMTA
from mailproxy.testing import FakeFilter, RawClient, loopbackConfig, startProxy
from mailproxy.testing_threads import ThreadedClock
from tests.test_relay import Harness, envelope


def parts(message: bytes, chunkSize: int = 65536, **limits: int) -> list[Part]:
    return list(walk(io.BytesIO(message), chunkSize=chunkSize, **limits))


def shape(message: bytes, chunkSize: int = 65536) -> list[tuple[int, str, tuple[str, ...]]]:
    """Each entity as (depth, first content type, file names)."""
    return [(p.depth, p.contentTypes[0], p.filenames) for p in parts(message, chunkSize)]


def crlf(text: str) -> bytes:
    """A message written with LF line ends, as the spool holds it (CRLF)."""
    return text.replace("\n", "\r\n").encode("utf-8")


NESTED = crlf(
    'From: a@example.org\nSubject: nested\nContent-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "This is a preamble.\n"
    "--outer\n"
    "Content-Type: multipart/alternative; boundary=inner\n"
    "\n"
    "--inner\n"
    "Content-Type: text/plain\n"
    "\n"
    "Hello.\n"
    "-- \n"
    "A signature line starting with two dashes.\n"
    "--inner\n"
    "Content-Type: text/html\n"
    "\n"
    "<p>Hello.</p>\n"
    "--inner--\n"
    "--outer\n"
    'Content-Type: application/pdf; name="report.pdf"\n'
    "Content-Disposition: attachment\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0xLjQK\n"
    "--outer--\n"
    "An epilogue.\n"
)


class WalkTests(SynchronousTestCase):
    """The walker finds every entity, with its declared types and decoded file names."""

    def test_plainMessage(self) -> None:
        """A message without MIME is one text/plain entity."""
        self.assertEqual(shape(b"Subject: hi\r\n\r\nhello\r\n"), [(0, "text/plain", ())])

    def test_nested(self) -> None:
        """Nested multiparts: every entity, in order, at its depth."""
        self.assertEqual(
            shape(NESTED),
            [
                (0, "multipart/mixed", ()),
                (1, "multipart/alternative", ()),
                (2, "text/plain", ()),
                (2, "text/html", ()),
                (1, "application/pdf", ("report.pdf",)),
            ],
        )

    def test_agreesWithStdlib(self) -> None:
        """On a well-formed message, the types and names are those the stdlib parser finds."""
        whole = email.message_from_bytes(NESTED, policy=compat32)
        self.assertEqual(
            [(p.contentTypes[0], p.filenames[:1]) for p in parts(NESTED)],
            [(m.get_content_type(), tuple(filter(None, [m.get_filename()]))) for m in whole.walk()],
        )

    def test_lfLineEndings(self) -> None:
        """Bare LF line endings (a normalising configuration never keeps them) work too."""
        self.assertEqual(shape(NESTED.replace(b"\r\n", b"\n")), shape(NESTED))

    def test_messageRfc822(self) -> None:
        """The headers inside a message/rfc822 part are a new entity, one level deeper."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: message/rfc822\n\n"
            "From: x@example.org\n"
            "Content-Type: multipart/mixed; boundary=c\n\n"
            '--c\nContent-Type: application/octet-stream; name="inner.exe"\n\nMZ\n--c--\n'
            "--b--\n"
        )
        self.assertEqual(
            shape(message),
            [
                (0, "multipart/mixed", ()),
                (1, "message/rfc822", ()),
                (2, "multipart/mixed", ()),
                (3, "application/octet-stream", ("inner.exe",)),
            ],
        )

    def test_encodedMessageRfc822(self) -> None:
        """
        A base64 message/rfc822 part (which RFC 2046 forbids) is not decoded: its body
        is not read as headers.
        """
        message = crlf(
            "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
            "Q29udGVudC1UeXBlOiB0ZXh0L3BsYWlu\n"
        )
        self.assertEqual(shape(message), [(0, "message/rfc822", ())])

    def test_digest(self) -> None:
        """In a multipart/digest, a part without Content-Type is a message/rfc822."""
        message = crlf(
            "Content-Type: multipart/digest; boundary=d\n\n"
            "--d\n\nSubject: one\nContent-Type: image/png; name=a.png\n\nPNG\n"
            "--d\nContent-Type: text/plain\n\nnot a message\n--d--\n"
        )
        self.assertEqual(
            shape(message),
            [
                (0, "multipart/digest", ()),
                (1, "message/rfc822", ()),
                (2, "image/png", ("a.png",)),
                (1, "text/plain", ()),
            ],
        )

    def test_rfc2231(self) -> None:
        """RFC 2231 names: charset and percent-encoding, and continuations of both kinds."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Disposition: attachment; filename*=UTF-8''%D1%81%D1%87%D1%91%D1%82.exe\n\nx\n"
            "--b\nContent-Disposition: attachment;\n filename*0*=UTF-8''in; filename*1*=voice.scr\n\nx\n"
            '--b\nContent-Disposition: attachment; filename*0="a very "; filename*1="long.bat"\n\nx\n'
            "--b\nContent-Disposition: attachment; filename*=bogus-charset''plain.vbs\n\nx\n"
            "--b--\n"
        )
        self.assertEqual(
            [p.filenames for p in parts(message)[1:]],
            [("счёт.exe",), ("invoice.scr",), ("a very long.bat",), ("plain.vbs",)],
        )

    def test_rfc2047(self) -> None:
        """RFC 2047 encoded-word names (as Outlook writes them), even folded, are decoded."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            '--b\nContent-Disposition: attachment;\n filename="=?UTF-8?B?0YHRh9GR0YIuZXhl?="\n\nx\n'
            '--b\nContent-Type: application/octet-stream;\n\tname="=?iso-8859-1?Q?r=E9sum=E9?=\n'
            ' =?iso-8859-1?Q?.js?="\n\nx\n'
            '--b\nContent-Disposition: attachment; filename="=?x-unknown?Q?odd.js?="\n\nx\n'
            "--b--\n"
        )
        self.assertEqual(
            [p.filenames for p in parts(message)[1:]],
            [("счёт.exe",), ("résumé.js",), ("odd.js",)],
        )

    def test_rawUtf8Name(self) -> None:
        """A raw UTF-8 name (RFC 6532 style) is read as UTF-8."""
        message = (
            b"Content-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="\xd1\x81\xd1\x87.exe"\r\n\r\nx\r\n'
        )
        self.assertEqual(parts(message)[0].filenames, ("сч.exe",))

    def test_rawByteBoundary(self) -> None:
        """A boundary with raw 8-bit bytes is matched byte for byte."""
        message = (
            b'Content-Type: multipart/mixed; boundary="\xff\xfe"\r\n\r\n'
            b"--\xff\xfe\r\nContent-Type: image/gif; name=a.gif\r\n\r\nx\r\n--\xff\xfe--\r\n"
        )
        self.assertEqual(shape(message)[1], (1, "image/gif", ("a.gif",)))

    def test_everyNameAndType(self) -> None:
        """
        Every Content-Type and Content-Disposition counts, with every name and filename
        parameter: a reader that takes the last one is covered too.
        """
        message = crlf(
            "Content-Type: text/plain; name=a.txt\n"
            "Content-Type: application/x-msdownload\n"
            'Content-Disposition: attachment; filename="b.txt"; filename="c.exe"\n'
            "Content-Disposition: inline; name=d.js\n\nx\n"
        )
        [part] = parts(message)
        self.assertEqual(part.contentTypes, ("text/plain", "application/x-msdownload"))
        self.assertEqual(sorted(part.filenames), ["a.txt", "b.txt", "c.exe", "d.js"])

    def test_typeSpelling(self) -> None:
        """Types are lower-cased, stripped of comments and spaces; an invalid one is text/plain."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: Application / X-MSDownload (a comment); name=x\n\nx\n"
            "--b\nContent-Type: garbage\n\nx\n--b--\n"
        )
        self.assertEqual(
            [p.contentTypes for p in parts(message)[1:]],
            [("application/x-msdownload",), ("text/plain",)],
        )

    def test_multipartWithoutBoundary(self) -> None:
        """A multipart with no boundary parameter is one opaque entity."""
        message = crlf("Content-Type: multipart/mixed\n\n--x\nContent-Type: image/gif\n\nGIF\n")
        self.assertEqual(shape(message), [(0, "multipart/mixed", ())])

    def test_boundaryNeverAppears(self) -> None:
        """A multipart whose boundary never appears is all preamble, read to the end."""
        message = crlf("Content-Type: multipart/mixed; boundary=nowhere\n\n" + "text\n" * 1000)
        self.assertEqual(shape(message), [(0, "multipart/mixed", ())])

    def test_unterminated(self) -> None:
        """A part left open at the end of the file (no closing delimiter, no newline) ends there."""
        message = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: image/gif\n\nGIF")
        self.assertEqual(shape(message), [(0, "multipart/mixed", ()), (1, "image/gif", ())])
        truncatedHeaders = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: ima")
        self.assertEqual(shape(truncatedHeaders)[1], (1, "text/plain", ()))

    def test_outerDelimiterClosesInner(self) -> None:
        """
        A delimiter of an outer multipart ends the inner ones left open: the inner
        boundary is only body text after it.
        """
        message = crlf(
            "Content-Type: multipart/mixed; boundary=outer\n\n"
            "--outer\nContent-Type: multipart/related; boundary=inner\n\n"
            "--inner\nContent-Type: text/html\n\nx\n"
            "--outer\nContent-Type: image/png\n\nx\n"
            "--inner\nContent-Type: image/gif\n\nx\n"
            "--outer--\n"
        )
        self.assertEqual(
            shape(message),
            [
                (0, "multipart/mixed", ()),
                (1, "multipart/related", ()),
                (2, "text/html", ()),
                (1, "image/png", ()),
            ],
        )

    def test_partsAfterClosingDelimiter(self) -> None:
        """
        Delimiters after a closing delimiter (in the epilogue) still start parts, in case
        a reader does not take the close as one (a lenient walker finds more, never less).
        """
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\n\nbody\n--b-- not quite a close for a strict reader\n"
            "--b\nContent-Type: application/octet-stream; name=late.exe\n\nMZ\n"
        )
        self.assertEqual(parts(message)[-1].filenames, ("late.exe",))

    def test_delimiterPrefix(self) -> None:
        """A line that starts with the delimiter is one, whatever follows (lenient readers)."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b trailing junk\nContent-Type: image/gif; name=a.gif\n\nx\n--b--\n"
        )
        self.assertEqual(parts(message)[1].filenames, ("a.gif",))

    def test_partWithoutHeaders(self) -> None:
        """
        A part with no blank line after its headers, or no headers at all (an empty
        line first), still ends at the next delimiter, which is never mistaken for a
        header.
        """
        message = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: image/gif\n--b\n\nbody text, no headers\n"
            "--b\nContent-Type: image/png\n\nx\n--b--\n"
        )
        self.assertEqual(
            shape(message),
            [
                (0, "multipart/mixed", ()),
                (1, "image/gif", ()),
                (1, "text/plain", ()),
                (1, "image/png", ()),
            ],
        )

    def test_repeatedContentType(self) -> None:
        """Two Content-Type headers with different boundaries: either boundary splits parts."""
        message = crlf(
            "Content-Type: multipart/mixed; boundary=one\nContent-Type: multipart/mixed; boundary=two\n\n"
            "--one\nContent-Type: image/gif\n\nx\n--two\nContent-Type: image/png\n\nx\n--one--\n"
        )
        self.assertEqual([p.contentTypes[0] for p in parts(message)[1:]], ["image/gif", "image/png"])

    def test_depthLimit(self) -> None:
        """Nesting up to max_depth is read; one level more is refused."""
        self.assertEqual(len(parts(nestedBomb(5), maxDepth=5)), 6)
        with self.assertRaises(MimeStructureError) as caught:
            parts(nestedBomb(6), maxDepth=5)
        self.assertEqual(caught.exception.text, "MIME structure nested too deep (limit 5)")

    def test_tenThousandDeep(self) -> None:
        """
        A 10,000-deep nested multipart is refused at once: no recursion, no hang, only
        the first levels read.
        """
        bomb = nestedBomb(10000)
        stream = _CountingReader(bomb)
        with self.assertRaises(MimeStructureError) as caught:
            list(walk(stream, chunkSize=4096))
        self.assertEqual(caught.exception.text, "MIME structure nested too deep (limit 20)")
        # Only the first levels were read, a few of the header reader's 64 KiB reads (the
        # time it takes is bench/mimemessage.py's to measure, not asserted here).
        self.assertGreater(len(bomb), 500_000)
        self.assertLessEqual(stream.read_bytes, 3 * 65536)

    def test_deepMessageRfc822(self) -> None:
        """Nested message/rfc822 parts count as depth too."""
        message = b"Content-Type: message/rfc822\r\n\r\n" * 100 + b"\r\nbody\r\n"
        with self.assertRaises(MimeStructureError):
            parts(message)

    def test_partsLimit(self) -> None:
        """max_parts parts are read; one more is refused."""
        self.assertEqual(len(parts(wide(50), maxParts=50)), 51)
        with self.assertRaises(MimeStructureError) as caught:
            parts(wide(51), maxParts=50)
        self.assertEqual(caught.exception.text, "Too many MIME parts (limit 50)")

    def test_closingFlood(self) -> None:
        """A flood of closing delimiters is refused like a flood of parts."""
        message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b--\r\n" * 100
        with self.assertRaises(MimeStructureError):
            parts(message, maxParts=50)

    def test_headerBlockLimit(self) -> None:
        """A header block over the limit is refused, even as one endless line."""
        many = b"X-Filler: " + b"y" * 100 + b"\r\n"
        with self.assertRaises(MimeStructureError) as caught:
            parts(many * 20 + b"\r\nbody\r\n", maxHeaderBytes=1024)
        self.assertEqual(caught.exception.text, "MIME header block too large (limit 1024 bytes)")
        with self.assertRaises(MimeStructureError):
            parts(b"Subject: " + b"z" * 5000, maxHeaderBytes=1024)
        self.assertEqual(len(parts(many * 9 + b"\r\nbody\r\n", maxHeaderBytes=1024)), 1)

    def test_manyHeaderLinesCheap(self) -> None:
        """
        Header blocks full of (non-Content) fields cost a scan, not a parse: 10 MB of
        one-byte-valued fields in 80 parts walk in a fraction of a second (a parse of
        every field took seconds).
        """
        block = b"X:y\r\n" * 26000
        message = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"".join(b"--b\r\n" + block + b"\r\nx\r\n" for _ in range(80))
            + b"--b--\r\n"
        )
        parsed: list[str] = []
        original = mime._params

        def counting(field: str, value: str) -> list[tuple[str, str]]:
            parsed.append(field)
            return original(field, value)

        self.patch(mime, "_params", counting)
        self.assertEqual(len(parts(message)), 81)
        # The one Content-Type went to the parameter parser; none of the 2,080,000 others
        # (the time it takes is measured by bench/mimemessage.py, not asserted here).
        self.assertEqual(parsed, ["content-type"])

    def test_tooManyContentFields(self) -> None:
        """A part with more Content-* fields than any writer makes is refused."""
        fields = b"Content-Type: text/plain; name=a.txt\r\n" * 17
        with self.assertRaises(MimeStructureError) as caught:
            parts(fields + b"\r\nx\r\n")
        self.assertEqual(
            caught.exception.text,
            "Too many Content-* header fields in one MIME part (limit 16)",
        )
        self.assertEqual(len(parts(fields[: len(fields) // 17 * 16] + b"\r\nx\r\n")), 1)

    def test_longHeaderName(self) -> None:
        """
        A line longer than can be seen whole that could still be a header field name is
        refused as a too-large header block, rather than taken for the body.
        """
        with self.assertRaises(MimeStructureError):
            parts(b"Subject: x\r\n" + b"X" * 200000 + b": y\r\n\r\nbody\r\n")

    def test_longBodyLineAfterHeadersRefused(self) -> None:
        """
        A long line without a colon right after the headers (no blank line) is an
        ambiguous header block: refused, from the start of the line (it is not read
        whole).
        """
        message = b"Content-Type: image/gif\r\n" + b"GIF89a " * 100000 + b"\r\n"
        with self.assertRaises(AmbiguousHeaderError) as caught:
            parts(message)
        self.assertEqual(caught.exception.text, "Error: header line without a colon in line 2")

    def test_hugeLineStreamed(self) -> None:
        """
        A 32 MiB line without a newline is read in chunks: the walk's memory stays far
        below it, and the attachment after it is found.
        """
        head = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
        tail = b"\r\n--b\r\nContent-Type: application/octet-stream; name=after.exe\r\n\r\nMZ\r\n--b--\r\n"
        source = Segments([head, (b"A" * 65536, 512), tail])
        tracemalloc.start()
        try:
            found = list(walk(source))  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(found[-1].filenames, ("after.exe",))
        self.assertLess(peak, 2 * 1024 * 1024)


class ReaderTests(SynchronousTestCase):
    """The line reader under the walker."""

    def test_headerBlockStopsAtBody(self) -> None:
        """A header block ends at the blank line, which is consumed; the body is next."""
        reader = LineReader(io.BytesIO(b"A: 1\r\n b\r\nC: 2\r\n\r\nbody\r\n"), 3)
        self.assertEqual(readHeaderBlock(reader, 1024), b"A: 1\r\n b\r\nC: 2\r\n")
        self.assertEqual(reader.peekLine(100), (b"body", True))

    def test_longLineSkippedInChunks(self) -> None:
        """peekLine shows a long line's start; skipLine passes the whole line."""
        reader = LineReader(io.BytesIO(b"x" * 10000 + b"\r\nnext\r\n"), 7)
        self.assertEqual(reader.peekLine(5), (b"xxxxx", False))
        reader.skipLine()
        self.assertEqual(reader.peekLine(100), (b"next", True))
        reader.skipLine()
        self.assertIsNone(reader.peekLine(100))


# --- message builders ---------------------------------------------------------------------------


class _CountingReader(io.BytesIO):
    """A message stream that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.read_bytes += n
        return n


def nestedBomb(depth: int) -> bytes:
    """A multipart nested C{depth} levels deep (each level one part: the next level)."""
    return b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth)
    ) + b"Content-Type: text/plain\r\n\r\nbottom\r\n"


def wide(count: int) -> bytes:
    """A multipart/mixed of C{count} small parts."""
    body = b"".join(b"--w\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(count))
    return b"Content-Type: multipart/mixed; boundary=w\r\n\r\n" + body + b"--w--\r\n"


class Segments:
    """A binary file made of pieces, some repeated, produced as read: never held whole."""

    def __init__(self, pieces: list[bytes | tuple[bytes, int]]) -> None:
        self._pieces: Iterator[bytes] = (
            data
            for piece in pieces
            for data in ([piece] if isinstance(piece, bytes) else [piece[0]] * piece[1])
        )
        self._pending = b""

    def read(self, size: int) -> bytes:
        while len(self._pending) < size:
            more = next(self._pieces, None)
            if more is None:
                break
            self._pending += more
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


# --- random trees -------------------------------------------------------------------------------


@attrs.frozen
class Leaf:
    contentType: str
    filename: str | None
    body: tuple[str, ...]


@attrs.frozen
class Multi:
    subtype: str
    children: tuple[object, ...]


@attrs.frozen
class Encapsulated:
    inner: object


BODY_LINES = st.sampled_from(
    ["", "text", "-- ", "--", "--not-a-boundary", "Subject: not a header", "QUJD", " indented"]
)
leaves = st.builds(
    Leaf,
    st.sampled_from(["text/plain", "text/html", "image/png", "application/pdf"]),
    st.none() | st.from_regex(r"[a-z]{1,8}\.[a-z]{2,3}", fullmatch=True),
    st.lists(BODY_LINES, max_size=4).map(tuple),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.builds(
            Multi,
            st.sampled_from(["mixed", "alternative", "related"]),
            st.lists(children, min_size=1, max_size=4).map(tuple),
        ),
        st.builds(Encapsulated, children),
    ),
    max_leaves=12,
)


def render(tree: object, boundaries: Iterator[int]) -> str:
    """The entity C{tree} as LF-terminated text, without a final line end."""
    if isinstance(tree, Leaf):
        headers = f"Content-Type: {tree.contentType}\n"
        if tree.filename:
            headers += f'Content-Disposition: attachment; filename="{tree.filename}"\n'
        return headers + "\n" + "\n".join(tree.body)
    if isinstance(tree, Encapsulated):
        return "Content-Type: message/rfc822\n\n" + render(tree.inner, boundaries)
    assert isinstance(tree, Multi)
    b = f"=_b{next(boundaries)}_"
    lines = [f'Content-Type: multipart/{tree.subtype}; boundary="{b}"', "", "preamble"]
    for child in tree.children:
        lines.append(f"--{b}\n" + render(child, boundaries))
    lines += [f"--{b}--", "epilogue"]
    return "\n".join(lines)


def expected(tree: object, depth: int = 0) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """The entities of C{tree} in order, as the walker describes them."""
    if isinstance(tree, Leaf):
        yield depth, tree.contentType, (tree.filename,) if tree.filename else ()
    elif isinstance(tree, Encapsulated):
        yield depth, "message/rfc822", ()
        yield from expected(tree.inner, depth + 1)
    else:
        assert isinstance(tree, Multi)
        yield depth, f"multipart/{tree.subtype}", ()
        for child in tree.children:
            yield from expected(child, depth + 1)


class PropertyTests(SynchronousTestCase):
    """Properties of the walker over random messages and random reads."""

    @settings(max_examples=200, deadline=None)
    @given(trees, st.integers(min_value=1, max_value=300))
    def test_randomTrees(self, tree: object, chunkSize: int) -> None:
        """
        Any tree of nested multiparts and message/rfc822 parts is found entity by entity,
        at the right depths, whatever the size of the reads, and as the stdlib parser
        sees it.
        """
        message = crlf(render(tree, count()))
        want = list(expected(tree))
        self.assertEqual(shape(message, chunkSize), want)
        stdlib = email.message_from_bytes(message, policy=compat32)
        self.assertEqual(
            [(t, n) for _, t, n in want],
            [(m.get_content_type(), tuple(filter(None, [m.get_filename()]))) for m in stdlib.walk()],
        )

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Disposition: attachment; filename*0*=UTF-8''a; filename*1*=.exe\r\n",
                    b"--b\r\n",
                    b"--b--\r\n",
                    b"--b",
                    b"\r\n",
                    b"\n",
                    b"text line\r\n",
                    b" continuation\r\n",
                    b"x" * 300,
                ]
            ),
            max_size=40,
        ),
        st.integers(min_value=1, max_value=64),
    )
    def test_chunkSizeIrrelevant(self, pieces: list[bytes], chunkSize: int) -> None:
        """
        Any input, however malformed, walks the same for any read size: the same parts,
        or the same ambiguous header block refused after the same parts, never another
        error.
        """
        message = b"".join(pieces)

        def outcome(size: int) -> tuple[list[Part], str | None]:
            found: list[Part] = []
            try:
                for part in walk(io.BytesIO(message), chunkSize=size):
                    found.append(part)
            except AmbiguousHeaderError as e:
                return found, e.text
            return found, None

        self.assertEqual(outcome(chunkSize), outcome(65536))


# --- the filter -------------------------------------------------------------------------------


def build(**options: object) -> MimeFilter:
    built = MimeFilterFactory().build(options, ThreadedClock())
    assert isinstance(built, MimeFilter)
    return built


ATTACHED = crlf(
    "From: a@example.org\nSubject: invoice\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="=_x"\n\n'
    "--=_x\nContent-Type: text/plain\n\nPlease pay.\n"
    '--=_x\nContent-Type: application/octet-stream; name="invoice.exe"\n'
    'Content-Disposition: attachment; filename="invoice.exe"\n'
    "Content-Transfer-Encoding: base64\n\nTVqQAAMAAAAEAAAA\n"
    "--=_x--\n"
)


def stuffed(message: bytes) -> bytes:
    """C{message} as DATA content: dot-stuffed, with the end-of-data line."""
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class MimeFilterTests(SynchronousTestCase):
    """The filter's options and verdicts."""

    def scan(self, f: MimeFilter, message: bytes) -> Verdict:
        path = self.mktemp()
        with open(path, "wb") as out:
            out.write(message)
        result = self.successResultOf(
            f.checkMessage(Session("s", "127.0.0.1", 1), Envelope("a@x"), Message(path, len(message)))
        )
        return result

    def test_interface(self) -> None:
        """The factory builds an IFilter of the message stage, always run, with sane defaults."""
        f = build()
        self.assertTrue(verifyObject(IFilter, f))
        self.assertEqual(f.stages, frozenset({Stage.MESSAGE}))
        self.assertTrue(f.always)
        self.assertEqual((f.maxDepth, f.maxParts, f.maxHeaderBytes), (20, 1000, 131072))
        self.assertFalse(build(always=False).always)

    def test_badOptions(self) -> None:
        """Wrong options name the key at fault."""
        for options, key in [
            ({"block_filenames": "*.exe"}, "block_filenames"),
            ({"max_depth": 0}, "max_depth"),
            ({"max_parts": "many"}, "max_parts"),
            ({"max_header_bytes": 10}, "max_header_bytes"),
            ({"always": "yes"}, "always"),
            ({"block_filename": ["*.exe"]}, "block_filename"),
        ]:
            with self.assertRaises(OptionError) as caught:
                build(**options)
            self.assertEqual(caught.exception.key, key)

    def test_blockedFilename(self) -> None:
        """A blocked attachment name is refused with 550 5.7.1, naming the file."""
        verdict = self.scan(build(block_filenames=["*.exe", "*.scr"]), ATTACHED)
        self.assertEqual(
            (verdict.code, verdict.enhanced, verdict.text),
            (550, "5.7.1", 'Attachment "invoice.exe" refused: file type not accepted here'),
        )

    def test_windowsSpellings(self) -> None:
        """Case, trailing dots and spaces, and paths do not hide an extension."""
        f = build(block_filenames=["*.exe"])
        for name in ["INVOICE.EXE", "invoice.exe.", "invoice.exe  ", "C:\\tmp\\invoice.exe", "a/b.exe"]:
            message = crlf(f'Content-Disposition: attachment; filename="{name}"\n\nMZ\n')
            self.assertEqual(self.scan(f, message).code, 550, name)
        self.assertEqual(self.scan(f, crlf("Content-Type: text/plain; name=exe.txt\n\nx\n")).refuses, False)

    def test_blockedType(self) -> None:
        """A blocked content type is refused, by glob; named by its file name if it has one."""
        f = build(block_types=["application/x-ms*"])
        verdict = self.scan(f, crlf("Content-Type: application/x-msdownload\n\nMZ\n"))
        self.assertEqual(
            verdict.text,
            "MIME part of type application/x-msdownload refused: content type not accepted here",
        )
        verdict = self.scan(f, crlf("Content-Type: Application/X-MSDOWNLOAD; name=a.bin\n\nMZ\n"))
        self.assertEqual(verdict.text, 'Attachment "a.bin" refused: file type not accepted here')

    def test_replyTextSafe(self) -> None:
        """A name from the message reaches the reply as short printable ASCII only."""
        name = "=?UTF-8?B?" + "ItGB0YciDQouZXhl" + "?="  # '"сч"\r\n.exe'
        verdict = self.scan(
            build(block_filenames=["*.exe"]),
            crlf(f'Content-Disposition: attachment; filename="{name}"\n\nx\n'),
        )
        self.assertEqual(verdict.text, 'Attachment "??????.exe" refused: file type not accepted here')
        long = "x" * 200 + ".exe"
        verdict = self.scan(
            build(block_filenames=["*.exe"]), crlf(f"Content-Type: a/b; name={long}\n\nx\n")
        )
        self.assertIn('"' + "x" * 77 + '..."', verdict.text)

    def test_structureRefused(self) -> None:
        """MIME bombs are refused with 554 5.6.0 and a clear text."""
        verdict = self.scan(build(), nestedBomb(10000))
        self.assertEqual(
            (verdict.code, verdict.enhanced, verdict.text),
            (554, "5.6.0", "MIME structure nested too deep (limit 20)"),
        )
        verdict = self.scan(build(max_parts=10), wide(11))
        self.assertEqual((verdict.code, verdict.text), (554, "Too many MIME parts (limit 10)"))

    def test_notes(self) -> None:
        """The part count, types and attachment names are noted for later filters."""
        path = self.mktemp()
        with open(path, "wb") as out:
            out.write(NESTED)
        env = Envelope("a@x")
        verdict = self.successResultOf(
            build().checkMessage(Session("s", "127.0.0.1", 1), env, Message(path, len(NESTED)))
        )
        self.assertEqual(verdict, Verdict.accept())
        self.assertEqual(
            env.notes["mime"],
            {
                "parts": 4,
                "types": ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/pdf"],
                "filenames": ["report.pdf"],
            },
        )


class MimeProxyTests(SynchronousTestCase):
    """The filter in the proxy, in memory: what the client and the MTA see."""

    def test_refusedAttachment(self) -> None:
        """
        A message with a blocked attachment: the client sees 550 with the file's name,
        the MTA gets nothing, and the session goes on.
        """
        h = Harness(self, build(block_filenames=["*.exe"]))
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, stuffed(ATTACHED))
        self.assertEqual(client.replies[-1].code, 550)
        self.assertEqual(
            client.replies[-1].lines,
            (b'5.7.1 Attachment "invoice.exe" refused: file type not accepted here',),
        )
        self.assertEqual(h.mta.messages, [])
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))
        h.send(client, b"NOOP\r\n")
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(h.spooled(), [])

    def test_cleanMultipart(self) -> None:
        """A clean multipart message reaches the MTA byte for byte, with the MTA's 250."""
        h = Harness(self, build(block_filenames=["*.exe"], block_types=["application/x-ms*"]))
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, stuffed(NESTED))
        self.assertEqual(client.codes[-1], 250)
        [message] = h.mta.messages
        self.assertEqual(message.content, NESTED)

    def test_bombRefused(self) -> None:
        """A deeply nested message gets 554 5.6.0 and never reaches the MTA."""
        h = Harness(self, build())
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, stuffed(nestedBomb(10000)))
        self.assertEqual(
            client.replies[-1].lines, (b"5.6.0 MIME structure nested too deep (limit 20)",)
        )
        self.assertEqual(client.replies[-1].code, 554)
        self.assertEqual(h.mta.messages, [])

    def test_allowListedStillChecked(self) -> None:
        """
        An allow-listed session's attachments are still checked (always = true), unless
        the filter is configured with always = false.
        """
        for always, code in [(True, 550), (False, 250)]:
            allow = FakeFilter("dnswl", verdicts={Stage.MAIL: Verdict.allow()})
            h = Harness(self, allow, build(block_filenames=["*.exe"], always=always))
            client = h.greeted()
            h.send(client, envelope() + b"DATA\r\n")
            h.send(client, stuffed(ATTACHED))
            self.assertEqual(client.codes[-1], code)


# --- over real sockets ------------------------------------------------------------------------


def _port(listening: IListeningPort) -> int:
    return int(listening.getHost().port)  # type: ignore[attr-defined]


class LoopbackProxy:
    """
    The proxy as twistd builds it from a configuration file (so the filters come from
    the plugin, and blocking work goes to the real thread pool), in front of the
    stand-in MTA, on 127.0.0.1; stopped when the test ends.
    """

    def __init__(self, case: TestCase, filters: str) -> None:
        self._case = case
        self.mta = LocalMTA()
        mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        case.addCleanup(mtaPort.stopListening)
        spool = os.path.abspath(case.mktemp())
        _, self.port = startProxy(case, loopbackConfig(_port(mtaPort), spool, filters))

    async def send(self, message: bytes) -> RawClient:
        """One transaction and QUIT; returns the client once the proxy has closed."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self._case.addCleanup(lambda: client.transport and client.transport.loseConnection())
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(
            b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.net>\r\nDATA\r\n"
        )
        await client.expect(5)
        client.send(stuffed(message) + b"QUIT\r\n")
        await client.lost
        return client


@attrs.frozen
class RecordingMessage(Message):
    """A spooled message that records the threads it is read in."""

    threads: list[str] = attrs.field(factory=list)

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        self.threads.append(threading.current_thread().name)
        with Message.open(self) as f:
            yield f


class MimeLoopbackTests(TestCase):
    """The mime filter configured in a file, over real loopback sockets."""

    def test_threadPool(self) -> defer.Deferred[None]:
        """Built by its factory with a real reactor, the filter walks in the thread pool."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ATTACHED)
        message = RecordingMessage(path, len(ATTACHED))
        built = MimeFilterFactory().build({"block_filenames": ["*.exe"]}, reactor)  # type: ignore[arg-type]
        d = built.checkMessage(Session("s", "127.0.0.1", 1), Envelope("a@x"), message)

        def check(verdict: Verdict) -> None:
            self.assertEqual(verdict.code, 550)
            self.assertEqual(len(message.threads), 1)
            self.assertNotEqual(message.threads[0], threading.current_thread().name)

        return defer.maybeDeferred(lambda: d).addCallback(check)

    def test_refusedThenClean(self) -> defer.Deferred[None]:
        """
        Configured as [filters.mime], the filter refuses a blocked attachment (550) in the
        thread pool and lets a clean multipart through unchanged.
        """

        async def go() -> None:
            proxy = LoopbackProxy(self, '[filters.mime]\nblock_filenames = ["*.exe"]\n')
            client = await proxy.send(ATTACHED)
            self.assertEqual(client.codes[-2:], [550, 221])
            self.assertIn(b"invoice.exe", client.replies[-2].lines[0])
            self.assertEqual(proxy.mta.messages, [])
            client = await proxy.send(NESTED)
            self.assertEqual(client.codes[-2:], [250, 221])
            self.assertEqual([m.content for m in proxy.mta.messages], [NESTED])

        return defer.Deferred.fromCoroutine(go())
