"""
The manhole: a Python console inside the running proxy, over SSH, keys only.

Off unless C{[manhole] listen} is set (loopback is the sensible place:
C{"tcp:2222:interface=127.0.0.1"}). Any user name is accepted; the key must be in the
C{authorized_keys} file, read again at every login. The host key is generated (RSA,
2048 bits, mode 0600) if its file is missing.

The console's namespace is explicit (see L{namespace}): C{stats}, C{sessions()},
C{workers()}, C{config}, C{reload()} and C{proxy}, the service itself. With worker
processes the manhole runs in the master: C{stats} are the workers' sums. An interactive session
(C{ssh -p 2222 127.0.0.1}) gets Twisted's coloured manhole; a command
(C{ssh -p 2222 127.0.0.1 'len(sessions())'}) is evaluated once and its result printed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any, Protocol, cast

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application.service import MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys, userauth
from twisted.cred import portal
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    PredicateResult,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.config import Config, Manhole
from mailproxy.startup import Listener, StartupError, reason
from mailproxy.stats import Stats

#: Bits of a generated host key (4096 takes seconds to make; 2048 is fine for loopback).
HOST_KEY_BITS = 2048


class _Proxy(Protocol):
    """What the namespace needs of the proxy's service."""

    config: Config
    stats: Stats

    def reload(self) -> bool: ...


def namespace(proxy: _Proxy) -> dict[str, object]:
    """
    The manhole's namespace: the live objects an operator looks at.

      - C{stats}: the counters (L{mailproxy.stats.Stats}: C{stats.total},
        C{stats.today}, C{stats.snapshot()}, ...);
      - C{sessions()}: one dict per active session, oldest first: id, client, helo,
        sender, recipients (how many), stage, age (seconds), and the worker's index
        when worker processes serve the clients;
      - C{workers()}: the worker processes, one dict each (index, pid, started,
        restarts, active sessions, messages accepted); empty in one process;
      - C{config}: the running configuration (kept current by reloads);
      - C{reload()}: read the configuration file again, as SIGHUP does; true if applied;
      - C{proxy}: the service itself.
    """

    def sessions() -> list[dict[str, object]]:
        return [
            {
                "id": info.id,
                "client": info.client,
                "helo": info.helo,
                "sender": info.sender,
                "recipients": info.recipients,
                "stage": info.phase,
                "age": round(age, 1),
                **({} if info.worker is None else {"worker": info.worker}),
            }
            for info, age in proxy.stats.sessions()
        ]

    def workers() -> list[dict[str, Any]]:
        return proxy.stats.workerRows()

    return {
        "stats": proxy.stats,
        "sessions": sessions,
        "workers": workers,
        "config": proxy.config,
        "reload": proxy.reload,
        "proxy": proxy,
    }


def hostKey(path: str) -> keys.Key:
    """The SSH host key in C{path}, generated there (mode 0600) if the file is missing."""
    if os.path.exists(path):
        key: keys.Key = keys.Key.fromFile(path)
        return key
    key = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=HOST_KEY_BITS))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(key.toString("OPENSSH"))
    return key


@implementer(ILogFilterPredicate)
class _ConchEvents:
    """
    Whether one of conch's events is worth the proxy's log: failures (tracebacks) and
    warnings are; the routine (debug and info: key exchange, authentication, channels) is
    not, nor is the client's own goodbye (C{Got remote error, code 11 ... disconnected by
    user}, logged as an error at the end of every C{ssh host command}).
    """

    def __call__(self, event: LogEvent) -> object:  # a PredicateResult
        if event.get("log_failure") is not None:
            return PredicateResult.yes
        level = event.get("log_level")
        if level is None or level < LogLevel.warn:
            return PredicateResult.no
        goodbye = str(event.get("log_format", "")).startswith("Got remote error")
        if goodbye and event.get("code") == 11:
            return PredicateResult.no
        return PredicateResult.maybe


def quietConch(publisher: ILogObserver = globalLogPublisher) -> None:
    """
    Send the events of conch's loggers (its modules' and its classes', which the manhole's
    SSH server uses) through L{_ConchEvents} to C{publisher}. Idempotent: for the loggers
    already quieted, nothing changes.
    """
    quiet = FilteringLogObserver(publisher, [_ConchEvents()])
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "twisted.conch" or name.startswith("twisted.conch.")):
            continue
        for value in list(vars(module).values()):
            loggers: list[object] = [value]
            if isinstance(value, type) and value.__module__ == name:
                loggers = list(vars(value).values())
            for logger in loggers:
                if isinstance(logger, Logger) and not isinstance(
                    logger.observer, FilteringLogObserver
                ):
                    logger.observer = quiet


_loginLog = Logger(namespace="mailproxy.manhole")


class _UserAuthServer(userauth.SSHUserAuthServer):
    """Conch's authentication server, which logs each login in one line of ours."""

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> Deferred[Any]:
        d: Deferred[Any] = super().tryAuth(kind, user, data)

        def loggedIn(result: Any) -> Any:
            peer = self.transport.transport.getPeer()  # type: ignore[union-attr]
            _loginLog.info(
                "manhole: login as {user} ({kind}) from {peer}",
                user=user.decode("utf-8", "replace"),
                kind=kind.decode("ascii", "replace"),
                peer=getattr(peer, "host", peer),
            )
            return result

        return d.addCallback(loggedIn)


@implementer(IAuthorizedKeysDB)
class _AuthorizedKeysFile:
    """The keys of one authorized_keys file, for any user name; read at each login."""

    _log = Logger()

    def __init__(self, path: str) -> None:
        self._path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        try:
            with open(self._path, "rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            self._log.error("manhole: cannot read {path}: {why}", path=self._path, why=e)
            return []


class _Evaluator:
    """Runs one command in the namespace: its printed output (and the repr of an
    expression's value), and an exit status of 1 with the traceback if it raised."""

    def __init__(self, names: dict[str, object]) -> None:
        self._names = names

    def __call__(self, source: str) -> tuple[str, int]:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                try:
                    code = compile(source, "<manhole>", "eval")
                except SyntaxError:
                    exec(compile(source, "<manhole>", "exec"), self._names)  # noqa: S102 -- the console's purpose
                else:
                    result = eval(code, self._names)  # noqa: S307 -- the console's purpose
                    if result is not None:
                        print(repr(result))
        except Exception:
            return out.getvalue() + traceback.format_exc(), 1
        return out.getvalue(), 0


class _Session(manhole_ssh.TerminalSession):
    """A manhole session that also runs one command (C{ssh host 'expression'})."""

    evaluate: _Evaluator
    clock: IReactorTime

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        output, status = self.evaluate(cmd.decode("utf-8", "replace"))

        def answer() -> None:  # after the channel's reply to the request
            proto.outReceived(output.encode("utf-8", "replace"))
            ended = ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status)
            proto.processEnded(Failure(ended))

        self.clock.callLater(0, answer)

    def eofReceived(self) -> None:
        pass

    def windowChanged(self, newWindowSize: object) -> None:
        pass


class ManholeService(MultiService):
    """
    The SSH manhole on C{settings.listen}. The host key is read (or generated) before
    listening, so with twistd's -u it happens while still root.

    Conch's own log events (about twenty a login: key exchange, authentication, channels,
    the client's disconnection), are kept out of the log unless they are failures: each
    login is one line of ours, C{manhole: login as ... from ...}.

    @param what: what the start-up errors name: the configuration file.
    """

    _log = Logger()

    def __init__(
        self,
        settings: Manhole,
        names: dict[str, object],
        reactor: IReactorTime,
        what: str = "",
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        assert settings.listen is not None
        self.settings = settings
        self.namespace = names
        realm = manhole_ssh.TerminalRealm()
        realm.chainedProtocolFactory = functools.partial(  # type: ignore[assignment]
            insults.ServerProtocol, manhole.ColoredManhole, names
        )
        realm.sessionFactory = cast(
            type[_Session],
            type("Session", (_Session,), {"evaluate": _Evaluator(names), "clock": reactor}),
        )
        checker = SSHPublicKeyChecker(_AuthorizedKeysFile(settings.authorizedKeys))
        self.factory = manhole_ssh.ConchFactory(portal.Portal(cast(IRealm, realm), [checker]))
        self.factory.noisy = False
        self.factory.services = {**self.factory.services, b"ssh-userauth": _UserAuthServer}
        quietConch()
        # Instance attributes: ConchFactory's class-level dicts are shared by all.
        self.factory.publicKeys = {}
        self.factory.privateKeys = {}
        self._what = f"{what}: " if what else ""
        listener = Listener(
            serverFromString(reactor, settings.listen),
            self.factory,
            f"{self._what}manhole.listen",
            settings.listen,
        )
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _loadKey(self) -> None:
        if self.factory.privateKeys:
            return
        try:
            key = hostKey(self.settings.hostKey)
        except (OSError, ValueError, keys.BadKeyError) as e:
            raise StartupError(
                f"{self._what}manhole.host_key: cannot read or make {self.settings.hostKey!r}:"
                f" {reason(e)}"
            ) from None
        self.factory.publicKeys = {key.sshType(): key.public()}
        self.factory.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]

    def privilegedStartService(self) -> None:
        self._loadKey()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self._loadKey()
        self._log.info("manhole (SSH) on {listen}", listen=self.settings.listen)
        super().startService()  # type: ignore[no-untyped-call]
