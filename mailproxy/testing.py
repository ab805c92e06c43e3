"""
Test doubles for mailproxy and for authors of third-party filters.

L{RawClient} is an SMTP client that sends exactly the bytes it is given and collects
the replies; L{MemoryProxy} runs client, proxy and the stand-in MTA in memory (no
sockets, no real time); L{FakeFilter} answers what a test tells it to.

Over real loopback sockets, L{startProxy} runs the proxy as twistd builds it from a
configuration (L{loopbackConfig} writes one), with the filters found as plugins, for the
length of one trial test; L{closeSessions} ends its sessions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy.config import Config
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, Stage, Verdict, VerdictResult
from mailproxy.filters.pipeline import ConfiguredFilter, Pipeline
from mailproxy.relay import InboundProtocol, RelayFactory, Settings
from mailproxy.service import ProxyService
from mailproxy.startup import Listener
from mailproxy.wire import Reply, ReplyParser


class RawClient(Protocol):
    """Sends exactly the bytes it is given; collects every reply and every byte received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.replies: list[Reply] = []
        self.lost: Deferred[None] = Deferred()
        self.connected = False
        self._parser = ReplyParser()
        self._waiting: list[tuple[int, Deferred[list[Reply]]]] = []

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.replies.extend(self._parser.feed(data))
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        for _, d in self._waiting:
            d.errback(reason)
        self._waiting = []
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def expect(self, count: int) -> Deferred[list[Reply]]:
        """Fire with the first C{count} replies received, once there are that many."""
        d: Deferred[list[Reply]] = Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def _check(self) -> None:
        ready = [(n, d) for n, d in self._waiting if len(self.replies) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.replies) < n]
        for n, d in ready:
            d.callback(self.replies[:n])

    @property
    def codes(self) -> list[int]:
        return [r.code for r in self.replies]


class ScriptedMTA:
    """
    A small, hostile MTA for tests: answers each command line with what C{answer} returns
    for it (C{None}: the usual reply), and records what it received.

    It reads as leniently as real MTAs do (a line ends at LF, a CR before it dropped; a
    message ends at a line holding only a dot, however its line ends are written), and
    like OpenSMTPD, when it did not offer PIPELINING, it notes in L{collisions} every
    command that arrived while an earlier one was still unanswered.

    When it offers CHUNKING it reads C{BDAT n [LAST]} and the n bytes after it; C{answer}
    sees the BDAT line as it arrives, and what it returns is written at once, before the
    chunk is read (an MTA answering early); else each chunk is answered once it is in.

    @ivar received: every byte of every connection, in order.
    @ivar messages: the content of each message it accepted.
    @ivar lost: how many of its connections have closed; C{aborted} those that were aborted.
    """

    def __init__(
        self, extensions: Sequence[bytes] = (b"PIPELINING", b"ENHANCEDSTATUSCODES")
    ) -> None:
        self.extensions = list(extensions)
        self.answer: Callable[[bytes], bytes | None] = lambda line: None
        self.received = bytearray()
        self.messages: list[bytes] = []
        self.collisions: list[bytes] = []
        self.connections = 0
        self.lost = 0

    def buildFactory(self) -> ServerFactory:
        factory = ServerFactory()
        factory.buildProtocol = lambda addr: _ScriptedProtocol(self)  # type: ignore[method-assign]
        return factory

    def usual(self, line: bytes) -> bytes:
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            keywords = [b"mta.test", *self.extensions]
            return b"".join(
                b"250" + (b" " if i == len(keywords) - 1 else b"-") + k + b"\r\n"
                for i, k in enumerate(keywords)
            )
        if verb == b"DATA":
            return b"354 go ahead\r\n"
        if verb == b"QUIT":
            return b"221 2.0.0 bye\r\n"
        if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
            return b"250 2.0.0 ok\r\n"
        return b"502 5.5.2 unknown\r\n"


class _ScriptedProtocol(Protocol):
    def __init__(self, mta: ScriptedMTA) -> None:
        self._mta = mta
        self._buffer = b""
        self._message: bytearray | None = None
        self._chunks = bytearray()
        self._chunkLeft = 0
        self._chunkLast = False
        self._chunkAnswered = False

    def connectionMade(self) -> None:
        self._mta.connections += 1
        assert self.transport is not None
        self.transport.write(b"220 mta.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._mta.received += data
        self._buffer += data
        assert self.transport is not None
        while self._buffer:
            if self._chunkLeft:
                self._readChunk()
                continue
            if b"\n" not in self._buffer:
                break
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.removesuffix(b"\r")
            if self._message is not None:
                if line == b".":
                    self._mta.messages.append(bytes(self._message))
                    self._message = None
                    reply = self._mta.answer(b".") or b"250 2.0.0 Ok: queued as SCRIPTED1\r\n"
                    self._write(reply)
                else:
                    self._message += line.removeprefix(b".") + b"\r\n"
                continue
            scripted = self._mta.answer(line)
            if self._bdat(line, scripted):
                continue
            if self._buffer and b"PIPELINING" not in self._mta.extensions:
                self._mta.collisions.append(line)
            reply = self._mta.usual(line) if scripted is None else scripted
            if line.upper() == b"DATA" and reply.startswith(b"354"):
                self._message = bytearray()
            self._write(reply)

    def _bdat(self, line: bytes, scripted: bytes | None) -> bool:
        words = line.split(b" ")
        if b"CHUNKING" not in self._mta.extensions or words[0].upper() != b"BDAT":
            return False
        self._chunkLeft = int(words[1])
        self._chunkLast = len(words) > 2 and words[2].upper() == b"LAST"
        self._chunkAnswered = scripted is not None
        if scripted is not None:
            self._write(scripted)
        if not self._chunkLeft:
            self._chunkEnd()
        return True

    def _readChunk(self) -> None:
        taken = self._buffer[: self._chunkLeft]
        self._buffer = self._buffer[len(taken) :]
        self._chunks += taken
        self._chunkLeft -= len(taken)
        if not self._chunkLeft:
            self._chunkEnd()

    def _chunkEnd(self) -> None:
        reply = b"250 2.0.0 ok\r\n"
        if self._chunkLast:
            self._mta.messages.append(bytes(self._chunks))
            self._chunks = bytearray()
            reply = b"250 2.0.0 Ok: queued as SCRIPTED1\r\n"
        if not self._chunkAnswered:
            self._write(reply)

    def _write(self, reply: bytes) -> None:
        assert self.transport is not None
        if reply:
            self.transport.write(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._mta.lost += 1


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """A client endpoint that connects, in memory, to a server factory (the MTA)."""

    def __init__(self, serverFactory: IProtocolFactory, clock: Clock) -> None:
        self._serverFactory = serverFactory
        self._clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.refuse = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError("refused by the test"))
        address = IPv4Address("TCP", "127.0.0.1", 10025)
        client = protocolFactory.buildProtocol(address)
        server = self._serverFactory.buildProtocol(address)
        assert client is not None and server is not None
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self._clock,
            )
        )
        return defer.succeed(client)


class MemoryProxy:
    """
    A client, the proxy and an MTA, connected in memory: tests feed the client's bytes
    in any chunking and read the replies and what the MTA received, synchronously.
    """

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        mtaFactory: ServerFactory,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.endpoint = MemoryEndpoint(mtaFactory, self.clock)
        self.factory = RelayFactory(Settings(config, pipeline, upstream=self.endpoint), self.clock)
        self._pumps: list[iosim.IOPump] = []

    def connect(self, clientAddress: str = "127.0.0.1") -> tuple[RawClient, InboundProtocol]:
        kind = IPv6Address if ":" in clientAddress else IPv4Address
        peer = kind("TCP", clientAddress, 40000)
        proxy = self.factory.buildProtocol(peer)
        client = RawClient()
        serverSide = iosim.FakeTransport(proxy, isServer=True, peerAddress=peer)
        clientSide = iosim.FakeTransport(client, isServer=False)
        self._pumps.append(
            iosim.connect(proxy, serverSide, client, clientSide, greet=False, clock=self.clock)
        )
        self.flush()
        return client, proxy

    def send(self, client: RawClient, data: bytes) -> None:
        client.send(data)
        self.flush()

    def flush(self) -> None:
        """
        Move bytes every way until nothing moves, and run what is due now (the later
        reactor turns sessions ask for: C{callLater(0, ...)}), without advancing the clock.
        """
        for _ in range(100000):
            moved = False
            for pump in self._pumps + self.endpoint.pumps:
                moved = pump.pump(advanceClock=False) or moved
            if not moved:
                now = self.clock.seconds()
                if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                    return
                self.clock.advance(0)
        raise AssertionError("the connections never went quiet")


@implementer(IFilter)
@attrs.define
class FakeFilter(BaseFilter):
    """
    A filter that answers C{verdicts[stage]} (a Verdict, or a callable returning a
    Verdict or Deferred) and records every call as C{(stage, argument)}.
    """

    name: str = "fake"
    verdicts: dict[Stage, VerdictResult | Callable[[], VerdictResult]] = attrs.Factory(dict)
    calls: list[tuple[Stage, object]] = attrs.Factory(list)

    @property
    def stages(self) -> frozenset[Stage]:  # type: ignore[override]
        return frozenset(self.verdicts)

    def _answer(self, stage: Stage, argument: object) -> VerdictResult:
        self.calls.append((stage, argument))
        answer = self.verdicts.get(stage, Verdict.accept())
        return answer() if callable(answer) else answer

    def checkConnect(self, session: Session) -> VerdictResult:
        return self._answer(Stage.CONNECT, session.clientAddress)

    def checkHelo(self, session: Session) -> VerdictResult:
        return self._answer(Stage.HELO, session.helo)

    def checkMail(self, session: Session, envelope: Envelope) -> VerdictResult:
        return self._answer(Stage.MAIL, envelope.mailFrom)

    def checkRcpt(self, session: Session, envelope: Envelope, recipient: str) -> VerdictResult:
        return self._answer(Stage.RCPT, recipient)

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> VerdictResult:
        with message.open() as f:
            content = f.read()
        return self._answer(Stage.MESSAGE, content)


def pipelineOf(
    filters: Sequence[IFilter], clock: Clock, timeout: float = 30.0, total: float = 120.0
) -> Pipeline:
    """A pipeline of the given filters, each with the same timeout and policy tempfail."""
    return Pipeline([ConfiguredFilter(f, timeout) for f in filters], clock, total)


def loopbackConfig(
    mtaPort: int, spoolDir: str, extra: str = "", listen: str = "tcp:0:interface=127.0.0.1"
) -> str:
    """
    A configuration for a test: listen on a free port of 127.0.0.1, relay to the MTA on
    127.0.0.1:C{mtaPort}, spool in C{spoolDir}, host name C{proxy.test}; then C{extra}
    (more sections: C{[filters.NAME]}, C{[limits]}, ...).
    """
    return (
        "[proxy]\n"
        f'listen = "{listen}"\n'
        f'upstream = "tcp:host=127.0.0.1:port={mtaPort}"\n'
        f'spool_dir = "{spoolDir}"\n'
        'hostname = "proxy.test"\n' + extra
    )


def startProxy(
    case: SynchronousTestCase, configText: str, probe: bool = False
) -> tuple[ProxyService, int]:
    """
    Start the proxy as twistd builds it, from a configuration file holding C{configText},
    until C{case} ends: then its sessions are closed (L{closeSessions}) and it is stopped.
    With C{probe}, it probes the upstream at start-up as twistd's does (off by default: it
    would be one more connection in what the test's MTA records).

    @return: the service, and the port of its first listener (which should listen on a
        C{tcp:0} endpoint, as L{loopbackConfig}'s does).
    @raise SystemExit: the configuration is refused, as twistd would refuse it.
    """
    from mailproxy import tap

    directory = tempfile.mkdtemp(prefix="mailproxy-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "mailproxy.toml")
    with open(path, "w") as f:
        f.write(configText)
    options = tap.Options()  # type: ignore[no-untyped-call]
    options.parseOptions(["--config", path])  # type: ignore[no-untyped-call]
    # In this process, whatever the number of cores (no master, no worker processes).
    options["parsed"] = attrs.evolve(options["parsed"], workers=1)
    service = tap.makeService(options)
    assert isinstance(service, ProxyService)
    service.probeUpstream = probe
    service.startService()
    case.addCleanup(service.stopService)
    case.addCleanup(closeSessions, service.factory)
    return service, listeningPort(service)


def listeningPort(service: ProxyService, index: int = 0) -> int:
    """The port a started service's listener number C{index} is bound to."""
    listener = service.listeners[index]
    assert isinstance(listener, Listener), "not a listener of its own (a worker's?)"
    listening = listener._waitingForPort
    assert listening is not None and listening.called, "the service is not listening"
    return int(listening.result.getHost().port)


def closeSessions(factory: RelayFactory) -> Deferred[list[None]]:
    """Close every session's client connection; fires once each session is closed, so
    that no connection outlives a test."""
    sessions = list(factory.sessions)
    for session in sessions:
        session.disconnect()
    return defer.gatherResults([s.closed for s in sessions])


def unfolded(content: bytes) -> bytes:
    """
    A message with its header block unfolded (RFC 5322 2.2.3: each CRLF before
    whitespace removed), the body as it is: what a test compares long header fields in,
    since the release folds what it adds to 78 columns.
    """
    end = content.find(b"\r\n\r\n")
    head, body = (content, b"") if end < 0 else (content[: end + 2], content[end + 2 :])
    return head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t") + body
