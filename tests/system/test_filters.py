"""
The content filters against the real daemons: mailproxy as a twistd process in front of the
real Postfix, asking Debian's spamd (offline rules), clamd (a local database holding only
EICAR's signature) and p0f (capturing on lo), all started by C{.ci/run}.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.trial import unittest

from tests.system import harness

#: GTUBE, SpamAssassin's test string (scores 1000).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: EICAR's test file, put together here so that this file itself is no test virus.
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
HAM_BODY = (
    "Hello Alice,\n\nthe minutes of Tuesday's meeting are below. We agreed to move the\n"
    "review to next week and to keep the current schedule otherwise.\n\nRegards,\nBob\n"
)


class _FilterSystemTest(harness.PostfixCase):
    """A proxy in front of Postfix with one filter; swaks as the client."""

    async def send(self, port: int, token: str, *args: str) -> harness.SwaksResult:
        """Send a message tagged with C{token} through the proxy with swaks."""
        return await harness.swaks(
            self.reactor,
            port,
            "--from", "bob@client.example",
            "--to", self.rcpt(),
            "--helo", "client.example",
            "--header", f"Subject: mailproxy filter test {token}",
            "--add-header", f"X-Mailproxy-Test: {token}",
            *args,
        )  # fmt: skip

    def assertRefused(self, result: harness.SwaksResult, reply: str) -> None:
        """swaks was refused at end of data with exactly C{reply}, and nothing was queued."""
        self.assertNotEqual(result.status, 0, result.output)
        self.assertIn(reply, result.replies(), result.output)
        self.assertIsNone(result.queueId(), result.output)

    async def assertNotDelivered(self, token: str) -> None:
        """Nothing tagged C{token} lands, while a message sent after it straight to Postfix
        does: the refused one is not merely late."""
        await self.sendDirect(self.token(), local="alice")
        self.assertEqual(self.maildir.find(token), [])


class SpamdTests(_FilterSystemTest):
    """Debian's spamd (SpamAssassin 4, offline) behind [filters.spamd]."""

    def setUp(self) -> None:
        super().setUp()
        env = harness.componentEnv(
            "MAILPROXY_SPAMD", "MAILPROXY_SPAMD_SOCKET", "MAILPROXY_SPAMD_LOG"
        )
        self.spamdTCP = env["MAILPROXY_SPAMD"]
        self.spamdUNIX = "unix:" + env["MAILPROXY_SPAMD_SOCKET"]
        self.spamdLog = Path(env["MAILPROXY_SPAMD_LOG"])

    async def test_gtubeRefused(self) -> None:
        """
        A message carrying GTUBE is refused at end of data with 550 5.7.1 and spamd's score
        (1000 or a little more), spamd logged it as spam, and Postfix never delivers it.
        """
        proxy = await self.startProxy({"spamd": {"spamd": self.spamdTCP}})
        token = self.token()
        result = await self.send(proxy.port, token, "--body", f"Buy now!\n{GTUBE}\n")
        # GTUBE scores 1000 plus whatever else the rules find in swaks's message.
        [refusal] = [r for r in result.replies() if r.startswith("550 5.7.1 Message refused as spam")]
        score = float(re.search(r"\(score ([0-9.]+)\)", refusal).group(1))  # type: ignore[union-attr]
        self.assertGreaterEqual(score, 1000.0, result.output)
        self.assertNotEqual(result.status, 0, result.output)
        self.assertIsNone(result.queueId(), result.output)
        logged = re.findall(r"identified spam \(([0-9.]+)/5\.0\)", self.spamdLog.read_text(errors="replace"))
        self.assertIn(f"{score:.1f}", logged)
        await self.assertNotDelivered(token)

    async def test_hamDeliveredWithHeaders(self) -> None:
        """
        A plain message, checked over spamd's UNIX socket, is delivered by Postfix with
        X-Spam-Status (No, spamd's score, required 5.0, the rules hit) and X-Spam-Score.
        """
        proxy = await self.startProxy({"spamd": {"spamd": self.spamdUNIX}})
        token = self.token()
        result = await self.send(proxy.port, token, "--body", HAM_BODY)
        self.assertEqual(result.status, 0, result.output)
        self.assertIsNotNone(result.queueId(), result.output)
        # Unfolded: the release folds what it adds to 78 columns.
        headers = re.sub(
            r"\n(?=[ \t])", "", harness.headerBlock(await self.maildir.waitFor(self.reactor, token))
        )
        status = re.search(
            r"^X-Spam-Status: No, score=(-?[\d.]+) required=5\.0 tests=\S+$", headers, re.M
        )
        self.assertIsNotNone(status, headers)
        assert status is not None
        self.assertLess(float(status.group(1)), 5.0)
        self.assertIn(f"X-Spam-Score: {status.group(1)}\n", headers)
        self.assertNotIn("X-Spam-Flag", headers)


class ClamdTests(_FilterSystemTest):
    """Debian's clamd with a local EICAR-only database behind [filters.clamd]."""

    def setUp(self) -> None:
        super().setUp()
        env = harness.componentEnv("MAILPROXY_CLAMD", "MAILPROXY_CLAMD_TCP", "MAILPROXY_CLAMD_LOG")
        self.clamdUNIX = env["MAILPROXY_CLAMD"]
        self.clamdTCP = env["MAILPROXY_CLAMD_TCP"]
        self.clamdLog = Path(env["MAILPROXY_CLAMD_LOG"])

    def attachment(self, name: str, content: str) -> str:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path = path.with_name(name)
        path.write_text(content)
        return str(path)

    async def test_eicarAttachmentRefused(self) -> None:
        """
        A message with EICAR as a base64 attachment is refused with 550 5.7.1 Virus found and
        clamd's signature name; clamd logged the find; Postfix never delivers it.
        """
        proxy = await self.startProxy({"clamd": {"clamd": self.clamdUNIX}})
        token = self.token()
        eicar = self.attachment("eicar.com", EICAR)
        result = await self.send(
            proxy.port, token, "--body", "See attached.\n", "--attach", f"@{eicar}"
        )
        self.assertRefused(result, "550 5.7.1 Virus found: Eicar-Test-Signature.UNOFFICIAL")
        self.assertRegex(
            self.clamdLog.read_text(errors="replace"),
            r"instream\([^)]*\): Eicar-Test-Signature\.UNOFFICIAL FOUND",
        )
        await self.assertNotDelivered(token)

    async def test_cleanAttachmentDelivered(self) -> None:
        """A message with a harmless attachment, scanned over TCP, is delivered intact."""
        proxy = await self.startProxy({"clamd": {"clamd": self.clamdTCP}})
        token = self.token()
        notes = self.attachment("notes.txt", "Nothing to see here.\n" * 50)
        result = await self.send(
            proxy.port, token, "--body", "See attached.\n", "--attach", f"@{notes}"
        )
        self.assertEqual(result.status, 0, result.output)
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn(b'filename="notes.txt"', delivered)
        self.assertIn("clamd: stream: OK", proxy.log())


class P0fTests(_FilterSystemTest):
    """p0f 3 capturing on lo behind [filters.p0f]."""

    def setUp(self) -> None:
        super().setUp()
        unavailable = os.environ.get("MAILPROXY_P0F_UNAVAILABLE")
        if unavailable:
            raise unittest.SkipTest(f"p0f cannot run here: {unavailable}")
        self.socket = harness.componentEnv("MAILPROXY_P0F_SOCKET")["MAILPROXY_P0F_SOCKET"]

    async def test_osGuessLogged(self) -> None:
        """
        The proxy asks the real p0f about the client at connect: its OS guess for the
        loopback client (Linux) is in the proxy's log, and the mail is delivered.
        """
        proxy = await self.startProxy({"p0f": {"socket": self.socket}})
        token = self.token()
        result = await self.send(proxy.port, token)
        self.assertEqual(result.status, 0, result.output)
        await self.maildir.waitFor(self.reactor, token)
        self.assertRegex(
            proxy.log(),
            r"p0f: \[127\.0\.0\.1\] os=Linux flavor=\S+ distance=-?\d+ link=",
            proxy.log(),
        )

    async def test_ruleRefusesByOs(self) -> None:
        """
        A rule on the OS p0f sees for the loopback client (Linux) refuses it at connect with
        554 5.7.1 and the rule's text; Postfix never hears of the session.
        """
        proxy = await self.startProxy(
            {
                "p0f": {
                    "socket": self.socket,
                    "rules": [{"os": "linux", "action": "reject", "text": "No Linux clients here"}],
                }
            },
            greeting=554,
        )
        replies = await harness.converse(self.reactor, proxy.port, [])
        self.assertEqual(
            [(r.code, r.text) for r in replies], [(554, "554 5.7.1 No Linux clients here")]
        )
        self.assertRegex(proxy.log(), r"p0f: \[127\.0\.0\.1\] os=Linux ")
        self.assertIn("connect: refused by p0f: 554 5.7.1 No Linux clients here", proxy.log())
