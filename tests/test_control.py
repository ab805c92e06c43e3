"""
The stats socket: its configuration, its start-up (stale sockets, permissions), and the
JSON it answers after real traffic through the proxy over loopback.

L{ProxyRun} and L{sendTraffic} are shared with C{tests.test_web}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy import testing
from mailproxy.config import ConfigError, load
from mailproxy.control import StatsSocketService
from mailproxy.localmta import LocalMTA
from mailproxy.service import ProxyService
from mailproxy.startup import StartupError
from mailproxy.testing import RawClient, listeningPort, loopbackConfig

ACCESS = '[filters.access]\ndeny_senders = ["*@refused.example"]\n'
BODY = b"Subject: stats test\r\n\r\nHello.\r\n"


def shortTempDir(case: SynchronousTestCase) -> str:
    """A fresh directory with a short path (a UNIX socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="mp-", dir="/tmp")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class Collect(Protocol):
    """Reads until the server closes; C{done} fires with everything received."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(bytes(self.data))


async def readSocket(path: str, send: bytes = b"") -> dict[str, Any]:
    """Connect to the stats socket, optionally send something, and parse its answer."""
    collect = Collect()
    await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), collect)
    if send:
        assert collect.transport is not None
        collect.transport.write(send)
    data = await collect.done.addTimeout(10, reactor)
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    result: dict[str, Any] = json.loads(data)
    return result


async def sendTraffic(
    port: int, clean: int, refused: int, helo: bytes = b"client.example"
) -> list[int]:
    """
    On one connection: C{refused} transactions from a sender the access filter denies,
    then C{clean} messages, then QUIT. Returns every reply code the client saw.
    """
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    expected = 1
    await client.expect(expected)

    async def say(data: bytes, replies: int) -> None:
        nonlocal expected
        client.send(data)
        expected += replies
        await client.expect(expected).addTimeout(20, reactor)

    await say(b"EHLO " + helo + b"\r\n", 1)
    for n in range(refused):
        await say(b"MAIL FROM:<spam%d@refused.example>\r\n" % n, 1)
    for _ in range(clean):
        await say(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n", 3)
        await say(BODY + b".\r\n", 1)
    await say(b"QUIT\r\n", 1)
    await client.lost
    return client.codes


class ProxyRun:
    """A mixin for trial TestCases: the stand-in MTA, and the proxy built as twistd does."""

    mta: LocalMTA
    mtaPort: Any

    def startMta(self: Any) -> None:
        self.mta = LocalMTA()
        self.mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")
        self.addCleanup(self.mtaPort.stopListening)

    def startProxy(self: Any, extra: str = "") -> ProxyService:
        """Start the proxy as twistd builds it, from a configuration with C{extra}."""
        spool = os.path.join(shortTempDir(self), "spool")
        config = loopbackConfig(self.mtaPort.getHost().port, spool, extra)
        service, _ = testing.startProxy(self, config)
        return service

    def proxyPort(self: Any, service: ProxyService) -> int:
        return listeningPort(service)


class ConfigTests(SynchronousTestCase):
    """C{[stats]} and C{[web]} in the configuration file."""

    def load(self, extra: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                '[proxy]\nlisten = "tcp:2525"\nupstream = "tcp:host=127.0.0.1:port=1"\n'
                f'spool_dir = "{os.path.abspath(self.mktemp())}"\n' + extra
            )
        return load(path, MemoryReactorClock())

    def error(self, extra: str) -> str:
        with self.assertRaises(ConfigError) as raised:
            self.load(extra)
        return f"{raised.exception.key}: {raised.exception.message}"

    def test_defaults(self) -> None:
        """Without the sections there is neither a socket nor a web server."""
        config = self.load("")
        self.assertEqual((config.stats.socket, config.stats.mode), (None, 0o660))
        self.assertEqual((config.web.listen, config.web.refresh), (None, 10.0))

    def test_values(self) -> None:
        """The socket path is made absolute; the mode is an octal string or TOML octal."""
        config = self.load('[stats]\nsocket = "s.sock"\nmode = "0640"\n[web]\nlisten = "tcp:0"\n')
        self.assertEqual(config.stats.socket, os.path.abspath("s.sock"))
        self.assertEqual(config.stats.mode, 0o640)
        self.assertEqual(self.load("[stats]\nmode = 0o600\n").stats.mode, 0o600)
        self.assertEqual(self.load('[stats]\nmode = "600"\n').stats.mode, 0o600)

    def test_errors(self) -> None:
        """Wrong values stop start-up, naming the key: decimal mode, long path, bad endpoint."""
        self.assertEqual(
            self.error("[stats]\nmode = 660\n"),
            'stats.mode: must be an octal mode such as "0660", not 660',
        )
        self.assertIn("stats.mode", self.error('[stats]\nmode = "rw-rw----"\n'))
        long = "/tmp/" + "x" * 120 + ".sock"
        self.assertIn("stats.socket: ", self.error(f'[stats]\nsocket = "{long}"\n'))
        self.assertIn("too long for a UNIX socket", self.error(f'[stats]\nsocket = "{long}"\n'))
        self.assertIn("web.listen: ", self.error('[web]\nlisten = "nonsense:1"\n'))
        self.assertIn("web.refresh", self.error("[web]\nrefresh = 0\n"))
        self.assertIn('did you mean "socket"', self.error('[stats]\nsockets = "x"\n'))


class StatsSocketTests(TestCase):
    """The socket's life: permissions, stale files, and one snapshot per connection."""

    def service(self, path: str, mode: int = 0o660) -> StatsSocketService:
        snapshot = {"hello": "world", "n": 1}
        service = StatsSocketService(path, mode, lambda: snapshot, reactor)  # type: ignore[arg-type]
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_snapshotPerConnection(self) -> None:
        """
        Each connection gets the snapshot as one JSON line and is closed, whatever the
        client sends; the file has the configured mode; stopping removes it.
        """

        async def run() -> None:
            path = os.path.join(shortTempDir(self), "s.sock")
            service = self.service(path, 0o600)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertEqual(await readSocket(path), {"hello": "world", "n": 1})
            self.assertEqual(
                await readSocket(path, b"GET / HTTP/1.0\r\n\r\n"), {"hello": "world", "n": 1}
            )
            await service.stopService()
            self.assertFalse(os.path.exists(path))

        return defer.Deferred.fromCoroutine(run())

    def test_staleSocketRemoved(self) -> None:
        """A socket file nobody listens on (left by a crash) is replaced at start."""

        async def run() -> None:
            path = os.path.join(shortTempDir(self), "s.sock")
            old = socket.socket(socket.AF_UNIX)
            old.bind(path)
            old.close()
            self.assertTrue(os.path.exists(path))
            self.service(path)
            self.assertEqual((await readSocket(path))["n"], 1)

        return defer.Deferred.fromCoroutine(run())

    def test_liveSocketKept(self) -> None:
        """A socket another process listens on stops start-up, and is left alone."""
        path = os.path.join(shortTempDir(self), "s.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(1)
        service = StatsSocketService(path, 0o660, dict, reactor)  # type: ignore[arg-type]
        error = self.assertRaises(StartupError, service.startService)
        self.assertEqual(str(error), f"stats.socket: another process is listening on {path}")
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))

    def test_notASocket(self) -> None:
        """A regular file at the path stops start-up and is not removed."""
        path = os.path.join(shortTempDir(self), "s.sock")
        with open(path, "w") as f:
            f.write("precious")
        service = StatsSocketService(path, 0o660, dict, reactor)  # type: ignore[arg-type]
        error = self.assertRaises(StartupError, service.startService)
        self.assertEqual(str(error), f"stats.socket: {path} exists and is not a socket")
        with open(path) as f:
            self.assertEqual(f.read(), "precious")


class TrafficTests(ProxyRun, TestCase):
    """The stats socket of a proxy that carried real traffic over loopback."""

    def setUp(self) -> None:
        self.startMta()

    def test_countsAfterTraffic(self) -> None:
        """
        After 4 clean messages and 3 refused by the access filter (on two connections),
        the socket's JSON counts them today and in total: 7 attempted, 4 accepted with
        their bytes, 3 rejected by "access", 2 connections, no session left active, and
        the 3 refusals listed with client, sender, filter and reply.
        """

        async def run() -> None:
            sock = os.path.join(shortTempDir(self), "stats.sock")
            service = self.startProxy(ACCESS + f'[stats]\nsocket = "{sock}"\nmode = "0640"\n')
            self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o640)
            port = self.proxyPort(service)
            codes = await sendTraffic(port, clean=3, refused=2)
            codes += await sendTraffic(port, clean=1, refused=1)
            self.assertEqual(codes.count(550), 3)
            self.assertEqual(len(self.mta.messages), 4)
            snapshot = await readSocket(sock)
            for period in ("today", "total"):
                counts = snapshot[period]
                self.assertEqual(counts["messages"]["attempted"], 7)
                self.assertEqual(counts["messages"]["accepted"], 4)
                self.assertEqual(counts["messages"]["bytes"], 4 * len(BODY))
                self.assertEqual(counts["messages"]["rejected"], {"access": 3})
                self.assertEqual(counts["recipients"]["accepted"], 4)
                self.assertEqual(counts["connections"]["opened"], 2)
                self.assertEqual(counts["connections"]["accepted"], 2)
            self.assertEqual(snapshot["active"], [])
            refusals = snapshot["refusals"]
            self.assertEqual([r["filter"] for r in refusals], ["access"] * 3)
            self.assertEqual(refusals[0]["sender"], "spam0@refused.example")
            self.assertEqual(refusals[0]["client"], "127.0.0.1")
            self.assertTrue(refusals[0]["reply"].startswith("550 5.7.1"))
            self.assertEqual(snapshot["filters"]["access"]["checks"], 7)
            self.assertEqual(sum(h["accepted"] for h in snapshot["hours"]), 4)

        return defer.Deferred.fromCoroutine(run())

    def test_activeSession(self) -> None:
        """A client in the middle of a transaction is listed with its HELO and sender."""

        async def run() -> None:
            sock = os.path.join(shortTempDir(self), "stats.sock")
            service = self.startProxy(f'[stats]\nsocket = "{sock}"\n')
            client = RawClient()
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort(service)), client
            )
            self.addCleanup(lambda: client.transport and client.transport.loseConnection())
            await client.expect(1)  # the banner first: who talks before it gets 554
            client.send(
                b"EHLO waiting.example\r\nMAIL FROM:<w@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            )
            await client.expect(4).addTimeout(20, reactor)
            [active] = (await readSocket(sock))["active"]
            self.assertEqual(
                (
                    active["client"],
                    active["helo"],
                    active["sender"],
                    active["recipients"],
                    active["phase"],
                ),
                ("127.0.0.1", "waiting.example", "w@example.org", 1, "command"),
            )
            self.assertGreaterEqual(active["age"], 0)

        return defer.Deferred.fromCoroutine(run())
