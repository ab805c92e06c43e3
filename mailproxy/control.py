"""
The stats socket: a UNIX socket that answers every connection with one JSON snapshot of
the counters (L{mailproxy.stats.Stats.snapshot}), one line, and closes, so that

    socat - UNIX-CONNECT:mailproxy.sock | python3 -m json.tool

prints it. Whatever a client sends is ignored.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.startup import StartupError, reason

#: The counters now; or, from a master, once its workers have reported what they counted.
Snapshot = Callable[[], "dict[str, Any] | Deferred[dict[str, Any]]"]


class SnapshotProtocol(Protocol):
    """Writes the snapshot and hangs up."""

    _log = Logger()

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def connectionMade(self) -> None:
        try:
            answer = self._snapshot()
        except Exception:
            self._failed(Failure())
            return
        d: Deferred[dict[str, Any]] = (
            answer if isinstance(answer, Deferred) else defer.succeed(answer)
        )
        d.addCallback(self._write)
        d.addErrback(self._failed)

    def _write(self, snapshot: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode(snapshot))
            self.transport.loseConnection()

    def _failed(self, failure: Failure) -> None:
        self._log.failure("the stats snapshot failed", failure)
        if self.transport is not None:
            self.transport.loseConnection()


class SnapshotFactory(Factory):
    noisy = False

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def buildProtocol(self, addr: object) -> SnapshotProtocol:
        return SnapshotProtocol(self._snapshot)


def encode(snapshot: dict[str, Any]) -> bytes:
    """A snapshot as one line of JSON (non-ASCII kept as UTF-8)."""
    return json.dumps(snapshot, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class StaleSocketError(Exception):
    """The socket path is taken: by a live listener, or by something that is not a socket."""


def removeStale(path: str) -> bool:
    """
    Remove a socket file left by a process that is gone (nothing accepts on it). Called at
    start-up: the probe is a blocking connect, but to a local socket it is answered at once.

    @return: whether a stale socket was removed.
    @raise StaleSocketError: another process listens there, or the path is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise StaleSocketError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a local connect: refused, accepted or queued, at once
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StaleSocketError(f"cannot check {path}: {e.strerror}") from None
    else:
        raise StaleSocketError(f"another process is listening on {path}")
    finally:
        probe.close()
    os.unlink(path)
    return True


class _Port(unix.Port):
    """
    A listening UNIX socket that may outlive its right to remove its file: bound as root
    in a directory the C{-u} user cannot write in, the file stays at stop (and is removed as
    stale at the next start), with a warning rather than an error.
    """

    _log = Logger()

    def __init__(self, path: str, factory: Factory, mode: int, reactor: IReactorUNIX) -> None:
        super().__init__(os.fsencode(path), factory, mode=mode, reactor=reactor)
        self.path = path

    def connectionLost(self, reason: Failure) -> None:
        path = self.path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warn(
                "stats socket {path} left in place (removed at the next start): {why}",
                path=path,
                why=e.strerror,
            )
        # unix.Port's own would try to remove the file again.
        tcp.Port.connectionLost(self, reason)


class StatsSocketService(Service):
    """
    Listens on the stats socket while running; the socket file is removed on stop.

    The socket is bound in L{privilegedStartService}, which twistd runs as root before it
    drops privileges: with its C{-u}, the file is then handed over to that user (and
    group), so that the proxy's user owns it and the mode decides who else may read.

    @param mode: the socket file's permissions, set before it accepts connections.
    @param what: what the start-up errors name: the configuration file and key.
    @param owner: twistd's C{-u} user and group, to hand the socket file to when running
        as root; L{None}: it stays the creating user's.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        mode: int,
        snapshot: Snapshot,
        reactor: IReactorUNIX,
        what: str = "stats.socket",
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.mode = mode
        self.what = what
        self.owner = owner
        self._snapshot = snapshot
        self._reactor = reactor
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """
        Listen (a stale socket file is replaced), and hand the file over to the owner.

        @raise StartupError: a live socket or a non-socket is in the way, or the socket
            cannot be bound or handed over; one line naming the key and the path.
        """
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        if self._port is not None:
            return
        try:
            if removeStale(self.path):
                self._log.warn("removed stale stats socket {path}", path=self.path)
        except StaleSocketError as e:
            raise StartupError(f"{self.what}: {e}") from None
        except OSError as e:
            raise StartupError(
                f"{self.what}: cannot remove the stale socket {self.path!r}: {reason(e)}"
            ) from None
        # The mode is set between bind() and listen(): no client can connect while the file
        # has the umask's permissions.
        port = _Port(self.path, SnapshotFactory(self._snapshot), self.mode, self._reactor)
        try:
            port.startListening()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            raise StartupError(
                f"{self.what}: cannot listen on {self.path!r}: {reason(e)}"
            ) from None
        self._port = port
        if self.owner is not None and os.getuid() == 0:
            try:
                os.chown(self.path, *self.owner)
            except OSError as e:
                raise StartupError(
                    f"{self.what}: cannot hand {self.path!r} over: {reason(e)}"
                ) from None

    def startService(self) -> None:
        """Listen, if L{privilegedStartService} has not (started without twistd)."""
        self.privilegedStartService()
        self._log.info("stats socket on {path}", path=self.path)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None
