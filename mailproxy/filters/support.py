"""
What the built-in filters share, so that no filter module imports another.

  - L{Patterns}: case-insensitive glob patterns, for names and addresses;
  - reading a spooled message's header blocks a chunk at a time, bounded
    (L{LineReader}, L{readHeaderBlock}), by the one header grammar
    (L{mailproxy.headergrammar}: an ambiguous block is L{AmbiguousHeaderError}), and
    their fields (L{parseHeaders}, L{decodeText}), for the mime and headers filters;
  - running blocking work in the reactor's thread pool (L{inThreadPool}).

A built-in filter imports the filter API (L{mailproxy.filters}), this module,
L{mailproxy.filters.options}, L{mailproxy.filters.daemon} and modules outside the
filters (L{mailproxy.dns}, L{mailproxy.net}, ...), never another filter module:
C{tests/test_layering.py} checks it.
"""

from __future__ import annotations

import codecs
import fnmatch
import re
from collections.abc import Callable
from email.errors import HeaderParseError
from email.header import decode_header
from typing import IO, ParamSpec, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailproxy import headergrammar
from mailproxy.envelope import Message, Session
from mailproxy.filters.options import Options

_T = TypeVar("_T")
_P = ParamSpec("_P")

# --- matching ----------------------------------------------------------------------------------


@attrs.frozen
class Patterns:
    """Case-insensitive glob patterns, each compiled once."""

    patterns: tuple[str, ...]

    def match(self, value: str) -> bool:
        value = value.lower()
        return any(fnmatch.fnmatchcase(value, p) for p in self.patterns)

    @classmethod
    def parse(cls, options: Options, key: str) -> Patterns:
        return cls(tuple(p.lower() for p in options.strings(key)))


# --- reading a spooled message ----------------------------------------------------------------

#: Bytes read from the spool file at a time.
CHUNK_SIZE = 64 * 1024
#: Longest MIME boundary taken (RFC 2046 allows 70; lenient writers go further). A
#: multipart with a longer one, or none, is read as a single part.
MAX_BOUNDARY = 998
#: Bytes of a line looked at to recognise a delimiter or a header line.
PEEK = MAX_BOUNDARY + 8
#: The largest header block read by default (the session's limit too).
DEFAULT_MAX_HEADER_BYTES = headergrammar.MAX_HEADER_BYTES

#: What ends a header block, tried at each line start: an empty line (consumed), or a
#: line that is neither a header field's first line nor a continuation by the header
#: grammar (L{mailproxy.headergrammar}: the block is then ambiguous, and refused); a
#: C{%s} for more alternatives (the mime walk adds the delimiter lines of the open
#: multiparts).
BLOCK_END = (
    rb"^(?:(?P<empty>\r?\n|\r?\Z)%s"
    rb"|(?P<line>(?![\041-\071\073-\176]+:|[\t ]+[^\t \r\n])))"
)
#: The end of a message's own header block.
HEADER_END = re.compile(BLOCK_END % b"", re.MULTILINE)
# The start of a line too long to see whole, that may still turn out to be a header.
_HEADER_NAME_SO_FAR = re.compile(rb"[\041-\071\073-\176]*\Z")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def unfold(value: str) -> str:
    """A header value on one line: its folding line breaks removed (RFC 5322 2.2.3)."""
    return _FOLD.sub("", value)


class MimeStructureError(Exception):
    """The structure is over a limit (a MIME bomb); C{text} says which, for the reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class AmbiguousHeaderError(MimeStructureError):
    """A header block the header grammar refuses; C{finding} says why and where."""

    def __init__(self, finding: headergrammar.Finding, text: str | None = None) -> None:
        super().__init__(text or finding.text)
        self.finding = finding


class LineReader:
    """
    Reads a binary file a chunk at a time, by lines, without ever holding more than a
    chunk and one bounded look-ahead: a line of any length is skipped in chunks.
    """

    def __init__(self, f: IO[bytes], chunkSize: int = CHUNK_SIZE) -> None:
        self._f = f
        self._chunkSize = chunkSize
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        #: How the last L{headerBlock} ended: C{"empty"} (an empty line), C{"end"} (of
        #: the file), C{"delimiter"}, or C{"line"} (one the grammar does not take).
        self.stopped = "end"

    def _more(self) -> bool:
        """Append a chunk to the buffer, dropping what was consumed; false at the end."""
        if self._eof:
            return False
        data = self._f.read(self._chunkSize)
        if not data:
            self._eof = True
            return False
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        return True

    def _fill(self, count: int) -> None:
        while len(self._buf) - self._pos < count and self._more():
            pass

    def peekLine(self, limit: int) -> tuple[bytes, bool] | None:
        """
        The line at the read position, without its line ending, and whether it is whole:
        a longer line gives its first C{limit} bytes and false. L{None} at the end.
        The position does not move.
        """
        while True:
            end = self._buf.find(b"\n", self._pos, self._pos + limit)
            if end >= 0:
                return _chomp(bytes(self._buf[self._pos : end])), True
            if len(self._buf) - self._pos >= limit:
                return bytes(self._buf[self._pos : self._pos + limit]), False
            if not self._more():
                if self._pos >= len(self._buf):
                    return None
                return _chomp(bytes(self._buf[self._pos :])), True

    def skipLine(self) -> None:
        """Move past the end of the current line (in chunks, however long it is)."""
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end >= 0:
                self._pos = end + 1
                return
            self._pos = len(self._buf)
            if not self._more():
                return

    def seek(self, atStart: re.Pattern[bytes], anywhere: re.Pattern[bytes], keep: int) -> bool:
        """
        Move to the start of the next line matching C{atStart}, from the current line
        (which must be at a line start) on; false at the end of the file.

        @param anywhere: C{atStart} preceded by C{\\n}, searched for a buffer at a time.
        @param keep: the longest match, C{\\n} included: as many bytes are kept from the
            end of a buffer, in case a match straddles two reads.
        """
        self._fill(keep)
        if atStart.match(self._buf, self._pos):
            return True
        while True:
            found = anywhere.search(self._buf, self._pos)
            if found is not None:
                self._pos = found.start() + 1
                return True
            self._pos = max(self._pos, len(self._buf) - keep)
            if not self._more():
                return False

    def headerBlock(self, limit: int, end: re.Pattern[bytes] = HEADER_END) -> bytes:
        """
        Read the header block at the position (a line start), scanning a buffer at a
        time: its bytes, line endings included. It ends at an empty line (consumed), at
        the end of the file, or at the line C{end} finds (not consumed: it starts the
        body).

        @param limit: the most bytes the block may take.
        @raise MimeStructureError: the block is larger than C{limit}.
        """
        window = limit + PEEK
        self._fill(window)
        stop = min(len(self._buf), self._pos + window)
        found = end.search(self._buf, self._pos, stop)
        atEnd = self._eof and stop == len(self._buf)
        if found is None:
            # Header lines all through the window: too many, unless the file ends there.
            if not atEnd or stop - self._pos > limit:
                raise _tooLarge(limit)
            block = bytes(self._buf[self._pos : stop])
            self._pos = stop
            self.stopped = "end"
            return block
        at = found.start()
        if at - self._pos > limit:
            raise _tooLarge(limit)
        block = bytes(self._buf[self._pos : at])
        self.stopped = found.lastgroup or "end"
        if found.group("empty") is not None:
            self._pos = found.end()
            self.stopped = "empty" if found.end() > at else "end"
        elif (
            found.groupdict().get("delimiter") is None
            and not atEnd
            and self._buf.find(b"\n", at, stop) < 0
            and _HEADER_NAME_SO_FAR.match(self._buf, at, stop)
        ):
            # A line longer than the window that may yet be a header field.
            raise _tooLarge(limit)
        else:
            self._pos = at
        return block


def _tooLarge(limit: int) -> MimeStructureError:
    return MimeStructureError(f"MIME header block too large (limit {limit} bytes)")


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def readHeaderBlock(reader: LineReader, limit: int, end: re.Pattern[bytes] = HEADER_END) -> bytes:
    """
    Read the header block of a message (or entity) at C{reader}'s position (see
    L{LineReader.headerBlock}) and check it by the header grammar.

    @raise AmbiguousHeaderError: the grammar refuses the block (then the session would
        have refused or rewritten it: this is a message that did not come through it,
        or a MIME part's header).
    @raise MimeStructureError: the block is larger than C{limit}.
    """
    block = reader.headerBlock(limit, end)
    checked = block
    if reader.stopped == "line":
        peeked = reader.peekLine(PEEK)
        assert peeked is not None  # the block stopped at a line
        ending = b"\n" if block and b"\r\n" not in block else b"\r\n"
        checked = block + peeked[0] + ending
    finding = headergrammar.check(checked, len(checked))
    if finding is not None:
        raise AmbiguousHeaderError(finding)
    return block


def parseHeaders(block: bytes) -> list[tuple[str, str]]:
    """
    The fields of a header block, read by the header grammar
    (L{mailproxy.headergrammar.fields}): names as written, values unfolded, still
    encoded (raw 8-bit bytes appear as surrogate escapes).
    """
    return headergrammar.fields(block)


_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


#: The charsets mail clients decode (the WHATWG Encoding Standard's, as Python names their
#: codecs, and the usual aliases: gb2312, cp932, tis-620, iso-8859-9, latin-1). Python knows
#: many more codecs that no mail client applies to a header (punycode, idna, utf-7, the
#: *_escape ones): decoding with them would show a filter another name than the recipient
#: sees (=?punycode?q?invoice.exe?= is CJK text to Python), so they read as UTF-8.
MAIL_CHARSETS: frozenset[str] = frozenset(
    {
        "utf-8", "utf-16", "utf-16-be", "utf-16-le", "ascii", "iso8859-1", "cp866",
        "iso8859-2", "iso8859-3", "iso8859-4", "iso8859-5", "iso8859-6", "iso8859-7",
        "iso8859-8", "iso8859-9", "iso8859-10", "iso8859-13", "iso8859-14", "iso8859-15",
        "iso8859-16", "koi8-r", "koi8-u", "mac-roman", "cp874", "cp1250", "cp1251", "cp1252",
        "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258", "mac-cyrillic", "gbk",
        "gb2312", "gb18030", "big5", "euc_jp", "iso2022_jp", "shift_jis", "cp932", "euc_kr",
        "tis-620",
    }
)  # fmt: skip


def mailCharset(charset: str) -> str:
    """The codec to decode an encoded word's C{charset} with: UTF-8 unless mail clients know it."""
    name = charset.split("*", 1)[0]  # RFC 2231 section 5 allows a language: utf-8*en
    try:
        codec = codecs.lookup(name).name
    except (LookupError, ValueError):  # unknown, or not even a name (a NUL: ValueError)
        return "utf-8"
    return codec if codec in MAIL_CHARSETS else "utf-8"


def decodeText(value: str) -> str:
    """
    A header value or parameter as a reader would show it: RFC 2047 encoded words
    decoded (unknown charsets and bad encodings replaced, never an error), raw 8-bit
    bytes read as UTF-8.
    """
    if "=?" in value:
        try:
            pieces = decode_header(value)
        except (HeaderParseError, ValueError):
            pieces = [(value, None)]
        out = []
        for piece, charset in pieces:
            if isinstance(piece, str):
                out.append(piece)
            elif charset is None:
                try:
                    out.append(piece.decode("raw-unicode-escape"))
                except UnicodeDecodeError:
                    # Text beside encoded words with a literal "\\u" in it: the stdlib
                    # encodes it so that it does not decode (found by fuzz/, issue 9).
                    out.append(piece.decode("latin-1"))
            else:
                out.append(piece.decode(mailCharset(charset), "replace"))
        # A literal "\\udXXX" beside encoded words comes back a lone surrogate: only
        # those of raw 8-bit bytes (U+DC80-U+DCFF) are bytes (found by fuzz/, issue 9).
        value = _LONE_SURROGATE.sub("\ufffd", "".join(out))
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --- running blocking work ---------------------------------------------------------------------


class NoThreadPoolError(TypeError):
    """
    The reactor has no thread pool (it does not provide L{IReactorThreads}), so blocking
    work has nowhere to run: it is never run in the reactor's thread instead. In tests,
    give the filter L{mailproxy.testing_threads.ThreadedClock}.
    """


def requireThreads(reactor: object) -> IReactorThreads:
    """
    The reactor, as the thread pool that blocking work will run in: check it when the
    filter is built, so that a reactor without one fails then, not at the first message.

    @raise NoThreadPoolError: C{reactor} does not provide L{IReactorThreads}.
    """
    if not IReactorThreads.providedBy(reactor):
        raise NoThreadPoolError(
            f"{reactor!r} has no thread pool (IReactorThreads) to run blocking work in"
        )
    return reactor


def inThreadPool(
    reactor: object, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> Deferred[_T]:
    """
    Run C{f(*args, **kwargs)} in C{reactor}'s thread pool; the Deferred fires with its
    result (or its exception) in the reactor's thread. The one way mailproxy runs
    blocking work (pyspf, the MIME walk, file copies): never in the reactor's thread.

    @raise NoThreadPoolError: C{reactor} has no thread pool; C{f} is not run.
    """
    threads = requireThreads(reactor)
    return deferToThreadPool(threads, threads.getThreadPool(), f, *args, **kwargs)


def tooLarge(log: Logger, scanner: str, session: Session, message: Message, limit: int) -> bool:
    """
    Whether C{message} is over a scanner's C{max_size} (0: no limit), which then leaves it
    unscanned and accepted, as the daemons themselves do; logged, naming the sizes.
    """
    if not limit or message.size <= limit:
        return False
    log.info(
        "{session} {scanner}: not scanned: {size} bytes, over max_size {maxSize}",
        session=session.id,
        scanner=scanner,
        size=message.size,
        maxSize=limit,
    )
    return True


def stripComments(value: str, keepQuoted: bool = False) -> str:
    """
    A structured header value (RFC 5322 section 3.2.2) with its comments, nested too, each
    replaced by a space, in one pass however deep a sender nests them (an unclosed comment
    runs to the end); its quoted strings emptied (C{""}), or with C{keepQuoted} kept as
    they are, escapes and all.
    """
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
            if quoted and keepQuoted:
                out.append(c)
        elif c == "\\" and (depth or quoted):
            escaped = True
            if quoted and keepQuoted:
                out.append(c)
        elif quoted:
            if c == '"':
                quoted = False
                out.append('"' if keepQuoted else '""')
            elif keepQuoted:
                out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
        elif not depth:
            if c == '"':
                quoted = True
                if keepQuoted:
                    out.append(c)
            else:
                out.append(c)
    return "".join(out)
