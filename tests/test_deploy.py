"""
On port 25, over real loopback sockets, with certificates the tests make: STARTTLS end
to end, the STARTTLS injection, implicit TLS (465), STARTTLS to an MTA with a verified
certificate (and a 4xx when its name is wrong), AUTH only over TLS, XCLIENT with the
client's own address.
"""

from __future__ import annotations

import base64
import os

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailproxy import tls
from mailproxy.config import TLSSettings
from mailproxy.localmta import LocalMTA
from mailproxy.testing import (
    RawClient,
    ScriptedMTA,
    listeningPort,
    loopbackConfig,
    startProxy,
    unfolded,
)
from mailproxy.wire import Reply
from tests.certs import CertificateAuthority, Issued
from tests.test_relay import MESSAGE, STUFFED, envelope
from tests.test_session import CONFIG

PLAIN = base64.b64encode(b"\0alice\0secret")


def trusting(issued: Issued, name: str = "mx.test") -> object:
    """Client TLS options that trust the test CA and check C{name}."""
    with open(issued.ca, "rb") as f:
        root = Certificate.loadPEM(f.read())
    return optionsForClientTLS(name, trustRoot=root)


class DeployTests(TestCase):
    def setUp(self) -> None:
        self.ca = CertificateAuthority(os.path.abspath(self.mktemp()))
        self.proxyCert = self.ca.issue("mx.test")
        self.mta = LocalMTA(hostname="mta.test")
        port = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.mtaPort = port.getHost().port
        self.spool = os.path.abspath(self.mktemp())

    def start(self, extra: str = "", tlsListen: bool = False) -> tuple[int, int | None]:
        tlsSection = (
            f'[tls]\ncertificate = "{self.proxyCert.chain}"\nkey = "{self.proxyCert.key}"\n'
        )
        listenTls = 'listen_tls = ["tcp:port=0:interface=127.0.0.1"]\n' if tlsListen else ""
        config = loopbackConfig(self.mtaPort, self.spool, listenTls + extra + tlsSection)
        service, port = startProxy(self, config)
        self.service = service
        return port, (listeningPort(service, 1) if tlsListen else None)

    async def connect(self, port: int, bind: str = "127.0.0.1") -> RawClient:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(bind, 0))
        await connectProtocol(endpoint, client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        return client

    async def starttls(self, client: RawClient) -> None:
        count = len(client.replies)
        client.send(b"STARTTLS\r\n")
        [*_, ready] = await client.expect(count + 1)
        self.assertEqual(ready, Reply(220, (b"2.0.0 Ready to start TLS",)))
        assert client.transport is not None
        client.transport.startTLS(trusting(self.proxyCert))  # type: ignore[attr-defined]

    async def test_starttlsEndToEnd(self) -> None:
        """STARTTLS, EHLO again, a message: it arrives under our Received: naming the TLS."""
        port, _ = self.start()
        client = await self.connect(port)
        client.send(b"EHLO client.example\r\n")
        [_, ehlo] = await client.expect(2)
        self.assertIn(b"STARTTLS", ehlo.lines)
        await self.starttls(client)
        client.send(b"EHLO client.example\r\n")
        [*_, ehlo] = await client.expect(4)
        self.assertNotIn(b"STARTTLS", ehlo.lines)
        client.send(envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        await client.lost
        self.assertEqual(client.codes, [220, 250, 220, 250, 250, 250, 354, 250, 221])
        [message] = self.mta.messages
        total = self.service.stats.snapshot()["total"]
        self.assertEqual(sum(total["tls"].values()), 1)
        self.assertRegex(next(iter(total["tls"])), r"^client TLSv1\.[23]$")
        received, _, rest = unfolded(message.content).partition(b"\r\n")
        self.assertEqual(rest, MESSAGE)
        self.assertRegex(
            received,
            rb"^Received: from client\.example \(\[127\.0\.0\.1\]\) by proxy\.test "
            rb"\(mailproxy\) with ESMTPS \(TLSv1\.[23]:[A-Z0-9_-]+\) id [0-9A-F]{10}; ",
        )

    async def test_starttlsInjection(self) -> None:
        """
        C{STARTTLS\\r\\nRSET\\r\\n} in one packet: the RSET is never answered, in cleartext or
        over TLS, and never reaches the MTA.
        """
        port, _ = self.start()
        client = await self.connect(port)
        client.send(b"EHLO client.example\r\n")
        await client.expect(2)
        client.send(b"STARTTLS\r\nRSET\r\n")
        await client.expect(3)
        assert client.transport is not None
        client.transport.startTLS(trusting(self.proxyCert))  # type: ignore[attr-defined]
        client.send(b"NOOP\r\nQUIT\r\n")
        await client.lost
        self.assertEqual(client.codes, [220, 250, 220, 250, 221])
        self.assertNotIn(b"RSET", bytes(self.mta.transcripts[0]))

    async def test_implicitTls(self) -> None:
        """A listen_tls listener (465): TLS from the first byte, then SMTP as usual."""
        _, tlsPort = self.start(tlsListen=True)
        assert tlsPort is not None
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", tlsPort)
        await connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.startTLS(trusting(self.proxyCert))  # type: ignore[attr-defined]
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\n")
        [banner, ehlo] = await client.expect(2)
        self.assertEqual(banner.code, 220)
        self.assertNotIn(b"STARTTLS", ehlo.lines)
        client.send(envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        await client.lost
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
        self.assertIn(b"with ESMTPS (TLSv1.", unfolded(self.mta.messages[0].content))

    def mtaWithTls(self) -> Issued:
        issued = self.ca.issue("mta.test")
        self.mta.extensions[b"STARTTLS"] = []
        settings = TLSSettings(certificate=issued.chain, key=issued.key)
        self.mta.tls = tls.serverOptions(attrs.evolve(CONFIG, tls=settings))
        return issued

    async def test_mtaTlsVerified(self) -> None:
        """upstream_tls required: STARTTLS to the MTA, its certificate checked by name."""
        issued = self.mtaWithTls()
        port, _ = self.start(
            f'[upstream_tls]\nmode = "required"\nname = "mta.test"\nca_file = "{issued.ca}"\n'
        )
        client = await self.connect(port)
        client.send(b"EHLO client.example\r\n" + envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        await client.lost
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
        [message] = self.mta.messages
        self.assertTrue(message.tls)
        self.assertEqual(message.content, MESSAGE)  # the client's leg was cleartext
        transcript = bytes(self.mta.transcripts[0])
        self.assertTrue(
            transcript.startswith(
                b"EHLO client.example\r\nSTARTTLS\r\nEHLO client.example\r\nMAIL FROM:"
            )
        )

    async def test_mtaTlsWrongName(self) -> None:
        """A certificate for another name: 4xx to the client, never the mail in cleartext."""
        issued = self.mtaWithTls()
        port, _ = self.start(
            f'[upstream_tls]\nmode = "required"\nname = "wrong.test"\nca_file = "{issued.ca}"\n'
        )
        client = await self.connect(port)
        client.send(b"EHLO client.example\r\n" + envelope())
        await client.lost
        self.assertEqual(client.codes, [220, 421])  # nothing of the mail went in cleartext
        self.assertEqual(client.replies[1].lines[0][:5], b"4.7.0")
        self.assertEqual(self.mta.messages, [])
        self.assertNotIn(b"MAIL FROM", b"".join(bytes(t) for t in self.mta.transcripts))

    async def test_authOnlyOverTls(self) -> None:
        """AUTH in cleartext: 538 from mailproxy. Over TLS: relayed, and the MTA knows the login."""
        self.mta.extensions[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        self.mta.logins = {"alice": "secret"}
        port, _ = self.start()
        client = await self.connect(port)
        client.send(b"EHLO client.example\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        [_, ehlo, refused] = await client.expect(3)
        self.assertNotIn(b"AUTH PLAIN LOGIN", ehlo.lines)
        self.assertEqual(refused.code, 538)
        self.assertNotIn(b"AUTH", bytes(self.mta.transcripts[0]))
        await self.starttls(client)
        client.send(b"EHLO client.example\r\n")
        [*_, ehlo] = await client.expect(5)
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo.lines)
        client.send(b"AUTH PLAIN " + PLAIN + b"\r\n")
        [*_, accepted] = await client.expect(6)
        self.assertEqual(accepted.code, 235)
        client.send(envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        await client.lost
        self.assertEqual(self.mta.messages[0].login, "alice")
        self.assertEqual(
            self.service.stats.snapshot()["total"]["auth"], {"succeeded": 1, "failed": 0}
        )
        self.assertIn(b"with ESMTPSA (TLSv1.", unfolded(self.mta.messages[0].content))

    async def test_xclient(self) -> None:
        """An MTA offering XCLIENT hears the client's own address and port, not ours."""
        self.mta.extensions[b"XCLIENT"] = [b"ADDR", b"PORT", b"NAME", b"REVERSE_NAME"]
        port, _ = self.start('client_names = "off"\n')
        client = await self.connect(port, bind="127.0.0.5")
        assert client.transport is not None
        clientPort = client.transport.getHost().port  # type: ignore[attr-defined]
        client.send(b"EHLO client.example\r\n" + envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        await client.lost
        self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
        [message] = self.mta.messages
        self.assertEqual(
            message.xclient,
            {
                "ADDR": "127.0.0.5",
                "PORT": str(clientPort),
                "NAME": "[UNAVAILABLE]",
                "REVERSE_NAME": "[UNAVAILABLE]",
            },
        )
        self.assertEqual(message.helo, "client.example")


class MtaInjectionTests(TestCase):
    async def test_repliesBehindStartTls(self) -> None:
        """
        The other direction of CVE-2011-0411: an MTA (or someone on its path) that sends
        more behind its 220 to STARTTLS would have it read as if it came over TLS. It is
        never relayed: the client gets 451 4.3.0, and no TLS is started on such a leg.
        """
        mta = ScriptedMTA(extensions=[b"PIPELINING", b"STARTTLS"])
        mta.answer = lambda line: (
            b"220 2.0.0 go ahead\r\n250-mta.test\r\n250 AUTH PLAIN\r\n"
            if line == b"STARTTLS"
            else None
        )
        port = reactor.listenTCP(0, mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        spool = os.path.abspath(self.mktemp())
        config = loopbackConfig(
            port.getHost().port, spool, '[upstream_tls]\nmode = "opportunistic"\n'
        )
        _, proxyPort = startProxy(self, config)
        logged: list[str] = []

        def observe(event: LogEvent) -> None:
            logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\n")
        await client.lost
        self.assertEqual(client.codes[0], 220)
        self.assertEqual(client.replies[1].code, 451)
        self.assertEqual(client.replies[1].lines[0][:5], b"4.3.0")
        self.assertNotIn(b"AUTH", client.received)
        # No TLS was even started on that leg.
        self.assertIn("MTA protocol error: bytes after the 220 to STARTTLS", "\n".join(logged))
