"""
The proxy over real loopback sockets: a client, the proxy service as twistd builds it
from a configuration file, and the stand-in MTA recording every byte it receives.
"""

from __future__ import annotations

import os
from io import BytesIO

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.mail.smtp import sendmail

from mailproxy.filters import Stage, Verdict
from mailproxy.testing import FakeFilter, RawClient
from tests.fakes import ProxyTestCase


class LoopbackTests(ProxyTestCase):
    """Real sockets on 127.0.0.1, the service built from a real configuration file."""

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
            self.mtaPort = self.deadPort()
            port = self.startProxy()
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

    def test_bigMessageWithoutDotLines(self) -> defer.Deferred[None]:
        """
        A 5 MB message with no line starting with a dot, then one with a stuffed line,
        over real sockets: the MTA reads the first exactly as the client sent it, and
        the second with its line still stuffed.
        """

        async def run() -> None:
            port = self.startProxy()
            client = await self.connect(port)
            client.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            await client.expect(5)
            content = b"Subject: big\r\n\r\nA sentence. Another.\r\n" + b"y" * 76 + b"\r\n"
            content += (b"y" * 76 + b"\r\n") * 70000
            client.send(content + b".\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            await client.expect(9)
            client.send(b"Subject: dots\r\n\r\n..foo\r\n.\r\n")
            replies = await client.expect(10)
            self.assertEqual([r.code for r in replies[5:]], [250, 250, 250, 354, 250])
            self.assertEqual(
                [m.content for m in self.mta.messages], [content, b"Subject: dots\r\n\r\n.foo\r\n"]
            )
            transcript = bytes(self.mta.transcripts[0])
            self.assertIn(b"\r\nDATA\r\n" + content + b".\r\n", transcript)
            self.assertIn(b"\r\nDATA\r\nSubject: dots\r\n\r\n..foo\r\n.\r\n", transcript)

        return defer.Deferred.fromCoroutine(run())


class LoopbackFailureTests(ProxyTestCase):
    """
    The failure replies over real sockets: proxy and stand-in MTA on 127.0.0.1, the
    proxy built with test filters.
    """

    async def session(self, port: int, commands: bytes, count: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\n" + commands)
        await client.expect(count)
        return client

    def later(self, coroutine):  # type: ignore[no-untyped-def]
        return defer.Deferred.fromCoroutine(coroutine)

    def test_pipelined(self) -> defer.Deferred[None]:
        """MAIL, RCPT, RCPT, DATA in one write: replies in order, the message delivered."""

        async def go() -> None:
            port = self.proxyWith()
            client = await self.session(
                port, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n", 6
            )
            self.assertEqual(client.codes, [220, 250, 250, 250, 250, 354])
            client.send(b"Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n")
            await client.lost
            self.assertEqual(client.codes[-2:], [250, 221])
            self.assertEqual(self.mta.messages[0].recipients, ["b@y", "c@y"])

        return self.later(go())

    def test_mtaDiesMidData(self) -> defer.Deferred[None]:
        """The MTA dying while the message is released: the client gets 4xx, never 250."""

        async def go() -> None:
            port = self.proxyWith()
            self.mta.dropAfterDataBytes = 1000
            client = await self.session(port, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n", 5)
            client.send(b"Subject: x\r\n\r\n" + b"0123456789" * 10000 + b"\r\n.\r\n")
            await client.lost
            self.assertEqual(client.codes[-1], 421)
            self.assertNotIn(250, client.codes[4:])
            self.assertEqual(self.mta.messages, [])
            self.assertEqual(os.listdir(self.spool), [])

        return self.later(go())

    def test_filterTimeout(self) -> defer.Deferred[None]:
        """A message filter that never answers: 451 4.7.1 after its timeout (0.2 s here)."""

        async def go() -> None:
            never = FakeFilter(verdicts={Stage.MESSAGE: lambda: defer.Deferred()})
            port = self.proxyWith(never, filterTimeout=0.2)
            client = await self.session(port, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n", 5)
            client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            [*_, last] = await client.expect(6)
            self.assertEqual(last.code, 451)
            self.assertTrue(last.lines[0].startswith(b"4.7.1"))
            self.assertEqual(self.mta.messages, [])

        return self.later(go())

    def test_limits(self) -> defer.Deferred[None]:
        """Oversize → 552 5.3.4, too many recipients → 452 4.5.3, long line → 500 5.5.2."""

        async def go() -> None:
            port = self.proxyWith(messageSize=1000, recipients=1, lineLength=600)
            client = await self.session(
                port,
                b"NOOP " + b"x" * 700 + b"\r\n"
                b"MAIL FROM:<a@x> SIZE=5000\r\n"
                b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n",
                8,
            )
            self.assertEqual(client.codes, [220, 250, 500, 552, 250, 250, 452, 354])
            client.send(b"x" * 2000 + b"\r\n.\r\n")
            [*_, last] = await client.expect(9)
            self.assertEqual(last.code, 552)
            self.assertEqual(self.mta.messages, [])

        return self.later(go())

    def test_halfClose(self) -> defer.Deferred[None]:
        """
        Over a real socket, a client that sends its final dot and QUIT and then shuts down
        its writing side (as Exim does) gets the MTA's 250 and 221; the message arrives.
        """

        async def go() -> None:
            port = self.proxyWith()
            client = await self.session(
                port, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n", 5
            )
            client.send(b"Subject: half\r\n\r\nclosed\r\n.\r\nQUIT\r\n")
            assert client.transport is not None
            client.transport.loseWriteConnection()  # type: ignore[attr-defined]
            await client.lost
            self.assertEqual(client.codes, [220, 250, 250, 250, 354, 250, 221])
            self.assertEqual([m.content for m in self.mta.messages], [b"Subject: half\r\n\r\nclosed\r\n"])

        return self.later(go())

    def test_smuggling(self) -> defer.Deferred[None]:
        """
        No bare-LF or bare-CR end-of-data lookalike makes the MTA see a second message:
        each message is refused with 554 5.6.0 and the MTA receives nothing.
        """

        async def go() -> None:
            port = self.proxyWith()
            for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n"):
                client = await self.session(
                    port, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n", 5
                )
                client.send(
                    b"Subject: real\r\n\r\nhi"
                    + fake
                    + b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n"
                )
                await client.lost
                self.assertEqual(client.codes[-2:], [554, 221], fake)
            self.assertEqual(self.mta.messages, [])
            for transcript in self.mta.transcripts:
                self.assertNotIn(b"DATA", bytes(transcript))

        return self.later(go())


class LoopbackChunkingTests(ProxyTestCase):
    """A client sending BDAT chunks through the proxy over real sockets, to the stand-in MTA."""

    #: Chunks with what DATA would read as its end and as dot-stuffing, and a big one.
    CHUNKS = (
        b"Subject: chunks\r\n\r\nfirst\r\n.\r\n",
        b"..\r\n.\r\nQUIT\r\n",
        b"." + b"y" * 75 + b"\r\n" + (b"z" * 78 + b"\r\n") * 20000,
        b"last line\r\n",
    )

    async def deliver(self) -> None:
        checked = Verdict.accept(headers=(("X-Checked", "yes"),))
        port = self.proxyWith(FakeFilter(verdicts={Stage.MESSAGE: checked}))
        client = await self.connect(port)
        await self.send(client, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n", 4)
        self.assertIn(b"CHUNKING", client.replies[1].lines)
        stream = b"".join(b"BDAT %d\r\n%s" % (len(c), c) for c in self.CHUNKS[:-1])
        stream += b"BDAT %d LAST\r\n%s" % (len(self.CHUNKS[-1]), self.CHUNKS[-1])
        replies = await self.send(client, stream + b"QUIT\r\n", 9)
        self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 250, 250, 250, 250, 221])
        [message] = self.mta.messages
        self.assertIn(message.queueId.encode(), replies[-2].lines[0])
        # Exactly the bytes sent in chunks, after only the header the filter added.
        self.assertEqual(message.content, b"X-Checked: yes\r\n" + b"".join(self.CHUNKS))
        await client.lost
        self.assertEqual(os.listdir(self.spool), [])

    def test_toMtaWithoutChunking(self) -> defer.Deferred[None]:
        """
        To an MTA without CHUNKING the message goes after DATA, dot-stuffed by the proxy:
        the MTA stores exactly the bytes the client sent in chunks.
        """

        async def go() -> None:
            await self.deliver()
            self.assertNotIn(b"BDAT", bytes(self.mta.transcripts[0]))

        return defer.Deferred.fromCoroutine(go())

    def test_toMtaWithChunking(self) -> defer.Deferred[None]:
        """
        To an MTA with CHUNKING the message goes as one BDAT LAST, raw: the MTA stores
        exactly the bytes the client sent in chunks.
        """

        async def go() -> None:
            self.mta.extensions[b"CHUNKING"] = []
            await self.deliver()
            transcript = bytes(self.mta.transcripts[0])
            self.assertNotIn(b"DATA\r\n", transcript)
            self.assertIn(b"BDAT %d LAST\r\n" % (self.mta.messages[0].size,), transcript)

        return defer.Deferred.fromCoroutine(go())
