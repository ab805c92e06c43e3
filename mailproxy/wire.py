"""
Sans-IO SMTP: command lines, replies, EHLO capabilities, end of data, dot-stuffing.

Nothing here does I/O or knows Twisted: the relay feeds bytes in and acts on what comes
out. Every buffer is bounded before it is parsed, and the DATA path works on whole
received buffers with C-level byte operations, never a Python loop per line.
"""

from __future__ import annotations

import base64
import binascii
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


#: Where MTAs name the queue id in their reply to the end of data: Postfix ("queued as
#: 4XyZ1b2C3dz"), Exim ("OK id=1rABCd-000123-4X"), OpenSMTPD and Sendmail ("0f9f4ae5
#: Message accepted for delivery", after the enhanced code).
_QUEUE_IDS: Final = (
    re.compile(rb"queued as ([0-9A-Za-z.@_-]+)"),
    re.compile(rb"\bid=([0-9A-Za-z-]+)"),
    re.compile(rb"^(?:[245]\.[0-9]{1,3}\.[0-9]{1,3} +)?([0-9A-Za-z]+) +Message accepted", re.I),
)


def queueId(reply: Reply) -> str | None:
    """The queue id an MTA names in its reply to end of data (Postfix, Exim, OpenSMTPD, Sendmail)."""
    for line in reply.lines:
        for pattern in _QUEUE_IDS:
            found = pattern.search(line)
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

    @property
    def idle(self) -> bool:
        """Nothing is buffered: no partial line, no unfinished multi-line reply."""
        return not self._buffer and not self._lines


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
        #: Line ends fed so far: while it stays the same, an unfinished line is the same line.
        self.lineEnds = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Buffer bytes; the caller takes lines promptly or stops reading."""
        self._buffer += data
        self.lineEnds += data.count(b"\n")

    @property
    def unfinished(self) -> bool:
        """Whether the bytes end in a line not yet complete (an over-long one included)."""
        if self._discarding and b"\n" not in self._buffer:
            return True
        return bool(self._buffer) and self._buffer[-1] != 0x0A

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

    def take(self, count: int) -> bytes:
        """
        Up to C{count} buffered bytes, taken from the front: the start of a BDAT chunk.
        (Deleting from a C{bytearray}'s front is cheap, so many small chunks in one
        buffer cost no copy of the rest each.)
        """
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken


class CommandSyntaxError(ValueError):
    """A command line outside RFC 5321's grammar; C{kind} says how (for the reply)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


#: C{kind} of a L{CommandSyntaxError}: a control byte (TAB, NUL, CR, ...) in the line; a
#: verb that is not letters followed by one SP; arguments where none are allowed.
BAD_CHARACTER: Final = "bad character"
BAD_VERB: Final = "bad verb"
NO_ARGUMENTS: Final = "no arguments"

_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_VERB: Final = re.compile(rb"[A-Za-z]{1,16}")


@attrs.frozen
class Command:
    """
    A command line as RFC 5321 reads it: the verb (upper-cased), one SP, the arguments.

    L{toLine} is what the MTA gets when the command is relayed: the command as parsed,
    never the client's bytes, so the MTA cannot read it as anything else.
    """

    verb: str
    argument: bytes = b""

    def toLine(self) -> bytes:
        verb = self.verb.encode("ascii")
        return verb + b" " + self.argument if self.argument else verb


def parseCommand(line: bytes) -> Command:
    """
    Parse one command line (its terminator removed).

    The verb is letters only and must be followed by exactly one SP when arguments follow;
    trailing SPs are dropped. Any control byte anywhere (TAB, VT, FF, NUL, a stray CR) is
    refused: MTAs split commands on such bytes in different ways, and a command mailproxy
    reads one way must never reach the MTA to be read another.

    @raise CommandSyntaxError: the line is not of that form.
    """
    if _CONTROL.search(line):
        raise CommandSyntaxError(BAD_CHARACTER)
    line = line.rstrip(b" ")
    verb, _, argument = line.partition(b" ")
    if not _VERB.fullmatch(verb) or argument.startswith(b" "):
        raise CommandSyntaxError(BAD_VERB)
    return Command(verb.decode("ascii").upper(), argument)


class PathSyntaxError(ValueError):
    """A MAIL FROM or RCPT TO argument that cannot be parsed."""


@attrs.frozen
class Path:
    """A parsed C{FROM:<address> PARAMS} or C{TO:<address> PARAMS}."""

    address: str
    parameters: tuple[tuple[bytes, bytes | None], ...] = ()

    def toArgument(self, keyword: bytes) -> bytes:
        """The argument as relayed: C{FROM:<address>} and each parameter after one SP."""
        path = keyword + b"<" + self.address.encode("utf-8", "surrogateescape") + b">"
        parameters = self.parameterBytes()
        return path + b" " + parameters if parameters else path

    def parameterBytes(self) -> bytes:
        """The parameters as relayed, one SP between each."""
        return b" ".join(
            key if value is None else key + b"=" + value for key, value in self.parameters
        )

    def parameter(self, name: bytes) -> bytes | None:
        for key, value in self.parameters:
            if key == name:
                return value if value is not None else b""
        return None


_KEYWORD: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE: Final = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+")


def parsePath(argument: bytes, keyword: bytes) -> Path:
    """
    Parse C{FROM:<addr> PARAMS} or C{TO:<addr> PARAMS} (keyword C{b"FROM:"}/C{b"TO:"}).

    Spaces after the colon and between parameters are tolerated (the relayed command has
    one SP each); an address without angle brackets is read up to the first space. An
    RFC 5321 source route is dropped, keeping the mailbox.

    @raise PathSyntaxError: the keyword, the path or a parameter is missing or malformed.
    """
    if argument[: len(keyword)].upper() != keyword:
        raise PathSyntaxError(argument)
    rest = argument[len(keyword) :].lstrip(b" ")
    if rest.startswith(b"<"):
        close = rest.find(b">")
        if close < 0:
            raise PathSyntaxError(argument)
        path, params = rest[1:close], rest[close + 1 :]
        if params and not params.startswith(b" "):
            raise PathSyntaxError(argument)
    else:
        path, _, params = rest.partition(b" ")
        if not path:
            raise PathSyntaxError(argument)
    if b":" in path and path.startswith(b"@"):
        path = path.rpartition(b":")[2]
    if any(c in path for c in b" <>\x00"):
        raise PathSyntaxError(argument)
    local, at, domain = path.rpartition(b"@")
    if at and domain.endswith(b"."):
        # Postfix reads x@example.org. as x@example.org: so must the filters, and the MTA
        # gets the address as they read it.
        path = local + at + domain.rstrip(b".")
    parameters = []
    for param in params.split(b" "):
        if not param:
            continue
        key, eq, value = param.partition(b"=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise PathSyntaxError(argument)
        parameters.append((key.upper(), value if eq else None))
    return Path(path.decode("utf-8", "surrogateescape"), tuple(parameters))


def number(value: bytes) -> int | None:
    """
    A SIZE value: ASCII digits, at most 20 of them (beyond any real size; Python refuses
    to convert a string of more than 4300), or C{None}.
    """
    return int(value) if value.isdigit() and len(value) <= 20 else None


class BdatSyntaxError(ValueError):
    """
    A BDAT argument outside RFC 3030's grammar. C{size} is the chunk size when it could
    still be read (C{BDAT 10 LASTX}): those bytes follow all the same, and are no commands.
    """

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


def parseBdat(argument: bytes) -> tuple[int, bool]:
    """
    Parse BDAT's argument, C{<size> [LAST]} (RFC 3030): the size in ASCII digits as
    L{number} bounds them, then optionally one SP and C{LAST} in any case.

    @return: the chunk size and whether it is the last chunk.
    @raise BdatSyntaxError: anything else.
    """
    sizeText, sep, rest = argument.partition(b" ")
    size = number(sizeText)
    if size is None:
        raise BdatSyntaxError(None)
    if sep and rest.upper() != b"LAST":
        raise BdatSyntaxError(size)
    return size, bool(sep)


def bdatLine(size: int) -> bytes:
    """The command that sends a whole message of C{size} bytes in one chunk."""
    return b"BDAT %d LAST\r\n" % (size,)


def sizeParameter(params: bytes) -> int | None:
    """The value of MAIL's C{SIZE=} parameter, or C{None} when absent or malformed."""
    for param in params.split():
        key, _, value = param.partition(b"=")
        if key.upper() == b"SIZE" and number(value) is not None:
            return number(value)
    return None


#: Commands that may be allowed with C{relay_commands}: harmless, answered by the MTA.
RELAYABLE: Final = frozenset({"NOOP", "HELP", "VRFY", "EXPN", "ETRN"})

#: The EHLO extensions mailproxy implements, and so passes on to the client when the MTA
#: offers them. CHUNKING mailproxy implements itself, whatever the MTA offers; BINARYMIME
#: it passes on only when the MTA offers CHUNKING too (such a message can only be released
#: with BDAT). Everything else (PRDR, PIPECONNECT, XCLIENT, the MTA's STARTTLS and AUTH,
#: whatever comes next) is removed: the client must not use what mailproxy would relay
#: without understanding.
EXTENSIONS: Final = frozenset(
    {b"PIPELINING", b"SIZE", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"DSN"}
)

#: MAIL and RCPT parameters by the extension that defines them, with their allowed values
#: (None: any value, or none).
_MAIL_PARAMETERS: Final[dict[bytes, tuple[bytes, frozenset[bytes] | None]]] = {
    b"SIZE": (b"SIZE", None),
    b"BODY": (b"8BITMIME", frozenset({b"7BIT", b"8BITMIME", b"BINARYMIME"})),
    b"SMTPUTF8": (b"SMTPUTF8", None),
    b"RET": (b"DSN", frozenset({b"FULL", b"HDRS"})),
    b"ENVID": (b"DSN", None),
}
#: Parameter values that need an extension of their own besides their parameter's.
_VALUE_EXTENSIONS: Final = {(b"BODY", b"BINARYMIME"): b"BINARYMIME"}
_RCPT_PARAMETERS: Final[dict[bytes, tuple[bytes, frozenset[bytes] | None]]] = {
    b"NOTIFY": (b"DSN", None),
    b"ORCPT": (b"DSN", None),
}


def parametersAllowed(path: Path, verb: str, offered: frozenset[bytes]) -> bool:
    """Whether each parameter belongs to an extension the client was offered, with a value it allows."""
    table = _MAIL_PARAMETERS if verb == "MAIL" else _RCPT_PARAMETERS
    for key, value in path.parameters:
        known = table.get(key)
        if known is None or known[0] not in offered:
            return False
        values = known[1]
        if key == b"SIZE" and (value is None or number(value) is None):
            return False
        if key == b"SMTPUTF8" and value is not None:
            return False
        if values is not None and (value is None or value.upper() not in values):
            return False
        needs = _VALUE_EXTENSIONS.get((key, value.upper() if value is not None else b""))
        if needs is not None and needs not in offered:
            return False
    return True


def binaryBody(parameters: str) -> bool:
    """Whether MAIL's parameters (as an L{Envelope} keeps them) declare BODY=BINARYMIME."""
    return any(p.upper() == "BODY=BINARYMIME" for p in parameters.split())


@attrs.frozen
class Capabilities:
    """What the MTA's EHLO reply offered, as far as mailproxy uses it."""

    keywords: frozenset[bytes] = frozenset()
    #: The words after each keyword, upper-cased: C{params[b"XCLIENT"]} are the
    #: attributes the MTA takes, C{params[b"AUTH"]} its SASL mechanisms.
    params: dict[bytes, tuple[bytes, ...]] = attrs.field(factory=dict, eq=False)

    def offers(self, keyword: bytes) -> bool:
        return keyword in self.keywords

    @property
    def pipelining(self) -> bool:
        return b"PIPELINING" in self.keywords

    @property
    def enhancedStatusCodes(self) -> bool:
        return b"ENHANCEDSTATUSCODES" in self.keywords

    @property
    def chunking(self) -> bool:
        return b"CHUNKING" in self.keywords


def capabilities(reply: Reply) -> Capabilities:
    """The keywords of an EHLO reply (upper-cased), for L{Capabilities}."""
    if reply.code // 100 != 2:
        return Capabilities()
    params: dict[bytes, tuple[bytes, ...]] = {}
    for line in reply.lines[1:]:
        words = line.upper().split()
        if words and words[0] not in params:
            params[words[0]] = tuple(words[1:])
    return Capabilities(frozenset(params), params)


def editCapabilities(
    reply: Reply, maxSize: int, startTLS: bool = False, auth: tuple[bytes, ...] = ()
) -> Reply:
    """
    The MTA's EHLO reply as the client may see it: only the L{EXTENSIONS} mailproxy
    implements, SIZE set to the smaller of the MTA's and C{maxSize}, CHUNKING always
    (BINARYMIME only when the MTA offers it and CHUNKING), STARTTLS offered only when
    mailproxy terminates TLS, AUTH with the mechanisms C{auth} (none: no AUTH).
    """
    if reply.code // 100 != 2 or not reply.lines:
        return reply
    mtaChunking = capabilities(reply).chunking
    lines = [reply.lines[0]]
    size = maxSize
    for line in reply.lines[1:]:
        words = line.split()
        keyword = words[0].upper() if words else b""
        if keyword == b"SIZE":
            mtaSize = number(words[1]) if len(words) > 1 else None
            if mtaSize:
                size = min(size, mtaSize)
        elif keyword in EXTENSIONS or (keyword == b"BINARYMIME" and mtaChunking):
            lines.append(line)
    lines.append(b"SIZE %d" % (size,))
    lines.append(b"CHUNKING")
    if startTLS:
        lines.append(b"STARTTLS")
    if auth:
        lines.append(b"AUTH " + b" ".join(auth))
    return Reply(reply.code, tuple(lines))


# -- XCLIENT, XFORWARD, AUTH ---------------------------------------------------------------

_XTEXT_PLAIN: Final = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}


def xtext(value: str) -> bytes:
    """RFC 3461 xtext: printable ASCII but C{+} and C{=} as is, every other byte C{+XX}."""
    return b"".join(
        bytes((b,)) if b in _XTEXT_PLAIN else b"+%02X" % (b,) for b in value.encode("utf-8")
    )


def xclientAddress(address: str) -> str:
    """An address as XCLIENT and XFORWARD take it: IPv6 with Postfix's C{IPV6:} prefix."""
    return f"IPV6:{address}" if ":" in address else address


def attributeCommand(
    verb: bytes, attributes: list[tuple[bytes, str]], offered: tuple[bytes, ...]
) -> bytes | None:
    """
    C{XCLIENT} or C{XFORWARD} with the C{attributes} the MTA listed in its EHLO keyword
    line (C{offered}), values xtext-encoded; C{None} when it takes none of them.
    """
    taken = [name + b"=" + xtext(value) for name, value in attributes if name in offered]
    return verb + b" " + b" ".join(taken) if taken else None


#: SASL mechanisms mailproxy relays: those whose login name it can read (for the filters,
#: the log and XCLIENT LOGIN). Others in the MTA's AUTH line are not offered.
SASL_MECHANISMS: Final = (b"PLAIN", b"LOGIN")
_BASE64: Final = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def isBase64(data: bytes) -> bool:
    """A SASL response or initial response: canonical base64 (RFC 4954), C{=} for empty."""
    return data == b"=" or _BASE64.fullmatch(data) is not None


def saslLogin(mechanism: bytes, response: bytes, first: bool) -> str | None:
    """
    The login name in a client's SASL response, if C{mechanism} carries it there:
    PLAIN's authentication identity, LOGIN's first response (C{first}).
    """
    try:
        decoded = base64.b64decode(b"" if response == b"=" else response, validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == b"PLAIN":
        parts = decoded.split(b"\0")
        return parts[1].decode("utf-8", "replace") if len(parts) == 3 else None
    if mechanism == b"LOGIN" and first:
        return decoded.decode("utf-8", "replace")
    return None


_END_OF_DATA: Final = b"\r\n.\r\n"
#: What starts a line with a dot (the client's transparency dot, removed); CRLF.CRLF too.
_DOT_LINE: Final = b"\r\n."
_ANY_LINE_ENDING: Final = re.compile(rb"\r\n|\r|\n")
#: C{bytes.translate} tables: 1 for a CR (an LF), 0 for every other byte.
_CR_MASK: Final = bytes(int(byte == 0x0D) for byte in range(256))
_LF_MASK: Final = bytes(int(byte == 0x0A) for byte in range(256))


#: The bytes translated at a time: the masks are temporaries, and ones as large as a
#: received buffer are fresh pages for the allocator (hundreds of page faults per MB).
_MASK_BLOCK: Final = 32 * 1024


def _hasBare(text: bytes) -> bool:
    """
    Whether C{text} has a CR not followed by LF or an LF not after a CR: in each block,
    its CRs, shifted one byte on, must fall exactly on its LFs (blocks overlap by a byte).
    Two C{translate} passes cost less than three counts, one of them of CRLF (a two-byte
    search, slower than one byte); the masks are compared in place, not sliced.
    """
    if text.startswith(b"\n") or text.endswith(b"\r"):
        return True
    for start in range(0, len(text) - 1, _MASK_BLOCK):
        block = text[start : start + _MASK_BLOCK + 1]
        crs, lfs = block.translate(_CR_MASK), block.translate(_LF_MASK)
        if not lfs.startswith(memoryview(crs)[:-1], 1):
            return True
    return False


def _lineEndings(text: bytes, normalise: bool, bare: bool) -> tuple[bytes, bool]:
    """
    Content whose bare CR and LF are made CRLF (C{normalise}), or the content as it is
    and whether one was found (C{bare}: one already was). Content without one is
    returned itself, not a copy.
    """
    if normalise:
        return (_ANY_LINE_ENDING.sub(CRLF, text) if _hasBare(text) else text), bare
    return text, bare or _hasBare(text)


def _nul(text: bytes, strip: bool, found: bool) -> tuple[bytes, bool]:
    """Content without its NULs (C{strip}), or as it is and whether one was found."""
    if b"\x00" not in text:  # memchr: no count, no copy
        return text, found
    if strip:
        return text.replace(b"\x00", b""), found
    return text, True


class DataScanner:
    """
    Reads the body of DATA: finds the end (only CRLF.CRLF), removes the client's
    dot-stuffing, and finds or normalises bare CR and LF.

    Feed it every received buffer; it returns the message content to spool (CRLF lines,
    not dot-stuffed) and, once the end is seen, the bytes that followed it. One split of
    each buffer at CRLF dot finds both the end and the lines to unstuff; a buffer
    without a dot line costs that one search and the bare line ending check.

    @param normalise: turn every bare CR or LF into CRLF; otherwise only note them in
        L{bare} so that the message can be refused.
    @param stripNul: remove every NUL (after unstuffing: a line that a NUL kept from
        being stuffed stays a line of its own, and the release stuffs it); otherwise
        note them in L{nul}.
    @ivar dotLines: whether the content given out so far may have a line starting with
        a dot (C{Stuffer} would change it). Exact unless a bare line ending was seen in
        reject mode or a NUL was stripped: then always C{True}.
    """

    #: Above this many CRLF dots in one buffer their pieces are not handled one by one in
    #: Python: C-level replace and searches do it (a message of only dot lines).
    _fewDotLines = 32

    def __init__(self, normalise: bool, stripNul: bool = False) -> None:
        self._normalise = normalise
        self._stripNul = stripNul
        self.nul = False
        # The stream bytes not yet given out: a CR whose LF may come next (counted in
        # size already, L{_heldCR}), then what could start a split CRLF.CRLF. The CRLF
        # that ended the DATA command starts the first line (a message of only ".\r\n"
        # is empty); it is neither content nor counted (L{_skip}).
        self._held = CRLF
        self._heldCR = 0
        self._skip = len(CRLF)
        self._lineStart = True  # the text so far ends in CRLF: a dot next is a stuffing dot
        self._outLineStart = True  # the content so far is empty or ends in LF
        self.size = 0
        self.bare = False
        self.done = False
        self.dotLines = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        @return: the content this buffer completes, and the bytes after the end of data
            (C{None} while the end has not been seen).
        """
        buffer = self._held + data
        heldCR = self._heldCR
        # No more parts than are handled one by one, and one for the rest, unsplit.
        parts = buffer.split(_DOT_LINE, self._fewDotLines + 1)
        # Where each CRLF dot before the end is, or None: too many to list one by one.
        listed: list[int] = []
        dots: list[int] | None = listed
        end = -1
        if len(parts) > self._fewDotLines + 1:
            dots = None
            end = buffer.find(_END_OF_DATA, len(parts[0]))
        elif len(parts) > 1:
            at, last = len(parts[0]), len(parts) - 1
            for i in range(1, len(parts)):
                part = parts[i]
                # CRLF.CRLF: CRLF follows this CRLF dot (or the next CRLF dot does).
                if part.startswith(CRLF) or (not part and i < last):
                    end = at
                    break
                listed.append(at)
                at += len(_DOT_LINE) + len(part)
        if end >= 0:
            rawEnd, rest = end + len(CRLF), buffer[end + len(_END_OF_DATA) :]
            self.done = True
        else:
            # Keep what could be the start of a split CRLF.CRLF.
            rawEnd, rest = max(heldCR, len(buffer) - (len(_END_OF_DATA) - 1)), None
        start = heldCR
        if self._skip:
            dropped = min(self._skip, rawEnd - start)
            start, self._skip = start + dropped, self._skip - dropped
        self.size += rawEnd - start
        start -= heldCR  # the held CR starts the text
        stop = rawEnd
        if not self.done and stop > start and buffer[stop - 1] == 0x0D:
            stop -= 1  # its LF may come in the next buffer
        self._held, self._heldCR = (buffer[stop:], int(stop < rawEnd)) if end < 0 else (b"", 0)
        if stop <= start:
            return b"", rest
        return self._content(buffer, start, stop, dots), rest

    def _content(self, buffer: bytes, start: int, stop: int, dots: list[int] | None) -> bytes:
        """The content of C{buffer[start:stop]}, whose CRLF dots are at C{dots} (or unknown)."""
        raw = buffer[start:stop]
        text, self.bare = _lineEndings(raw, self._normalise, self.bare)
        # A line starts after CRLF only, as in the unstuffing below: in reject mode a bare
        # LF may end a buffer, and a dot after it must be kept whatever the chunking.
        startsLine, self._lineStart = self._lineStart, text.endswith(CRLF)
        first = 1 if startsLine and text.startswith(b".") else 0
        if text is not raw or dots is None:
            # Normalised (its CRLF dots are not those of the buffer), or too many of them.
            text = text[first:].replace(_DOT_LINE, CRLF)
            self.dotLines = self.dotLines or b"\n." in text
        else:
            inside = [at - start for at in dots if start <= at and at + len(_DOT_LINE) <= stop]
            if inside:
                view, pieces, pos = memoryview(text), list[memoryview](), first
                for at in inside:
                    pieces.append(view[pos : at + len(CRLF)])
                    pos = at + len(_DOT_LINE)
                    # A stuffed dot line: its second dot starts a line of the content.
                    self.dotLines = self.dotLines or text[pos : pos + 1] == b"."
                pieces.append(view[pos:])
                text = b"".join(pieces)
            elif first:
                text = text[first:]
        if b"\x00" in text:  # memchr: no count, no copy
            if self._stripNul:
                text = text.replace(b"\x00", b"")
                self.dotLines = True  # removing the NUL of "\r\n\x00." makes a dot line
            else:
                self.nul = True
        if self.bare:
            self.dotLines = True  # a bare LF and a dot are a dot line the Stuffer stuffs
        if text:
            self.dotLines = self.dotLines or (self._outLineStart and text.startswith(b"."))
            self._outLineStart = text.endswith(b"\n")
        return text


class ChunkScanner:
    """
    Reads the content of BDAT chunks (RFC 3030): no end marker and no dot-stuffing, but
    bare CR and LF found or normalised to CRLF as L{DataScanner} does, so that a copy
    released with DATA is read by the MTA as the filters read it. A CR that ends one
    buffer (or chunk) waits for the next, since its LF may start it.

    @param normalise: turn every bare CR or LF into CRLF; otherwise note them in L{bare}.
    @param raw: leave the content as it is (BODY=BINARYMIME: released with BDAT only),
        NULs included: RFC 3030 allows any octet in a binary body (the header block's
        NULs are L{mailproxy.headergrammar}'s).
    @param stripNul: remove every NUL; otherwise note them in L{nul}.
    """

    #: Whether the content may have a line starting with a dot: not looked for (a chunk
    #: has no stuffing to read it from), so always C{True}, as L{DataScanner.dotLines}.
    dotLines: Final = True

    def __init__(self, normalise: bool, raw: bool = False, stripNul: bool = False) -> None:
        self._normalise = normalise
        self._raw = raw
        self._stripNul = stripNul
        self.nul = False
        self._carry = b""
        self.bare = False
        self._last = CRLF  # the last two bytes of the content; none yet: a line's end

    def feed(self, data: bytes) -> bytes:
        """@return: the content to spool from this piece of a chunk."""
        if self._raw:
            return self._seen(data)
        text, self._carry = self._carry + data, b""
        if text.endswith(b"\r"):
            text, self._carry = text[:-1], b"\r"
        return self._check(text)

    def end(self) -> bytes:
        """The last chunk is complete: @return: the content still held back."""
        text, self._carry = self._carry, b""
        return self._check(text)

    def _check(self, text: bytes) -> bytes:
        if not text:
            return text
        text, self.bare = _lineEndings(text, self._normalise, self.bare)
        text, self.nul = _nul(text, self._stripNul, self.nul)
        return self._seen(text)

    def _seen(self, text: bytes) -> bytes:
        if text:
            self._last = (self._last + text[-2:])[-2:]
        return text

    @property
    def endsLine(self) -> bool:
        """Whether the content so far is empty or ends with CRLF."""
        return self._last == CRLF


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

    def dotFree(self, chunk: bytes) -> bytes:
        """
        The same as calling the Stuffer, for a chunk of content with no line starting
        with a dot (L{DataScanner.dotLines}): it holds no LF followed by a dot, so only
        a dot that starts it, after a chunk that ended a line, can need one; nothing is
        searched.
        """
        if not chunk:
            return chunk
        stuffed = b"." + chunk if self._lineStart and chunk.startswith(b".") else chunk
        self._lineStart = chunk.endswith(b"\n")
        return stuffed
