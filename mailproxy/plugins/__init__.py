"""
Where mailproxy finds its filters: C{getPlugins(IFilterFactory, mailproxy.plugins)}.

A third-party filter is one module providing an L{IFilterFactory} in a C{mailproxy/plugins}
directory anywhere on C{sys.path}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
