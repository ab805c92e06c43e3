"""The built-in filters, registered like any third-party dropin."""

from mailproxy.filters.access import AccessFilterFactory
from mailproxy.filters.clamd import ClamdFilterFactory
from mailproxy.filters.dkim import DKIMFilterFactory
from mailproxy.filters.dmarc import DMARCFilterFactory
from mailproxy.filters.dnsbl import DNSBLFilterFactory
from mailproxy.filters.headers import HeadersFilterFactory
from mailproxy.filters.mime import MimeFilterFactory
from mailproxy.filters.p0f import P0fFilterFactory
from mailproxy.filters.rspamd import RspamdFilterFactory
from mailproxy.filters.size import SizeFilterFactory
from mailproxy.filters.spamd import SpamdFilterFactory
from mailproxy.filters.spf import SPFFilterFactory
from mailproxy.filters.surbl import SURBLFilterFactory

access = AccessFilterFactory()
clamd = ClamdFilterFactory()
dkim = DKIMFilterFactory()
dmarc = DMARCFilterFactory()
dnsbl = DNSBLFilterFactory()
headers = HeadersFilterFactory()
mime = MimeFilterFactory()
p0f = P0fFilterFactory()
rspamd = RspamdFilterFactory()
size = SizeFilterFactory()
spamd = SpamdFilterFactory()
spf = SPFFilterFactory()
surbl = SURBLFilterFactory()
