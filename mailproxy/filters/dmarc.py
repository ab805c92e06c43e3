"""
The dmarc filter: the From: domain's DMARC policy (RFC 7489), at end of data.

It reads what the spf and dkim filters found (C{envelope.notes["spf"]},
C{envelope.notes["dkim"]}, C{envelope.notes["arc"]}), so it must run after them: its
C{after} attribute names them, and the pipeline refuses a configuration that puts it
before them or leaves them out (a DMARC verdict without SPF or DKIM results would fail
every message).

The steps (RFC 7489 §6.6):

  1. the From: field is read from the spool with the project's header grammar
     (L{readHeaderBlock}, L{parseHeaders}); RFC 7489 §6.6.1 wants exactly one author
     domain: a message with no From: field, several, or one without an address is
     refused with 550 5.7.1 by default (C{bad_from = "accept"}: not evaluated,
     C{dmarc=permerror}); one From: with several addresses is evaluated for each of
     their domains, and the strictest failing policy applies, as §6.6.1 says;
  2. the policy record, C{_dmarc.DOMAIN} TXT, then the organisational domain's (the
     Public Suffix List, L{mailproxy.psl}), through C{twisted.names};
  3. alignment (§3.1): a DKIM pass whose C{d=}, or an SPF pass whose domain, is the
     From: domain (strict, C{adkim=s}/C{aspf=s}) or has the same organisational domain
     (relaxed, the default);
  4. no aligned pass: the policy is C{p} (or C{sp} for a subdomain whose record is the
     organisational domain's), sampled by C{pct} (§6.6.4: a message outside the sample
     gets the next policy down), then the local overrides: allow-listed domains, and a
     passing ARC chain whose newest sealer is trusted (RFC 8617 §7.2);
  5. the action configured for the policy (a C{temperror} -- the policy record, or an
     aligned DKIM key or SPF record, could not be fetched now -- tempfails by default): reject (550 5.7.1), quarantine (refused
     with 550 5.7.1 like a reject, so that the section's C{quarantine = true} keeps
     it), tag (a header added, the message delivered) or accept.

Every result goes to the Authentication-Results notes
(C{dmarc=fail (p=reject dis=reject) header.from=example.com}) and to
C{envelope.notes["dmarc"]}.
"""

from __future__ import annotations

import enum
import random as _random
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.dns import LookupTempError, lookupTexts, makeResolver, readServer, retryTimeouts
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    BaseFilter,
    HeaderEdit,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.options import Options
from mailproxy.filters.support import (
    DEFAULT_MAX_HEADER_BYTES,
    LineReader,
    MimeStructureError,
    Patterns,
    inThreadPool,
    parseHeaders,
    readHeaderBlock,
    requireThreads,
    stripComments,
)
from mailproxy.psl import registeredDomain


class Policy(enum.Enum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def lower(self) -> Policy:
        """The next policy down (RFC 7489 §6.6.4, for a message outside C{pct})."""
        return Policy.QUARANTINE if self is Policy.REJECT else Policy.NONE


class Disposition(enum.Enum):
    """What mailproxy does with a message its policy covers."""

    REJECT = "reject"
    QUARANTINE = "quarantine"
    TAG = "tag"
    ACCEPT = "accept"


_STRICTNESS = {Policy.NONE: 0, Policy.QUARANTINE: 1, Policy.REJECT: 2}


@attrs.frozen
class Record:
    """A DMARC policy record (RFC 7489 §6.3), and the domain it was found at."""

    domain: str
    p: Policy
    sp: Policy | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def parseRecord(domain: str, text: str) -> Record | None:
    """
    A record's tags (RFC 7489 §6.3, §6.6.3): None when no DMARC processing applies (no
    valid C{p} and no C{rua}). An invalid C{p} or C{sp} with a C{rua} reads as
    C{p=none}, as §6.6.3 says; invalid C{adkim}, C{aspf}, C{pct} take their defaults.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    try:
        p = Policy(tags.get("p", "").lower())
        sp = Policy(tags["sp"].lower()) if "sp" in tags else None
    except ValueError:
        if not tags.get("rua"):
            return None
        p, sp = Policy.NONE, None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct = tags.get("pct", "100")
    return Record(
        domain=domain,
        p=p,
        sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=min(int(pct), 100) if pct.isdigit() else 100,
    )


# -- the From: field ------------------------------------------------------------------


#: Author domains evaluated at most (each costs up to two DNS lookups); more is refused
#: as a From: with several authors can be (RFC 7489 section 6.6.1).
MAX_AUTHOR_DOMAINS = 10


class FromError(ValueError):
    """The message has no single author domain (RFC 7489 §6.6.1); C{str()} says why."""


_COMMENT_OR_QUOTE = re.compile(r'"(?:[^"\\]|\\.)*"|\((?:[^()\\]|\\.)*\)')
_ANGLE = re.compile(r"<([^<>]*)>")
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}\Z"
)


def authorDomains(value: str) -> list[str]:
    """
    The domains of the addresses of one From: field value (RFC 5322 §3.4: mailboxes,
    groups, display names, comments), lower-case ASCII, in order, each once.

    @raise FromError: no address, or one without a usable domain.
    """
    text = stripComments(value)
    # Groups: their members. A group starts after a delimiter (or at the start): the
    # regex tries no other place, so a long run without one costs one pass, not n.
    text = re.sub(r"(?:\A|(?<=[,;]))[^,:;]*:([^;]*);", r"\1,", text)
    domains: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        angle = _ANGLE.search(part)
        address = (angle.group(1) if angle else part).strip()
        if address.startswith("@") and ":" in address:
            address = address.split(":", 1)[1]  # an obsolete route
        local, at, domain = address.rpartition("@")
        if not at or not local:
            raise FromError(f"From: address without a domain: {address[:80]!r}")
        domain = domain.strip().rstrip(".").lower()
        try:
            domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        except UnicodeError:
            raise FromError(f"From: domain is not a domain name: {domain[:80]!r}") from None
        if not _DOMAIN.match(domain):
            raise FromError(f"From: domain is not a domain name: {domain[:80]!r}")
        if domain not in domains:
            domains.append(domain)
            if len(domains) > MAX_AUTHOR_DOMAINS:
                raise FromError(f"From: more than {MAX_AUTHOR_DOMAINS} author domains")
    if not domains:
        raise FromError("From: field without an address")
    return domains


def readAuthorDomains(message: Message, maxHeaderBytes: int) -> list[str]:
    """
    The author domains of a spooled message (blocking: call it in a thread).

    @raise FromError: no From: field, several, or one without an address.
    """
    with message.open() as f:
        try:
            block = readHeaderBlock(LineReader(f), maxHeaderBytes)
        except MimeStructureError as e:
            raise FromError(e.text) from None
    froms = [value for name, value in parseHeaders(block) if name.lower() == "from"]
    if not froms:
        raise FromError("no From: field")
    if len(froms) > 1:
        raise FromError(f"{len(froms)} From: fields")
    return authorDomains(froms[0])


# -- the policy records --------------------------------------------------------------


class PolicyLookup:
    """
    Fetches DMARC records through a C{twisted.names} resolver (RFC 7489 §6.6.3): the
    author domain's, else its organisational domain's.
    """

    def __init__(self, resolver: Any, timeout: float) -> None:
        self._resolver = resolver
        self._timeouts = retryTimeouts(timeout)

    async def records(self, name: str) -> list[str]:
        """The C{v=DMARC1} TXT records at C{_dmarc.NAME}; @raise LookupTempError."""
        records = await lookupTexts(self._resolver, f"_dmarc.{name}", self._timeouts)
        texts = [record.decode("utf-8", "replace") for record in records]
        return [t for t in texts if re.match(r"v\s*=\s*DMARC1\s*(;|\Z)", t)]

    async def find(self, domain: str) -> Record | None:
        """The policy for C{domain}; None when there is none. @raise LookupTempError."""
        organisational = registeredDomain(domain) or domain
        for name in dict.fromkeys((domain, organisational)):
            found = await self.records(name)
            if len(found) > 1:
                return None  # §6.6.3: several records, no policy
            if found:
                return parseRecord(name, found[0])
        return None


# -- the decision -----------------------------------------------------------------------


def _aligned(identifier: str, author: str, mode: str) -> bool:
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if mode == "s":
        return identifier == author
    return (registeredDomain(identifier) or identifier) == (registeredDomain(author) or author)


@attrs.frozen
class Evaluation:
    """One author domain's DMARC result (RFC 8601 C{dmarc=}) and what it leads to."""

    domain: str
    result: str
    policy: Policy | None = None
    disposition: Policy | None = None
    override: str | None = None
    overrideBy: str | None = None
    reason: str = ""

    def methodResult(self) -> str:
        comment = []
        if self.policy is not None:
            comment.append(f"p={self.policy.value}")
        if self.disposition is not None:
            comment.append(f"dis={self.disposition.value}")
        if self.override:
            comment.append(f"override={self.override}")
        if self.reason:
            comment.append(self.reason.replace("(", "[").replace(")", "]"))
        text = f"dmarc={self.result}"
        if comment:
            text += " (" + " ".join(comment) + ")"
        text += f" header.from={self.domain}"
        if self.overrideBy:
            text += f" policy.arc-override={self.overrideBy}"
        return text


def evaluate(
    domain: str,
    record: Record | None,
    notes: Mapping[str, Any],
    random: Callable[[], float],
    allowDomains: Patterns,
    trustedSealers: Patterns,
) -> Evaluation:
    """The DMARC result for one author domain, from what the spf and dkim filters noted."""
    if record is None:
        return Evaluation(domain, "none")
    passes = [
        r.get("domain", "")
        for r in notes.get("dkim", ())
        if r.get("result") == "pass" and _aligned(r.get("domain", ""), domain, record.adkim)
    ]
    spf = notes.get("spf") or {}
    if spf.get("result") == "pass" and _aligned(spf.get("domain", ""), domain, record.aspf):
        passes.append(spf.get("domain", ""))
    if passes:
        return Evaluation(domain, "pass", record.p)
    subdomain = record.domain != domain
    policy = record.sp if subdomain and record.sp is not None else record.p
    disposition = policy
    if record.pct < 100 and random() * 100 >= record.pct:
        disposition = policy.lower()
    if disposition is not Policy.NONE:
        organisational = registeredDomain(domain) or domain
        if allowDomains.match(domain) or allowDomains.match(organisational):
            return Evaluation(domain, "fail", policy, Policy.NONE, "local_policy")
        arc = notes.get("arc") or {}
        sealers = arc.get("sealers") or ()
        if arc.get("result") == "pass" and sealers and trustedSealers.match(sealers[0]):
            return Evaluation(domain, "fail", policy, Policy.NONE, "trusted_forwarder", sealers[0])
        # An aligned identifier that could not be checked now might have passed: a DNS
        # hiccup at the signer's must not bounce its mail (RFC 7489 6.6.2).
        unknown = [
            r.get("domain", "")
            for r in notes.get("dkim", ())
            if r.get("result") == "temperror"
            and _aligned(r.get("domain", ""), domain, record.adkim)
        ]
        if spf.get("result") == "temperror" and _aligned(
            spf.get("domain", ""), domain, record.aspf
        ):
            unknown.append(spf.get("domain", ""))
        if unknown:
            reason = f"no aligned pass; {unknown[0]} could not be checked"
            return Evaluation(domain, "temperror", policy, reason=reason)
    return Evaluation(domain, "fail", policy, disposition)


# -- the filter ---------------------------------------------------------------------------

DEFAULT_ACTIONS: Mapping[Policy, Disposition] = {
    Policy.REJECT: Disposition.REJECT,
    Policy.QUARANTINE: Disposition.TAG,
    Policy.NONE: Disposition.ACCEPT,
}


@implementer(IFilter)
@attrs.frozen
class DMARCFilter(BaseFilter):
    """
    Evaluates the From: domain's DMARC policy and acts on it.

    @param random: the sampling source for C{pct} (a float in [0, 1)); tests inject one.
    @param actions: what each disposition does.
    """

    policies: PolicyLookup
    threads: IReactorThreads
    actions: Mapping[Policy, Disposition] = DEFAULT_ACTIONS
    allowDomains: Patterns = attrs.Factory(lambda: Patterns(()))
    trustedSealers: Patterns = attrs.Factory(lambda: Patterns(()))
    badFrom: Disposition = Disposition.REJECT
    #: For a temperror: L{Disposition.REJECT} tempfails (451 4.7.1), ACCEPT accepts.
    temperror: Disposition = Disposition.REJECT
    tagHeader: str = "X-DMARC"
    maxHeaderBytes: int = DEFAULT_MAX_HEADER_BYTES
    random: Callable[[], float] = _random.random
    name = "dmarc"
    stages = frozenset({Stage.MESSAGE})
    #: The filters whose results it reads: they must come before it (the pipeline checks).
    after = ("spf", "dkim")
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._check(session, envelope, message))

    async def _check(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        results = envelope.notes.setdefault("authentication-results", [])
        try:
            domains = await inThreadPool(
                self.threads, readAuthorDomains, message, self.maxHeaderBytes
            )
        except FromError as problem:
            why = str(problem)
            self._log.info("{session} dmarc: not evaluated: {why}", session=session.id, why=why)
            envelope.notes["dmarc"] = [{"result": "permerror", "reason": why}]
            results.append(f"dmarc=permerror ({why.replace('(', '[').replace(')', ']')})")
            if self.badFrom is Disposition.ACCEPT:
                return Verdict.accept()
            return Verdict.reject(
                f"Message refused: {why}; exactly one From: field with one author is required "
                "(RFC 5322 section 3.6, RFC 7489 section 6.6.1)",
                550,
                "5.7.1",
            )
        evaluations = []
        for domain in domains:
            try:
                record = await self.policies.find(domain)
            except LookupTempError as failed:
                evaluations.append(Evaluation(domain, "temperror", reason=str(failed)))
                continue
            evaluations.append(
                evaluate(
                    domain,
                    record,
                    envelope.notes,
                    self.random,
                    self.allowDomains,
                    self.trustedSealers,
                )
            )
        results.extend(ev.methodResult() for ev in evaluations)
        envelope.notes["dmarc"] = [attrs.asdict(ev) for ev in evaluations]
        for e in evaluations:
            self._log.info(
                "{session} dmarc: {result} for {domain} (p={policy} dis={disposition}{override})",
                session=session.id,
                result=e.result,
                domain=e.domain,
                policy=e.policy.value if e.policy else "-",
                disposition=e.disposition.value if e.disposition else "-",
                override=f" override={e.override}" if e.override else "",
            )
        failing = [e for e in evaluations if e.disposition is not None]
        if not failing:
            temporary = [e for e in evaluations if e.result == "temperror"]
            if temporary and self.temperror is Disposition.REJECT:
                return Verdict.tempfail(
                    f"DMARC check of {temporary[0].domain} failed temporarily, try again later",
                    451,
                    "4.7.1",
                )
            return Verdict.accept()
        worst = max(failing, key=lambda e: _STRICTNESS[e.disposition])  # type: ignore[index]
        assert worst.disposition is not None
        action = self.actions[worst.disposition]
        text = (
            f"DMARC policy of {worst.domain} ({worst.disposition.value}): no SPF or DKIM "
            f"pass aligned with the From: domain {worst.domain}"
        )
        if action is Disposition.REJECT:
            return Verdict.reject(f"Message refused: {text}", 550, "5.7.1")
        if action is Disposition.QUARANTINE:
            return Verdict.reject(f"Message quarantined: {text}", 550, "5.7.1")
        if action is Disposition.TAG:
            value = f"fail policy={worst.disposition.value} header.from={worst.domain}"
            return Verdict.accept(edits=(HeaderEdit.add(self.tagHeader, value),))
        return Verdict.accept()


_HEADER_NAME = re.compile(r"[\041-\071\073-\176]{1,76}\Z")


def _readAction(o: Options, key: str, default: Disposition) -> Disposition:
    return Disposition(o.choice(key, tuple(d.value for d in Disposition), default.value))


@implementer(IPlugin, IFilterFactory)
class DMARCFilterFactory:
    name = "dmarc"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        server = readServer(o)
        dnsTimeout = o.number("dns_timeout", 5.0, minimum=0.01)
        actions = {
            Policy.REJECT: _readAction(o, "reject_action", DEFAULT_ACTIONS[Policy.REJECT]),
            Policy.QUARANTINE: _readAction(
                o, "quarantine_action", DEFAULT_ACTIONS[Policy.QUARANTINE]
            ),
            Policy.NONE: Disposition.ACCEPT,
        }
        badFrom = _readAction(o, "bad_from", Disposition.REJECT)
        if badFrom not in (Disposition.REJECT, Disposition.ACCEPT):
            raise OptionError("bad_from", 'must be "reject" or "accept"')
        temperror = o.choice("temperror_action", ("tempfail", "accept"), "tempfail")
        tagHeader = o.string("tag_header", "X-DMARC")
        if not _HEADER_NAME.match(tagHeader):
            raise OptionError("tag_header", f"not a header field name: {tagHeader!r}")
        allow = Patterns.parse(o, "allow_domains")
        sealers = Patterns.parse(o, "trusted_sealers")
        maxHeaderBytes = o.integer("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, minimum=1024)
        o.finish()
        return DMARCFilter(
            policies=PolicyLookup(makeResolver(server, reactor), dnsTimeout),
            threads=requireThreads(reactor),
            actions=actions,
            allowDomains=allow,
            trustedSealers=sealers,
            badFrom=badFrom,
            temperror=Disposition.REJECT if temperror == "tempfail" else Disposition.ACCEPT,
            tagHeader=tagHeader,
            maxHeaderBytes=maxHeaderBytes,
        )


__all__ = [
    "DMARCFilter",
    "DMARCFilterFactory",
    "Evaluation",
    "Policy",
    "Record",
    "authorDomains",
    "evaluate",
    "parseRecord",
]
