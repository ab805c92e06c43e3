"""
Reloading the configuration (SIGHUP, or C{reload()} in the manhole): a broken file is
refused and the running configuration stays; a good one applies to new sessions only.

Over real loopback sockets, with the service as twistd builds it from a file, and the
stand-in MTA; proved by what clients are answered.
"""

from __future__ import annotations

import importlib
import os
import signal
import stat

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater

from mailproxy.filters import pipeline
from mailproxy.service import ProxyService
from mailproxy.testing import RawClient, loopbackConfig, startProxy
from tests.fakes import ProxyTestCase

DENY_ONE = '[filters.access]\ndeny_senders = ["*@one.example"]\n'
DENY_TWO = '[filters.access]\ndeny_senders = ["*@two.example"]\n'


class ReloadTests(ProxyTestCase):
    """Reloads of a running proxy's configuration file."""

    def write(self, extra: str, listen: str = "tcp:0:interface=127.0.0.1") -> None:
        """Rewrite the running proxy's configuration file."""
        with open(self.path, "w") as f:
            f.write(loopbackConfig(self.mtaPort, self.spool, extra, listen))

    def start(self, extra: str) -> tuple[ProxyService, int]:
        service, port = startProxy(self, loopbackConfig(self.mtaPort, self.spool, extra))
        self.path = service.config.path
        return service, port

    async def session(self, port: int) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await client.expect(1)  # the banner first: who talks before it gets 554
        client.send(b"EHLO client.example\r\n")
        await client.expect(2)
        return client

    async def mailFrom(self, client: RawClient, sender: str) -> int:
        """Send MAIL FROM then RSET; return MAIL's reply code."""
        count = len(client.replies)
        client.send(f"MAIL FROM:<{sender}>\r\nRSET\r\n".encode())
        replies = await client.expect(count + 2)
        return replies[count].code

    async def test_brokenFileKeepsRunningConfiguration(self) -> None:
        """
        A reload of a file that is not valid is refused with one log line naming the
        file and the key, and the running configuration stays: its deny list still
        refuses, in sessions opened before and after the attempt.
        """
        service, port = self.start(DENY_ONE)
        before = await self.session(port)
        self.write(DENY_ONE + "[limits]\nrecipients = 0\n")
        self.assertFalse(service.reload())
        [line] = self.logged("reload refused")
        self.assertIn(f"{self.path}: limits.recipients: must be a positive integer", line)
        self.assertNotIn("\n", line)
        after = await self.session(port)
        self.assertEqual(await self.mailFrom(before, "x@one.example"), 550)
        self.assertEqual(await self.mailFrom(after, "x@one.example"), 550)
        self.assertEqual(await self.mailFrom(after, "x@two.example"), 250)

    async def test_notTomlKeepsRunningConfiguration(self) -> None:
        """A file that is not even TOML (half written) is refused the same way."""
        service, port = self.start(DENY_ONE)
        with open(self.path, "a") as f:
            f.write("[filters.access\n")
        self.assertFalse(service.reload())
        self.assertEqual(len(self.logged("not valid TOML")), 1)
        client = await self.session(port)
        self.assertEqual(await self.mailFrom(client, "x@one.example"), 550)

    async def test_goodFileAppliesToNewSessionsOnly(self) -> None:
        """
        A valid file applies to the sessions that start after the reload; a session
        opened before it finishes under the rules it began with.
        """
        service, port = self.start(DENY_ONE)
        before = await self.session(port)
        self.write(DENY_TWO)
        self.assertTrue(service.reload())
        after = await self.session(port)
        self.assertEqual(await self.mailFrom(before, "x@one.example"), 550)
        self.assertEqual(await self.mailFrom(before, "x@two.example"), 250)
        self.assertEqual(await self.mailFrom(after, "x@one.example"), 250)
        self.assertEqual(await self.mailFrom(after, "x@two.example"), 550)
        self.assertEqual(service.config.filters[0].options["deny_senders"], ("*@two.example",))

    async def test_restartOnlyKeys(self) -> None:
        """
        A changed listen address cannot apply without a restart: the reload warns,
        naming proxy.listen, keeps listening where it did, and applies the rest.
        """
        service, port = self.start(DENY_ONE)
        self.write(DENY_TWO, listen="tcp:0:interface=127.0.0.2")
        self.assertTrue(service.reload())
        [warning] = self.logged("takes a restart")
        self.assertIn("proxy.listen", warning)
        self.assertEqual(service.config.listen, ("tcp:0:interface=127.0.0.1",))
        client = await self.session(port)
        self.assertEqual(await self.mailFrom(client, "x@two.example"), 550)

    async def test_sighup(self) -> None:
        """
        A real SIGHUP reloads the file (in the reactor's thread); stopping the service
        puts back the SIGHUP handler that was there before.
        """
        previous = signal.getsignal(signal.SIGHUP)
        service, port = self.start(DENY_ONE)
        self.write(DENY_TWO)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):  # at most 2 s
            if self.logged("reloaded"):
                break
            await deferLater(reactor, 0.01, lambda: None)
        client = await self.session(port)
        self.assertEqual(await self.mailFrom(client, "x@two.example"), 550)
        self.assertEqual(await self.mailFrom(client, "x@one.example"), 250)
        await service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    async def test_newQuarantineDirectoryMade(self) -> None:
        """
        A reload that names a new quarantine directory makes it (mode 0700), since
        reading the file creates nothing; one that cannot be made is refused, naming
        quarantine.dir, and the running configuration stays.
        """
        service, _ = self.start(DENY_ONE)
        quarantine = os.path.join(self.spool, "quarantine")
        self.write(DENY_ONE + f'[quarantine]\ndir = "{quarantine}"\n')
        self.assertTrue(service.reload())
        self.assertEqual(stat.S_IMODE(os.stat(quarantine).st_mode), 0o700)
        self.assertEqual(service.config.quarantine.dir, quarantine)
        elsewhere = os.path.join(self.spool, "missing", "quarantine")
        self.write(DENY_ONE + f'[quarantine]\ndir = "{elsewhere}"\n')
        self.assertFalse(service.reload())
        [line] = self.logged("reload refused")
        self.assertIn("quarantine.dir: cannot create", line)
        self.assertEqual(service.config.quarantine.dir, quarantine)

    async def test_reloadLooksForNoPlugins(self) -> None:
        """
        A reload builds its filters from the kinds found at start-up: with plugin
        discovery made impossible afterwards (as when the service user cannot read the
        installed code), a new configuration still applies.
        """
        service, port = self.start(DENY_ONE)

        def noDiscovery(*args: object) -> None:
            raise AssertionError("plugins looked for after start-up")

        self.patch(pipeline, "getPlugins", noDiscovery)
        self.patch(pipeline, "filterFactories", noDiscovery)
        self.patch(importlib.import_module("twisted.plugin"), "getPlugins", noDiscovery)
        self.write(DENY_TWO)
        self.assertTrue(service.reload())
        self.assertEqual(self.logged("reload refused"), [])
        client = await self.session(port)
        self.assertEqual(await self.mailFrom(client, "x@two.example"), 550)
        self.assertEqual(await self.mailFrom(client, "x@one.example"), 250)
