"""
The session's own bounds (issue 9): the error and command limits, the command and session
deadlines, the minimum data rate, back-pressure on replies, and the share of work one
session does per reactor turn.

The session core alone first (events in, effects out); then client, proxy and the
stand-in MTA in memory, with a Clock, checking what a postmaster would: the replies the
client saw, the bytes the MTA received, the spool directory afterwards, the counters.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.config import Limits
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.relay import RelayFactory
from mailproxy.testing import FakeFilter, RawClient
from mailproxy.wire import Reply
from tests.fakes import ProxyTestCase
from tests.test_relay import Harness, envelope
from tests.test_session import CONFIG, visible

EHLO = b"EHLO client.example\r\n"


def machine(**limits: Any) -> core.Session:
    config = attrs.evolve(CONFIG, limits=attrs.evolve(Limits(), **limits))
    return core.Session(config, SessionInfo("S1", "192.0.2.7", 40000))


def greeted(s: core.Session) -> core.Session:
    s.start()
    s.verdict(Stage.CONNECT, Verdict.accept())
    s.mtaConnected()
    s.mtaReply(Reply(220, (b"mta.test",)))
    s.clientData(EHLO)
    s.verdict(Stage.HELO, Verdict.accept())
    s.mtaReply(Reply(250, (b"mta.test", b"PIPELINING", b"ENHANCEDSTATUSCODES")))
    return s


def sentToMta(effects: list[core.Effect]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, core.SendMta))


class TurnTests(SynchronousTestCase):
    """The session core's share of work per event, and the later turns it asks for."""

    def test_linesPerTurn(self) -> None:
        """
        Of 25 pipelined NOOPs, 10 are handled (relayed) per event; the rest wait for the
        L{core.Session.proceed} that L{core.ContinueLater} asks for, 10 at a time.
        """
        s = greeted(machine(commandsPerTurn=10))
        effects = s.clientData(b"NOOP\r\n" * 25)
        self.assertEqual(sentToMta(effects), b"NOOP\r\n" * 10)
        self.assertEqual(effects.count(core.ContinueLater()), 1)
        effects = s.proceed()
        self.assertEqual(sentToMta(effects), b"NOOP\r\n" * 10)
        self.assertIn(core.ContinueLater(), effects)
        effects = s.proceed()
        self.assertEqual(sentToMta(effects), b"NOOP\r\n" * 5)
        self.assertNotIn(core.ContinueLater(), effects)

    def test_othersWaitForTheTurn(self) -> None:
        """
        Events in the same turn (the MTA's replies) handle no more lines once the turn's
        share is spent: only the later turn does, and it is asked for once.
        """
        s = greeted(machine(commandsPerTurn=10))
        s.clientData(b"NOOP\r\n" * 25)
        for _ in range(10):
            effects = s.mtaReply(Reply(250, (b"2.0.0 ok",)))
            self.assertEqual(sentToMta(effects), b"")
            self.assertNotIn(core.ContinueLater(), effects)
        self.assertEqual(sentToMta(s.proceed()), b"NOOP\r\n" * 10)

    def test_halfCloseAfterFlood(self) -> None:
        """A client that half-closes after its pipelined lines still has each answered."""
        s = greeted(machine(commandsPerTurn=2))
        s.clientData(b"NOOP\r\n" * 5)
        s.clientEnded()
        sent = bytearray()
        for _ in range(5):
            effects = s.proceed()
            sent += sentToMta(effects)
            self.assertNotIn(core.CloseClient(), effects)
        self.assertEqual(bytes(sent), b"NOOP\r\n" * 3)


class BacklogTests(SynchronousTestCase):
    """A client that does not read its replies is not read either."""

    def test_backlogged(self) -> None:
        """
        While the client's transport holds more replies than C{reply_buffer}, the client
        is not read and what it sent waits; once they are written both resume.
        """
        s = greeted(machine())
        self.assertEqual(visible(s.clientBacklogged()), [core.PauseClient()])
        effects = s.clientData(b"NOOP\r\n" * 3)
        self.assertEqual(sentToMta(effects), b"")
        effects = s.clientDrained()
        self.assertEqual(sentToMta(effects), b"NOOP\r\n" * 3)
        self.assertIn(core.ResumeClient(), effects)

    def test_repliesOwed(self) -> None:
        """
        With more than MAX_PENDING replies owed, the lines left wait (and the client is
        not read); they go on once the MTA has answered enough of them.
        """
        s = greeted(machine(commandsPerTurn=5000))
        effects = s.clientData(b"NOOP\r\n" * (core.MAX_PENDING + 50))
        self.assertEqual(sentToMta(effects).count(b"NOOP"), core.MAX_PENDING + 1)
        self.assertIn(core.PauseClient(), effects)
        later: list[core.Effect] = []
        for _ in range(core.MAX_PENDING + 1):
            later += s.mtaReply(Reply(250, (b"2.0.0 ok",)))
        later += s.proceed()
        self.assertEqual(sentToMta(later).count(b"NOOP"), 49)
        self.assertIn(core.ResumeClient(), later)


class LimitTests(SynchronousTestCase):
    """
    Each limit over the relay in memory: what the client saw, what the MTA received, the
    spool directory, the counter and the one log line.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged(self, text: str) -> list[str]:
        return [line for line in map(formatEvent, self.events) if text in line]

    def closedWith(self, client: RawClient, code: int, text: bytes) -> None:
        last = client.replies[-1]
        self.assertEqual((last.code, last.lines), (code, (text,)))
        self.assertFalse(client.connected)

    def counted(self, h: Harness) -> dict[str, int]:
        reached = h.memory.factory.stats.snapshot()["total"]["limits_reached"]
        return {what: n for what, n in reached.items() if n}

    def test_errorLimit(self) -> None:
        """
        The third error (limits.errors = 3) -- a recipient the MTA refuses, an unknown
        command, a bad sequence -- is answered, then 421 4.7.0 and the close; nothing the
        client pipelined after it is answered, and no message goes through: its DATA
        waited for the replies before it, and the MTA leg is closed with QUIT.
        """
        h = Harness(self, limits={"errors": 3})
        h.mta.refuseRecipients = lambda r: r.startswith("nobody")
        client = h.greeted()
        h.send(
            client,
            b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@y>\r\nXYZZY\r\nRCPT TO:<b@y>\r\n"
            b"MAIL FROM:<a@x>\r\nNOOP\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
        )
        self.assertEqual(client.codes, [220, 250, 250, 550, 502, 250, 503, 421])
        self.closedWith(client, 421, b"4.7.0 proxy.test Error: too many errors")
        transcript = bytes(h.mta.transcripts[0])
        self.assertIn(b"RCPT TO:<nobody@y>\r\n", transcript)
        self.assertNotIn(b"XYZZY", transcript)
        self.assertNotIn(b"DATA", transcript)
        self.assertTrue(transcript.endswith(b"QUIT\r\n"))
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        self.assertEqual(self.counted(h), {"error limit": 1})
        [line] = self.logged("error limit")
        self.assertIn("3 errors (limits.errors)", line)

    def test_errorLimitAtData(self) -> None:
        """
        The last error allowed is the reply DATA was waiting for: the spool file being
        created for the message is removed all the same, and the MTA hears no DATA.
        """
        h = Harness(self, limits={"errors": 1})
        h.mta.refuseRecipients = lambda r: r.startswith("nobody")
        client = h.greeted()
        h.send(client, envelope(b"a@x", b"b@y", b"nobody@y") + b"DATA\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 550, 421])
        self.assertFalse(client.connected)
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))
        self.assertEqual(h.spooled(), [])

    def test_deliveryForgivesErrors(self) -> None:
        """
        A delivered message forgives the errors before it, as Postfix does; 452 4.5.3 for
        recipients over limits.recipients is no error at all.
        """
        h = Harness(self, limits={"errors": 3, "recipients": 1})
        client = h.greeted()
        h.send(client, b"XYZZY\r\nXYZZY\r\n" + envelope(b"a@x", b"b@y", b"c@y", b"d@y"))
        h.send(client, b"DATA\r\n")
        h.send(client, b"Subject: ok\r\n\r\nok\r\n.\r\nXYZZY\r\nXYZZY\r\nNOOP\r\n")
        self.assertEqual(
            client.codes, [220, 250, 502, 502, 250, 250, 452, 452, 354, 250, 502, 502, 250]
        )
        self.assertTrue(client.connected)
        self.assertEqual(len(h.mta.messages), 1)
        self.assertEqual(self.counted(h), {})

    def test_filterRefusalsCount(self) -> None:
        """A sender a filter refuses is an error too; the limit closes the session."""
        f = FakeFilter(verdicts={Stage.MAIL: Verdict.reject("No")})
        h = Harness(self, f, limits={"errors": 2})
        client = h.greeted()
        h.send(client, b"MAIL FROM:<a@x>\r\nMAIL FROM:<b@x>\r\nMAIL FROM:<c@x>\r\n")
        self.assertEqual(client.codes, [220, 250, 550, 550, 421])
        self.assertNotIn(b"MAIL", bytes(h.mta.transcripts[0]))
        self.assertEqual(self.counted(h), {"error limit": 1})

    def test_commandLimit(self) -> None:
        """
        Past limits.commands command lines, the next gets 421 4.7.0 and is not relayed;
        the session closes.
        """
        h = Harness(self, limits={"commands": 4})
        client = h.greeted()
        h.send(client, b"NOOP\r\n" * 5)
        self.assertEqual(client.codes, [220, 250, 250, 250, 250, 421])
        self.closedWith(client, 421, b"4.7.0 proxy.test Error: too many commands")
        self.assertEqual(bytes(h.mta.transcripts[0]).count(b"NOOP\r\n"), 3)
        self.assertEqual(h.spooled(), [])
        self.assertEqual(self.counted(h), {"command limit": 1})
        self.assertEqual(len(self.logged("command limit")), 1)

    def test_commandTimeout(self) -> None:
        """
        One byte every 1.5 s resets client_idle but not the command line's deadline: it
        must be complete timeouts.command seconds after its first byte, else 421 4.4.2.
        """
        h = Harness(self, timeouts={"clientIdle": 2.0, "command": 10.0})
        client = h.greeted()
        for byte in b"MAIL FROM:<a@x>":
            h.clock.advance(1.5)
            h.memory.flush()
            if not client.connected:
                break
            h.send(client, bytes([byte]))
        self.closedWith(client, 421, b"4.4.2 proxy.test Error: command not completed in time")
        self.assertTrue(11.5 <= h.clock.seconds() <= 13.0, h.clock.seconds())
        self.assertNotIn(b"MAIL", bytes(h.mta.transcripts[0]))
        self.assertEqual(h.spooled(), [])
        self.assertEqual(self.counted(h), {"command timeout": 1})

    def test_slowButCompleteLines(self) -> None:
        """Lines that each complete in time keep a session open however long it runs."""
        h = Harness(self, timeouts={"clientIdle": 20.0, "command": 10.0})
        client = h.greeted()
        for _ in range(5):
            for part in (b"NO", b"OP\r\n"):
                h.clock.advance(6)
                h.memory.flush()
                h.send(client, part)
        self.assertEqual(client.codes, [220, 250] + [250] * 5)
        self.assertTrue(client.connected)

    def test_sessionTimeoutMidMessage(self) -> None:
        """
        A session over timeouts.session in the middle of its message gets 421 4.4.2: the
        MTA never hears of the message, the spool file is gone, nothing is acknowledged.
        """
        h = Harness(self, timeouts={"session": 60.0})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        for _ in range(7):
            h.clock.advance(10)
            h.memory.flush()
            if client.connected:
                h.send(client, b"line\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 421])
        self.closedWith(client, 421, b"4.4.2 proxy.test Error: session time limit exceeded")
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        self.assertEqual(self.counted(h), {"session timeout": 1})

    def test_sessionTimeoutAfterTheMessage(self) -> None:
        """
        A message already whole when the session's time is up (its filters deciding) is
        answered first -- the MTA's own 250 -- and then the session closes with 421.
        """
        decided: Deferred[Verdict] = Deferred()
        f = FakeFilter(verdicts={Stage.MESSAGE: lambda: decided})
        h = Harness(self, f, timeouts={"session": 20.0})  # the filter may take 30 s
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + b"Subject: x\r\n\r\nhi\r\n.\r\n")
        h.clock.advance(21)
        h.memory.flush()
        self.assertTrue(client.connected)
        decided.callback(Verdict.accept())
        h.memory.flush()
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 421])
        self.assertEqual(len(h.mta.messages), 1)
        self.assertIn(h.mta.messages[0].queueId.encode(), client.replies[-2].lines[0])
        self.assertFalse(client.connected)
        self.assertEqual(h.spooled(), [])

    def test_minDataRate(self) -> None:
        """
        Below limits.min_data_rate, averaged over the first 30 s of the message: 421
        4.4.2, the message never released, its spool file removed.
        """
        h = Harness(self, limits={"minDataRate": 100})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        for _ in range(4):
            h.clock.advance(9)
            h.memory.flush()
            if client.connected:
                h.send(client, b"x" * 98 + b"\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 421])
        self.closedWith(client, 421, b"4.4.2 proxy.test Error: message data too slow")
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))
        self.assertEqual(h.spooled(), [])
        self.assertEqual(self.counted(h), {"data rate": 1})
        [line] = self.logged("data rate")
        self.assertIn("296 bytes of the message in 30 s, 10 bytes/s, below 100", line)

    def test_fastEnough(self) -> None:
        """A message sent faster than the minimum is delivered, however long it takes."""
        h = Harness(self, limits={"minDataRate": 100})
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\nSubject: slow but steady\r\n\r\n")
        for _ in range(10):
            h.clock.advance(9)
            h.memory.flush()
            h.send(client, b"x" * 1000 + b"\r\n")
        h.send(client, b".\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250])
        self.assertEqual(len(h.mta.messages), 1)

    def test_floodInTurns(self) -> None:
        """
        A flood of pipelined NOOPs is handled a turn's share at a time, and every one of
        them is answered in order.
        """
        h = Harness(self, limits={"commandsPerTurn": 7})
        client = h.greeted()
        h.send(client, b"NOOP\r\n" * 30)
        self.assertEqual(client.codes, [220, 250] + [250] * 30)
        self.assertEqual(bytes(h.mta.transcripts[0]).count(b"NOOP\r\n"), 30)


class DriverTests(SynchronousTestCase):
    """What the driver does for the bounds: the producer, the later turn, the last flush."""

    def test_producerRegistered(self) -> None:
        """
        The driver is the producer of the client's transport: the transport pausing it
        (its buffer over reply_buffer) pauses the reading of the client, and what it sent.
        """
        h = Harness(self)
        client, proxy = h.memory.connect()
        h.send(client, EHLO)
        assert proxy.transport is not None
        producer = proxy.transport.producer  # type: ignore[attr-defined]
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        h.send(client, b"NOOP\r\n")
        self.assertEqual(client.codes, [220, 250])
        producer.resumeProducing()
        h.memory.flush()
        self.assertEqual(client.codes, [220, 250, 250])

    def test_unreadLastReplies(self) -> None:
        """
        A closed session whose client never reads its 421 is aborted CLOSE_LINGER seconds
        later, so that it holds neither its connection nor its buffer.
        """
        from mailproxy import relay

        h = Harness(self, limits={"commands": 1})
        client, proxy = h.memory.connect()
        assert proxy.transport is not None
        transport: Any = proxy.transport
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        transport.loseConnection = lambda: None  # the reply is never read
        h.send(client, EHLO + b"NOOP\r\n")
        self.assertEqual(aborted, [])
        h.clock.advance(relay.CLOSE_LINGER)
        self.assertEqual(aborted, [True])


class CounterTests(SynchronousTestCase):
    """Where a postmaster reads the limits met: the snapshot, the refusals, /metrics, the page."""

    def test_limitReached(self) -> None:
        """
        Each limit met is counted by its name (every name present, 0 or more), listed
        among the refusals with its session and reply, exposed as
        C{mailproxy_limits_reached_total} and on the status page.
        """
        from prometheus_client import generate_latest
        from twisted.internet.task import Clock

        from mailproxy.stats import LIMITS, Stats
        from mailproxy.web import page, registryFor, render
        from tests.test_web import metrics

        stats = Stats(Clock())
        reply = Reply(421, (b"4.7.0 proxy.test Error: too many errors",))
        stats.limitReached(SessionInfo("S1", "192.0.2.7", 40000), "error limit", reply)
        total = stats.snapshot()["total"]["limits_reached"]
        self.assertEqual(total, {what: int(what == "error limit") for what in LIMITS})
        [refusal] = stats.snapshot()["refusals"]
        self.assertEqual(
            (refusal["session"], refusal["stage"], refusal["filter"], refusal["reply"]),
            ("S1", "session", "error limit", "421 4.7.0 proxy.test Error: too many errors"),
        )
        samples = metrics(generate_latest(registryFor(stats)).decode())
        self.assertEqual(
            samples["mailproxy_limits_reached_total", (("limit", "error limit"),)], 1
        )
        self.assertEqual(
            samples["mailproxy_limits_reached_total", (("limit", "data rate"),)], 0
        )
        html = render(page(stats.snapshot(), "proxy.test", 10)).decode()
        self.assertIn('id="total-limits-reached" class="n">1<', html)


class LoopbackTests(ProxyTestCase):
    """
    Back-pressure and fairness over real loopback sockets: the proxy, the stand-in MTA and
    the clients in this process, on one reactor.
    """

    def proxy(self, **limits: int) -> tuple[int, RelayFactory]:
        """Start the proxy with these C{[limits]}; its port and factory (its sessions)."""
        port = self.proxyWith(**limits)
        return port, self.factory

    def noops(self) -> int:
        """NOOPs the MTA received so far, on every connection."""
        return sum(bytes(t).count(b"NOOP\r\n") for t in self.mta.transcripts)

    async def settled(self, count: Callable[[], int]) -> int:
        """C{count()} once it has stopped growing for ten polls 50 ms apart."""
        last, still = -1, 0
        for _ in range(400):
            now = count()
            still = still + 1 if now == last else 0
            if still >= 10:
                return now
            last = now
            await deferLater(reactor, 0.05)
        raise AssertionError(f"still growing: {now}")

    def test_clientThatNeverReads(self) -> None:
        """
        A client that pipelines 20,000 NOOPs and never reads the replies: the proxy stops
        reading it once the replies it has not read fill reply_buffer and the sockets'
        buffers, so the MTA receives a bounded number of the NOOPs while it does not
        read; once it reads, everything flows again and every NOOP gets its reply.
        """
        total = 20_000

        async def go() -> None:
            port, factory = self.proxy(commands=10**6, replyBuffer=4096)
            client = await self.connect(port)
            assert client.transport is not None
            client.transport.pauseProducing()  # type: ignore[attr-defined]
            handle = client.transport.getHandle()  # type: ignore[attr-defined]
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            [session] = factory.sessions
            assert session.transport is not None
            proxySide = session.transport.getHandle()  # type: ignore[attr-defined]
            proxySide.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            client.send(b"EHLO client.example\r\n" + b"NOOP\r\n" * total)
            stalled = await self.settled(self.noops)
            # What can be owed: the kernel's buffers both ways, the transport's
            # reply_buffer, the commands in flight (MAX_PENDING) and a turn's share.
            kernel = handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            kernel += proxySide.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            bound = (kernel + 64 * 1024 + 4096) // len(b"250 2.0.0 Ok\r\n")
            bound += core.MAX_PENDING + 2 * Limits().commandsPerTurn
            self.assertLess(stalled, bound)
            self.assertLess(stalled, total // 4)
            self.assertNotIn(session.transport, reactor.getReaders())
            client.transport.resumeProducing()  # type: ignore[attr-defined]
            replies = await client.expect(total + 2)
            self.assertEqual({r.code for r in replies[2:]}, {250})
            self.assertEqual(self.noops(), total)

        return defer.Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_floodDoesNotStarve(self) -> None:
        """
        One client floods 20,000 pipelined NOOPs to the fast in-process MTA; another,
        connecting once the flood's first replies are in, does a whole short session (a
        message delivered): it is done before the flood is. In no reactor turn does the
        flooder's session handle more than its share (commands_per_turn, once for the
        bytes read and once for the later turn it asked for).
        """
        total = 20_000
        share = Limits().commandsPerTurn

        async def go() -> None:
            port, factory = self.proxy(commands=10**6)
            flooder = await self.connect(port)
            [session] = factory.sessions
            perTurn: list[int] = []
            last = [session.machine.commandsHandled]

            def tick() -> None:
                handled = session.machine.commandsHandled
                perTurn.append(handled - last[0])
                last[0] = handled
                if handled < total + 1:
                    ticking[0] = reactor.callLater(0, tick)  # once per reactor turn

            ticking = [reactor.callLater(0, tick)]
            self.addCleanup(lambda: ticking[0].active() and ticking[0].cancel())
            flooder.send(b"EHLO flood.example\r\n" + b"NOOP\r\n" * total)
            await flooder.expect(1000)
            other = await self.connect(port)
            other.send(b"EHLO other.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            await other.expect(5)
            other.send(b"Subject: fair\r\n\r\nhello\r\n.\r\nQUIT\r\n")
            await other.lost
            floodDone = len(flooder.replies)
            self.assertEqual(other.codes, [220, 250, 250, 250, 354, 250, 221])
            self.assertLess(floodDone, total // 2)
            await flooder.expect(total + 2)
            self.assertLessEqual(max(perTurn), 2 * share)
            self.assertEqual(sum(perTurn), total + 1)
            self.assertEqual([m.content for m in self.mta.messages], [b"Subject: fair\r\n\r\nhello\r\n"])
            self.assertEqual(self.noops(), total)
            self.assertEqual(os.listdir(self.spool), [])

        return defer.Deferred.fromCoroutine(go())  # type: ignore[return-value]
