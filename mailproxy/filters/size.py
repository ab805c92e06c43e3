"""The size filter: refuses messages over a size, early at MAIL's SIZE= and at end of data."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, IFilterFactory, Stage, Verdict
from mailproxy.filters.options import Options
from mailproxy.wire import sizeParameter


@implementer(IFilter)
@attrs.frozen
class SizeFilter(BaseFilter):
    """Refuses with 552 5.3.4 a message larger than C{maxBytes}."""

    maxBytes: int
    name = "size"
    stages = frozenset({Stage.MAIL, Stage.MESSAGE})

    @property
    def maxMessageSize(self) -> int:
        """What EHLO's SIZE may announce at most (L{Pipeline.sizeLimit})."""
        return self.maxBytes

    def _refuse(self) -> Verdict:
        return Verdict.reject(f"Message size exceeds {self.maxBytes} bytes", 552, "5.3.4")

    def checkMail(self, session: Session, envelope: Envelope) -> Verdict:
        declared = sizeParameter(envelope.mailParameters.encode("utf-8", "surrogateescape"))
        if declared is not None and declared > self.maxBytes:
            return self._refuse()
        return Verdict.accept()

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        if message.size > self.maxBytes:
            return self._refuse()
        return Verdict.accept()


@implementer(IPlugin, IFilterFactory)
class SizeFilterFactory:
    name = "size"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        built = SizeFilter(o.integer("max_bytes", minimum=1))
        o.finish()
        return built
