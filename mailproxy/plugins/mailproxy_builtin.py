"""
The built-in filters, registered like any third-party dropin.

Each is registered by name and its module imported only when a configuration builds it:
a proxy loads only the filters it runs (rspamd's twisted.web, dkim's dkimpy, the Public
Suffix List), and discovery at start-up stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.filters import IFilter, IFilterFactory


@implementer(IPlugin, IFilterFactory)
class BuiltinFactory:
    """The factory C{factory} of C{mailproxy.filters.MODULE}, imported at the first build."""

    def __init__(self, name: str, module: str, factory: str) -> None:
        self.name = name
        self._where = (f"mailproxy.filters.{module}", factory)

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        module, factory = self._where
        built: IFilter = getattr(importlib.import_module(module), factory)().build(
            options, reactor
        )
        return built

    def __repr__(self) -> str:
        return f"<built-in filter {self.name}: {'.'.join(self._where)}>"


access = BuiltinFactory("access", "access", "AccessFilterFactory")
clamd = BuiltinFactory("clamd", "clamd", "ClamdFilterFactory")
dkim = BuiltinFactory("dkim", "dkim", "DKIMFilterFactory")
dmarc = BuiltinFactory("dmarc", "dmarc", "DMARCFilterFactory")
dnsbl = BuiltinFactory("dnsbl", "dnsbl", "DNSBLFilterFactory")
headers = BuiltinFactory("headers", "headers", "HeadersFilterFactory")
mime = BuiltinFactory("mime", "mime", "MimeFilterFactory")
p0f = BuiltinFactory("p0f", "p0f", "P0fFilterFactory")
rspamd = BuiltinFactory("rspamd", "rspamd", "RspamdFilterFactory")
size = BuiltinFactory("size", "size", "SizeFilterFactory")
spamd = BuiltinFactory("spamd", "spamd", "SpamdFilterFactory")
spf = BuiltinFactory("spf", "spf", "SPFFilterFactory")
surbl = BuiltinFactory("surbl", "surbl", "SURBLFilterFactory")
