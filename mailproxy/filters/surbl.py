"""
The surbl filter: the domains of the links in a message against URI blocklists.

At end of data the spooled message is scanned in chunks (in the reactor's thread pool,
never whole in memory): its text parts (C{text/plain}, C{text/html}, a message with no
MIME structure), decoded from quoted-printable or base64, are searched for C{http://},
C{https://} and bare C{www.} links. Each host is reduced to its registrable domain
(L{registrableDomain}); IPv4 hosts are looked up as reversed octets, as SURBL defines.
At most C{max_uris} distinct domains are looked up, in every zone at once; a listed one
refuses the message: C{554 5.7.1 Message refused: URI example.com blocked by
multi.surbl.org}.

The registrable domain comes from the ICANN section of the Public Suffix List
(L{mailproxy.psl}; the private section's hosting suffixes, C{blogspot.com}, are not
used: URI lists list the hosting domain). Limitations (kept on purpose, documented in
the README): text in charsets that are not ASCII-compatible (UTF-16)
is not searched; links hidden by HTML entities or in attachments are not found.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import IO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.dns import (
    ListLookup,
    Zone,
    lookupAll,
    makeResolver,
    readServer,
    readZones,
    reversedName,
)
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    BaseFilter,
    FilterError,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.options import Options
from mailproxy.filters.support import inThreadPool, requireThreads
from mailproxy.psl import registeredDomain

_TLD = re.compile(r"[a-z]{2,63}|xn--[a-z0-9-]{1,59}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def registrableDomain(host: str) -> str | None:
    """
    The domain a name is registered under: C{a.b.example.co.uk} → C{example.co.uk},
    C{www.example.com} → C{example.com}; None for a name that cannot be one (one label,
    a bare public suffix, an impossible label or top-level domain).
    """
    name = host.lower().strip(".")
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(labels) or not _TLD.fullmatch(labels[-1]):
        return None
    found = registeredDomain(name, icannOnly=True)
    if found is None:
        return None  # a bare public suffix
    kept = found.split(".")
    if not all(_LABEL.fullmatch(label) for label in kept):
        return None
    return found


# -- finding links in text --------------------------------------------------------------------

_HOSTCHARS = rb"[a-z0-9\x80-\xff](?:[a-z0-9\x80-\xff_.-]{0,252})"
_URI = re.compile(
    rb"\bhttps?:(?://|\\\\)(?:[^\s/?#@\"'<>\\\[\]]{1,128}@)?(\[[0-9a-f:.]{2,45}\]|"
    + _HOSTCHARS
    + rb")|\b(www\d{0,3}\."
    + _HOSTCHARS
    + rb")",
    re.IGNORECASE,
)
#: The longest link prefix that can be cut by a chunk boundary and still match later
#: (C{https:\\\\www9.}): this much of a chunk's tail is kept for the next one.
_TAIL = 16
#: A link still open at the end of the text seen so far is kept whole for the next
#: piece up to this many bytes.
_PENDING = 1024
#: Distinct raw hosts remembered so that a repeated link costs no second reduction.
_SEEN = 4096


def hostKey(raw: bytes) -> str | None:
    """
    The lookup key of a link's host: its registrable domain, or an IPv4 address;
    None for anything else (an IPv6 literal, a malformed or single-label name).
    """
    raw = raw.strip(b".-_")
    if raw.startswith(b"["):
        return None
    try:
        if raw.isascii():
            host = raw.decode("ascii").lower()
        else:
            host = raw.decode("utf-8").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if host.replace(".", "").isdigit():
        return None  # not a name, and not a dotted quad either
    return registrableDomain(host)


class LinkFinder:
    """
    Finds link hosts in text fed in pieces of any size, keeping only a bounded tail
    between pieces; collects at most C{maxKeys} distinct keys (L{hostKey}) that are not
    in C{ignore}.
    """

    def __init__(self, maxKeys: int, ignore: frozenset[str] = frozenset()) -> None:
        self.keys: dict[str, None] = {}
        self._max = maxKeys
        self._ignore = ignore
        self._carry = b""
        self._context = 0
        self._seen: set[bytes] = set()  # hosts already reduced (spam repeats its links)

    @property
    def full(self) -> bool:
        return len(self.keys) >= self._max

    def feed(self, data: bytes, final: bool = False) -> None:
        if self.full:
            return
        text = self._carry + data if self._carry else data
        # The carried text starts with one byte of context, for the \\b before a link.
        start, self._carry, self._context = self._context, b"", 0
        lastEnd = start
        for match in _URI.finditer(text, start):
            if match.end() == len(text) and not final and len(text) - match.start() <= _PENDING:
                self._keep(text, match.start())  # the host may go on in the next piece
                return
            self._add(match.group(1) or match.group(2))
            lastEnd = match.end()
            if self.full:
                return
        if not final:
            self._keep(text, max(lastEnd, len(text) - _TAIL))

    def _keep(self, text: bytes, start: int) -> None:
        """Carry C{text[start:]} over to the next piece, with the byte before it."""
        context = 1 if start > 0 else 0
        self._carry = text[start - context :]
        self._context = context

    def _add(self, raw: bytes) -> None:
        if raw in self._seen:
            return
        if len(self._seen) < _SEEN:
            self._seen.add(raw)
        key = hostKey(raw)
        if key is not None and key not in self._ignore:
            self.keys[key] = None


# -- walking the MIME structure, streamed -----------------------------------------------------

_CONTENT_TYPE = re.compile(rb"^content-type\s*:\s*([^;\s]+)", re.I | re.M)
_BOUNDARY = re.compile(rb"""[;\s]boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))""", re.I)
_ENCODING = re.compile(rb"^content-transfer-encoding\s*:\s*([^\s;]+)", re.I | re.M)
_NOT_BASE64 = bytes(
    c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/="))
)

#: Bounds: header block kept per entity, nesting of multiparts, one line kept whole.
MAX_HEADER_BYTES = 65536
MAX_DEPTH = 20
MAX_LINE = 65536


class _Decoder:
    """Decodes one part's body (7bit/8bit, quoted-printable, base64) into text pieces."""

    def __init__(self, encoding: bytes, out: Callable[[bytes], None]) -> None:
        self._encoding = encoding.lower()
        self._out = out
        self._pending = b""  # base64 characters short of a quantum, or a cut QP escape

    def line(self, data: bytes, complete: bool) -> None:
        """
        Decode C{data}, a line without its line break (C{complete}) or a fragment of a
        longer line (more of it follows).
        """
        if self._encoding == b"base64":
            chars = self._pending + data.translate(None, _NOT_BASE64)
            usable = len(chars) // 4 * 4
            self._pending = chars[usable:]
            if usable:
                try:
                    self._out(binascii.a2b_base64(chars[:usable]))
                except binascii.Error:
                    self._pending = b""
        elif self._encoding == b"quoted-printable":
            data = self._pending + data
            self._pending = b""
            if not complete:
                cut = data.rfind(b"=", len(data) - 2)
                if cut >= 0:
                    data, self._pending = data[:cut], data[cut:]
                self._out(binascii.a2b_qp(data))
            elif data.endswith(b"="):  # a soft line break: the line goes on
                self._out(binascii.a2b_qp(data[:-1]))
            else:
                self._out(binascii.a2b_qp(data) + b"\n")
        else:
            self._out(data + b"\n" if complete else data)


class MessageScanner:
    """
    Walks a message's MIME structure line by line, fed in chunks, and passes the decoded
    text of its text parts to a L{LinkFinder}. Memory is bounded whatever the input:
    one line (L{MAX_LINE}), one header block, the boundary stack, the finder's tail.
    """

    def __init__(self, finder: LinkFinder) -> None:
        self.finder = finder
        self._partial = b""
        self._boundaries: list[bytes] = []  # b"--" + boundary, outermost first
        self._inHeaders = True
        self._headers = bytearray()
        self._decoder: _Decoder | None = None
        # Decoded text, handed to the finder once per chunk rather than once per line.
        self._text: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line[:-1] if line.endswith(b"\r") else line, True)
        if len(self._partial) > MAX_LINE:
            # A very long line: pass what there is on as a fragment (never a boundary).
            self._line(self._partial, False)
            self._partial = b""
        self._flush()

    def close(self) -> None:
        if self._partial:
            self._line(self._partial.rstrip(b"\r"), True)
            self._partial = b""
        self._flush()
        self.finder.feed(b"", final=True)

    def _flush(self) -> None:
        if self._text:
            text = b"".join(self._text)
            self._text.clear()  # in place: the decoder appends to this list
            self.finder.feed(text)

    def _line(self, line: bytes, complete: bool) -> None:
        if complete and line.startswith(b"--") and self._boundaries and self._boundary(line):
            return
        if self._inHeaders:
            if complete and not line.strip(b" \t"):
                self._endOfHeaders()
            elif len(self._headers) < MAX_HEADER_BYTES:
                self._headers += line[: MAX_HEADER_BYTES - len(self._headers)]
                if complete:
                    self._headers += b"\n"
        elif self._decoder is not None:
            self._decoder.line(line, complete)

    def _boundary(self, line: bytes) -> bool:
        """Handle C{line} if it is a boundary of an enclosing multipart."""
        line = line.rstrip(b" \t")
        for depth in range(len(self._boundaries) - 1, -1, -1):
            delimiter = self._boundaries[depth]
            if line == delimiter:  # the next part begins
                del self._boundaries[depth + 1 :]
                self._startEntity()
                return True
            if line == delimiter + b"--":  # this multipart ends; its epilogue is skipped
                del self._boundaries[depth:]
                self._endPart()
                self._inHeaders = False
                return True
        return False

    def _startEntity(self) -> None:
        self._endPart()
        self._inHeaders = True
        self._headers = bytearray()

    def _endPart(self) -> None:
        if self._decoder is not None:
            self._text.append(b"\n")  # no link runs from one part into the next
        self._decoder = None

    def _endOfHeaders(self) -> None:
        headers = bytes(self._headers)
        self._inHeaders = False
        self._decoder = None
        unfolded = re.sub(rb"\n[ \t]+", b" ", headers)
        kind = _CONTENT_TYPE.search(unfolded)
        ctype = kind.group(1).lower() if kind else b"text/plain"
        if ctype.startswith(b"multipart/"):
            found = _BOUNDARY.search(unfolded)
            if found and len(self._boundaries) < MAX_DEPTH:
                self._boundaries.append(b"--" + (found.group(1) or found.group(2)).rstrip(b" "))
            return  # the preamble is skipped
        if ctype == b"message/rfc822":
            self._startEntity()  # the enclosed message's own header follows
            return
        if ctype.startswith(b"text/"):
            encoding = _ENCODING.search(unfolded)
            self._decoder = _Decoder(encoding.group(1) if encoding else b"7bit", self._text.append)


def scanMessage(
    f: IO[bytes], maxKeys: int, ignore: frozenset[str] = frozenset(), chunkSize: int = 65536
) -> list[str]:
    """
    The distinct link keys (registrable domains, IPv4 addresses) of a message's text
    parts, in the order they first appear, at most C{maxKeys}; C{f} is read in chunks.
    """
    finder = LinkFinder(maxKeys, ignore)
    scanner = MessageScanner(finder)
    while not finder.full:
        chunk = f.read(chunkSize)
        if not chunk:
            scanner.close()
            break
        scanner.feed(chunk)
    return list(finder.keys)


# -- the filter ----------------------------------------------------------------------------


@implementer(IFilter)
@attrs.frozen
class SURBLFilter(BaseFilter):
    """
    Refuses a message that links to a domain listed in a URI blocklist.

    @param scan: the message's link keys (L{scanMessage} in a thread; tests may pass a
        synchronous one).
    """

    lookup: ListLookup = attrs.field(eq=False)
    zones: tuple[Zone, ...]
    scan: Callable[[Message], Deferred[list[str]]] = attrs.field(eq=False)
    name = "surbl"
    stages = frozenset({Stage.MESSAGE})
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._check(session, envelope, message))

    async def _check(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        keys = await self.scan(message)
        queries: list[tuple[str, Zone]] = []
        for key in keys:
            try:
                label = reversedName(ipaddress.IPv4Address(key))
            except ValueError:
                label = key
            queries.extend((f"{label}.{zone.zone}", zone) for zone in self.zones)
        answers = await lookupAll(self.lookup, queries)
        listed = [
            (key, zone.zone)
            for (key, (zone, codes)) in zip(
                [k for k in keys for _ in self.zones], answers, strict=True
            )
            if isinstance(codes, tuple) and codes
        ]
        failed = [a.getErrorMessage() for _, a in answers if isinstance(a, Failure)]
        envelope.notes["surbl"] = {"uris": keys, "listed": listed, "failed": failed}
        self._log.info(
            "{session} surbl: {count} link domains, listed: {listed}",
            session=session.id,
            count=len(keys),
            listed=listed,
        )
        if listed:
            key, zone = listed[0]
            return Verdict.reject(f"Message refused: URI {key} blocked by {zone}", 554, "5.7.1")
        if failed:
            raise FilterError("; ".join(failed[:3]))
        return Verdict.accept()


@attrs.frozen
class ThreadedScan:
    """Runs L{scanMessage} on the spooled message in the reactor's thread pool."""

    reactor: IReactorThreads
    maxKeys: int
    ignore: frozenset[str]

    def __call__(self, message: Message) -> Deferred[list[str]]:
        def scan() -> list[str]:
            with message.open() as f:
                return scanMessage(f, self.maxKeys, self.ignore)

        return inThreadPool(self.reactor, scan)


@implementer(IPlugin, IFilterFactory)
class SURBLFilterFactory:
    name = "surbl"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        zones = readZones(o, "zones", weights=False)
        if not zones:
            raise OptionError("zones", "is required: at least one zone")
        maxURIs = o.integer("max_uris", 50, minimum=1)
        ignore = frozenset(d.lower().strip(".") for d in o.strings("ignore_domains"))
        server = readServer(o)
        timeout = o.number("dns_timeout", 5.0, minimum=0.01)
        cacheSize = o.integer("cache_size", 10000)
        o.finish()
        lookup = ListLookup(makeResolver(server, reactor), reactor, timeout, cacheSize)
        scan = ThreadedScan(requireThreads(reactor), maxURIs, ignore)
        return SURBLFilter(lookup=lookup, zones=zones, scan=scan)
