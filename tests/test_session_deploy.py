"""
The session core on port 25: STARTTLS from the client (and the injection it must defeat),
implicit TLS, STARTTLS to the MTA, XCLIENT and XFORWARD, AUTH. Events in, effects out.
"""

from __future__ import annotations

import base64

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply
from tests.test_session import CONFIG, visible

TLS = core.Policy(startTls=True)
BANNER = Reply(220, (b"mta.test ESMTP",))
PLAIN = base64.b64encode(b"\0alice@test.example\0secret")


def ehloReply(*keywords: bytes) -> Reply:
    return Reply(250, (b"mta.test", b"PIPELINING", b"ENHANCEDSTATUSCODES", *keywords))


def sent(effects: list[core.Effect]) -> bytes:
    """What went to the MTA."""
    return b"".join(e.data for e in effects if isinstance(e, core.SendMta))


def told(effects: list[core.Effect]) -> bytes:
    """What went to the client."""
    return b"".join(e.data for e in effects if isinstance(e, core.SendClient))


def logged(effects: list[core.Effect]) -> str:
    return "\n".join(
        e.format.format(session="S1", **e.fields) for e in effects if isinstance(e, core.Log)
    )


EHLO = ehloReply()


class Driven:
    """A session and every effect it produced, for tests that follow one conversation."""

    def __init__(self, policy: core.Policy = TLS, address: str = "192.0.2.7") -> None:
        self.s = core.Session(CONFIG, SessionInfo("S1", address, 40000), policy=policy)
        self.all: list[core.Effect] = []

    def __call__(self, effects: list[core.Effect]) -> list[core.Effect]:
        self.all.extend(effects)
        return effects

    def connect(self, implicitTls: bool = False) -> None:
        self(self.s.start(implicitTls=implicitTls))
        if implicitTls:
            self(self.s.tlsStarted("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
        self(self.s.verdict(Stage.CONNECT, Verdict.accept()))
        self(self.s.mtaConnected())
        self(self.s.mtaReply(BANNER))

    def message(self) -> None:
        """A transaction, up to the message filters' turn."""
        self(self.s.clientData(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"))
        self(self.s.verdict(Stage.MAIL, Verdict.accept()))
        self(self.s.verdict(Stage.RCPT, Verdict.accept()))
        self(self.s.mtaReply(Reply(250, (b"ok",))))
        self(self.s.mtaReply(Reply(250, (b"ok",))))
        self(self.s.clientData(b"DATA\r\n"))
        self(self.s.spoolOpened())
        self(self.s.clientData(b"Subject: x\r\n\r\nhi\r\n.\r\n"))
        self(self.s.spoolClosed())

    def ehlo(self, reply: Reply = EHLO) -> list[core.Effect]:
        effects = self(self.s.clientData(b"EHLO client.example\r\n"))
        effects += self(self.s.verdict(Stage.HELO, Verdict.accept()))
        return effects + self(self.s.mtaReply(reply))


class StartTlsTests(SynchronousTestCase):
    def test_offeredWithCertificate(self) -> None:
        """STARTTLS is offered when a certificate is loaded, and never the MTA's own."""
        d = Driven()
        d.connect()
        self.assertIn(b"250 STARTTLS\r\n", told(d.ehlo(ehloReply(b"STARTTLS"))))
        d = Driven(core.Policy())
        d.connect()
        effects = d.ehlo(ehloReply(b"STARTTLS"))
        self.assertNotIn(b"STARTTLS", told(effects))
        effects = d(d.s.clientData(b"STARTTLS\r\n"))
        self.assertEqual(told(effects), b"502 5.5.1 Error: command not implemented\r\n")

    def test_injectionDiscarded(self) -> None:
        """
        CVE-2011-0411: what the client pipelined behind STARTTLS came in cleartext; it is
        never answered nor relayed, before or after the handshake.
        """
        d = Driven()
        d.connect()
        d.ehlo()
        effects = d(d.s.clientData(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@x>\r\n"))
        self.assertEqual(
            visible(effects),
            [core.SendClient(b"220 2.0.0 Ready to start TLS\r\n"), core.StartTls()],
        )
        self.assertIn("discarded 26 bytes", logged(effects))
        # Cleartext arriving before the TLS layer took over is dropped too.
        self.assertEqual(visible(d(d.s.clientData(b"RSET\r\n"))), [])
        effects = d(d.s.tlsStarted("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
        self.assertEqual(told(effects) + sent(effects), b"")
        self.assertNotIn(b"RSET", sent(d.all))
        self.assertEqual(d.s.info.tls, ("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
        self.assertIn(core.TlsEstablished("client", "TLSv1.3", "TLS_AES_128_GCM_SHA256"), effects)

    def test_ehloAgainAfterTls(self) -> None:
        """After the handshake the session starts over: MAIL needs a new EHLO (RFC 3207)."""
        d = Driven()
        d.connect()
        d.ehlo()
        d(d.s.clientData(b"STARTTLS\r\n"))
        d(d.s.tlsStarted("TLSv1.3", "X"))
        effects = d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        self.assertEqual(told(effects), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        effects = d.ehlo()
        self.assertEqual(sent(effects), b"EHLO client.example\r\n")
        self.assertNotIn(b"STARTTLS", told(effects))
        self.assertEqual(d.s.info.helo, "client.example")

    def test_starttlsWaitsForEarlierReplies(self) -> None:
        """A STARTTLS pipelined behind a NOOP: its 220 comes after the NOOP's reply."""
        d = Driven()
        d.connect()
        d.ehlo()
        effects = d(d.s.clientData(b"NOOP\r\nSTARTTLS\r\n"))
        self.assertEqual(sent(effects), b"NOOP\r\n")
        self.assertNotIn(core.StartTls(), effects)
        effects = d(d.s.mtaReply(Reply(250, (b"2.0.0 Ok",))))
        self.assertEqual(
            visible(effects),
            [
                core.SendClient(b"250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"),
                core.StartTls(),
            ],
        )

    def test_notInTransaction(self) -> None:
        d = Driven()
        d.connect()
        d.ehlo()
        d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        d(d.s.verdict(Stage.MAIL, Verdict.accept()))
        d(d.s.mtaReply(Reply(250, (b"2.1.0 Ok",))))
        effects = d(d.s.clientData(b"STARTTLS\r\n"))
        self.assertEqual(told(effects), b"503 5.5.1 Error: MAIL transaction in progress\r\n")

    def test_implicitTls(self) -> None:
        """On a TLS listener nothing happens before the handshake; then the session starts."""
        d = Driven()
        effects = d(d.s.start(implicitTls=True))
        self.assertEqual(visible(effects), [])
        self.assertIs(d.s.state, core.State.TLS_HANDSHAKE)
        effects = d(d.s.tlsStarted("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384"))
        self.assertIn(core.RunCheck(Stage.CONNECT, d.s.info), effects)
        d(d.s.verdict(Stage.CONNECT, Verdict.accept()))
        d(d.s.mtaConnected())
        d(d.s.mtaReply(BANNER))
        effects = d.ehlo()
        self.assertNotIn(b"STARTTLS", told(effects))
        effects = d(d.s.clientData(b"STARTTLS\r\n"))
        self.assertEqual(told(effects), b"503 5.5.1 Error: TLS already active\r\n")

    def test_requireTls(self) -> None:
        d = Driven(attrs.evolve(TLS, requireTls=True))
        d.connect()
        d.ehlo()
        effects = d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        self.assertEqual(told(effects), b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        self.assertEqual(sent(effects), b"")

    def test_traceHeader(self) -> None:
        """A message over TLS is released under our Received: naming the TLS version and cipher."""
        d = Driven()
        d.connect(implicitTls=True)
        d.ehlo()
        d.message()
        d(d.s.verdict(Stage.MESSAGE, Verdict.accept()))
        effects = d(d.s.mtaReply(Reply(354, (b"go",))))
        [release] = [e for e in effects if isinstance(e, core.Release)]
        assert release.trace is not None
        self.assertEqual(
            release.trace.header("Tue, 1 Dec 2026 19:00:00 +0000"),
            (
                "Received",
                "from client.example ([192.0.2.7]) by proxy.test (mailproxy) with ESMTPS "
                "(TLSv1.3:TLS_AES_256_GCM_SHA384) id S1; Tue, 1 Dec 2026 19:00:00 +0000",
            ),
        )


INTRODUCE = core.Policy(startTls=True, introduce=True)


class IntroductionTests(SynchronousTestCase):
    """
    At the client's first EHLO the MTA learns who the client is, before it hears any mail:
    the client's EHLO learns what the MTA offers, then XCLIENT (or XFORWARD before each
    MAIL), hidden from the client.
    """

    XCLIENT = b"XCLIENT ADDR NAME PORT PROTO HELO LOGIN REVERSE_NAME"

    def test_xclient(self) -> None:
        d = Driven(INTRODUCE, address="2001:db8::7")
        d.connect()
        self.assertEqual(told(d.all), b"220 mta.test ESMTP\r\n")
        effects = d.ehlo(ehloReply(self.XCLIENT))
        self.assertEqual(told(effects), b"")
        self.assertIn(core.ResolveClient("2001:db8::7"), effects)
        effects = d(d.s.clientNamed("client.example", "client.example"))
        self.assertEqual(
            sent(effects),
            b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 NAME=client.example "
            b"REVERSE_NAME=client.example\r\n",
        )
        # The MTA starts afresh (its new banner is hidden); then the client's EHLO again.
        effects = d(d.s.mtaReply(Reply(220, (b"mta.test ESMTP",))))
        self.assertEqual((sent(effects), told(effects)), (b"EHLO client.example\r\n", b""))
        effects = d(d.s.mtaReply(ehloReply(self.XCLIENT, b"SIZE 1000")))
        self.assertEqual(
            told(effects),
            b"250-mta.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
            b"250-SIZE 1000\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
        )
        d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        effects = d(d.s.verdict(Stage.MAIL, Verdict.accept()))
        self.assertEqual(sent(effects), b"MAIL FROM:<a@b>\r\n")
        d(d.s.mtaReply(Reply(250, (b"2.1.0 Ok",))))
        # Clients never send XCLIENT or XFORWARD themselves.
        effects = d(d.s.clientData(b"XCLIENT ADDR=127.0.0.1\r\nXFORWARD ADDR=1.2.3.4\r\n"))
        self.assertEqual(sent(effects), b"")
        self.assertEqual(told(effects).count(b"502 5.5.1"), 2)

    def test_nothingRelayedBeforeIntroduction(self) -> None:
        """Before EHLO, nothing reaches an MTA that would take it from mailproxy: VRFY
        gets 503, NOOP our own 250."""
        d = Driven(INTRODUCE)
        d.connect()
        effects = d(d.s.clientData(b"VRFY root\r\nNOOP\r\n"))
        self.assertEqual(
            told(effects), b"503 5.5.1 Error: send HELO/EHLO first\r\n250 2.0.0 Ok\r\n"
        )
        self.assertEqual(sent(d.all), b"")

    def test_xclientRefused(self) -> None:
        """An MTA that offers XCLIENT and refuses it would take mailproxy for the client: 421."""
        d = Driven(INTRODUCE)
        d.connect()
        d.ehlo(ehloReply(b"XCLIENT ADDR NAME"))
        d(d.s.clientNamed("[UNAVAILABLE]", "[UNAVAILABLE]"))
        effects = d(d.s.mtaReply(Reply(550, (b"5.7.0 Error: insufficient authorization",))))
        self.assertEqual(
            told(effects),
            b"421 4.3.0 proxy.test Error: the MTA refused to hear the client, try again later\r\n",
        )
        self.assertIn(core.CloseClient(), effects)
        self.assertIn("smtpd_authorized_xclient_hosts", logged(effects))

    def test_mailNeedsHelo(self) -> None:
        """MAIL before EHLO is refused (RFC 5321 4.1.4)."""
        d = Driven(INTRODUCE)
        d.connect()
        effects = d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        self.assertEqual(told(effects), b"503 5.5.1 Error: send HELO/EHLO first\r\n")

    def test_plainEhloWhenNothingOffered(self) -> None:
        """An MTA with neither XCLIENT nor XFORWARD hears the client's EHLO once, no more
        (OpenSMTPD refuses a second one)."""
        d = Driven(INTRODUCE)
        d.connect()
        effects = d.ehlo()
        self.assertEqual(sent(d.all), b"EHLO client.example\r\n")
        self.assertTrue(told(effects).startswith(b"250-mta.test\r\n"))
        self.assertNotIn(core.ResolveClient("192.0.2.7"), d.all)

    def test_heloAnsweredFromEhlo(self) -> None:
        """
        A HELO client: its name goes as EHLO, to learn of XCLIENT; with nothing to do, the
        MTA heard its greeting and the client gets EHLO's first line, as HELO's answer.
        """
        d = Driven(INTRODUCE)
        d.connect()
        d(d.s.clientData(b"HELO client.example\r\n"))
        effects = d(d.s.verdict(Stage.HELO, Verdict.accept()))
        self.assertEqual(sent(effects), b"EHLO client.example\r\n")
        effects = d(d.s.mtaReply(ehloReply()))
        self.assertEqual(told(effects), b"250 mta.test\r\n")
        d(d.s.clientData(b"MAIL FROM:<a@b> SIZE=10\r\n"))  # no SIZE offered to HELO
        self.assertIn(b"555 Error: unsupported or malformed parameter", told(d.all))
        self.assertEqual(sent(d.all), b"EHLO client.example\r\n")

    def test_heloWithXclient(self) -> None:
        """A HELO client and XCLIENT: after it, the client's own HELO."""
        d = Driven(INTRODUCE)
        d.connect()
        d(d.s.clientData(b"HELO client.example\r\n"))
        d(d.s.verdict(Stage.HELO, Verdict.accept()))
        d(d.s.mtaReply(ehloReply(b"XCLIENT ADDR")))
        effects = d(d.s.clientNamed("[UNAVAILABLE]", "[UNAVAILABLE]"))
        self.assertEqual(sent(effects), b"XCLIENT ADDR=192.0.2.7\r\n")
        effects = d(d.s.mtaReply(BANNER))
        self.assertEqual(sent(effects), b"HELO client.example\r\n")
        effects = d(d.s.mtaReply(Reply(250, (b"mta.test",))))
        self.assertEqual(told(effects), b"250 mta.test\r\n")

    def test_xforward(self) -> None:
        """An MTA with XFORWARD only hears it before each MAIL; its replies stay hidden."""
        d = Driven(attrs.evolve(INTRODUCE, startTls=False))
        d.connect()
        d.ehlo(ehloReply(b"XFORWARD NAME ADDR PORT PROTO HELO SOURCE"))
        effects = d(d.s.clientNamed("client.example", "client.example"))
        self.assertTrue(told(effects).startswith(b"250-mta.test\r\n"))
        d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        effects = d(d.s.verdict(Stage.MAIL, Verdict.accept()))
        self.assertEqual(
            sent(effects),
            b"XFORWARD NAME=client.example ADDR=192.0.2.7 PORT=40000\r\n"
            b"XFORWARD PROTO=ESMTP HELO=client.example SOURCE=REMOTE\r\n"
            b"MAIL FROM:<a@b>\r\n",
        )
        effects = d(d.s.mtaReply(Reply(250, (b"2.0.0 Ok",))))
        effects += d(d.s.mtaReply(Reply(250, (b"2.0.0 Ok",))))
        effects += d(d.s.mtaReply(Reply(250, (b"2.1.0 Ok",))))
        self.assertEqual(told(effects), b"250 2.1.0 Ok\r\n")

    def test_xtext(self) -> None:
        """Attribute values are xtext: a client's HELO cannot add attributes or commands."""
        d = Driven(attrs.evolve(INTRODUCE, startTls=False))
        d.connect()
        d(d.s.clientData(b"EHLO a+b=c\r\n"))
        d(d.s.verdict(Stage.HELO, Verdict.accept()))
        d(d.s.mtaReply(ehloReply(b"XFORWARD HELO")))
        d(d.s.clientNamed("[UNAVAILABLE]", "[UNAVAILABLE]"))
        d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        effects = d(d.s.verdict(Stage.MAIL, Verdict.accept()))
        self.assertIn(b"XFORWARD HELO=a+2Bb+3Dc\r\n", sent(effects))

    def test_loginOnXclient(self) -> None:
        """XCLIENT carries an authenticated client's login (for a leg made after its AUTH:
        a reconnect past mta_junk_commands)."""
        d = Driven(INTRODUCE)
        d.s.info.login = "alice"
        d.connect()
        d.ehlo(ehloReply(b"XCLIENT ADDR LOGIN"))
        d(d.s.clientNamed("[UNAVAILABLE]", "[UNAVAILABLE]"))
        self.assertIn(b"XCLIENT ADDR=192.0.2.7 LOGIN=alice\r\n", sent(d.all))


class MtaTlsTests(SynchronousTestCase):
    def test_required(self) -> None:
        """STARTTLS to the MTA, the client's EHLO again over TLS, then the client's answer."""
        d = Driven(core.Policy(mtaTls="required"))
        d.connect()
        effects = d.ehlo(ehloReply(b"STARTTLS"))
        self.assertEqual(sent(effects), b"EHLO client.example\r\nSTARTTLS\r\n")
        effects = d(d.s.mtaReply(Reply(220, (b"2.0.0 Ready to start TLS",))))
        self.assertIn(core.StartMtaTls(), effects)
        effects = d(d.s.mtaTlsStarted("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
        self.assertEqual(sent(effects), b"EHLO client.example\r\n")
        effects = d(d.s.mtaReply(ehloReply(b"AUTH PLAIN LOGIN")))
        self.assertTrue(told(effects).startswith(b"250-mta.test\r\n"))
        self.assertNotIn(b"STARTTLS", told(d.all))
        self.assertIn(core.TlsEstablished("mta", "TLSv1.3", "TLS_AES_256_GCM_SHA384"), d.all)

    def test_requiredNotOffered(self) -> None:
        """Required TLS the MTA does not offer: 421 to the client, never cleartext mail."""
        d = Driven(core.Policy(mtaTls="required"))
        d.connect()
        effects = d.ehlo(ehloReply())
        self.assertEqual(
            told(effects),
            b"421 4.7.0 proxy.test Error: no secure connection to the MTA, try again later\r\n",
        )
        self.assertIn(core.MtaError("tls"), effects)

    def test_handshakeFails(self) -> None:
        """A failed handshake or verification (a wrong name) loses the leg: 421 4.7.0."""
        d = Driven(core.Policy(mtaTls="required"))
        d.connect()
        d.ehlo(ehloReply(b"STARTTLS"))
        d(d.s.mtaReply(Reply(220, (b"go ahead",))))
        effects = d(d.s.mtaLost("certificate verify failed"))
        self.assertTrue(told(effects).startswith(b"421 4.7.0"))
        self.assertIn("TLS with the MTA failed: certificate verify failed", logged(effects))

    def test_handshakeTimesOut(self) -> None:
        """A handshake that never ends is bounded by mta_reply."""
        d = Driven(core.Policy(mtaTls="required"))
        d.connect()
        d.ehlo(ehloReply(b"STARTTLS"))
        effects = d(d.s.mtaReply(Reply(220, (b"go ahead",))))
        self.assertIn(core.StartTimer(core.Timer.MTA_REPLY, CONFIG.timeouts.mtaReply), effects)
        effects = d(d.s.timerFired(core.Timer.MTA_REPLY))
        self.assertTrue(told(effects).startswith(b"421 4.4.2"))

    def test_opportunisticRefused(self) -> None:
        """Opportunistic TLS the MTA refuses (454) goes on in cleartext, with a warning."""
        d = Driven(core.Policy(mtaTls="opportunistic"))
        d.connect()
        d.ehlo(ehloReply(b"STARTTLS"))
        effects = d(d.s.mtaReply(Reply(454, (b"4.7.0 TLS not available",))))
        self.assertTrue(told(effects).startswith(b"250-mta.test"))
        self.assertIn("stays in cleartext", logged(effects))


class AuthTests(SynchronousTestCase):
    def authReady(self, policy: core.Policy = TLS) -> Driven:
        d = Driven(policy)
        d.connect(implicitTls=True)
        d.ehlo(ehloReply(b"AUTH PLAIN LOGIN CRAM-MD5", b"AUTH=PLAIN"))
        return d

    def test_notWithoutTls(self) -> None:
        """AUTH in cleartext gets 538 from mailproxy; the MTA never hears it."""
        d = Driven()
        d.connect()
        effects = d.ehlo(ehloReply(b"AUTH PLAIN LOGIN"))
        self.assertNotIn(b"AUTH", told(effects))
        effects = d(d.s.clientData(b"AUTH PLAIN " + PLAIN + b"\r\n"))
        self.assertEqual(
            told(effects),
            b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
        )
        self.assertNotIn(b"AUTH", sent(d.all))

    def test_plain(self) -> None:
        """Only the mechanisms mailproxy reads are offered; the login is the filters' to see."""
        d = self.authReady()
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", told(d.all))
        self.assertNotIn(b"CRAM-MD5", told(d.all))
        effects = d(d.s.clientData(b"AUTH plain " + PLAIN + b"\r\n"))
        self.assertEqual(sent(effects), b"AUTH PLAIN " + PLAIN + b"\r\n")
        effects = d(d.s.mtaReply(Reply(235, (b"2.7.0 Authentication successful",))))
        self.assertEqual(told(effects), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(d.s.info.login, "alice@test.example")
        self.assertIn(core.Report(core.Counted.AUTH_SUCCEEDED), effects)
        self.assertNotIn(PLAIN.decode(), logged(d.all))
        self.assertNotIn("secret", logged(d.all))

    def test_login(self) -> None:
        """AUTH LOGIN: the client's lines are SASL responses, relayed, never commands."""
        d = self.authReady()
        d(d.s.clientData(b"AUTH LOGIN\r\n"))
        effects = d(d.s.mtaReply(Reply(334, (b"VXNlcm5hbWU6",))))
        self.assertEqual(told(effects), b"334 VXNlcm5hbWU6\r\n")
        user, password = base64.b64encode(b"alice"), base64.b64encode(b"QUIT")
        effects = d(d.s.clientData(user + b"\r\n"))
        self.assertEqual(sent(effects), user + b"\r\n")
        d(d.s.mtaReply(Reply(334, (b"UGFzc3dvcmQ6",))))
        effects = d(d.s.clientData(password + b"\r\n"))
        self.assertEqual(sent(effects), password + b"\r\n")
        d(d.s.mtaReply(Reply(235, (b"2.7.0 ok",))))
        self.assertEqual(d.s.info.login, "alice")
        self.assertNotIn(password.decode(), logged(d.all))

    def test_responseNotBase64Cancels(self) -> None:
        """A response that is not base64 (a command, say) cancels the exchange: '*'."""
        d = self.authReady()
        d(d.s.clientData(b"AUTH LOGIN\r\n"))
        d(d.s.mtaReply(Reply(334, (b"VXNlcm5hbWU6",))))
        effects = d(d.s.clientData(b"MAIL FROM:<a@b>\r\n"))
        self.assertEqual(sent(effects), b"*\r\n")
        effects = d(d.s.mtaReply(Reply(501, (b"5.7.0 Authentication aborted",))))
        self.assertEqual(told(effects), b"501 5.7.0 Authentication aborted\r\n")
        self.assertIsNone(d.s.info.login)

    def test_failuresLimited(self) -> None:
        """After limits.auth_failures failures, 421 and the session ends."""
        d = self.authReady(attrs.evolve(TLS, authFailures=2))
        for _ in range(2):
            d(d.s.clientData(b"AUTH PLAIN " + PLAIN + b"\r\n"))
            effects = d(d.s.mtaReply(Reply(535, (b"5.7.8 Error: authentication failed",))))
        self.assertEqual(
            told(effects),
            b"535 5.7.8 Error: authentication failed\r\n"
            b"421 4.7.0 proxy.test Error: too many failed authentication attempts\r\n",
        )
        self.assertIn(core.CloseClient(), effects)
        self.assertEqual(
            [e for e in d.all if e == core.Report(core.Counted.AUTH_FAILED)],
            [core.Report(core.Counted.AUTH_FAILED)] * 2,
        )

    def test_refusals(self) -> None:
        d = self.authReady()
        for line, reply in [
            (b"AUTH CRAM-MD5", b"504 5.5.4 Error: unsupported authentication mechanism"),
            (b"AUTH PLAIN not*base64", b"501 5.5.2 Error: invalid base64 data"),
            (b"AUTH", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ]:
            effects = d(d.s.clientData(line + b"\r\n"))
            self.assertEqual(told(effects), reply + b"\r\n")
        never = Driven(core.Policy(auth="never"))
        never.connect(implicitTls=True)
        effects = never.ehlo(ehloReply(b"AUTH PLAIN"))
        self.assertNotIn(b"AUTH", told(effects))
        effects = never(never.s.clientData(b"AUTH PLAIN " + PLAIN + b"\r\n"))
        self.assertEqual(told(effects), b"503 5.5.1 Error: authentication not enabled\r\n")
        self.assertNotIn(b"AUTH", sent(d.all))


class ReleaseTimeoutTests(SynchronousTestCase):
    def released(self) -> Driven:
        d = Driven(core.Policy())
        d.connect()
        d.ehlo()
        d.message()
        return d

    def test_silentAfterDataAtRelease(self) -> None:
        """An MTA that never answers our DATA at release time is timed out (421 4.4.2)."""
        d = self.released()
        effects = d(d.s.verdict(Stage.MESSAGE, Verdict.accept()))
        self.assertEqual(sent(effects), b"DATA\r\n")
        self.assertIn(core.StartTimer(core.Timer.MTA_REPLY, CONFIG.timeouts.mtaReply), effects)
        effects = d(d.s.timerFired(core.Timer.MTA_REPLY))
        self.assertTrue(told(effects).startswith(b"421 4.4.2"))
        self.assertIn(core.AbortMta(), effects)

    def test_noTimerWhileStreaming(self) -> None:
        """While the message streams the MTA owes nothing: no timer until the dot is sent."""
        d = self.released()
        d(d.s.verdict(Stage.MESSAGE, Verdict.accept()))
        effects = d(d.s.mtaReply(Reply(354, (b"go",))))
        self.assertIn(core.CancelTimer(core.Timer.MTA_REPLY), effects)
        effects = d(d.s.releaseSent())
        self.assertIn(core.StartTimer(core.Timer.MTA_REPLY, CONFIG.timeouts.mtaReply), effects)
