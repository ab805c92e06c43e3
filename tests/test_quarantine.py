"""
The quarantine: what a quarantining filter refuses is kept (message and sidecar, 0600),
listed, shown, released to the MTA and deleted by the command (L{mailproxy.quarantinectl}),
and expired.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailproxy
from mailproxy import quarantinectl
from mailproxy.config import Config, FilterSpec, QuarantineSettings, Timeouts, load
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Stage, Verdict
from mailproxy.filters.pipeline import filterFactories
from mailproxy.localmta import LocalMTA
from mailproxy.quarantine import Quarantine
from mailproxy.service import ProxyService
from mailproxy.testing import FakeFilter
from mailproxy.testing_threads import ThreadedClock
from tests.test_relay import MESSAGE, STUFFED, Harness, envelope

DAY = 86400.0
#: 2025-01-01T00:00:00Z: clocks start here, so that entries have real dates.
EPOCH = 1735689600.0


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


class KeepTests(SynchronousTestCase):
    """Refused messages going into the quarantine, through the relay, in memory."""

    def harness(self, verdict: Verdict, quarantined: bool = True) -> tuple[Harness, str]:
        spam = FakeFilter(name="spam", verdicts={Stage.MESSAGE: verdict})
        h = Harness(self, spam)
        clock = ThreadedClock()
        clock.advance(EPOCH)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        q = Quarantine(directory, 30, ["spam"] if quarantined else [], clock)
        factory = h.memory.factory
        factory.settings = attrs.evolve(factory.settings, quarantine=q)
        return h, directory

    def send(self, h: Harness) -> list[int]:
        client = h.greeted()
        h.send(client, envelope(b"a@example.org", b"b@example.net", b"c@example.net"))
        h.send(client, b"DATA\r\n" + STUFFED)
        return client.codes

    def test_refusedMessageKept(self) -> None:
        """
        A message refused by a filter with quarantine = true gets its 550 and never
        reaches the MTA, and lands in the quarantine: the message as the client sent
        it and a sidecar with its envelope and verdict, both mode 0600, and no spool
        file is left.
        """
        h, directory = self.harness(Verdict.reject("Looks like spam"))
        self.assertEqual(self.send(h)[-1], 550)
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        [eml, sidecar] = files(directory)
        self.assertTrue(eml.endswith(".eml") and sidecar.endswith(".json"))
        with open(os.path.join(directory, eml), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        with open(os.path.join(directory, sidecar)) as f:
            meta = json.load(f)
        [session] = {s.session.id for s in h.memory.factory.sessions}
        self.assertEqual(
            {k: meta[k] for k in ("client", "helo", "sender", "recipients", "filter", "reply")},
            {
                "client": "127.0.0.1",
                "helo": "client.example",
                "sender": "a@example.org",
                "recipients": ["b@example.net", "c@example.net"],
                "filter": "spam",
                "reply": "550 5.7.1 Looks like spam",
            },
        )
        self.assertEqual(meta["session"], session)
        self.assertEqual(meta["time"], "2025-01-01T00:00:00+00:00")
        self.assertEqual(meta["id"], sidecar[: -len(".json")])
        self.assertIn(session, meta["id"])
        for name in (eml, sidecar):
            self.assertEqual(mode(os.path.join(directory, name)), 0o600)

    def test_otherFiltersNotKept(self) -> None:
        """A refusal by a filter without quarantine = true keeps nothing."""
        h, directory = self.harness(Verdict.reject("Looks like spam"), quarantined=False)
        self.assertEqual(self.send(h)[-1], 550)
        self.assertEqual(files(directory), [])

    def test_tempfailNotKept(self) -> None:
        """A tempfail keeps nothing: the client will send the message again."""
        h, directory = self.harness(Verdict.tempfail("Try later"))
        self.assertEqual(self.send(h)[-1], 451)
        self.assertEqual(files(directory), [])

    def test_failureDoesNotChangeTheReply(self) -> None:
        """
        A quarantine that cannot be written (its directory gone) is logged as an error;
        the client still gets its 550 and the session goes on.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h, directory = self.harness(Verdict.reject("Looks like spam"))
        os.rmdir(directory)
        codes = self.send(h)
        self.assertEqual(codes[-1], 550)
        self.assertTrue(any("cannot quarantine" in formatEvent(e) for e in events))
        self.assertEqual(h.spooled(), [])

    def test_copiedAcrossFileSystems(self) -> None:
        """Where a hard link cannot be made, the message is copied, still mode 0600."""
        h, directory = self.harness(Verdict.reject("Looks like spam"))

        def noLinks(source: str, target: str) -> None:
            raise OSError(18, "Invalid cross-device link")

        self.patch(os, "link", noLinks)
        self.assertEqual(self.send(h)[-1], 550)
        [eml, _] = files(directory)
        with open(os.path.join(directory, eml), "rb") as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(mode(os.path.join(directory, eml)), 0o600)


def keep(
    q: Quarantine,
    case: SynchronousTestCase,
    sender: str = "a@example.org",
    content: bytes = MESSAGE,
    recipients: list[str] | None = None,
) -> str:
    """Quarantine a message now (by q's clock); return its id."""
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(content)
    session = Session("429C1EE089", "192.0.2.1", 40000, helo="client.example")
    envelope = Envelope(sender, "", recipients or ["b@example.net"])
    verdict = attrs.evolve(Verdict.reject("Looks like spam"), filter="spam")
    entryId = case.successResultOf(q.keep(Message(path, len(content)), session, envelope, verdict))
    assert entryId is not None
    return entryId


class RetentionTests(SynchronousTestCase):
    """Entries older than retention_days go, at start-up and daily, by the injected clock."""

    def test_expiry(self) -> None:
        """
        At start-up the service removes the entries over 30 days old; then once a day,
        each entry goes when its 30 days are over; younger ones stay.
        """
        directory = os.path.abspath(self.mktemp())
        spool = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.makedirs(spool)
        clock = ThreadedClock()
        clock.advance(EPOCH)
        q = Quarantine(directory, 30, ["spam"], clock)
        old = keep(q, self)
        clock.advance(20 * DAY)
        young = keep(q, self)
        clock.advance(10 * DAY + 1)
        config = Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream="tcp:host=127.0.0.1:port=1",
            hostname="proxy.test",
            spoolDir=spool,
            filters=(FilterSpec("access", quarantine=True),),
            quarantine=QuarantineSettings(dir=directory, retentionDays=30),
        )
        service = ProxyService(config, clock, filterFactories())
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([e.id for e in q.entries()], [young])
        self.assertNotIn(old, "".join(files(directory)))
        clock.advance(DAY * 19)
        self.assertEqual([e.id for e in q.entries()], [young])
        clock.advance(DAY)
        self.assertEqual(files(directory), [])

    def test_incompleteEntriesExpire(self) -> None:
        """A message file whose sidecar was never written (a crash) also expires."""
        directory = self.mktemp()
        os.makedirs(directory)
        clock = ThreadedClock()
        clock.advance(EPOCH + 31 * DAY)
        orphan = os.path.join(directory, "20250101T000000Z-429C1EE089-abcdef.eml")
        with open(orphan, "wb") as f:
            f.write(MESSAGE)
        os.utime(orphan, (EPOCH, EPOCH))
        q = Quarantine(directory, 30, [], clock)
        self.assertEqual(q.entries(), [])
        q.expire()
        self.assertEqual(files(directory), [])


class CommandTests(TestCase):
    """C{mailproxy-quarantine} (L{mailproxy.quarantinectl}): list, show, release, delete."""

    def setUp(self) -> None:
        self.mta = LocalMTA()
        self.mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.mtaPort.stopListening)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = self.writeConfig(f"tcp:host=127.0.0.1:port={self.mtaPort.getHost().port}")
        clock = ThreadedClock()
        clock.advance(EPOCH)
        q = Quarantine.fromConfig(load(self.config, reactor), clock)
        assert q is not None
        self.quarantine = q

    def writeConfig(self, upstream: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nlisten = "tcp:0"\nupstream = "{upstream}"\n'
                f'spool_dir = "{os.path.abspath(self.mktemp())}"\nhostname = "proxy.test"\n'
                f'[quarantine]\ndir = "{self.directory}"\n'
            )
        return path

    async def command(self, *argv: str, config: str | None = None) -> tuple[int, str, str]:
        """Run the command on the reactor; return its exit status, its output and errors."""
        out, err = io.StringIO(), io.StringIO()
        status = await quarantinectl.command(
            reactor, ["--config", config or self.config, *argv], out, err
        )
        return status, out.getvalue(), err.getvalue()

    async def test_listShowDelete(self) -> None:
        """
        list prints one line per message (id, time, filter, envelope, reply); show
        prints the sidecar then the message; delete removes both files.
        """
        entryId = keep(self.quarantine, self)
        status, listing, _ = await self.command("list")
        self.assertEqual(status, 0)
        self.assertEqual(
            listing,
            f"{entryId}  2025-01-01T00:00:00+00:00  spam  <a@example.org> -> b@example.net"
            "  550 5.7.1 Looks like spam\n",
        )
        status, shown, _ = await self.command("show", entryId)
        self.assertEqual(status, 0)
        sidecar, _, message = shown.partition("\n\n")
        self.assertEqual(json.loads(sidecar)["client"], "192.0.2.1")
        self.assertEqual(message, MESSAGE.decode())
        self.assertEqual(await self.command("delete", entryId), (0, f"{entryId} deleted\n", ""))
        self.assertEqual(files(self.directory), [])

    async def test_unknownId(self) -> None:
        """An id that is not in the quarantine (or not an id at all) exits 1."""
        for command, entryId in [("show", "20250101T000000Z-X-abcdef"), ("release", "../x")]:
            self.assertEqual(
                await self.command(command, entryId),
                (1, "", f"mailproxy-quarantine: no such message: {entryId}\n"),
            )

    async def test_missingDirectory(self) -> None:
        """
        A quarantine directory that does not exist (the proxy creates it when it starts,
        reading the configuration does not) is one line and exit 1, not a traceback.
        """
        os.rmdir(self.directory)
        self.assertEqual(
            await self.command("list"),
            (
                1,
                "",
                f"mailproxy-quarantine: cannot read {self.directory}: No such file or directory\n",
            ),
        )

    async def test_release(self) -> None:
        """
        release sends the message to the configured MTA with its envelope, prints the
        MTA's reply, and removes it from the quarantine.
        """
        entryId = keep(self.quarantine, self)
        status, out, err = await self.command("release", entryId)
        self.assertEqual((status, err), (0, ""))
        [message] = self.mta.messages
        self.assertEqual(out, f"{entryId} released: 250 2.0.0 Ok: queued as {message.queueId}\n")
        self.assertEqual(
            (message.mailFrom, message.recipients), ("a@example.org", ["b@example.net"])
        )
        self.assertEqual(message.content, MESSAGE)
        self.assertEqual(files(self.directory), [])

    async def test_releaseStreamsExactly(self) -> None:
        """
        A message of many chunks arrives byte for byte: lines that start with a dot are
        dot-stuffed wherever the chunks split, the first line and a line right at a
        chunk boundary included, so that no line of it can end the DATA early.
        """
        chunk = FileSender.CHUNK_SIZE
        first = b".first\r\n\r\n"
        first += b"x" * (chunk - len(first) - 2) + b"\r\n"
        content = first + b".\r\n..two\r\n" + b"y" * chunk + b"\r\n.\r\n"
        self.assertEqual(content[chunk - 2 : chunk + 3], b"\r\n.\r\n")
        entryId = keep(self.quarantine, self, content=content)
        status, _, err = await self.command("release", entryId)
        self.assertEqual((status, err), (0, ""))
        [message] = self.mta.messages
        self.assertEqual(message.content, content)

    async def test_releaseReadsInChunks(self) -> None:
        """The message file is read a chunk at a time, never whole."""
        content = b"Subject: big\r\n\r\n" + b"z" * 998 * 300 + b"\r\n"
        reads: list[int | None] = []

        class Recording(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                reads.append(size)
                return super().read(size)

        config = load(self.config, reactor)
        meta = {"sender": "a@example.org", "recipients": ["b@example.net"]}
        reply = await quarantinectl.release(reactor, config, meta, Recording(content))
        self.assertTrue(reply.startswith("250 "))
        self.assertEqual(self.mta.messages[0].content, content)
        self.assertGreater(len(reads), 2)
        self.assertTrue(all(size is not None and 0 < size <= 65536 for size in reads), reads)

    async def test_releaseOverUnixSocket(self) -> None:
        """Any upstream endpoint Twisted knows can be released to: a UNIX socket here."""
        # Not under trial's directory: CI's is too deep for a socket path's 107 bytes.
        directory = tempfile.mkdtemp(prefix="mailproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "mta.sock")
        port = reactor.listenUNIX(path, self.mta.buildFactory())  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        entryId = keep(self.quarantine, self)
        status, out, err = await self.command(
            "release", entryId, config=self.writeConfig(f"unix:{path}")
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.mta.messages[0].content, MESSAGE)
        self.assertIn("released: 250 2.0.0 Ok: queued as ", out)

    async def test_releaseSomeRecipientsRefused(self) -> None:
        """A recipient the MTA refuses is printed with its reply; the others get the message."""
        entryId = keep(self.quarantine, self, recipients=["b@example.net", "gone@example.net"])
        self.mta.refuseRecipients = lambda r: r.startswith("gone@")
        status, out, err = await self.command("release", entryId)
        self.assertEqual(status, 0)
        self.assertIn("released: 250", out)
        self.assertEqual(
            err,
            "RCPT TO:<gone@example.net>: 550 5.1.1 <gone@example.net>: Recipient address"
            " rejected: User unknown\n",
        )
        self.assertEqual(self.mta.messages[0].recipients, ["b@example.net"])

    async def test_releaseRefused(self) -> None:
        """A message the MTA refuses stays in the quarantine, and the command exits 1."""
        entryId = keep(self.quarantine, self)
        self.mta.refuseMessage = lambda m: (554, "5.7.1 Still no")
        status, out, err = await self.command("release", entryId)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err, f"mailproxy-quarantine: {entryId} not released: end of data: 554 5.7.1 Still no\n"
        )
        self.assertEqual(len(files(self.directory)), 2)

    async def test_releaseNoRecipient(self) -> None:
        """When the MTA takes no recipient, nothing is sent and the message stays."""
        entryId = keep(self.quarantine, self)
        self.mta.refuseRecipients = lambda r: True
        status, _, err = await self.command("release", entryId)
        self.assertEqual(status, 1)
        self.assertTrue(err.endswith(f"{entryId} not released: the MTA accepted no recipient\n"))
        self.assertEqual((self.mta.messages, len(files(self.directory))), ([], 2))

    async def test_releaseUnreachable(self) -> None:
        """An MTA that cannot be reached: one line naming the upstream, exit 1."""
        entryId = keep(self.quarantine, self)
        upstream = f"tcp:host=127.0.0.1:port={self.mtaPort.getHost().port}"
        await self.mtaPort.stopListening()
        status, _, err = await self.command("release", entryId)
        self.assertEqual(status, 1)
        self.assertTrue(
            err.startswith(
                f"mailproxy-quarantine: {entryId} not released: {upstream}: cannot connect:"
            )
        )
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(len(files(self.directory)), 2)

    async def test_scripts(self) -> None:
        """
        C{python -m mailproxy.quarantinectl} runs the command under the reactor and exits
        with its status; the older C{python -m mailproxy.quarantine} still runs it.
        """
        entryId = keep(self.quarantine, self)
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailproxy.__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        out, err, status = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailproxy.quarantine", "--config", self.config, "list"], env=env
        )
        self.assertEqual((status, err), (0, b""))
        self.assertTrue(out.startswith(entryId.encode()))
        self.mta.refuseMessage = lambda m: (554, "5.7.1 Still no")
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "mailproxy.quarantinectl", "--config", self.config, "release", entryId],
            env=env,
        )
        self.assertEqual((status, out), (1, b""))
        self.assertTrue(err.endswith(b"end of data: 554 5.7.1 Still no\n"), err)
        self.mta.refuseMessage = None
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "mailproxy.quarantinectl", "--config", self.config, "release", entryId],
            env=env,
        )
        self.assertEqual((status, err), (0, b""))
        self.assertTrue(out.startswith(f"{entryId} released: 250 ".encode()))

    def test_consoleScript(self) -> None:
        """setup.cfg installs the command as C{mailproxy-quarantine}."""
        parser = configparser.ConfigParser()
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailproxy.__file__)))
        parser.read(os.path.join(root, "setup.cfg"))
        scripts = dict(
            line.replace(" ", "").split("=", 1)
            for line in parser["options.entry_points"]["console_scripts"].strip().splitlines()
        )
        self.assertEqual(scripts["mailproxy-quarantine"], "mailproxy.quarantinectl:main")
        self.assertTrue(callable(quarantinectl.main))


class ReleaseTimeoutTests(SynchronousTestCase):
    """The release's waits are bounded by the configured timeouts, on the injected clock."""

    def connected(self) -> tuple[MemoryReactorClock, StringTransport, Any, Any]:
        reactor = MemoryReactorClock()
        config = Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream="tcp:host=127.0.0.1:port=25",
            hostname="proxy.test",
            spoolDir="/nonexistent",
            timeouts=Timeouts(mtaReply=60.0),
        )
        meta = {"sender": "a@example.org", "recipients": ["b@example.net"]}
        d = quarantinectl.release(reactor, config, meta, io.BytesIO(MESSAGE), io.StringIO())
        [(host, port, factory, _, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 25))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return reactor, transport, protocol, d

    def test_silentMTA(self) -> None:
        """An MTA that stops answering fails the release after mta_reply seconds, naming
        the command it did not answer, and the connection is dropped."""
        reactor, transport, protocol, d = self.connected()
        protocol.dataReceived(b"220 mta.test ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO proxy.test\r\n")
        reactor.advance(59)
        self.assertNoResult(d)
        reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, quarantinectl.ReleaseError)
        self.assertEqual(str(failure.value), "EHLO: no reply in 60 s")

    def test_garbledReply(self) -> None:
        """A reply that is not SMTP ends the release at once, saying so."""
        _, transport, protocol, d = self.connected()
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, quarantinectl.ReleaseError)
        self.assertIn("the MTA's answer is not SMTP", str(failure.value))
