"""
Worker processes (L{mailproxy.workers}): the counters' deltas and their sums across a
midnight, the AMP channel between a worker and its master, the master's restarts with
back-off; then the master and two workers as real processes on loopback: mail goes
through both, a worker killed mid-session gives its client no 250 and is started again
with the counters kept, SIGHUP reaches every worker, SIGTERM stops them all.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import workers
from mailproxy.envelope import Session
from mailproxy.filters import Stage, Verdict
from mailproxy.filters.pipeline import Checked
from mailproxy.stats import REFUSALS_KEPT, Delta, SessionInfo, Stats, _midnight
from mailproxy.testing import RawClient
from mailproxy.wire import Reply
from mailproxy.workers import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    REPORT_INTERVAL,
    SESSIONS_INTERVAL,
    STABLE_AFTER,
    STOP_MARGIN,
    Flush,
    MasterChannel,
    Reload,
    Supervisor,
    WorkerChannel,
    WorkerProcess,
)
from tests.fakes import ProxyTestCase

SESSION = Session(id="S1", clientAddress="192.0.2.1", clientPort=25)


def _clockAt(when: float) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def _accept(stats: Stats, n: int = 1) -> None:
    for _ in range(n):
        stats.connectionOpened()
        stats.messageAttempted()
        stats.delivered(SESSION, Reply(250, (b"2.0.0 Ok",)), "a@example.org", 100)


def _checked(name: str, seconds: float) -> Checked:
    return Checked(
        session=SESSION,
        stage=Stage.MESSAGE,
        filter=name,
        seconds=seconds,
        verdict=Verdict.accept(),
        dryRun=False,
    )


class DeltaTests(SynchronousTestCase):
    """A worker's counts reach its master's sums, each on the day it was counted."""

    def setUp(self) -> None:
        today = datetime.date(2026, 3, 14)
        self.midnight = _midnight(today + datetime.timedelta(days=1))
        self.clock = _clockAt(self.midnight - 10)
        self.worker = Stats(self.clock)
        self.worker.recordDeltas()
        self.master = Stats(self.clock)
        self.master.workerStarted(1, 100)

    def wire(self, delta: Delta) -> Delta:
        """What the master reads: the delta through JSON."""
        return Delta.fromWire(json.loads(json.dumps(delta.toWire())))

    def test_refusalsBounded(self) -> None:
        """
        A report carries at most the refusals the master keeps, the newest; more refused
        between two reports only count.
        """
        for n in range(REFUSALS_KEPT + 30):
            self.worker.refused(SESSION, Stage.RCPT, Reply(550, (b"5.1.1 no",)), reason=f"r{n}")
        delta = self.worker.takeDelta()
        self.assertEqual(len(delta.toWire()["refusals"]), REFUSALS_KEPT)
        self.assertEqual(delta.refusals[-1].by, f"r{REFUSALS_KEPT + 29}")
        self.master.merge(1, self.wire(delta))
        self.assertEqual(sum(self.master.total.recipientsRefused.values()), REFUSALS_KEPT + 30)

    def test_summed(self) -> None:
        """Two reports add up in the master's totals and today's counters."""
        _accept(self.worker, 2)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        _accept(self.worker, 3)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.assertEqual(self.master.total.messages["accepted"], 5)
        self.assertEqual(self.master.today.messages["accepted"], 5)
        self.assertEqual(self.master.total.connections["opened"], 5)
        self.assertEqual(self.master.workerRows()[0]["accepted"], 5)
        self.assertFalse(self.worker.takeDelta())

    def test_lateReportAfterMidnight(self) -> None:
        """
        Counts made before midnight and reported after it go to the totals, not to the
        new day; those made after midnight go to both.
        """
        _accept(self.worker, 2)
        late = self.wire(self.worker.takeDelta())
        self.clock.advance(20)  # past midnight
        self.master.merge(1, late)
        self.assertEqual(self.master.total.messages["accepted"], 2)
        self.assertEqual(self.master.today.messages["accepted"], 0)
        self.assertEqual(self.master.day, datetime.date(2026, 3, 15))
        _accept(self.worker, 1)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.assertEqual(self.master.total.messages["accepted"], 3)
        self.assertEqual(self.master.today.messages["accepted"], 1)

    def test_reportOfANewDayFirst(self) -> None:
        """
        A report of the new day that arrives before the master's own midnight timer
        fired starts the new day: yesterday's counts leave "today".
        """
        _accept(self.master, 4)  # (as if merged earlier today)
        worker = Stats(_clockAt(self.midnight + 1))
        worker.recordDeltas()
        _accept(worker, 1)
        self.master.merge(1, self.wire(worker.takeDelta()))
        self.assertEqual(self.master.today.messages["accepted"], 1)
        self.assertEqual(self.master.total.messages["accepted"], 5)

    def test_oneDeltaAcrossMidnight(self) -> None:
        """One report holding counts of both days splits them by day."""
        _accept(self.worker, 2)
        self.clock.advance(20)
        _accept(self.worker, 1)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.assertEqual(self.master.total.messages["accepted"], 3)
        self.assertEqual(self.master.today.messages["accepted"], 1)

    def test_latencySummed(self) -> None:
        """Two workers' filter histograms are summed, bucket by bucket."""
        other = Stats(self.clock)
        other.recordDeltas()
        self.worker.filterChecked(_checked("access", 0.001))
        other.filterChecked(_checked("access", 0.2))
        other.filterChecked(_checked("access", 0.002))
        self.master.workerStarted(2, 101)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.master.merge(2, self.wire(other.takeDelta()))
        latency = self.master.latency["access"]
        self.assertEqual(latency.count, 3)
        self.assertAlmostEqual(latency.sum, 0.203)
        self.assertEqual(latency.max, 0.2)
        self.assertEqual(latency.cumulative()[0], (0.005, 2))
        self.assertEqual(latency.verdicts["accept"], 3)

    def test_refusalsAndHours(self) -> None:
        """Refusals arrive in the master's list; the hourly buckets are summed."""
        self.worker.refused(SESSION, Stage.MESSAGE, Reply(550, (b"5.7.1 No",)), reason="access")
        _accept(self.worker)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.assertEqual([r.by for r in self.master.refusals], ["access"])
        self.assertEqual(self.master.total.rejected["access"], 1)
        hour = self.master.hours()[-1][1]
        self.assertEqual((hour["accepted"], hour["rejected"]), (1, 1))

    def test_restartedWorkerKeepsItsCounts(self) -> None:
        """What a worker reported before it died stays in the sums and in its row."""
        _accept(self.worker, 2)
        self.master.merge(1, self.wire(self.worker.takeDelta()))
        self.master.workerEnded(1)
        self.master.workerStarted(1, 200)
        again = Stats(self.clock)
        again.recordDeltas()
        _accept(again, 1)
        self.master.merge(1, self.wire(again.takeDelta()))
        self.assertEqual(self.master.total.messages["accepted"], 3)
        row = self.master.workerRows()[0]
        self.assertEqual((row["pid"], row["restarts"], row["accepted"]), (200, 1, 3))

    def test_sessionsAcrossWorkers(self) -> None:
        """The active sessions of every worker are listed, oldest first, with the worker."""
        self.master.workerStarted(2, 101)
        info = SessionInfo("A", "192.0.2.1", None, None, 0, "greeting")
        other = SessionInfo("B", "192.0.2.2", "x", "a@b", 1, "data")
        self.master.workerSessions(1, [(info, self.clock.seconds() - 1)])
        self.master.workerSessions(2, [(other, self.clock.seconds() - 5)])
        active = self.master.snapshot()["active"]
        self.assertEqual([(s["id"], s["worker"]) for s in active], [("B", 2), ("A", 1)])
        self.assertEqual(self.master.activeSessions, 2)
        self.assertEqual([r["active"] for r in self.master.snapshot()["workers"]], [1, 1])
        self.master.workerEnded(2)
        self.assertEqual(self.master.activeSessions, 1)

    def test_badDelta(self) -> None:
        """A report that is not a delta is refused as a whole (nothing merged)."""
        with self.assertRaises(ValueError):
            Delta.fromWire({"days": {"2026-03-14": {"nosuch": {"x": 1}}}, "hours": {},
                            "latency": {}, "refusals": []})  # fmt: skip


class _FakeWorker:
    """What the worker's channel needs of its service."""

    def __init__(self, clock: Clock) -> None:
        self.stats = Stats(clock)
        self.stats.recordDeltas()
        self.reloads: list[bytes | None] = []

    def reload(self, text: bytes | None = None) -> bool:
        self.reloads.append(text)
        return True


class _View:
    """A session as the stats see it; its description is made anew each time, as the relay's."""

    def __init__(self, id: str, phase: str) -> None:
        self.id, self.phase = id, phase

    def describe(self) -> SessionInfo:
        return SessionInfo(self.id, "192.0.2.1", None, None, 0, self.phase)


class ChannelTests(SynchronousTestCase):
    """The AMP channel: batched reports, sessions, reloads."""

    def setUp(self) -> None:
        self.clock = _clockAt(_midnight(datetime.date(2026, 3, 14)) + 3600)
        self.service = _FakeWorker(self.clock)
        self.master = Stats(self.clock)
        self.master.workerStarted(1, 100)
        self.reports: list[Delta] = []
        merge = self.master.merge

        def counted(index: int, delta: Delta) -> None:
            self.reports.append(delta)
            merge(index, delta)

        self.master.merge = counted  # type: ignore[method-assign]
        masterChannel = MasterChannel(1, self.master)
        self.masterChannel = masterChannel
        self.workerChannel = WorkerChannel(self.service, self.clock)  # type: ignore[arg-type]
        self.pump = iosim.connect(
            masterChannel,
            iosim.makeFakeServer(masterChannel),
            self.workerChannel,
            iosim.makeFakeClient(self.workerChannel),
        )

    def test_batched(self) -> None:
        """Many counts within the interval are one report, sent when it is over."""
        _accept(self.service.stats, 50)
        self.pump.flush()
        self.assertEqual(self.reports, [])
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.master.total.messages["accepted"], 50)
        self.clock.advance(REPORT_INTERVAL * 10)
        self.pump.flush()
        self.assertEqual(len(self.reports), 1, "nothing counted, nothing sent")

    def test_flush(self) -> None:
        """
        The master's Flush is answered after the report it asks for: a read of the
        counters (the stats socket, the web) waits for it and sees every count.
        """
        _accept(self.service.stats, 3)
        answered: list[object] = []
        self.masterChannel.callRemote(Flush).addCallback(
            lambda _: answered.append(self.master.total.messages["accepted"])
        )
        self.pump.flush()
        self.assertEqual(answered, [3])
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        self.assertEqual(len(self.reports), 1, "the timer's report went out with the flush")

    def test_large(self) -> None:
        """A report longer than AMP's 64 KiB value limit arrives whole."""
        for n in range(3000):
            self.service.stats.refused(
                SESSION, Stage.RCPT, Reply(550, (b"5.1.1 " + b"x" * 40,)), reason=f"reason {n}"
            )
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        self.assertEqual(len(self.master.total.recipientsRefused), 3000)

    def test_sessions(self) -> None:
        """A session's start is reported, with the worker's index, and its end too."""

        class View:
            def describe(self) -> SessionInfo:
                return SessionInfo("S1", "192.0.2.1", None, None, 0, "greeting")

        view = View()
        self.service.stats.sessionStarted(view)
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        [(info, _)] = self.master.sessions()
        self.assertEqual((info.id, info.worker), ("S1", 1))
        self.service.stats.sessionEnded(view)
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        self.assertEqual(self.master.sessions(), [])

    def reported(self) -> _View:
        """A session started, in greeting, and its report received."""
        view = _View("S1", "greeting")
        self.service.stats.sessionStarted(view)
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        return view

    def test_idleSessionsNotResent(self) -> None:
        """
        Sessions that only idle are reported once, not again every second: the master
        keeps the list it was sent (5,000 idle sessions cost a report of 700 KB a second).
        """
        self.reported()
        self.assertEqual(len(self.reports), 1)
        for _ in range(5):
            self.clock.advance(SESSIONS_INTERVAL)
            self.pump.flush()
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        self.assertEqual(len(self.reports), 1)
        [(info, _)] = self.master.sessions()
        self.assertEqual(info.phase, "greeting")

    def test_changedSessionResent(self) -> None:
        """A session's new phase reaches the master within a second, with no other count."""
        view = self.reported()
        view.phase = "data"
        self.clock.advance(SESSIONS_INTERVAL)
        self.clock.advance(REPORT_INTERVAL)
        self.pump.flush()
        [(info, _)] = self.master.sessions()
        self.assertEqual(info.phase, "data")
        self.assertEqual(len(self.reports), 2)

    def test_flushSeesChangedSession(self) -> None:
        """The master's Flush (a read of the page or the stats socket) gets the phase of now."""
        view = self.reported()
        view.phase = "data"
        self.masterChannel.callRemote(Flush)
        self.pump.flush()
        [(info, _)] = self.master.sessions()
        self.assertEqual(info.phase, "data")

    def test_reload(self) -> None:
        """
        The master's Reload makes the worker apply the text the master checked (not the
        file, which may have changed since), however long, and says whether it applied.
        """
        text = '[proxy]\nhostname = "caf\u00e9.test"\n' + "# padding\n" * 10000
        answers: list[Any] = []
        self.masterChannel.callRemote(Reload, config=text).addCallback(answers.append)
        self.pump.flush()
        self.assertEqual(self.service.reloads, [text.encode("utf-8")])
        self.assertEqual(answers, [{"applied": True}])

    def test_masterGone(self) -> None:
        """The worker learns that its channel closed (it then stops)."""
        lost: list[None] = []
        self.workerChannel.lost.addCallback(lost.append)
        self.masterChannel.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        self.assertEqual(lost, [None])


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _FakeChannel:
    """A worker's channel that records the commands and answers when told."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, Deferred[Any]]] = []

    def callRemote(self, command: object, **arguments: object) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((command, d))
        return d


class FlushTests(SynchronousTestCase):
    """Reads of the counters share the Flush asked of a worker, answered or not."""

    def test_shared(self) -> None:
        """
        Reads while a worker has not answered wait for the same Flush, each at most its
        timeout: a stuck worker holds one request however many reads time out on it; the
        answer ends every read still waiting, and the next read asks again.
        """
        clock = Clock()
        channel = _FakeChannel()
        supervisor = Supervisor(1, lambda i, p: (_FakeProcess(100 + i), channel), clock, Stats(clock))
        supervisor.start()
        reads = [Deferred.fromCoroutine(supervisor.flush(1.0)) for _ in range(3)]
        clock.advance(1.0)
        self.assertEqual([self.successResultOf(d) for d in reads], [None] * 3)
        waiting = Deferred.fromCoroutine(supervisor.flush(1.0))
        self.assertEqual([c for c, _ in channel.calls], [Flush])
        channel.calls[0][1].callback({})
        self.assertIsNone(self.successResultOf(waiting))
        Deferred.fromCoroutine(supervisor.flush(1.0))
        self.assertEqual([c for c, _ in channel.calls], [Flush, Flush])


class SupervisorTests(SynchronousTestCase):
    """The master starts dead workers again, backing off, and stops them all."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = Stats(self.clock)
        self.started: list[tuple[int, _FakeProcess, WorkerProcess]] = []
        self.supervisor = Supervisor(2, self.spawn, self.clock, self.stats)
        self.supervisor.start()

    def spawn(self, index: int, protocol: WorkerProcess) -> tuple[Any, None]:
        process = _FakeProcess(1000 + len(self.started))
        self.started.append((index, process, protocol))
        return process, None

    def die(self, index: int, signum: int = 9) -> None:
        """The running process of worker C{index} dies of C{signum}."""
        _, process, protocol = [s for s in self.started if s[0] == index][-1]
        process.pid = None
        protocol.processEnded(Failure(ProcessTerminated(signal=signum)))

    def test_started(self) -> None:
        """Every worker is started, and counted with its pid."""
        self.assertEqual([i for i, _, _ in self.started], [1, 2])
        self.assertEqual([r["pid"] for r in self.stats.workerRows()], [1000, 1001])

    def test_backOff(self) -> None:
        """A worker that keeps dying is started again after 1, 2, 4, ... 30 s."""
        delays = []
        for _ in range(8):
            self.die(1)
            delay = self.supervisor.delays()[0]
            assert delay is not None
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(len(self.started), 2 + 8)
        self.assertEqual(self.stats.workerRows()[0]["restarts"], 8)
        self.assertEqual(self.supervisor.running, [1, 2])

    def test_stableResets(self) -> None:
        """A worker that ran a while before it died is started again after 1 s."""
        for _ in range(3):
            self.die(1)
            self.clock.advance(self.supervisor.delays()[0] or 0)
        self.clock.advance(STABLE_AFTER)
        self.die(1)
        self.assertEqual(self.supervisor.delays()[0], BACKOFF_FIRST)

    def test_notBeforeItsTime(self) -> None:
        """No worker is started during its back-off."""
        self.die(2)
        self.clock.advance(BACKOFF_FIRST - 0.01)
        self.assertEqual(self.supervisor.running, [1])
        self.clock.advance(0.01)
        self.assertEqual(self.supervisor.running, [1, 2])

    def test_stop(self) -> None:
        """Stopping: SIGTERM to each worker; done once all have ended; none restarted."""
        stopped = self.supervisor.stop(30.0)
        self.assertEqual([p.signals for _, p, _ in self.started], [["TERM"], ["TERM"]])
        self.assertNoResult(stopped)
        self.die(1, signal.SIGTERM)
        self.assertNoResult(stopped)
        self.die(2, signal.SIGTERM)
        self.successResultOf(stopped)
        self.clock.advance(BACKOFF_MAX * 2)
        self.assertEqual(len(self.started), 2)

    def test_stopKillsLaggards(self) -> None:
        """A worker still running after the grace and the margin is killed."""
        stopped = self.supervisor.stop(5.0)
        self.clock.advance(5.0 + STOP_MARGIN)
        self.assertEqual([p.signals for _, p, _ in self.started], [["TERM", "KILL"]] * 2)
        self.die(1)
        self.die(2)
        self.successResultOf(stopped)

    def test_stopDuringBackOff(self) -> None:
        """A worker waiting to be started again is not started once stopping."""
        self.die(1)
        stopped = self.supervisor.stop(5.0)
        self.die(2, signal.SIGTERM)
        self.successResultOf(stopped)
        self.clock.advance(BACKOFF_MAX)
        self.assertEqual(len(self.started), 2)

    def test_exitReason(self) -> None:
        """How a worker ended, in the log's words."""
        self.assertEqual(workers._exitReason(Failure(ProcessTerminated(signal=9))), "signal 9")
        self.assertEqual(workers._exitReason(Failure(ProcessTerminated(exitCode=1))), "exit code 1")
        self.assertEqual(workers._exitReason(Failure(ProcessDone(0))), "exit code 0")


# -- real processes ---------------------------------------------------------------------------

#: twistd, beside this Python.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: Every wait on the processes ends within this many seconds (a failure, not a hang).
DEADLINE = 30.0


async def until(what: str, check: Callable[[], Any], deadline: float = DEADLINE) -> Any:
    """Poll C{check} until it returns something true; fail naming C{what} past C{deadline}."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        await deferLater(reactor, 0.05)


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MasterTests(ProxyTestCase):
    """The master and two workers as twistd runs them, relaying to the test's MTA."""

    def setUp(self) -> None:
        super().setUp()
        self.directory = tempfile.mkdtemp(prefix="mailproxy-workers-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.directory], check=False))
        self.port = _freePort()
        self.socket = os.path.join(self.directory, "stats.sock")
        self.config = os.path.join(self.directory, "mailproxy.toml")
        self.log = os.path.join(self.directory, "twistd.log")
        self.json = os.path.join(self.directory, "mailproxy.json")
        self.writeConfig("one.test")

    def writeConfig(self, hostname: str, spool: str | None = None) -> None:
        with open(self.config, "w") as f:
            f.write(
                "[proxy]\n"
                f'listen = "tcp:{self.port}:interface=127.0.0.1"\n'
                f'upstream = "tcp:host=127.0.0.1:port={self.mtaPort}"\n'
                f'spool_dir = "{spool or self.spool}"\n'
                f'hostname = "{hostname}"\n'
                'greeting = "own"\n'
                'client_names = "off"\n'
                "workers = 2\n"
                "[timeouts]\nshutdown_grace = 5\n"
                f'[stats]\nsocket = "{self.socket}"\n'
                f'[logging]\njson = "{self.json}"\n'
            )

    async def startMaster(self) -> subprocess.Popen[bytes]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(workers.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        with open(self.log, "wb") as out:
            master = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "mailproxy", "--config", self.config],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )

        def stop() -> None:
            if master.poll() is None:
                master.kill()
                master.wait(DEADLINE)
            for pid in self.pids:
                if pid is not None and _alive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.pids: list[int | None] = []
        self.addCleanup(stop)
        self.master = master
        rows = await until("two workers listening", lambda: self.listening(2))
        self.pids = [r["pid"] for r in rows]
        return master

    def listening(self, count: int) -> list[dict[str, Any]] | None:
        """The workers' rows, once C{count} of them said they listen; else None."""
        if self.master.poll() is not None:
            raise AssertionError(f"the master exited: {self.logText()}")
        if self.logText().count(" listening on ") < count + 1:  # the master's line too
            return None
        snapshot = self.snapshot()
        return snapshot["workers"] if snapshot else None

    def logText(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def snapshot(self) -> dict[str, Any] | None:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5.0)
                s.connect(self.socket)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return None
        result: dict[str, Any] = json.loads(data)
        return result

    async def client(self) -> RawClient:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport and client.transport.loseConnection())
        await client.expect(1)
        return client

    async def message(self) -> list[int]:
        return (await self.transaction()).codes

    async def transaction(self) -> RawClient:
        """One message sent, and the connection closed; the client, with its replies."""
        client = await self.client()
        client.send(b"EHLO c.test\r\n")
        await client.expect(2)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        await client.expect(5)
        client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        await client.lost
        return client

    async def test_bothWorkersServe(self) -> None:
        """Mail goes through both workers; the master's stats socket sums them."""
        await self.startMaster()
        sent = 0

        def both() -> bool:
            snapshot = self.snapshot()
            return bool(snapshot) and all(r["accepted"] for r in snapshot["workers"])  # type: ignore[index]

        while not both():
            codes = await self.message()
            self.assertEqual(codes[-2:], [250, 221])
            sent += 1
            self.assertLess(sent, 200, "one worker took every connection")
        snapshot = await until(
            "every message counted",
            lambda: (s := self.snapshot()) and s["total"]["messages"]["accepted"] == sent and s,
        )
        self.assertEqual(len(self.mta.messages), sent)
        self.assertEqual(sum(r["accepted"] for r in snapshot["workers"]), sent)
        self.assertEqual(snapshot["today"]["messages"]["accepted"], sent)
        # Each worker spools in its own directory.
        self.assertEqual(sorted(os.listdir(self.spool)), ["worker-1", "worker-2"])
        # Each writes its own lines to the JSON log, saying which worker it is; the
        # master's own lines say none.
        with open(self.json, encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        released = [e for e in events if "released:" in e["text"]]
        self.assertEqual(len(released), sent)
        self.assertEqual({e["worker"] for e in released}, {1, 2})
        started = [e for e in events if "worker 1 started" in e["text"]]
        self.assertEqual([e.get("worker") for e in started], [None])

    async def test_killedMidSession(self) -> None:
        """
        A worker killed while the MTA holds the reply to the final dot: its client sees
        the connection break, never a 250; the master starts the worker again; what was
        counted before stays in the sums.
        """
        await self.startMaster()
        self.assertEqual((await self.message())[-2:], [250, 221])
        await until(
            "the first message counted",
            lambda: (s := self.snapshot()) and s["total"]["messages"]["accepted"] == 1,
        )
        self.mta.silentAfterData = True
        client = await self.client()
        client.send(b"EHLO c.test\r\n")
        await client.expect(2)
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        await client.expect(5)
        client.send(b"Subject: held\r\n\r\nhello\r\n.\r\n")
        active = await until(
            "the session listed", lambda: (s := self.snapshot()) and s["active"]
        )
        index = active[0]["worker"]
        victim = self.snapshot()["workers"][index - 1]["pid"]  # type: ignore[index]
        os.kill(victim, signal.SIGKILL)
        await until("the client's connection closed", lambda: not client.connected)
        self.assertEqual(client.codes, [220, 250, 250, 250, 354])
        rows = await until(
            "the worker started again",
            lambda: (s := self.snapshot())
            and (w := s["workers"][index - 1])["pid"] not in (None, victim)
            and s["workers"],
        )
        self.pids = [r["pid"] for r in rows]
        self.assertEqual(rows[index - 1]["restarts"], 1)
        self.assertIn(f"worker {index} (pid {victim}) died", self.logText())
        snapshot = self.snapshot()
        assert snapshot is not None
        self.assertEqual(snapshot["total"]["messages"]["accepted"], 1)
        self.assertEqual(snapshot["active"], [])
        # The restarted worker serves.
        self.mta.silentAfterData = False
        await until("listening again", lambda: self.listening(3))
        self.assertEqual((await self.message())[-2:], [250, 221])

    async def test_hangUpReachesEveryWorker(self) -> None:
        """SIGHUP: the new host name is in the banner of every worker."""
        await self.startMaster()
        self.assertEqual((await self.client()).replies[0].text, "one.test ESMTP")
        self.writeConfig("two.test")
        self.master.send_signal(signal.SIGHUP)
        await until(
            "both workers reloaded",
            lambda: "reload passed to the workers: 2 of 2 applied it" in self.logText(),
        )
        text = self.logText()
        for index in (1, 2):
            self.assertIn(f"[worker {index} ", text)
            self.assertRegex(text, rf"\[worker {index} [^\]]*\] reloaded ")
        banners = {(await self.client()).replies[0].text for _ in range(10)}
        self.assertEqual(banners, {"two.test ESMTP"})

    async def restart(self, index: int) -> None:
        """Kill worker C{index}; return once the master has started it again and it listens."""
        victim = self.pids[index - 1]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        rows = await until(
            "the worker started again",
            lambda: (s := self.snapshot())
            and s["workers"][index - 1]["pid"] not in (None, victim)
            and s["workers"],
        )
        self.pids = [r["pid"] for r in rows]
        await until("listening again", lambda: self.listening(3))

    async def banners(self) -> set[str]:
        """The banners of messages sent until each worker has accepted one more."""

        def accepted() -> list[int]:
            snapshot = self.snapshot()
            assert snapshot is not None
            return [r["accepted"] for r in snapshot["workers"]]

        before, texts = accepted(), set()
        for _ in range(200):
            client = await self.transaction()
            self.assertEqual(client.codes[-2:], [250, 221])
            texts.add(client.replies[0].text)
            if all(now > then for now, then in zip(accepted(), before, strict=True)):
                return texts
        raise AssertionError("one worker took every connection")

    async def test_restartedKeepsTheRunningConfig(self) -> None:
        """
        A worker started again reads the configuration the master checked, not the file:
        one edited since without SIGHUP changes nothing, in any worker.
        """
        await self.startMaster()
        self.writeConfig("edited.test")
        await self.restart(1)
        self.assertEqual(await self.banners(), {"one.test ESMTP"})

    async def test_restartedAfterReload(self) -> None:
        """
        After a reload, a worker started again runs the reload's text, but keeps the
        values that take a restart from the master's start, as its sibling does.
        """
        await self.startMaster()
        moved = os.path.join(self.directory, "moved-spool")
        self.writeConfig("two.test", spool=moved)
        self.master.send_signal(signal.SIGHUP)
        await until(
            "both workers reloaded",
            lambda: "reload passed to the workers: 2 of 2 applied it" in self.logText(),
        )
        self.assertIn("proxy.spool_dir changed, which takes a restart", self.logText())
        with open(self.config, "w") as f:
            f.write("[nosuch]\n")  # and then broken, without SIGHUP
        await self.restart(1)
        self.assertEqual(await self.banners(), {"two.test ESMTP"})
        self.assertFalse(os.path.exists(moved), "the restarted worker used the new spool_dir")

    async def test_badReloadGoesNowhere(self) -> None:
        """An invalid configuration on SIGHUP is refused once, in the master only."""
        await self.startMaster()
        with open(self.config, "a") as f:
            f.write("[nosuch]\n")
        self.master.send_signal(signal.SIGHUP)
        await until("the refusal", lambda: "reload refused" in self.logText())
        self.assertNotIn("reload passed to the workers", self.logText())
        self.assertNotRegex(self.logText(), r"\[worker \d [^\]]*\] reload")

    async def test_termStopsAll(self) -> None:
        """SIGTERM: every worker stops, then the master exits."""
        master = await self.startMaster()
        master.send_signal(signal.SIGTERM)
        await until("the master exited", lambda: master.poll() is not None)
        # twistd ends by the signal it stopped for, once it has shut down.
        self.assertEqual(master.returncode, -signal.SIGTERM)
        self.assertIn("Server Shut Down.", self.logText())
        for pid in self.pids:
            assert pid is not None
            await until(f"worker {pid} gone", lambda pid=pid: not _alive(pid))  # type: ignore[misc]
        self.assertIn("worker 1 (pid", self.logText())
        self.assertIn("mailproxy stopped", self.logText())

    async def test_termToEveryProcess(self) -> None:
        """
        SIGTERM to the master and to each worker at once (systemd's stop signals the
        unit's whole control group): each worker stops once, nothing fails.
        """
        master = await self.startMaster()
        master.send_signal(signal.SIGTERM)
        for pid in self.pids:
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
        await until("the master exited", lambda: master.poll() is not None)
        self.assertIn("Server Shut Down.", self.logText())
        self.assertNotIn("Traceback", self.logText())
        self.assertNotIn("#critical]", self.logText())

    async def test_orphansStop(self) -> None:
        """The master killed: its workers see their channel close and stop by themselves."""
        master = await self.startMaster()
        master.kill()
        master.wait(DEADLINE)
        for pid in self.pids:
            assert pid is not None
            await until(f"worker {pid} gone", lambda pid=pid: not _alive(pid))  # type: ignore[misc]
        self.assertIn("the master is gone; stopping", self.logText())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (the master gone, not yet reaped) is not alive either.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False



class ReadersTests(SynchronousTestCase):
    """The status page, /metrics and the manhole show a master's workers."""

    def setUp(self) -> None:
        self.clock = _clockAt(_midnight(datetime.date(2026, 3, 14)) + 3600)
        self.stats = Stats(self.clock)
        for index in (1, 2):
            self.stats.workerStarted(index, 100 + index)
        worker = Stats(self.clock)
        worker.recordDeltas()
        _accept(worker, 3)
        self.stats.merge(2, worker.takeDelta())
        info = SessionInfo("S9", "192.0.2.9", "h.test", None, 0, "command")
        self.stats.workerSessions(1, [(info, self.clock.seconds() - 2)])
        self.stats.workerEnded(2)

    def test_metrics(self) -> None:
        """/metrics: the sums, and a few series per worker, labelled with its index."""
        from prometheus_client.exposition import generate_latest

        from mailproxy.web import registryFor

        text = generate_latest(registryFor(self.stats)).decode()
        self.assertIn('mailproxy_messages_total{filter="",outcome="accepted"} 3.0', text)
        self.assertIn("mailproxy_active_sessions 1.0", text)
        self.assertIn('mailproxy_worker_up{worker="1"} 1.0', text)
        self.assertIn('mailproxy_worker_up{worker="2"} 0.0', text)
        self.assertIn('mailproxy_worker_active_sessions{worker="1"} 1.0', text)
        self.assertIn('mailproxy_worker_messages_accepted_total{worker="2"} 3.0', text)

    def test_page(self) -> None:
        """The status page has a row per worker, and each session names its worker."""
        from mailproxy.web import page, render

        html = render(page(self.stats.snapshot(), "proxy.test", 10)).decode()
        self.assertIn('id="workers"', html)
        self.assertIn("Workers (2)", html)
        self.assertIn("down", html)
        self.assertIn("<th class=\"n\">Worker</th>", html)

    def test_manhole(self) -> None:
        """The manhole's workers() and sessions() show the workers."""
        from mailproxy.manhole import namespace

        class Proxy:
            config = None
            stats = self.stats

            def reload(self) -> bool:
                return True

        names = namespace(Proxy())  # type: ignore[arg-type]
        self.assertEqual([w["pid"] for w in names["workers"]()], [101, None])  # type: ignore[operator]
        self.assertEqual(names["sessions"]()[0]["worker"], 1)  # type: ignore[operator,index]


class WorkerConfigTests(SynchronousTestCase):
    """What a worker starts with: the master's texts, never the file (L{workers.workerConfig})."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "absent.toml")  # never read

    def text(self, hostname: str, spool: str) -> str:
        return (
            '[proxy]\nlisten = "tcp:2525"\nupstream = "tcp:host=127.0.0.1:port=25"\n'
            f'hostname = "{hostname}"\nspool_dir = "{os.path.join(self.directory, spool)}"\n'
        )

    def config(self, started: str, running: str) -> Any:
        data = json.dumps({"started": started, "running": running}).encode()
        return workers.workerConfig(self.path, self.reactor, data, 1)

    def test_asStarted(self) -> None:
        """No reload yet: the text the master started with, as it is."""
        text = self.text("one.test", "spool")
        config = self.config(text, text)
        self.assertEqual((config.hostname, config.source), ("one.test", text.encode()))

    def test_afterReload(self) -> None:
        """After a reload: its text, but the restart-only values of the start."""
        config = self.config(self.text("one.test", "spool"), self.text("two.test", "moved"))
        self.assertEqual(config.hostname, "two.test")
        self.assertEqual(config.spoolDir, os.path.join(self.directory, "spool"))

    def test_startedNoLongerValid(self) -> None:
        """A start text that no longer validates gives way to the running one, with a warning."""
        events: list[dict[str, Any]] = []
        self.patch(workers, "_workerLog", Logger(namespace="mailproxy.workers", observer=events.append))
        gone = os.path.join(self.directory, "gone", "deeper")
        started = self.text("one.test", "spool").replace(os.path.join(self.directory, "spool"), gone)
        config = self.config(started, self.text("two.test", "moved"))
        self.assertEqual(config.spoolDir, os.path.join(self.directory, "moved"))
        [event] = events
        self.assertIn("no longer validates", formatEvent(event))
        self.assertIn("proxy.spool_dir", formatEvent(event))


class ShareTests(SynchronousTestCase):
    """A worker's part of limits.connections."""

    def test_share(self) -> None:
        """
        The shares add up to limits.connections exactly (so it stays below the MTA's
        process limit however many cores), the remainder to the first; never below one.
        """
        for connections, count in ((90, 2), (91, 2), (90, 64), (500, 3), (100, 7)):
            shares = [workers.workerShare(connections, count, i) for i in range(1, count + 1)]
            self.assertEqual(sum(shares), connections, (connections, count))
            self.assertLessEqual(max(shares) - min(shares), 1)
        self.assertEqual([workers.workerShare(1, 4, i) for i in range(1, 5)], [1, 1, 1, 1])


class WorkerUserTests(ProxyTestCase):
    """With twistd's -u, the master checks at start-up that the workers can run."""

    skip = None if os.getuid() == 0 else "needs root, to try a command as another user"

    def test_workersCannotRun(self) -> None:
        """A Python the -u user cannot run stops start-up with one line saying so."""
        from mailproxy.config import load
        from mailproxy.filters.pipeline import filterFactories
        from mailproxy.startup import StartupError

        path = os.path.join(tempfile.mkdtemp(prefix="mailproxy-workers-"), "m.toml")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", os.path.dirname(path)], check=False))
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nlisten = "tcp:{_freePort()}:interface=127.0.0.1"\n'
                f'upstream = "tcp:host=127.0.0.1:port={self.mtaPort}"\n'
                f'spool_dir = "{self.spool}"\nworkers = 2\n'
            )
        master = workers.MasterService(
            load(path, reactor),
            reactor,
            filterFactories(),
            uid=65534,
            daemonised=True,
            workerCommand=["/nonexistent/python"],
        )
        with self.assertRaises(StartupError) as raised:
            master.privilegedStartService()
        for bound in master._bound:
            for listener in bound:
                listener.socket.close()
        master.logs.stopService()
        message = str(raised.exception)
        self.assertIn("proxy.workers: the workers run as uid 65534 (twistd -u)", message)
        self.assertIn("/nonexistent/python", message)
        self.assertIn("set workers = 1", message)


class RelayedLogTests(SynchronousTestCase):
    """Daemonised with a log file, a worker's events come through its master."""

    def test_relayed(self) -> None:
        """Each JSON line a worker writes is one event of the master's, with its system."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        line = workers._relayed(
            {
                "log_format": "{id} released: {reply}",
                "id": "AB12",
                "reply": "250 Ok",
                "log_level": LogLevel.warn,
                "log_system": "worker 2 mailproxy.relay#warn",
            }
        )
        assert line is not None
        process = WorkerProcess(lambda why: None)
        data = (line + "not json\n").encode()
        process.childDataReceived(1, data[:10])
        self.assertEqual(len(events), 0, "half a line waits for the rest")
        process.childDataReceived(1, data[10:])
        self.assertEqual(
            [(formatEvent(e), e["log_system"], e["log_level"]) for e in events],
            [
                ("AB12 released: 250 Ok", "worker 2 mailproxy.relay#warn", LogLevel.warn),
                ("not json", "worker", LogLevel.info),
            ],
        )


class BindTests(SynchronousTestCase):
    """What the master binds for its workers."""

    def config(self, listen: str) -> Any:
        from mailproxy.config import Config

        return Config(
            path="m.toml", listen=(listen,), upstream="tcp:host=127.0.0.1:port=1",
            hostname="proxy.test", spoolDir="/nonexistent", workers=2,
        )  # fmt: skip

    def test_unixRefused(self) -> None:
        """A unix: listener cannot be shared out: start-up stops, naming it."""
        from mailproxy.startup import StartupError

        with self.assertRaises(StartupError) as raised:
            workers.bindAll(self.config("unix:/tmp/x.sock"), reactor, False, 2)
        self.assertIn("m.toml: proxy.listen: 'unix:/tmp/x.sock'", str(raised.exception))

    def test_shared(self) -> None:
        """Shared: one socket, the same for each worker; haproxy: is bound as its TCP."""
        bound = workers.bindAll(self.config("haproxy:tcp:0:interface=127.0.0.1"), reactor, False, 2)
        self.addCleanup(bound[0][0].socket.close)
        self.assertIs(bound[0][0].socket, bound[1][0].socket)
        self.assertEqual(bound[0][0].description, "haproxy:tcp:0:interface=127.0.0.1")

    def test_reusePort(self) -> None:
        """SO_REUSEPORT: a socket per worker, all on the same port (tcp:0 too)."""
        bound = workers.bindAll(self.config("tcp:0:interface=127.0.0.1"), reactor, True, 2)
        for per in bound:
            self.addCleanup(per[0].socket.close)
        first, second = (per[0].socket for per in bound)
        self.assertIsNot(first, second)
        self.assertEqual(first.getsockname(), second.getsockname())
