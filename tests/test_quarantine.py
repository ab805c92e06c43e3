"""
The quarantine: what a quarantining filter refuses is kept (message and sidecar, 0600),
listed, shown, released to the MTA and deleted by the command, and expired.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys

import attrs
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailproxy
from mailproxy import quarantine
from mailproxy.config import Config, FilterSpec, QuarantineSettings, load
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Stage, Verdict
from mailproxy.localmta import LocalMTA
from mailproxy.quarantine import Quarantine
from mailproxy.service import ProxyService
from mailproxy.testing import FakeFilter
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
        h.clock.advance(EPOCH)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        q = Quarantine(directory, 30, ["spam"] if quarantined else [], h.clock)
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


def keep(q: Quarantine, case: SynchronousTestCase, sender: str = "a@example.org") -> str:
    """Quarantine a small message now (by q's clock); return its id."""
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(MESSAGE)
    session = Session("429C1EE089", "192.0.2.1", 40000, helo="client.example")
    envelope = Envelope(sender, "", ["b@example.net"])
    verdict = attrs.evolve(Verdict.reject("Looks like spam"), filter="spam")
    entryId = case.successResultOf(q.keep(Message(path, len(MESSAGE)), session, envelope, verdict))
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
        clock = MemoryReactorClock()
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
        service = ProxyService(config, clock)
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
        clock = Clock()
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
    """C{python -m mailproxy.quarantine}: list, show, release, delete."""

    def setUp(self) -> None:
        self.mta = LocalMTA()
        self.mtaPort = reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.mtaPort.stopListening)
        self.directory = os.path.abspath(self.mktemp())
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            f.write(
                '[proxy]\nlisten = "tcp:0"\n'
                f'upstream = "tcp:host=127.0.0.1:port={self.mtaPort.getHost().port}"\n'
                f'spool_dir = "{os.path.abspath(self.mktemp())}"\nhostname = "proxy.test"\n'
                f'[quarantine]\ndir = "{self.directory}"\n'
            )
        clock = Clock()
        clock.advance(EPOCH)
        q = Quarantine.fromConfig(load(self.config, reactor), clock)
        assert q is not None
        self.quarantine = q

    def command(self, *argv: str) -> tuple[int, str, str]:
        """Run the command; return its exit status, its output and its errors."""
        out, err = io.StringIO(), io.StringIO()
        status = quarantine.main(["--config", self.config, *argv], out, err)
        return status, out.getvalue(), err.getvalue()

    def test_listShowDelete(self) -> None:
        """
        list prints one line per message (id, time, filter, envelope, reply); show
        prints the sidecar then the message; delete removes both files.
        """
        entryId = keep(self.quarantine, self)
        status, listing, _ = self.command("list")
        self.assertEqual(status, 0)
        self.assertEqual(
            listing,
            f"{entryId}  2025-01-01T00:00:00+00:00  spam  <a@example.org> -> b@example.net"
            "  550 5.7.1 Looks like spam\n",
        )
        status, shown, _ = self.command("show", entryId)
        self.assertEqual(status, 0)
        sidecar, _, message = shown.partition("\n\n")
        self.assertEqual(json.loads(sidecar)["client"], "192.0.2.1")
        self.assertEqual(message, MESSAGE.decode())
        self.assertEqual(self.command("delete", entryId), (0, f"{entryId} deleted\n", ""))
        self.assertEqual(files(self.directory), [])

    def test_unknownId(self) -> None:
        """An id that is not in the quarantine (or not an id at all) exits 1."""
        for command, entryId in [("show", "20250101T000000Z-X-abcdef"), ("release", "../x")]:
            self.assertEqual(
                self.command(command, entryId),
                (1, "", f"mailproxy.quarantine: no such message: {entryId}\n"),
            )

    async def test_release(self) -> None:
        """
        release sends the message to the configured MTA with its envelope, prints the
        MTA's reply, and removes it from the quarantine.
        """
        entryId = keep(self.quarantine, self)
        status, out, err = await deferToThread(self.command, "release", entryId)
        self.assertEqual((status, err), (0, ""))
        [message] = self.mta.messages
        self.assertEqual(out, f"{entryId} released: 250 2.0.0 Ok: queued as {message.queueId}\n")
        self.assertEqual(
            (message.mailFrom, message.recipients), ("a@example.org", ["b@example.net"])
        )
        self.assertEqual(message.content, MESSAGE)
        self.assertEqual(files(self.directory), [])

    async def test_releaseRefused(self) -> None:
        """A message the MTA refuses stays in the quarantine, and the command exits 1."""
        entryId = keep(self.quarantine, self)
        self.mta.refuseMessage = lambda m: (554, "5.7.1 Still no")
        status, out, err = await deferToThread(self.command, "release", entryId)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err, f"mailproxy.quarantine: {entryId} not released: end of data: 554 5.7.1 Still no\n"
        )
        self.assertEqual(len(files(self.directory)), 2)

    async def test_module(self) -> None:
        """C{python -m mailproxy.quarantine list} runs as a command."""
        entryId = keep(self.quarantine, self)
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailproxy.__file__)))
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "mailproxy.quarantine", "--config", self.config, "list"],
            env={**os.environ, "PYTHONPATH": root},
        )
        self.assertEqual((status, err), (0, b""))
        self.assertTrue(out.startswith(entryId.encode()))
