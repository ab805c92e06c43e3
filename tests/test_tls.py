"""
Tests for L{mailproxy.tls}: the server options of C{[tls]}, the client options of
C{[upstream_tls]}, L{describe}, and the implicit-TLS listeners of C{proxy.listen_tls}.

Handshakes run in memory (iosim and a Clock) for the options themselves, and over real
loopback sockets for the listeners of the running service, its reload, and the client
options against a TLS server; the certificates are made by L{tests.certs}.
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy import tls
from mailproxy.config import Config, ConfigError, TLSSettings, UpstreamTLS, UpstreamTLSMode
from mailproxy.service import ProxyService
from mailproxy.testing import RawClient, listeningPort, loopbackConfig, startProxy
from tests.certs import CertificateAuthority, Issued, selfSigned
from tests.fakes import ProxyTestCase


def configWith(**kwargs: Any) -> Config:
    """A configuration with these attributes (C{tls}, C{upstreamTls}, ...)."""
    return Config(
        path="test.toml",
        listen=("tcp:0",),
        upstream="tcp:host=127.0.0.1:port=1",
        hostname="proxy.test",
        spoolDir="spool",
        **kwargs,
    )


def serving(issued: Issued, **keys: Any) -> Config:
    """A configuration serving C{issued} to clients."""
    return configWith(tls=TLSSettings(issued.chain, issued.key, **keys))


def verifying(name: str, caFile: str | None) -> Config:
    """A configuration that requires TLS to the MTA, verified against C{name}."""
    return configWith(upstreamTls=UpstreamTLS(UpstreamTLSMode.REQUIRED, name, caFile))


@implementer(IHandshakeListener)
class Peer(Protocol):
    """
    One side of a TLS connection: notes the end of the handshake, and the loss.

    @ivar done: fires with C{True} once the handshake completed, or C{False} when the
        connection was lost before (L{reason} says why).
    @ivar lost: fires once the connection is closed.
    """

    def __init__(self) -> None:
        self.handshaken = False
        self.reason: Failure | None = None
        self.done: Deferred[bool] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshaken = True
        self.done.callback(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        if not self.done.called:
            self.done.callback(False)
        self.lost.callback(None)

    def peerSerial(self) -> int:
        assert self.transport is not None
        certificate = self.transport.getPeerCertificate()  # type: ignore[attr-defined]
        return int(certificate.get_serial_number())


def handshake(
    server: IOpenSSLServerConnectionCreator | None, client: IOpenSSLClientConnectionCreator | None
) -> tuple[Peer, Peer]:
    """A TLS handshake in memory between C{server} and C{client}; both sides returned
    once it succeeded or failed."""
    assert server is not None and client is not None
    clock = Clock()
    sides = Peer(), Peer()
    serverFactory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(lambda: sides[0]), clock)
    clientFactory = TLSMemoryBIOFactory(client, True, Factory.forProtocol(lambda: sides[1]), clock)
    serverProtocol = serverFactory.buildProtocol(None)
    clientProtocol = clientFactory.buildProtocol(None)
    pump = iosim.connect(
        serverProtocol,
        iosim.makeFakeServer(serverProtocol),
        clientProtocol,
        iosim.makeFakeClient(clientProtocol),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return sides


class CertificatesCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.directory = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(self.directory)
        self.issued = self.ca.issue("mx.test", "127.0.0.1")

    def texts(self) -> list[str]:
        """The text of the events logged so far."""
        return [formatEvent(event) for event in self.events]


class ServerOptionsTests(CertificatesCase):
    """L{tls.serverOptions}: what clients are served."""

    def test_noCertificate(self) -> None:
        """Without a certificate there are no server options (no STARTTLS)."""
        self.assertIsNone(tls.serverOptions(configWith()))

    def test_chainServed(self) -> None:
        """
        The certificate and its intermediate are served: a client that trusts only the
        root CA verifies them, and sees the certificate of the file.
        """
        server = tls.serverOptions(serving(self.issued))
        assert server is not None
        _, clientSide = handshake(server, tls.clientOptions(verifying("mx.test", self.ca.ca)))
        self.assertTrue(clientSide.handshaken)
        self.assertEqual(clientSide.peerSerial(), self.issued.serial)
        assert clientSide.transport is not None
        chain = clientSide.transport.getHandle().get_peer_cert_chain()  # type: ignore[attr-defined]
        self.assertEqual(len(chain), 2)

    def test_noClientCertificateAsked(self) -> None:
        """The server asks no client for a certificate."""
        server = tls.serverOptions(serving(self.issued))
        assert isinstance(server, CertificateOptions)
        self.assertEqual(server.getContext().get_verify_mode(), SSL.VERIFY_NONE)

    def test_minVersion(self) -> None:
        """
        TLS 1.2 is accepted by default; with C{min_version = "TLSv1.3"} a client that
        speaks at most TLS 1.2 fails the handshake.
        """
        old = CertificateOptions(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        serverSide, clientSide = handshake(tls.serverOptions(serving(self.issued)), old)
        self.assertTrue(clientSide.handshaken)
        self.assertEqual(tls.describe(serverSide.transport)[0], "TLSv1.2")  # type: ignore[index]
        strict = tls.serverOptions(serving(self.issued, minVersion="TLSv1.3"))
        serverSide, clientSide = handshake(strict, old)
        self.assertFalse(clientSide.handshaken)
        self.assertIsInstance(clientSide.reason.value, SSL.Error)  # type: ignore[union-attr]

    def test_ciphers(self) -> None:
        """The cipher string chooses the ciphers of TLS 1.2."""
        server = tls.serverOptions(serving(self.issued, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
        old = CertificateOptions(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        serverSide, _ = handshake(server, old)
        self.assertEqual(
            tls.describe(serverSide.transport), ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
        )

    def test_nothingLogged(self) -> None:
        """A certificate in force is served without a word in the log."""
        self.assertIsNotNone(tls.serverOptions(serving(self.issued)))
        self.assertEqual(self.texts(), [])

    def test_expiredWarned(self) -> None:
        """An expired certificate is served, with a warning naming the file."""
        expired = self.ca.issue("mx.test", expired=True)
        self.assertIsNotNone(tls.serverOptions(serving(expired)))
        [text] = self.texts()
        self.assertIn(f"tls.certificate {expired.chain}: the certificate expired on", text)

    def test_filesChanged(self) -> None:
        """
        The files are read again at each call (at each reload): a key that no longer
        matches, or a certificate file gone, is a L{ConfigError} naming the key.
        """
        config = serving(self.issued)
        other = self.ca.issue("other.test")
        os.replace(other.key, self.issued.key)
        e = self.assertRaises(ConfigError, tls.serverOptions, config)
        self.assertEqual(e.key, "tls.key")
        os.remove(self.issued.chain)
        e = self.assertRaises(ConfigError, tls.serverOptions, config)
        self.assertEqual(e.key, "tls.certificate")
        self.assertIn("cannot read", e.message)


class ClientOptionsTests(CertificatesCase):
    """L{tls.clientOptions}: how the MTA's certificate is checked."""

    def connect(self, config: Config, served: Issued | None = None) -> Peer:
        """The client side of a handshake with a server of C{served} (by default the
        certificate for mx.test and 127.0.0.1)."""
        server = tls.serverOptions(serving(served or self.issued))
        client = tls.clientOptions(config)
        _, clientSide = handshake(server, client)
        return clientSide

    def test_none(self) -> None:
        """Mode "none": no client options, no STARTTLS."""
        self.assertIsNone(tls.clientOptions(configWith()))

    def test_opportunisticVerifiesNothing(self) -> None:
        """Mode "opportunistic" encrypts with any certificate: self-signed, any name."""
        config = configWith(upstreamTls=UpstreamTLS(UpstreamTLSMode.OPPORTUNISTIC))
        stranger = selfSigned(self.directory, "stranger.test")
        self.assertTrue(self.connect(config, stranger).handshaken)

    def test_requiredRightName(self) -> None:
        """Mode "required" completes with a certificate for the name (DNS or IP address),
        issued under the CA file."""
        self.assertTrue(self.connect(verifying("mx.test", self.ca.ca)).handshaken)
        self.assertTrue(self.connect(verifying("127.0.0.1", self.ca.ca)).handshaken)

    def test_requiredWrongName(self) -> None:
        """A certificate for another name fails the handshake."""
        clientSide = self.connect(verifying("mta.test", self.ca.ca))
        self.assertFalse(clientSide.handshaken)
        self.assertIsNotNone(clientSide.reason)

    def test_requiredUntrusted(self) -> None:
        """A certificate of another CA, a self-signed one, an expired one, or one not
        in the system's trust store (no CA file) fails the handshake."""
        other = CertificateAuthority(os.path.join(self.directory, "other"), "other")
        for served, caFile in [
            (other.issue("mx.test"), self.ca.ca),
            (selfSigned(self.directory, "mx.test"), self.ca.ca),
            (self.ca.issue("mx.test", expired=True), self.ca.ca),
            (self.issued, None),
        ]:
            clientSide = self.connect(verifying("mx.test", caFile), served)
            self.assertFalse(clientSide.handshaken, served)

    def test_requiredSelfSignedAsCA(self) -> None:
        """A self-signed certificate given as the CA file is trusted."""
        mta = selfSigned(self.directory, "mx.test")
        self.assertTrue(self.connect(verifying("mx.test", mta.ca), mta).handshaken)

    def test_caFileGone(self) -> None:
        """A CA file that cannot be read (any more) is a L{ConfigError} naming it."""
        missing = os.path.join(self.directory, "missing.pem")
        e = self.assertRaises(ConfigError, tls.clientOptions, verifying("mx.test", missing))
        self.assertEqual(e.key, "upstream_tls.ca_file")


class DescribeTests(CertificatesCase):
    """L{tls.describe}."""

    def test_plain(self) -> None:
        """A transport without TLS has no description."""
        self.assertIsNone(tls.describe(StringTransport()))
        self.assertIsNone(tls.describe(None))

    def test_established(self) -> None:
        """After the handshake: the version and the cipher, the same on both sides."""
        server = tls.serverOptions(serving(self.issued))
        serverSide, clientSide = handshake(server, CertificateOptions())
        version, cipher = tls.describe(serverSide.transport)  # type: ignore[misc]
        self.assertEqual(version, "TLSv1.3")
        self.assertTrue(cipher.startswith("TLS_"), cipher)
        self.assertEqual(tls.describe(clientSide.transport), (version, cipher))

    def test_beforeHandshake(self) -> None:
        """Before the handshake is done, there is nothing to describe yet."""
        server = tls.serverOptions(serving(self.issued))
        factory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(Peer), Clock())  # type: ignore[arg-type]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertIsNone(tls.describe(protocol.wrappedProtocol.transport))


class ReloadableTests(CertificatesCase):
    """L{tls.ReloadableServerOptions}."""

    def test_asksEachConnection(self) -> None:
        """Each new connection gets the server options current when it is made."""
        renewed = self.ca.issue("mx.test")
        current = [tls.serverOptions(serving(self.issued))]
        reloadable = tls.ReloadableServerOptions(lambda: current[0])
        _, first = handshake(reloadable, CertificateOptions())
        current[0] = tls.serverOptions(serving(renewed))
        _, second = handshake(reloadable, CertificateOptions())
        self.assertEqual(
            (first.peerSerial(), second.peerSerial()), (self.issued.serial, renewed.serial)
        )


class ImplicitTLSTests(ProxyTestCase):
    """C{proxy.listen_tls}: the running service's implicit-TLS listeners, over loopback."""

    def setUp(self) -> None:
        super().setUp()
        self.certs = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(self.certs)
        self.issued = self.ca.issue("mx.test")
        self.chain = os.path.join(self.certs, "fullchain.pem")
        self.key = os.path.join(self.certs, "privkey.pem")
        self.install(self.issued)

    def install(self, issued: Issued) -> None:
        """Put C{issued} where the configuration says the certificate is (certbot's way)."""
        os.replace(issued.chain, self.chain)
        os.replace(issued.key, self.key)

    def configText(self, proxy: str = 'listen_tls = ["tcp:port=0:interface=127.0.0.1"]\n') -> str:
        text = loopbackConfig(self.mtaPort, self.spool)
        return text.replace("[proxy]\n", f"[proxy]\n{proxy}") + (
            f'[tls]\ncertificate = "{self.chain}"\nkey = "{self.key}"\n'
        )

    def start(self) -> tuple[ProxyService, int]:
        service, _ = startProxy(self, self.configText())
        return service, listeningPort(service, 1)

    async def tlsClient(self, port: int) -> RawClient:
        """A client over TLS, trusting the test CA, greeted by the proxy."""
        client = RawClient()
        options = tls.clientOptions(verifying("mx.test", self.ca.ca))
        assert options is not None
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        await client.expect(1)
        return client

    def serial(self, client: RawClient) -> int:
        assert client.transport is not None
        return int(client.transport.getPeerCertificate().get_serial_number())  # type: ignore[attr-defined]

    async def test_bannerOverTLS(self) -> None:
        """
        A client of an implicit-TLS listener verifies the certificate (and its chain)
        and gets the MTA's 220 banner over TLS; the session sees a TLS transport.
        """
        service, port = self.start()
        client = await self.tlsClient(port)
        self.assertEqual(client.codes, [220])
        self.assertEqual(self.serial(client), self.issued.serial)
        [session] = service.factory.sessions
        description = tls.describe(session.transport)
        assert description is not None
        self.assertEqual(description[0], "TLSv1.3")
        client.send(b"EHLO client.example\r\n")
        self.assertEqual((await client.expect(2))[1].code, 250)

    async def test_noCleartext(self) -> None:
        """A client that speaks SMTP in cleartext to the TLS port never gets the banner
        in cleartext: the handshake fails and the connection is closed."""
        _, port = self.start()
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.send(b"EHLO client.example\r\n")
        # The end of the connection, or (were it cleartext) the first reply: no waiting.
        await DeferredList(
            [client.lost, client.expect(1)], fireOnOneCallback=True, consumeErrors=True
        )
        self.assertFalse(client.connected)
        self.assertNotIn(b"220", bytes(client.received))
        self.assertEqual(client.replies, [])

    async def test_plainListenerStaysPlain(self) -> None:
        """The listen endpoint next to it still greets in cleartext."""
        service, _ = self.start()
        client = RawClient()
        port = listeningPort(service, 0)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.assertEqual([r.code for r in await client.expect(1)], [220])

    async def test_reloadRenewsCertificate(self) -> None:
        """
        After the certificate file is renewed and the configuration reloaded, new TLS
        connections get the new certificate; one opened before keeps its session.
        """
        service, port = self.start()
        before = await self.tlsClient(port)
        renewed = self.ca.issue("mx.test")
        self.install(renewed)
        self.assertTrue(service.reload())
        after = await self.tlsClient(port)
        self.assertEqual(self.serial(before), self.issued.serial)
        self.assertEqual(self.serial(after), renewed.serial)
        self.assertNotEqual(renewed.serial, self.issued.serial)
        self.assertIs(service.factory.settings.serverTls is None, False)

    async def test_reloadBadCertificateRefused(self) -> None:
        """A renewed key that does not match is refused; the running certificate stays."""
        service, port = self.start()
        stray = self.ca.issue("mx.test")
        os.replace(stray.key, self.key)
        self.assertFalse(service.reload())
        [line] = self.logged("reload refused")
        self.assertIn("tls.key:", line)
        client = await self.tlsClient(port)
        self.assertEqual(self.serial(client), self.issued.serial)

    async def test_reloadCannotRemoveCertificate(self) -> None:
        """
        A reload that removes listen_tls and the certificate is refused: the listeners
        stay until a restart, and they need the certificate.
        """
        service, port = self.start()
        with open(service.config.path, "w") as f:
            f.write(loopbackConfig(self.mtaPort, self.spool))
        self.assertFalse(service.reload())
        [line] = self.logged("reload refused")
        self.assertIn("tls.certificate: missing: the running proxy.listen_tls listeners", line)
        client = await self.tlsClient(port)
        self.assertEqual(client.codes, [220])

    async def test_listenTlsRestartOnly(self) -> None:
        """A changed listen_tls is kept until a restart, and the reload says so."""
        service, _ = self.start()
        with open(service.config.path, "w") as f:
            f.write(self.configText('listen_tls = ["tcp:0:interface=127.0.0.2"]\n'))
        self.assertTrue(service.reload())
        self.assertEqual(service.config.listenTls, ("tcp:port=0:interface=127.0.0.1",))
        [line] = self.logged("takes a restart")
        self.assertIn("proxy.listen_tls", line)


class ClientOverLoopbackTests(ProxyTestCase):
    """L{tls.clientOptions} against a TLS server on a real loopback socket."""

    def setUp(self) -> None:
        super().setUp()
        directory = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(directory)
        self.issued = self.ca.issue("mta.test")
        server = tls.serverOptions(serving(self.issued))
        assert server is not None
        self.port = self.listenTCP(
            TLSMemoryBIOFactory(server, False, Factory.forProtocol(Peer), reactor)
        )

    async def connect(self, config: Config) -> Peer:
        options = tls.clientOptions(config)
        assert options is not None
        peer = Peer()
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        await connectProtocol(endpoint, peer)
        if await peer.done:
            assert peer.transport is not None
            peer.transport.loseConnection()
        await peer.lost
        return peer

    async def test_rightName(self) -> None:
        """The MTA's certificate for the configured name, under the CA file: verified."""
        peer = await self.connect(verifying("mta.test", self.ca.ca))
        self.assertTrue(peer.handshaken)
        self.assertEqual(peer.peerSerial(), self.issued.serial)

    async def test_wrongName(self) -> None:
        """A certificate for another name than the configured one fails the handshake,
        for C{service_identity}'s reason."""
        peer = await self.connect(verifying("other.test", self.ca.ca))
        self.assertFalse(peer.handshaken)
        assert peer.reason is not None
        self.assertIsInstance(peer.reason.value, VerificationError)

    async def test_untrustedCA(self) -> None:
        """A certificate not issued under the CA file fails the handshake."""
        other = CertificateAuthority(os.path.abspath(self.mktemp()), "other")
        peer = await self.connect(verifying("mta.test", other.ca))
        self.assertFalse(peer.handshaken)
        assert peer.reason is not None
        self.assertIsInstance(peer.reason.value, SSL.Error)
