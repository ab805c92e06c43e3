"""
The CPU a worker and its master spend each second on the list of a worker's idle sessions:
the real AMP channel (L{mailproxy.workers}) over Twisted's in-memory connection, on a fake
clock, with 5,000 sessions that never change.

    PYTHONPATH=. .venv/bin/python bench/sessions.py [--sessions N] [--seconds S]
    PYTHONPATH=/other/checkout .venv/bin/python bench/sessions.py   # another revision
"""

from __future__ import annotations

import argparse
import time

from twisted.internet.task import Clock
from twisted.test import iosim

from mailproxy.stats import SessionInfo, Stats
from mailproxy.workers import REPORT_INTERVAL, SESSIONS_INTERVAL, MasterChannel, WorkerChannel


class View:
    """An idle session; described anew each time, as the relay's sessions are."""

    def __init__(self, n: int) -> None:
        self.id = f"{n:010X}"

    def describe(self) -> SessionInfo:
        return SessionInfo(self.id, "127.0.0.1", "client.example", None, 0, "command")


class Worker:
    """What the worker's channel needs of its service."""

    def __init__(self, clock: Clock) -> None:
        self.stats = Stats(clock)
        self.stats.recordDeltas()

    def reload(self, text: bytes | None = None) -> bool:
        return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--seconds", type=int, default=20, help="seconds of the fake clock")
    a = p.parse_args()
    clock = Clock()
    clock.advance(1_800_000_000)
    worker = Worker(clock)
    master = Stats(clock)
    master.workerStarted(1, 100)
    mine, theirs = MasterChannel(1, master), WorkerChannel(worker, clock)  # type: ignore[arg-type]
    pump = iosim.connect(mine, iosim.makeFakeServer(mine), theirs, iosim.makeFakeClient(theirs))
    for n in range(a.sessions):
        worker.stats.sessionStarted(View(n))
    clock.advance(REPORT_INTERVAL)
    pump.flush()
    assert len(master.sessions()) == a.sessions
    start = time.process_time()
    for _ in range(a.seconds):
        clock.advance(SESSIONS_INTERVAL)
        pump.flush()
        clock.advance(REPORT_INTERVAL)
        pump.flush()
    spent = (time.process_time() - start) / a.seconds
    print(f"{a.sessions} idle sessions: {spent * 1000:.1f} ms of CPU a second, worker and master")


if __name__ == "__main__":
    main()
