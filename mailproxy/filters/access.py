"""
The access filter: client networks, HELO names, senders and recipients, by list.

Networks are CIDR blocks (IPv4 and IPv6); names and addresses are case-insensitive glob
patterns (C{*@spam.example}, C{*.invalid}); C{"<>"} is the null sender. Each deny list
has an allow list of exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, Stage, Verdict
from mailproxy.filters.options import Options
from mailproxy.filters.support import Patterns
from mailproxy.net import Network, clientIP, inNetworks

_NOTHING = Patterns(())


@implementer(IFilter)
@attrs.frozen
class AccessFilter(BaseFilter):
    """Refuses listed clients, HELO names, senders and recipients with 550 5.7.1."""

    denyNetworks: tuple[Network, ...] = ()
    allowNetworks: tuple[Network, ...] = ()
    denyHelo: Patterns = _NOTHING
    denySenders: Patterns = _NOTHING
    allowSenders: Patterns = _NOTHING
    denyRecipients: Patterns = _NOTHING
    allowRecipients: Patterns = _NOTHING
    name = "access"

    @property
    def stages(self) -> frozenset[Stage]:  # type: ignore[override]
        wanted = {
            Stage.CONNECT: self.denyNetworks,
            Stage.HELO: self.denyHelo.patterns,
            Stage.MAIL: self.denySenders.patterns,
            Stage.RCPT: self.denyRecipients.patterns,
        }
        return frozenset(stage for stage, rules in wanted.items() if rules)

    def checkConnect(self, session: Session) -> Verdict:
        client = session.clientAddress
        ip = clientIP(client)
        if inNetworks(ip, self.denyNetworks) and not inNetworks(ip, self.allowNetworks):
            return Verdict.reject(f"Client address [{client}] refused by policy", 554)
        return Verdict.accept()

    def checkHelo(self, session: Session) -> Verdict:
        if self.denyHelo.match(session.helo or ""):
            return Verdict.reject(f"HELO name {session.helo} refused by policy")
        return Verdict.accept()

    def checkMail(self, session: Session, envelope: Envelope) -> Verdict:
        sender = envelope.mailFrom or "<>"
        if self.denySenders.match(sender) and not self.allowSenders.match(sender):
            return Verdict.reject(f"Sender <{envelope.mailFrom}> refused by policy")
        return Verdict.accept()

    def checkRcpt(self, session: Session, envelope: Envelope, recipient: str) -> Verdict:
        if self.denyRecipients.match(recipient) and not self.allowRecipients.match(recipient):
            return Verdict.reject(f"Recipient <{recipient}> refused by policy")
        return Verdict.accept()


@implementer(IPlugin, IFilterFactory)
class AccessFilterFactory:
    name = "access"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        built = AccessFilter(
            denyNetworks=o.networks("deny_networks"),
            allowNetworks=o.networks("allow_networks"),
            denyHelo=Patterns.parse(o, "deny_helo"),
            denySenders=Patterns.parse(o, "deny_senders"),
            allowSenders=Patterns.parse(o, "allow_senders"),
            denyRecipients=Patterns.parse(o, "deny_recipients"),
            allowRecipients=Patterns.parse(o, "allow_recipients"),
        )
        o.finish()
        return built
