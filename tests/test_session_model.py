"""
A whole session against a model of what the MTA must receive (issue 9, scope 5): a
hypothesis state machine plays a client that pipelines valid and invalid commands (every
separator and case trick), DATA and BDAT messages full of smuggling sequences, its bytes
cut anywhere; an MTA that answers each command with any valid reply; filters that accept
or refuse, in whatever order the three come. After every step:

  - every line the MTA received is a command as mailproxy renders what it parsed, of a
    verb it may relay, never the client's own bytes (no XCLIENT or XFORWARD but
    mailproxy's own, with the real client's address);
  - each MAIL and RCPT the MTA received is, in order, one the client sent and mailproxy
    parsed as that verb, and never one a filter refused;
  - a message reaches the MTA only if every filter accepted it, only once, and as the
    filters read it: no lenient reader finds an end of data before the real one;
  - the client gets one reply per command, in command order: each reply of the MTA's
    answers the command it was sent for, and a 2xx after the final dot (or BDAT LAST) is
    the MTA's own reply to that very message;

and once the session is over, no spool file is left.

C{MAILPROXY_MODEL_EXAMPLES} sets how many sessions are tried (default: a few seconds' worth).
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import headeredit, wire
from mailproxy import session as core
from mailproxy.config import BareLineEndings
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply, ReplyParser
from tests.test_session import CONFIG

EXAMPLES = int(os.environ.get("MAILPROXY_MODEL_EXAMPLES", "40"))
CLIENT = "192.0.2.7"
FORGED = b"198.51.100.66"

#: Verbs the MTA may hear from mailproxy (besides the message after DATA or BDAT).
RELAYED = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "NOOP", "HELP", "VRFY",
     "XCLIENT", "XFORWARD"}
)  # fmt: skip
#: Any line end a lenient MTA might read: what must never precede the real end of data.
LENIENT_END = re.compile(rb"[\r\n]\.[\r\n]")

# -- what the client writes ---------------------------------------------------------------

#: Spellings of a verb and its argument: (separator after the verb, case, leading, trailing).
SEPARATORS = [b" ", b" ", b" ", b"  ", b"\t", b"\x0b", b"\x0c", b"\x00", b"\r", b" \t", b""]
CASES = [bytes.upper, bytes.upper, bytes.lower, lambda b: b.title(), lambda b: b.swapcase()]
AROUND = [b"", b"", b"", b" ", b"\t", b"\x00", b"\r"]
LINE_ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n"]


@st.composite
def spelled(draw: Any, verb: bytes, argument: bytes = b"") -> bytes:
    """A command as a client writes it (one line, its end included): often plainly, else
    as a hostile one may, with any separator, case and stray bytes around."""
    if draw(st.integers(0, 2)):
        return verb + (b" " + argument if argument else b"") + b"\r\n"
    sep = draw(st.sampled_from(SEPARATORS))
    case = draw(st.sampled_from(CASES))
    line = case(verb) + (sep + argument if argument else b"")
    if draw(st.booleans()):
        line = draw(st.sampled_from(AROUND)) + line + draw(st.sampled_from(AROUND))
    return line + draw(st.sampled_from(LINE_ENDS))


ADDRESSES = st.sampled_from([b"a@x.example", b"denied@evil.example", b"b@y.example", b""])


@st.composite
def commandLine(draw: Any) -> bytes:
    """Any command but DATA, BDAT and QUIT (which the state machine sends itself)."""
    kind = draw(st.integers(0, 13))
    address = draw(ADDRESSES)
    if kind <= 2:
        return draw(spelled(b"MAIL", b"FROM:<" + address + b">" + draw(st.sampled_from(
            [b"", b"", b" SIZE=100", b" BODY=8BITMIME", b" SIZE=x", b" X=1"]))))  # fmt: skip
    if kind <= 5:
        return draw(spelled(b"RCPT", b"TO:<" + address + b">"))
    if kind == 6:
        return draw(spelled(draw(st.sampled_from([b"EHLO", b"HELO"])), b"c.example"))
    if kind == 7:
        return draw(spelled(b"RSET"))
    if kind == 8:
        return draw(spelled(draw(st.sampled_from([b"NOOP", b"HELP", b"VRFY", b"EXPN", b"ETRN"])),
                            draw(st.sampled_from([b"", b"a"]))))  # fmt: skip
    if kind == 9:
        return draw(spelled(draw(st.sampled_from([b"XCLIENT", b"XFORWARD"])),
                            b"ADDR=" + FORGED + b" NAME=forged.example"))  # fmt: skip
    if kind == 10:
        return draw(spelled(draw(st.sampled_from([b"STARTTLS", b"AUTH", b"TURN"])),
                            draw(st.sampled_from([b"", b"PLAIN AGEAYg=="]))))  # fmt: skip
    if kind == 11:
        # Spellings of DATA and BDAT that are not DATA or BDAT: one line, one reply.
        return draw(st.sampled_from([b"DATA\t\r\n", b"DATA x\r\n", b"DA TA\r\n", b"BDAT\r\n",
                                     b"BDAT x\r\n", b"\x00DATA\r\n", b"DATA\x00\r\n"]))  # fmt: skip
    if kind == 12:
        return b"X" * draw(st.sampled_from([10, 3000])) + b"\r\n"  # over line_length, or not
    return draw(st.binary(max_size=20)).replace(b"\n", b"") + b"\r\n"


#: Pieces of a message body: text, every line end, dots, and the smuggling sequences.
BODY_PIECES = st.sampled_from(
    [b"text", b"Subject: s", b"\r\n", b"\r\n", b"\n", b"\r", b".", b"..", b"\n.\n", b"\r.\r",
     b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n..\r\n", b"MAIL FROM:<evil@x>", b"\x00"]
)  # fmt: skip


#: Pieces of content, joined.
BODY = st.lists(BODY_PIECES, max_size=12).map(b"".join)


def tagged(number: int, data: bytes) -> bytes:
    """
    Message C{number}'s body as the client sends it after DATA, before its CRLF.CRLF:
    its tag first (so that its spool file can be told from any other), then C{data}
    with no CRLF.CRLF inside, whatever smuggling sequences it holds.
    """
    data = b"X-Id: %d\r\n" % (number,) + data
    while b"\r\n.\r\n" in data + b"\r\n" or data.endswith(b"\r\n."):
        data = data.replace(b"\r\n.", b"\r\n..")
        if data.endswith(b"\r\n."):
            data += b"x"
    return data


def tagOf(content: bytes) -> int:
    found = re.match(rb"X-Id: (\d+)\r\n", content)
    assert found is not None, content
    return int(found.group(1))


def expectedContent(raw: bytes, normalise: bool) -> tuple[bytes, bool]:
    """What the spool must hold for a DATA body, and whether it is bare (refused)."""
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is not None
    if normalise:
        raw = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    lines = raw.split(b"\r\n") if raw else []
    lines = [line[1:] if line.startswith(b".") else line for line in lines]
    return (b"\r\n".join(lines) + b"\r\n" if raw else b""), bare and not normalise


# -- the model ---------------------------------------------------------------------------


@attrs.define
class Expected:
    """A reply the client is owed, for a command it sent."""

    verb: str | None  # as mailproxy must parse it; None: not a command
    message: int | None = None  # the final dot or BDAT LAST of that message
    dataFor: int | None = None  # DATA of that message: the body follows a 354


@attrs.define
class Message:
    number: int
    sender: bytes | None
    content: bytes  # what the spool must hold
    refusedByFilters: bool = False
    checked: bool = False  # the message filters were asked
    bdat: bool = False  # sent in BDAT chunks
    released: int = 0
    finalReply: Reply | None = None


class SessionModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.normalise = False
        self.s: core.Session | None = None
        self.toClient = ReplyParser()
        self.owed: deque[Expected] = deque()
        self.clientPending = bytearray()
        self.clientClosed = False
        self.mtaEvents: deque[tuple[str, bytes]] = deque()  # ("connect"|"banner"|"line", ...)
        self.mtaLeg = 0
        self.mtaExtensions: tuple[bytes, ...] = ()
        self.mtaReplies = 0
        self.mtaLines: list[bytes] = []
        self.mtaMails: list[bytes] = []
        self.checks: deque[core.RunCheck] = deque()
        self.refusedSenders: set[str] = set()
        self.spool: bytearray | None = None
        self.spoolClosed = False
        self.spoolsLeft = 0
        self.messages: dict[int, Message] = {}
        self.releasedBy: dict[int, int] = {}  # the MTA reply serial of a release -> message
        self.awaitingData: Expected | None = None
        self.bodies: dict[int, bytes] = {}
        self.bdatGroups: list[tuple[int, bytes]] = []  # each BDAT rule's chunks, in order
        self.sentMails: list[bytes] = []  # the client's MAIL lines mailproxy parsed, in order
        self.quitSent = False
        self.lastMtaSerial = -1

    # -- driving the session -------------------------------------------------------------

    @initialize(
        normalise=st.booleans(),
        extensions=st.sets(st.sampled_from([b"PIPELINING", b"CHUNKING", b"XCLIENT", b"XFORWARD",
                                            b"8BITMIME", b"SIZE 1000000"])),
        hello=st.integers(0, 3).map(lambda i: i != 3),
    )
    def start(self, normalise: bool, extensions: set[bytes], hello: bool) -> None:
        self.normalise = normalise
        ext = sorted(extensions)
        for keyword in (b"XCLIENT", b"XFORWARD"):
            if keyword in ext:
                ext[ext.index(keyword)] = keyword + b" ADDR NAME PORT HELO PROTO SOURCE"
        self.mtaExtensions = tuple(ext)
        config = attrs.evolve(
            CONFIG,
            bareLineEndings=BareLineEndings.NORMALISE if normalise else BareLineEndings.REJECT,
        )
        self.s = core.Session(config, SessionInfo("S1", CLIENT, 40000),
                              policy=core.Policy(introduce=True))  # fmt: skip
        self.owed.append(Expected(None))  # the banner
        self.run(self.s.start())
        if hello:
            self.queueLine(b"EHLO c.example\r\n")

    def run(self, effects: list[core.Effect]) -> None:
        queue = deque(effects)
        while queue:
            queue.extend(self.handle(queue.popleft()))

    def handle(self, e: core.Effect) -> list[core.Effect]:
        s = self.s
        assert s is not None
        if isinstance(e, core.SendClient):
            assert not self.clientClosed, e
            for reply in self.toClient.feed(e.data):
                self.clientGot(reply)
        elif isinstance(e, core.CloseClient):
            self.clientClosed = True
            return s.clientLost()
        elif isinstance(e, core.ConnectMta):
            self.mtaLeg += 1
            self.mtaEvents.append(("connect", b""))
            self.mtaEvents.append(("banner", b""))
        elif isinstance(e, (core.CloseMta, core.AbortMta, core.CancelConnect)):
            self.mtaEvents.clear()  # that leg says no more
        elif isinstance(e, core.SendMta):
            assert e.data.endswith(b"\r\n"), e
            for line in e.data[:-2].split(b"\r\n"):
                self.mtaHeard(line)
                self.mtaEvents.append(("line", line))
        elif isinstance(e, core.ResolveClient):
            return s.clientNamed("client.example", "client.example")
        elif isinstance(e, core.RunCheck):
            self.checks.append(e)
        elif isinstance(e, core.CancelCheck):
            self.checks.clear()
        elif isinstance(e, core.SpoolOpen):
            assert self.spool is None, "a second spool file while one is open"
            self.spool, self.spoolClosed = bytearray(), False
            self.spoolsLeft += 1
            return s.spoolOpened()
        elif isinstance(e, core.SpoolWrite):
            assert self.spool is not None and not self.spoolClosed
            self.spool += e.data
        elif isinstance(e, core.SpoolClose):
            assert self.spool is not None
            self.spoolClosed = True
            return s.spoolClosed()
        elif isinstance(e, core.SpoolRemove):
            assert self.spool is not None
            self.spool = None
            self.spoolsLeft -= 1
        elif isinstance(e, core.Release):
            return self.released(e)
        return []

    def mtaHeard(self, line: bytes) -> None:
        """A command line at the MTA: only ever a command as mailproxy renders it."""
        self.mtaLines.append(line)
        assert not re.search(rb"[\x00-\x1f\x7f]", line), line
        command = wire.parseCommand(line)
        assert command.toLine() == line, line
        assert command.verb in RELAYED, line
        if command.verb in ("XCLIENT", "XFORWARD"):
            assert FORGED not in line and b"forged" not in line, line
            assert b"ADDR=" + CLIENT.encode() in line or b"ADDR=" not in line, line
        if command.verb == "MAIL":
            self.mtaMails.append(line)
            # In order, the client's MAIL commands as parsed (those the filters let by).
            sent = iter(self.sentMails)
            assert all(m in sent for m in self.mtaMails), (self.mtaMails, self.sentMails)
            sender = wire.parsePath(command.argument, b"FROM:").address
            assert sender != "denied@evil.example", line

    def released(self, e: core.Release) -> list[core.Effect]:
        s = self.s
        assert s is not None and self.spool is not None and self.spoolClosed
        content = bytes(self.spool)
        message = self.messages[tagOf(content)]
        assert message.checked and not message.refusedByFilters, ("not accepted", message)
        if not self.normalise:
            assert not re.search(rb"\r(?!\n)|(?<!\r)\n", content), ("bare CR or LF", content)
        if message.bdat:
            assert content in self.bdatContents(message.number, not e.chunked), (content, message)
        else:
            assert content == message.content, ("not what the client sent", content, message)
        message.released += 1
        # The driver refuses a spool of another size than the session counted.
        assert e.spooled == len(content), (e.spooled, content)
        headers = headeredit.addedBytes(e.headers)
        if e.chunked:
            verb = b"BDAT"
        else:
            # Released after DATA, dot-stuffed: no lenient reader ends it early.
            stuffed = wire.Stuffer()(headers + content)
            assert LENIENT_END.search(b"\r\n" + stuffed) is None, stuffed
            verb = b"."
        self.mtaEvents.append(("final", b"%d %s" % (message.number, verb)))
        return s.releaseSent()

    def bdatContents(self, number: int, withData: bool) -> set[bytes]:
        """What a BDAT message starting with group C{number} may hold: its chunks and
        those of the BDATs after it, normalised, with a last CRLF if released with DATA."""
        start = [n for n, _ in self.bdatGroups].index(number)
        out = set()
        for end in range(start + 1, len(self.bdatGroups) + 1):
            content = b"".join(c for _, c in self.bdatGroups[start:end])
            if self.normalise:
                content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
            if withData and content and not content.endswith(b"\r\n"):
                content += b"\r\n"
            out.add(content)
        return out

    def clientGot(self, reply: Reply) -> None:
        """A reply at the client: it answers the oldest command still owed one."""
        if reply.code == 421 and not self.owed:
            return  # closing (the idle timeout): a 421 may come at any time (RFC 5321 3.8)
        assert self.owed, ("a reply nobody asked for", reply)
        owed = self.owed.popleft()
        text = reply.lines[0] if reply.lines else b""
        serial = re.match(rb"mta (\d+) (\S+)", text)
        if serial is not None:
            # The MTA's reply: to the command it answers, and after the earlier ones.
            number, verb = int(serial.group(1)), serial.group(2).decode()
            assert number > self.lastMtaSerial, "the MTA's replies out of order"
            self.lastMtaSerial = number
            if owed.message is not None:
                assert verb in ("final", "DATA"), (owed, reply)
                if verb == "final":
                    # The reply to that message (BDAT LAST may end one begun by an earlier
                    # BDAT group: the message is named for its first group).
                    number = int(text.rsplit(b" Q", 1)[1])
                    first = self.messages[owed.message].bdat and self.messages[number].bdat
                    assert number == owed.message or (first and number < owed.message), (
                        owed, reply)  # fmt: skip
                    owed = attrs.evolve(owed, message=number)
            elif owed.verb is None:
                assert verb == "banner", (owed, reply)
            else:
                allowed = {owed.verb, "EHLO"} if owed.verb == "HELO" else {owed.verb}
                assert verb in allowed, (owed, reply)
        if owed.message is not None and reply.code // 100 == 2:
            message = self.messages[owed.message]
            assert message.released == 1 and message.finalReply == reply, (message, reply)
        elif reply.code // 100 == 2:
            assert b"queued" not in text, (owed, reply)
        if owed.dataFor is not None and reply.code == 354:
            self.clientPending += self.bodies[owed.dataFor] + b"\r\n.\r\n"
            self.owed.append(Expected(None, message=owed.dataFor))
        if owed.dataFor is not None:
            self.awaitingData = None
        if reply.code == 421 or (owed.verb == "QUIT" and reply.code == 221):
            self.owed.clear()

    # -- rules: the client -----------------------------------------------------------------

    def ready(self) -> bool:
        return self.s is not None and not self.clientClosed and not self.quitSent

    def queueLine(self, line: bytes, alone: bool = False) -> Expected:
        """
        Queue a command line; what it is owed, by how mailproxy must parse it. Unless
        C{alone}, a line that would be DATA, BDAT or QUIT (their bytes or the end follow
        them) is made a NOOP.
        """
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        try:
            command = wire.parseCommand(text) if len(line) <= CONFIG.limits.lineLength else None
        except wire.CommandSyntaxError:
            command = None
        if not alone and command is not None and command.verb in ("DATA", "BDAT", "QUIT"):
            line, command = b"NOOP\r\n", wire.Command("NOOP")
        self.clientPending += line
        expected = Expected(command.verb if command is not None else None)
        if command is not None and command.verb == "MAIL":
            try:
                path = wire.parsePath(command.argument, b"FROM:")
                self.sentMails.append(b"MAIL " + path.toArgument(b"FROM:"))
            except wire.PathSyntaxError:
                pass
        self.owed.append(expected)
        return expected

    @rule(
        hello=st.one_of(st.none(), spelled(b"EHLO", b"c.example"), spelled(b"HELO", b"c.example")),
        mail=spelled(b"MAIL", b"FROM:<a@x.example>"),
        rcpts=st.lists(st.builds(lambda r: r, ADDRESSES).flatmap(
            lambda a: spelled(b"RCPT", b"TO:<" + (a or b"r@y.example") + b">")), max_size=3),
        end=st.integers(0, 2),
        content=BODY,
    )  # fmt: skip
    @precondition(lambda self: self.ready() and self.awaitingData is None)
    def transaction(
        self, hello: bytes | None, mail: bytes, rcpts: list[bytes], end: int, content: bytes
    ) -> None:
        """
        A transaction, pipelined: EHLO or HELO perhaps, MAIL, RCPTs, then perhaps DATA
        (its body after the 354) or the message in one BDAT LAST.
        """
        for line in [hello, mail, *rcpts]:
            if line is not None:
                self.queueLine(line)
        if end == 1:
            self.data(b"DATA\r\n", content)
        elif end == 2:
            self.bdat([content], last=True)

    @rule(lines=st.lists(commandLine(), min_size=1, max_size=6))
    @precondition(lambda self: self.ready() and self.awaitingData is None)
    def pipeline(self, lines: list[bytes]) -> None:
        """A group of commands, pipelined (or one alone)."""
        for line in lines:
            self.queueLine(line)

    @rule(spelling=spelled(b"DATA"), content=BODY)
    @precondition(lambda self: self.ready() and self.awaitingData is None)
    def data(self, spelling: bytes, content: bytes) -> None:
        """DATA, ending a pipelined group: its body follows once the 354 is seen."""
        expected = self.queueLine(spelling, alone=True)
        if expected.verb != "DATA":
            return
        number = len(self.messages)
        content = tagged(number, content)
        spooled, bare = expectedContent(content, self.normalise)
        self.messages[number] = Message(number, None, spooled, refusedByFilters=bare)
        self.bodies[number] = content
        expected.dataFor = number
        self.awaitingData = expected

    @rule(chunks=st.lists(BODY, min_size=1, max_size=3), last=st.booleans())
    @precondition(lambda self: self.ready() and self.awaitingData is None)
    def bdat(self, chunks: list[bytes], last: bool) -> None:
        """BDAT chunks (the last with LAST, or not): each with exactly its bytes."""
        number = len(self.messages)
        chunks[0] = b"X-Id: %d\r\n" % (number,) + chunks[0]
        content = b"".join(chunks)
        for index, chunk in enumerate(chunks):
            final = last and index == len(chunks) - 1
            self.clientPending += b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if final else b"", chunk)
            self.owed.append(Expected("BDAT", message=number if final else None))
        # Chunks of a later BDAT may continue this transaction (no LAST yet): released()
        # finds which groups of chunks the message is made of.
        self.bdatGroups.append((number, content))
        self.messages[number] = Message(number, None, content, bdat=True)

    @rule(spelling=spelled(b"QUIT"), now=st.integers(0, 4).map(lambda i: i == 4))
    @precondition(lambda self: self.ready() and self.awaitingData is None)
    def quit(self, spelling: bytes, now: bool) -> None:
        """QUIT, now and then (it ends the session; the teardown sends it otherwise)."""
        if now:
            expected = self.queueLine(spelling, alone=True)
            self.quitSent = expected.verb == "QUIT"

    @rule()
    @precondition(lambda self: self.s is not None)
    def settle(self) -> None:
        """Everything pending happens, in order: the client waits for its replies."""
        self.settleAll()

    def settleAll(self) -> None:
        for _ in range(10_000):
            if self.clientPending and not self.clientClosed:
                self.deliver(256)
            elif self.checks:
                self.verdict(True)
            elif self.mtaEvents:
                self.mta(0)
            else:
                break

    @rule(share=st.integers(1, 256))
    @precondition(lambda self: self.s is not None and self.clientPending)
    def deliver(self, share: int) -> None:
        """Some of the client's bytes arrive: cut anywhere."""
        assert self.s is not None
        count = max(1, len(self.clientPending) * share // 256)
        piece = bytes(self.clientPending[:count])
        del self.clientPending[:count]
        if not self.clientClosed:
            self.run(self.s.clientData(piece))

    # -- rules: the MTA and the filters --------------------------------------------------

    @rule(choice=st.integers(0, 7))
    @precondition(lambda self: self.s is not None and self.mtaEvents)
    def mta(self, choice: int) -> None:
        """The MTA's next event: its connection, banner, or a valid reply to the oldest line."""
        s = self.s
        assert s is not None
        kind, line = self.mtaEvents.popleft()
        if kind == "connect":
            self.run(s.mtaConnected())
            return
        serial = self.mtaReplies
        self.mtaReplies += 1
        if kind == "banner":
            self.run(s.mtaReply(Reply(220, (b"mta %d banner" % serial,))))
            return
        if kind == "final":
            number, _ = line.split(b" ")
            code = (250, 250, 250, 451, 554)[choice % 5]
            reply = Reply(code, (b"mta %d final queued as Q%s" % (serial, number),))
            if code == 250:
                self.messages[int(number)].finalReply = reply
            self.run(s.mtaReply(reply))
            return
        verb = line.split(b" ", 1)[0].decode()
        codes = {
            "EHLO": (250, 250, 250, 550), "HELO": (250, 550), "XCLIENT": (220,),
            "XFORWARD": (250,), "MAIL": (250, 250, 451, 550), "RCPT": (250, 250, 450, 550),
            "DATA": (354, 354, 451, 554), "RSET": (250,), "QUIT": (221,), "NOOP": (250,),
            "HELP": (214,), "VRFY": (252, 550),
        }[verb]  # fmt: skip
        code = codes[choice % len(codes)]
        first = b"mta %d %s" % (serial, verb.encode())
        lines = (first, *self.mtaExtensions) if verb == "EHLO" and code == 250 else (first,)
        self.run(s.mtaReply(Reply(code, lines)))

    @rule(accept=st.integers(0, 3).map(lambda i: i != 3))
    @precondition(lambda self: self.s is not None and self.checks)
    def verdict(self, accept: bool) -> None:
        """The filters of the pending check decide."""
        s = self.s
        assert s is not None
        check = self.checks.popleft()
        if check.stage is Stage.MAIL and check.envelope is not None:
            if check.envelope.mailFrom == "denied@evil.example":
                accept = False  # the access filter: always refused
            if not accept:
                self.refusedSenders.add(check.envelope.mailFrom)
        if check.stage is Stage.MESSAGE:
            assert self.spool is not None and self.spoolClosed
            message = self.messages[tagOf(bytes(self.spool))]
            message.checked = True
            message.refusedByFilters |= not accept
        verdict = Verdict.accept() if accept else Verdict.reject("no", 550, "5.7.1")
        self.run(s.verdict(check.stage, verdict))

    @rule(timer=st.sampled_from([core.Timer.KEEPALIVE] * 5 + [core.Timer.IDLE]))
    def timer(self, timer: core.Timer) -> None:
        """
        A timer fires: the keepalive (a NOOP to the MTA while a message is received or
        filtered), or the client's idle timeout (421 and the close, if it is idle).
        """
        assert self.s is not None
        self.run(self.s.timerFired(timer))

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def nothingReleasedTwice(self) -> None:
        for m in self.messages.values():
            assert m.released <= 1, m

    def teardown(self) -> None:
        """Let everything happen, then end the session: no spool file is left."""
        s = self.s
        if s is None:
            return
        self.settleAll()
        if self.ready() and self.awaitingData is None:
            self.quitSent = self.queueLine(b"QUIT\r\n", alone=True).verb == "QUIT"
            self.settleAll()
        # Every command was answered, or the session closed (and the rest got nothing).
        assert self.clientClosed or not self.owed, ("stuck", s.state, self.owed)
        if not self.clientClosed:
            self.run(s.clientLost())
        assert self.spoolsLeft == 0 and self.spool is None, "a spool file left"
        for m in self.messages.values():
            if m.released:
                assert not m.refusedByFilters, m


class SessionModelTests(SynchronousTestCase):
    def test_model(self) -> None:
        """
        Whatever the client writes, however its bytes are cut, whatever the MTA and the
        filters answer and in whatever order: the MTA hears only commands mailproxy parsed,
        gets a message only when every filter accepted it, once, and the client's 2xx to a
        message is the MTA's own; replies come in command order; no spool file is left.
        """
        test = SessionModel.TestCase
        test.settings = settings(
            max_examples=EXAMPLES,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        test("runTest").runTest()
