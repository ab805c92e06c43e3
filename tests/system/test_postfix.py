"""
mailproxy as a twistd process in front of a real Postfix: what a client sees (swaks or a
scripted client), what Postfix queues, and what lands in its Maildir.
"""

from __future__ import annotations

import re

from tests.system import harness

ACCESS = {
    "deny_senders": ["*@refused.example"],
    "deny_recipients": ["blocked@*"],
}


class PostfixBehindProxyTests(harness.PostfixCase):
    """The proxy relays Postfix's dialogue and refuses what its access filter denies."""

    async def send(
        self, port: int, token: str, sender: str, recipient: str, helo: str | None = None
    ) -> harness.SwaksResult:
        """Send a message tagged with C{token} through the proxy with swaks."""
        heloArgs = ["--helo", helo] if helo is not None else []
        return await harness.swaks(
            self.reactor,
            port,
            "--from", sender,
            "--to", recipient,
            *heloArgs,
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip

    async def test_cleanMessageIsDeliveredWithPostfixQueueId(self) -> None:
        """
        A clean message sent through the proxy lands in Postfix's Maildir, and the client's
        250 is Postfix's own reply: its queue id is the one in the delivered message's Received
        header and in Postfix's log of that delivery.
        """
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        result = await self.send(
            proxy.port, token, "sender@client.example", self.rcpt(), helo="client.example"
        )
        self.assertEqual(result.status, 0, result.output)
        queueId = result.queueId()
        self.assertIsNotNone(queueId, f"no 'queued as' in the 250:\n{result.output}")
        delivered = await self.maildir.waitFor(self.reactor, token)
        headers = harness.headerBlock(delivered)
        self.assertRegex(headers, rf"Received: .*\n?\s+by \S+ \(Postfix\) with E?SMTP id {queueId}")
        self.assertRegex(
            self.postfix.maillogText(),
            rf"{queueId}: to=<{re.escape(self.rcpt())}>.*status=sent",
        )

    async def test_refusedSenderNeverReachesPostfix(self) -> None:
        """
        MAIL FROM a denied sender gets 550 from the proxy, Postfix never hears of that sender
        and nothing is delivered for it.
        """
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        result = await self.send(proxy.port, token, "x@refused.example", self.rcpt())
        self.assertNotEqual(result.status, 0, result.output)
        self.assertTrue(
            any(r.startswith("550") for r in result.replies()), f"no 550:\n{result.output}"
        )
        self.assertIsNone(result.queueId(), result.output)
        # A message sent after it, straight to Postfix, lands: the refused one did not.
        await self.sendDirect(self.token())
        self.assertEqual(self.maildir.find(token), [])
        self.assertNotIn("refused.example", self.postfix.maillogText())

    async def test_refusedRecipientNeverReachesPostfix(self) -> None:
        """RCPT TO a denied recipient gets 550 from the proxy and nothing is delivered."""
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        blocked = self.rcpt("blocked")
        result = await self.send(proxy.port, token, "sender@client.example", blocked)
        self.assertNotEqual(result.status, 0, result.output)
        self.assertTrue(
            any(r.startswith("550") for r in result.replies()), f"no 550:\n{result.output}"
        )
        await self.sendDirect(self.token())
        self.assertEqual(self.maildir.find(token), [])
        self.assertNotIn(f"to=<{blocked}>", self.postfix.maillogText())

    async def test_nextMessageOnConnectionAfterRefusal(self) -> None:
        """
        After a refused sender the session goes on: the next transaction on the same
        connection is relayed and delivered, with Postfix's queue id in its 250.
        """
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        replies = await harness.converse(
            self.reactor,
            proxy.port,
            [
                b"EHLO client.example",
                b"MAIL FROM:<x@refused.example>",
                b"MAIL FROM:<sender@client.example>",
                f"RCPT TO:<{self.rcpt()}>".encode(),
                b"DATA",
                harness.message(token, "sender@client.example", self.rcpt()),
                b"QUIT",
            ],
        )
        codes = [r.code for r in replies]
        transcript = "\n".join(r.text for r in replies)
        self.assertEqual(codes, [220, 250, 550, 250, 250, 354, 250, 221], transcript)
        queued = re.search(r"queued as ([0-9A-Za-z]+)", replies[6].text)
        self.assertIsNotNone(queued, transcript)
        assert queued is not None
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn(f"id {queued.group(1)}", harness.headerBlock(delivered))

    async def test_capabilitiesAreEdited(self) -> None:
        """
        The client sees Postfix's EHLO capabilities minus XCLIENT and XFORWARD (which
        Postfix offers to the proxy), with PIPELINING kept and CHUNKING (the proxy's own).
        """
        proxy = await self.startProxy({"access": ACCESS})
        replies = await harness.converse(
            self.reactor, proxy.port, [b"EHLO client.example", b"QUIT"]
        )
        ehlo = replies[1]
        self.assertEqual(ehlo.code, 250, ehlo.text)
        keywords = {line[4:].split(" ", 1)[0].upper() for line in ehlo.lines[1:]}
        self.assertIn("PIPELINING", keywords, ehlo.text)
        self.assertEqual(keywords & {"XCLIENT", "XFORWARD"}, set(), ehlo.text)
        self.assertIn("CHUNKING", keywords, ehlo.text)

    async def test_bdatDeliveredByteIdentical(self) -> None:
        """
        A client sending its message in BDAT chunks (dot lines in them) through the proxy:
        Postfix, which offers CHUNKING, queues it with its own reply relayed as the last
        chunk's, and the delivered message holds the client's bytes exactly.
        """
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        # With a Date: of its own, so that Postfix adds none among the client's headers.
        content = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        content += harness.message(token, "sender@client.example", self.rcpt())[:-3]
        content += b".\r\n..\r\n.dot line\r\nlast\r\n"
        chunks = [content[:40], content[40:-20], content[-20:]]
        stream = b"".join(b"BDAT %d\r\n%s" % (len(c), c) for c in chunks[:-1])
        stream += b"BDAT %d LAST\r\n%s" % (len(chunks[-1]), chunks[-1])
        reader = await harness._connect(self.reactor, proxy.port)
        try:
            envelope = f"MAIL FROM:<sender@client.example>\r\nRCPT TO:<{self.rcpt()}>\r\n"
            commands = b"EHLO client.example\r\n" + envelope.encode() + stream
            replies = [await reader.nextReply(self.reactor)]  # the banner first: else 554
            reader.transport.write(commands)  # type: ignore[union-attr]
            replies += [await reader.nextReply(self.reactor) for _ in range(6)]
        finally:
            reader.transport.loseConnection()  # type: ignore[union-attr]
        transcript = "\n".join(f"{r.code} {r.text}" for r in replies)
        self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 250, 250, 250], transcript)
        self.assertRegex(replies[-1].text, r"queued as [0-9A-Za-z]+", transcript)
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn(content, delivered.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))

    async def test_postfixSeesTheClientsHelo(self) -> None:
        """
        Postfix records the client's own HELO name, not the proxy's, in the Received header:
        the proxy passed the client on with XCLIENT.
        """
        proxy = await self.startProxy({"access": ACCESS})
        token = self.token()
        result = await self.send(
            proxy.port, token, "sender@client.example", self.rcpt(), helo="helo.client.example"
        )
        self.assertEqual(result.status, 0, result.output)
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn("Received: from helo.client.example ", harness.headerBlock(delivered))
