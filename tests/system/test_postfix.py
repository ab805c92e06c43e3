"""
mailproxy as a twistd process in front of a real Postfix: what a client sees (swaks or a
scripted client), what Postfix queues, and what lands in its Maildir.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from twisted.python import log
from twisted.trial import unittest

from tests.system import harness

ACCESS = {
    "deny_senders": ["*@refused.example"],
    "deny_recipients": ["blocked@*"],
}


class PostfixBehindProxyTests(unittest.TestCase):
    """The proxy relays Postfix's dialogue and refuses what its access filter denies."""

    skip = harness.systemSkipReason("swaks", "postfix")

    def setUp(self) -> None:
        self.reactor = harness.reactor()
        self.postfix = harness.PostfixInstance.fromEnvironment()
        self.maildir = harness.Maildir(self.postfix.maildir)

    async def startProxy(self) -> harness.ProxyProcess:
        """Start a proxy in front of Postfix with the access filter; stop it at test end."""
        workdir = Path(self.mktemp()).resolve()
        port = harness.freePort()
        sections = harness.proxyConfig(
            workdir, port, self.postfix.endpoint, filters={"access": ACCESS}
        )
        proxy = harness.spawnProxy(self.reactor, workdir, sections, port)
        self.addCleanup(self._stopProxy, proxy)
        await proxy.waitUntilReady()
        return proxy

    async def _stopProxy(self, proxy: harness.ProxyProcess) -> None:
        """Stop the proxy and copy its output into the test log."""
        try:
            await proxy.stop()
        finally:
            log.msg(f"mailproxy log ({proxy.logPath}):\n{proxy.log()}")

    def token(self) -> str:
        """A marker unique to this test run, put into the message to find it again."""
        return f"{self.id().rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"

    def rcpt(self, local: str = "alice") -> str:
        """An address in the domain Postfix delivers to its Maildir."""
        return f"{local}@{self.postfix.domain}"

    async def sendDirect(self, token: str) -> None:
        """Send a message straight to Postfix (bypassing the proxy) and wait until it lands."""
        result = await harness.swaks(
            self.reactor,
            self.postfix.port,
            "--from", "sentinel@client.example",
            "--to", self.rcpt("sentinel"),
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
        self.assertEqual(result.status, 0, result.output)
        await self.maildir.waitFor(self.reactor, token)

    async def test_cleanMessageIsDeliveredWithPostfixQueueId(self) -> None:
        """
        A clean message sent through the proxy lands in Postfix's Maildir, and the client's
        250 is Postfix's own reply: its queue id is the one in the delivered message's Received
        header and in Postfix's log of that delivery.
        """
        proxy = await self.startProxy()
        token = self.token()
        result = await harness.swaks(
            self.reactor,
            proxy.port,
            "--from", "sender@client.example",
            "--to", self.rcpt(),
            "--helo", "client.example",
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
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
        proxy = await self.startProxy()
        token = self.token()
        result = await harness.swaks(
            self.reactor,
            proxy.port,
            "--from", "x@refused.example",
            "--to", self.rcpt(),
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
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
        proxy = await self.startProxy()
        token = self.token()
        blocked = self.rcpt("blocked")
        result = await harness.swaks(
            self.reactor,
            proxy.port,
            "--from", "sender@client.example",
            "--to", blocked,
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
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
        proxy = await self.startProxy()
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
        The client sees Postfix's EHLO capabilities minus CHUNKING, XCLIENT and XFORWARD
        (which Postfix offers to the proxy), with PIPELINING kept.
        """
        proxy = await self.startProxy()
        replies = await harness.converse(
            self.reactor, proxy.port, [b"EHLO client.example", b"QUIT"]
        )
        ehlo = replies[1]
        self.assertEqual(ehlo.code, 250, ehlo.text)
        keywords = {line[4:].split(" ", 1)[0].upper() for line in ehlo.lines[1:]}
        self.assertIn("PIPELINING", keywords, ehlo.text)
        self.assertEqual(keywords & {"CHUNKING", "XCLIENT", "XFORWARD"}, set(), ehlo.text)

    async def test_postfixSeesTheClientsHelo(self) -> None:
        """
        Postfix records the client's own HELO name, not the proxy's, in the Received header:
        the proxy passed the client on with XCLIENT.
        """
        proxy = await self.startProxy()
        token = self.token()
        result = await harness.swaks(
            self.reactor,
            proxy.port,
            "--from", "sender@client.example",
            "--to", self.rcpt(),
            "--helo", "helo.client.example",
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
        self.assertEqual(result.status, 0, result.output)
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn("Received: from helo.client.example ", harness.headerBlock(delivered))
