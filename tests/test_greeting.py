"""
The greeting: the early-talker check and the delay before the banner, the MTA's banner
timeout, mailproxy's own banner (C{proxy.greeting = "own"}, postscreen's model: no MTA leg
until EHLO), and the start-up probe of the upstream. The session core with events and
effects; then client, proxy and MTA in memory (iosim, a Clock); then real loopback sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy import testing, upstream
from mailproxy.config import Config, Greeting, Timeouts
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.service import ProxyService
from mailproxy.testing import MemoryEndpoint, RawClient, ScriptedMTA
from mailproxy.wire import Reply
from tests.fakes import ProxyTestCase
from tests.test_contract import refusingMessages
from tests.test_proxyprotocol import v2
from tests.test_relay import MESSAGE, STUFFED, Harness, envelope
from tests.test_session import CONFIG, visible
from tests.test_session_deploy import INTRODUCE, ehloReply, logged, sent, told

OWN = attrs.evolve(CONFIG, greeting=Greeting.OWN)
EARLY = b"554 5.5.0 Error: talking before the greeting\r\n"
UNAVAILABLE = b"421 4.3.2 proxy.test Service not available, try again later\r\n"
BANNER = Reply(220, (b"mta.test ESMTP",))
HAPROXY = "haproxy:tcp:0:interface=127.0.0.1"
PLAIN = core.Policy()


def machine(
    config: Config = CONFIG, policy: core.Policy = PLAIN, **timeouts: float
) -> core.Session:
    if timeouts:
        config = attrs.evolve(config, timeouts=attrs.evolve(Timeouts(), **timeouts))
    return core.Session(config, SessionInfo("S1", "192.0.2.7", 40000), policy=policy)


def early(by: str = "early talker") -> core.Refused:
    return core.Refused(Stage.CONNECT, Reply(554, (EARLY[4:-2],)), None, by)


class EarlyTalkerTests(SynchronousTestCase):
    """Any byte before the banner is written: 554 5.5.0 and close, whatever the state."""

    def test_whileConnectFiltersDecide(self) -> None:
        """
        Before the connect filters decided: 554 5.5.0, the check is let go, and its late
        verdict connects nothing.
        """
        s = machine()
        s.start()
        effects = s.clientData(b"EHLO early.example\r\n")
        self.assertEqual(
            visible(effects),
            [early(), core.CancelCheck(), core.SendClient(EARLY), core.CloseClient()],
        )
        self.assertIn(
            "early talker: [192.0.2.7] sent 20 bytes before the greeting: EHLO", logged(effects)
        )
        self.assertEqual(visible(s.verdict(Stage.CONNECT, Verdict.accept())), [])

    def test_whileConnecting(self) -> None:
        """While the MTA leg is being made: the connection attempt is cancelled."""
        s = machine()
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        self.assertEqual(
            visible(s.clientData(b"x")),
            [early(), core.CancelConnect(), core.SendClient(EARLY), core.CloseClient()],
        )
        self.assertNotIn(core.CancelConnect(), s.clientLost())

    def test_beforeTheMtasBanner(self) -> None:
        """
        Connected to the MTA, its banner not in: the MTA leg is closed without a QUIT (which
        would be early talk at the MTA) and nothing of the client's reaches it.
        """
        s = machine()
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.mtaConnected()
        effects = s.clientData(b"EHLO early.example\r\nMAIL FROM:<a@b>\r\n")
        self.assertEqual(
            visible(effects),
            [early(), core.CloseMta(quit=False), core.SendClient(EARLY), core.CloseClient()],
        )
        self.assertEqual(visible(s.mtaReply(BANNER)), [])

    def test_afterTheBannerServed(self) -> None:
        """Bytes after the banner was written are commands, as always."""
        s = machine()
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.mtaConnected()
        self.assertEqual(told(s.mtaReply(BANNER)), b"220 mta.test ESMTP\r\n")
        self.assertEqual(
            visible(s.clientData(b"EHLO c.example\r\n")), [core.RunCheck(Stage.HELO, s.info)]
        )

    def test_implicitTls(self) -> None:
        """
        On a listen_tls listener the TLS handshake is no early talk; SMTP bytes after it,
        before the banner, are.
        """
        s = machine()
        self.assertEqual(visible(s.start(implicitTls=True)), [])
        self.assertEqual(
            visible(s.tlsStarted("TLSv1.3", "TLS_AES_128_GCM_SHA256"))[-1],
            core.RunCheck(Stage.CONNECT, s.info),
        )
        effects = visible(s.clientData(b"EHLO c.example\r\n"))
        self.assertEqual(effects[0], early())
        self.assertEqual(effects[-2:], [core.SendClient(EARLY), core.CloseClient()])

    def test_ownBanner(self) -> None:
        """With greeting = "own", before our 220 (the connect filters deciding): 554 too."""
        s = machine(OWN)
        s.start()
        self.assertEqual(told(s.clientData(b"QUIT\r\n")), EARLY)


class GreetingDelayTests(SynchronousTestCase):
    """C{timeouts.greeting_delay}: the banner waits for it, in both greeting modes."""

    def test_mtaConnectedAfterTheDelay(self) -> None:
        """
        greeting = "mta": the delay runs while the connect filters decide, and the MTA is
        connected only once both are done: an early talker never touches it.
        """
        s = machine(greetingDelay=6.0)
        effects = s.start()
        self.assertIn(core.StartTimer(core.Timer.GREETING_DELAY, 6.0), effects)
        self.assertEqual(visible(s.verdict(Stage.CONNECT, Verdict.accept())), [])
        self.assertIs(s.state, core.State.PREGREET)
        self.assertEqual(visible(s.timerFired(core.Timer.GREETING_DELAY)), [core.ConnectMta()])
        s.mtaConnected()
        self.assertEqual(told(s.mtaReply(BANNER)), b"220 mta.test ESMTP\r\n")

    def test_filtersSlowerThanTheDelay(self) -> None:
        """Connect filters that take longer than the delay: the banner follows them."""
        s = machine(greetingDelay=1.0)
        s.start()
        self.assertEqual(visible(s.timerFired(core.Timer.GREETING_DELAY)), [])
        self.assertEqual(visible(s.verdict(Stage.CONNECT, Verdict.accept())), [core.ConnectMta()])

    def test_earlyTalkerDuringTheDelay(self) -> None:
        """A client that talks during the delay gets 554 5.5.0; the MTA is never connected."""
        s = machine(greetingDelay=6.0)
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        self.assertEqual(
            visible(s.clientData(b"EHLO x\r\n")),
            [early(), core.SendClient(EARLY), core.CloseClient()],
        )
        self.assertEqual(visible(s.timerFired(core.Timer.GREETING_DELAY)), [])

    def test_ownBannerAfterTheDelay(self) -> None:
        """greeting = "own": our 220 once the delay is over."""
        s = machine(OWN, greetingDelay=2.0)
        s.start()
        self.assertEqual(told(s.verdict(Stage.CONNECT, Verdict.accept())), b"")
        self.assertEqual(told(s.timerFired(core.Timer.GREETING_DELAY)), b"220 proxy.test ESMTP\r\n")

    def test_implicitTlsDelayAfterHandshake(self) -> None:
        """On a listen_tls listener the delay starts once TLS is up, not at the TCP connect."""
        s = machine(greetingDelay=3.0)
        self.assertNotIn(core.StartTimer(core.Timer.GREETING_DELAY, 3.0), s.start(implicitTls=True))
        self.assertIn(core.StartTimer(core.Timer.GREETING_DELAY, 3.0), s.tlsStarted("TLSv1.3", "x"))

    def test_drainDuringTheDelay(self) -> None:
        """A shutdown during the delay: 421 4.3.2 at once."""
        s = machine(greetingDelay=3.0)
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        self.assertEqual(told(s.drain()), b"421 4.3.2 proxy.test Service shutting down\r\n")


class MtaBannerTimeoutTests(SynchronousTestCase):
    """C{timeouts.mta_banner}: an MTA that accepts the connection and never greets."""

    def test_mtaGreeting(self) -> None:
        """
        greeting = "mta": the banner is timed by mta_banner, not mta_reply; when it runs
        out the client gets 421 4.3.2, the MTA leg is dropped, and it counts as an MTA error
        of kind "banner".
        """
        s = machine(mtaBanner=30.0)
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        effects = s.mtaConnected()
        self.assertEqual(
            effects[-2:],
            [core.CancelTimer(core.Timer.MTA_REPLY), core.StartTimer(core.Timer.MTA_BANNER, 30.0)],
        )
        effects = s.timerFired(core.Timer.MTA_BANNER)
        self.assertEqual(
            visible(effects),
            [
                core.MtaError("banner"),
                core.Refused(Stage.CONNECT, Reply(421, (UNAVAILABLE[4:-2],)), None, "mta down"),
                core.AbortMta(),
                core.SendClient(UNAVAILABLE),
                core.CloseClient(),
            ],
        )
        self.assertIn("the MTA did not greet within 30.0 s (timeouts.mta_banner)", logged(effects))

    def test_bannerInTime(self) -> None:
        """A banner in time stops the timer; a late timer event changes nothing."""
        s = machine()
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.mtaConnected()
        effects = s.mtaReply(BANNER)
        self.assertIn(core.CancelTimer(core.Timer.MTA_BANNER), effects)
        self.assertEqual(visible(s.timerFired(core.Timer.MTA_BANNER)), [])
        self.assertIs(s.state, core.State.COMMAND)

    def test_ownGreeting(self) -> None:
        """greeting = "own": the client's EHLO gets the 421 4.3.2."""
        s = machine(OWN)
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.clientData(b"EHLO c.example\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        s.mtaConnected()
        effects = s.timerFired(core.Timer.MTA_BANNER)
        self.assertEqual(told(effects), UNAVAILABLE)
        self.assertIn(
            core.Refused(Stage.HELO, Reply(421, (UNAVAILABLE[4:-2],)), None, "mta down"), effects
        )
        self.assertEqual(sent(effects), b"")


class OwnGreetingTests(SynchronousTestCase):
    """C{greeting = "own"}: our 220, and no MTA leg until an EHLO or HELO passed the filters."""

    def greeted(self, policy: core.Policy = PLAIN) -> tuple[core.Session, list[core.Effect]]:
        s = machine(OWN, policy)
        effects = s.start()
        effects += s.verdict(Stage.CONNECT, Verdict.accept())
        return s, effects

    def test_ourBanner(self) -> None:
        """Our banner, counted as an accepted connection; no MTA connection."""
        s, effects = self.greeted()
        self.assertEqual(
            visible(effects),
            [
                core.RunCheck(Stage.CONNECT, s.info),
                core.Report(core.Counted.CONNECTION_ACCEPTED),
                core.SendClient(b"220 proxy.test ESMTP\r\n"),
            ],
        )

    def test_answeredWithoutMta(self) -> None:
        """
        Before EHLO mailproxy answers what would go to the MTA: NOOP and RSET 250, HELP,
        VRFY and EXPN 503 (as before the introduction with greeting = "mta"), MAIL 503,
        RCPT and DATA 503, QUIT 221 and close; no MTA leg is ever made.
        """
        s, _ = self.greeted()
        effects = s.clientData(
            b"NOOP\r\nRSET\r\nHELP\r\nVRFY a\r\nEXPN a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
            b"DATA\r\nRSET x\r\nQUIT\r\n"
        )
        self.assertEqual(
            told(effects),
            b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
            b"503 5.5.1 Error: send HELO/EHLO first\r\n503 5.5.1 Error: send HELO/EHLO first\r\n"
            b"503 5.5.1 Error: send HELO/EHLO first\r\n"
            b"503 5.5.1 Error: send HELO/EHLO first\r\n503 5.5.1 Error: need MAIL command\r\n"
            b"503 5.5.1 Error: need MAIL command\r\n"
            b"501 5.5.4 Syntax error: no arguments allowed\r\n221 2.0.0 Bye\r\n",
        )
        self.assertIn(core.CloseClient(), effects)
        self.assertNotIn(core.ConnectMta(), effects)
        self.assertEqual(sent(effects), b"")

    def test_legAtEhlo(self) -> None:
        """
        The client's EHLO, once the HELO filters passed it, makes the MTA leg: the MTA's
        banner is hidden, the EHLO goes to it, and its answer (edited) is the client's.
        """
        s, _ = self.greeted()
        self.assertEqual(
            visible(s.clientData(b"EHLO c.example\r\n")), [core.RunCheck(Stage.HELO, s.info)]
        )
        self.assertEqual(visible(s.verdict(Stage.HELO, Verdict.accept())), [core.ConnectMta()])
        self.assertIn(core.StartTimer(core.Timer.MTA_BANNER, 30.0), s.mtaConnected())
        effects = s.mtaReply(BANNER)
        self.assertEqual((told(effects), sent(effects)), (b"", b"EHLO c.example\r\n"))
        effects = s.mtaReply(ehloReply())
        self.assertEqual(
            told(effects),
            b"250-mta.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n"
            b"250 CHUNKING\r\n",
        )
        s.clientData(b"MAIL FROM:<a@b>\r\n")
        self.assertEqual(sent(s.verdict(Stage.MAIL, Verdict.accept())), b"MAIL FROM:<a@b>\r\n")

    def test_pipelinedBehindEhlo(self) -> None:
        """Commands pipelined behind the EHLO wait for the new leg, then go in order."""
        s, _ = self.greeted()
        s.clientData(b"EHLO c.example\r\nMAIL FROM:<a@b>\r\nNOOP\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        s.mtaConnected()
        s.mtaReply(BANNER)
        effects = s.mtaReply(ehloReply())
        effects += s.verdict(Stage.MAIL, Verdict.accept())
        self.assertEqual(sent(effects), b"MAIL FROM:<a@b>\r\nNOOP\r\n")

    def test_heloRefusedNoMta(self) -> None:
        """An EHLO the HELO filters refuse makes no MTA leg; a later one does."""
        s, _ = self.greeted()
        s.clientData(b"EHLO bad.example\r\n")
        effects = s.verdict(Stage.HELO, Verdict.reject("bad HELO", 550, "5.7.1"))
        self.assertEqual(told(effects), b"550 5.7.1 bad HELO\r\n")
        self.assertNotIn(core.ConnectMta(), effects)
        s.clientData(b"HELO good.example\r\n")
        self.assertEqual(visible(s.verdict(Stage.HELO, Verdict.accept())), [core.ConnectMta()])

    def test_mtaRefusesInItsBanner(self) -> None:
        """A refusal for a banner (554, 421) is the answer to the EHLO; then closed."""
        s, _ = self.greeted()
        s.clientData(b"EHLO c.example\r\nMAIL FROM:<a@b>\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        s.mtaConnected()
        effects = s.mtaReply(Reply(554, (b"5.3.2 mta.test too busy",)))
        self.assertEqual(told(effects), b"554 5.3.2 mta.test too busy\r\n")
        self.assertEqual(sent(effects), b"")
        self.assertIn(
            core.Refused(Stage.HELO, Reply(554, (b"5.3.2 mta.test too busy",)), None, "mta"),
            effects,
        )
        self.assertIn(core.CloseClient(), effects)

    def test_mtaUnreachableAtEhlo(self) -> None:
        """An MTA that cannot be reached at EHLO time: 421 4.3.2 to the EHLO, and closed."""
        s, _ = self.greeted()
        s.clientData(b"EHLO c.example\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        effects = s.mtaUnreachable("Connection refused")
        self.assertEqual(told(effects), UNAVAILABLE)
        self.assertIn(core.MtaError("unreachable"), effects)
        self.assertIn(
            core.Refused(Stage.HELO, Reply(421, (UNAVAILABLE[4:-2],)), None, "mta down"), effects
        )
        self.assertIn(core.CloseClient(), effects)

    def test_clientGoneWhileConnecting(self) -> None:
        """The client leaves while the leg is being made: the connection attempt is cancelled."""
        s, _ = self.greeted()
        s.clientData(b"EHLO c.example\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        self.assertIn(core.CancelConnect(), s.clientLost())

    def test_xclient(self) -> None:
        """The leg is introduced as with greeting = "mta": XCLIENT, then the client's EHLO."""
        s, _ = self.greeted(INTRODUCE)
        s.clientData(b"EHLO c.example\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        s.mtaConnected()
        self.assertEqual(sent(s.mtaReply(BANNER)), b"EHLO c.example\r\n")
        s.mtaReply(ehloReply(b"XCLIENT ADDR NAME PORT REVERSE_NAME"))
        effects = s.clientNamed("c.example", "c.example")
        self.assertEqual(
            sent(effects),
            b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=c.example REVERSE_NAME=c.example\r\n",
        )
        self.assertEqual(sent(s.mtaReply(BANNER)), b"EHLO c.example\r\n")
        self.assertIn(b"250 STARTTLS\r\n", told(s.mtaReply(ehloReply())))

    def test_starttlsBeforeEhlo(self) -> None:
        """STARTTLS before EHLO is ours alone: TLS with the client, still no MTA leg."""
        s, _ = self.greeted(core.Policy(startTls=True))
        effects = s.clientData(b"STARTTLS\r\n")
        self.assertEqual(told(effects), b"220 2.0.0 Ready to start TLS\r\n")
        effects = s.tlsStarted("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        effects += s.clientData(b"NOOP\r\n")
        self.assertEqual(told(effects), b"250 2.0.0 Ok\r\n")
        self.assertNotIn(core.ConnectMta(), effects)


def stats(h: Harness) -> dict[str, object]:
    today: dict[str, object] = h.memory.factory.stats.snapshot()["today"]
    return today


class _Silent(Protocol):
    """An MTA that accepts the connection and never says a word (its processes all busy)."""


def silentMta() -> ServerFactory:
    return ServerFactory.forProtocol(_Silent)


class SilentMTA:
    """For L{Harness}: an MTA whose every connection stays silent."""

    def buildFactory(self) -> ServerFactory:
        return silentMta()


class InMemoryTests(SynchronousTestCase):
    """Client, proxy and MTA in memory: the replies the client saw, what the MTA received."""

    def test_idleClientsHoldNoMta(self) -> None:
        """
        greeting = "own": idle clients get our 220 and the MTA never hears of them (its
        factory builds no protocol); one that says EHLO is served, through one MTA leg.
        """
        h = Harness(self, greeting=Greeting.OWN, limits={"connectionsPerClient": 30})
        idle = [h.connect() for _ in range(20)]
        self.assertEqual([c.received for c in idle], [bytearray(b"220 proxy.test ESMTP\r\n")] * 20)
        self.assertEqual((h.mta.transcripts, h.memory.endpoint.pumps), ([], []))
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
        [transcript] = h.mta.transcripts
        self.assertTrue(
            bytes(transcript).startswith(b"EHLO client.example\r\nMAIL FROM:"), transcript
        )
        self.assertEqual(len(h.mta.messages), 1)
        self.assertEqual(stats(h)["connections"], {"opened": 21, "accepted": 21, "refused": {}})

    def test_mtaGreetingUnchanged(self) -> None:
        """greeting = "mta" (the default): every client has its MTA leg from the start."""
        h = Harness(self)
        for _ in range(3):
            self.assertEqual(h.connect().codes, [220])
        self.assertEqual(len(h.mta.transcripts), 3)

    def test_reconnectsKeepWorking(self) -> None:
        """
        greeting = "own" past mta_junk_commands: a refusal is followed by a fresh MTA leg
        (its banner hidden, the EHLO replayed) and the session goes on.
        """
        policy = refusingMessages()
        h = Harness(
            self, policy, mta=ScriptedMTA(), greeting=Greeting.OWN, limits={"mtaJunkCommands": 3}
        )
        client = h.greeted()
        for _ in range(4):
            h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes.count(550), 4)
        self.assertEqual(h.mta.connections, 2)
        policy.verdicts[Stage.MESSAGE] = Verdict.accept()
        h.send(client, envelope() + b"DATA\r\n" + STUFFED)
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(client.replies[0].lines, (b"proxy.test ESMTP",))
        self.assertNotIn(b"ESMTP", bytes(client.received)[22:])  # the MTA's banners: hidden

    def test_unreachableAtEhlo(self) -> None:
        """greeting = "own", the MTA down: our 220, then 421 4.3.2 to the EHLO, closed."""
        h = Harness(self, greeting=Greeting.OWN)
        h.memory.endpoint.refuse = True
        client = h.greeted()
        self.assertEqual(client.received, b"220 proxy.test ESMTP\r\n" + UNAVAILABLE)
        self.assertFalse(client.connected)
        self.assertEqual(stats(h)["mta_errors"]["unreachable"], 1)  # type: ignore[index]

    def test_earlyTalker(self) -> None:
        """
        A client that talks during greeting_delay gets 554 5.5.0 and is closed; the MTA
        never hears of it; it is counted as a connection refused ("early talker").
        """
        h = Harness(self, timeouts={"greetingDelay": 5.0})
        client = h.connect()
        self.assertEqual(client.received, b"")
        h.send(client, b"EHLO early.example\r\n")
        self.assertEqual(client.received, EARLY)
        self.assertFalse(client.connected)
        h.clock.advance(5)
        h.memory.flush()
        self.assertEqual(h.mta.transcripts, [])
        self.assertEqual(stats(h)["connections"]["refused"], {"early talker": 1})  # type: ignore[index]

    def test_greetingDelay(self) -> None:
        """A client that waits out greeting_delay gets the banner then, and is served."""
        for greeting in Greeting:
            h = Harness(self, timeouts={"greetingDelay": 5.0}, greeting=greeting)
            client = h.connect()
            h.clock.advance(4.9)
            h.memory.flush()
            self.assertEqual(client.codes, [])
            h.clock.advance(0.1)
            h.memory.flush()
            self.assertEqual(client.codes, [220])
            h.send(client, b"EHLO c.example\r\n" + envelope() + b"DATA\r\n" + STUFFED)
            self.assertEqual(client.codes[-1], 250, greeting)

    def test_mtaBannerTimeout(self) -> None:
        """
        An MTA that accepts the connection and never greets: after mta_banner (not
        mta_reply) the client gets 421 4.3.2, counted as an MTA error "banner".
        """
        h = Harness(self, mta=SilentMTA(), timeouts={"mtaBanner": 30.0})
        client = h.connect()
        h.clock.advance(29)
        h.memory.flush()
        self.assertEqual(client.codes, [])
        h.clock.advance(1)
        h.memory.flush()
        self.assertEqual(client.received, UNAVAILABLE)
        self.assertFalse(client.connected)
        self.assertEqual(stats(h)["mta_errors"]["banner"], 1)  # type: ignore[index]

    def test_mtaBannerTimeoutOwn(self) -> None:
        """greeting = "own": the EHLO gets the 421 4.3.2 when the MTA does not greet."""
        h = Harness(self, mta=SilentMTA(), greeting=Greeting.OWN, timeouts={"mtaBanner": 2.0})
        client = h.greeted()
        h.clock.advance(2)
        h.memory.flush()
        self.assertEqual(client.received, b"220 proxy.test ESMTP\r\n" + UNAVAILABLE)


class ProbeTests(SynchronousTestCase):
    """The start-up probe, in memory."""

    def test_banner(self) -> None:
        """It reads the banner, says QUIT and hangs up."""
        clock = Clock()
        mta = ScriptedMTA()
        endpoint = MemoryEndpoint(mta.buildFactory(), clock)
        d = upstream.probe(endpoint, clock, 30.0)
        [pump] = endpoint.pumps
        pump.flush()
        self.assertEqual(self.successResultOf(d), Reply(220, (b"mta.test ESMTP",)))
        self.assertEqual(bytes(mta.received), b"QUIT\r\n")
        self.assertEqual(mta.lost, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refused(self) -> None:
        """Nothing listening: the failure says so."""
        clock = Clock()
        endpoint = MemoryEndpoint(ScriptedMTA().buildFactory(), clock)
        endpoint.refuse = True
        failure = self.failureResultOf(upstream.probe(endpoint, clock, 30.0))
        self.assertEqual(upstream.why(failure, 30.0), "Connection refused")

    def test_silent(self) -> None:
        """An MTA that never greets: given up after the timeout, the connection dropped."""
        clock = Clock()
        endpoint = MemoryEndpoint(silentMta(), clock)
        d = upstream.probe(endpoint, clock, 30.0)
        clock.advance(30)
        failure = self.failureResultOf(d)
        self.assertEqual(
            upstream.why(failure, 30.0), "no banner within 30 s (timeouts.mta_connect)"
        )
        [pump] = endpoint.pumps
        self.assertTrue(pump.clientIO.disconnecting)


class LoopbackTests(ProxyTestCase):
    """Over real loopback sockets, the service as twistd builds it."""

    def start(
        self, extra: str = "", probe: bool = False, listen: str | None = None
    ) -> ProxyService:
        more = {} if listen is None else {"listen": listen}
        config = testing.loopbackConfig(self.mtaPort, self.spool, extra, **more)
        service, self.port = testing.startProxy(self, config, probe=probe)
        return service

    async def client(self, port: int) -> RawClient:
        """A client connected, that has not read the banner."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport and client.transport.loseConnection())
        return client

    async def waitLogged(self, text: str) -> str:
        for _ in range(500):
            found = self.logged(text)
            if found:
                return found[0]
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"never logged: {text}")

    async def waitFor(self, condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("never came true")

    def test_earlyTalker(self) -> defer.Deferred[None]:
        """Over TCP: EHLO sent at once, during a greeting delay: 554 5.5.0 and closed."""

        async def run() -> None:
            self.start("[timeouts]\ngreeting_delay = 0.5\n")
            client = await self.client(self.port)
            client.send(b"EHLO early.example\r\n")
            await client.lost
            self.assertEqual(client.received, EARLY)
            self.assertEqual(self.mta.transcripts, [])
            self.assertTrue(self.logged("early talker: [127.0.0.1] sent 20 bytes"))

        return defer.Deferred.fromCoroutine(run())

    def test_earlyTalkerBehindProxyHeader(self) -> defer.Deferred[None]:
        """
        On a haproxy: listener the PROXY header is no early talk (the banner follows it);
        SMTP behind it in the same packet, before the banner, is.
        """

        async def run() -> None:
            self.start("[timeouts]\ngreeting_delay = 0.2\n", listen=HAPROXY)
            client = await self.client(self.port)
            client.send(v2(("198.51.100.7", 40000)))
            await client.expect(1)
            self.assertEqual(client.codes, [220])
            client.send(b"QUIT\r\n")
            await client.lost
            early = await self.client(self.port)
            early.send(v2(("198.51.100.8", 40000)) + b"EHLO x\r\n")
            await early.lost
            self.assertEqual(early.received, EARLY)
            self.assertTrue(self.logged("early talker: [198.51.100.8]"))

        return defer.Deferred.fromCoroutine(run())

    def test_ownGreeting(self) -> defer.Deferred[None]:
        """
        greeting = "own" over TCP: idle clients hold no MTA connection (the MTA records
        none); one that says EHLO is served.
        """

        async def run() -> None:
            self.start('greeting = "own"\n')
            for _ in range(10):
                idle = await self.connect(self.port)
                self.assertEqual(idle.received, b"220 proxy.test ESMTP\r\n")
            self.assertEqual(self.mta.transcripts, [])
            client = await self.connect(self.port)
            client.send(b"EHLO c.example\r\n" + envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
            await client.lost
            self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
            self.assertEqual(len(self.mta.transcripts), 1)
            self.assertEqual([m.content for m in self.mta.messages], [MESSAGE])

        return defer.Deferred.fromCoroutine(run())

    def test_probeAnswering(self) -> defer.Deferred[None]:
        """At start-up the upstream is probed: banner read, QUIT, an info line."""

        async def run() -> None:
            self.start(probe=True)
            line = await self.waitLogged("is answering")
            self.assertRegex(
                line, rf"^upstream tcp:host=127.0.0.1:port={self.mtaPort} is answering: 220 "
            )
            await self.waitFor(lambda: self.mta.transcripts == [bytearray(b"QUIT\r\n")])

        return defer.Deferred.fromCoroutine(run())

    def test_probeDown(self) -> defer.Deferred[None]:
        """
        The upstream down at start-up: a warning names it and what clients get; the
        service is up all the same, and answers clients 421 4.3.2.
        """

        async def run() -> None:
            self.mtaPort = self.deadPort()
            self.start(probe=True)
            line = await self.waitLogged("is not answering")
            self.assertEqual(
                line,
                f"upstream tcp:host=127.0.0.1:port={self.mtaPort} is not answering: Connection "
                "refused; clients will get 421 4.3.2 until it is",
            )
            [event] = [e for e in self.events if "is not answering" in formatEvent(e)]
            self.assertEqual(event["log_level"], LogLevel.warn)
            client = await self.connect(self.port)
            self.assertEqual(client.codes, [421])

        return defer.Deferred.fromCoroutine(run())

    def test_probeAfterReload(self) -> defer.Deferred[None]:
        """A reload that changes the upstream probes the new one; one that does not, nothing."""

        async def run() -> None:
            service = self.start(probe=True)
            await self.waitLogged("is answering")
            self.assertTrue(service.reload())
            dead = self.deadPort()
            with open(service.config.path) as f:
                text = f.read()
            with open(service.config.path, "w") as f:
                f.write(text.replace(f"port={self.mtaPort}", f"port={dead}"))
            self.assertTrue(service.reload())
            await self.waitLogged(f"upstream tcp:host=127.0.0.1:port={dead} is not answering")
            self.assertEqual(len(self.logged("is answering")), 1)
            await self.waitFor(lambda: self.mta.transcripts == [bytearray(b"QUIT\r\n")])

        return defer.Deferred.fromCoroutine(run())

    def test_probeNot220(self) -> defer.Deferred[None]:
        """An upstream that greets with a refusal: a warning with its banner."""

        async def run() -> None:
            self.mtaPort = self.listenTCP(refusingMta())
            self.start(probe=True)
            line = await self.waitLogged("does not greet with 220")
            self.assertEqual(
                line,
                f"upstream tcp:host=127.0.0.1:port={self.mtaPort} does not greet with 220: "
                "554 5.3.2 busy; clients will be refused until it does",
            )

        return defer.Deferred.fromCoroutine(run())


class _Refusing(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"554 5.3.2 busy\r\n")


def refusingMta() -> ServerFactory:
    return ServerFactory.forProtocol(_Refusing)
