"""
The rspamd filter against Debian's real rspamd (3.4, its default rules, offline: see
tests/system/components/rspamd.sh), started by C{.ci/run}: mailproxy as a twistd process in
front of the real Postfix, swaks as the client, Postfix's Maildir read back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue

from tests.system import harness

#: rspamd's own GTUBE pattern (its gtube module: action reject, "Gtube pattern").
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM_BODY = (
    "Hello Alice,\n\nthe minutes of Tuesday's meeting are below. We agreed to move the\n"
    "review to next week and to keep the current schedule otherwise.\n\nRegards,\nBob\n"
)
SCRIPT = Path(__file__).parent / "components" / "rspamd.sh"


class RspamdTests(harness.PostfixCase):
    """Debian's rspamd behind [filters.rspamd]."""

    def setUp(self) -> None:
        super().setUp()
        env = harness.componentEnv(
            "MAILPROXY_RSPAMD", "MAILPROXY_RSPAMD_BASE", "MAILPROXY_RSPAMD_LOG"
        )
        self.rspamd = env["MAILPROXY_RSPAMD"]
        self.base = env["MAILPROXY_RSPAMD_BASE"]
        self.rspamdLog = Path(env["MAILPROXY_RSPAMD_LOG"])

    async def send(self, port: int, token: str, *args: str) -> harness.SwaksResult:
        """Send a message tagged with C{token} through the proxy with swaks."""
        return await harness.swaks(
            self.reactor,
            port,
            "--from", "bob@client.example",
            "--to", self.rcpt(),
            "--helo", "client.example",
            "--header", f"Subject: mailproxy rspamd test {token}",
            "--add-header", f"X-Mailproxy-Test: {token}",
            *args,
        )  # fmt: skip

    async def script(self, action: str) -> str:
        """Run C{rspamd.sh ACTION BASE}; its output. @raise RuntimeError: it failed."""
        out, err, status = await getProcessOutputAndValue(
            "/bin/bash",
            [str(SCRIPT), action, self.base],
            env=dict(os.environ),
            reactor=self.reactor,
        )
        text = (out + err).decode("utf-8", "replace")
        if status != 0:
            raise RuntimeError(f"rspamd.sh {action} failed ({status}):\n{text}")
        return text

    async def assertNotDelivered(self, token: str) -> None:
        """Nothing tagged C{token} lands, while a message sent after it straight to Postfix
        does: the refused one is not merely late."""
        await self.sendDirect(self.token(), local="alice")
        self.assertEqual(self.maildir.find(token), [])

    async def test_gtubeRefused(self) -> None:
        """
        rspamd's GTUBE is refused at end of data with 550 5.7.1 and rspamd's own reason;
        rspamd logged the scan as a reject, with the session's id, address, sender and
        recipient mailproxy sent it; Postfix never delivers it.
        """
        proxy = await self.startProxy({"rspamd": {"rspamd": self.rspamd}})
        token = self.token()
        logged = self.rspamdLog.stat().st_size
        result = await self.send(proxy.port, token, "--body", f"Buy now!\n{GTUBE}\n")
        self.assertIn("550 5.7.1 Gtube pattern", result.replies(), result.output)
        self.assertNotEqual(result.status, 0, result.output)
        self.assertIsNone(result.queueId(), result.output)
        with self.rspamdLog.open("rb") as f:
            f.seek(logged)
            log = f.read().decode("utf-8", "replace")
        line = re.search(
            r"qid: <([^>]+)>, ip: 127\.0\.0\.1, from: <bob@client\.example>, "
            r"\(default: [TS] \(reject\): \[15\.00/15\.00\] \[GTUBE.*"
            rf"rcpts: <{re.escape(self.rcpt())}>",
            log,
        )
        self.assertIsNotNone(line, log)
        assert line is not None
        # The Queue-Id rspamd logged is the session's id, as in mailproxy's log.
        self.assertIn(f"{line.group(1)} ", proxy.log())
        await self.assertNotDelivered(token)

    async def test_hamDeliveredWithHeaders(self) -> None:
        """
        A plain message is delivered by Postfix with mailproxy's score headers (rspamd's
        score and action) and the headers rspamd's answer asks to add (X-Spamd-Result,
        X-Rspamd-Server), its body untouched.
        """
        proxy = await self.startProxy({"rspamd": {"rspamd": self.rspamd}})
        token = self.token()
        result = await self.send(proxy.port, token, "--body", HAM_BODY)
        self.assertEqual(result.status, 0, result.output)
        self.assertIsNotNone(result.queueId(), result.output)
        delivered = await self.maildir.waitFor(self.reactor, token)
        headers = harness.headerBlock(delivered)
        score = re.search(r"^X-Rspamd-Score: (-?[\d.]+) / 15\.00$", headers, re.M)
        self.assertIsNotNone(score, headers)
        assert score is not None
        self.assertLess(float(score.group(1)), 6.0, headers)
        self.assertIn("\nX-Rspamd-Action: no action\n", headers)
        result_ = re.search(
            r"^X-Spamd-Result: default: False \[(-?[\d.]+) / 15\.00\];", headers, re.M
        )
        self.assertIsNotNone(result_, headers)
        assert result_ is not None
        self.assertEqual(result_.group(1), score.group(1))
        self.assertRegex(headers, r"(?m)^X-Rspamd-Server: \S+$")
        self.assertIn(
            b"\n\nHello Alice,\n\nthe minutes of Tuesday's", delivered.replace(b"\r\n", b"\n")
        )

    async def test_forgedHeadersRemoved(self) -> None:
        """
        The X-Spam and X-Spamd-Result headers a client forges are removed as rspamd's
        milter.remove_headers asks: the delivered copy has only rspamd's X-Spamd-Result.
        """
        proxy = await self.startProxy({"rspamd": {"rspamd": self.rspamd}})
        token = self.token()
        result = await self.send(
            proxy.port, token,
            "--add-header", "X-Spam: No",
            "--add-header", "X-Spamd-Result: default: False [-100.00 / 15.00]",
            "--body", HAM_BODY,
        )  # fmt: skip
        self.assertEqual(result.status, 0, result.output)
        headers = harness.headerBlock(await self.maildir.waitFor(self.reactor, token))
        self.assertNotRegex(headers, r"(?m)^X-Spam:")
        self.assertEqual(len(re.findall(r"(?m)^X-Spamd-Result:", headers)), 1, headers)
        self.assertNotIn("-100.00", headers)

    async def test_rspamdStopped(self) -> None:
        """
        rspamd stopped: on_error applies, by default a tempfail (451 4.7.1, nothing
        delivered); with on_error = "accept" the message is delivered as it came, without
        rspamd's headers. rspamd is started again for the tests that follow.
        """
        await self.script("stop")
        self.addCleanup(self.script, "start")
        proxy = await self.startProxy({"rspamd": {"rspamd": self.rspamd}})
        token = self.token()
        result = await self.send(proxy.port, token, "--body", f"{GTUBE}\n")
        tempfail = [r for r in result.replies() if r.startswith("451 4.7.1")]
        self.assertTrue(tempfail, result.output)
        self.assertIsNone(result.queueId(), result.output)
        self.assertTrue(proxy.log().count("rspamd at " + self.rspamd + " unreachable"), proxy.log())
        await self.assertNotDelivered(token)

        lenient = await self.startProxy({"rspamd": {"rspamd": self.rspamd, "on_error": "accept"}})
        token = self.token()
        result = await self.send(lenient.port, token, "--body", f"{GTUBE}\n")
        self.assertEqual(result.status, 0, result.output)
        headers = harness.headerBlock(await self.maildir.waitFor(self.reactor, token))
        self.assertNotIn("X-Rspamd", headers)
