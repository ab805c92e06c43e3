"""
The relay: the client's connection, the MTA's, and the pairing of the two.

L{InboundProtocol} speaks to the client and owns the session; L{UpstreamProtocol} only
parses the MTA's replies and hands them back. Commands are relayed as they come,
pipelined; replies go back in the order of the commands, whether they are the MTA's or
our own. At DATA the message is spooled, filtered, and then released to the MTA or
refused, and the MTA's transaction reset.
"""

from __future__ import annotations

import enum
import os
from collections import Counter, deque
from collections.abc import Callable
from typing import ClassVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mailproxy import wire
from mailproxy.config import BareLineEndings, Config
from mailproxy.envelope import Envelope, Session
from mailproxy.filters import Stage, Verdict
from mailproxy.filters.pipeline import Pipeline
from mailproxy.quarantine import Quarantine
from mailproxy.spool import Spool
from mailproxy.stats import (
    CLIENT_LIMIT,
    CONNECTION_LIMIT,
    MTA,
    MTA_DOWN,
    RECIPIENT_LIMIT,
    SessionInfo,
    Stats,
)
from mailproxy.wire import TOO_LONG, Reply

#: Stop reading from a client with this many unprocessed bytes or unanswered commands.
MAX_BUFFERED = 64 * 1024
MAX_PENDING = 1000


def reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply.make(code, enhanced, text)


# Our own replies, named (RFC 5321 codes, RFC 3463 enhanced codes).
START_INPUT = reply(354, "", "End data with <CR><LF>.<CR><LF>")
LINE_TOO_LONG = reply(500, "5.5.2", "Error: line too long")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")
NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
NO_RECIPIENTS = reply(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
TOO_BIG = reply(552, "5.3.4", "Error: message size exceeds fixed limit")
BARE_LINE_ENDING = reply(554, "5.6.0", "Error: bare CR or LF in message content")
SPOOL_FAILED = reply(452, "4.3.1", "Error: insufficient system storage")
#: The text of the 421 a stopping proxy closes sessions with.
SHUTTING_DOWN = "Service shutting down"
#: Seconds a session closed by the shutdown may take to flush its 421 before it is aborted.
LINGER = 5.0


def _closing(hostname: str, enhanced: str, text: str) -> Reply:
    return Reply(421, (f"{enhanced} {hostname} {text}".encode("utf-8", "replace"),))


def _verdictReply(verdict: Verdict) -> Reply:
    return reply(verdict.code, verdict.enhanced, verdict.text)


class Phase(enum.Enum):
    """Where a session is; each phase decides what client bytes mean."""

    CONNECTING = "connecting"  # connect filters, MTA connection, MTA banner
    COMMAND = "command"  # relaying commands
    DATA = "data"  # receiving a message into the spool
    FILTERING = "filtering"  # message filters deciding
    RELEASING = "releasing"  # sending the message to the MTA, awaiting its reply
    CLOSED = "closed"


@attrs.define
class _Pending:
    """
    One reply owed, in command order: ours (C{reply} set) or the MTA's (C{onReply}
    maps it to the reply for the client, or to C{None} to keep it from the client).
    """

    onReply: Callable[[Reply], Reply | None] | None = None
    reply: Reply | None = None
    ready: bool = False


@attrs.frozen
class Settings:
    """What one session runs under, fixed when it starts (a reload affects only new ones)."""

    config: Config
    pipeline: Pipeline
    #: Where refused messages of C{quarantine = true} filters are kept, if anywhere.
    quarantine: Quarantine | None = None


class RelayFactory(Factory):
    """
    Makes a L{InboundProtocol} per client connection and keeps the count of them, in
    total and per client address.

    @param stats: the counters the sessions report to (a fresh L{Stats} if not given).
    """

    _log = Logger()
    noisy = False

    def __init__(
        self,
        settings: Settings,
        upstream: IStreamClientEndpoint,
        clock: IReactorTime,
        stats: Stats | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
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

    def admit(self, session: InboundProtocol, client: str) -> Reply | None:
        """Count a new session in, or answer why it may not start."""
        if self.draining:
            return _closing(session.hostname, "4.3.2", SHUTTING_DOWN)
        limits = session.settings.config.limits
        self.stats.connectionOpened()
        if len(self.active) >= limits.connections:
            return self._refuse(session, CONNECTION_LIMIT, "Error: too many connections")
        if self._perClient[client] >= limits.connectionsPerClient:
            return self._refuse(session, CLIENT_LIMIT, "Error: too many connections from you")
        self.active.add(session)
        self._perClient[client] += 1
        self.stats.sessionStarted(session)
        return None

    def _refuse(self, session: InboundProtocol, reason: str, text: str) -> Reply:
        refusal = _closing(session.hostname, "4.7.0", text)
        self.stats.refused(session.session, Stage.CONNECT, refusal, reason=reason)
        return refusal

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

    def release(self, session: InboundProtocol, client: str) -> None:
        if session in self.active:
            self.stats.sessionEnded(session)
            self.active.discard(session)
            self._perClient[client] -= 1
            if self._perClient[client] <= 0:
                del self._perClient[client]


class UpstreamProtocol(Protocol):
    """The connection to the MTA: parses its replies and hands them to the session."""

    def __init__(self, session: InboundProtocol) -> None:
        self._session = session
        self._parser = wire.ReplyParser()

    def connectionMade(self) -> None:
        _noDelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except wire.ProtocolError as e:
            self._session.mtaFailed(str(e))
            return
        for r in replies:
            self._session.mtaReplied(r)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._session.mtaLost(reason)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, session: InboundProtocol) -> None:
        self._session = session

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return UpstreamProtocol(self._session)


def _noDelay(transport: ITransport | None) -> None:
    """Replies and commands are small; delayed ACKs must not stall them (40 ms each)."""
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def _sessionId() -> str:
    return os.urandom(5).hex().upper()


class InboundProtocol(Protocol):
    """One client session, paired with one connection to the MTA."""

    _log = Logger()
    factory: RelayFactory

    #: Verbs we answer ourselves and never relay.
    REFUSED_VERBS: ClassVar[frozenset[str]] = frozenset({"BDAT", "STARTTLS", "XCLIENT", "XFORWARD"})

    def __init__(self, factory: RelayFactory, settings: Settings) -> None:
        self.factory = factory
        self.settings = settings
        config = settings.config
        self.hostname = config.hostname
        self._clock = factory.clock
        self._stats = factory.stats
        self._pipeline = settings.pipeline
        self._commands = wire.CommandBuffer(config.limits.lineLength)
        self._pending: deque[_Pending] = deque()
        self._toMta: list[bytes] = []
        self._toClient: list[bytes] = []
        self._phase = Phase.CONNECTING
        self._mta: UpstreamProtocol | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._envelope: Envelope | None = None
        self._mailAccepted = False
        self._recipientsAsked = 0
        self._spool: Spool | None = None
        self._scanner: wire.DataScanner | None = None
        self._checking: Deferred[Verdict] | None = None
        self._onDrained: Callable[[], None] | None = None
        self._advancing = False
        self._blocked = False
        self._closeAfterFlush = False
        self._readingPaused = False
        self._idleTimer: IDelayedCall | None = None
        self._mtaTimer: IDelayedCall | None = None
        self._keepalive: IDelayedCall | None = None
        self._client = "unknown"
        self._clientGone = False
        self._quitSent = False
        self._sessionHeaders: dict[Stage, tuple[tuple[str, str], ...]] = {}
        self._transactionHeaders: list[tuple[str, str]] = []
        self._draining = False
        #: Fires once both the client's and the MTA's connections are closed.
        self.closed: Deferred[None] = Deferred()
        self.session = Session(_sessionId(), "unknown", 0)

    # -- the client side ---------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        _noDelay(self.transport)
        peer = self.transport.getPeer()
        self._client = str(getattr(peer, "host", "unknown"))
        self.session = Session(_sessionId(), self._client, int(getattr(peer, "port", 0)))
        refusal = self.factory.admit(self, self._client)
        if refusal is not None:
            self._log.warn(
                "{session} refused connection from [{client}]: {reply}",
                session=self.session.id,
                client=self._client,
                reply=refusal.text,
            )
            self._closeWith(refusal)
            return
        self._log.info(
            "{session} connect from [{client}]:{port}",
            session=self.session.id,
            client=self._client,
            port=self.session.clientPort,
        )
        self._touch()
        self._gate(self._pipeline.checkConnect(self.session), self._connectUpstream, Stage.CONNECT)

    def dataReceived(self, data: bytes) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._touch()
        if self._phase is Phase.DATA:
            self._messageData(data)
        else:
            self._commands.feed(data)
        self._advance()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = Phase.CLOSED
        self._clientGone = True
        midMessage = self._spool is not None
        self.factory.release(self, self._client)
        for timer in (self._idleTimer, self._mtaTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._endTransaction()
        if self._checking is not None:
            self._checking.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._mta is None or self._mta.transport is None:
            self.closed.callback(None)
        elif midMessage:
            # The client will retry this message: the MTA must not get its end.
            self._mta.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            if not self._quitSent:
                self._mta.transport.write(b"QUIT\r\n")
            self._mta.transport.loseConnection()
        self._log.info(
            "{session} disconnect from [{client}]", session=self.session.id, client=self._client
        )

    def drain(self) -> None:
        """The service is stopping: finish the transaction in flight, then close with 421."""
        self._draining = True
        if self._phase is Phase.CONNECTING:
            self.shutDown()
        else:
            self._advance()

    def shutDown(self) -> None:
        """Close now with 421, whatever the session is doing: its grace time is over."""
        if self._phase is Phase.CLOSED:
            return
        self._log.info(
            "{session} closed by the shutdown in phase {phase}",
            session=self.session.id,
            phase=self._phase.value,
        )
        self._closeWith(_closing(self.hostname, "4.3.2", SHUTTING_DOWN))

    def abort(self) -> None:
        """Drop both connections without waiting to flush what is unsent."""
        for transport in (self.transport, self._mta.transport if self._mta else None):
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]

    # -- the MTA side ------------------------------------------------------------------

    def _connectUpstream(self) -> None:
        d = self.factory.upstream.connect(_UpstreamFactory(self))
        d.addTimeout(self.settings.config.timeouts.mtaConnect, self._clock)
        self._connecting = d
        self._expectMta(self._onBanner)

        def connected(mta: IProtocol) -> None:
            assert isinstance(mta, UpstreamProtocol)
            self._connecting = None
            self._mta = mta
            self._armMtaTimer()

        def failed(failure: Failure) -> None:
            self._connecting = None
            if self._phase is Phase.CLOSED:
                return
            self._log.error(
                "{session} cannot reach the MTA: {why}",
                session=self.session.id,
                why=failure.getErrorMessage(),
            )
            self._pending.clear()
            refusal = _closing(self.hostname, "4.3.2", "Service not available, try again later")
            self._stats.mtaError(self.session, "unreachable")
            self._stats.refused(self.session, Stage.CONNECT, refusal, reason=MTA_DOWN)
            self._closeWith(refusal)

        d.addCallbacks(connected, failed)

    def _onBanner(self, banner: Reply) -> Reply:
        if banner.code == 220:
            self._phase = Phase.COMMAND
            self._stats.connectionAccepted()
        else:
            self._closeAfterFlush = True
            self._stats.refused(self.session, Stage.CONNECT, banner, reason=MTA)
        return banner

    def mtaReplied(self, r: Reply) -> None:
        """A reply from the MTA: it answers the oldest command still waiting on the MTA."""
        if self._phase is Phase.CLOSED:
            return
        waiting = [e for e in self._pending if not e.ready and e.onReply is not None][:1]
        if waiting:
            entry = waiting[0]
            assert entry.onReply is not None
            entry.reply, entry.ready = entry.onReply(r), True
        else:
            if r.code == 421:
                self._log.warn(
                    "{session} MTA closing: {reply}", session=self.session.id, reply=r.text
                )
                self._closeWith(r)
            else:
                self._log.warn(
                    "{session} unexpected MTA reply: {reply}", session=self.session.id, reply=r.text
                )
            return
        self._armMtaTimer()
        self._flushClient()
        if self._onDrained is not None and not self._awaitingMta():
            then, self._onDrained = self._onDrained, None
            then()
        self._advance()

    def mtaFailed(self, why: str) -> None:
        self._log.error("{session} MTA protocol error: {why}", session=self.session.id, why=why)
        self._stats.mtaError(self.session, "protocol")
        if self._mta is not None and self._mta.transport is not None:
            self._mta.transport.abortConnection()  # type: ignore[attr-defined]

    def mtaLost(self, reason: Failure) -> None:
        self._mta = None
        if self._clientGone:
            self.closed.callback(None)
        if self._phase is Phase.CLOSED or self._closeAfterFlush:
            return
        self._log.error(
            "{session} lost the MTA in phase {phase}: {why}",
            session=self.session.id,
            phase=self._phase.value,
            why=reason.getErrorMessage(),
        )
        self._stats.mtaError(self.session, "lost")
        self._closeWith(_closing(self.hostname, "4.4.2", "Error: lost connection to the MTA"))

    def _mtaTimedOut(self) -> None:
        self._log.error("{session} MTA did not answer in time", session=self.session.id)
        self._stats.mtaError(self.session, "timeout")
        self._closeWith(_closing(self.hostname, "4.4.2", "Error: the MTA did not answer"))

    # -- replies, in order ---------------------------------------------------------------

    def _awaitingMta(self) -> bool:
        return any(not e.ready and e.onReply is not None for e in self._pending)

    def _expectMta(self, onReply: Callable[[Reply], Reply | None]) -> None:
        self._pending.append(_Pending(onReply=onReply))
        self._armMtaTimer()

    def _sendMta(self, line: bytes, onReply: Callable[[Reply], Reply | None]) -> None:
        self._toMta.append(line + wire.CRLF)
        self._expectMta(onReply)

    def _local(self, r: Reply) -> None:
        self._pending.append(_Pending(reply=r, ready=True))
        self._flushClient()

    def _flushClient(self) -> None:
        while self._pending and self._pending[0].ready:
            r = self._pending.popleft().reply
            if r is not None:
                self._toClient.append(r.toBytes())
        if self._toClient and self.transport is not None and self._phase is not Phase.CLOSED:
            self.transport.write(b"".join(self._toClient))
        self._toClient.clear()
        if self._closeAfterFlush and not self._pending:
            self._disconnect()

    def _flushMta(self) -> None:
        if self._toMta and self._mta is not None and self._mta.transport is not None:
            self._mta.transport.write(b"".join(self._toMta))
            self._toMta.clear()

    def _closeWith(self, r: Reply) -> None:
        """Answer C{r} after whatever replies are ready, then close both connections."""
        for entry in self._pending:
            if not entry.ready:
                entry.ready, entry.reply = True, None
        self._pending.append(_Pending(reply=r, ready=True))
        self._closeAfterFlush = True
        self._flushClient()

    def _disconnect(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        self._phase = Phase.CLOSED
        if self.transport is not None:
            self.transport.loseConnection()  # connectionLost closes the MTA's side

    # -- timers --------------------------------------------------------------------------

    def _touch(self) -> None:
        timeout = self.settings.config.timeouts.clientIdle
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.reset(timeout)
        else:
            self._idleTimer = self._clock.callLater(timeout, self._idle)

    def _idle(self) -> None:
        if self._phase in (Phase.CONNECTING, Phase.FILTERING, Phase.RELEASING) or self._pending:
            self._touch()  # the client is waiting for us, not idle
            return
        self._log.info("{session} idle timeout", session=self.session.id)
        self._closeWith(_closing(self.hostname, "4.4.2", "Error: timeout exceeded"))

    def _armMtaTimer(self) -> None:
        if self._mtaTimer is not None and self._mtaTimer.active():
            self._mtaTimer.cancel()
        self._mtaTimer = None
        if self._awaitingMta() and self._mta is not None:
            self._mtaTimer = self._clock.callLater(
                self.settings.config.timeouts.mtaReply, self._mtaTimedOut
            )

    # -- commands ------------------------------------------------------------------------

    def _advance(self) -> None:
        """Handle buffered command lines until one has to wait, then send what is due."""
        if self._advancing or self._phase is Phase.CLOSED:
            return
        self._advancing = True
        try:
            while self._phase is Phase.COMMAND and not self._blocked:
                if self._draining and self._envelope is None:
                    if not self._pending:  # between transactions, every reply given
                        self._log.info("{session} closed: shutting down", session=self.session.id)
                        self._closeWith(_closing(self.hostname, "4.3.2", SHUTTING_DOWN))
                    break
                line = self._commands.nextLine()
                if line is None:
                    break
                if line is TOO_LONG:
                    self._local(LINE_TOO_LONG)
                else:
                    assert isinstance(line, bytes)
                    self._command(wire.parseCommand(line))
            self._flushMta()
        finally:
            self._advancing = False
        self._throttle()

    def _throttle(self) -> None:
        """Stop reading from a client that sends faster than we can answer."""
        assert self.transport is not None
        pause = len(self._commands) > MAX_BUFFERED or len(self._pending) > MAX_PENDING
        if pause != self._readingPaused and self._phase is not Phase.CLOSED:
            self._readingPaused = pause
            if pause:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _gate(
        self,
        check: Deferred[Verdict],
        then: Callable[[], None],
        stage: Stage,
        sender: str | None = None,
    ) -> None:
        """
        Hold further commands until C{check} decides: on acceptance run C{then}, on
        refusal answer the filter's reply (and close, at connect).
        """
        self._blocked = True
        self._checking = check

        def decided(verdict: Verdict) -> None:
            self._checking = None
            self._blocked = False
            if self._phase is Phase.CLOSED:
                return
            if not verdict.refuses:
                then()
                self._keepHeaders(stage, verdict.headers)
            elif stage is Stage.CONNECT:
                refusal = (
                    _closing(self.hostname, verdict.enhanced, verdict.text)
                    if verdict.code // 100 == 4
                    else _verdictReply(verdict)
                )
                self._stats.refused(self.session, stage, refusal)
                self._closeWith(refusal)
            else:
                self._stats.refused(self.session, stage, _verdictReply(verdict), sender)
                self._local(_verdictReply(verdict))
            self._advance()

        check.addCallback(decided).addErrback(self._bug)

    def _keepHeaders(self, stage: Stage, headers: tuple[tuple[str, str], ...]) -> None:
        """Keep what filters add before DATA, for the message they end up in."""
        if stage in (Stage.CONNECT, Stage.HELO):
            self._sessionHeaders[stage] = headers
        else:
            self._transactionHeaders.extend(headers)

    def _bug(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and self._phase is Phase.CLOSED:
            return
        self._log.failure("{session} internal error", failure, session=self.session.id)
        self._closeWith(_closing(self.hostname, "4.3.0", "Error: internal error, try again later"))

    def _command(self, command: wire.Command) -> None:
        handler = {
            "EHLO": self._ehlo,
            "HELO": self._ehlo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "QUIT": self._quit,
        }.get(command.verb)
        if command.verb in self.REFUSED_VERBS:
            self._local(NOT_IMPLEMENTED)
        elif b"\r" in command.line or b"\x00" in command.line:
            self._local(reply(500, "5.5.2", "Error: bad character in command"))
        elif handler is not None:
            handler(command)
        else:
            self._sendMta(command.line, _relay)

    def _ehlo(self, command: wire.Command) -> None:
        self._resetTransaction()
        self.session.helo = command.argument.decode("utf-8", "replace")
        self.session.esmtp = command.verb == "EHLO"
        maxSize = self.settings.config.limits.messageSize

        def edit(r: Reply) -> Reply:
            self._logEvent(f"{command.verb} {self.session.helo}", r)
            return wire.editCapabilities(r, maxSize) if command.verb == "EHLO" else r

        self._gate(
            self._pipeline.checkHelo(self.session),
            lambda: self._sendMta(command.line, edit),
            Stage.HELO,
        )

    def _mail(self, command: wire.Command) -> None:
        try:
            sender, params = wire.parsePath(command.argument, b"FROM:")
        except wire.PathSyntaxError:
            self._local(reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        self._stats.messageAttempted()
        size = wire.sizeParameter(params)
        if size is not None and size > self.settings.config.limits.messageSize:
            self._logEvent(f"MAIL FROM:<{sender}> SIZE={size}", TOO_BIG)
            self._stats.refused(self.session, Stage.MAIL, TOO_BIG, sender, "size limit")
            self._local(TOO_BIG)
            return
        envelope = Envelope(sender, params.decode("utf-8", "surrogateescape"))

        def answered(r: Reply) -> Reply:
            self._logEvent(f"MAIL FROM:<{sender}>", r)
            if r.positive:
                self._mailAccepted = True
            else:
                self._stats.refused(self.session, Stage.MAIL, r, sender, MTA)
                if self._envelope is envelope:
                    self._envelope = None
            return r

        def accepted() -> None:
            if self._envelope is None:
                self._envelope = envelope
                self._recipientsAsked = 0
            self._sendMta(command.line, answered)

        self._gate(self._pipeline.checkMail(self.session, envelope), accepted, Stage.MAIL, sender)

    def _rcpt(self, command: wire.Command) -> None:
        try:
            recipient, _ = wire.parsePath(command.argument, b"TO:")
        except wire.PathSyntaxError:
            self._local(reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        envelope = self._envelope
        if envelope is None:
            self._sendMta(command.line, _relay)  # the MTA answers 503 itself
            return
        if self._recipientsAsked >= self.settings.config.limits.recipients:
            self._logEvent(f"RCPT TO:<{recipient}>", TOO_MANY_RECIPIENTS)
            self._stats.refused(
                self.session, Stage.RCPT, TOO_MANY_RECIPIENTS, envelope.mailFrom, RECIPIENT_LIMIT
            )
            self._local(TOO_MANY_RECIPIENTS)
            return
        self._recipientsAsked += 1

        def answered(r: Reply) -> Reply:
            self._logEvent(f"RCPT TO:<{recipient}>", r)
            if r.positive:
                envelope.recipients.append(recipient)
                self._stats.recipientAccepted()
            else:
                self._stats.refused(self.session, Stage.RCPT, r, envelope.mailFrom, MTA)
            return r

        self._gate(
            self._pipeline.checkRcpt(self.session, envelope, recipient),
            lambda: self._sendMta(command.line, answered),
            Stage.RCPT,
            envelope.mailFrom,
        )

    def _logEvent(self, event: str, r: Reply) -> None:
        """One log line per SMTP event, with the reply the client got."""
        self._log.info(
            "{session} {event}: {code} {text}",
            session=self.session.id,
            event=event,
            code=r.code,
            text=r.lines[0].decode("utf-8", "replace") if r.lines else "",
        )

    def _rset(self, command: wire.Command) -> None:
        self._resetTransaction()
        self._sendMta(command.line, _relay)

    def _quit(self, command: wire.Command) -> None:
        def bye(r: Reply) -> Reply:
            self._closeAfterFlush = True
            return r

        self._blocked = True  # nothing after QUIT is relayed
        self._quitSent = True
        self._sendMta(command.line, bye)

    def _resetTransaction(self) -> None:
        self._transactionHeaders = []
        self._envelope = None
        self._mailAccepted = False
        self._recipientsAsked = 0

    # -- the message ---------------------------------------------------------------------

    def _data(self, command: wire.Command) -> None:
        """DATA is a synchronisation point: decide once every earlier reply is in."""
        self._blocked = True
        if self._awaitingMta():
            self._onDrained = self._startData
        else:
            self._startData()

    def _startData(self) -> None:
        self._blocked = False
        envelope = self._envelope
        if envelope is None or not self._mailAccepted:
            self._local(NEED_MAIL)
            return
        if not envelope.recipients:
            self._local(NO_RECIPIENTS)
            return
        config = self.settings.config
        try:
            self._spool = Spool(config.spoolDir, config.limits.messageSize)
        except OSError as e:
            self._log.error(
                "{session} cannot create a spool file: {why}", session=self.session.id, why=e
            )
            self._local(SPOOL_FAILED)
            return
        self._log.info("{session} DATA", session=self.session.id)
        self._scanner = wire.DataScanner(config.bareLineEndings is BareLineEndings.NORMALISE)
        self._phase = Phase.DATA
        self._keepalive = self._clock.callLater(config.timeouts.mtaKeepalive, self._keepMtaAwake)
        self._local(START_INPUT)
        early = self._commands.takeRest()
        if early:
            self._messageData(early)

    def _messageData(self, data: bytes) -> None:
        assert self._scanner is not None and self._spool is not None
        content, rest = self._scanner.feed(data)
        self._spool.write(content)
        if rest is None:
            return
        self._spool.close()
        self._phase = Phase.FILTERING
        self._commands.feed(rest)
        self._endOfData()

    def _endOfData(self) -> None:
        spool, scanner, envelope = self._spool, self._scanner, self._envelope
        assert spool is not None and scanner is not None and envelope is not None
        if spool.error is not None:
            self._log.error(
                "{session} spool write failed: {why}", session=self.session.id, why=spool.error
            )
            self._refuse(SPOOL_FAILED, "spool")
        elif spool.overflowed:
            self._refuse(TOO_BIG, "size limit")
        elif scanner.bare:
            self._refuse(BARE_LINE_ENDING, "bare line ending")
        else:
            check = self._pipeline.checkMessage(self.session, envelope, spool.message())
            self._checking = check
            check.addCallback(self._messageChecked).addErrback(self._bug)

    def _messageChecked(self, verdict: Verdict) -> None:
        self._checking = None
        if self._phase is Phase.CLOSED:
            return
        if verdict.refuses:
            quarantine = self.settings.quarantine
            if quarantine is not None and quarantine.wants(verdict):
                spool, envelope = self._spool, self._envelope
                assert spool is not None and envelope is not None
                quarantine.keep(spool.message(), self.session, envelope, verdict)
            self._refuse(_verdictReply(verdict), "filters")
        else:
            early = [
                h
                for stage in (Stage.CONNECT, Stage.HELO)
                for h in self._sessionHeaders.get(stage, ())
            ]
            self._release((*early, *self._transactionHeaders, *verdict.headers))

    def _refuse(self, r: Reply, why: str) -> None:
        """Answer the client, reset the MTA's transaction, and go on with the session."""
        envelope = self._envelope
        self._log.info(
            "{session} message refused ({why}): {reply}; from=<{sender}> rcpts={rcpts} size={size}",
            session=self.session.id,
            why=why,
            reply=f"{r.code} {r.text}",
            sender=envelope.mailFrom if envelope else "",
            rcpts=len(envelope.recipients) if envelope else 0,
            size=self._spool.size if self._spool else 0,
        )
        sender = envelope.mailFrom if envelope else None
        reason = None if why == "filters" else why  # None: the filter that refused
        self._stats.refused(self.session, Stage.MESSAGE, r, sender, reason)
        self._local(r)
        self._sendMta(b"RSET", _swallow)
        self._endTransaction()
        self._advance()

    def _release(self, headers: tuple[tuple[str, str], ...]) -> None:
        """Send DATA and the spooled message to the MTA; relay its final reply."""
        self._phase = Phase.RELEASING
        spool, envelope = self._spool, self._envelope
        assert spool is not None and envelope is not None

        def finalReply(r: Reply) -> Reply:
            self._log.info(
                "{session} released: {reply}; queue_id={queueId} from=<{sender}> rcpts={rcpts} size={size}",
                session=self.session.id,
                reply=f"{r.code} {r.text}",
                queueId=wire.queueId(r) or "-",
                sender=envelope.mailFrom,
                rcpts=len(envelope.recipients),
                size=spool.size,
            )
            self._stats.delivered(self.session, r, envelope.mailFrom, spool.size)
            self._endTransaction()
            return r

        def dataReply(r: Reply) -> Reply | None:
            if r.code != 354:
                self._log.warn(
                    "{session} MTA refused DATA: {reply}", session=self.session.id, reply=r.text
                )
                self._stats.refused(self.session, Stage.MESSAGE, r, envelope.mailFrom, MTA)
                self._sendMta(b"RSET", _swallow)
                self._flushMta()
                self._endTransaction()
                return r
            self._expectMta(finalReply)
            self._stream(headers, spool)
            return None

        self._sendMta(b"DATA", dataReply)
        self._flushMta()

    def _stream(self, headers: tuple[tuple[str, str], ...], spool: Spool) -> None:
        assert self._mta is not None and self._mta.transport is not None
        transport = self._mta.transport
        transport.write(wire.headerBytes(headers))
        f = open(spool.path, "rb")  # closed when the transfer ends
        d = FileSender().beginFileTransfer(f, transport, wire.Stuffer())

        def sent(_: object) -> None:
            f.close()
            if (
                self._phase is Phase.RELEASING
                and self._mta is not None
                and self._mta.transport is not None
            ):
                self._mta.transport.write(b".\r\n")
                self._stats.released(self.session)  # until the MTA answers, a loss is ambiguous

        def failed(failure: Failure) -> None:
            f.close()
            self._log.info(
                "{session} release stopped: {why}",
                session=self.session.id,
                why=failure.getErrorMessage(),
            )

        d.addCallbacks(sent, failed)

    def describe(self) -> SessionInfo:
        """The session as the status page and the stats socket show it."""
        envelope = self._envelope
        return SessionInfo(
            id=self.session.id,
            client=self._client,
            helo=self.session.helo,
            sender=envelope.mailFrom if envelope is not None else None,
            recipients=len(envelope.recipients) if envelope is not None else 0,
            phase=self._phase.value,
        )

    def _keepMtaAwake(self) -> None:
        """
        While the message is received and filtered, NOOP the otherwise idle MTA now and
        then, so that its idle timeout does not end the session under a slow client.
        """
        self._keepalive = None
        if self._phase not in (Phase.DATA, Phase.FILTERING) or self._mta is None:
            return
        if not self._awaitingMta():
            self._sendMta(b"NOOP", _swallow)
            self._flushMta()
        interval = self.settings.config.timeouts.mtaKeepalive
        self._keepalive = self._clock.callLater(interval, self._keepMtaAwake)

    def _endTransaction(self) -> None:
        """Forget the transaction; remove its spool file, on every path."""
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        if self._spool is not None:
            self._spool.remove()
            self._spool = None
        self._scanner = None
        if self._phase in (Phase.DATA, Phase.FILTERING, Phase.RELEASING):
            self._phase = Phase.COMMAND
        self._resetTransaction()


def _relay(r: Reply) -> Reply:
    return r


def _swallow(r: Reply) -> None:
    return None
