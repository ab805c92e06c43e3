"""
The greeting against real Postfix: with C{proxy.greeting = "own"} idle clients hold no
smtpd process (Postfix's log shows no connection for them, C{ss} no connection from the
proxy to its port), and a client that says EHLO is served; with "mta" each holds one. A
small private Postfix (C{default_process_limit = 3}) shows the capacity problem of the
issue scaled down: with "mta" the client past the limit gets 421 4.3.2 after mta_banner,
not after mta_reply; with "own" twenty idle clients leave it free for those that send.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.system import harness

HERE = Path(__file__).resolve().parent
INSTANCE = HERE / "postfix" / "instance.sh"
IDLE = 20


async def mtaConnections(reactor: Any, port: int) -> int:
    """How many established TCP connections go to 127.0.0.1:C{port} (the MTA's), per ss."""
    result = await harness.runProcess(
        reactor, ["ss", "-Htn", "state", "established", f"( dport = :{port} )"], timeout=10
    )
    if result.status != 0:
        raise RuntimeError(f"ss failed: {result.err}")
    return len([line for line in result.out.splitlines() if line.strip()])


async def settle(reactor: Any, port: int, wanted: int, timeout: float = 10.0) -> int:
    """Poll the count of connections to C{port} until it is C{wanted} (bounded); the last count."""
    deadline = reactor.seconds() + timeout
    while True:
        count = await mtaConnections(reactor, port)
        if count == wanted or reactor.seconds() >= deadline:
            return count
        await deferLater(reactor, harness.POLL_INTERVAL, lambda: None)


class GreetingCase(unittest.TestCase):
    """A proxy (twistd) in front of a Postfix instance, with the greeting chosen per test."""

    postfix: harness.PostfixInstance

    def setUp(self) -> None:
        self.reactor = harness.reactor()

    async def startProxy(
        self, greeting: str, timeouts: dict[str, harness.TomlValue] | None = None
    ) -> harness.ProxyProcess:
        workdir = Path(self.mktemp()).resolve()
        port = harness.freePort()
        sections = harness.proxyConfig(
            workdir, port, self.postfix.endpoint, proxy={"greeting": greeting}
        )
        sections["limits"] = {"connections": 100, "connections_per_client": 100}
        sections["timeouts"] = dict(timeouts or {})
        proxy = await harness.runProxy(self, self.reactor, workdir, sections, port)
        # The start-up probe's connection is over before anything is counted.
        probed = await harness.waitUntil(self.reactor, lambda: "is answering" in proxy.log())
        self.assertTrue(probed, proxy.log())
        self.assertEqual(await settle(self.reactor, self.postfix.port, 0), 0)
        return proxy

    async def idle(self, proxy: harness.ProxyProcess, count: int) -> list[harness.SmtpSession]:
        """C{count} clients that read the banner and say nothing more."""
        clients = []
        for _ in range(count):
            client = await harness.SmtpSession.open(self.reactor, proxy.port)
            self.addCleanup(client.close)
            clients.append(client)
        return clients

    async def deliver(
        self, proxy: harness.ProxyProcess, token: str, maildir: harness.Maildir
    ) -> None:
        """One message through the proxy (banner, EHLO, MAIL, RCPT, DATA, QUIT); delivered."""
        client = await harness.SmtpSession.open(self.reactor, proxy.port)
        self.addCleanup(client.close)
        rcpt = f"alice@{self.postfix.domain}"
        self.assertEqual((await client.reply()).code, 220, client.transcript())
        for line, code in (
            (b"EHLO client.example", 250),
            (b"MAIL FROM:<sender@client.example>", 250),
            (f"RCPT TO:<{rcpt}>".encode(), 250),
            (b"DATA", 354),
        ):
            self.assertEqual((await client.command(line)).code, code, client.transcript())
        client.write(harness.message(token, "sender@client.example", rcpt))
        reply = await client.reply()
        self.assertEqual(reply.code, 250, client.transcript())
        self.assertIn("queued as", reply.text)
        self.assertEqual((await client.command(b"QUIT")).code, 221)
        await maildir.waitFor(self.reactor, token)


class PostfixGreetingTests(GreetingCase):
    """In front of the private Postfix that .ci/run starts."""

    skip = harness.systemSkipReason("postfix", "ss")

    def setUp(self) -> None:
        super().setUp()
        self.postfix = harness.PostfixInstance.fromEnvironment()

    async def test_ownGreetingIdleClientsHoldNoSmtpd(self) -> None:
        """
        greeting = "own": twenty idle clients get mailproxy's 220 and Postfix hears of none
        of them (no connection to its port, no "connect from" in its log); then one of them
        that says EHLO is served, over the one connection it makes, and its message lands.
        """
        proxy = await self.startProxy("own")
        since = self.postfix.maillogSize()
        clients = await self.idle(proxy, IDLE)
        for client in clients:
            banner = await client.reply()
            self.assertEqual(banner.lines, ("220 mailproxy.test ESMTP",))
        self.assertEqual(await mtaConnections(self.reactor, self.postfix.port), 0)
        self.assertNotIn("connect from", self.postfix.maillogText(since))
        talker = clients[0]
        self.assertEqual((await talker.command(b"EHLO client.example")).code, 250)
        self.assertEqual(await mtaConnections(self.reactor, self.postfix.port), 1)
        token = f"own-{os.getpid()}-{time.time_ns()}"
        await self.deliver(proxy, token, harness.Maildir(self.postfix.maildir))
        self.assertEqual(
            len(re.findall(r"smtpd\[\d+\]: connect from", self.postfix.maillogText(since))), 2
        )
        self.assertTrue(all(c.connected for c in clients))

    async def test_mtaGreetingIdleClientsHoldOneEach(self) -> None:
        """greeting = "mta" (the default): each idle client holds a Postfix connection."""
        proxy = await self.startProxy("mta")
        clients = await self.idle(proxy, IDLE)
        for client in clients:
            banner = await client.reply()
            self.assertEqual(banner.code, 220)
            self.assertIn("ESMTP Postfix", banner.text)
        self.assertEqual(await mtaConnections(self.reactor, self.postfix.port), IDLE)


class SmallPostfixTests(GreetingCase):
    """
    A private Postfix of its own whose smtpd may run three processes at once
    (C{default_process_limit = 3}, as 100 is Postfix's default): the 101st client of the
    issue is the 4th here.
    """

    skip = harness.systemSkipReason("postfix", "ss") or (
        None if os.geteuid() == 0 else "system test: starting a Postfix instance needs root"
    )
    LIMIT = 3

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        base = tempfile.mkdtemp(prefix="mailproxy-small-postfix-", dir="/tmp")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)  # Postfix's delivery agent (nobody) walks down to the Maildir
        extra = Path(base) / "main-extra.cf"
        extra.write_text(f"default_process_limit = {self.LIMIT}\n")
        env = [
            f"MAILPROXY_POSTFIX_PORT={harness.freePort()}",
            "MAILPROXY_POSTFIX_ENV_PREFIX=MAILPROXY_SMALL",
            f"MAILPROXY_POSTFIX_MAIN_EXTRA={extra}",
        ]
        instance = Path(base) / "instance"
        started = await harness.runProcess(
            self.reactor, ["/usr/bin/env", *env, str(INSTANCE), "start", str(instance)], timeout=30
        )
        self.addCleanup(self.stopPostfix, instance)
        if started.status != 0:
            raise RuntimeError(f"the small Postfix did not start: {started.err}")
        exports = dict(re.findall(r"^export (\w+)=(.*)$", started.out, re.M))
        self.postfix = harness.PostfixInstance.fromEnvironment(exports, prefix="MAILPROXY_SMALL")

    async def stopPostfix(self, instance: Path) -> None:
        await harness.runProcess(self.reactor, [str(INSTANCE), "stop", str(instance)], timeout=30)

    async def test_mtaGreetingPastTheLimitGets421(self) -> None:
        """
        greeting = "mta": three idle clients take every smtpd process; the fourth gets
        421 4.3.2 once mta_banner (2 s) has passed, not after mta_reply (300 s).
        """
        proxy = await self.startProxy("mta", {"mta_banner": 2})
        clients = await self.idle(proxy, self.LIMIT)
        for client in clients:
            self.assertEqual((await client.reply()).code, 220)
        started = self.reactor.seconds()
        [late] = await self.idle(proxy, 1)
        reply = await late.reply(timeout=20)
        waited = self.reactor.seconds() - started
        self.assertEqual(reply.code, 421, late.transcript())
        self.assertTrue(reply.text.startswith("421 4.3.2 "), reply.text)
        self.assertGreaterEqual(waited, 1.9)
        self.assertLess(waited, 10)
        self.assertIn("the MTA did not greet within 2.0 s (timeouts.mta_banner)", proxy.log())
        # Postfix never ran more smtpd processes than its limit: the fourth client never
        # reached one.
        pids = set(re.findall(r"smtpd\[(\d+)\]", self.postfix.maillogText()))
        self.assertLessEqual(len(pids), self.LIMIT, self.postfix.maillogText())

    async def test_ownGreetingIdleClientsLeaveItFree(self) -> None:
        """
        greeting = "own": twenty idle clients hold none of the three smtpd processes;
        three clients that then send a message each are served, and their messages land.
        """
        proxy = await self.startProxy("own", {"mta_banner": 5})
        clients = await self.idle(proxy, IDLE)
        for client in clients:
            self.assertEqual((await client.reply()).code, 220)
        self.assertEqual(await mtaConnections(self.reactor, self.postfix.port), 0)
        maildir = harness.Maildir(self.postfix.maildir)
        for n in range(self.LIMIT):
            await self.deliver(proxy, f"small-{n}-{os.getpid()}-{time.time_ns()}", maildir)
        self.assertTrue(all(c.connected for c in clients))
        pids = set(re.findall(r"smtpd\[(\d+)\]", self.postfix.maillogText()))
        self.assertLessEqual(len(pids), self.LIMIT, self.postfix.maillogText())
