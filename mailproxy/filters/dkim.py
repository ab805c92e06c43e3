"""
The dkim filter: verifies every C{DKIM-Signature} (RFC 6376; rsa-sha256 and
ed25519-sha256, RFC 8463) and the ARC chain (RFC 8617) of each message, at end of data.

dkimpy does the cryptography and the header canonicalisation; this module does the rest,
in three steps so that nothing blocks the reactor and nothing holds the message:

  1. in the thread pool, the header block is read from the spool (bounded by
     C{max_header_bytes}) and the signatures' domains and selectors taken from it;
  2. in the reactor's thread, their key records (C{SELECTOR._domainkey.DOMAIN} TXT) are
     fetched through C{twisted.names}, all at once, from the configured resolver;
  3. in the thread pool, the body is read once from the spool, a chunk at a time, and
     canonicalised and hashed for every signature together (L{BodyHasher}); then dkimpy
     checks each signature over the header block alone, answering its key lookups from
     the records of step 2 (never a DNS query in the thread) and taking the body hashes
     of step 3 (L{_StreamedBody}).

So the memory a message costs does not grow with its size (contract 5): the body is
streamed, never held; only the header block is, and it is bounded. The work is bounded
too: at most C{max_signatures} signatures and C{max_arc_sets} ARC sets are checked.

Each signature's result (RFC 8601 §2.7.1) goes to the Authentication-Results notes,
C{dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12}, and all of them to
C{envelope.notes["dkim"]} for the dmarc filter; the chain's, C{arc=pass}, to
C{envelope.notes["arc"]} with its sealers. The filter refuses nothing: a failed signature
is as good as none (RFC 6376 §6.1), and policy is DMARC's.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import dkim  # type: ignore[import-untyped]
from dkim import canonicalization
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.dns import LookupTempError, lookupTexts, makeResolver, readServer, retryTimeouts
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, OptionError, Stage, Verdict
from mailproxy.filters.options import Options
from mailproxy.filters.support import (
    CHUNK_SIZE,
    DEFAULT_MAX_HEADER_BYTES,
    LineReader,
    MimeStructureError,
    inThreadPool,
    parseHeaders,
    readHeaderBlock,
    requireThreads,
)

#: Signatures checked per message by default; RFC 6376 §6.1 lets a verifier limit them.
MAX_SIGNATURES = 5
#: ARC sets checked per message by default (RFC 8617 §5.1.1 caps a chain at 50).
MAX_ARC_SETS = 10
#: The shortest RSA key accepted (RFC 8301 §3.2: at least 1024 bits); shorter: policy.
MIN_KEY_BITS = 1024
#: The longest RSA key checked (RFC 8301 §3.1: verifiers must take up to 4096 bits); longer,
#: or with a public exponent over 32 bits, is policy: the key's owner (any domain a sender
#: registers) chooses the cost of the check, and a 16384-bit key with a 16384-bit exponent
#: costs ten seconds of CPU a signature.
MAX_KEY_BITS = 4096
MAX_EXPONENT = 2**32

_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}\Z"
)
_WSP = re.compile(rb"\s+")
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')

# -- body hashes, streamed -------------------------------------------------------------


BodyKey = tuple[bytes, bytes, int | None]
"""What a body hash depends on: the body canonicalisation, C{a=}, and C{l=}."""


def bodyKey(tags: Mapping[bytes, bytes], defaultC: bytes = b"simple/simple") -> BodyKey | None:
    """
    The L{BodyKey} of a signature's tags, or None if they are malformed (then dkimpy
    says why, when it checks the signature).
    """
    c = tags.get(b"c", defaultC)
    try:
        policy = canonicalization.CanonicalizationPolicy.from_c_value(c)
    except canonicalization.InvalidCanonicalizationPolicyError:
        return None
    algorithm = tags.get(b"a", b"")
    if algorithm not in dkim.HASH_ALGORITHMS:
        return None
    length = tags.get(b"l")
    if length is not None and not length.isdigit():
        return None
    return (policy.body_algorithm.name, algorithm, int(length) if length is not None else None)


class _Sink:
    """One hash of the canonical body, of at most C{limit} bytes of it (C{l=})."""

    def __init__(self, algorithm: bytes, limit: int | None) -> None:
        self.hash = dkim.HASH_ALGORITHMS[algorithm]()
        self._left = limit

    def update(self, data: bytes) -> None:
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
        if data:
            self.hash.update(data)


_BARE_LF = re.compile(rb"(?<!\r)\n")
_WSP_RUN = re.compile(rb"[\t ]+")
#: Bytes of a line without an end held before part of it is canonicalised.
_LONG_LINE = 64 * 1024


class _Canonicaliser:
    """
    One body canonicalisation (RFC 6376 §3.4.3, §3.4.4), applied as the body streams
    by, with the very functions dkimpy applies to a whole body, to pieces cut where
    they give the same result: after a line end, or inside a long line before its
    trailing white space. Empty lines are counted, not kept, until a line with content
    follows (the body's trailing ones are dropped); a line of any length costs at most
    L{_LONG_LINE} bytes.
    """

    def __init__(self, relaxed: bool, sinks: Sequence[_Sink]) -> None:
        self._relaxed = relaxed
        self._sinks = sinks
        self._pending = b""
        self._blank = 0
        self._content = False

    def _out(self, data: bytes) -> None:
        for sink in self._sinks:
            sink.update(data)

    def _segment(self, raw: bytes) -> None:
        raw = _BARE_LF.sub(b"\r\n", raw)
        if self._relaxed:
            # dkimpy's strip_trailing_whitespace then compress_whitespace, in the other
            # order (the same bytes: a run before a line end goes either way): its
            # C{[\t ]+\r\n} is quadratic in the length of a run that is not followed
            # by one, and a message can hold a long one.
            raw = _WSP_RUN.sub(b" ", raw).replace(b" \r\n", b"\r\n")
        end = len(raw)
        while raw.endswith(b"\r\n", 0, end):
            end -= 2
        ending = (len(raw) - end) // 2
        if end == 0:
            self._blank += ending
            return
        while self._blank:
            count = min(self._blank, _LONG_LINE)
            self._out(b"\r\n" * count)
            self._blank -= count
        self._out(raw[:end])
        self._content = True
        self._blank = ending

    def feed(self, data: bytes) -> None:
        data = self._pending + data
        cut = data.rfind(b"\n") + 1
        if len(data) - cut > _LONG_LINE:
            # A long line: canonicalise it up to its trailing white space (and a CR
            # that may start its line end); a relaxed run of it is one space.
            if self._relaxed:
                # (not a regular expression: searching for a run at the end is
                # quadratic in the run's length)
                line = data[:-1] if data.endswith(b"\r") else data
                start = max(cut, len(line.rstrip(b" \t")))
                kept = data[start:]
                if kept[:1] in (b" ", b"\t"):
                    kept = b" " + (b"\r" if kept.endswith(b"\r") else b"")
                cut = start
            else:
                kept = b"\r" if data.endswith(b"\r") else b""
                cut = len(data) - len(kept)
            self._segment(data[:cut])
            self._pending = kept
            return
        if cut:
            self._segment(data[:cut])
        self._pending = data[cut:]

    def close(self) -> None:
        if self._pending:
            self._segment(self._pending)
            self._pending = b""
        if self._content or not self._relaxed:
            # The last line's end (added if the body had none); a simple empty body is
            # one CRLF, a relaxed one nothing.
            self._out(b"\r\n")


class BodyHasher:
    """
    The body hashes of several signatures, from one pass over the body: one
    canonicaliser per canonicalisation, one hash per L{BodyKey}.
    """

    def __init__(self, keys: Iterable[BodyKey]) -> None:
        self._sinks = {key: _Sink(key[1], key[2]) for key in set(keys)}
        self._canonicalisers = [
            _Canonicaliser(name == b"relaxed", [s for k, s in self._sinks.items() if k[0] == name])
            for name in {key[0] for key in self._sinks}
        ]

    def feed(self, data: bytes) -> None:
        for c in self._canonicalisers:
            c.feed(data)

    def digests(self) -> dict[BodyKey, bytes]:
        """Close the body: the hash for each key."""
        for c in self._canonicalisers:
            c.close()
        return {key: sink.hash.digest() for key, sink in self._sinks.items()}


class BodyHashMismatch(dkim.ValidationError):  # type: ignore[misc]
    """The body hash in a signature is not the body's: the body changed after signing."""


class _StreamedBody:
    """
    A dkimpy signer given the header block alone: it checks the signature's body hash
    against the one streamed from the spool, then lets dkimpy check the rest without
    C{bh=} (dkimpy hashes the body only for a signature that has one).

    This overrides C{verify_sig_process}, which dkimpy does not document: setup.cfg
    pins its minor version, and the corpus tests (dkimpy's and OpenDKIM's messages)
    catch a change in it.
    """

    bodyHashes: Mapping[BodyKey, bytes]

    def verify_sig_process(
        self, sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> Any:
        key = bodyKey(sig) if b"bh" in sig else None
        if key is not None and key in self.bodyHashes:
            try:
                expected = base64.b64decode(_WSP.sub(b"", sig[b"bh"]))
            except binascii.Error as e:
                raise dkim.MessageFormatError(f"bh= is not base64: {e}") from None
            if self.bodyHashes[key] != expected:
                raise BodyHashMismatch("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)  # type: ignore[misc]


class _DKIM(_StreamedBody, dkim.DKIM):  # type: ignore[misc]
    pass


class _ARC(_StreamedBody, dkim.ARC):  # type: ignore[misc]
    pass


# -- the steps ---------------------------------------------------------------------------


@attrs.frozen
class Signature:
    """
    One signature found in the header block.

    @ivar index: its position among the C{DKIM-Signature} fields (dkimpy's C{idx}).
    @ivar problem: why it cannot be checked at all (malformed tags): a permerror.
    """

    index: int
    domain: str
    selector: str
    b: str
    body: BodyKey | None
    problem: str | None = None

    @property
    def keyName(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@attrs.frozen
class Scan:
    """
    What step 1 found: the header block, where the body starts, and what to check.

    @ivar skipped: signatures over C{max_signatures}, not checked.
    @ivar arcKeys: the key names of the ARC sets' seals and message signatures.
    @ivar arcBodies: the body hashes the ARC message signatures need.
    @ivar arcSets: the highest ARC instance (0: no ARC header field).
    @ivar problem: why no signature could be read (the header block is refused).
    """

    block: bytes = b""
    bodyOffset: int = 0
    signatures: tuple[Signature, ...] = ()
    skipped: int = 0
    arcSets: int = 0
    arcKeys: tuple[str, ...] = ()
    arcBodies: tuple[BodyKey, ...] = ()
    problem: str | None = None

    def keyNames(self) -> set[str]:
        names = {s.keyName for s in self.signatures if s.problem is None}
        return names | set(self.arcKeys)


def _tags(value: str) -> dict[bytes, bytes]:
    """@raise ValueError: not a tag list."""
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value.encode("utf-8", "surrogateescape"))
    except InvalidTagValueList as e:
        raise ValueError(f"malformed tag list ({e})") from None
    return tags


def _name(tags: Mapping[bytes, bytes], tag: bytes) -> str | None:
    text = tags.get(tag, b"").decode("ascii", "replace").strip().rstrip(".").lower()
    return text if _DOMAIN.match(text) else None


def _signature(index: int, value: str) -> Signature:
    try:
        tags = _tags(value)
    except ValueError as e:
        return Signature(index, "", "", "", None, str(e))
    domain, selector = _name(tags, b"d"), _name(tags, b"s")
    # The sender's bytes, for header.b in the one Authentication-Results: base64 only, so
    # that no "(" or quote can open a comment or a string that swallows the rest of it.
    b = re.sub(rb"[^A-Za-z0-9+/]", b"", tags.get(b"b", b""))[:8].decode("ascii")
    if domain is None or selector is None:
        return Signature(index, domain or "", selector or "", b, None, "no usable d= or s=")
    return Signature(index, domain, selector, b, bodyKey(tags))


def scanMessage(message: Message, maxHeaderBytes: int, maxSignatures: int, maxArcSets: int) -> Scan:
    """Step 1 (blocking: in a thread): read the header block and the signatures in it."""
    with message.open() as f:
        reader = LineReader(f)
        try:
            block = readHeaderBlock(reader, maxHeaderBytes)
        except MimeStructureError as e:
            return Scan(problem=e.text)
        offset = len(block)
        if reader.stopped == "empty":
            f.seek(offset)
            offset += 2 if f.read(2) == b"\r\n" else 1
    fields = parseHeaders(block)
    found = [v for n, v in fields if n.lower() == "dkim-signature"]
    signatures = tuple(_signature(i, v) for i, v in enumerate(found[:maxSignatures]))
    arcSets, arcKeys, arcBodies = 0, set(), set()
    arcFields: Counter[str] = Counter()
    for name, value in fields:
        lower = name.lower()
        if lower not in ("arc-seal", "arc-message-signature", "arc-authentication-results"):
            continue
        arcFields[lower] += 1
        found_i = re.search(r"(?:^|[\s;])i\s*=\s*(\d{1,4})", value)
        if found_i is not None:
            arcSets = max(arcSets, int(found_i.group(1)))
        if lower == "arc-authentication-results":
            continue
        try:
            tags = _tags(value)
        except ValueError:
            continue  # dkimpy finds it malformed too: the chain fails
        domain, selector = _name(tags, b"d"), _name(tags, b"s")
        if domain is not None and selector is not None:
            arcKeys.add(f"{selector}._domainkey.{domain}")
        if lower == "arc-message-signature":
            key = bodyKey(tags, b"relaxed/relaxed")
            if key is not None:
                arcBodies.add(key)
    # One field of each kind per set: their number bounds the sets as much as the highest
    # i= does (a sender could send thousands of sets all i=1, each a key and a body hash).
    arcSets = max(arcSets, *arcFields.values(), 0)
    if arcSets > maxArcSets:
        arcKeys, arcBodies = set(), set()
    return Scan(
        block=block,
        bodyOffset=offset,
        signatures=signatures,
        skipped=max(0, len(found) - maxSignatures),
        arcSets=arcSets,
        arcKeys=tuple(sorted(arcKeys)),
        arcBodies=tuple(arcBodies),
    )


@attrs.frozen
class KeyAnswer:
    """A key record lookup's outcome: the record (C{txt}), none (NXDOMAIN, no TXT), or a temporary error."""

    txt: bytes | None = None
    temporary: str | None = None


class KeyLookup:
    """
    Fetches key records (TXT) through a C{twisted.names} resolver, all of a message's
    at once.

    @param resolver: an C{IResolver} (L{mailproxy.dns.makeResolver}); tests pass a fake
        or point it at their DNS server.
    """

    def __init__(self, resolver: Any, timeout: float) -> None:
        self._resolver = resolver
        self._timeouts = retryTimeouts(timeout)

    async def lookup(self, name: str) -> KeyAnswer:
        """The key record at C{name}: the record, none, or why it cannot be had now."""
        try:
            records = await lookupTexts(self._resolver, name, self._timeouts)
        except LookupTempError as e:
            return KeyAnswer(temporary=str(e))
        if not records:
            return KeyAnswer()
        # RFC 6376 §3.6.2.2: one record is expected; prefer a DKIM1 one if there are several.
        tagged = [r for r in records if r.lstrip().startswith(b"v=DKIM1")]
        return KeyAnswer((tagged or records)[0])

    async def fetch(self, names: Iterable[str]) -> dict[str, KeyAnswer]:
        names = sorted(set(names))
        answers = await defer.gatherResults(
            [Deferred.fromCoroutine(self.lookup(n)) for n in names], consumeErrors=True
        )
        return dict(zip(names, answers, strict=True))


@attrs.frozen
class Result:
    """One signature's result (RFC 8601 §2.7.1) and why, if it is not a pass."""

    result: str
    domain: str
    selector: str
    b: str
    reason: str = ""

    def methodResult(self) -> str:
        """Its Authentication-Results entry."""
        reason = f' reason="{_quoted(self.reason)}"' if self.reason else ""
        props = [f"header.d={self.domain}"] if self.domain else []
        if self.selector:
            props.append(f"header.s={self.selector}")
        if self.b:
            props.append(f"header.b={self.b}")
        return " ".join([f"dkim={self.result}{reason}", *props])


@attrs.frozen
class ArcResult:
    """The ARC chain's result (C{pass}, C{fail}, C{none}), its sealers newest first, and why."""

    result: str
    sealers: tuple[str, ...] = ()
    reason: str = ""

    def methodResult(self) -> str:
        reason = (
            f' reason="{_quoted(self.reason)}"' if self.reason and self.result != "pass" else ""
        )
        return f"arc={self.result}{reason}"


@attrs.frozen
class Outcome:
    results: tuple[Result, ...]
    arc: ArcResult | None


def _quoted(text: str) -> str:
    return _UNSAFE.sub("", text)[:120]


def _keyFunction(keys: Mapping[str, KeyAnswer]) -> Callable[..., bytes | None]:
    """dkimpy's C{dnsfunc}: the pre-fetched records, never a query."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        answer = keys.get(name.decode("ascii", "replace").rstrip(".").lower())
        return answer.txt if answer is not None else None

    return dnsfunc


def keyTooCostly(txt: bytes, maxKeyBits: int) -> str | None:
    """Why checking with this (well-formed) key record would cost too much, if it would."""
    try:
        pk, bits, ktag, _ = dkim.evaluate_pk("key", txt)
    except (dkim.KeyFormatError, binascii.Error):
        return None  # dkimpy says why when it checks
    if ktag != b"rsa":
        return None
    if bits > maxKeyBits:
        return f"RSA key of {bits} bits, over the limit of {maxKeyBits}"
    if pk["publicExponent"] > MAX_EXPONENT:
        return "RSA key with a public exponent over 32 bits"
    return None


def _verifyOne(
    verifier: Any,
    signature: Signature,
    keys: Mapping[str, KeyAnswer],
    dnsfunc: Any,
    maxKeyBits: int = MAX_KEY_BITS,
) -> Result:
    def result(name: str, reason: str = "") -> Result:
        return Result(name, signature.domain, signature.selector, signature.b, reason)

    if signature.problem is not None:
        return result("permerror", signature.problem)
    answer = keys.get(signature.keyName, KeyAnswer())
    if answer.temporary is not None:
        return result("temperror", answer.temporary)
    if answer.txt is None:
        return result("permerror", f"no key record at {signature.keyName}")
    try:
        dkim.evaluate_pk(signature.keyName, answer.txt)
    except (dkim.KeyFormatError, binascii.Error) as e:
        return result("permerror", f"bad key record: {e}")
    tooCostly = keyTooCostly(answer.txt, maxKeyBits)
    if tooCostly is not None:
        return result("policy", tooCostly)
    try:
        ok = verifier.verify(signature.index, dnsfunc=dnsfunc)
    except BodyHashMismatch:
        return result("fail", "body hash mismatch")
    except dkim.KeyFormatError as e:
        if "too small" in str(e):
            return result("policy", str(e))
        return result("permerror", str(e))
    except dkim.DKIMException as e:
        return result("permerror", str(e))
    return result("pass") if ok else result("fail", "signature did not verify")


def verifyMessage(
    message: Message,
    scan: Scan,
    keys: Mapping[str, KeyAnswer],
    minKeyBits: int = MIN_KEY_BITS,
    arc: bool = True,
    maxArcSets: int = MAX_ARC_SETS,
    maxKeyBits: int = MAX_KEY_BITS,
) -> Outcome:
    """Step 3 (blocking: in a thread): the body hashes, then each signature and the chain."""
    wanted = [s.body for s in scan.signatures if s.body is not None and s.problem is None]
    if arc:
        wanted.extend(scan.arcBodies)
    hasher = BodyHasher(wanted)
    if wanted:
        with message.open() as f:
            f.seek(scan.bodyOffset)
            while chunk := f.read(CHUNK_SIZE):
                hasher.feed(chunk)
    digests = hasher.digests()
    headers = scan.block if scan.block.endswith(b"\n") or not scan.block else scan.block + b"\r\n"
    dnsfunc = _keyFunction(keys)
    results = []
    if scan.signatures:
        verifier = _DKIM(headers + b"\r\n", minkey=minKeyBits)
        verifier.bodyHashes = digests
        results = [_verifyOne(verifier, s, keys, dnsfunc, maxKeyBits) for s in scan.signatures]
    arcResult = None
    if arc:
        arcResult = _verifyChain(
            headers, scan, keys, digests, minKeyBits, maxArcSets, maxKeyBits, dnsfunc
        )
    return Outcome(tuple(results), arcResult)


def _verifyChain(
    headers: bytes,
    scan: Scan,
    keys: Mapping[str, KeyAnswer],
    digests: Mapping[BodyKey, bytes],
    minKeyBits: int,
    maxArcSets: int,
    maxKeyBits: int,
    dnsfunc: Any,
) -> ArcResult:
    if scan.arcSets == 0:
        return ArcResult("none")
    if scan.arcSets > maxArcSets:
        return ArcResult("fail", reason=f"{scan.arcSets} ARC sets, over the limit of {maxArcSets}")
    temporary = [keys[n].temporary for n in scan.arcKeys if n in keys and keys[n].temporary]
    for name in scan.arcKeys:
        txt = keys[name].txt if name in keys else None
        tooCostly = keyTooCostly(txt, maxKeyBits) if txt is not None else None
        if tooCostly is not None:
            return ArcResult("fail", reason=f"{name}: {tooCostly}")
    verifier = _ARC(headers + b"\r\n", minkey=minKeyBits)
    verifier.bodyHashes = digests
    try:
        cv, data, reason = verifier.verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as e:
        return ArcResult("fail", reason=str(e))
    sealers = tuple(
        r["as-domain"].decode("ascii", "replace").lower()
        for r in sorted(data, key=lambda r: -int(r["instance"]))
        if "as-domain" in r
    )
    if cv == dkim.CV_Pass:
        return ArcResult("pass", sealers)
    if temporary:
        reason = f"{reason}; {temporary[0]}"
    return ArcResult("fail", sealers, str(reason))


# -- the filter ---------------------------------------------------------------------------


@implementer(IFilter)
@attrs.frozen
class DKIMFilter(BaseFilter):
    """
    Verifies the DKIM signatures and the ARC chain of each message; notes the results.

    @param keys: fetches key records (L{KeyLookup}).
    @param threads: the reactor whose thread pool the blocking steps run in.
    @param maxSize: messages larger than this (bytes) are not verified: C{dkim=neutral}
        for each signature. 0: no limit.
    """

    keys: KeyLookup
    threads: IReactorThreads
    maxSignatures: int = MAX_SIGNATURES
    maxArcSets: int = MAX_ARC_SETS
    maxHeaderBytes: int = DEFAULT_MAX_HEADER_BYTES
    minKeyBits: int = MIN_KEY_BITS
    maxKeyBits: int = MAX_KEY_BITS
    maxSize: int = 0
    arc: bool = True
    name = "dkim"
    stages = frozenset({Stage.MESSAGE})
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._check(session, envelope, message))

    async def _check(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        scan = await inThreadPool(
            self.threads,
            scanMessage,
            message,
            self.maxHeaderBytes,
            self.maxSignatures,
            self.maxArcSets,
        )
        if scan.problem is not None:
            outcome = Outcome((Result("permerror", "", "", "", scan.problem),), None)
        elif self.maxSize and message.size > self.maxSize:
            reason = f"message over {self.maxSize} bytes, not verified"
            outcome = Outcome(
                tuple(
                    Result("neutral", s.domain, s.selector, s.b, reason) for s in scan.signatures
                ),
                ArcResult("none", reason=reason) if self.arc and scan.arcSets else None,
            )
        else:
            names = (
                scan.keyNames()
                if self.arc
                else {s.keyName for s in scan.signatures if s.problem is None}
            )
            keys = await self.keys.fetch(names)
            outcome = await inThreadPool(
                self.threads,
                verifyMessage,
                message,
                scan,
                keys,
                self.minKeyBits,
                self.arc,
                self.maxArcSets,
                self.maxKeyBits,
            )
        self._note(session, envelope, scan, outcome)
        return Verdict.accept()

    def _note(self, session: Session, envelope: Envelope, scan: Scan, outcome: Outcome) -> None:
        results = envelope.notes.setdefault("authentication-results", [])
        if outcome.results:
            results.extend(r.methodResult() for r in outcome.results)
        else:
            results.append("dkim=none")
        envelope.notes["dkim"] = [attrs.asdict(r) for r in outcome.results]
        for r in outcome.results:
            self._log.info(
                "{session} dkim: {result} d={domain} s={selector}{why}",
                session=session.id,
                result=r.result,
                domain=r.domain,
                selector=r.selector,
                why=f" ({r.reason})" if r.reason else "",
            )
        if scan.skipped:
            self._log.info(
                "{session} dkim: {skipped} more signatures not checked (max_signatures)",
                session=session.id,
                skipped=scan.skipped,
            )
        if outcome.arc is not None:
            if outcome.arc.result != "none":
                results.append(outcome.arc.methodResult())
            envelope.notes["arc"] = attrs.asdict(outcome.arc)
            if outcome.arc.result != "none":
                self._log.info(
                    "{session} arc: {result} sealers={sealers}{why}",
                    session=session.id,
                    result=outcome.arc.result,
                    sealers=",".join(outcome.arc.sealers) or "-",
                    why=f" ({outcome.arc.reason})" if outcome.arc.reason else "",
                )


@implementer(IPlugin, IFilterFactory)
class DKIMFilterFactory:
    name = "dkim"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        server = readServer(o)
        dnsTimeout = o.number("dns_timeout", 5.0, minimum=0.01)
        maxSignatures = o.integer("max_signatures", MAX_SIGNATURES, minimum=1)
        maxArcSets = o.integer("max_arc_sets", MAX_ARC_SETS, minimum=1)
        if maxArcSets > 50:
            raise OptionError("max_arc_sets", f"must be at most 50 (RFC 8617), not {maxArcSets}")
        minKeyBits = o.integer("min_key_bits", MIN_KEY_BITS, minimum=512)
        maxKeyBits = o.integer("max_key_bits", MAX_KEY_BITS, minimum=minKeyBits)
        maxSize = o.integer("max_size", 0, minimum=0)
        maxHeaderBytes = o.integer("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, minimum=1024)
        arc = o.boolean("arc", True)
        o.finish()
        threads = requireThreads(reactor)
        return DKIMFilter(
            keys=KeyLookup(makeResolver(server, reactor), dnsTimeout),
            threads=threads,
            maxSignatures=maxSignatures,
            maxArcSets=maxArcSets,
            maxHeaderBytes=maxHeaderBytes,
            minKeyBits=minKeyBits,
            maxKeyBits=maxKeyBits,
            maxSize=maxSize,
            arc=arc,
        )
