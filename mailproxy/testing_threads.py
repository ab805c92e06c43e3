"""
A reactor with a thread pool, for tests: blocking work handed to
L{mailproxy.filters.support.inThreadPool} runs deterministically, with no thread.

mailproxy never runs blocking work in the reactor's thread, and refuses a reactor
without a thread pool (L{NoThreadPoolError}) rather than do so. A test that builds a
filter doing blocking work (mime, headers, spf, surbl) or a quarantine on a fake clock
passes L{ThreadedClock} instead of a L{Clock}: a L{MemoryReactorClock} whose thread pool,
a L{SynchronousThreadPool}, runs each function at once in the calling thread -- or, with
C{hold = True}, keeps it until L{SynchronousThreadPool.runPending}, so that a test can
see that the work did not run in the reactor's call.

It is test code, shipped for third-party filter authors like L{mailproxy.testing}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailproxy.filters.support import NoThreadPoolError

__all__ = ["NoThreadPoolError", "SynchronousThreadPool", "ThreadedClock"]


class SynchronousThreadPool(ThreadPool):
    """
    A thread pool that starts no thread: each function runs in the calling thread, at
    once or (with C{hold}) when the test calls L{runPending}.

    @ivar hold: keep the work until L{runPending} rather than run it at once.
    @ivar calls: every function given to the pool, in order.
    """

    def __init__(self) -> None:
        super().__init__(0, 1, "mailproxy.testing_threads")
        self.hold = False
        self.calls: list[Callable[..., object]] = []
        self._pending: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: object,
        **kw: object,
    ) -> None:
        self.calls.append(func)

        def work() -> None:
            try:
                result = func(*args, **kw)
            except BaseException:
                if onResult is not None:
                    onResult(False, Failure())
                return
            if onResult is not None:
                onResult(True, result)

        if self.hold:
            self._pending.append(work)
        else:
            work()

    def callInThread(self, func: Callable[..., object], *args: object, **kw: object) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)

    @property
    def pending(self) -> int:
        """How many functions are held, waiting for L{runPending}."""
        return len(self._pending)

    def runPending(self) -> int:
        """Run the held functions (and any they hand over meanwhile); return how many."""
        count = 0
        while self._pending:
            self._pending.pop(0)()
            count += 1
        return count


@implementer(IReactorThreads)
class ThreadedClock(MemoryReactorClock):
    """
    A L{MemoryReactorClock} (a L{Clock} and an in-memory reactor) with a thread pool,
    L{threadPool}. What the pool's work hands back to the reactor's thread
    (C{callFromThread}) runs at once.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.threadPool = SynchronousThreadPool()

    def getThreadPool(self) -> ThreadPool:
        return self.threadPool

    def suggestThreadPoolSize(self, size: int) -> None:
        pass

    def callInThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.threadPool.callInThread(callable, *args, **kwargs)

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)
