"""
Start-up failures as one line, like configuration errors, and the start-up checks of the
process's limits.

What fails while the service starts (a port in use, a live stats socket, a directory or a
file that cannot be written at that moment) is a L{StartupError} naming what failed; the
service turns it into C{SystemExit("mailproxy: ...")} under C{twistd -n} (no traceback),
and lets it reach twistd when daemonised (twistd passes the first 100 bytes of its text to
the process that launched it, which prints them; a L{SystemExit} would leave that process
waiting). L{Listener} is the endpoint listener whose bind failure is such a line.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Callable, Iterator

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

__all__ = [
    "MARGIN_DESCRIPTORS",
    "SESSION_DESCRIPTORS",
    "Listener",
    "StartupError",
    "checkDescriptors",
    "descriptorsNeeded",
    "installReactor",
    "oneLine",
    "reason",
]

#: File descriptors one session may hold at once: the client's socket, the MTA's, the
#: spool file, and a filter's connection (spamd, clamd, p0f, DNS) or its reader of the spool.
SESSION_DESCRIPTORS = 4
#: Descriptors besides the sessions': listeners, logs, the stats socket, the web and the
#: manhole and their clients, the resolver's sockets, the reactor's own, the thread pool's.
MARGIN_DESCRIPTORS = 64

_log = Logger(namespace="mailproxy.startup")


class StartupError(Exception):
    """
    Start-up stopped: a directory cannot be made or handed over, an address cannot be
    listened on, a file cannot be opened. C{str()} is one line naming what failed.
    """


def reason(error: BaseException) -> str:
    """
    Why an operation failed, in words (C{"Address already in use"}), without the errno
    number or the exception's class; for L{CannotListenError}, its socket error's.
    """
    if isinstance(error, CannotListenError) and error.socketError is not None:
        return reason(error.socketError)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


@contextlib.contextmanager
def oneLine(daemonised: bool) -> Iterator[None]:
    """
    Around a start-up step: a L{StartupError} becomes C{SystemExit} with the line
    C{"mailproxy: ..."} in the foreground; daemonised, it goes on to twistd as it is.
    """
    try:
        yield
    except StartupError as e:
        if daemonised:
            raise
        raise SystemExit(f"mailproxy: {e}") from None


class Listener(StreamServerEndpointService):
    """
    An endpoint listener that binds synchronously (in C{privilegedStartService}, as root
    under twistd's C{-u}) and whose failure to bind is a L{StartupError} naming it.

    @param what: who asked for it, the start of the line: the configuration file and key
        (C{"/etc/mailproxy/mailproxy.toml: proxy.listen"}) or the option.
    @param description: the endpoint string, named in the line.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        what: str,
        description: str,
    ) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        self._raiseSynchronously = True
        self.what = what
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            raise StartupError(
                f"{self.what}: cannot listen on {self.description!r}: {reason(e)}"
            ) from None


def descriptorsNeeded(connections: int) -> int:
    """The file descriptors C{connections} concurrent sessions may need (an estimate)."""
    return connections * SESSION_DESCRIPTORS + MARGIN_DESCRIPTORS


def checkDescriptors(
    connections: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> None:
    """
    Make the soft limit on open files (C{RLIMIT_NOFILE}) enough for C{connections}
    sessions: raise it up to what they need when the hard limit allows (as systemd advises
    programs to do: the 1024 default soft limit is for select(), which the reactor does not
    use), and warn, naming both numbers and the fix, when it does not. Past the limit,
    accepting a client or opening a spool file fails (EMFILE).

    @param connections: C{limits.connections}.
    """
    needed = descriptorsNeeded(connections)
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        except (OSError, ValueError) as e:
            why = reason(e)
        else:
            _log.info(
                "file descriptors: raised the soft limit (RLIMIT_NOFILE) from {soft} to {needed}"
                " for limits.connections = {connections}",
                soft=soft,
                needed=needed,
                connections=connections,
            )
            return
    else:
        why = f"the hard limit is {hard}"
    _log.warn(
        "file descriptors: the limit (RLIMIT_NOFILE) is {soft}, below the {needed} that"
        " limits.connections = {connections} may need ({per} a session, plus {margin}), and"
        " cannot be raised ({why}): past it clients and spool files are refused. Raise it"
        " (LimitNOFILE={needed} in the systemd unit, ulimit -n {needed}) or lower"
        " limits.connections",
        soft=soft,
        needed=needed,
        connections=connections,
        per=SESSION_DESCRIPTORS,
        margin=MARGIN_DESCRIPTORS,
        why=why,
    )


def installReactor() -> None:
    """
    Run on epoll on Linux, chosen here rather than left to Twisted's default; a reactor
    already installed (twistd's C{-r}, trial's) is kept.
    """
    if "twisted.internet.reactor" in sys.modules or not sys.platform.startswith("linux"):
        return
    from twisted.internet import epollreactor

    epollreactor.install()
