"""
The mime filter: refuses messages with a part of a blocked content type or an attachment
with a blocked file name, found by walking the MIME structure of the spooled message.

The walk streams the spool file a chunk at a time and never holds a part in memory: the
header block of each entity (bounded) is scanned for its Content-* fields, which are parsed
with the standard library's parameter parsing; part bodies are only searched, a whole
buffer at a time, for the boundary delimiters of the multiparts around them. It is iterative (an explicit stack of open
multiparts, no recursion), refuses MIME bombs by depth and part count, and runs in the
reactor's thread pool, since it is blocking file I/O and CPU work.

Every entity's header block is read by the header grammar (L{mailproxy.headergrammar}),
the one the session checks the message's own with: a part's header block that grammar
refuses (an invalid field name, whitespace before the colon, a line without a colon, ...)
is refused, 554 5.6.0, since readers could find different fields in it; the session
never rewrites a part's header. Where MIME readers disagree otherwise, the walk leans to
finding more parts rather than fewer, so that no reader shows an attachment the walk
missed:
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
from collections.abc import Iterator, Mapping
from email.message import Message as EmailMessage
from email.utils import collapse_rfc2231_value
from typing import IO, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, Stage, Verdict
from mailproxy.filters.options import Options
from mailproxy.filters.support import (
    BLOCK_END,
    CHUNK_SIZE,
    DEFAULT_MAX_HEADER_BYTES,
    HEADER_END,
    MAX_BOUNDARY,
    PEEK,
    AmbiguousHeaderError,
    LineReader,
    MimeStructureError,
    Patterns,
    decodeText,
    inThreadPool,
    mailCharset,
    readHeaderBlock,
    requireThreads,
    unfold,
)

#: Boundaries kept per multipart (from repeated Content-Type headers).
_MAX_MARKERS = 8

DEFAULT_MAX_DEPTH = 20
DEFAULT_MAX_PARTS = 1000

# The fields that matter to the walk, with their continuation lines.
_CONTENT_FIELDS = re.compile(
    rb"^(content-(?:type|disposition|transfer-encoding)):(.*(?:\n[\t ].*)*)",
    re.MULTILINE | re.IGNORECASE,
)
#: The most Content-* fields in one header block (one of each is the norm).
MAX_CONTENT_FIELDS = 16
_COMMENT = re.compile(r"\([^()]*\)")
_ENCAPSULATED = frozenset({"message/rfc822", "message/global"})
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


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
    params = [
        (name, _collapse(raw).translate(_PRIVATE_TO_RAW))
        for name, raw in _rawParams(header, value.translate(_RAW_TO_PRIVATE))
    ]
    # The first pair is the value itself ("attachment", ""); kept, as it may be a
    # parameter when the value is missing, and it is neither "name" nor "filename" else.
    return [(name.lower(), raw) for name, raw in params]


def _rawParams(header: str, value: str) -> list[tuple[str, Any]]:
    """
    The stdlib's parameters of a header value. Where it cannot join RFC 2231 sections
    (a numbered and an unnumbered section of one name: it sorts None with an int, a
    TypeError; found by fuzz/, issue 9), each parameter is read alone, so that every
    name is still found.
    """
    holder = EmailMessage()
    holder[header] = value
    try:
        return holder.get_params(failobj=[], header=header) or []
    except (TypeError, ValueError):
        pass
    out: list[tuple[str, Any]] = []
    for piece in value.split(";"):
        alone = EmailMessage()
        alone[header] = "x;" + piece
        try:
            out.extend((alone.get_params(failobj=[], header=header) or [])[1:])
        except (TypeError, ValueError):
            continue
    return out


def _collapse(raw: str | tuple[str | None, str | None, str]) -> str:
    """
    An RFC 2231 parameter value, decoded with its charset as mail clients would
    (L{mailCharset}: one they do not know, or Python's idna and punycode, reads as
    UTF-8; the stdlib's own collapse raised on some, found by fuzz/, issue 9).
    """
    if not isinstance(raw, tuple):
        return collapse_rfc2231_value(raw)
    charset, _, text = raw
    data = bytes(text, "raw-unicode-escape")
    return data.decode(mailCharset(charset or "us-ascii"), "replace")


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
        value = unfold(rawValue.decode("ascii", "surrogateescape")).strip()
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
        self.headerEnd = re.compile(BLOCK_END % (b"|(?P<delimiter>" + body + b")"), re.MULTILINE)

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
    file end there; a delimiter of an outer multipart closes the inner ones. An
    ambiguous header block is refused (L{AmbiguousHeaderError}).

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
            end = HEADER_END if delimiters is None else delimiters.headerEnd
            try:
                block = readHeaderBlock(reader, maxHeaderBytes, end)
            except AmbiguousHeaderError as e:
                if not depth:
                    raise
                ambiguity = e.finding
                raise AmbiguousHeaderError(
                    ambiguity,
                    f"Error: {ambiguity.problem.value} in line {ambiguity.line} of a MIME part's header",
                ) from None
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
        peeked = reader.peekLine(PEEK)
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
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
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
    chunkSize: int = CHUNK_SIZE
    #: The reactor whose thread pool the blocking walk runs in (L{inThreadPool}).
    threads: IReactorThreads = attrs.field(kw_only=True, eq=False)
    name = "mime"
    stages = frozenset({Stage.MESSAGE})

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        def noted(scan: _Scan) -> Verdict:
            envelope.notes["mime"] = {
                "parts": scan.parts,
                "types": list(scan.types),
                "filenames": list(scan.filenames),
            }
            return scan.verdict

        return inThreadPool(self.threads, self.scan, message).addCallback(noted)

    def scan(self, message: Message) -> _Scan:
        """Walk the message (blocking); stop at the first blocked part."""
        types: dict[str, None] = {}
        filenames: list[str] = []
        count = 0
        verdict = Verdict.accept()
        with message.open() as f:
            try:
                for part in walk(
                    f, self.maxDepth, self.maxParts, self.maxHeaderBytes, self.chunkSize
                ):
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
            threads=requireThreads(reactor),
        )
        o.finish()
        return built
