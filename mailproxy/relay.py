"""
The relay, the Twisted side of a session: the client's connection, the MTA's, and the
driver between them and the L{mailproxy.session.Session} that decides.

L{InboundProtocol} feeds the session what happens (bytes, replies, verdicts, timers) and
carries out the effects it returns; it decides nothing. L{UpstreamProtocol} only parses
the MTA's replies. L{RelayFactory} admits sessions (connection limits), keeps the registry
of sessions, and stops them gracefully.
"""

from __future__ import annotations

import os
import typing
from collections import Counter, deque
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.tcp import Connection
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy import headeredit, headergrammar, replies, tls, wire
from mailproxy import session as core
from mailproxy.config import Config
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.filters.pipeline import NO_FILTER, Pipeline
from mailproxy.quarantine import Quarantine
from mailproxy.replies import Answer, Reason
from mailproxy.spool import Spool, SpoolSender
from mailproxy.stats import SessionInfo as StatusRow
from mailproxy.stats import Stats

#: The log of every session's steps: one Logger (a class attribute makes one per use),
#: in the namespace these events always had.
_sessionLog = Logger(namespace="mailproxy.relay.InboundProtocol")
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}
#: Seconds a session closed by the shutdown may take to flush its 421 before it is aborted.
LINGER = 5.0
#: Seconds a client may take to read its last replies once its session is closed (a
#: client that reads nothing would keep them, and its connection, for ever); then aborted.
CLOSE_LINGER = 30.0


@attrs.frozen
class Settings:
    """What one session runs under, taken whole when it is accepted (a reload affects only new ones)."""

    config: Config
    pipeline: Pipeline
    #: The MTA (C{config.upstream}, made an endpoint by the service).
    upstream: IStreamClientEndpoint
    #: Where refused messages of C{quarantine = true} filters are kept, if anywhere.
    quarantine: Quarantine | None = None
    #: TLS towards clients (C{[tls]}, L{mailproxy.tls.serverOptions}); L{None}: no
    #: certificate, no STARTTLS.
    serverTls: IOpenSSLServerConnectionCreator | None = None
    #: TLS towards the MTA (C{[upstream_tls]}, L{mailproxy.tls.clientOptions}); L{None}:
    #: mode "none".
    clientTls: IOpenSSLClientConnectionCreator | None = None
    #: Looks up the client's name for XCLIENT and XFORWARD; None: never looked up.
    names: NameLookup | None = None
    #: What sessions offer and require: TLS, AUTH, XCLIENT.
    policy: core.Policy = attrs.Factory(core.Policy)


class ClientName(typing.Protocol):
    name: str
    reverseName: str


class NameLookup(typing.Protocol):
    """Finds a client's name (L{mailproxy.clientname.ClientNames}); never fails."""

    def lookup(self, address: str) -> Deferred[Any]: ...


class RelayFactory(Factory):
    """
    Makes an L{InboundProtocol} per client connection and keeps the count of them, in
    total and per client address.

    @param stats: the counters the sessions report to (a fresh L{Stats} if not given).
    """

    _log = Logger()
    noisy = False

    def __init__(self, settings: Settings, clock: IReactorTime, stats: Stats | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = stats if stats is not None else Stats(clock)
        #: Sessions counted against the limits (their client is connected).
        self.active: set[InboundProtocol] = set()
        #: Every session until both of its connections are closed.
        self.sessions: set[InboundProtocol] = set()
        self._perClient: Counter[str] = Counter()
        #: Stopping: new sessions get 421, those in flight close after their transaction.
        self.draining = False

    def buildProtocol(self, addr: object) -> InboundProtocol:  # type: ignore[override]
        session = InboundProtocol(self, self.settings)
        self.sessions.add(session)
        session.closed.addCallback(lambda _: self.sessions.discard(session))
        return session

    def admit(self, session: InboundProtocol, client: str) -> tuple[Answer, Reason | None] | None:
        """Count a new session in, or answer why it may not start."""
        if self.draining:
            return replies.SHUTTING_DOWN, None
        limits = session.settings.config.limits
        self.stats.connectionOpened()
        if len(self.active) >= limits.connections:
            return replies.TOO_MANY_CONNECTIONS, Reason.CONNECTION_LIMIT
        if self._perClient[client] >= limits.connectionsPerClient:
            return replies.TOO_MANY_FROM_YOU, Reason.CLIENT_LIMIT
        self.active.add(session)
        self._perClient[client] += 1
        self.stats.sessionStarted(session)
        return None

    def release(self, session: InboundProtocol, client: str) -> None:
        if session in self.active:
            self.stats.sessionEnded(session)
            self.active.discard(session)
            self._perClient[client] -= 1
            if self._perClient[client] <= 0:
                del self._perClient[client]

    def shutDown(self, grace: float, linger: float = LINGER) -> Deferred[None]:
        """
        Stop: new sessions get 421; each session in flight finishes its transaction (for up
        to C{grace} seconds) and is then closed with 421; when C{grace} runs out, the rest
        are closed with 421 too, and C{linger} seconds later any connection still open is
        aborted. Fires once every session is closed.
        """
        self.draining = True
        sessions = list(self.sessions)
        timers = [
            self.clock.callLater(grace, self._each, InboundProtocol.shutDown),
            self.clock.callLater(grace + linger, self._each, InboundProtocol.abort),
        ]
        closed = defer.gatherResults([s.closed for s in sessions])
        for session in sessions:
            session.drain()

        def done(_: object) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()

        return closed.addCallback(done)

    def _each(self, method: Callable[[InboundProtocol], None]) -> None:
        for session in list(self.sessions):
            method(session)


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """
    A connection to the MTA: parses its replies and hands them to its session while the
    session listens (L{listening}); an MTA leg being closed is only waited for.
    """

    def __init__(self, owner: InboundProtocol) -> None:
        self._owner = owner
        self.listening = True
        self._parser = wire.ReplyParser()
        #: Replies parsed and not yet handed over (those behind the one being handled).
        self._replies: deque[wire.Reply] = deque()

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self._owner.mtaConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.listening:
            return
        try:
            self._replies.extend(self._parser.feed(data))
        except wire.ProtocolError as e:
            self._owner.mtaProtocolError(self, str(e))
            return
        while self._replies and self.listening:
            self._owner.mtaReplied(self, self._replies.popleft())

    def startTls(self, creator: IOpenSSLClientConnectionCreator) -> bool:
        """
        Start TLS after the MTA's 220 to STARTTLS; False when the MTA sent anything after
        that 220, which would be read as if it came over TLS.
        """
        if self._replies or not self._parser.idle or self.transport is None:
            return False
        self.transport.startTLS(creator)  # type: ignore[attr-defined]
        return True

    def handshakeCompleted(self) -> None:
        if self.listening:
            self._owner.mtaTlsStarted(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._owner.mtaLost(self, reason)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, owner: InboundProtocol) -> None:
        self._owner = owner

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return UpstreamProtocol(self._owner)


def _noDelay(transport: ITransport | None) -> None:
    """Replies and commands are small; delayed ACKs must not stall them (40 ms each)."""
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def _describeTls(transport: object) -> tuple[str, str]:
    """The protocol version and cipher of an established TLS connection."""
    return tls.describe(transport) or ("TLS", "unknown")


def _sessionId() -> str:
    return os.urandom(5).hex().upper()


@implementer(IPushProducer)
class _ReplyBacklog:
    """
    Registered on the client's transport (Twisted's producer/consumer), which tells it
    when the replies it holds unwritten exceed its buffer size, and when they are all
    written: the session is told, and stops or resumes reading from the client.
    """

    def __init__(self, owner: InboundProtocol) -> None:
        self._owner = owner

    def pauseProducing(self) -> None:
        self._owner.repliesBacklogged()

    def resumeProducing(self) -> None:
        self._owner.repliesDrained()

    def stopProducing(self) -> None:
        """The connection is lost: L{InboundProtocol.connectionLost} cleans up."""


def _sendNow(transport: ITransport, data: bytes) -> bool:
    """
    Write C{data} to the socket under C{transport} at once, when nothing waits before it
    and the socket takes all of it: Twisted's own write would register the socket with
    epoll, wait a turn to learn it is writable, send, and unregister (two C{epoll_ctl}
    a reply). What the socket does not take, or a transport under TLS or closing, goes
    through C{transport.write} as usual: False, so that L{_writeNow} follows.

    Only a wrapper that passes writes through as they are (the PROXY protocol's) is
    looked under; TLS's wrapper and any other keep every write.
    """
    fd: object = transport
    while isinstance(fd, ProtocolWrapper) and type(fd).write is ProtocolWrapper.write:
        fd = fd.transport
    if (
        isinstance(fd, Connection)
        and not fd.TLS
        and fd.connected
        and not fd.disconnecting
        and not fd._tempDataLen
        and len(fd.dataBuffer) == fd.offset
    ):
        sent = fd.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:  # else an error, or nothing taken
            if sent == len(data):
                return True
            data = data[sent:]
    transport.write(data)
    return False


def _writeNow(transport: object) -> None:
    """
    Send what the socket transport under C{transport} holds now, instead of at the
    reactor's next turn (Twisted writes a socket only when epoll next says it is
    writable): each reply the proxy relays is one loop iteration sooner. A transport
    that is closing, or holds nothing, is left to the reactor; so is a send that fails
    (the bytes stay buffered, and the reactor's own attempt reports the error).
    """
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            fd = transport
            pending = fd._tempDataLen or len(fd.dataBuffer) > fd.offset
            if pending and fd.connected and not fd.disconnecting:
                fd.doWrite()
            return
        transport = getattr(transport, "transport", None)


def _limitWriteBuffer(transport: object, size: int) -> None:
    """
    Make the socket transport under C{transport} (under TLS or the PROXY protocol's
    wrapper, if any) pause its producer past C{size} unwritten bytes instead of its
    default 64 KiB (C{FileDescriptor.bufferSize}); other transports keep theirs.
    """
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = size
            return
        transport = getattr(transport, "transport", None)


class _UnreleasableError(Exception):
    """The spooled message cannot be released as the session asked (a bug, or a disk)."""


def _endOfData(head: bytes, f: typing.BinaryIO, offset: int, size: int) -> bytes:
    """
    What ends a release after DATA: the dot line, after a CRLF when the message (C{head},
    then the spool from C{offset} to its C{size}) does not end its last line. Stuffing
    never changes that; the spool's last bytes are read without moving its position.
    """
    tail = os.pread(f.fileno(), 2, max(offset, size - 2))
    return b".\r\n" if (wire.CRLF + head[-2:] + tail)[-2:] == wire.CRLF else b"\r\n.\r\n"


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class InboundProtocol(Protocol):
    """
    One client connection and its MTA legs: carries out what its L{core.Session} decides.

    Half-close aware: a client that shuts down its side after its last command (Exim
    writes the final dot and QUIT, then shuts down) still gets every reply it is owed.
    """

    _log = Logger()
    factory: RelayFactory

    def __init__(self, factory: RelayFactory, settings: Settings) -> None:
        self.factory = factory
        self.settings = settings
        self._clock = factory.clock
        self._stats = factory.stats
        self.session = SessionInfo(_sessionId(), "unknown", 0)
        self.machine = core.Session(
            settings.config, self.session, settings.pipeline.sizeLimit, settings.policy
        )
        self._client = "unknown"
        self._effects: deque[core.Effect] = deque()
        self._running = False
        #: Something was written in this batch of effects: L{_writeNow} after it.
        self._wrote = False
        #: Writes of this batch not yet sent (L{_flushWrites}), to the client and to the
        #: MTA leg that was current when they were made.
        self._clientOut: list[bytes] = []
        self._mtaOut: list[bytes] = []
        self._mtaOutTo: UpstreamProtocol | None = None
        #: The session's timers, by when each is due, and the one call of the clock that
        #: rings at the earliest of them (L{_ring}): a session starts and stops its timers
        #: on every command, and a number set costs less than a DelayedCall made, moved
        #: or cancelled. One stopped stays in the clock until it rings, finds nothing
        #: due, and is set for the next.
        self._due: dict[core.Timer, float] = {}
        self._alarm: IDelayedCall | None = None
        self._mta: UpstreamProtocol | None = None
        #: MTA connections not yet closed (an old one may still be closing after a reconnect).
        self._legs: set[UpstreamProtocol] = set()
        self._connecting: Deferred[IProtocol] | None = None
        self._checking: Deferred[Verdict] | None = None
        self._spool: Spool | None = None
        self._spoolError = False
        self._clientGone = False
        #: The reactor turn asked for by L{core.ContinueLater}; the abort of a closed
        #: client that does not read its last replies (L{CLOSE_LINGER}).
        self._continuation: IDelayedCall | None = None
        self._lingering: IDelayedCall | None = None
        self._backlog = _ReplyBacklog(self)
        #: Fires once both the client's and the MTA's connections are closed.
        self.closed: Deferred[None] = Deferred()

    # -- events from the client ----------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        _noDelay(self.transport)
        peer = self.transport.getPeer()
        self._client = str(getattr(peer, "host", "unknown"))
        self.session.clientAddress = self._client
        self.session.clientPort = int(getattr(peer, "port", 0))
        implicitTls = ISSLTransport.providedBy(self.transport)  # a listen_tls listener
        _limitWriteBuffer(self.transport, self.settings.config.limits.replyBuffer)
        typing.cast(IConsumer, self.transport).registerProducer(self._backlog, True)
        self._feed(self.machine.start(self.factory.admit(self, self._client), implicitTls))

    def handshakeCompleted(self) -> None:
        """The client's TLS is up (after STARTTLS, or on an implicit-TLS listener)."""
        version, cipher = _describeTls(self.transport)
        self._feed(self.machine.tlsStarted(version, cipher))

    def dataReceived(self, data: bytes) -> None:
        self._feed(self.machine.clientData(data))

    def readConnectionLost(self) -> None:
        self._feed(self.machine.clientEnded())

    def writeConnectionLost(self) -> None:
        """We never shut down our own side for writing; nothing to do."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._clientGone = True
        for call in (self._continuation, self._lingering):
            if call is not None and call.active():
                call.cancel()
        self._continuation = self._lingering = None
        self.factory.release(self, self._client)
        self._feed(self.machine.clientLost())
        self._dropAlarm()
        self._checkClosed()

    def repliesBacklogged(self) -> None:
        """The client's transport holds more unwritten replies than C{limits.reply_buffer}."""
        if not self._clientGone:
            self._feed(self.machine.clientBacklogged())

    def repliesDrained(self) -> None:
        """The client's transport wrote every reply it held."""
        if not self._clientGone:
            self._feed(self.machine.clientDrained())

    # -- events from the service ---------------------------------------------------------

    def drain(self) -> None:
        """The service is stopping: finish the transaction in flight, then close with 421."""
        self._feed(self.machine.drain())

    def shutDown(self) -> None:
        """Close now with 421, whatever the session is doing: its grace time is over."""
        self._feed(self.machine.shutDown())

    def abort(self) -> None:
        """Drop every connection without waiting to flush what is unsent."""
        for transport in [self.transport, *(leg.transport for leg in self._legs)]:
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]

    def describe(self) -> StatusRow:
        """The session as the status page and the stats socket show it."""
        return StatusRow(
            id=self.session.id,
            client=self._client,
            helo=self.session.helo,
            sender=self.machine.sender,
            recipients=self.machine.recipients,
            phase=self.machine.state.value,
        )

    # -- events from the MTA -------------------------------------------------------------

    def mtaConnected(self, mta: UpstreamProtocol) -> None:
        self._legs.add(mta)
        if self._clientGone:
            self._drop(mta, quit=True)
            return
        self._mta = mta
        self._feed(self.machine.mtaConnected())

    def mtaReplied(self, mta: UpstreamProtocol, reply: wire.Reply) -> None:
        self._feed(self.machine.mtaReply(reply))

    def mtaTlsStarted(self, mta: UpstreamProtocol) -> None:
        if mta is self._mta:
            version, cipher = _describeTls(mta.transport)
            self._feed(self.machine.mtaTlsStarted(version, cipher))

    def mtaProtocolError(self, mta: UpstreamProtocol, why: str) -> None:
        self._feed(self.machine.mtaProtocolError(why))

    def mtaLost(self, mta: UpstreamProtocol, reason: Failure) -> None:
        self._legs.discard(mta)
        if mta is self._mta:
            self._mta = None
            self._feed(self.machine.mtaLost(reason.getErrorMessage()))
        self._checkClosed()

    # -- carrying out effects ------------------------------------------------------------

    def _feed(self, effects: Iterable[core.Effect]) -> None:
        """Carry out effects in order; those of the events they cause come after them."""
        self._effects.extend(effects)
        if self._running:
            return
        self._running = True
        try:
            while self._effects:
                effect = self._effects.popleft()
                kind = type(effect)
                if kind not in _BESIDE_WRITES and (self._clientOut or self._mtaOut):
                    self._flushWrites()
                _HANDLERS[kind](self, effect)
        finally:
            self._running = False
        self._flushWrites()
        if self._wrote:
            self._wrote = False
            _writeNow(self.transport)
            if self._mta is not None:
                _writeNow(self._mta.transport)

    def _sendClient(self, effect: core.SendClient) -> None:
        if self.transport is not None and not self._clientGone:
            self._clientOut.append(effect.data)

    def _flushWrites(self) -> None:
        """
        Send the batch's writes, one per connection (L{_sendNow}): before any effect that
        may close, secure or reconnect a connection, and at the end of the batch.
        """
        if self._clientOut:
            data = b"".join(self._clientOut)
            self._clientOut.clear()
            if self.transport is not None and not self._clientGone:
                self._wrote |= not _sendNow(self.transport, data)
        if self._mtaOut:
            mta, data = self._mtaOutTo, b"".join(self._mtaOut)
            self._mtaOut.clear()
            self._mtaOutTo = None
            if mta is not None and mta.transport is not None:
                self._wrote |= not _sendNow(mta.transport, data)

    def disconnect(self) -> None:
        """
        Close the client's connection once what was written to it is flushed; abort it if
        the client has not read that in L{CLOSE_LINGER} seconds.
        """
        if self.transport is None or self._clientGone or self._lingering is not None:
            return
        # A producer still registered would keep the connection open (TLS never shuts
        # down under one): the replies left are flushed without it.
        typing.cast(IConsumer, self.transport).unregisterProducer()
        self.transport.loseConnection()
        self._lingering = self._clock.callLater(CLOSE_LINGER, self._abortClient)

    def _closeClient(self, effect: core.CloseClient) -> None:
        self.disconnect()

    def _abortClient(self) -> None:
        self._lingering = None
        if self.transport is not None and not self._clientGone:
            self._log.info(
                "{session} aborted: the client did not read its last replies in {seconds} s",
                session=self.session.id,
                seconds=CLOSE_LINGER,
            )
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _continueLater(self, effect: core.ContinueLater) -> None:
        if self._continuation is None and not self._clientGone:
            self._continuation = self._clock.callLater(0, self._proceed)

    def _proceed(self) -> None:
        self._continuation = None
        if not self._clientGone:
            self._feed(self.machine.proceed())

    def _limitReached(self, effect: core.LimitReached) -> None:
        self._stats.limitReached(self.session, effect.what, effect.reply)

    def _pauseClient(self, effect: core.PauseClient) -> None:
        if self.transport is not None and not self._clientGone:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resumeClient(self, effect: core.ResumeClient) -> None:
        if self.transport is not None and not self._clientGone:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _connectMta(self, effect: core.ConnectMta) -> None:
        d = self.settings.upstream.connect(_UpstreamFactory(self))
        d.addTimeout(self.settings.config.timeouts.mtaConnect, self._clock)
        self._connecting = d

        def connected(mta: IProtocol) -> None:
            if self._connecting is d:
                self._connecting = None
            self._checkClosed()

        def failed(failure: Failure) -> None:
            if self._connecting is d:
                self._connecting = None
                self._feed(self.machine.mtaUnreachable(failure.getErrorMessage()))
            self._checkClosed()

        d.addCallbacks(connected, failed)

    def _startTls(self, effect: core.StartTls) -> None:
        creator = self.settings.serverTls
        if self.transport is None or self._clientGone:
            return
        if creator is None:  # the session offers STARTTLS only with a certificate
            self.disconnect()
            return
        self.transport.startTLS(creator)  # type: ignore[attr-defined]

    def _startMtaTls(self, effect: core.StartMtaTls) -> None:
        mta, creator = self._mta, self.settings.clientTls
        if mta is None:
            return
        if creator is None or not mta.startTls(creator):
            self._feed(self.machine.mtaProtocolError("bytes after the 220 to STARTTLS"))

    def _tlsEstablished(self, effect: core.TlsEstablished) -> None:
        self._stats.tlsEstablished(effect.side, effect.version)

    def _resolveClient(self, effect: core.ResolveClient) -> None:
        names = self.settings.names
        if names is None:
            self._feed(self.machine.clientNamed("[UNAVAILABLE]", "[UNAVAILABLE]"))
            return

        def named(result: ClientName) -> None:
            if not self._clientGone:
                self._feed(self.machine.clientNamed(result.name, result.reverseName))

        names.lookup(effect.address).addCallback(named)

    def _cancelConnect(self, effect: core.CancelConnect) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()

    def _sendMta(self, effect: core.SendMta) -> None:
        mta = self._mta
        if mta is not None and mta.transport is not None:
            if self._mtaOutTo is not mta:
                self._flushWrites()
                self._mtaOutTo = mta
            self._mtaOut.append(effect.data)

    def _closeMta(self, effect: core.CloseMta) -> None:
        mta, self._mta = self._mta, None
        if mta is not None:
            self._drop(mta, effect.quit)

    def _abortMta(self, effect: core.AbortMta) -> None:
        mta, self._mta = self._mta, None
        if mta is not None:
            mta.listening = False
            if mta.transport is not None:
                mta.transport.abortConnection()  # type: ignore[attr-defined]

    def _drop(self, mta: UpstreamProtocol, quit: bool) -> None:
        """Close an MTA leg the session no longer listens to; it counts until it is gone."""
        mta.listening = False
        if mta.transport is not None:
            if quit:
                mta.transport.write(b"QUIT\r\n")
            mta.transport.loseConnection()

    def _runCheck(self, effect: core.RunCheck) -> None:
        pipeline = self.settings.pipeline
        stage = effect.stage
        if not pipeline.wants(stage):
            # The pipeline's answer, without a Deferred: most stages have no filter.
            self._checking = None
            self._feed(self.machine.verdict(stage, NO_FILTER))
            return
        if stage is Stage.CONNECT:
            d = pipeline.checkConnect(effect.session)
        elif stage is Stage.HELO:
            d = pipeline.checkHelo(effect.session)
        elif stage is Stage.MAIL:
            assert effect.envelope is not None
            d = pipeline.checkMail(effect.session, effect.envelope)
        elif stage is Stage.RCPT:
            assert effect.envelope is not None and effect.recipient is not None
            d = pipeline.checkRcpt(effect.session, effect.envelope, effect.recipient)
        else:
            assert effect.envelope is not None and self._spool is not None
            d = pipeline.checkMessage(effect.session, effect.envelope, self._spool.message())
        self._checking = d

        def decided(verdict: Verdict) -> None:
            if self._checking is d:
                self._checking = None
                self._feed(self.machine.verdict(stage, verdict))

        def failed(failure: Failure) -> None:
            if failure.check(defer.CancelledError) and (self._clientGone or self._checking is not d):
                return  # cancelled: the client left, or the session let go of it
            self._log.failure("{session} internal error", failure, session=self.session.id)
            if self._checking is d:
                self._checking = None
                self._feed(self.machine.checkFailed())

        d.addCallback(decided).addErrback(failed)

    def _cancelCheck(self, effect: core.CancelCheck) -> None:
        checking, self._checking = self._checking, None
        if checking is not None:
            checking.cancel()

    def _spoolOpen(self, effect: core.SpoolOpen) -> None:
        config = self.settings.config
        try:
            self._spool = Spool(config.spoolDir, config.limits.messageSize)
        except OSError as e:
            self._feed(self.machine.spoolFailed(f"cannot create a spool file: {e}"))
            return
        self._spoolError = False
        self._feed(self.machine.spoolOpened())

    def _spoolWrite(self, effect: core.SpoolWrite) -> None:
        spool = self._spool
        assert spool is not None
        spool.write(effect.data)
        self._spoolFailed(spool)

    def _spoolFailed(self, spool: Spool) -> None:
        if spool.error is not None and not self._spoolError:
            self._spoolError = True
            self._feed(self.machine.spoolFailed(str(spool.error)))

    def _spoolClose(self, effect: core.SpoolClose) -> None:
        spool = self._spool
        assert spool is not None
        spool.close()
        self._spoolFailed(spool)
        self._feed(self.machine.spoolClosed())

    def _spoolRemove(self, effect: core.SpoolRemove) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.remove()

    def _quarantine(self, effect: core.Quarantine) -> None:
        quarantine = self.settings.quarantine
        if quarantine is not None and self._spool is not None and quarantine.wants(effect.verdict):
            quarantine.keep(self._spool.message(), effect.session, effect.envelope, effect.verdict)

    def _release(self, effect: core.Release) -> None:
        """
        Stream the message to the MTA: our trace header and the filters' headers, the
        spooled header block with the filters' edits applied, then the rest of the spool
        as it is (L{mailproxy.headeredit}); dot-stuffed, then the dot; or, for
        C{chunked}, after one BDAT whose size is counted here, from exactly these bytes.
        """
        spool, mta = self._spool, self._mta
        if spool is None or mta is None or mta.transport is None:
            self._feed(self.machine.releaseFailed("the MTA or the spool is gone"))
            return
        transport = mta.transport
        try:
            f = spool.reader()  # closed when the transfer ends
        except OSError as e:
            self._feed(self.machine.releaseFailed(str(e)))
            return
        try:
            head, offset = self._releasedHead(effect, f)
        except _UnreleasableError as e:
            f.close()
            self._feed(self.machine.releaseFailed(str(e)))
            return
        # BDAT: the MTA reads exactly this many bytes as the message; the count is of
        # what is sent (the sender reads no more of the spool, and fails if it has less),
        # never a guess made before the edits.
        rest = effect.spooled - offset
        if effect.chunked:
            sender = SpoolSender(f, prefix=wire.bdatLine(len(head) + rest) + head, length=rest)
        else:
            stuffer = wire.Stuffer()  # the head and the body, stuffed as one stream
            sender = SpoolSender(
                f,
                prefix=stuffer(head),
                # End of data is CRLF.CRLF whether or not the message ends its last line.
                suffix=_endOfData(head, f, offset, effect.spooled),
                # A spool without dot lines has no LF dot to search each chunk for.
                transform=stuffer if effect.stuffing else stuffer.dotFree,
                length=rest,
            )
        d = sender.beginTransfer(typing.cast(IConsumer, transport))
        self._wrote = True

        def sent(_: object) -> None:
            f.close()
            if self._mta is mta and mta.transport is not None:
                self._feed(self.machine.releaseSent())

        def failed(failure: Failure) -> None:
            f.close()
            if self._mta is mta:
                self._feed(self.machine.releaseFailed(failure.getErrorMessage()))

        d.addCallbacks(sent, failed)

    def _releasedHead(self, effect: core.Release, f: typing.BinaryIO) -> tuple[bytes, int]:
        """
        What goes before the rest of the spool, and where in the spool that rest starts:
        the header block with the edits applied when they need it (read from the spool,
        no more than the header grammar's limit), else only what goes on top.

        @raise _UnreleasableError: the spool is not the message the session counted, or
            its header block not one the header grammar reads.
        """
        size = os.fstat(f.fileno()).st_size
        if size != effect.spooled:
            raise _UnreleasableError("the spool is not the message's size")
        added = effect.headers
        if effect.trace is not None:
            date = formatdate(self._clock.seconds(), localtime=True)
            added = (effect.trace.header(date), *added)
        block, end = b"", 0
        if headeredit.needsBlock(effect.edits):
            block = f.read(headergrammar.MAX_HEADER_BYTES)
            found = headeredit.headerEnd(block, complete=len(block) == size)
            if found is None:
                raise _UnreleasableError("the header block is over the header grammar's limit")
            end = found
            f.seek(end)
        try:
            edited = headeredit.editBlock(block[:end], effect.edits)
        except headeredit.HeaderBlockError as e:
            raise _UnreleasableError(f"the spooled header block: {e}") from None
        return headeredit.addedBytes(added) + edited, end

    def _startTimer(self, effect: core.StartTimer) -> None:
        due = self._clock.seconds() + effect.seconds
        self._due[effect.timer] = due
        alarm = self._alarm
        if alarm is None:
            self._setAlarm()
        elif due < alarm.getTime():
            alarm.reset(effect.seconds)

    def _setAlarm(self) -> None:
        if self._due:
            wait = max(0.0, min(self._due.values()) - self._clock.seconds())
            self._alarm = self._clock.callLater(wait, self._ring)

    def _ring(self) -> None:
        """Fire the timers now due, the earliest first; then wait for the next one."""
        self._alarm = None
        now = self._clock.seconds() + _TIMER_SLACK
        for timer, due in sorted(self._due.items(), key=lambda item: item[1]):
            if due > now:
                break
            if self._due.get(timer) == due:  # not stopped or started again since
                del self._due[timer]
                self._feed(self.machine.timerFired(timer))
        if self._alarm is None:
            self._setAlarm()

    def _cancelTimer(self, effect: core.CancelTimer) -> None:
        self._due.pop(effect.timer, None)
        if self._clientGone:
            self._dropAlarm()

    def _dropAlarm(self) -> None:
        """The client is gone: no session starts timers again, so none left, no alarm."""
        alarm = self._alarm
        if not self._due and alarm is not None:
            self._alarm = None
            if alarm.active():
                alarm.cancel()

    def _logEffect(self, effect: core.Log) -> None:
        _sessionLog.emit(
            _LEVELS[effect.level], effect.format, session=self.session.id, **effect.fields
        )

    def _report(self, effect: core.Report) -> None:
        what = effect.what
        if what is core.Counted.CONNECTION_ACCEPTED:
            self._stats.connectionAccepted()
        elif what is core.Counted.MESSAGE_ATTEMPTED:
            self._stats.messageAttempted()
        elif what is core.Counted.RECIPIENT_ACCEPTED:
            self._stats.recipientAccepted()
        elif what is core.Counted.RELEASED:
            self._stats.released(self.session)
        elif what is core.Counted.AUTH_SUCCEEDED:
            self._stats.authenticated(True)
        elif what is core.Counted.AUTH_FAILED:
            self._stats.authenticated(False)

    def _refused(self, effect: core.Refused) -> None:
        self._stats.refused(self.session, effect.stage, effect.reply, effect.sender, effect.by)

    def _delivered(self, effect: core.Delivered) -> None:
        self._stats.delivered(self.session, effect.reply, effect.sender, effect.size)

    def _mtaError(self, effect: core.MtaError) -> None:
        self._stats.mtaError(self.session, effect.kind)

    def _checkClosed(self) -> None:
        if (
            self._clientGone
            and not self._legs
            and self._connecting is None
            and not self.closed.called
        ):
            self.closed.callback(None)


#: How early a timer may fire: the clock's float arithmetic may ring a hair before it.
_TIMER_SLACK = 1e-6

#: Effects that touch no connection: the batch's writes wait for its end across them.
#: Any other is carried out after them (a close, STARTTLS, a release, a new MTA leg).
_BESIDE_WRITES: frozenset[type[Any]] = frozenset(
    {
        core.SendClient,
        core.SendMta,
        core.Log,
        core.Report,
        core.StartTimer,
        core.CancelTimer,
        core.RunCheck,
        core.CancelCheck,
        core.SpoolOpen,
        core.SpoolWrite,
        core.SpoolClose,
        core.SpoolRemove,
        core.Quarantine,
        core.TlsEstablished,
        core.Refused,
        core.Delivered,
        core.MtaError,
        core.LimitReached,
    }
)

_HANDLERS: dict[type[Any], Callable[[InboundProtocol, Any], None]] = {
    core.SendClient: InboundProtocol._sendClient,
    core.CloseClient: InboundProtocol._closeClient,
    core.PauseClient: InboundProtocol._pauseClient,
    core.ResumeClient: InboundProtocol._resumeClient,
    core.ConnectMta: InboundProtocol._connectMta,
    core.CancelConnect: InboundProtocol._cancelConnect,
    core.StartTls: InboundProtocol._startTls,
    core.StartMtaTls: InboundProtocol._startMtaTls,
    core.TlsEstablished: InboundProtocol._tlsEstablished,
    core.ResolveClient: InboundProtocol._resolveClient,
    core.SendMta: InboundProtocol._sendMta,
    core.CloseMta: InboundProtocol._closeMta,
    core.AbortMta: InboundProtocol._abortMta,
    core.RunCheck: InboundProtocol._runCheck,
    core.CancelCheck: InboundProtocol._cancelCheck,
    core.SpoolOpen: InboundProtocol._spoolOpen,
    core.SpoolWrite: InboundProtocol._spoolWrite,
    core.SpoolClose: InboundProtocol._spoolClose,
    core.SpoolRemove: InboundProtocol._spoolRemove,
    core.Quarantine: InboundProtocol._quarantine,
    core.Release: InboundProtocol._release,
    core.StartTimer: InboundProtocol._startTimer,
    core.CancelTimer: InboundProtocol._cancelTimer,
    core.Log: InboundProtocol._logEffect,
    core.Report: InboundProtocol._report,
    core.Refused: InboundProtocol._refused,
    core.Delivered: InboundProtocol._delivered,
    core.MtaError: InboundProtocol._mtaError,
    core.ContinueLater: InboundProtocol._continueLater,
    core.LimitReached: InboundProtocol._limitReached,
}
