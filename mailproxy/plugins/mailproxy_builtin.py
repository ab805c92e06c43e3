"""The built-in filters, registered like any third-party dropin."""

from mailproxy.filters.access import AccessFilterFactory
from mailproxy.filters.size import SizeFilterFactory

access = AccessFilterFactory()
size = SizeFilterFactory()
