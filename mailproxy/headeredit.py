"""
Header edits on release, as pure functions: the header block the MTA gets, from the one
the client sent (as spooled) and the filters' L{HeaderEdit}s. No Twisted, no I/O: the
driver (L{mailproxy.relay}) reads the block from the spool, writes what L{editBlock}
makes of it, and streams the rest of the spool from L{headerEnd}, byte for byte.

The spool's header block is one the header grammar (L{mailproxy.headergrammar}) accepts,
or rewrote until it did, and no larger than its limit: CRLF lines, fields and their
continuation lines, up to the first empty line (or the end of the message). So:

  - the fields end where the first empty line starts (L{headerEnd}): that line and the
    body after it are never looked at, nor copied;
  - each field is its first line and its continuation lines, as the client wrote them
    (L{splitFields}); a field no edit chooses is written back with the same bytes, in the
    same place;
  - an edit picks its fields among those the client sent, as sent: by name (any case),
    then by value (C{matching}, searched in the value unfolded as the filters read it,
    L{headergrammar.fields}), then by C{occurrence} among those (0 every one, N > 0 the
    Nth from the top, N < 0 the Nth from the bottom). One filter's edit never shifts
    another's occurrences; edits apply in filter order, the last one to touch a field
    deciding it (removed, or replaced);
  - a replacement keeps the field's place and writes the edit's name and value; one
    that picks no field adds the field, as an addition does;
  - additions (and such replacements) go on top of the client's fields, in filter order,
    below what the driver puts above them (our trace header, the filters' C{headers});
  - a value we write is folded (RFC 5322 2.2.3) to L{WIDTH} columns where it has
    whitespace, preferring a break after a C{";"} (RFC 8601 2.2: between results), never
    inside a word; unfolded, it reads as the value given (leading and trailing
    whitespace aside).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from mailproxy import headergrammar
from mailproxy.verdict import EditKind, HeaderEdit, Matching

#: The column a folded line should not pass (RFC 5322 2.1.1's "SHOULD"), CRLF excluded.
WIDTH: Final = 78

_CRLF: Final = b"\r\n"
#: A field: its first line, then its continuation lines (a last line may lack its CRLF).
_FIELD: Final = re.compile(rb"[^ \t\r\n][^\r\n]*(?:\r\n[ \t][^\r\n]*)*(?:\r\n)?")
#: A word of a value, with the whitespace before it: where a fold may go.
_WORD: Final = re.compile(rb"[ \t]*[^ \t]+")


class HeaderBlockError(ValueError):
    """The bytes are not a header block the grammar accepts (a bug, or not our spool)."""


@attrs.frozen
class Field:
    """
    One field of the client's header block.

    @ivar name: its name as written.
    @ivar raw: its bytes: the first line and its continuation lines, CRLFs included.
    @ivar value: its value unfolded, as the filters read it (L{headergrammar.fields}).
    """

    name: str
    raw: bytes
    value: str


def headerEnd(head: bytes, complete: bool) -> int | None:
    """
    Where the header fields of a message end: the offset of the empty line that ends its
    header block (the body, that line included, starts there), or the end of C{head}
    when the message has no empty line.

    @param head: the message's first bytes: all of it, or at least its header block.
    @param complete: C{head} is the whole message.
    @return: L{None} when C{head} is not complete and holds no empty line: the header
        block goes on past it.
    """
    if head.startswith(_CRLF):
        return 0
    found = head.find(b"\r\n\r\n")
    if found >= 0:
        return found + 2
    return len(head) if complete else None


def splitFields(block: bytes) -> list[Field]:
    """
    The fields of a header block (without its empty line), in order; their C{raw}
    bytes joined are C{block}.

    @raise HeaderBlockError: the header grammar refuses C{block}.
    """
    finding = headergrammar.check(block, len(block))
    if finding is not None:
        raise HeaderBlockError(finding.text)
    raws = [m.group() for m in _FIELD.finditer(block)]
    read = headergrammar.fields(block)
    if b"".join(raws) != block or len(read) != len(raws):
        raise HeaderBlockError("not a header block")
    return [Field(name, raw, value) for raw, (name, value) in zip(raws, read, strict=True)]


def _encode(text: str) -> bytes:
    """UTF-8, raw 8-bit bytes read as surrogate escapes given back as they were."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _breakAt(line: Sequence[bytes]) -> int:
    """Where to end a line of words that is full: after its last C{";"}, else at its end."""
    for cut in range(len(line), 0, -1):
        if line[cut - 1].endswith(b";"):
            return cut
    return len(line)


def fieldBytes(name: str, value: str, width: int = WIDTH) -> bytes:
    """
    A field we write: C{Name: value} and its CRLF, folded to C{width} columns where the
    value has whitespace (after a C{";"} if a line allows it), never inside a word. Each
    continuation line starts with the whitespace it was folded at and holds a word, as
    the header grammar wants.

    @param value: holds no CR, LF or NUL (a L{HeaderEdit}'s never does).
    """
    words = _WORD.findall(_encode(value.strip(" \t")))
    head = _encode(name) + b":"
    if not words:
        return head + _CRLF
    lines: list[bytes] = []
    line = [head + b" " + words[0]]
    length = len(line[0])
    for word in words[1:]:
        if length + len(word) > width:
            cut = _breakAt(line)
            lines.append(b"".join(line[:cut]))
            line = line[cut:]
            length = sum(len(w) for w in line)
            if line and length + len(word) > width:
                lines.append(b"".join(line))
                line, length = [], 0
        line.append(word)
        length += len(word)
    lines.append(b"".join(line))
    return _CRLF.join(lines) + _CRLF


def addedBytes(headers: Iterable[tuple[str, str]]) -> bytes:
    """
    The C{(name, value)} pairs of the filters' C{headers} (and our trace header) as we
    write them: any CR, LF or run of whitespace in a value flattened to one space, NULs
    dropped, then folded (L{fieldBytes}).
    """
    return b"".join(
        fieldBytes(name, " ".join(value.replace("\0", "").split())) for name, value in headers
    )


def _matches(matching: Matching, value: str) -> bool:
    if isinstance(matching, re.Pattern):
        return matching.search(value) is not None
    return matching(value)


def chosen(fields: Sequence[Field], edit: HeaderEdit) -> list[int]:
    """The indexes of the client's fields that C{edit} picks (see the module)."""
    name = edit.name.lower()
    matching = edit.matching
    candidates = [
        index
        for index, f in enumerate(fields)
        if f.name.lower() == name and (matching is None or _matches(matching, f.value))
    ]
    occurrence = edit.occurrence
    if occurrence == 0:
        return candidates
    index = occurrence - 1 if occurrence > 0 else len(candidates) + occurrence
    return [candidates[index]] if 0 <= index < len(candidates) else []


def editBlock(block: bytes, edits: Sequence[HeaderEdit]) -> bytes:
    """
    The header fields to release for the client's C{block} (its fields, without the
    empty line after them) and the filters' C{edits}, in filter order: the additions on
    top, then the client's fields, edited in place (see the module).

    @raise HeaderBlockError: the header grammar refuses C{block}.
    """
    fields = splitFields(block) if any(e.kind is not EditKind.ADD for e in edits) else []
    out: list[bytes | None] = [f.raw for f in fields]
    top: list[bytes] = []
    for edit in edits:
        if edit.kind is EditKind.ADD:
            assert edit.value is not None
            top.append(fieldBytes(edit.name, edit.value))
            continue
        picked = chosen(fields, edit)
        if edit.kind is EditKind.REMOVE:
            for index in picked:
                out[index] = None
            continue
        assert edit.value is not None
        written = fieldBytes(edit.name, edit.value)
        if not picked:
            top.append(written)
        for index in picked:
            out[index] = written
    if not fields:
        return b"".join(top) + block
    return b"".join(top) + b"".join(raw for raw in out if raw is not None)


def needsBlock(edits: Iterable[HeaderEdit]) -> bool:
    """Whether applying C{edits} reads the client's header block (additions alone do not)."""
    return any(e.kind is not EditKind.ADD for e in edits)
