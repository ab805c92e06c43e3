"""
The dnsbl filter: the client's address against DNS blocklists and allow-lists (RFC 5782).

Every zone is asked at once (IPv4 as reversed octets, IPv6 as 32 reversed nibbles),
through C{twisted.names} to the configured resolver, answers cached for their TTL.
A listing counts when its return code is one the zone's C{codes} accept; the weights of
the listing zones add up, and a sum at or over C{threshold} refuses the client with
C{554 5.7.1 Service unavailable; client [1.2.3.4] blocked using zen.spamhaus.org}.
A listing in an C{allow_zones} list (a DNSWL) allows the session: later filters are
skipped. The check runs at connect (the default) or at each RCPT (C{stage = "rcpt"}),
which lets listed clients still reach postmaster (C{exempt_recipients}).

It adds nothing to the message; the hits are noted as C{session.notes["dnsbl"]}.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
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
from mailproxy.envelope import Envelope, Session
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
from mailproxy.filters.support import Patterns
from mailproxy.net import Network, clientIP, inNetworks


@implementer(IFilter)
@attrs.frozen
class DNSBLFilter(BaseFilter):
    """Refuses clients listed in DNS blocklists; allows those in DNS allow-lists."""

    lookup: ListLookup = attrs.field(eq=False)
    zones: tuple[Zone, ...] = ()
    allowZones: tuple[Zone, ...] = ()
    threshold: float = 1.0
    stage: Stage = Stage.CONNECT
    exemptRecipients: Patterns = attrs.field(factory=lambda: Patterns(()))
    skipNetworks: tuple[Network, ...] = ()
    name = "dnsbl"
    _log = Logger()

    @property
    def stages(self) -> frozenset[Stage]:  # type: ignore[override]
        return frozenset({self.stage})

    def checkConnect(self, session: Session) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._check(session))

    def checkRcpt(
        self, session: Session, envelope: Envelope, recipient: str
    ) -> Verdict | Deferred[Verdict]:
        if self.exemptRecipients.match(recipient):
            return Verdict.accept()
        return Deferred.fromCoroutine(self._check(session))

    async def _check(self, session: Session) -> Verdict:
        ip = clientIP(session.clientAddress)
        if ip is None or inNetworks(ip, self.skipNetworks):
            return Verdict.accept()
        label = reversedName(ip)
        zones = self.allowZones + self.zones
        answers = await lookupAll(self.lookup, [(f"{label}.{z.zone}", z) for z in zones])
        allowAnswers, blockAnswers = (
            answers[: len(self.allowZones)],
            answers[len(self.allowZones) :],
        )

        def hits(found: list[tuple[Zone, tuple[str, ...] | Failure]]) -> dict[str, list[str]]:
            return {z.zone: list(v) for z, v in found if isinstance(v, tuple) and v}

        allowed, listed = hits(allowAnswers), hits(blockAnswers)
        failed = {z.zone: v.getErrorMessage() for z, v in answers if isinstance(v, Failure)}
        score = sum(z.weight for z, v in blockAnswers if isinstance(v, tuple) and v)
        session.notes["dnsbl"] = {
            "allowed": allowed,
            "listed": listed,
            "score": score,
            "failed": failed,
        }
        if listed or allowed:
            self._log.info(
                "{session} dnsbl: [{client}] listed {listed} (score {score}), allowed by {allowed}",
                session=session.id,
                client=ip,
                listed=listed,
                score=score,
                allowed=allowed,
            )
        if allowed:
            return Verdict.allow()
        allowFailed = any(isinstance(v, Failure) for _, v in allowAnswers)
        if score >= self.threshold and not allowFailed:
            zonesText = ", ".join(listed)
            return Verdict.reject(
                f"Service unavailable; client [{ip}] blocked using {zonesText}", 554, "5.7.1"
            )
        unknown = sum(z.weight for z, v in blockAnswers if isinstance(v, Failure))
        if score + unknown >= self.threshold:
            # The lists that did not answer could change the verdict.
            raise FilterError("; ".join(failed.values()))
        return Verdict.accept()


DEFAULT_EXEMPT = ("postmaster", "postmaster@*", "abuse@*")


@implementer(IPlugin, IFilterFactory)
class DNSBLFilterFactory:
    name = "dnsbl"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        zones = readZones(o, "zones")
        allowZones = readZones(o, "allow_zones", weights=False)
        if not zones and not allowZones:
            raise OptionError("zones", "is required: at least one zone (or allow_zones)")
        threshold = o.number("threshold", 1.0, minimum=0.001)
        stage = o.choice("stage", ("connect", "rcpt"), "connect")
        exempt = Patterns(tuple(p.lower() for p in o.strings("exempt_recipients", DEFAULT_EXEMPT)))
        server = readServer(o)
        timeout = o.number("dns_timeout", 5.0, minimum=0.01)
        cacheSize = o.integer("cache_size", 10000)
        skip = o.networks("skip_networks")
        o.finish()
        lookup = ListLookup(makeResolver(server, reactor), reactor, timeout, cacheSize)
        return DNSBLFilter(
            lookup=lookup,
            zones=zones,
            allowZones=allowZones,
            threshold=threshold,
            stage=Stage(stage),
            exemptRecipients=exempt,
            skipNetworks=skip,
        )
