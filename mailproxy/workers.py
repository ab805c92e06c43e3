"""
Worker processes: C{[proxy] workers = N} above 1.

The master (L{MasterService}, what twistd runs) binds every listening socket in
C{privilegedStartService}, still as root under twistd's C{-u}, and never accepts a
connection: once privileges are dropped it starts N workers (L{main}), each inheriting
the sockets (child descriptors 4 and up) and one
end of a UNIX socketpair (descriptor 3) that carries AMP between them. A worker
(L{WorkerService}) adopts the sockets (C{adoptStreamPort}) behind the same factories as
one process has (PROXY header, implicit TLS, the relay) and serves clients.

Counters: a worker's L{Stats} keeps what it counted since its last report (a
L{mailproxy.stats.Delta}, each count with the local day it was counted in) and sends it,
with its active sessions, at most once every L{REPORT_INTERVAL} seconds (L{Report}); the
master merges the deltas into its own L{Stats}, which the stats socket, the web and the
manhole read. What a worker counted and had not reported when it died (at most
L{REPORT_INTERVAL} seconds of it) is lost; the rest stays in the sums.

Configuration: the master reads and checks the file; a worker is handed the text it
checked, never the file again: when it starts (an inherited descriptor, L{_configFile}),
restarted or not, and with each reload. A file edited since, valid or not, changes
nothing until SIGHUP; a worker started after a reload keeps, as its siblings do, the
values that take a restart (L{mailproxy.service.RESTART_ONLY}) from the master's start.

Signals: SIGHUP in the master loads and checks the configuration once; only a valid one
is passed on, to every worker (L{Reload}). SIGTERM in the master sends SIGTERM to every
worker, which stops listening and lets its sessions finish (C{shutdown_grace}); the
master waits for them (SIGKILL after L{STOP_MARGIN} seconds more) and exits. A worker
ignores SIGINT and SIGHUP (a terminal's Ctrl-C and a reload are the master's to pass
on), and stops the same way when its channel to the master closes (the master is gone).

Logs: a worker writes its own events where twistd writes the master's (stdout under
C{twistd -n}, the journal under systemd), each line tagged C{worker N}; only when twistd
writes a file (daemonised, C{--logfile}), which it does not open for appending, do they
come through the master (L{RELAY}). It writes to the configured syslog and JSON file
itself (the JSON events carry
C{"worker": N}; the master's carry no C{worker}): nothing is relayed through the master.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, ClassVar

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP6ServerEndpoint, _TCPServerEndpoint, serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogBeginner,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy import proxyprotocol
from mailproxy.config import Config, ConfigError, load
from mailproxy.filters import IFilterFactory
from mailproxy.logs import ClassicText, eventText
from mailproxy.service import ProxyService, keepRestartOnly, wrapFactory
from mailproxy.startup import StartupError, installReactor, oneLine, reason
from mailproxy.stats import Delta, SessionInfo, Stats, StatsService

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "REPORT_INTERVAL",
    "Flush",
    "MasterService",
    "Reload",
    "Report",
    "Supervisor",
    "WorkerService",
    "main",
]

#: A worker's own events, before and besides its service's (the namespace its lines always had).
_workerLog = Logger(namespace="mailproxy.workers")

#: Seconds between two reports of a worker's counters, at most (and the most a killed
#: worker's counts can lose).
REPORT_INTERVAL = 0.25
#: A worker looks this often for a change in its sessions that it was not told of (a phase,
#: a sender), and reports them if there is one.
SESSIONS_INTERVAL = 1.0
#: A worker that died is started again after this many seconds, doubled each time it dies
#: again soon (before L{STABLE_AFTER}), up to L{BACKOFF_MAX}.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A worker that ran this long before it died is started again after L{BACKOFF_FIRST}.
STABLE_AFTER = 30.0
#: Seconds past C{shutdown_grace} the master waits for its workers to stop, then kills them.
STOP_MARGIN = 10.0
#: One inherited socket per listener, which every worker accepts on (C{False}), or one
#: C{SO_REUSEPORT} socket per listener and worker, bound by the master (C{True}).
#: Measured (smtp-source -m 2000 -s 20 -l 1024, two workers, three runs each): the
#: kernel's hash splits sessions more evenly (50-52% to the busier worker, against 51-66%
#: with the shared socket, whose accept goes to whichever worker wakes first), for the
#: same throughput within the noise; but with one worker down (dead, or waiting out its
#: back-off), 44 of 100 new clients got no banner within 0.5 s with SO_REUSEPORT (queued
#: on the dead worker's socket, which the master keeps open for its restart), none with
#: the shared socket. Mail waiting for a crash loop's 30 s back-off costs more than an
#: uneven split: the shared socket.
REUSE_PORT = False
#: The log destination that sends a worker's events to its master, one JSON line each.
RELAY = "master"
#: What a worker's Python runs (C{-c}); the worker's specification is its first argument.
WORKER_ENTRY = "import sys; from mailproxy.workers import main; sys.exit(main())"
#: The worker's descriptor for its end of the AMP channel; the listeners' follow it.
CHANNEL_FD = 3

_AMP_CHUNK = 60000


class JSONValue(amp.Argument):
    """
    An AMP argument holding any JSON value, however long: AMP's values are at most 64 KiB,
    so the text is split over keys C{NAME.0}, C{NAME.1}, ..., and C{NAME} holds how many.
    """

    def fromBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        count = strings.pop(name, None)
        key = amp._wireNameToPythonIdentifier(name)
        if count is None:
            if not self.optional:
                raise amp.RemoteAmpError(b"BAD_ARGUMENT", f"{name!r} is missing")
            objects[key] = None
            return
        parts = [strings.pop(name + b"." + str(i).encode(), b"") for i in range(int(count))]
        objects[key] = json.loads(b"".join(parts))

    def toBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        value = objects.get(amp._wireNameToPythonIdentifier(name))
        if value is None and self.optional:
            return
        text = json.dumps(value, separators=(",", ":")).encode()
        chunks = [text[i : i + _AMP_CHUNK] for i in range(0, len(text), _AMP_CHUNK)] or [b""]
        strings[name] = str(len(chunks)).encode()
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode()] = chunk


class Report(amp.Command):
    """Worker to master: what it counted since its last report, and its active sessions."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"delta", JSONValue()),  # type: ignore[no-untyped-call]
        (b"sessions", JSONValue(optional=True)),  # type: ignore[no-untyped-call]
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class Reload(amp.Command):
    """Master to worker: apply this configuration, the file's text as the master checked it."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"config", JSONValue()),  # type: ignore[no-untyped-call]
    ]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"applied", amp.Boolean())]


class Flush(amp.Command):
    """Master to worker: report now (the answer comes after the report)."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


#: Seconds a read of the counters waits for the workers' reports (L{MasterService.snapshot}).
FLUSH_TIMEOUT = 1.0


def sessionsToWire(sessions: Sequence[tuple[SessionInfo, float]]) -> list[dict[str, Any]]:
    """Active sessions, each with when it started, as L{Report} carries them."""
    return [{**info.toJSON(), "started": started} for info, started in sessions]


def sessionsFromWire(data: Sequence[Mapping[str, Any]]) -> list[tuple[SessionInfo, float]]:
    """@raise KeyError, TypeError, ValueError: not what L{sessionsToWire} makes."""
    return [
        (
            SessionInfo(
                id=str(s["id"]),
                client=str(s["client"]),
                helo=None if s["helo"] is None else str(s["helo"]),
                sender=None if s["sender"] is None else str(s["sender"]),
                recipients=int(s["recipients"]),
                phase=str(s["phase"]),
            ),
            float(s["started"]),
        )
        for s in data
    ]


# -- the master's side ------------------------------------------------------------------------


class MasterChannel(amp.AMP):
    """The master's end of one worker's channel: merges its reports into the counters."""

    _log = Logger()

    def __init__(self, index: int, stats: Stats) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.index = index
        self._stats = stats
        self.closed: Deferred[None] = Deferred()

    @Report.responder
    def report(self, delta: dict[str, Any], sessions: list[Any] | None) -> dict[str, Any]:
        try:
            merged = Delta.fromWire(delta)
            active = None if sessions is None else sessionsFromWire(sessions)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self._log.error(
                "worker {index}: a report the master cannot read: {why}",
                index=self.index,
                why=e,
            )
            return {}
        self._stats.merge(self.index, merged)
        if active is not None:
            self._stats.workerSessions(self.index, active)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self.closed.callback(None)


class WorkerProcess(ProcessProtocol):
    """
    One worker process, as the master sees it; tells the supervisor when it ends. When
    the worker's log comes through the master (L{RELAY}), its events arrive on its stdout,
    one JSON line each, and are logged here.
    """

    _log = Logger(namespace="mailproxy.workers.output")

    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended
        self._buffer = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
                level = LogLevel.levelWithName(event["level"])
                system, text = str(event["system"]), str(event["text"])
            except (ValueError, KeyError, TypeError, InvalidLogLevelError):
                level, system, text = LogLevel.info, "worker", line.decode(errors="replace")
            self._log.emit(level, "{text}", text=text, log_system=system)

    def processEnded(self, reason: Failure) -> None:
        self._ended(reason)


#: Starts worker number C{index} (1-based) with this protocol; its process and its channel.
Spawn = Callable[[int, WorkerProcess], tuple[IProcessTransport, MasterChannel | None]]


@attrs.define
class _Slot:
    """One worker's place in the supervisor: its process now, and its back-off."""

    index: int
    process: IProcessTransport | None = None
    pid: int | None = None
    channel: MasterChannel | None = None
    started: float = 0.0
    delay: float = BACKOFF_FIRST
    restart: IDelayedCall | None = None
    #: The Flush asked of this worker and not answered yet: every read waits for that one,
    #: so a stuck worker holds one request, however many reads time out on it.
    flushing: Deferred[Any] | None = None


class Supervisor:
    """
    Runs C{count} workers: starts them, starts one again when it dies (after
    L{BACKOFF_FIRST} seconds, doubled up to L{BACKOFF_MAX} while it keeps dying within
    L{STABLE_AFTER} seconds of its start), passes reloads on, and stops them.

    @param spawn: starts one worker process (the master's L{MasterService._spawn}; a
        fake in tests).
    """

    _log = Logger()

    def __init__(self, count: int, spawn: Spawn, clock: IReactorTime, stats: Stats) -> None:
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._spawn = spawn
        self._clock = clock
        self._stats = stats
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None

    def start(self) -> None:
        """Start every worker."""
        for slot in self._slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        protocol = WorkerProcess(lambda why: self._ended(slot, why))
        try:
            slot.process, slot.channel = self._spawn(slot.index, protocol)
        except OSError as e:
            self._log.error(
                "worker {index} could not be started: {why}", index=slot.index, why=reason(e)
            )
            self._again(slot)
            return
        slot.started = self._clock.seconds()
        pid = slot.pid = slot.process.pid
        self._stats.workerStarted(slot.index, pid if pid is not None else 0)
        self._log.info("worker {index} started, pid {pid}", index=slot.index, pid=pid)

    def _ended(self, slot: _Slot, why: Failure) -> None:
        pid, slot.pid, slot.process = slot.pid, None, None
        if slot.channel is not None and slot.channel.transport is not None:
            slot.channel.transport.loseConnection()
        slot.channel = None
        self._stats.workerEnded(slot.index)
        if self._stopping:
            self._log.info("worker {index} (pid {pid}) stopped", index=slot.index, pid=pid)
            self._maybeStopped()
            return
        ran = self._clock.seconds() - slot.started
        if ran >= STABLE_AFTER:
            slot.delay = BACKOFF_FIRST
        self._log.error(
            "worker {index} (pid {pid}) died after {ran:.1f} s: {why}; starting it again"
            " in {delay:g} s",
            index=slot.index,
            pid=pid,
            ran=ran,
            why=_exitReason(why),
            delay=slot.delay,
        )
        self._again(slot)

    def _again(self, slot: _Slot) -> None:
        """Start the slot's worker again after its back-off, which then doubles."""
        if self._stopping:
            return
        slot.restart = self._clock.callLater(slot.delay, self._start, slot)
        slot.delay = min(slot.delay * 2, BACKOFF_MAX)

    def delays(self) -> list[float | None]:
        """Each worker's pending restart delay from now (L{None}: running or stopped)."""
        now = self._clock.seconds()
        return [
            None if s.restart is None or not s.restart.active() else s.restart.getTime() - now
            for s in self._slots
        ]

    @property
    def running(self) -> list[int]:
        """The indices of the workers running now."""
        return [s.index for s in self._slots if s.process is not None]

    def pids(self) -> list[int | None]:
        return [s.pid for s in self._slots]

    async def flush(self, timeout: float) -> None:
        """Have every running worker report now; wait for them at most C{timeout} seconds."""
        waits = [
            self._flushing(slot).addTimeout(timeout, self._clock)
            for slot in self._slots
            if slot.channel is not None
        ]
        await defer.DeferredList(waits, consumeErrors=True)

    def _flushing(self, slot: _Slot) -> Deferred[None]:
        """A Deferred of this worker's answer to the Flush in flight (asked now if none)."""
        assert slot.channel is not None
        if slot.flushing is None:
            asked: Deferred[Any] = slot.channel.callRemote(Flush)  # type: ignore[no-untyped-call]

            def answered(result: object) -> None:
                slot.flushing = None

            slot.flushing = asked.addBoth(answered)
        waiter: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        slot.flushing.addBoth(done)
        return waiter

    async def reload(self, text: bytes) -> list[bool]:
        """Tell every running worker to apply C{text} (a checked file); whether each applied it."""
        calls = [
            slot.channel.callRemote(Reload, config=text.decode("utf-8")).addCallback(  # type: ignore[no-untyped-call]
                lambda answer: bool(answer["applied"])
            )
            for slot in self._slots
            if slot.channel is not None
        ]
        results = await defer.DeferredList(calls, consumeErrors=True)
        return [ok and bool(value) for ok, value in results]

    def stop(self, grace: float) -> Deferred[None]:
        """
        SIGTERM every worker (each lets its sessions finish within C{grace}); SIGKILL those
        still running L{STOP_MARGIN} seconds after that. Fires once all have ended.
        """
        self._stopping = True
        for slot in self._slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        self._stopped = Deferred()
        self._signal("TERM")
        self._kill = self._clock.callLater(grace + STOP_MARGIN, self._killAll)
        result = self._stopped
        self._maybeStopped()
        return result

    def _signal(self, name: str) -> None:
        for slot in self._slots:
            if slot.process is not None:
                try:
                    slot.process.signalProcess(name)
                except (OSError, Exception) as e:  # ProcessExitedAlready: ended meanwhile
                    self._log.debug("worker {index}: {why}", index=slot.index, why=e)

    def _killAll(self) -> None:
        self._kill = None
        if self.running:
            self._log.warn(
                "workers {indices} did not stop in time: killed", indices=self.running
            )
            self._signal("KILL")

    def _maybeStopped(self) -> None:
        if self._stopped is not None and not self.running:
            if self._kill is not None and self._kill.active():
                self._kill.cancel()
            self._kill = None
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)


def _exitReason(why: Failure) -> str:
    """How a process ended, in words: C{"exit code 1"}, C{"signal 9"}."""
    value = why.value
    signal_ = getattr(value, "signal", None)
    if signal_ is not None:
        return f"signal {signal_}"
    code = getattr(value, "exitCode", None)
    if isinstance(value, ProcessDone) or code == 0:
        return "exit code 0"
    return f"exit code {code}"


@attrs.frozen
class Bound:
    """A listening socket the master bound for its workers."""

    description: str
    tls: bool
    family: socket.AddressFamily
    socket: socket.socket


def bindAll(
    config: Config, reactor: Any, reusePort: bool, count: int
) -> list[list[Bound]]:
    """
    Bind every C{listen} and C{listen_tls} endpoint for C{count} workers: for each
    worker, the sockets it serves (all workers share each socket, or with C{reusePort}
    each has its own C{SO_REUSEPORT} one on the same address).

    @raise StartupError: an endpoint is not C{tcp:}/C{tcp6:} (optionally behind
        C{haproxy:}), or cannot be bound; one line naming the key and the endpoint.
    """
    perWorker: list[list[Bound]] = [[] for _ in range(count)]
    try:
        for key, descriptions, tls in (
            ("proxy.listen", config.listen, False),
            ("proxy.listen_tls", config.listenTls, True),
        ):
            for description in descriptions:
                what = f"{config.path}: {key}"
                sockets = _bindOne(
                    reactor, description, what, reusePort, count
                )
                for i in range(count):
                    family, sock = sockets[i if reusePort else 0]
                    perWorker[i].append(Bound(description, tls, family, sock))
    except BaseException:
        for bound in {id(b.socket): b for w in perWorker for b in w}.values():
            bound.socket.close()
        raise
    return perWorker


def _bindOne(
    reactor: Any, description: str, what: str, reusePort: bool, count: int
) -> list[tuple[socket.AddressFamily, socket.socket]]:
    endpoint = serverFromString(reactor, description.removeprefix(proxyprotocol.PREFIX))
    if not isinstance(endpoint, _TCPServerEndpoint):
        raise StartupError(
            f"{what}: {description!r}: with proxy.workers above 1 a listener must be a tcp:"
            " or tcp6: endpoint (with or without haproxy:)"
        )
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "")
    port = endpoint._port
    sockets: list[tuple[socket.AddressFamily, socket.socket]] = []
    try:
        for _ in range(count if reusePort else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append((family, sock))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reusePort:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]  # tcp:0 -- the same port for every worker
            sock.listen(endpoint._backlog)
            sock.setblocking(False)
    except OSError as e:
        for _, sock in sockets:
            sock.close()
        raise StartupError(f"{what}: cannot listen on {description!r}: {reason(e)}") from None
    return sockets


class _Supervising(Service):
    """The supervisor as a service: started after the privilege drop, stopped first."""

    def __init__(self, master: MasterService) -> None:
        self._master = master

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._master.supervisor.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self._master.supervisor.stop(self._master.config.timeouts.shutdownGrace)


class MasterService(ProxyService):
    """
    The master of C{config.workers} worker processes: the proxy's service without
    listeners of its own. It binds the sockets, starts and watches the workers, sums
    their counters for the stats socket, the web and the manhole, expires the
    quarantine, and passes SIGHUP and SIGTERM on.

    @param logTarget: where twistd writes the master's log, for the workers to write
        theirs: C{"-"} (stdout) or a file's path.
    @param workerCommand: the command that runs one worker (its specification is
        appended); by default this Python running L{main}.
    """

    reusePort = REUSE_PORT

    def __init__(
        self,
        config: Config,
        reactor: Any,
        factories: Mapping[str, IFilterFactory],
        *,
        uid: int | None = None,
        gid: int | None = None,
        daemonised: bool = False,
        logTarget: str = "-",
        workerCommand: Sequence[str] | None = None,
    ) -> None:
        self._bound: list[list[Bound]] = []
        self._logTarget = logTarget
        self._command = list(workerCommand or [sys.executable, "-c", WORKER_ENTRY])
        super().__init__(config, reactor, factories, uid=uid, gid=gid, daemonised=daemonised)
        #: The text the master started with: what takes a restart comes from it.
        self._started = config.source
        self.supervisor = Supervisor(config.workers, self._spawn, reactor, self.stats)

    def _addListeners(self, config: Config, reactor: Any) -> None:
        supervising = _Supervising(self)
        supervising.setName("workers")  # type: ignore[no-untyped-call]
        supervising.setServiceParent(self)  # type: ignore[no-untyped-call]
        # Stopped first, as listeners are: the workers' sessions finish before the rest.
        self.listeners.append(supervising)

    def _prepare(self, uid: int | None, gid: int | None) -> None:
        super()._prepare(uid, gid)
        if not self._bound:
            self._bound = bindAll(self.config, self._reactor, self.reusePort, self.config.workers)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        owner = self._owner
        if owner[0] is not None and os.getuid() == 0:
            with oneLine(self._daemonised):
                self._checkWorkerCanRun(owner[0], owner[1])
        # The JSON log, opened as root, must stay writable by the workers (the -u user).
        if owner[0] is not None and os.getuid() == 0 and self.config.logging.json is not None:
            gid = owner[1] if owner[1] is not None else -1
            with oneLine(self._daemonised):
                try:
                    os.chown(self.config.logging.json, owner[0], gid)
                except OSError as e:
                    raise StartupError(
                        f"{self.config.path}: logging.json: cannot hand"
                        f" {self.config.logging.json!r} over: {reason(e)}"
                    ) from None

    def _checkWorkerCanRun(self, uid: int, gid: int | None) -> None:
        """
        The workers start after twistd drops privileges, as its C{-u} user, who must be
        able to run this Python and import mailproxy: try it once, as that user, now.

        @raise StartupError: the user cannot; naming why and the fix.
        """
        import pwd
        import subprocess

        group = gid if gid is not None else pwd.getpwuid(uid).pw_gid
        try:
            result = subprocess.run(
                [self._command[0], "-c", "import mailproxy.workers"],
                user=uid,
                group=group,
                extra_groups=[],
                capture_output=True,
                timeout=60,
                check=False,
            )
            why = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
                f"exit code {result.returncode}"
            ]
            ok = result.returncode == 0
        except (OSError, subprocess.SubprocessError) as e:
            ok, why = False, [reason(e)]
        if not ok:
            raise StartupError(
                f"{self.config.path}: proxy.workers: the workers run as uid {uid} (twistd -u),"
                f" who cannot run {self._command[0]} with mailproxy: {why[0]}; make the"
                " installation readable by that user, or set workers = 1"
            )

    def _spawn(
        self, index: int, protocol: WorkerProcess
    ) -> tuple[IProcessTransport, MasterChannel | None]:
        """
        Start worker C{index}: its channel on descriptor 3, its sockets from 4 on, then
        its configuration (L{_configFile}).
        """
        configFile = _configFile(self._started, self.config.source)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            childFDs: dict[int, int | str] = {0: devnull, 1: 1, 2: 2, CHANNEL_FD: theirs.fileno()}
            if self._logTarget != "-":
                # twistd's log file is not opened for appending: the master's lines would
                # overwrite the workers'. Theirs come through the master (rarely used:
                # daemonised with a log file; under systemd and -n they go to stdout).
                childFDs[1] = childFDs[2] = "r"
            listeners = []
            for n, bound in enumerate(self._bound[index - 1], start=CHANNEL_FD + 1):
                childFDs[n] = bound.socket.fileno()
                listeners.append(
                    {
                        "fd": n,
                        "family": int(bound.family),
                        "description": bound.description,
                        "tls": bound.tls,
                    }
                )
            configFd = CHANNEL_FD + 1 + len(listeners)
            childFDs[configFd] = configFile.fileno()
            spec = {
                "config": self.config.path,
                "configFd": configFd,
                "index": index,
                "listeners": listeners,
                "log": "-" if self._logTarget == "-" else RELAY,
            }
            process = self._reactor.spawnProcess(
                protocol,
                self._command[0],
                [*self._command, json.dumps(spec)],
                env=dict(os.environ),
                childFDs=childFDs,
            )
            channel = MasterChannel(index, self.stats)
            self._reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX, _once(channel))
        finally:
            os.close(devnull)
            configFile.close()
            mine.close()
            theirs.close()
        return process, channel

    def snapshot(self) -> Deferred[dict[str, Any]]:
        """The sums, once every worker has reported what it counted until now."""

        async def fresh() -> dict[str, Any]:
            await self.supervisor.flush(FLUSH_TIMEOUT)
            return self.stats.snapshot()

        return Deferred.fromCoroutine(fresh())

    def reload(self, text: bytes | None = None) -> bool:
        """Load and check the configuration once; only a valid one goes to every worker."""
        if not super().reload(text):
            return False
        Deferred.fromCoroutine(self._reloadWorkers())
        return True

    async def _reloadWorkers(self) -> None:
        applied = await self.supervisor.reload(self.config.source)
        self._log.info(
            "reload passed to the workers: {applied} of {count} applied it",
            applied=sum(applied),
            count=len(applied),
        )

    async def _stop(self) -> None:
        await super()._stop()
        for bound in {id(b.socket): b for w in self._bound for b in w}.values():
            bound.socket.close()
        self._bound = []


def _configFile(started: bytes, running: bytes) -> IO[bytes]:
    """
    A private file without a name (its content may hold secrets, which a command line
    would show to every user) for a worker to read its configuration from: the text the
    master started with and the one it runs now (the same, or a reload's).
    """
    f = tempfile.TemporaryFile()
    texts = {"started": started.decode("utf-8"), "running": running.decode("utf-8")}
    f.write(json.dumps(texts).encode())
    f.seek(0)
    return f


def workerConfig(path: str, reactor: Any, data: bytes, index: int) -> Config:
    """
    The configuration a worker starts with, from what L{_configFile} holds: the running
    text, with the values that take a restart from the text the master started with. If
    that one no longer validates (a certificate it named is gone since a reload put
    another in its place), the running one's values are taken, and a warning says so.

    @raise ConfigError: the running text no longer validates (a file it names changed).
    """
    texts = json.loads(data)
    running = load(path, reactor, texts["running"].encode("utf-8"))
    if texts["started"] == texts["running"]:
        return running
    try:
        started = load(path, reactor, texts["started"].encode("utf-8"))
    except ConfigError as e:
        _workerLog.warn(
            "worker {worker}: the configuration the master started with no longer"
            " validates ({why}): what takes a restart is the running one's",
            worker=index,
            why=e,
        )
        return running
    return keepRestartOnly(running, started)[0]


def _once(protocol: amp.AMP) -> Factory:
    """A quiet factory of the one protocol of an adopted connection."""
    factory: Factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return factory


def workerShare(connections: int, workers: int, index: int) -> int:
    """
    Worker C{index}'s part (1 to C{workers}) of C{limits.connections}: equal shares that add
    up to it exactly (the first ones take the remainder), so that it stays the whole
    proxy's bound; at least 1.
    """
    return max(1, connections // workers + (index <= connections % workers))


def workerSpool(spoolDir: str, index: int) -> str:
    """Worker C{index}'s spool directory: a subdirectory of C{proxy.spool_dir} of its own."""
    return os.path.join(spoolDir, f"worker-{index}")


# -- the worker's side ------------------------------------------------------------------------


class AdoptedListener(Service):
    """A listening socket inherited from the master, served while the service runs."""

    def __init__(
        self, reactor: Any, fd: int, family: socket.AddressFamily, factory: IProtocolFactory
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.port = self._reactor.adoptStreamPort(self._fd, self._family, self._factory)
        os.close(self._fd)  # the port has its own copy

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return None
        result: Deferred[None] | None = port.stopListening()
        return result


class WorkerService(ProxyService):
    """
    One worker: the proxy's service on the master's sockets, without the stats socket,
    the web, the manhole or the quarantine's expiry (the master's), spooling in its own
    subdirectory, reloading when the master says so.

    @param listeners: the inherited sockets: C{fd}, C{family}, C{description}, C{tls}.
    @param publisher: where its log events go (see L{main}).
    """

    hangUpReloads = False
    probeUpstream = False  # the master probes

    def __init__(
        self,
        config: Config,
        reactor: Any,
        factories: Mapping[str, IFilterFactory],
        *,
        index: int,
        listeners: Sequence[Mapping[str, Any]],
        publisher: LogPublisher | None = None,
    ) -> None:
        self.index = index
        #: The workers there are: a reload's file may say another number, which takes a
        #: restart (the share stays this one's).
        self._workers = config.workers
        self._inherited = listeners
        self._publisher = publisher
        super().__init__(self._adjust(config), reactor, factories)

    def _makeStats(self, reactor: Any) -> Stats:
        stats = Stats(reactor)
        stats.recordDeltas()
        return stats

    def _logPublisher(self) -> dict[str, Any]:
        return {} if self._publisher is None else {"publisher": self._publisher}

    def _adjust(self, config: Config) -> Config:
        """
        Its own spool; its share of C{limits.connections} (which stays the whole proxy's
        bound, below the MTA's process limit, as the sample advises).
        """
        return attrs.evolve(
            config,
            spoolDir=workerSpool(config.spoolDir, self.index),
            limits=attrs.evolve(
                config.limits,
                connections=workerShare(config.limits.connections, self._workers, self.index),
            ),
        )

    def _addListeners(self, config: Config, reactor: Any) -> None:
        for spec in self._inherited:
            served = self.implicitTLS(self.factory) if spec["tls"] else self.factory
            _, wrapped = wrapFactory(
                reactor, spec["description"], served, self._config, self.stats
            )
            listener = AdoptedListener(
                reactor, spec["fd"], socket.AddressFamily(spec["family"]), wrapped
            )
            listener.setName(f"listen {spec['description']}")  # type: ignore[no-untyped-call]
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(listener)

    def _addExtras(self, config: Config, reactor: Any) -> None:
        StatsService(self.stats).setServiceParent(self)  # type: ignore[no-untyped-call]


class WorkerChannel(amp.AMP):
    """
    The worker's end of the channel: reports the counters (at most once every
    L{REPORT_INTERVAL} seconds, only when something was counted) and its sessions (when
    one starts or ends, and when one has changed, as found every L{SESSIONS_INTERVAL}
    seconds or at the master's Flush), and reloads when told. Sessions that only idle
    cost a comparison a second, not a report: the master keeps the list last sent.
    """

    _log = Logger()

    def __init__(self, service: WorkerService, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._service = service
        self._clock = clock
        self._pending: IDelayedCall | None = None
        self._sessionsSent = True  # none yet: nothing to say
        #: The sessions as last reported (what the master shows).
        self._lastSessions: list[tuple[SessionInfo, float]] = []
        self._refresh = LoopingCall(self._refreshSessions)
        self._refresh.clock = clock
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._service.stats.onCount = self.schedule
        self._service.stats.onSessions = self._sessionsChanged
        self._refresh.start(SESSIONS_INTERVAL, now=False)

    def _sessionsChanged(self) -> None:
        self._sessionsSent = False
        self.schedule()

    def _refreshSessions(self) -> None:
        if self._sessionsMoved():
            self.schedule()

    def _sessionsMoved(self) -> bool:
        """Whether the sessions are to be reported: not as last sent, or already due."""
        if self._sessionsSent and self._service.stats.localSessions() != self._lastSessions:
            self._sessionsSent = False
        return not self._sessionsSent

    def schedule(self) -> None:
        """Something was counted: report it within L{REPORT_INTERVAL} seconds."""
        if self._pending is None and self.transport is not None:
            self._pending = self._clock.callLater(REPORT_INTERVAL, self.flush)

    def flush(self) -> Deferred[Any]:
        """Report what was counted since the last report (and the sessions, if changed)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        stats = self._service.stats
        sessions = None
        if not self._sessionsSent:
            self._lastSessions = stats.localSessions()
            sessions = sessionsToWire(self._lastSessions)
            self._sessionsSent = True
        d: Deferred[Any] = self.callRemote(  # type: ignore[no-untyped-call]
            Report, delta=stats.takeDelta().toWire(), sessions=sessions
        )
        d.addErrback(lambda f: self._log.debug("report lost: {f}", f=f))
        return d

    @Flush.responder
    def flushNow(self) -> dict[str, Any]:
        # The report goes out first: the master has it when this answer arrives, with
        # the sessions as they are now if they changed since the last one.
        self._sessionsMoved()
        self.flush()
        return {}

    @Reload.responder
    def reload(self, config: str) -> dict[str, Any]:
        return {"applied": self._service.reload(config.encode("utf-8"))}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        if self._refresh.running:
            self._refresh.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._service.stats.onCount = None
        self._service.stats.onSessions = None
        self.lost.callback(None)


@implementer(ILogObserver)
class _Tagged:
    """Passes each event on with the worker's index: C{worker}, and C{log_system}."""

    def __init__(self, index: int, publisher: LogPublisher) -> None:
        self._index = index
        self._publisher = publisher

    def __call__(self, event: LogEvent) -> None:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        self._publisher(
            {**event, "worker": self._index, "log_system": f"worker {self._index} {system}"}
        )


def _output(target: str) -> IO[str]:
    """Where twistd writes the master's log: stdout (C{"-"}), or a file, appended to."""
    if target == "-":
        return sys.stdout
    return open(target, "a", encoding="utf-8", buffering=1)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run one worker: C{python -c WORKER_ENTRY SPEC}, SPEC the JSON the master passes
    (the configuration's path, the worker's index, its inherited sockets, the log's
    destination). Descriptor 3 is the channel to the master.
    """
    installReactor()
    from twisted.internet import reactor

    from mailproxy.filters.pipeline import filterFactories

    args = sys.argv[1:] if argv is None else list(argv)
    spec = json.loads(args[0])
    index = int(spec["index"])
    # The master passes reloads on; a terminal's Ctrl-C reaches the whole process group,
    # and the master stops the workers gracefully itself.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    publisher = LogPublisher()
    if spec["log"] == RELAY:
        publisher.addObserver(FileLogObserver(sys.stdout, _relayed))
    else:
        publisher.addObserver(FileLogObserver(_output(spec["log"]), ClassicText()))
    globalLogBeginner.beginLoggingTo(
        [_Tagged(index, publisher)], discardBuffer=True, redirectStandardIO=False
    )
    log = _workerLog
    status = [0]
    try:
        with open(spec["configFd"], "rb") as f:
            config = workerConfig(spec["config"], reactor, f.read(), index)
        service = WorkerService(
            config,
            reactor,
            filterFactories(),
            index=index,
            listeners=spec["listeners"],
            publisher=publisher,
        )
    except Exception as e:
        log.critical("worker {worker} cannot start: {why}", worker=index, why=e)
        return 1
    channel = WorkerChannel(service, reactor)
    reactor.adoptStreamConnection(  # type: ignore[attr-defined]
        CHANNEL_FD, socket.AF_UNIX, _once(channel)
    )
    os.close(CHANNEL_FD)

    def start() -> None:
        try:
            service.startService()
        except (SystemExit, Exception) as e:
            log.critical("worker {worker} cannot start: {why}", worker=index, why=e)
            status[0] = 1
            stopOnce()

    async def stop() -> None:
        if service.running:
            await service.stopService()
        if channel.transport is not None:
            # The last counts, before the process ends (bounded: the master may be gone).
            last = channel.flush()
            last.addTimeout(2.0, reactor)
            await last.addErrback(lambda f: None)

    stopping = [False]

    def stopOnce() -> None:
        # SIGTERM may come twice: from the master, and from systemd, which signals every
        # process of the unit's control group; the master may go too meanwhile.
        if not stopping[0]:
            stopping[0] = True
            reactor.stop()

    def terminated(signum: int, frame: object) -> None:
        reactor.callFromThread(stopOnce)  # type: ignore[attr-defined]

    def orphaned(_: object) -> None:
        if not stopping[0]:
            log.warn("worker {worker}: the master is gone; stopping", worker=index)
        stopOnce()

    def running() -> None:
        # After the reactor's own handlers (installed as it starts running).
        signal.signal(signal.SIGTERM, terminated)
        start()

    channel.lost.addCallback(orphaned)
    reactor.callWhenRunning(running)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(stop())
    )
    reactor.run()
    return status[0]


def _relayed(event: LogEvent) -> str | None:
    """One event for the master to log (L{WorkerProcess.childDataReceived})."""
    text = eventText(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    level = event.get("log_level", LogLevel.info)
    line = {"level": level.name, "system": event.get("log_system", "-"), "text": text}
    return json.dumps(line) + "\n"


