"""
The spf filter: checks the sender's SPF record (RFC 7208) at MAIL FROM, with pyspf.

The identity checked is the MAIL FROM domain, or for the null sender the HELO name
(RFC 7208 §2.3: the check then runs on C{postmaster@HELO}). pyspf blocks, so each check
runs in the reactor's thread pool. Its DNS queries go to the configured resolver only:

pyspf looks up DNS through one module global, C{spf.DNSLookup(name, qtype, strict,
timeout)}, which by default calls dnspython's I{default} resolver (configured from
/etc/resolv.conf). It has no per-query hook, so this module replaces that global once
with a dispatcher that uses the lookup the I{current thread} set for the check it is
running (a C{threading.local}), and pyspf's own function when a thread set none. Each
filter keeps its own dnspython resolver; checks of several filters (or tests) in
parallel threads never see each other's resolver, and other users of pyspf in the
process see no change.

Each result has a configurable action: accept (the message gets a C{Received-SPF}
header), reject (550 5.7.23, or 5.7.24 for permerror) or tempfail (451 4.7.23/4.7.24).
Every result is also noted for the Authentication-Results header
(C{envelope.notes["authentication-results"]}: C{spf=pass smtp.mailfrom=example.org})
and as C{envelope.notes["spf"]}.
"""

from __future__ import annotations

import enum
import re
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import dns.exception
import dns.resolver
import spf
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.dns import readServer
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, OptionError, Stage, Verdict
from mailproxy.filters.options import Options
from mailproxy.filters.support import inThreadPool, requireThreads
from mailproxy.net import Network, clientIP, inNetworks

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


class Action(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


#: What each result does unless configured otherwise. permerror is accepted (with its
#: header): it says the domain's record is broken, not that the sender is forged, and
#: RFC 7208 §8.7 leaves it to local policy; refusing it bounces real mail from
#: misconfigured domains, while the header still lets later scoring weigh it.
DEFAULT_ACTIONS: Mapping[str, Action] = {
    "fail": Action.REJECT,
    "softfail": Action.ACCEPT,
    "neutral": Action.ACCEPT,
    "none": Action.ACCEPT,
    "temperror": Action.TEMPFAIL,
    "permerror": Action.ACCEPT,
}

# A multi-label domain name of LDH labels (RFC 7208 §4.3: anything else is "none").
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}\.?\Z", re.I
)
_HOSTNAME = re.compile(r"[\w.-]{1,253}\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def _domain(text: str) -> str | None:
    """C{text} as an ASCII domain name, or None if it is not a usable one."""
    try:
        ascii = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        return None
    return ascii.rstrip(".").lower() if _DOMAIN.match(ascii) else None


def _sanitised(text: str, limit: int = 200) -> str:
    """Text from DNS (an exp= explanation) made safe for an SMTP reply line."""
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


@attrs.frozen
class Request:
    """What one SPF check is asked about."""

    ip: str
    sender: str
    helo: str
    receiver: str


@attrs.frozen
class Answer:
    """
    The outcome of one check.

    @ivar identity: C{"mailfrom"} or C{"helo"} (the null sender's HELO name).
    @ivar domain: the domain whose record was checked.
    @ivar comment: the RFC 7208 §9.1 comment (C{domain of x designates ...}).
    @ivar explanation: pyspf's explanation: for a fail, the domain's C{exp=} text.
    """

    result: str
    identity: str
    domain: str
    comment: str
    explanation: str = ""
    mechanism: str | None = None
    problem: str | None = None


# -- pyspf's DNS, per thread ------------------------------------------------------------

Lookup = Callable[[str, str, object, float], list[tuple[tuple[str, str], Any]]]

_perThread = threading.local()
_installLock = threading.Lock()
_pyspfLookup: Lookup | None = None


def _dispatch(name: str, qtype: str, strict: object = True, timeout: float = 30) -> Any:
    """pyspf's C{DNSLookup}: the current thread's lookup, else pyspf's own."""
    lookup: Lookup | None = getattr(_perThread, "lookup", None)
    if lookup is None:
        assert _pyspfLookup is not None
        return _pyspfLookup(name, qtype, strict, timeout)
    return lookup(name, qtype, strict, timeout)


def _installDispatch() -> None:
    """Put L{_dispatch} in place of pyspf's C{DNSLookup}, once per process."""
    global _pyspfLookup
    with _installLock:
        if spf.DNSLookup is not _dispatch:
            _pyspfLookup = spf.DNSLookup
            spf.DNSLookup = _dispatch


class DnspythonLookup:
    """
    pyspf's C{DNSLookup} contract (as its C{DNSLookup_dnspython}) over a dnspython
    resolver that asks one server and reads no system configuration.

    @param attemptTimeout: seconds for one query attempt; pyspf's C{timeout} argument
        bounds all the attempts of a lookup together.
    """

    def __init__(self, server: tuple[str, int], attemptTimeout: float) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
        resolver.timeout = attemptTimeout
        resolver.cache = None
        self._resolver = resolver

    def __call__(
        self, name: str, qtype: str, strict: object = True, timeout: float = 30
    ) -> list[tuple[tuple[str, str], Any]]:
        try:
            answers = self._resolver.resolve(name, qtype, lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            # Timeout, NoNameservers (SERVFAIL, REFUSED, unreachable), malformed names.
            raise spf.TempError(f"DNS {e}") from e
        results: list[tuple[tuple[str, str], Any]] = []
        for rdata in answers:
            value: Any
            if qtype in ("A", "AAAA"):
                value = rdata.address
            elif qtype == "MX":
                value = (rdata.preference, rdata.exchange)
            elif qtype == "PTR":
                value = rdata.target.to_text(True)
            elif qtype in ("TXT", "SPF"):
                value = rdata.strings
            else:
                continue
            results.append(((name, qtype), value))
        return results


def evaluate(request: Request, lookup: Lookup, queryTime: float) -> Answer:
    """
    Run one SPF check with pyspf (blocking: call it in a thread).

    @param queryTime: seconds for the whole check (pyspf's C{querytime}), after which
        it is a temperror.
    """
    if request.sender:
        identity = "mailfrom"
        domain = _domain(request.sender.rpartition("@")[2]) if "@" in request.sender else None
    else:
        identity = "helo"
        domain = _domain(request.helo)
    if domain is None:
        # RFC 7208 §4.3: no usable domain (an address literal, a single label): "none".
        shown = request.sender.rpartition("@")[2] if request.sender else request.helo
        return Answer(
            "none", identity, shown, f"{request.ip} is neither permitted nor denied by {shown}"
        )
    _installDispatch()
    installed = getattr(_perThread, "lookup", None)
    _perThread.lookup = lookup
    try:
        q = spf.query(
            i=request.ip,
            s=request.sender,
            h=request.helo,
            receiver=request.receiver,
            timeout=queryTime,
            querytime=queryTime,
        )
        result, _, explanation = q.check()
        comment = q.get_header_comment(result)
    finally:
        _perThread.lookup = installed
    return Answer(
        result=result,
        identity=identity,
        domain=domain,
        comment=comment,
        explanation=explanation,
        mechanism=q.mechanism if result not in ("permerror", "temperror") else None,
        problem=" ".join(q.mech) if result == "permerror" and q.mech else None,
    )


def receivedSPF(request: Request, answer: Answer) -> str:
    """The RFC 7208 §9.1 C{Received-SPF} field value for C{answer}."""
    quote = spf.quote_value
    pairs = [f"client-ip={request.ip};"]
    if answer.identity == "mailfrom":
        pairs.append(f"envelope-from={quote(request.sender)};")
    if request.helo:
        pairs.append(f"helo={quote(request.helo)};")
    pairs.append(f"receiver={quote(request.receiver)};")
    pairs.append(f"identity={answer.identity};")
    if answer.mechanism:
        pairs.append(f"mechanism={quote(answer.mechanism)};")
    if answer.problem:
        pairs.append(f"problem={quote(_sanitised(answer.problem))};")
    comment = _sanitised(answer.comment, 300).replace("(", "[").replace(")", "]")
    return f"{answer.result} ({request.receiver}: {comment}) " + " ".join(pairs)


# -- the filter ---------------------------------------------------------------------------


@implementer(IFilter)
@attrs.frozen
class SPFFilter(BaseFilter):
    """
    Checks SPF at MAIL FROM; adds the C{Received-SPF} header at end of data.

    @param check: runs one L{Request} to its L{Answer} (pyspf in a thread; tests pass
        a fake).
    """

    check: Callable[[Request], Deferred[Answer]]
    receiver: str
    actions: Mapping[str, Action] = DEFAULT_ACTIONS
    skipNetworks: tuple[Network, ...] = ()
    name = "spf"
    stages = frozenset({Stage.MAIL, Stage.MESSAGE})
    _log = Logger()

    def checkMail(self, session: Session, envelope: Envelope) -> Verdict | Deferred[Verdict]:
        ip = clientIP(session.clientAddress)
        if ip is None or inNetworks(ip, self.skipNetworks):
            return Verdict.accept()
        request = Request(str(ip), envelope.mailFrom, session.helo or "", self.receiver)
        return self.check(request).addCallback(self._decide, session, envelope, request)

    def _decide(
        self, answer: Answer, session: Session, envelope: Envelope, request: Request
    ) -> Verdict:
        method = "smtp.mailfrom" if answer.identity == "mailfrom" else "smtp.helo"
        envelope.notes.setdefault("authentication-results", []).append(
            f"spf={answer.result} {method}={answer.domain}"
        )
        envelope.notes["spf"] = {
            "result": answer.result,
            "identity": answer.identity,
            "domain": answer.domain,
            "header": receivedSPF(request, answer),
        }
        self._log.info(
            "{session} spf: {result} for {identity} {domain} from [{ip}]",
            session=session.id,
            result=answer.result,
            identity=answer.identity,
            domain=answer.domain,
            ip=request.ip,
        )
        action = self.actions.get(answer.result, Action.ACCEPT)
        if action is Action.ACCEPT:
            return Verdict.accept()
        error = answer.result in ("temperror", "permerror")
        if answer.result == "temperror":
            text = f"SPF check of {answer.domain} failed temporarily, try again later"
        elif answer.result == "permerror":
            text = f"SPF record of {answer.domain} is in error: {answer.explanation}"
        else:
            text = f"SPF {answer.result}: {answer.domain} does not designate {request.ip} as permitted sender"
            default = spf.EXPLANATIONS.get(answer.result, "")
            if answer.explanation and answer.explanation != default:
                text += f" ({answer.explanation})"
        text = _sanitised(text, 300)
        if action is Action.REJECT:
            return Verdict.reject(text, 550, "5.7.24" if error else "5.7.23")
        return Verdict.tempfail(text, 451, "4.7.24" if error else "4.7.23")

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        noted = envelope.notes.get("spf")
        if not noted:
            return Verdict.accept()
        return Verdict.accept((("Received-SPF", noted["header"]),))


@attrs.frozen
class ThreadedCheck:
    """Runs L{evaluate} in the reactor's thread pool."""

    reactor: IReactorThreads
    lookup: Lookup
    queryTime: float

    def __call__(self, request: Request) -> Deferred[Answer]:
        return inThreadPool(self.reactor, evaluate, request, self.lookup, self.queryTime)


@implementer(IPlugin, IFilterFactory)
class SPFFilterFactory:
    name = "spf"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        server = readServer(o)
        dnsTimeout = o.number("dns_timeout", 3.0, minimum=0.01)
        lookupTime = o.number("lookup_time", 20.0, minimum=0.01)
        receiver = o.string("receiver", socket.gethostname())
        if not _HOSTNAME.match(receiver):
            raise OptionError("receiver", f"not a host name: {receiver!r}")
        actions = {
            result: Action(o.choice(result, tuple(a.value for a in Action), default.value))
            for result, default in DEFAULT_ACTIONS.items()
        }
        skip = o.networks("skip_networks")
        o.finish()
        _installDispatch()
        check = ThreadedCheck(
            requireThreads(reactor), DnspythonLookup(server, dnsTimeout), lookupTime
        )
        return SPFFilter(check=check, receiver=receiver, actions=actions, skipNetworks=skip)
