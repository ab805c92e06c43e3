"""
The manhole over real SSH on loopback: keys made in the test, a conch client, the proxy
built by twistd's plugin from a configuration file.
"""

from __future__ import annotations

import os
import stat
import struct

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import AuthenticationFailed, SSHCommandClientEndpoint
from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection, transport, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.keys import Key
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from mailproxy.localmta import LocalMTA
from mailproxy.testing import RawClient, loopbackConfig, startProxy


def newKey() -> Key:
    """A client key, quick to make."""
    return Key(ec.generate_private_key(ec.SECP256R1()))


class Output(Protocol):
    """Collects what a command printed; C{done} fires with it when the channel closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.data)


class ShellChannel(SSHChannel):
    """An interactive session: a pty, a shell, and lines typed into it."""

    name = b"session"

    def __init__(self, lines: list[bytes], expected: bytes, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.lines = lines
        self.expected = expected
        self.received = b""
        self.seen: Deferred[bytes] = Deferred()

    def channelOpen(self, specificData: bytes) -> None:
        pty = common.NS(b"xterm") + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b"")
        d = self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        d.addCallback(lambda _: self.conn.sendRequest(self, b"shell", b"", wantReply=True))
        d.addCallback(lambda _: [self.write(line) for line in self.lines])
        d.addErrback(self.seen.errback)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.expected in self.received and not self.seen.called:
            self.seen.callback(self.received)


class ShellClient(transport.SSHClientTransport):
    """Logs in with a key and opens one L{ShellChannel}; trusts the host key given."""

    def __init__(self, hostKey: Key, key: Key, channel: ShellChannel) -> None:
        self.hostKey = hostKey
        self.key = key
        self.channel = channel

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        if Key.fromString(hostKey) != self.hostKey:
            return defer.fail(ConchError("host key mismatch"))
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        channel = self.channel

        class Connection(connection.SSHConnection):
            def serviceStarted(self) -> None:
                self.openChannel(channel)

        key = self.key

        class Auth(userauth.SSHUserAuthClient):
            def getPublicKey(self) -> Key | None:
                if self.lastPublicKey is None:
                    return key.public()
                return None

            def getPrivateKey(self) -> Deferred[Key]:
                return defer.succeed(key)

        self.requestService(Auth(b"operator", Connection()))


class ManholeTests(TestCase):
    def setUp(self) -> None:
        self.mta = LocalMTA()
        self.mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.mtaPort.stopListening)
        self.key = newKey()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.hostKeyPath = os.path.join(workdir, "host_key")
        keysPath = os.path.join(workdir, "manhole_keys")
        with open(keysPath, "wb") as f:
            f.write(self.key.public().toString("OPENSSH") + b" operator@test\n")
        manhole = (
            '[manhole]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'authorized_keys = "{keysPath}"\nhost_key = "{self.hostKeyPath}"\n'
        )
        config = loopbackConfig(self.mtaPort.getHost().port, f"{workdir}/spool", manhole)
        self.service, self.smtpPort = startProxy(self, config)
        assert self.service.manhole is not None
        [sshListener] = self.service.manhole
        self.sshPort = sshListener._waitingForPort.result.getHost().port  # type: ignore[attr-defined]

    def knownHosts(self) -> KnownHostsFile:
        known = KnownHostsFile(FilePath(self.mktemp()))
        known.addHostKey(b"127.0.0.1", Key.fromFile(self.hostKeyPath).public())
        return known

    async def command(self, expression: bytes, key: Key | None = None) -> bytes:
        """Run one command over SSH (C{ssh -p PORT 127.0.0.1 EXPRESSION}); its output."""
        endpoint = SSHCommandClientEndpoint.newConnection(
            reactor,
            expression,
            b"operator",
            b"127.0.0.1",
            self.sshPort,
            keys=[key or self.key],
            knownHosts=self.knownHosts(),  # type: ignore[arg-type]
        )
        output = Output()
        await connectProtocol(endpoint, output)
        return await output.done

    async def smtpSession(self) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.smtpPort), client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n")
        await client.expect(3)
        return client

    def test_hostKeyGenerated(self) -> None:
        """The missing host key was generated: RSA, 2048 bits, mode 0600."""
        key = Key.fromFile(self.hostKeyPath)
        self.assertEqual((key.type(), key.size()), ("RSA", 2048))
        self.assertEqual(stat.S_IMODE(os.stat(self.hostKeyPath).st_mode), 0o600)

    async def test_command(self) -> None:
        """
        A command over SSH reads the live objects: a counter, the active sessions
        (client, HELO, envelope, stage), and the running configuration.
        """
        client = await self.smtpSession()
        self.assertEqual(client.codes, [220, 250, 250])
        self.assertEqual(await self.command(b'stats.total.connections["accepted"]'), b"1\n")
        sessions = await self.command(
            b'[(s["client"], s["helo"], s["sender"], s["stage"]) for s in sessions()]'
        )
        self.assertEqual(
            sessions, b"[('127.0.0.1', 'client.example', 'a@example.org', 'command')]\n"
        )
        self.assertEqual(await self.command(b"config.hostname"), b"'proxy.test'\n")
        self.assertEqual(await self.command(b"print(len(sessions()))"), b"1\n")
        client.send(b"QUIT\r\n")
        await client.lost

    async def test_loginIsOneLine(self) -> None:
        """
        A login writes one line to the log, ours, naming the user and the client's
        address; none of conch's own (key exchange, authentication, channel, the client's
        goodbye) reaches the log.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(await self.command(b"6 * 7"), b"42\n")
        logins = [formatEvent(e) for e in events if e.get("log_namespace") == "mailproxy.manhole"]
        self.assertEqual(logins, ["manhole: login as operator (publickey) from 127.0.0.1"])
        conch = [
            (e["log_namespace"], formatEvent(e))
            for e in events
            if str(e.get("log_namespace", "")).startswith("twisted.conch")
        ]
        self.assertEqual(conch, [])

    async def test_reload(self) -> None:
        """reload() in the manhole reads the file again and answers whether it applied."""
        self.assertEqual(await self.command(b"reload()"), b"True\n")

    async def test_error(self) -> None:
        """A command that raises prints its traceback; the manhole goes on."""
        output = await self.command(b"1 / 0")
        self.assertTrue(output.endswith(b"ZeroDivisionError: division by zero\n"), output)
        self.assertEqual(await self.command(b"6 * 7"), b"42\n")

    async def test_unknownKeyRefused(self) -> None:
        """A key that is not in authorized_keys is refused: keys only, no password."""
        with self.assertRaises(AuthenticationFailed):
            await self.command(b"1", key=newKey())

    async def test_interactive(self) -> None:
        """An interactive session (pty and shell) evaluates what is typed into it."""
        channel = ShellChannel([b"config.hostname.upper()\r"], b"'PROXY.TEST'")
        hostKey = Key.fromFile(self.hostKeyPath).public()
        factory = Factory.forProtocol(lambda: ShellClient(hostKey, self.key, channel))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.sshPort)
        client = await endpoint.connect(factory)
        try:
            received = await channel.seen.addTimeout(10, reactor)
        finally:
            client.transport.loseConnection()  # type: ignore[union-attr]
        self.assertIn(b">>> ", received)
