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
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

Snapshot = Callable[[], dict[str, Any]]


class SnapshotProtocol(Protocol):
    """Writes the snapshot and hangs up."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(encode(self._snapshot()))
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


class StatsSocketService(Service):
    """
    Listens on the stats socket while running; the socket file is removed on stop.

    @param mode: the socket file's permissions, set before it accepts connections.
    """

    _log = Logger()

    def __init__(self, path: str, mode: int, snapshot: Snapshot, reactor: IReactorUNIX) -> None:
        self.path = path
        self.mode = mode
        self._snapshot = snapshot
        self._reactor = reactor
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        """Listen, or raise (a live socket or a non-socket in the way stops start-up)."""
        if removeStale(self.path):
            self._log.warn("removed stale stats socket {path}", path=self.path)
        # listenUNIX sets the mode between bind() and listen(): no client can connect
        # while the file has the umask's permissions.
        self._port = self._reactor.listenUNIX(
            self.path, SnapshotFactory(self._snapshot), mode=self.mode
        )
        self._log.info("stats socket on {path}", path=self.path)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None
