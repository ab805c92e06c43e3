"""
The service tree: the log observers, the spool sweep at start-up, one listener per
C{listen} endpoint and one implicit-TLS listener per C{listen_tls} endpoint (all sharing
one L{RelayFactory}), the quarantine's daily expiry and the manhole. SIGHUP reloads the
configuration; stopping lets sessions finish.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from mailproxy import directories, proxyprotocol, startup, tls
from mailproxy.clientname import ClientNames
from mailproxy.config import Config, ConfigError, load
from mailproxy.control import StatsSocketService
from mailproxy.filters import IFilterFactory
from mailproxy.filters.pipeline import buildPipeline
from mailproxy.logs import LogService
from mailproxy.proxyprotocol import ProxyHeaderFactory
from mailproxy.quarantine import Quarantine
from mailproxy.relay import RelayFactory, Settings
from mailproxy.session import Policy
from mailproxy.spool import sweepAll
from mailproxy.startup import Listener, StartupError, oneLine
from mailproxy.stats import Stats, StatsService
from mailproxy.upstream import UpstreamProbe

if TYPE_CHECKING:
    # Imported where they are configured: conch, twisted.web and prometheus_client are
    # a good part of an idle process's memory.
    from mailproxy.manhole import ManholeService

#: What a reload cannot change (C{Config} attributes, by their keys): a restart applies them.
RESTART_ONLY = {
    "proxy.listen": "listen",
    "proxy.listen_tls": "listenTls",
    "proxy.spool_dir": "spoolDir",
    "[logging]": "logging",
    "[manhole]": "manhole",
    "[stats]": "stats",
    "[web]": "web",
    "proxy.workers": "workers",
}
#: Seconds between two expiries of the quarantine (the first one is at start-up).
EXPIRY_INTERVAL = 86400.0


__all__ = ["RESTART_ONLY", "ProxyService", "StartupError", "keepRestartOnly", "wrapFactory"]


def keepRestartOnly(config: Config, running: Config) -> tuple[Config, list[str]]:
    """
    C{config} with the values that take a restart kept from C{running}, and the keys of
    those it would have changed.
    """
    changed = [
        key for key, name in RESTART_ONLY.items() if getattr(config, name) != getattr(running, name)
    ]
    if changed:
        config = attrs.evolve(
            config, **{name: getattr(running, name) for name in RESTART_ONLY.values()}
        )
    return config, changed


def wrapFactory(
    reactor: Any,
    description: str,
    factory: IProtocolFactory,
    config: Callable[[], Config],
    stats: Stats,
) -> tuple[str, IProtocolFactory]:
    """
    The endpoint string to listen on for C{description}, and the factory to serve there:
    C{factory} (the relay's, or a TLS factory wrapping it) itself, or for C{"haproxy:..."}
    the endpoint after the prefix, each connection reading its PROXY header first
    (L{ProxyHeaderFactory}, outermost: the header comes in clear, before any TLS).

    @param config: the configuration in force, read by the PROXY wrapper per connection
        (C{proxy.proxy_protocol_from}, C{timeouts.proxy_header}).
    @param stats: counts the refused PROXY headers.
    """
    if description.startswith(proxyprotocol.PREFIX):
        return description.removeprefix(proxyprotocol.PREFIX), ProxyHeaderFactory(
            factory, reactor, config, stats
        )
    return description, factory


def _listener(
    reactor: Any,
    description: str,
    factory: IProtocolFactory,
    config: Callable[[], Config],
    stats: Stats,
    key: str = "proxy.listen",
) -> Listener:
    """
    The listener of one endpoint string, serving C{factory}'s protocols as L{wrapFactory}
    wraps them.

    @param key: the configuration key, named with the file when it cannot listen.
    """
    inner, wrapped = wrapFactory(reactor, description, factory, config, stats)
    endpoint = serverFromString(reactor, inner)
    listener = Listener(endpoint, wrapped, f"{config().path}: {key}", description)
    listener.setName(f"listen {description}")  # type: ignore[no-untyped-call]
    return listener


class ProxyService(MultiService):
    """mailproxy in one process: listeners in front of one upstream MTA."""

    _log = Logger()
    #: Probe the upstream at start-up and after a reload that changes it (L{_probeUpstream});
    #: tests that count the MTA's connections turn it off.
    probeUpstream = True

    def __init__(
        self,
        config: Config,
        reactor: Any,
        factories: Mapping[str, IFilterFactory],
        *,
        uid: int | None = None,
        gid: int | None = None,
        daemonised: bool = False,
    ) -> None:
        """
        @param factories: the installed filter kinds by name, found once at start-up
            (L{filterFactories}): this configuration's filters and every reloaded one's
            are built from them, so a reload never looks for plugins again (after twistd
            dropped privileges, the installed code may not be readable).
        @param uid: twistd's C{-u} user: started as root, the spool and quarantine
            directories are handed over to it (L{privilegedStartService}).
        @param gid: twistd's C{-g} group; L{None}: the user's own.
        @param daemonised: twistd runs in the background (no C{-n}): a start-up error is
            then a L{StartupError}, which twistd reports to the process that launched it.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self._reactor = reactor
        self._factories = factories
        self._owner = (uid, gid)
        self._daemonised = daemonised
        #: Whether the directories were made (by L{privilegedStartService}, under twistd).
        self._prepared = False
        #: The SIGHUP handler before ours, while ours is installed.
        self._previousHup: Any = None
        self._hupInstalled = False
        #: The start-up probe of the upstream (again after a reload that changes it).
        self._probe: UpstreamProbe | None = None
        #: The counters: the relay and the filters report to them; the stats socket, the web
        #: and the manhole read them.
        self.stats = self._makeStats(reactor)
        self.factory = RelayFactory(self._settings(config), reactor, self.stats)
        self.logs = LogService(config.logging, **self._logPublisher())
        self.logs.setServiceParent(self)  # type: ignore[no-untyped-call] # first: before others log
        self.listeners: list[Service] = []
        self._addListeners(config, reactor)
        self.manhole: ManholeService | None = None
        self._addExtras(config, reactor)

    def _makeStats(self, reactor: Any) -> Stats:
        """The counters the relay and the filters report to."""
        return Stats(reactor)

    def _logPublisher(self) -> dict[str, Any]:
        """L{LogService}'s publisher, if not the global one (a worker's tags its events)."""
        return {}

    def _addListeners(self, config: Config, reactor: Any) -> None:
        """One listener per C{listen} and per C{listen_tls} endpoint."""
        for description in config.listen:
            listener = _listener(reactor, description, self.factory, self._config, self.stats)
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(listener)
        for description in config.listenTls:
            self.listeners.append(self._listenTls(description, self.factory))

    def _addExtras(self, config: Config, reactor: Any) -> None:
        """The quarantine's expiry, the manhole, the stats socket and the web."""
        expiry = TimerService(EXPIRY_INTERVAL, self._expireQuarantine)
        expiry.clock = reactor
        expiry.setServiceParent(self)
        if config.manhole.listen is not None:
            from mailproxy.manhole import ManholeService, namespace

            self.manhole = ManholeService(config.manhole, namespace(self), reactor, config.path)
            self.manhole.setServiceParent(self)  # type: ignore[no-untyped-call]
        self._addStatus(config, reactor)

    def implicitTLS(self, factory: IProtocolFactory) -> IProtocolFactory:
        """
        C{factory}'s protocols behind TLS from the first byte (RFC 8314, port 465), with
        the certificate of the settings current when each connection is accepted (so a
        reload renews it).
        """
        current = tls.ReloadableServerOptions(lambda: self.factory.settings.serverTls)
        return tls.implicitTLS(factory, current, self._reactor)

    def _listenTls(
        self, description: str, factory: IProtocolFactory
    ) -> Listener:
        """An implicit-TLS listener (L{implicitTLS}) on C{description}."""
        wrapped = self.implicitTLS(factory)
        # A "haproxy:" one reads the PROXY header in clear first, then TLS starts.
        listener = _listener(
            self._reactor, description, wrapped, self._config, self.stats, "proxy.listen_tls"
        )
        listener.setName(f"listen_tls {description}")  # type: ignore[no-untyped-call]
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        return listener

    def _addStatus(self, config: Config, reactor: Any) -> None:
        """The midnight reset of the counters; the stats socket and the web, if configured."""
        StatsService(self.stats).setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.stats.socket is not None:
            sock = StatsSocketService(
                config.stats.socket,
                config.stats.mode,
                self.snapshot,
                reactor,
                what=f"{config.path}: stats.socket",
                owner=directories.owner(*self._owner),
            )
            sock.setName("stats socket")  # type: ignore[no-untyped-call]
            sock.setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.web.listen is not None:
            from mailproxy.web import statusSite

            site = statusSite(
                self.stats, config.hostname, config.web.refresh, reactor, self.snapshot
            )
            web = Listener(
                serverFromString(reactor, config.web.listen),
                site,
                f"{config.path}: web.listen",
                config.web.listen,
            )
            web.setName(f"web {config.web.listen}")  # type: ignore[no-untyped-call]
            web.setServiceParent(self)  # type: ignore[no-untyped-call]

    def snapshot(self) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """The counters, for the stats socket and the web (a master's, once fresh)."""
        return self.stats.snapshot()

    def _config(self) -> Config:
        """The configuration in force (for the listeners, which read it per connection)."""
        return self.config

    def _settings(self, config: Config) -> Settings:
        """
        What new sessions run under: the configuration, its filters, its quarantine, its
        TLS options (the certificate and key read again: a reload renews them).

        @raise ConfigError: a filter is not installed, or its options are wrong; a TLS
            file is unreadable or wrong; or C{[tls]} lost its certificate while the
            C{listen_tls} listeners (which only a restart removes) need it.
        """
        serverTls = tls.serverOptions(config)
        if serverTls is None and config.listenTls:
            raise ConfigError(
                config.path,
                "tls.certificate",
                "missing: the running proxy.listen_tls listeners need it (removing them"
                " takes a restart)",
            )
        return Settings(
            config,
            buildPipeline(config, self._reactor, self.stats.filterChecked, self._factories),
            clientFromString(self._reactor, config.upstream),
            Quarantine.fromConfig(config, self._reactor),
            serverTls=serverTls,
            clientTls=tls.clientOptions(config),
            names=ClientNames.fromConfig(config, self._reactor),
            policy=Policy(
                startTls=serverTls is not None,
                requireTls=config.tls.require,
                auth=config.auth.value,
                authFailures=config.limits.authFailures,
                mtaTls=config.upstreamTls.mode.value,
                introduce=True,
            ),
        )

    def privilegedStartService(self) -> None:
        """
        What twistd runs as root, before it drops privileges: make the spool and
        quarantine directories (mode 0700) and hand them over to the C{-u} user, check
        the limit on open files, then bind every listener (the stats socket too, handed
        over to the C{-u} user), open the logs and read the manhole's host key.

        @raise SystemExit: with one line naming what failed (the file and the key, the
            endpoint, the path), when a directory cannot be made or handed over (nothing
            is bound then), an address cannot be listened on, a file cannot be opened.
        @raise StartupError: the same, when twistd runs in the background: twistd's
            launching process waits for the report that only an exception makes it write
            (its first 100 bytes; a SystemExit leaves it hanging).
        """
        with oneLine(self._daemonised):
            self._prepare(*self._owner)
            try:
                super().privilegedStartService()  # type: ignore[no-untyped-call]
            except OSError as e:  # a log file, the manhole's host key, ...
                raise StartupError(f"{self.config.path}: cannot start: {e}") from None

    def _prepare(self, uid: int | None, gid: int | None) -> None:
        try:
            directories.prepare(self.config, uid, gid)
        except ConfigError as e:
            raise StartupError(str(e)) from None
        startup.checkDescriptors(self.config.limits.connections)
        self._prepared = True

    def startService(self) -> None:
        with oneLine(self._daemonised):
            if not self._prepared:  # started without twistd (twist, tests): no hand-over
                self._prepare(None, None)
            try:
                self.logs.privilegedStartService()  # (done already under twistd)
                swept = self._sweep()
            except OSError as e:
                raise StartupError(f"{self.config.path}: cannot start: {e}") from None
            self._startService(swept)

    def _sweep(self) -> list[str]:
        """
        Remove the spool files an earlier run left, its workers' too (no worker of this
        run has started yet); their names.
        """
        return sweepAll(self.config.spoolDir)

    #: Whether SIGHUP reloads (a worker reloads when its master tells it to).
    hangUpReloads = True

    def _startService(self, swept: list[str]) -> None:
        for name in swept:
            self._log.warn("removed leftover spool file {name}", name=name)
        self._log.info(
            "mailproxy listening on {listen}, relaying to {upstream}",
            listen=", ".join(self.config.listen),
            upstream=self.config.upstream,
        )
        if self.config.listenTls:
            self._log.info(
                "mailproxy listening with implicit TLS on {listen}",
                listen=", ".join(self.config.listenTls),
            )
        if self.hangUpReloads and not self._hupInstalled:
            self._previousHup = signal.signal(signal.SIGHUP, self._hangUp)
            self._hupInstalled = True
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except OSError as e:
            raise StartupError(f"{self.config.path}: cannot start: {e}") from None
        self._probeUpstream(self.config)

    def _probeUpstream(self, config: Config) -> None:
        """
        Connect to the upstream once (within C{mta_connect}), read its banner, QUIT: a
        warning naming it when it is down or does not greet with 220. Never stops start-up.
        """
        if self._probe is not None:
            self._probe.stop()
        if not self.probeUpstream:
            return
        self._probe = UpstreamProbe(config.upstream, self.factory.settings.upstream, self._reactor)
        self._probe.start(config.timeouts.mtaConnect)

    def _hangUp(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler: do the work in the reactor's thread, between two events.
        self._reactor.callFromThread(self.reload)

    def reload(self, text: bytes | None = None) -> bool:
        """
        Read the configuration file again (on SIGHUP, or from the manhole). A valid one
        applies to the sessions that start from now on, while those in flight finish
        under theirs; an invalid one is refused with one log line, and the running one
        stays. Also reopens the JSON log, for logrotate.

        @param text: the file's content to apply instead of reading it (a worker's, as its
            master read and checked it).
        @return: whether the new configuration was applied.
        """
        old = self.config
        try:
            loaded = self._adjust(load(old.path, self._reactor, text))
            config, restart = keepRestartOnly(loaded, old)
            settings = self._settings(config)
            directories.prepare(config)  # a new quarantine directory (as the service user)
        except ConfigError as e:
            self._log.error(
                "reload refused, the running configuration stays: {error}", error=str(e)
            )
            return False
        if restart:
            self._log.warn(
                "reload: {keys} changed, which takes a restart: the old values stay",
                keys=", ".join(restart),
            )
        if config.limits.connections != old.limits.connections:
            startup.checkDescriptors(config.limits.connections)
        self.config = config
        self.factory.settings = settings
        if config.upstream != old.upstream:
            self._probeUpstream(config)
        if self.manhole is not None:
            self.manhole.namespace["config"] = config
        try:
            self.logs.reopen()
        except OSError as e:
            self._log.error("cannot reopen the JSON log: {why}", why=e)
        self._log.info("reloaded {path}: new sessions run under it", path=config.path)
        return True

    def _adjust(self, config: Config) -> Config:
        """A loaded configuration as this process runs it (a worker's own spool)."""
        return config

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, let the sessions in flight finish (up to C{shutdown_grace}
        seconds, then 421), then stop the rest. Fires once every session is closed.
        """
        if self._probe is not None:
            self._probe.stop()
        if self._hupInstalled:
            # None: the handler was not set from Python; the default is the nearest.
            previous = signal.SIG_DFL if self._previousHup is None else self._previousHup
            signal.signal(signal.SIGHUP, previous)
            self._hupInstalled = False
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        await defer.gatherResults(
            [
                defer.maybeDeferred(listener.stopService)
                for listener in self.listeners
                if listener.running
            ]
        )
        grace = self.config.timeouts.shutdownGrace
        if self.factory.sessions:
            self._log.info(
                "stopping: {count} sessions get up to {grace}s to finish",
                count=len(self.factory.sessions),
                grace=grace,
            )
        await self.factory.shutDown(grace)
        self._log.info("mailproxy stopped")
        rest = [service for service in reversed(list(self)) if service.running]
        await defer.gatherResults([defer.maybeDeferred(service.stopService) for service in rest])

    def _expireQuarantine(self) -> None:
        quarantine = self.factory.settings.quarantine
        if quarantine is None:
            return
        try:
            removed = quarantine.expire()
        except OSError as e:
            self._log.error("quarantine expiry failed: {why}", why=e)
            return
        if removed:
            self._log.info(
                "quarantine: removed {count} messages older than {days} days",
                count=len(removed),
                days=quarantine.retentionDays,
            )
