"""
The fuzz targets: each takes one input of arbitrary bytes, runs a parser of mailproxy's
on it and checks what a postmaster relies on. A target raises on a crash (any exception
the parser does not document) or a broken invariant (C{AssertionError}); it returns
C{None} otherwise.

Most targets read a few leading bytes of the input as choices (flags, where to cut the
stream, a limit) and the rest as the stream: L{_Input} does the decoding, the same way
under atheris, the fallback mutator and the corpus replay.

Invariants checked, beside "never crashes":
  - the same bytes fed whole or cut anywhere give the same result (commands, replies,
    end of data, chunks, the MIME walk and the header block with any read size);
  - what mailproxy sends on is what it parsed: a parsed command, path or BDAT argument
    rendered and parsed again is the same; the rendered line holds no byte an MTA
    could split a command on;
  - the end of data round-trips: the content, dot-stuffed by L{wire.Stuffer}, holds no
    line an MTA could read as the end, and scanned again is the same content;
  - limits hold: reply lines and line counts, MIME depth and part counts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Final

from mailproxy import wire
from mailproxy.filters import mime, support

#: What no relayed command line may hold: a control byte (MTAs split on TAB, VT, FF, CR,
#: NUL, ... in different ways) or any byte outside US-ASCII's printables and 8-bit text.
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
#: A line of only a dot, under any reading of line endings: what a lenient MTA could take
#: for the end of data (SMTP smuggling).
_LENIENT_END: Final = re.compile(rb"[\r\n]\.[\r\n]")


class _Input:
    """
    The leading choices of a fuzz input, then its payload.

    Byte 0: flags (bit 0 to 7, each target says what they mean); byte 1: how many cuts
    (mod 8); then one byte per cut, its place scaled to the payload's length; the rest
    is the payload.
    """

    def __init__(self, data: bytes) -> None:
        self.flags = data[0] if data else 0
        count = data[1] % 8 if len(data) > 1 else 0
        marks = data[2 : 2 + count]
        self.payload = data[2 + count :]
        size = len(self.payload)
        self.cuts = sorted({m * size // 256 for m in marks} - {0}) if size else []

    def flag(self, bit: int) -> bool:
        return bool(self.flags >> bit & 1)

    def pieces(self) -> list[bytes]:
        """The payload cut at the chosen places (at least one piece, maybe empty)."""
        out, last = [], 0
        for cut in [*self.cuts, len(self.payload)]:
            out.append(self.payload[last:cut])
            last = cut
        return out


# -- the command grammar -----------------------------------------------------------------

_OFFERED: Final = (
    frozenset(),
    frozenset({b"SIZE", b"8BITMIME"}),
    frozenset({b"SIZE", b"8BITMIME", b"SMTPUTF8", b"DSN", b"BINARYMIME", b"CHUNKING"}),
)


def _checkCommand(line: bytes, offered: frozenset[bytes]) -> None:
    try:
        command = wire.parseCommand(line)
    except wire.CommandSyntaxError as e:
        assert e.kind in (wire.BAD_CHARACTER, wire.BAD_VERB, wire.NO_ARGUMENTS), e.kind
        return
    verb = command.verb
    assert re.fullmatch(r"[A-Z]{1,16}", verb), verb
    relayed = command.toLine()
    # What the MTA gets: no control byte, one SP after the verb, and it reads the same.
    assert not _CONTROL.search(relayed), relayed
    assert relayed.split(b" ", 1)[0] == verb.encode(), relayed
    assert not command.argument.startswith(b" ") and not command.argument.endswith(b" ")
    assert wire.parseCommand(relayed) == command, (relayed, command)
    for keyword, name in ((b"FROM:", "MAIL"), (b"TO:", "RCPT")):
        try:
            path = wire.parsePath(command.argument, keyword)
        except wire.PathSyntaxError:
            continue
        argument = path.toArgument(keyword)
        assert not _CONTROL.search(argument), argument
        assert wire.parsePath(argument, keyword) == path, (argument, path)
        assert not any(c in path.address for c in "<> \x00"), path.address
        allowed = wire.parametersAllowed(path, name, offered)
        if allowed:
            size = path.parameter(b"SIZE")
            # The session converts an allowed SIZE with int(): it must be a number.
            assert size is None or wire.number(size) is not None, size
            assert not any(p[0] not in (b"SIZE", b"BODY", b"SMTPUTF8", b"RET", b"ENVID",
                                        b"NOTIFY", b"ORCPT") for p in path.parameters)
        wire.binaryBody(path.parameterBytes().decode("utf-8", "surrogateescape"))
    try:
        size, last = wire.parseBdat(command.argument)
    except wire.BdatSyntaxError as e:
        assert e.size is None or e.size >= 0
    else:
        assert 0 <= size < 10**20
        assert wire.parseBdat(b"%d%s" % (size, b" LAST" if last else b"")) == (size, last)
    wire.sizeParameter(command.argument)


def commands(data: bytes) -> None:
    """
    The command grammar: L{wire.CommandBuffer} splitting the stream (the same lines
    whatever the cuts, none over the limit), then each line through L{wire.parseCommand},
    L{wire.parsePath}, L{wire.parametersAllowed} and L{wire.parseBdat}.

    Flags: bits 0-1 choose the extensions offered; bits 2-4 the line limit (16 << n).
    """
    given = _Input(data)
    offered = _OFFERED[(given.flags & 3) % len(_OFFERED)]
    limit = 16 << (given.flags >> 2 & 7)

    def lines(pieces: list[bytes]) -> list[bytes | object]:
        buffer = wire.CommandBuffer(limit)
        out: list[bytes | object] = []
        for piece in pieces:
            buffer.feed(piece)
            while (line := buffer.nextLine()) is not None:
                out.append(line)
            assert len(buffer) <= max(limit, len(piece)) + limit, len(buffer)
        return out

    whole = lines([given.payload])
    assert lines(given.pieces()) == whole
    for line in whole:
        if line is wire.TOO_LONG:
            continue
        assert isinstance(line, bytes) and b"\n" not in line and len(line) < limit, line
        _checkCommand(line, offered)
    # And the payload as one line, as it is: the grammar alone.
    _checkCommand(given.payload, offered)


# -- the reply parser --------------------------------------------------------------------


def _replies(pieces: list[bytes], maxLine: int, maxLines: int) -> tuple[list[wire.Reply], bool]:
    parser = wire.ReplyParser(maxLine, maxLines)
    out: list[wire.Reply] = []
    for piece in pieces:
        try:
            out.extend(parser.feed(piece))
        except wire.ProtocolError:
            return out, True
    return out, False


def replies(data: bytes) -> None:
    """
    The MTA's replies: L{wire.ReplyParser} gives the same replies (or the same
    L{wire.ProtocolError}) whatever the cuts, within its limits; each reply re-encoded
    parses back the same; capabilities and the edited EHLO reply never hold what
    mailproxy does not implement.

    Flags: bits 0-2 the line limit (8 << n), bits 3-5 the lines limit (1 << n).
    """
    given = _Input(data)
    maxLine, maxLines = 8 << (given.flags & 7), 1 << (given.flags >> 3 & 7)
    whole, failed = _replies([given.payload], maxLine, maxLines)
    split, splitFailed = _replies(given.pieces(), maxLine, maxLines)
    assert failed == splitFailed, (failed, splitFailed)
    if not failed:
        # (When it failed, the cut feeds may have returned the replies before the bad
        # line, which the whole feed raised away.)
        assert split == whole, (split, whole)
    for reply in split:
        assert 0 <= reply.code <= 999 and 1 <= len(reply.lines) <= maxLines, reply
        assert all(len(line) <= maxLine and b"\n" not in line for line in reply.lines), reply
        assert wire.ReplyParser(maxLine, maxLines).feed(reply.toBytes()) == [reply], reply
        wire.queueId(reply)
        offered = wire.capabilities(reply)
        edited = wire.editCapabilities(reply, 10_000_000, given.flag(6), (b"PLAIN",))
        if reply.code // 100 == 2 and reply.lines:
            keywords = wire.capabilities(edited).keywords
            allowed = wire.EXTENSIONS | {b"CHUNKING", b"STARTTLS", b"AUTH", b"BINARYMIME"}
            assert keywords <= allowed, keywords
            assert b"BINARYMIME" not in keywords or offered.chunking, keywords
            [size] = [line for line in edited.lines[1:] if line.upper().startswith(b"SIZE")][-1:]
            assert wire.number(size.split()[1]) is not None and int(size.split()[1]) <= 10_000_000
            for line in edited.lines:
                assert wire.ReplyParser(1 << 20, 1 << 20).feed(b"250 " + line + b"\r\n")


# -- end of data ---------------------------------------------------------------------


def _scan(pieces: list[bytes], normalise: bool) -> tuple[bytes, bytes | None, bool, bool]:
    scanner = wire.DataScanner(normalise)
    content, rest = bytearray(), None
    for piece in pieces:
        if rest is not None:
            rest += piece
            continue
        chunk, rest = scanner.feed(piece)
        content += chunk
        assert scanner.done == (rest is not None)
    return bytes(content), rest, scanner.bare, scanner.done


def _checkReleased(content: bytes) -> None:
    """
    Content as the proxy releases it after DATA: dot-stuffed, then the final dot. No
    lenient reading sees an end of data before ours, and mailproxy reads it back the same.
    """
    stuffer = wire.Stuffer()
    stuffed = b"".join(stuffer(content[i : i + 7]) for i in range(0, len(content), 7))
    assert stuffed == wire.Stuffer()(content), "stuffing depends on the chunks"
    found = _LENIENT_END.search(wire.CRLF + stuffed)
    assert found is None, (content, stuffed, found)
    again, rest, bare, done = _scan([stuffed + b".\r\n"], normalise=False)
    assert (again, rest, bare, done) == (content, b"", False, True), (content, again, rest)


def data(data: bytes) -> None:
    """
    The end-of-data scanner: L{wire.DataScanner} gives the same content, end, bytes after
    it and bare flag whether the stream comes whole or cut anywhere; content released
    (normalised, or free of bare CR and LF) is CRLF lines, and re-stuffed and scanned
    again it round-trips, with no line that a lenient MTA would take for the end.

    Flags: bit 0 normalise bare CR and LF (else note them).
    """
    given = _Input(data)
    normalise = given.flag(0)
    whole = _scan([given.payload], normalise)
    assert _scan(given.pieces(), normalise) == whole, (given.cuts, whole)
    content, _, bare, done = whole
    if normalise:
        assert not bare
    if done and not bare:
        assert content == b"" or content.endswith(wire.CRLF), content
        assert content.count(b"\r") == content.count(b"\n") == content.count(wire.CRLF)
        _checkReleased(content)


def chunks(data: bytes) -> None:
    """
    The BDAT chunk scanner: L{wire.ChunkScanner} gives the same content and flags
    whatever the cuts (a CR at a cut waits for its LF); normalised content has only CRLF
    line ends; noted content is the bytes as they came, flagged bare exactly when they
    hold a bare CR or LF; raw (BINARYMIME) content is untouched. Released with DATA (a
    last CRLF added when missing), it round-trips as L{data} does.

    Flags: bit 0 normalise; bit 1 raw.
    """
    given = _Input(data)
    normalise, raw = given.flag(0), given.flag(1)

    def scan(pieces: list[bytes]) -> tuple[bytes, bool, bool]:
        scanner = wire.ChunkScanner(normalise, raw)
        out = b"".join(scanner.feed(p) for p in pieces) + scanner.end()
        return out, scanner.bare, scanner.endsLine

    whole = scan([given.payload])
    assert scan(given.pieces()) == whole, (given.cuts, whole)
    content, bare, endsLine = whole
    payload = given.payload
    assert endsLine == (content == b"" or content.endswith(wire.CRLF)), whole
    if raw:
        assert content == payload and not bare
        return
    if normalise:
        assert not bare
        assert content.count(b"\r") == content.count(b"\n") == content.count(wire.CRLF)
    else:
        assert content == payload
        hasBare = payload.count(b"\r") != payload.count(wire.CRLF) or payload.count(
            b"\n"
        ) != payload.count(wire.CRLF)
        assert bare == hasBare, (payload, bare)
    if not bare:
        _checkReleased(content if endsLine else content + wire.CRLF)


# -- the MIME walker and the header reader -------------------------------------------------

#: Small limits, so that the fuzzer reaches them.
_MIME_LIMITS: Final = {"maxDepth": 4, "maxParts": 40, "maxHeaderBytes": 1024}


def _walk(payload: bytes, chunkSize: int) -> list[mime.Part] | str:
    try:
        return list(mime.walk(io.BytesIO(payload), chunkSize=chunkSize, **_MIME_LIMITS))
    except support.MimeStructureError as e:
        return e.text


def mimeWalk(data: bytes) -> None:
    """
    The MIME walker (L{mime.walk}): any message gives its parts or a
    L{support.MimeStructureError}, never another exception; the limits hold; and the
    parts do not depend on the size of the reads. (Time and memory are bounded by the
    runner: libFuzzer's C{-timeout} and C{-rss_limit_mb}.)

    Flags: bits 0-3 the read size of the second walk (1 << n, at least 64 bytes).
    """
    given = _Input(data)
    chunkSize = max(64, 1 << (given.flags & 15))
    big = _walk(given.payload, support.CHUNK_SIZE)
    if isinstance(big, list):
        assert 1 <= len(big) <= _MIME_LIMITS["maxParts"] + 1, len(big)
        assert all(p.depth <= _MIME_LIMITS["maxDepth"] and p.contentTypes for p in big)
        assert big[0].depth == 0
    small = _walk(given.payload, chunkSize)
    assert small == big, (chunkSize, small, big)


def headers(data: bytes) -> None:
    """
    The header reader the mime and headers filters share: L{support.readHeaderBlock}
    reads the same block (or refuses the same way) whatever the read size, a prefix of
    the message within the limit; L{support.parseHeaders} and L{support.decodeText} read
    any block without an exception.

    Flags: bits 0-3 the read size of the second read (1 << n, at least 16 bytes).
    """
    given = _Input(data)
    chunkSize = max(16, 1 << (given.flags & 15))
    limit = 1024

    def read(size: int) -> bytes | None:
        try:
            return support.readHeaderBlock(support.LineReader(io.BytesIO(given.payload), size), limit)
        except support.MimeStructureError:
            return None

    block = read(support.CHUNK_SIZE)
    assert read(chunkSize) == block, chunkSize
    if block is None:
        return
    assert given.payload.startswith(block) and len(block) <= limit, block
    for name, value in support.parseHeaders(block):
        assert name and ":" not in name, name
        support.decodeText(value)
        support.decodeText(name)


# -- the header grammar (issue 9 scope 2, the "headers" work) -------------------------------
#
# Written while mailproxy/headergrammar.py was on its own branch: the target is registered
# only when the module exists (fuzz.run.available() says so without importing it); it has
# been merged since, so the target runs. Its seeds are the "headers" target's
# (fuzz.run.seeds falls back to them).

try:
    from mailproxy import headergrammar
except ImportError:  # not merged yet
    headergrammar = None  # type: ignore[assignment]


def headerGrammar(data: bytes) -> None:
    """
    The one header grammar (L{mailproxy.headergrammar}): L{HeaderChecker} gives the same
    content, finding and normalisations whatever the cuts; only reading (neither
    normalising nor stripping NUL) it passes the content through unchanged; what it
    normalised reads clean to a strict checker, and Python's email parser reads the
    same field names in it as the grammar's L{fields}.

    Flags: bit 0 normalise; bit 1 strip NUL; bits 2-4 the limit (64 << n).
    """
    assert headergrammar is not None
    given = _Input(data)
    normalise, stripNul = given.flag(0), given.flag(1)
    limit = 64 << (given.flags >> 2 & 7)

    def read(pieces: list[bytes], normalise: bool, stripNul: bool) -> tuple[bytes, object, list[object]]:
        checker = headergrammar.HeaderChecker(normalise, limit, stripNul)
        out = b"".join(checker.feed(p) for p in pieces) + checker.end()
        return out, checker.finding, list(checker.normalised)

    whole = read([given.payload], normalise, stripNul)
    split = read(given.pieces(), normalise, stripNul)
    # Refused either way, or accepted either way with the same content. (Which problem
    # refuses it may depend on the cuts: a long line over the limit is "too large" when
    # it comes in pieces, "ambiguous field name" when whole; the reply's text differs.)
    assert (split[1] is None) == (whole[1] is None), (given.cuts, whole[1], split[1])
    if whole[1] is None:
        assert split == whole, (given.cuts, whole, split)
    content, finding, _ = whole
    if not normalise and not stripNul:
        assert content == given.payload
    if finding is not None or b"\r\n" not in content:
        return
    again = read([content], normalise=False, stripNul=False)
    assert again[1] is None, ("normalised content refused", content, again[1])
    block = support.readHeaderBlock(support.LineReader(io.BytesIO(content)), 1 << 20)
    if headergrammar.check(block, 1 << 20) is None:
        grammar = [name for name, _ in headergrammar.fields(block)]
        stdlib = [name for name, _ in support.parseHeaders(block)]
        assert grammar == stdlib, (block, grammar, stdlib)


#: Every target by the name C{fuzz.run} and the corpus directories use.
TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "commands": commands,
    "replies": replies,
    "data": data,
    "chunks": chunks,
    "mime": mimeWalk,
    "headers": headers,
}
if headergrammar is not None:
    TARGETS["headergrammar"] = headerGrammar
