"""
The filter API: what a filter is, what it answers, and how the proxy finds it.

A filter provides L{IFilter}; its factory provides L{IFilterFactory} and is found with
C{twisted.plugin} in L{mailproxy.plugins}, so a third party adds a filter by shipping one
dropin module and a C{[filters.NAME]} section in the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.verdict import (
    Action,
    EditKind,
    HeaderEdit,
    InvalidVerdictError,
    Stage,
    Verdict,
)

__all__ = [
    "Action",
    "BaseFilter",
    "EditKind",
    "FilterError",
    "HeaderEdit",
    "IFilter",
    "IFilterFactory",
    "InvalidVerdictError",
    "OptionError",
    "Stage",
    "Verdict",
    "VerdictResult",
]


class FilterError(Exception):
    """
    An expected failure of a filter (its service unreachable, a malformed answer).

    The pipeline handles it by the filter's C{on_error} policy. Any other exception is a
    bug: it is logged with its traceback and the stage is tempfailed, never accepted.
    """


class OptionError(Exception):
    """A filter's options are wrong: C{key} names the option at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


VerdictResult = Verdict | Deferred[Verdict]


class IFilter(Interface):
    """A check run at one or more L{Stage}s; each check answers a L{Verdict}."""

    name = Attribute("The filter's name, as in the configuration and the logs.")
    stages = Attribute("A frozenset of the L{Stage}s this filter checks.")
    always = Attribute("Whether it runs even in a session a filter has allowed (L{Action.ALLOW}).")

    def checkConnect(session: Session) -> VerdictResult:
        """Check a new client connection."""

    def checkHelo(session: Session) -> VerdictResult:
        """Check C{session.helo}, just given by HELO or EHLO."""

    def checkMail(session: Session, envelope: Envelope) -> VerdictResult:
        """Check the sender of a new transaction."""

    def checkRcpt(session: Session, envelope: Envelope, recipient: str) -> VerdictResult:
        """Check one recipient; C{envelope.recipients} holds those accepted before it."""

    def checkMessage(session: Session, envelope: Envelope, message: Message) -> VerdictResult:
        """Check the spooled message; read it with C{message.open()}, in chunks."""


class IFilterFactory(Interface):
    """Builds a filter from its configuration section; one plugin per filter kind."""

    name = Attribute("The section name: C{[filters.NAME]} in the configuration.")

    def build(options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        """
        Validate C{options} (the section, less the common keys) and build the filter.

        @param reactor: the reactor, for timers, connections and the thread pool.
        @raise OptionError: an option is unknown, missing or wrong.
        """


class BaseFilter:
    """Accepts at every stage: subclass it and override the checks you declare."""

    name = "base"
    stages: frozenset[Stage] = frozenset()
    always = False

    def checkConnect(self, session: Session) -> VerdictResult:
        return Verdict.accept()

    def checkHelo(self, session: Session) -> VerdictResult:
        return Verdict.accept()

    def checkMail(self, session: Session, envelope: Envelope) -> VerdictResult:
        return Verdict.accept()

    def checkRcpt(self, session: Session, envelope: Envelope, recipient: str) -> VerdictResult:
        return Verdict.accept()

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> VerdictResult:
        return Verdict.accept()
