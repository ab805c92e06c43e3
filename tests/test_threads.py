"""
Blocking work (pyspf, the MIME walk, header reading, the SURBL scan, the quarantine's
copy) runs in the reactor's thread pool through L{inThreadPool}, and never in the
reactor's thread: a reactor without a thread pool is refused when the filter (or the
quarantine) is built.

The held L{SynchronousThreadPool} of L{ThreadedClock} shows where work ran: held work
has not run when the check returns, and runs when the test lets the pool run it.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, Verdict
from mailproxy.filters.headers import HeadersFilterFactory
from mailproxy.filters.mime import MimeFilterFactory
from mailproxy.filters.spf import SPFFilterFactory, ThreadedCheck, evaluate
from mailproxy.filters.support import NoThreadPoolError, inThreadPool, requireThreads
from mailproxy.filters.surbl import SURBLFilterFactory, ThreadedScan
from mailproxy.quarantine import Quarantine
from mailproxy.testing_threads import ThreadedClock
from tests.test_mime import ATTACHED, RecordingMessage

SESSION = Session("s1", "192.0.2.1", 40000, helo="client.example")
SURBL = {"zones": ({"zone": "multi.surbl.example"},)}


class InThreadPoolTests(SynchronousTestCase):
    def test_noThreadPool(self) -> None:
        """
        On a reactor without a thread pool, inThreadPool raises NoThreadPoolError and
        the function is not run here instead.
        """
        ran = []
        error = self.assertRaises(NoThreadPoolError, inThreadPool, Clock(), ran.append, 1)
        self.assertIn("no thread pool", str(error))
        self.assertEqual(ran, [])
        self.assertRaises(NoThreadPoolError, requireThreads, object())

    def test_result(self) -> None:
        """The Deferred fires with the function's result once the pool has run it."""
        reactor = ThreadedClock()
        reactor.threadPool.hold = True
        d = inThreadPool(reactor, lambda a, b: a + b, 2, b=3)
        self.assertNoResult(d)
        self.assertEqual(reactor.threadPool.runPending(), 1)
        self.assertEqual(self.successResultOf(d), 5)

    def test_failure(self) -> None:
        """An exception in the function fails the Deferred with it."""
        reactor = ThreadedClock()

        def broken() -> None:
            raise ValueError("no")

        self.failureResultOf(inThreadPool(reactor, broken), ValueError)


class RealThreadPoolTests(TestCase):
    async def test_realReactor(self) -> None:
        """With the real reactor the function runs in another thread."""
        from twisted.internet import reactor

        name = await inThreadPool(reactor, lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)


class BuildTimeTests(SynchronousTestCase):
    """A reactor without a thread pool is refused when the filter is built."""

    def test_filters(self) -> None:
        """mime, headers, spf and surbl refuse a plain Clock at build time."""
        for factory, options in [
            (MimeFilterFactory(), {}),
            (HeadersFilterFactory(), {"authserv_id": "mx.example.org"}),
            (SPFFilterFactory(), {"receiver": "mx.example.org"}),
            (SURBLFilterFactory(), SURBL),
        ]:
            self.assertRaises(NoThreadPoolError, factory.build, options, Clock())
            factory.build(options, ThreadedClock())  # and with one, they build

    def test_quarantine(self) -> None:
        """So does the quarantine, which copies messages in the thread pool."""
        self.assertRaises(NoThreadPoolError, Quarantine, self.mktemp(), 30, [], Clock())


class InThePoolTests(SynchronousTestCase):
    """The blocking part of each check is handed to the pool, not run in the call."""

    def setUp(self) -> None:
        self.reactor = ThreadedClock()
        self.pool = self.reactor.threadPool
        self.pool.hold = True
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(ATTACHED)

    def test_mime(self) -> None:
        """The MIME walk reads the message only when the pool runs it."""
        built = MimeFilterFactory().build({"block_filenames": ["*.exe"]}, self.reactor)
        message = RecordingMessage(self.path, len(ATTACHED))
        d = built.checkMessage(SESSION, Envelope("a@x"), message)
        assert isinstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual((message.threads, self.pool.pending), ([], 1))
        self.pool.runPending()
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.action, len(message.threads)), (Action.REJECT, 1))

    def test_headers(self) -> None:
        """The header block is read only when the pool runs it."""
        built = HeadersFilterFactory().build({"authserv_id": "mx.example.org"}, self.reactor)
        message = RecordingMessage(self.path, len(ATTACHED))
        d = built.checkMessage(SESSION, Envelope("a@x"), message)
        assert isinstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual(message.threads, [])
        self.pool.runPending()
        self.assertIsInstance(self.successResultOf(d), Verdict)
        self.assertEqual(len(message.threads), 1)

    def test_spf(self) -> None:
        """pyspf's evaluation is handed to the pool."""
        built = SPFFilterFactory().build({"receiver": "mx.example.org"}, self.reactor)
        check = built.check  # type: ignore[attr-defined]
        self.assertIsInstance(check, ThreadedCheck)
        d = built.checkMail(SESSION, Envelope("a@example.org"))
        assert isinstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual((self.pool.calls, self.pool.pending), ([evaluate], 1))

    def test_surbl(self) -> None:
        """The SURBL scan of the message is handed to the pool."""
        built = SURBLFilterFactory().build(SURBL, self.reactor)
        self.assertIsInstance(built.scan, ThreadedScan)  # type: ignore[attr-defined]
        message = RecordingMessage(self.path, len(ATTACHED))
        d = built.checkMessage(SESSION, Envelope("a@x"), message)
        assert isinstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual((message.threads, self.pool.pending), ([], 1))

    def test_quarantineCopy(self) -> None:
        """Where no hard link can be made, the quarantine copies in the pool."""
        directory = self.mktemp()
        os.makedirs(directory)
        quarantine = Quarantine(directory, 30, ["spam"], self.reactor)

        def noLinks(source: str, target: str) -> None:
            raise OSError(18, "Invalid cross-device link")

        self.patch(os, "link", noLinks)
        verdict = Verdict.reject("Looks like spam")
        d = quarantine.keep(Message(self.path, len(ATTACHED)), SESSION, Envelope("a@x"), verdict)
        self.assertNoResult(d)
        self.assertEqual(os.listdir(directory), [])
        self.pool.runPending()
        self.assertIsNotNone(self.successResultOf(d))
        self.assertEqual(len(os.listdir(directory)), 2)
