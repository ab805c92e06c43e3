"""
The service tree: the spool sweep at start-up and one listener per C{listen} endpoint,
all sharing one L{RelayFactory}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger

from mailproxy.config import Config
from mailproxy.filters.pipeline import buildPipeline
from mailproxy.relay import RelayFactory, Settings
from mailproxy.spool import sweep


class ProxyService(MultiService):
    """mailproxy in one process: listeners in front of one upstream MTA."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.factory = RelayFactory(
            Settings(config, buildPipeline(config, reactor)),
            clientFromString(reactor, config.upstream),
            reactor,
        )
        for description in config.listen:
            listener = StreamServerEndpointService(
                serverFromString(reactor, description), self.factory
            )
            listener._raiseSynchronously = True  # a port in use stops start-up, loudly
            listener.setName(f"listen {description}")
            listener.setServiceParent(self)

    def startService(self) -> None:
        for name in sweep(self.config.spoolDir):
            self._log.warn("removed leftover spool file {name}", name=name)
        self._log.info(
            "mailproxy listening on {listen}, relaying to {upstream}",
            listen=", ".join(self.config.listen),
            upstream=self.config.upstream,
        )
        super().startService()  # type: ignore[no-untyped-call]
