"""twistd's entry: C{twistd -n mailproxy --config conf/mailproxy.toml}."""

from __future__ import annotations

import os
from typing import ClassVar

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mailproxy import directories, logs
from mailproxy.config import DEFAULT_CONFIG, Config, ConfigError, load
from mailproxy.filters.pipeline import filterFactories
from mailproxy.service import ProxyService
from mailproxy.startup import Listener, installReactor, oneLine


class Options(usage.Options):
    synopsis = "[--config PATH] [--local-mta ENDPOINT --maildir DIR]"
    longdesc = (
        "Relay SMTP to the MTA named in the configuration, holding each message at DATA "
        "until the filters have decided. With --local-mta, also run a small stand-in MTA "
        "that stores accepted mail in a Maildir, for trying mailproxy out."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, f"The configuration file (default: {DEFAULT_CONFIG}, if it exists)."],
        [
            "local-mta",
            None,
            None,
            "Also run the stand-in MTA on this server endpoint "
            "(e.g. tcp:10025:interface=127.0.0.1), which should be the configured upstream.",
        ],
        ["maildir", None, "Maildir", "Where the stand-in MTA stores accepted mail."],
    ]

    def postOptions(self) -> None:
        installReactor()
        _cheapLog(self)
        from twisted.internet import reactor

        path = self["config"]
        if path is None:
            if not os.path.exists(DEFAULT_CONFIG):
                raise usage.UsageError(f"--config is required ({DEFAULT_CONFIG} does not exist)")
            path = DEFAULT_CONFIG
        try:
            config = load(path, reactor)
            # The directories are made when the service starts; whether they can be, and
            # handed over to twistd's -u user, is known now, before twistd daemonises.
            directories.check(config, *_twistdUser(self))
        except ConfigError as e:
            # One line naming the file and the key, not a usage screen.
            raise SystemExit(f"mailproxy: {e}") from None
        self["parsed"] = config
        # Found once, now: as root, and before twistd drops privileges (after which the
        # installed code may not be readable); reloads build from the same registry.
        self["factories"] = filterFactories()


_log = Logger()


def _cheapLog(options: usage.Options) -> None:
    """
    Give twistd L{logs.textFileObserver} as its C{--logger}: the lines twistd would
    write, to the same file or stdout, made for a fraction of the CPU (every session
    logs each step). Not when twistd is told C{--logger} or C{--syslog}, nor for a
    daemon told to log to stdout (twistd refuses that itself).
    """
    twistd = options.parent
    if twistd is None or twistd.get("logger") or twistd.get("syslog"):
        return
    logfile, nodaemon = twistd.get("logfile"), bool(twistd.get("nodaemon"))
    if logfile == "-" and not nodaemon:
        return
    twistd["logger"] = logs.forTwistd(logfile, nodaemon)


class _WithLocalMTA(MultiService):
    """The stand-in MTA and the proxy; a start-up failure of either is one line."""

    def __init__(self, daemonised: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._daemonised = daemonised

    def privilegedStartService(self) -> None:
        with oneLine(self._daemonised):
            super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        with oneLine(self._daemonised):
            super().startService()  # type: ignore[no-untyped-call]


def _clientAddress(listen: str) -> str:
    """Where a local client reaches a C{tcp:PORT[:interface=ADDR]} listener, as host:port."""
    parts = dict(p.split("=", 1) for p in listen.split(":")[2:] if "=" in p)
    port = listen.split(":")[1] if listen.startswith("tcp:") else "25"
    return f"{parts.get('interface', '127.0.0.1')}:{port}"


def _twistdUser(options: usage.Options) -> tuple[int | None, int | None]:
    """twistd's C{-u} and C{-g} (its own options are our parent), when twistd runs us."""
    twistd = options.parent
    if twistd is None:
        return None, None
    return twistd.get("uid"), twistd.get("gid")


def _logTarget(options: usage.Options) -> str:
    """
    Where twistd writes its log, for the workers to write theirs: C{"-"} or a path; or
    C{"master"} when it goes to syslog or to another C{--logger}, which only the master's
    twistd has: the workers' lines then come through the master.
    """
    twistd = options.parent
    if twistd is None:
        return "-"
    ours = (None, logs.TWISTD_OBSERVER, logs.twistdObserver)  # L{_cheapLog}'s, named or found
    if twistd.get("syslog") or twistd.get("logger") not in ours:
        return "master"
    logfile = twistd.get("logfile")
    if logfile is None or logfile == "-":
        return "-" if twistd.get("nodaemon") else "twistd.log"
    return os.path.abspath(str(logfile))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config: Config = options["parsed"]
    uid, gid = _twistdUser(options)
    twistd = options.parent
    daemonised = twistd is not None and not twistd.get("nodaemon")
    try:
        # The one build of the start-up filters, their answers counted by the service's
        # counters. Still before twistd daemonises, logs or drops privileges: an error
        # is the same single line as one of postOptions.
        proxy: ProxyService
        if config.workers > 1:
            from mailproxy.workers import MasterService

            proxy = MasterService(
                config,
                reactor,
                options["factories"],
                uid=uid,
                gid=gid,
                daemonised=daemonised,
                logTarget=_logTarget(options),
            )
        else:
            proxy = ProxyService(
                config, reactor, options["factories"], uid=uid, gid=gid, daemonised=daemonised
            )
    except ConfigError as e:
        raise SystemExit(f"mailproxy: {e}") from None
    if options["local-mta"] is None:
        return proxy
    from mailproxy.localmta import LocalMTA

    _log.info(
        "stand-in MTA on {endpoint} delivers into {maildir}/new. Send a test message with:\n"
        "  swaks --server {server} --from me@example.org --to you@example.net\n"
        "or:\n"
        "  python3 -c 'import smtplib; smtplib.SMTP(\"{host}\", {port}).sendmail("
        "\"me@example.org\", [\"you@example.net\"], \"Subject: hi\\r\\n\\r\\nhello\\r\\n\")'",
        endpoint=options["local-mta"],
        maildir=os.path.abspath(options["maildir"]),
        server=_clientAddress(config.listen[0]),
        host=_clientAddress(config.listen[0]).rpartition(":")[0],
        port=_clientAddress(config.listen[0]).rpartition(":")[2],
    )
    root = _WithLocalMTA(daemonised)
    mta = LocalMTA(maildir=os.path.abspath(options["maildir"]), clock=reactor, record=False)
    try:
        endpoint = serverFromString(reactor, options["local-mta"])
    except ValueError as e:
        raise SystemExit(f"mailproxy: --local-mta {options['local-mta']!r}: {e}") from None
    listener = Listener(endpoint, mta.buildFactory(), "--local-mta", options["local-mta"])
    listener.setServiceParent(root)  # type: ignore[no-untyped-call]
    proxy.setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


__all__ = ["Options", "makeService"]
