"""
Sans-IO SMTP: command lines, replies, EHLO capabilities, end of data, dot-stuffing.

Nothing here does I/O or knows Twisted: the relay feeds bytes in and acts on what comes
out. Every buffer is bounded before it is parsed, and the DATA path works on whole
received buffers with C-level byte operations, never a Python loop per line.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

CRLF: Final = b"\r\n"


class ProtocolError(Exception):
    """The MTA said something that is not an SMTP reply."""


@attrs.frozen
class Reply:
    """
    An SMTP reply: a code and one or more lines of text (without the code and separator).
    """

    code: int
    lines: tuple[bytes, ...]

    @classmethod
    def make(cls, code: int, enhanced: str, text: str) -> Reply:
        """A one-line reply of ours, such as C{Reply.make(550, "5.7.1", "Refused")}."""
        clean = text.replace("\r", " ").replace("\n", " ")
        return cls(code, (f"{enhanced} {clean}".strip().encode("utf-8", "replace"),))

    def toBytes(self) -> bytes:
        code = b"%03d" % (self.code,)
        last = len(self.lines) - 1
        return b"".join(
            code + (b" " if i == last else b"-") + line + CRLF for i, line in enumerate(self.lines)
        )

    @property
    def text(self) -> str:
        return " / ".join(line.decode("utf-8", "replace") for line in self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


_QUEUE_ID = re.compile(rb"queued as ([0-9A-Za-z.@_-]+)")


def queueId(reply: Reply) -> str | None:
    """The queue id an MTA names in its reply to end of data (Postfix, Exim, OpenSMTPD)."""
    for line in reply.lines:
        found = _QUEUE_ID.search(line) or re.search(rb"\bid=([0-9A-Za-z-]+)", line)
        if found:
            return found.group(1).decode("ascii")
    return None


class ReplyParser:
    """
    Turns the MTA's byte stream into L{Reply}s, multi-line ones included.

    @param maxLine: the longest reply line accepted, in bytes.
    @param maxLines: the most lines one reply may have.
    """

    def __init__(self, maxLine: int = 8192, maxLines: int = 512) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code: bytes | None = None
        self._maxLine = maxLine
        self._maxLines = maxLines

    def feed(self, data: bytes) -> list[Reply]:
        """
        Take bytes from the MTA; return the replies they complete.

        @raise ProtocolError: a line is not C{NNN-text} or C{NNN text}, is too long, or
            a multi-line reply changes its code or grows too long.
        """
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._maxLine + 1:  # + 1: its CR may have come
                    raise ProtocolError("reply line too long")
                return replies
            line = bytes(self._buffer[:end]).removesuffix(b"\r")
            del self._buffer[: end + 1]
            if len(line) > self._maxLine:
                raise ProtocolError("reply line too long")
            code, sep, text = line[:3], line[3:4], line[4:]
            if len(code) != 3 or not code.isdigit() or sep not in (b" ", b"-", b""):
                raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
            if self._code is not None and code != self._code:
                raise ProtocolError("multi-line reply changed its code")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > self._maxLines:
                raise ProtocolError("reply has too many lines")
            if sep != b"-":
                replies.append(Reply(int(code), tuple(self._lines)))
                self._lines = []
                self._code = None


class _TooLong:
    """The marker for a command line over the limit (its bytes were discarded)."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()


class CommandBuffer:
    """
    Splits the client's byte stream into command lines, never holding more than
    C{maxLength} bytes of an unfinished line.

    A line may end in CRLF or a bare LF (as Postfix accepts for commands); the
    terminator is not returned. An over-long line is discarded to its end and reported
    once as L{TOO_LONG}.
    """

    def __init__(self, maxLength: int) -> None:
        self._buffer = bytearray()
        self._maxLength = maxLength
        self._discarding = False

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Buffer bytes; the caller takes lines promptly or stops reading."""
        self._buffer += data

    def nextLine(self) -> bytes | _TooLong | None:
        """The next complete line, L{TOO_LONG}, or C{None} until more bytes come."""
        end = self._buffer.find(b"\n")
        if self._discarding:
            if end < 0:
                self._buffer.clear()
                return None
            del self._buffer[: end + 1]
            self._discarding = False
            return TOO_LONG
        if end < 0:
            if len(self._buffer) >= self._maxLength:
                self._discarding = True
                self._buffer.clear()
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if end + 1 > self._maxLength:
            return TOO_LONG
        return line.removesuffix(b"\r")

    def takeRest(self) -> bytes:
        """Everything buffered and not yet a line: the start of a message after 354."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


@attrs.frozen
class Command:
    verb: str
    argument: bytes
    line: bytes


def parseCommand(line: bytes) -> Command:
    """Split a command line into its upper-cased verb and the rest."""
    verb, _, argument = line.strip(b" ").partition(b" ")
    return Command(verb.decode("ascii", "replace").upper(), argument.strip(b" "), line)


class PathSyntaxError(ValueError):
    """A MAIL FROM or RCPT TO argument that cannot be parsed."""


def parsePath(argument: bytes, keyword: bytes) -> tuple[str, bytes]:
    """
    Parse C{FROM:<addr> PARAMS} or C{TO:<addr> PARAMS} (keyword C{b"FROM:"}/C{b"TO:"}).

    @return: the address (C{""} for the null sender) and the raw parameters.
    @raise PathSyntaxError: the keyword or the path is missing or malformed.
    """
    if argument[: len(keyword)].upper() != keyword:
        raise PathSyntaxError(argument)
    rest = argument[len(keyword) :].lstrip(b" ")
    if rest.startswith(b"<"):
        close = rest.find(b">")
        if close < 0:
            raise PathSyntaxError(argument)
        path, params = rest[1:close], rest[close + 1 :]
    else:
        path, _, params = rest.partition(b" ")
        if not path:
            raise PathSyntaxError(argument)
    if b":" in path and path.startswith(b"@"):
        path = path.rpartition(b":")[2]  # an RFC 5321 source route: keep the mailbox
    if any(c in path for c in b" <>\x00"):
        raise PathSyntaxError(argument)
    return path.decode("utf-8", "surrogateescape"), params.strip(b" ")


def sizeParameter(params: bytes) -> int | None:
    """The value of MAIL's C{SIZE=} parameter, or C{None} when absent or malformed."""
    for param in params.split():
        key, _, value = param.partition(b"=")
        if key.upper() == b"SIZE" and value.isdigit():
            return int(value)
    return None


#: Capabilities the client must never see: we take BDAT nowhere, and the MTA's trust in
#: us (XCLIENT, XFORWARD) is not the client's; STARTTLS is ours to offer, not the MTA's.
HIDDEN_CAPABILITIES: Final = frozenset({b"CHUNKING", b"BINARYMIME", b"XCLIENT", b"XFORWARD", b"STARTTLS"})


def editCapabilities(reply: Reply, maxSize: int, startTLS: bool = False) -> Reply:
    """
    The MTA's EHLO reply as the client may see it: hidden extensions removed, SIZE
    capped at (or set to) our own limit, STARTTLS offered only when we terminate TLS.
    """
    if reply.code // 100 != 2 or not reply.lines:
        return reply
    lines = [reply.lines[0]]
    for line in reply.lines[1:]:
        keyword = line.split(b" ", 1)[0].upper()
        if keyword in HIDDEN_CAPABILITIES or keyword == b"SIZE":
            continue
        lines.append(line)
    size = maxSize
    for line in reply.lines[1:]:
        words = line.split()
        if words and words[0].upper() == b"SIZE" and len(words) > 1 and words[1].isdigit():
            mtaSize = int(words[1])
            if mtaSize:
                size = min(size, mtaSize)
    lines.append(b"SIZE %d" % (size,))
    if startTLS:
        lines.append(b"STARTTLS")
    return Reply(reply.code, tuple(lines))


_END_OF_DATA: Final = b"\r\n.\r\n"
_ANY_LINE_ENDING: Final = re.compile(rb"\r\n|\r|\n")


class DataScanner:
    """
    Reads the body of DATA: finds the end (only CRLF.CRLF), removes the client's
    dot-stuffing, and finds or normalises bare CR and LF.

    Feed it every received buffer; it returns the message content to spool (CRLF lines,
    not dot-stuffed) and, once the end is seen, the bytes that followed it.

    @param normalise: turn every bare CR or LF into CRLF; otherwise only note them in
        L{bare} so that the message can be refused.
    """

    def __init__(self, normalise: bool) -> None:
        self._normalise = normalise
        # The CRLF that ended the DATA command starts the first line: a message of only
        # ".\r\n" is empty. It is dropped from the content.
        self._tail = CRLF
        self._skip = len(CRLF)
        self._carry = b""
        self._lineStart = True
        self.size = 0
        self.bare = False
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        @return: the content this buffer completes, and the bytes after the end of data
            (C{None} while the end has not been seen).
        """
        buffer = self._tail + data
        end = buffer.find(_END_OF_DATA)
        if end >= 0:
            raw, rest = buffer[: end + 2], buffer[end + len(_END_OF_DATA) :]
            self._tail = b""
            self.done = True
        else:
            # Keep what could be the start of a split CRLF.CRLF.
            split = max(0, len(buffer) - (len(_END_OF_DATA) - 1))
            raw, self._tail, rest = buffer[:split], buffer[split:], None
        if self._skip:
            dropped = min(self._skip, len(raw))
            raw, self._skip = raw[dropped:], self._skip - dropped
        self.size += len(raw)
        return self._content(raw), rest

    def _content(self, raw: bytes) -> bytes:
        text, self._carry = self._carry + raw, b""
        if not self.done and text.endswith(b"\r"):
            # Its LF may come in the next buffer.
            text, self._carry = text[:-1], b"\r"
        if not text:
            return text
        if self._normalise:
            text = _ANY_LINE_ENDING.sub(CRLF, text)
        elif not self.bare:
            crlf = text.count(CRLF)
            self.bare = text.count(b"\r") != crlf or text.count(b"\n") != crlf
        # A line starts after CRLF only, as in the replace below: in reject mode a bare LF
        # may end a buffer, and a dot after it must be kept whatever the chunking.
        startsLine, self._lineStart = self._lineStart, text.endswith(CRLF)
        if startsLine and text.startswith(b"."):
            text = text[1:]
        return text.replace(b"\r\n.", CRLF)


class Stuffer:
    """
    Dot-stuffs canonical content (CRLF lines) for sending after DATA, one chunk at a
    time, so that no line of the message can end it early.
    """

    def __init__(self) -> None:
        self._lineStart = True

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._lineStart and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self._lineStart = chunk.endswith(b"\n")
        return stuffed


def headerBytes(headers: tuple[tuple[str, str], ...]) -> bytes:
    """Header fields to prepend to a message, with any CR or LF in them flattened."""
    out = []
    for name, value in headers:
        clean = " ".join(value.split())
        out.append(f"{name}: {clean}\r\n".encode("utf-8", "replace"))
    return b"".join(out)
