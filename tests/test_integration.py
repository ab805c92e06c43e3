"""
The proxy over real loopback sockets: a client, the proxy service as twistd builds it
from a configuration file, and the stand-in MTA recording every byte it receives.
"""

from __future__ import annotations

import os
from io import BytesIO

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.mail.smtp import sendmail
from twisted.trial.unittest import TestCase

from mailproxy import tap
from mailproxy.localmta import LocalMTA
from mailproxy.service import ProxyService
from mailproxy.testing import RawClient


def _port(listening: IListeningPort) -> int:
    return int(listening.getHost().port)  # type: ignore[attr-defined]


class LoopbackTests(TestCase):
    """Real sockets on 127.0.0.1, the service built from a real configuration file."""

    def setUp(self) -> None:
        self.mta = LocalMTA()
        self.mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.mtaPort.stopListening)
        self.spool = os.path.abspath(self.mktemp())

    def startProxy(self, extra: str = "") -> int:
        """Write a configuration, load it as twistd does, start the service; return its port."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "[proxy]\n"
                'listen = "tcp:0:interface=127.0.0.1"\n'
                f'upstream = "tcp:host=127.0.0.1:port={_port(self.mtaPort)}"\n'
                f'spool_dir = "{self.spool}"\n'
                'hostname = "proxy.test"\n' + extra
            )
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        assert isinstance(service, ProxyService)
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(self.sessionsClosed, service)
        [listener] = service.services
        return _port(listener._waitingForPort.result)  # type: ignore[attr-defined]

    def sessionsClosed(self, service: ProxyService) -> defer.Deferred[object]:
        """Wait for every session to end, so that no connection outlives the test."""
        sessions = list(service.factory.sessions)
        for session in sessions:
            if session.transport is not None:
                session.transport.loseConnection()
        return defer.gatherResults([s.closed for s in sessions])

    async def connect(self, port: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport and client.transport.loseConnection())
        await client.expect(1)
        return client

    @defer.inlineCallbacks
    def test_twistedClient(self):  # type: ignore[no-untyped-def]
        """
        Twisted's own ESMTP client sends a message through the proxy: it arrives at the
        MTA byte-identical, and no spool file is left.
        """
        port = self.startProxy()
        # Twisted's client turns LF into CRLF and dot-stuffs every line but the first.
        body = b"Subject: hi\n\nline one\n.starts with a dot\n"
        yield sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.net"],
            BytesIO(body),
            port=port,
            requireTransportSecurity=False,
        )
        [message] = self.mta.messages
        self.assertEqual(message.content, body.replace(b"\n", b"\r\n"))
        self.assertEqual(os.listdir(self.spool), [])

    def test_refusedThenAccepted(self) -> defer.Deferred[None]:
        """
        Over real sockets, with the access filter configured: a refused sender gets
        550, the MTA never sees the message, and the next one on the same connection
        is relayed with the MTA's queue id in the client's 250.
        """

        async def run() -> None:
            port = self.startProxy('[filters.access]\ndeny_senders = ["*@refused.example"]\n')
            client = await self.connect(port)
            client.send(b"EHLO c\r\nMAIL FROM:<x@refused.example>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            replies = await client.expect(5)
            self.assertEqual([r.code for r in replies], [220, 250, 550, 503, 503])
            client.send(b"MAIL FROM:<ok@example.org>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            await client.expect(8)
            client.send(b"Subject: ok\r\n\r\nfine\r\n.\r\nQUIT\r\n")
            replies = await client.expect(10)
            self.assertEqual([r.code for r in replies[5:]], [250, 250, 354, 250, 221])
            [message] = self.mta.messages
            self.assertEqual(message.mailFrom, "ok@example.org")
            self.assertIn(message.queueId.encode(), replies[8].lines[0])
            self.assertNotIn(b"refused.example", bytes(self.mta.transcripts[0]))
            await client.lost

        return defer.Deferred.fromCoroutine(run())

    def test_mtaDown(self) -> defer.Deferred[None]:
        """With nothing listening upstream, the client gets 421 4.3.2 and is closed."""

        async def run() -> None:
            port = self.startProxy()
            await self.mtaPort.stopListening()
            client = await self.connect(port)
            await client.lost
            self.assertEqual(client.codes, [421])
            self.assertTrue(client.replies[0].lines[0].startswith(b"4.3.2"))

        return defer.Deferred.fromCoroutine(run())

    def test_bigMessageStreamed(self) -> defer.Deferred[None]:
        """A 5 MB message with dot lines crosses real sockets intact."""

        async def run() -> None:
            port = self.startProxy()
            client = await self.connect(port)
            client.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            await client.expect(5)
            line = b"." + b"x" * 75 + b"\r\n"
            content = b"Subject: big\r\n\r\n" + line * 70000
            client.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            replies = await client.expect(6)
            self.assertEqual(replies[-1].code, 250)
            self.assertEqual(self.mta.messages[0].content, content)

        return defer.Deferred.fromCoroutine(run())
