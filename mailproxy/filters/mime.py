"""
The mime filter: refuses messages with a part of a blocked content type or an attachment
with a blocked file name, found by walking the MIME structure of the spooled message.

The walk streams the spool file a chunk at a time and never holds a part in memory: the
header block of each entity (bounded) is scanned for its Content-* fields, which are parsed
with the standard library's parameter parsing; part bodies are only searched, a whole
buffer at a time, for the boundary delimiters of the multiparts around them. It is iterative (an explicit stack of open
multiparts, no recursion), refuses MIME bombs by depth and part count, and runs in the
reactor's thread pool, since it is blocking file I/O and CPU work.

Where MIME readers disagree, the walk leans to finding more parts rather than fewer, so
that no reader shows an attachment the walk missed:
  - a delimiter is any line that I{starts} with C{--boundary}, whatever follows it;
  - a closing delimiter does not end the search: later delimiters of the same
    multipart (in its epilogue) still start parts;
  - every C{Content-Type} and C{Content-Disposition} header of an entity counts, with
    every C{filename} and C{name} parameter in them;
  - an entity that declares both a multipart and C{message/rfc822} is read as both.
A C{message/rfc822} part whose content is base64 or quoted-printable encoded (which RFC
2046 forbids) is not decoded: the message inside is not looked at.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value
from typing import IO, Protocol, TypeVar, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, Stage, Verdict
from mailproxy.filters.access import Patterns
from mailproxy.filters.options import Options

_T = TypeVar("_T")

#: Bytes read from the spool file at a time.
CHUNK_SIZE = 64 * 1024
#: Longest boundary taken (RFC 2046 allows 70; lenient writers go further). A multipart
#: with a longer one, or none, is read as a single part.
MAX_BOUNDARY = 998
#: Boundaries kept per multipart (from repeated Content-Type headers).
_MAX_MARKERS = 8
#: Bytes of a line looked at to recognise a delimiter or a header line.
_PEEK = MAX_BOUNDARY + 8

DEFAULT_MAX_DEPTH = 20
DEFAULT_MAX_PARTS = 1000
DEFAULT_MAX_HEADER_BYTES = 128 * 1024

# What ends a header block, tried at each line start: an empty line (consumed), or a
# line that is neither a header field's first line nor a continuation (the stdlib feed
# parser's rule); with open multiparts, also any of their delimiter lines.
_BLOCK_END = rb"^(?:(?P<empty>\r?\n|\r?\Z)%s|(?![\041-\071\073-\176]*:|[\t ]))"
_HEADER_END = re.compile(_BLOCK_END % b"", re.MULTILINE)
# The start of a line too long to see whole, that may still turn out to be a header.
_HEADER_NAME_SO_FAR = re.compile(rb"[\041-\071\073-\176]*\Z")
# The fields that matter to the walk, with their continuation lines.
_CONTENT_FIELDS = re.compile(
    rb"^(content-(?:type|disposition|transfer-encoding)):(.*(?:\n[\t ].*)*)",
    re.MULTILINE | re.IGNORECASE,
)
#: The most Content-* fields in one header block (one of each is the norm).
MAX_CONTENT_FIELDS = 16
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_COMMENT = re.compile(r"\([^()]*\)")
_ENCAPSULATED = frozenset({"message/rfc822", "message/global"})
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


class MimeStructureError(Exception):
    """The structure is over a limit (a MIME bomb); C{text} says which, for the reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


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


    def headerBlock(self, limit: int, end: re.Pattern[bytes] = _HEADER_END) -> bytes:
        """
        Read the header block at the position (a line start), scanning a buffer at a
        time: its bytes, line endings included. It ends at an empty line (consumed), at
        the end of the file, or at the line C{end} finds (not consumed: it starts the
        body).

        @param limit: the most bytes the block may take.
        @raise MimeStructureError: the block is larger than C{limit}.
        """
        window = limit + _PEEK
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
            return block
        at = found.start()
        if at - self._pos > limit:
            raise _tooLarge(limit)
        block = bytes(self._buf[self._pos : at])
        if found.group("empty") is not None:
            self._pos = found.end()
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


def readHeaderBlock(reader: LineReader, limit: int) -> bytes:
    """
    Read the header block of a message at C{reader}'s position (see
    L{LineReader.headerBlock}).

    @raise MimeStructureError: the block is larger than C{limit}.
    """
    return reader.headerBlock(limit)


def parseHeaders(block: bytes) -> list[tuple[str, str]]:
    """
    The fields of a header block: names as written, values unfolded, still encoded
    (raw 8-bit bytes appear as surrogate escapes).
    """
    parsed = BytesHeaderParser(policy=compat32).parsebytes(block + b"\r\n")
    return [(name, _FOLD.sub("", value)) for name, value in parsed.raw_items()]


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
                out.append(piece.decode("raw-unicode-escape"))
            else:
                try:
                    # RFC 2231 section 5 allows a language: =?utf-8*en?q?...?=
                    out.append(piece.decode(charset.split("*", 1)[0], "replace"))
                except LookupError:
                    out.append(piece.decode("utf-8", "replace"))
        value = "".join(out)
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@attrs.frozen
class Part:
    """
    One MIME entity, as the walk found it.

    @ivar depth: 0 for the message itself, 1 for its parts or the message inside a
        C{message/rfc822} message, and so on.
    @ivar contentTypes: the declared types (C{type/subtype}, lower case), or the default
        (C{text/plain}; C{message/rfc822} in a C{multipart/digest}) when none is valid.
    @ivar filenames: every C{filename} and C{name} parameter, decoded (RFC 2231, RFC 2047).
    """

    depth: int
    contentTypes: tuple[str, ...]
    filenames: tuple[str, ...] = ()


@attrs.frozen
class _Frame:
    """An open multipart: its boundaries (more than one if it declared several)."""

    boundaries: tuple[bytes, ...]
    depth: int
    digest: bool


def _mediaType(value: str) -> str | None:
    token = _COMMENT.sub("", value.split(";", 1)[0])
    token = "".join(token.split()).lower()
    kind, slash, sub = token.partition("/")
    return token if kind and slash and sub and "/" not in sub else None


# The stdlib turns a header value with raw 8-bit bytes (surrogate escapes) into
# replacement characters before it splits the parameters: carry those bytes through it
# as private-use characters instead, so that names and boundaries keep their bytes.
_RAW_TO_PRIVATE = {0xDC80 + i: 0xF780 + i for i in range(128)}
_PRIVATE_TO_RAW = {v: k for k, v in _RAW_TO_PRIVATE.items()}


def _params(header: str, value: str) -> list[tuple[str, str]]:
    """
    The parameters of one header value, RFC 2231 continuations and charsets applied;
    raw 8-bit bytes stay surrogate escapes.
    """
    holder = EmailMessage()
    holder[header] = value.translate(_RAW_TO_PRIVATE)
    params = [
        (name, collapse_rfc2231_value(raw).translate(_PRIVATE_TO_RAW))
        for name, raw in holder.get_params(failobj=[], header=header) or []
    ]
    # The first pair is the value itself ("attachment", ""); kept, as it may be a
    # parameter when the value is missing, and it is neither "name" nor "filename" else.
    return [(name.lower(), raw) for name, raw in params]


def describe(block: bytes, depth: int, inDigest: bool) -> tuple[Part, _Frame | None, bool]:
    """
    What an entity's header block declares. Only its Content-* fields are parsed (with
    the stdlib's parameter parsing), so that a block of many other fields costs a scan.

    @return: the L{Part}; the L{_Frame} to open if it is a multipart with a usable
        boundary; whether its body is itself an entity (an unencoded C{message/rfc822}).
    @raise MimeStructureError: more than L{MAX_CONTENT_FIELDS} Content-* fields.
    """
    types: list[str] = []
    names: list[str] = []
    boundaries: list[bytes] = []
    encodings: list[str] = []
    fields = _CONTENT_FIELDS.findall(block)
    if len(fields) > MAX_CONTENT_FIELDS:
        raise MimeStructureError(
            f"Too many Content-* header fields in one MIME part (limit {MAX_CONTENT_FIELDS})"
        )
    for rawName, rawValue in fields:
        field = rawName.decode("ascii").lower()
        value = _FOLD.sub("", rawValue.decode("ascii", "surrogateescape")).strip()
        if field == "content-type":
            media = _mediaType(value)
            if media is not None:
                types.append(media)
            params = _params(field, value)
            names.extend(v for k, v in params if k in ("name", "filename"))
            if media is not None and media.startswith("multipart/"):
                for k, v in params:
                    boundary = v.rstrip().encode("utf-8", "surrogateescape")
                    if k == "boundary" and 0 < len(boundary) <= MAX_BOUNDARY:
                        boundaries.append(boundary)
        elif field == "content-disposition":
            names.extend(v for k, v in _params(field, value) if k in ("name", "filename"))
        elif field == "content-transfer-encoding":
            encodings.append("".join(_COMMENT.sub("", value).split()).lower())
    if not types:
        types.append("message/rfc822" if inDigest else "text/plain")
    part = Part(depth, tuple(types), tuple(decodeText(n) for n in names if n))
    frame = None
    unique = tuple(dict.fromkeys(boundaries))[:_MAX_MARKERS]
    if unique:
        frame = _Frame(unique, depth, "multipart/digest" in types)
    encapsulated = bool(_ENCAPSULATED.intersection(types)) and all(
        e in _IDENTITY_ENCODINGS for e in encodings
    )
    return part, frame, encapsulated


class _Delimiters:
    """The delimiter lines of the open multiparts, as patterns to search for."""

    def __init__(self, frames: list[_Frame]) -> None:
        self.frames = tuple(frames)
        markers = sorted({b for f in frames for b in f.boundaries}, key=len, reverse=True)
        body = b"--(?:" + b"|".join(re.escape(m) for m in markers) + b")"
        self.atStart = re.compile(body)
        self.anywhere = re.compile(b"\n" + body)
        self.keep = 3 + len(markers[0])
        self.headerEnd = re.compile(_BLOCK_END % (b"|(?P<delimiter>" + body + b")"), re.MULTILINE)

    def match(self, line: bytes) -> tuple[int, bool] | None:
        """The innermost frame C{line} is a delimiter of, and whether it closes it."""
        for index in range(len(self.frames) - 1, -1, -1):
            for boundary in self.frames[index].boundaries:
                if line.startswith(boundary, 2) and line.startswith(b"--"):
                    return index, line.startswith(b"--", 2 + len(boundary))
        return None


def walk(
    f: IO[bytes],
    maxDepth: int = DEFAULT_MAX_DEPTH,
    maxParts: int = DEFAULT_MAX_PARTS,
    maxHeaderBytes: int = DEFAULT_MAX_HEADER_BYTES,
    chunkSize: int = CHUNK_SIZE,
) -> Iterator[Part]:
    """
    The MIME entities of the message in C{f}, in order (the message itself first),
    read a chunk at a time; stop iterating at any point.

    Malformed structure is read the way lenient readers do, never refused: a multipart
    whose boundary never appears is all preamble; parts left open at the end of the
    file end there; a delimiter of an outer multipart closes the inner ones.

    @param maxDepth: the deepest nesting allowed (the message is at depth 0).
    @param maxParts: the most entities allowed besides the message itself.
    @param maxHeaderBytes: the largest header block of any entity.
    @raise MimeStructureError: when a limit is passed.
    """
    reader = LineReader(f, chunkSize)
    frames: list[_Frame] = []
    delimiters: _Delimiters | None = None
    entity: tuple[int, bool] | None = (0, False)
    parts = closings = 0
    while True:
        if entity is not None:
            depth, inDigest = entity
            entity = None
            if depth > maxDepth:
                raise MimeStructureError(f"MIME structure nested too deep (limit {maxDepth})")
            if depth:
                parts += 1
                if parts > maxParts:
                    raise MimeStructureError(f"Too many MIME parts (limit {maxParts})")
            block = reader.headerBlock(
                maxHeaderBytes, _HEADER_END if delimiters is None else delimiters.headerEnd
            )
            part, frame, encapsulated = describe(block, depth, inDigest)
            yield part
            if frame is not None:
                frames.append(frame)
                delimiters = _Delimiters(frames)
            if encapsulated:
                entity = (depth + 1, False)
                continue
        if delimiters is None:
            return
        if not reader.seek(delimiters.atStart, delimiters.anywhere, delimiters.keep):
            return
        peeked = reader.peekLine(_PEEK)
        assert peeked is not None  # seek stopped at a line
        found = delimiters.match(peeked[0])
        assert found is not None  # what seek finds is a delimiter
        reader.skipLine()
        index, closing = found
        if index + 1 < len(frames):
            del frames[index + 1 :]
            delimiters = _Delimiters(frames)
        if closing:
            # Each multipart closes once; more closings than parts is a bomb of them.
            closings += 1
            if closings > maxParts + 1:
                raise MimeStructureError(f"Too many MIME parts (limit {maxParts})")
            continue
        entity = (frames[index].depth + 1, frames[index].digest)


# --- running blocking work ---------------------------------------------------------------------


class Blocking(Protocol):
    """Runs a blocking function somewhere, firing a Deferred with its result."""

    def __call__(self, f: Callable[[], _T]) -> Deferred[_T]: ...


def inThisThread(f: Callable[[], _T]) -> Deferred[_T]:
    """Run C{f} now, here (for tests: synchronous, deterministic)."""
    return defer.maybeDeferred(f)


def inThreadPool(reactor: IReactorTime) -> Blocking:
    """
    Run functions in C{reactor}'s thread pool, or here when it has none (a
    L{twisted.internet.task.Clock} in tests).
    """
    if not IReactorThreads.providedBy(reactor):
        return inThisThread
    threads = cast(IReactorThreads, reactor)

    def run(f: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(cast(IReactorFromThreads, reactor), threads.getThreadPool(), f)

    return run


# --- the filter ----------------------------------------------------------------------------------


@attrs.frozen
class _Scan:
    verdict: Verdict
    parts: int
    types: tuple[str, ...]
    filenames: tuple[str, ...]


_NOTHING = Patterns(())


def _shown(text: str, limit: int = 80) -> str:
    """A name from the message, safe in an SMTP reply: printable ASCII, no quotes, short."""
    safe = "".join(c if " " <= c <= "~" and c not in "\"\\" else "?" for c in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _candidates(filename: str) -> set[str]:
    """
    The spellings of a file name to match: as given, and as saved on Windows (last path
    component, control characters dropped, trailing dots and spaces stripped).
    """
    lowered = filename.lower()
    saved = re.split(r"[/\\]", lowered)[-1]
    saved = "".join(c for c in saved if c.isprintable()).strip().rstrip(". ")
    return {lowered, saved}


@implementer(IFilter)
@attrs.frozen
class MimeFilter(BaseFilter):
    """
    Refuses a message with a part of a blocked type or an attachment with a blocked
    name (550 5.7.1), or a MIME structure over the limits (554 5.6.0).
    """

    blockTypes: Patterns = _NOTHING
    blockFilenames: Patterns = _NOTHING
    maxDepth: int = DEFAULT_MAX_DEPTH
    maxParts: int = DEFAULT_MAX_PARTS
    maxHeaderBytes: int = DEFAULT_MAX_HEADER_BYTES
    always: bool = True
    #: Where the blocking walk runs: the reactor's thread pool, or here in tests.
    runBlocking: Blocking = inThisThread
    chunkSize: int = CHUNK_SIZE
    name = "mime"
    stages = frozenset({Stage.MESSAGE})

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Deferred[Verdict]:
        def noted(scan: _Scan) -> Verdict:
            envelope.notes["mime"] = {
                "parts": scan.parts,
                "types": list(scan.types),
                "filenames": list(scan.filenames),
            }
            return scan.verdict

        return self.runBlocking(lambda: self.scan(message)).addCallback(noted)

    def scan(self, message: Message) -> _Scan:
        """Walk the message (blocking); stop at the first blocked part."""
        types: dict[str, None] = {}
        filenames: list[str] = []
        count = 0
        verdict = Verdict.accept()
        with message.open() as f:
            try:
                for part in walk(f, self.maxDepth, self.maxParts, self.maxHeaderBytes, self.chunkSize):
                    count += 1
                    types.update(dict.fromkeys(part.contentTypes))
                    filenames.extend(part.filenames[: self.maxParts - len(filenames)])
                    refusal = self.refusal(part)
                    if refusal is not None:
                        verdict = refusal
                        break
            except MimeStructureError as e:
                # 554 5.6.0 rather than 550 5.7.1: the content as such is unacceptable
                # (RFC 3463 X.6.0, media error), not the sender; and not 552, which
                # suggests a smaller retry would do.
                verdict = Verdict.reject(e.text, 554, "5.6.0")
        return _Scan(verdict, max(count - 1, 0), tuple(types), tuple(filenames))

    def refusal(self, part: Part) -> Verdict | None:
        """The refusal of C{part}, if it is blocked."""
        badName = next(
            (n for n in part.filenames if any(map(self.blockFilenames.match, _candidates(n)))),
            None,
        )
        badType = next((t for t in part.contentTypes if self.blockTypes.match(t)), None)
        if badName is None and badType is None:
            return None
        if badName is not None or part.filenames:
            shown = _shown(badName if badName is not None else part.filenames[0])
            return Verdict.reject(f'Attachment "{shown}" refused: file type not accepted here')
        assert badType is not None
        return Verdict.reject(
            f"MIME part of type {_shown(badType)} refused: content type not accepted here"
        )


@implementer(IPlugin, IFilterFactory)
class MimeFilterFactory:
    name = "mime"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        built = MimeFilter(
            blockTypes=Patterns.parse(o, "block_types"),
            blockFilenames=Patterns.parse(o, "block_filenames"),
            maxDepth=o.integer("max_depth", DEFAULT_MAX_DEPTH, minimum=1),
            maxParts=o.integer("max_parts", DEFAULT_MAX_PARTS, minimum=1),
            maxHeaderBytes=o.integer("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, minimum=1024),
            always=o.boolean("always", True),
            runBlocking=inThreadPool(reactor),
        )
        o.finish()
        return built
