"""
The status page in a real browser: headless Chromium (Debian's, driven by Playwright for
Python) opens the page of a twistd mailproxy in front of the real Postfix while it carries
mail, reads the numbers a person would, and saves a screenshot (its path is printed).

Playwright's sync API blocks, so the browser runs in a thread of the reactor's pool; the
reactor stays free for the test's own SMTP traffic.
"""

from __future__ import annotations

import os
import smtplib
import tempfile
import uuid
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial import unittest

from mailproxy.testing import RawClient
from tests.system import harness

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds the browser may take for anything (loading, a refresh).
BROWSER_TIMEOUT = 20_000
CLEAN, REFUSED = 4, 2


def _skipReason() -> str | None:
    reason = harness.systemSkipReason("swaks", "postfix")
    if reason is not None:
        return reason
    if not os.access(CHROMIUM, os.X_OK):
        return f"system test: {CHROMIUM} not installed (Debian package chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "system test: Playwright for Python not installed (pip install playwright)"
    return None


class StatusPageInBrowserTests(unittest.TestCase):
    """What a person sees on the status page while the proxy relays to Postfix."""

    skip = _skipReason()

    def setUp(self) -> None:
        self.reactor = harness.reactor()
        self.postfix = harness.PostfixInstance.fromEnvironment()

    async def startProxy(self) -> tuple[harness.ProxyProcess, int]:
        """twistd mailproxy with the access filter and the web (the page refreshing each second)."""
        workdir = Path(self.mktemp()).resolve()
        port, webPort = harness.freePort(), harness.freePort()
        sections = harness.proxyConfig(
            workdir,
            port,
            self.postfix.endpoint,
            filters={"access": {"deny_senders": ["*@refused.example"]}},
        )
        sections["web"] = {"listen": f"tcp:{webPort}:interface=127.0.0.1", "refresh": 1}
        proxy = await harness.runProxy(self, self.reactor, workdir, sections, port)
        return proxy, webPort

    async def test_pageShowsTraffic(self) -> None:
        """
        After 4 messages delivered to Postfix and 2 refused by the access filter, with one
        client connected in the middle of a transaction, Chromium renders: 4 accepted
        today, 2 refused, 1 active session (its HELO shown as text), the access filter's
        refusals with their sender; the page's inline style applies under its CSP with no
        console error; and the page refreshes itself to show the next message.
        """
        proxy, webPort = await self.startProxy()
        rcpt = f"alice@{self.postfix.domain}"
        token = uuid.uuid4().hex
        for n in range(CLEAN):
            script = [
                b"EHLO client.example",
                b"MAIL FROM:<sender@client.example>",
                f"RCPT TO:<{rcpt}>".encode(),
                b"DATA",
                harness.message(f"{token}-{n}", "sender@client.example", rcpt),
                b"QUIT",
            ]
            replies = await harness.converse(self.reactor, proxy.port, script)
            self.assertEqual(replies[5].code, 250, replies)
        for n in range(REFUSED):
            script = [
                b"EHLO client.example",
                f"MAIL FROM:<spam{n}@refused.example>".encode(),
                b"QUIT",
            ]
            replies = await harness.converse(self.reactor, proxy.port, script)
            self.assertEqual(replies[2].code, 550, replies)
        # A client in the middle of its transaction while the page is looked at.
        waiting = RawClient()
        await connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", proxy.port), waiting)
        self.addCleanup(lambda: waiting.transport and waiting.transport.loseConnection())
        await waiting.expect(1)  # the banner first: who talks before it gets 554
        waiting.send(b"EHLO <b>bold</b>.example\r\nMAIL FROM:<waiting@client.example>\r\n")
        replies = await waiting.expect(3).addTimeout(harness.REPLY_TIMEOUT, self.reactor)
        self.assertEqual([r.code for r in replies], [220, 250, 250])

        screenshot = Path(self.mktemp()).resolve().with_suffix(".png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        seen = await deferToThread(self._browse, webPort, proxy.port, screenshot)
        print(f"\nstatus page screenshot: {screenshot}", flush=True)
        log.msg(f"status page screenshot: {screenshot}")

        self.assertEqual(seen["accepted"], str(CLEAN))
        self.assertEqual(seen["cardAccepted"], str(CLEAN))
        self.assertEqual(seen["refused"], str(REFUSED))
        self.assertEqual(seen["active"], "1")
        self.assertIn("<b>bold</b>.example", seen["sessions"])
        self.assertEqual(seen["boldInSessions"], 0)
        self.assertIn("spam0@refused.example", seen["refusals"])
        self.assertIn("access", seen["refusals"])
        self.assertEqual(seen["headerBackground"], "rgb(29, 35, 48)")
        self.assertEqual(seen["errors"], [])
        self.assertEqual(seen["afterRefresh"], str(CLEAN + 1))
        self.assertTrue(screenshot.stat().st_size > 10_000)

    def _browse(self, webPort: int, smtpPort: int, screenshot: Path) -> dict[str, Any]:
        """In a worker thread: open the page, read it, screenshot it, watch it refresh."""
        from playwright.sync_api import expect, sync_playwright

        url = f"http://127.0.0.1:{webPort}/"
        with tempfile.TemporaryDirectory(prefix="mp-chromium-") as profile, sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
            )
            try:
                page = context.new_page()
                page.set_default_timeout(BROWSER_TIMEOUT)
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url, wait_until="load")
                seen: dict[str, Any] = {
                    "accepted": page.text_content("#today-messages-accepted"),
                    "cardAccepted": page.text_content("#card-accepted"),
                    "refused": page.text_content("#card-refused"),
                    "active": page.text_content("#card-active"),
                    "sessions": page.inner_text("#sessions"),
                    "boldInSessions": page.locator("#sessions b").count(),
                    "refusals": page.inner_text("#refusals"),
                    "headerBackground": page.eval_on_selector(
                        "header", "e => getComputedStyle(e).backgroundColor"
                    ),
                }
                page.screenshot(path=str(screenshot), full_page=True)
                # One more message (from this thread: blocking is fine here, never in the
                # reactor), then the page's own refresh must show it.
                with smtplib.SMTP(
                    "127.0.0.1", smtpPort, local_hostname="client.example", timeout=30
                ) as smtp:
                    smtp.sendmail(
                        "sender@client.example",
                        [f"alice@{self.postfix.domain}"],
                        "Subject: one more\r\n\r\nHello again.\r\n",
                    )
                expect(page.locator("#today-messages-accepted")).to_have_text(
                    str(CLEAN + 1), timeout=BROWSER_TIMEOUT
                )
                seen["afterRefresh"] = page.text_content("#today-messages-accepted")
                seen["errors"] = errors
                return seen
            finally:
                context.close()
