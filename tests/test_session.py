"""
The session core alone, as a state machine: events in, effects out, no Twisted and no
clock (magic-wormhole's test_machines style), and hypothesis over the order in which
events arrive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.config import Config
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply, ReplyParser

CONFIG = Config(
    path="test.toml",
    listen=("tcp:0",),
    upstream="tcp:host=127.0.0.1:port=1",
    hostname="proxy.test",
    spoolDir="/nonexistent",
)


def machine() -> core.Session:
    return core.Session(CONFIG, SessionInfo("S1", "192.0.2.7", 40000))


def visible(effects: list[core.Effect]) -> list[core.Effect]:
    """The effects without log lines and timers, which every step has."""
    return [e for e in effects if not isinstance(e, (core.Log, core.StartTimer, core.CancelTimer))]


class MachineTests(SynchronousTestCase):
    def test_importsNoTwisted(self) -> None:
        """The session core imports nothing from Twisted, even indirectly."""
        code = "import sys, mailproxy.session; print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
        )
        self.assertEqual(out.stdout.strip(), "[]")

    def test_greeting(self) -> None:
        """Connect filters first, then the MTA; its banner reaches the client."""
        s = machine()
        self.assertEqual(visible(s.start()), [core.RunCheck(Stage.CONNECT, s.info)])
        self.assertEqual(visible(s.verdict(Stage.CONNECT, Verdict.accept())), [core.ConnectMta()])
        self.assertEqual(visible(s.mtaConnected()), [])
        self.assertEqual(
            visible(s.mtaReply(Reply(220, (b"mta.test ESMTP",)))),
            [
                core.Report(core.Counted.CONNECTION_ACCEPTED),
                core.SendClient(b"220 mta.test ESMTP\r\n"),
            ],
        )
        self.assertIs(s.state, core.State.COMMAND)

    def test_connectRefusedNeverTouchesMta(self) -> None:
        """A connect filter's refusal closes the client; no MTA connection is made."""
        s = machine()
        s.start()
        effects = visible(s.verdict(Stage.CONNECT, Verdict.reject("go away", 554, "5.7.1")))
        self.assertEqual(
            effects,
            [
                core.Refused(Stage.CONNECT, Reply(554, (b"5.7.1 go away",)), None, "filters"),
                core.SendClient(b"554 5.7.1 go away\r\n"),
                core.CloseClient(),
            ],
        )

    def test_commandAsParsed(self) -> None:
        """The MTA hears the command as parsed: verb upper-cased, one SP, the path canonical."""
        s = greeted()
        s.clientData(b"mail from: <a@b> size=10\r\n")
        effects = visible(s.verdict(Stage.MAIL, Verdict.accept()))
        self.assertIn(core.SendMta(b"MAIL FROM:<a@b> SIZE=10\r\n"), effects)

    def test_tabSeparatorRefused(self) -> None:
        """A TAB after the verb is a syntax error answered by mailproxy; no check, no MTA."""
        s = greeted()
        effects = visible(s.clientData(b"MAIL\tFROM:<a@b>\r\n"))
        self.assertEqual(
            effects, [core.SendClient(b"500 5.5.2 Error: bad character in command\r\n")]
        )

    def test_transitionsChecked(self) -> None:
        """Every state has its row in the transition table; none leads out of CLOSED."""
        self.assertEqual(set(core.TRANSITIONS), set(core.State))
        self.assertEqual(core.TRANSITIONS[core.State.CLOSED], frozenset())


def greeted() -> core.Session:
    s = machine()
    s.start()
    s.verdict(Stage.CONNECT, Verdict.accept())
    s.mtaConnected()
    s.mtaReply(Reply(220, (b"mta.test",)))
    s.clientData(b"EHLO c.example\r\n")
    s.verdict(Stage.HELO, Verdict.accept())
    s.mtaReply(Reply(250, (b"mta.test", b"PIPELINING", b"ENHANCEDSTATUSCODES")))
    return s


class World:
    """
    A session with an in-test MTA and filters whose answers are queued, not given at once:
    a test chooses which pending event happens next.
    """

    def __init__(self) -> None:
        self.s = machine()
        # Each source delivers its events in order (the MTA's over one TCP connection);
        # the test chooses which source goes next.
        self.mta: deque[Callable[[], list[core.Effect]]] = deque()
        self.checks: deque[Callable[[], list[core.Effect]]] = deque()
        self.mtaReceived = bytearray()
        self.toClient = bytearray()
        self._mtaLines = bytearray()
        self._inData = False
        self.closed = False

    #: The EHLO keywords the in-test MTA offers.
    extensions: tuple[bytes, ...] = (b"PIPELINING",)

    def run(self, effects: list[core.Effect]) -> None:
        queue = deque(effects)
        while queue:
            queue.extend(self.handle(queue.popleft()))

    def handle(self, e: core.Effect) -> list[core.Effect]:
        """Carry out one effect; return those of the events it causes at once."""
        more: list[core.Effect] = []
        if isinstance(e, core.SendClient):
            self.toClient += e.data
        elif isinstance(e, core.CloseClient):
            self.closed = True
            more = self.s.clientLost()
        elif isinstance(e, core.ConnectMta):
            self.mta.append(self.s.mtaConnected)
            self.mta.append(lambda: self.s.mtaReply(Reply(220, (b"mta",))))
        elif isinstance(e, core.SendMta):
            self._mta(e.data)
        elif isinstance(e, core.RunCheck):
            stage = e.stage
            self.checks.append(lambda stage=stage: self.s.verdict(stage, Verdict.accept()))  # type: ignore[misc]
        elif isinstance(e, core.SpoolOpen):
            more = self.s.spoolOpened()
        elif isinstance(e, core.SpoolClose):
            more = self.s.spoolClosed()
        elif isinstance(e, core.Release):
            self.mtaReceived += self.released(e)
            more = self.s.releaseSent()
            self.mta.append(lambda: self.s.mtaReply(Reply(250, (b"2.0.0 queued as Q",))))
        return more

    def replay(self, stream: bytes, cuts: list[int], choices: list[int]) -> list[int]:
        """
        Start, then deliver C{stream} cut at C{cuts}, the MTA's replies and the verdicts, in
        the order C{choices} picks among the sources with something pending (the client's
        bytes only once the banner is out: else it is an early talker); the reply codes.
        """
        self.run(self.s.start())
        pieces: deque[bytes] = deque()
        last = 0
        for cut in [*sorted({c % len(stream) for c in cuts}), len(stream)]:
            if cut > last:
                pieces.append(stream[last:cut])
                last = cut
        picks = iter(choices)
        for _ in range(10_000):
            sources: list[deque[Any]] = [q for q in (self.mta, self.checks) if q]
            if pieces and self.toClient:
                sources.append(pieces)
            if not sources or self.closed:
                break
            source = sources[next(picks, 0) % len(sources)]
            if source is pieces:
                self.run(self.s.clientData(pieces.popleft()))
            else:
                self.run(source.popleft()())
        return [r.code for r in ReplyParser().feed(bytes(self.toClient))]

    def released(self, e: core.Release) -> bytes:
        """What the MTA is noted to have received for a release."""
        return b"<message>.\r\n"

    def _mta(self, data: bytes) -> None:
        self.mtaReceived += data
        for line in data.split(b"\r\n")[:-1]:
            verb = line.split(b" ")[0]
            reply: Any = {
                b"DATA": Reply(354, (b"go",)),
                b"EHLO": Reply(250, (b"ok", *self.extensions)),
                b"QUIT": Reply(221, (b"bye",)),
            }.get(verb, Reply(250, (b"ok",)))
            self.mta.append(lambda reply=reply: self.s.mtaReply(reply))


STREAM = (
    b"EHLO c.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
    b"Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\nMAIL FROM:<d@x>\r\nRCPT TO:<e@y>\r\nDATA\r\n"
    b".\r\nQUIT\r\n"
)


class EventOrderTests(SynchronousTestCase):
    def replay(self, cuts: list[int], choices: list[int]) -> tuple[bytes, list[int]]:
        w = World()
        codes = w.replay(STREAM, cuts, choices)
        return bytes(w.mtaReceived), codes

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 400), max_size=12), st.lists(st.integers(0, 50), max_size=80))
    def test_anyOrder(self, cuts: list[int], choices: list[int]) -> None:
        """
        Whatever the chunking of the client's bytes, and in whatever order MTA replies,
        verdicts and client bytes arrive (the MTA answering in order, as TCP keeps it),
        the MTA hears the same commands and the client gets the same replies (the client
        waiting for the banner before it talks, as an early talker gets 554).
        """
        reference = self.replay([], [])
        self.assertEqual(
            reference[1], [220, 250, 250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 221]
        )
        self.assertEqual(self.replay(cuts, choices), reference)
