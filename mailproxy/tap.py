"""twistd's entry: C{twistd -n mailproxy --config conf/mailproxy.toml}."""

from __future__ import annotations

import os
import pwd
import stat
from typing import ClassVar

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mailproxy.config import DEFAULT_CONFIG, Config, ConfigError, load
from mailproxy.filters.pipeline import buildPipeline
from mailproxy.service import ProxyService


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
        from twisted.internet import reactor

        path = self["config"]
        if path is None:
            if not os.path.exists(DEFAULT_CONFIG):
                raise usage.UsageError(f"--config is required ({DEFAULT_CONFIG} does not exist)")
            path = DEFAULT_CONFIG
        try:
            config = load(path, reactor)
            buildPipeline(config, reactor)
            twistd = self.parent  # twistd's own options (-u, -g), when twistd runs us
            if twistd is not None:
                _handOver(config, twistd.get("uid"), twistd.get("gid"))
        except ConfigError as e:
            # One line naming the file and the key, not a usage screen.
            raise SystemExit(f"mailproxy: {e}") from None
        self["parsed"] = config


_log = Logger()


def _handOver(config: Config, uid: int | None, gid: int | None) -> None:
    """
    With twistd's C{-u}, started as root: the directories mailproxy writes in after
    dropping privileges must be that user's. One that root owns and that holds nothing
    else (just created, as a missing one is) is handed over to the user; any other must
    already be the user's.

    @raise ConfigError: a directory the user could not write in.
    """
    if uid is None or os.getuid() != 0 or uid == 0:
        return
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    directories = {config.spoolDir: "proxy.spool_dir"}
    if config.quarantine.dir is not None:
        directories[config.quarantine.dir] = "quarantine.dir"
    # The deepest first: a quarantine inside the spool is handed over before the spool.
    for path in sorted(directories, key=len, reverse=True):
        info = os.stat(path)
        contents = {os.path.join(path, name) for name in os.listdir(path)}
        if info.st_uid == 0 and contents <= directories.keys():
            os.chown(path, uid, gid)
            info = os.stat(path)
        if info.st_uid != uid or info.st_mode & 0o700 != 0o700:
            raise ConfigError(
                config.path,
                directories[path],
                f"{path!r} must belong to uid {uid} (twistd -u) with mode 0700; it belongs to "
                f"uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}",
            )


def _clientAddress(listen: str) -> str:
    """Where a local client reaches a C{tcp:PORT[:interface=ADDR]} listener, as host:port."""
    parts = dict(p.split("=", 1) for p in listen.split(":")[2:] if "=" in p)
    port = listen.split(":")[1] if listen.startswith("tcp:") else "25"
    return f"{parts.get('interface', '127.0.0.1')}:{port}"


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config: Config = options["parsed"]
    proxy = ProxyService(config, reactor)
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
    root = MultiService()
    mta = LocalMTA(maildir=os.path.abspath(options["maildir"]), clock=reactor, record=False)
    listener = StreamServerEndpointService(
        serverFromString(reactor, options["local-mta"]), mta.buildFactory()
    )
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    proxy.setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


__all__ = ["Options", "makeService"]
