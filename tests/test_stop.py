"""
A graceful stop: sessions in flight finish their transaction within the grace time, the
rest get 421 4.3.2, no 250 the MTA did not give, no spool file left behind.

In memory (client, proxy and the stand-in MTA, with a Clock), and once over real loopback
sockets with the service as twistd builds it.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.filters import Stage
from mailproxy.localmta import LocalMTA
from mailproxy.testing import FakeFilter, RawClient, loopbackConfig, startProxy
from tests.test_relay import MESSAGE, STUFFED, Harness, envelope

GRACE = 30.0


def shuttingDown(client: RawClient) -> bool:
    """Whether the client's last reply is the stopping proxy's 421 4.3.2."""
    last = client.replies[-1]
    return last.code == 421 and last.lines == (b"4.3.2 proxy.test Service shutting down",)


class DrainTests(SynchronousTestCase):
    """L{RelayFactory.shutDown}, in memory."""

    def stop(self, h: Harness, grace: float = GRACE) -> Deferred[None]:
        d = h.memory.factory.shutDown(grace)
        h.memory.flush()
        return d

    def test_idleSessionClosedAtOnce(self) -> None:
        """
        A session between transactions gets 421 4.3.2 at once and is closed; the stop
        completes without waiting for the grace time, and leaves no timer behind.
        """
        h = Harness(self)
        client = h.greeted()
        d = self.stop(h)
        self.assertTrue(shuttingDown(client))
        self.assertFalse(client.connected)
        self.successResultOf(d)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_messageInFlightFinishes(self) -> None:
        """
        A client in the middle of DATA may finish its message: it reaches the MTA, the
        client gets the MTA's 250, and only then 421.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED[:10])
        d = self.stop(h)
        self.assertEqual(client.codes[-1], 354)
        self.assertNoResult(d)
        h.clock.advance(GRACE / 2)
        h.send(client, STUFFED[10:])
        self.assertEqual([m.content for m in h.mta.messages], [MESSAGE])
        self.assertEqual(client.codes[-2], 250)
        self.assertTrue(shuttingDown(client))
        self.assertFalse(client.connected)
        self.successResultOf(d)
        self.assertEqual(h.spooled(), [])

    def test_transactionMayGoOn(self) -> None:
        """
        A transaction begun before the stop goes on (RCPT, DATA) within the grace time;
        a command after it ends gets 421 instead of an answer.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"MAIL FROM:<a@example.org>\r\n")
        d = self.stop(h)
        h.send(client, b"RCPT TO:<b@example.net>\r\nDATA\r\n" + STUFFED + b"MAIL FROM:<c@x>\r\n")
        self.assertEqual(client.codes[2:], [250, 250, 354, 250, 421])
        self.assertTrue(shuttingDown(client))
        self.assertEqual(len(h.mta.messages), 1)
        self.assertNotIn(b"c@x", bytes(h.mta.transcripts[0]))
        self.successResultOf(d)

    def test_graceRunsOutMidData(self) -> None:
        """
        A client still sending when the grace time runs out gets 421; the MTA never
        gets the message and the spool file is removed.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\nSubject: slow\r\n\r\npart one\r\n")
        self.assertEqual(len(h.spooled()), 1)
        d = self.stop(h)
        h.clock.advance(GRACE)
        h.memory.flush()
        self.assertTrue(shuttingDown(client))
        self.assertFalse(client.connected)
        self.assertEqual(h.mta.messages, [])
        self.assertNotIn(b"part one", bytes(h.mta.transcripts[0]))
        self.assertEqual(h.spooled(), [])
        self.successResultOf(d)

    def test_graceRunsOutWhileFiltering(self) -> None:
        """
        A message whose filters have not decided when the grace time runs out: 421 to
        the client, the filter's check cancelled, nothing at the MTA, no spool file.
        """
        cancelled: list[object] = []
        pending: Deferred[object] = Deferred(cancelled.append)
        h = Harness(self, FakeFilter(verdicts={Stage.MESSAGE: lambda: pending}))
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        d = self.stop(h, grace=10)  # the filter's own timeout is 30 s
        h.clock.advance(10)
        h.memory.flush()
        self.assertEqual(client.codes[-2:], [354, 421])
        self.assertTrue(shuttingDown(client))
        self.assertEqual(cancelled, [pending])
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        self.successResultOf(d)

    def test_graceRunsOutWhileReleasing(self) -> None:
        """
        An MTA that has the whole message but has not answered when the grace time runs
        out: the client gets 421, never a 250 the MTA did not give, and the MTA's
        connection is aborted so that it does not queue a message the client will retry.
        """
        h = Harness(self)
        h.mta.silentAfterData = True
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertIn(STUFFED, bytes(h.mta.transcripts[0]))
        d = self.stop(h)
        h.clock.advance(GRACE - 1)
        h.memory.flush()
        self.assertEqual(client.codes[-1], 354)
        h.clock.advance(1)
        h.memory.flush()
        self.assertTrue(shuttingDown(client))
        self.assertNotIn(250, client.codes[4:])
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        self.successResultOf(d)

    def test_newConnectionRefused(self) -> None:
        """A client connecting while the proxy stops gets 421 4.3.2 and is closed."""
        h = Harness(self)
        busy = h.greeted()
        h.send(busy, b"MAIL FROM:<a@example.org>\r\n")
        self.stop(h)
        late = h.connect()
        self.assertEqual(late.codes, [421])
        self.assertTrue(shuttingDown(late))
        self.assertFalse(late.connected)

    def test_lingeringConnectionAborted(self) -> None:
        """
        A session that cannot even be closed (its connection never goes away) is aborted
        once the linger time after the grace time is over, so the stop always completes.
        """
        h = Harness(self)
        client = h.greeted()
        h.send(client, b"MAIL FROM:<a@example.org>\r\n")
        [session] = h.memory.factory.sessions
        assert session.transport is not None
        session.transport.loseConnection = lambda: None  # type: ignore[method-assign]
        d = self.stop(h)
        h.clock.advance(GRACE)
        h.memory.flush()
        self.assertNoResult(d)
        h.clock.advance(5)
        h.memory.flush()
        self.assertFalse(client.connected)
        self.successResultOf(d)


class LoopbackStopTests(TestCase):
    """The service as twistd builds it, stopped while a client sends a message."""

    async def test_stopWithMessageInFlight(self) -> None:
        """
        Stopping the service stops listening at once (a new connection is refused), lets
        the client in the middle of a message finish it (the MTA's 250 reaches it, then
        421), and fires once every session is closed, with no spool file left.
        """
        mta = LocalMTA()
        mtaPort = reactor.listenTCP(0, mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(mtaPort.stopListening)
        spool = os.path.abspath(self.mktemp())
        config = loopbackConfig(mtaPort.getHost().port, spool, "[timeouts]\nshutdown_grace = 10\n")
        service, port = startProxy(self, config)
        [listener] = service.listeners

        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\n" + envelope() + b"DATA\r\n")
        await client.expect(5)
        client.send(STUFFED[:10])

        stopped = service.stopService()
        await listener._waitingForPort  # type: ignore[attr-defined]
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(endpoint, RawClient())
        self.assertFalse(stopped.called)

        client.send(STUFFED[10:])
        await client.lost
        await stopped
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 421])
        self.assertEqual(client.replies[-1].lines, (b"4.3.2 proxy.test Service shutting down",))
        self.assertEqual([m.content for m in mta.messages], [MESSAGE])
        self.assertEqual(os.listdir(spool), [])
        self.assertEqual(service.factory.sessions, set())
