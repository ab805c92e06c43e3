"""
The start-up probe of the upstream MTA: connect once, read its banner, say QUIT. A
postmaster learns from the start-up log, not from the first client's 421, that the MTA is
down or refuses mailproxy; start-up goes on either way (the MTA may come up later).
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy import wire
from mailproxy.wire import Reply


class _BannerReader(Protocol):
    """Reads the MTA's first reply, then QUIT and close; L{banner} fires with it."""

    def __init__(self) -> None:
        self.banner: Deferred[Reply] = Deferred(self._abort)
        self._parser = wire.ReplyParser()

    def dataReceived(self, data: bytes) -> None:
        if self.banner.called:
            return
        try:
            replies = self._parser.feed(data)
        except wire.ProtocolError as e:
            self._hangUp()
            self.banner.errback(Failure(e))
            return
        if replies:
            self._hangUp(quit=True)
            self.banner.callback(replies[0])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.banner.called:
            self.banner.errback(reason)

    def _hangUp(self, quit: bool = False) -> None:
        assert self.transport is not None
        if quit:
            self.transport.write(b"QUIT\r\n")
        self.transport.loseConnection()

    def _abort(self, d: Deferred[Reply]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def _probe(endpoint: IStreamClientEndpoint) -> Reply:
    reader = _BannerReader()
    await endpoint.connect(Factory.forProtocol(lambda: reader))
    return await reader.banner


def probe(endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float) -> Deferred[Reply]:
    """
    Connect to the MTA, read its banner, say QUIT and hang up, all within C{timeout}
    seconds. Cancelling it (the service stops first) drops the connection.

    @return: fires with the banner, or fails with why there was none (the connection's
        error, L{defer.TimeoutError}, L{wire.ProtocolError}).
    """
    return Deferred.fromCoroutine(_probe(endpoint)).addTimeout(timeout, clock)


def why(failure: Failure, timeout: float) -> str:
    """A probe's failure in a few words, for the log line that names the upstream."""
    if failure.check(defer.TimeoutError):
        return f"no banner within {timeout:g} s (timeouts.mta_connect)"
    if failure.check(error.ConnectionRefusedError):
        return "Connection refused"
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        return "it closed the connection before its banner"
    return failure.getErrorMessage()


class UpstreamProbe:
    """
    Probes the upstream once and logs what it found: an info line when it greets with
    220, else a warning that names the endpoint and what clients will get meanwhile.
    """

    _log = Logger()

    def __init__(self, description: str, endpoint: IStreamClientEndpoint, clock: IReactorTime):
        self._description = description
        self._endpoint = endpoint
        self._clock = clock
        self._running: Deferred[None] | None = None

    def start(self, timeout: float) -> Deferred[None]:
        """Probe (within C{timeout} seconds); the result fires once it is logged, never failing."""
        d = probe(self._endpoint, self._clock, timeout)
        upstream = self._description

        def answered(banner: Reply) -> None:
            text = f"{banner.code} {banner.text}"
            if banner.code == 220:
                self._log.info("upstream {upstream} is answering: {banner}", upstream=upstream,
                               banner=text)  # fmt: skip
            else:
                self._log.warn(
                    "upstream {upstream} does not greet with 220: {banner}; clients will be "
                    "refused until it does",
                    upstream=upstream,
                    banner=text,
                )

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                return  # the service stopped first
            self._log.warn(
                "upstream {upstream} is not answering: {why}; clients will get 421 4.3.2 "
                "until it is",
                upstream=upstream,
                why=why(failure, timeout),
            )

        self._running = d.addCallbacks(answered, failed)
        return self._running

    def stop(self) -> None:
        """Give up a probe still under way (the service is stopping)."""
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()
