"""
The one header grammar: how mailproxy, its filters, the MTA and mail clients must all
read a message's header block (RFC 5322 sections 2.2 and 3.6, strictly).

A header block is lines ending in CRLF, up to the first empty line (or the end of the
message). Each line is
  - a field's first line: a field name of printable US-ASCII but the colon
    (C{%d33-57 / %d59-126}, at least one), then the colon, with no whitespace before
    it, then the field body (any bytes but NUL, CR and LF);
  - or a continuation line (it starts with SP or HTAB), after a field's first line.
Anything else can be read differently by different parsers, which is how a filter can be
shown one structure and the recipient another (L{Problem} names each case): a field
name with 8-bit or control bytes, a space or tab inside, or none at all; whitespace
before the colon (RFC 5322's obsolete syntax: most readers take it, strict ones end the
header block there); a line without a colon; a continuation line before any field, or
one of only whitespace; a NUL; a bare CR or LF.

L{HeaderChecker} reads a message's content as it is spooled, a buffer at a time, and
either finds the first problem (C{header_syntax = "reject"}: the message is refused) or
rewrites the block so that no reader can disagree (C{"normalise"}):
  - whitespace before the colon is removed (C{Subject : x} becomes C{Subject: x}), as
    readers that accept the obsolete syntax read it;
  - a continuation line of only whitespace (obsolete syntax too: some readers end the
    header block there, others continue the field) is removed: unfolded, the field
    reads the same without it;
  - a line that is not a field or a continuation of one (an invalid field name, a line
    without a colon, a continuation line before any field) ends the header block: an
    empty line is put before it, so that it and everything after it is the body for
    every reader, as Python's email package and Postfix's cleanup already read it.
    Nothing is dropped;
  - a NUL is removed when C{nul_bytes = "strip"} (in a BINARYMIME message, whose body
    may hold NULs, only those of the header block are looked at); otherwise the message
    is refused whatever the mode;
  - a bare CR or LF (only a BINARYMIME message can still have one here: other content
    went through the bare line ending check) and a header block over the limit are
    refused in both modes: there is no reading of them to normalise to.
Only the header block is held, one line at a time (bounded by the limit); the body
passes through as it is, never looked at.

L{check} and L{fields} read a whole block (the filters' reading, bounded before it gets
here) by the same rules, so a filter never sees fields the grammar would not.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import attrs

#: The largest header block, in bytes, its line endings included (the filters'
#: C{max_header_bytes} default too). A larger one is refused, 554 5.6.0.
MAX_HEADER_BYTES: Final = 128 * 1024

_CRLF: Final = b"\r\n"
_NAME: Final = rb"[\x21-\x39\x3b-\x7e]+"
#: A valid field's first line, or (after a field) a continuation line, at its start.
_FIELD_START: Final = re.compile(_NAME + rb":")
_OBSOLETE: Final = re.compile(rb"(" + _NAME + rb")[ \t]+:")
#: A run of valid lines after a field, CRLF-ended: what most of a header block is.
_CONTINUATION: Final = rb"[ \t]+[^\x00\r\n \t][^\x00\r\n]*"
_RUN: Final = re.compile(
    rb"(?:(?:" + _NAME + rb":[^\x00\r\n]*|" + _CONTINUATION + rb")\r\n)*"
)
#: A whole valid block of CRLF lines, or of LF lines, for the fast path.
_VALID_BLOCK: Final = {
    ending: re.compile(
        rb"(?:" + _NAME + rb":[^\x00\r\n]*" + ending
        + rb"(?:" + _CONTINUATION + ending + rb")*)*"
    )
    for ending in (b"\r\n", b"\n")
}  # fmt: skip
#: A field and its continuation lines, in a block L{check} accepts.
_FIELD: Final = re.compile(rb"^(" + _NAME + rb"):([^\n]*(?:\n[ \t][^\n]*)*)", re.MULTILINE)
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])")


class Problem(enum.Enum):
    """Why a header block is ambiguous; the value is the reply's wording."""

    FIELD_NAME = "ambiguous header field name"
    SPACE_BEFORE_COLON = "whitespace before the colon of a header field"
    NO_COLON = "header line without a colon"
    LEADING_CONTINUATION = "continuation line before any header field"
    BLANK_CONTINUATION = "header line of only whitespace"
    NUL = "NUL character in the header"
    BARE_LINE_ENDING = "bare CR or LF in the header"
    TOO_LARGE = "message header block too large"


#: What normalising can make unambiguous; the others are refused in either mode.
NORMALISABLE: Final = frozenset(
    {
        Problem.FIELD_NAME,
        Problem.SPACE_BEFORE_COLON,
        Problem.NO_COLON,
        Problem.LEADING_CONTINUATION,
        Problem.BLANK_CONTINUATION,
    }
)
#: What normalising makes the end of the header block (an empty line goes before the line).
_ENDS_BLOCK: Final = frozenset({Problem.FIELD_NAME, Problem.NO_COLON, Problem.LEADING_CONTINUATION})


@attrs.frozen
class Finding:
    """A L{Problem} at C{line} (1 for the first line of the block; 0 for the block)."""

    problem: Problem
    line: int
    limit: int = attrs.field(default=MAX_HEADER_BYTES, eq=False)

    @property
    def text(self) -> str:
        """The reply's text: C{Error: ambiguous header field name in line 3}."""
        if self.problem is Problem.TOO_LARGE:
            return f"Error: {self.problem.value} (limit {self.limit} bytes)"
        return f"Error: {self.problem.value} in line {self.line}"


def classify(line: bytes, afterField: bool) -> Problem | None:
    """
    The problem of one header line (without its line ending), if any.

    @param afterField: a field's first line came before it in the block (so a line
        starting with whitespace continues it).
    """
    if b"\x00" in line:
        return Problem.NUL
    if b"\r" in line or b"\n" in line:
        return Problem.BARE_LINE_ENDING
    if line[:1] in (b" ", b"\t"):
        if not afterField:
            return Problem.LEADING_CONTINUATION
        return None if line.strip(b" \t") else Problem.BLANK_CONTINUATION
    if _FIELD_START.match(line):
        return None
    if _OBSOLETE.match(line):
        return Problem.SPACE_BEFORE_COLON
    if b":" not in line:
        return Problem.NO_COLON
    return Problem.FIELD_NAME


def _ending(block: bytes) -> bytes:
    """A block's line ending: CRLF (the spool's) if it has one, else LF (a file by hand)."""
    return _CRLF if _CRLF in block else b"\n"


def _lines(block: bytes) -> list[bytes]:
    """A block's lines without their endings (a CR or LF elsewhere stays, and is bare)."""
    lines = block.split(_ending(block))
    if lines[-1] == b"":
        lines.pop()
    return lines


def check(block: bytes, limit: int = MAX_HEADER_BYTES) -> Finding | None:
    """
    The first problem of a whole header block (its empty line excluded), or L{None} when
    every reader reads it the same. Its lines end in CRLF, as in the spool (then a lone
    CR or LF is bare), or all in LF (a file written by hand).
    """
    if len(block) > limit:
        return Finding(Problem.TOO_LARGE, 0, limit)
    ending = _ending(block)
    whole = block if block.endswith(ending) or not block else block + ending
    if _VALID_BLOCK[ending].fullmatch(whole):
        return None
    afterField = False
    for number, line in enumerate(_lines(block), 1):
        if not line:
            return None  # the end of the block: what follows is the body
        problem = classify(line, afterField)
        if problem is not None:
            return Finding(problem, number, limit)
        afterField = True
    return None


def fields(block: bytes) -> list[tuple[str, str]]:
    """
    The fields of a header block L{check} accepts: names as written, values unfolded
    (RFC 5322 2.2.3) with the whitespace after the colon removed, still encoded (raw
    8-bit bytes appear as surrogate escapes). Of another block, the fields before the
    first line the grammar refuses.
    """
    finding = check(block, len(block))
    if finding is not None:
        kept = _lines(block)[: finding.line - 1]
        block = b"".join(line + b"\n" for line in kept)
    out = []
    for match in _FIELD.finditer(block):
        name = match.group(1).decode("ascii")
        value = match.group(2).decode("ascii", "surrogateescape").lstrip(" \t")
        out.append((name, _FOLD.sub("", value).rstrip("\r\n")))
    return out


class HeaderChecker:
    """
    Reads a message's content (CRLF lines, as the spool gets it) a buffer at a time,
    finds its header block's first problem or normalises it (see the module), and passes
    the body through untouched. Pure and bounded: it holds at most one incomplete line
    of the header block, and never more than C{limit} bytes. When nothing may be
    rewritten (neither C{normalise} nor C{stripNul}) it only reads: every buffer is
    passed on at once, as it came.

    @param normalise: rewrite what L{NORMALISABLE} names instead of noting it in
        L{finding} (C{header_syntax = "normalise"}).
    @param stripNul: remove NULs from the header block instead of noting them
        (C{nul_bytes = "strip"}, for a BINARYMIME message whose scanner left them).
    @ivar finding: the problem that refuses the message, if any.
    @ivar normalised: the problems normalising fixed, for the log.
    """

    def __init__(
        self, normalise: bool, limit: int = MAX_HEADER_BYTES, stripNul: bool = False
    ) -> None:
        self._normalise = normalise
        self._limit = limit
        self._stripNul = stripNul
        #: Whether the output may differ from the input; if not, it is the input at once.
        self._rewrites = normalise or stripNul
        #: An incomplete line, held until its CRLF comes (appended to: a line sent a byte
        #: at a time must not cost a copy and a scan of all of it per byte).
        self._pending = bytearray()
        self._size = 0  # header block bytes passed on
        self._line = 0
        self._afterField = False
        self.done = False
        self.finding: Finding | None = None
        self.normalised: list[Finding] = []

    def feed(self, data: bytes) -> bytes:
        """
        @return: the content to spool for this buffer: C{data} itself, unless the block
            may be rewritten (then held back a line at a time, and rewritten).
        """
        if self.done:
            return data
        out = self._feed(data)
        return out if self._rewrites else data

    def _feed(self, data: bytes) -> bytes:
        pending = self._pending
        if (
            pending
            and _CRLF not in data
            and not (pending.endswith(b"\r") and data.startswith(b"\n"))
            and self._size + len(pending) + len(data) <= self._limit
        ):
            pending += data  # the same line goes on: nothing to look at yet
            return b""
        buffer, self._pending = bytes(pending) + data, bytearray()
        out: list[bytes] = []
        pos = 0
        while not self.done:
            if self._afterField:
                run = _RUN.match(buffer, pos)
                assert run is not None  # it matches the empty string
                if run.end() > pos:
                    self._line += buffer.count(_CRLF, pos, run.end())
                    out.append(buffer[pos : run.end()])
                    self._size += run.end() - pos
                    pos = run.end()
            end = buffer.find(_CRLF, pos)
            if end < 0:
                break
            self._line += 1
            self._size += end + 2 - pos
            self._take(buffer[pos:end], out)
            pos = end + 2
            if self.done:
                if self.finding is None and self._size > self._limit:
                    self._refuse(Problem.TOO_LARGE, 0)
                out.append(buffer[pos:])
                return b"".join(out)
        rest = buffer[pos:]
        if self._size + len(rest) > self._limit:
            self._refuse(Problem.TOO_LARGE, 0)
            out.append(rest)
        else:
            self._pending = bytearray(rest)
        return b"".join(out)

    def end(self) -> bytes:
        """The content is complete: @return: what was still held (a last line without CRLF)."""
        if self.done:
            return b""
        rest, self._pending = bytes(self._pending), bytearray()
        out: list[bytes] = []
        if rest:
            self._line += 1
            self._take(rest, out, ending=b"")
        self.done = True
        return b"".join(out) if self._rewrites else b""

    def _take(self, line: bytes, out: list[bytes], ending: bytes = _CRLF) -> None:
        """One complete line of the header block (the empty line ends it)."""
        if not line:
            out.append(ending)
            self.done = True
            return
        problem = classify(line, self._afterField)
        if problem is Problem.NUL and self._stripNul:
            stripped = line.replace(b"\x00", b"")
            self.normalised.append(Finding(problem, self._line))
            self._take(stripped, out, ending)
            return
        if problem is None:
            self._afterField = True
            out.append(line + ending)
            return
        if not self._normalise or problem not in NORMALISABLE:
            self._refuse(problem, self._line)
            out.append(line + ending)
            return
        self.normalised.append(Finding(problem, self._line))
        if problem in _ENDS_BLOCK:
            out.append(_CRLF + line + ending)
            self.done = True
            return
        if problem is Problem.BLANK_CONTINUATION:
            return  # whitespace only: unfolded, the field reads the same without it
        assert problem is Problem.SPACE_BEFORE_COLON
        match = _OBSOLETE.match(line)
        assert match is not None
        self._afterField = True
        out.append(match.group(1) + b":" + line[match.end() :] + ending)

    def _refuse(self, problem: Problem, line: int) -> None:
        self.finding = Finding(problem, line, self._limit)
        self.done = True
