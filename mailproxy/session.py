"""
The SMTP session as a state machine, sans-IO: events in, effects out.

A L{Session} owns every SMTP decision of one client connection and its MTA leg. The
Twisted side (L{mailproxy.relay}) feeds it events — client bytes, the MTA's replies, a
filter's verdict, a timer — by calling its methods, and carries out the effects each call
returns, in order: bytes to the client or the MTA, a check to run, the spool to open,
write, release or remove, timers, reports for the counters and the log. Nothing here does
I/O, keeps time or imports Twisted, so the tests drive it with lists of events and read
lists of effects.

States (L{State}) and the transitions between them (L{TRANSITIONS}, checked on every
move)::

    CHECKING_CONNECT --accept--> CONNECTING --connected--> GREETING --220--> COMMAND
    (implicit TLS: CHECKING_CONNECT --> TLS_HANDSHAKE --handshake--> CHECKING_CONNECT)
    (greeting_delay: CHECKING_CONNECT --accept--> PREGREET --delay over--> CONNECTING)
    (greeting = "own": CHECKING_CONNECT or PREGREET --our 220--> COMMAND; the MTA leg is
        made at the first EHLO or HELO that passed the HELO filters, in HELLO)
    CHECKING_CONNECT, PREGREET, CONNECTING, GREETING --client bytes--> CLOSING (554 5.5.0)
    COMMAND --EHLO/MAIL/RCPT--> CHECKING --verdict--> COMMAND (EHLO: HELLO --250--> COMMAND)
    COMMAND --STARTTLS--> TLS_HANDSHAKE --handshake--> COMMAND, as before EHLO
    COMMAND --AUTH--> AUTHENTICATING (334: the client's lines are SASL responses)
        --235 or a refusal--> COMMAND
    COMMAND --DATA--> SYNCING --earlier replies in, spool open--> DATA --CRLF.CRLF-->
        FILTERING --accept--> RELEASING (DATA, 354, the message) --dot sent--> RELEASED
        --final reply--> COMMAND
    FILTERING --refuse--> COMMAND (RSET to the MTA), or RECONNECTING (a fresh MTA leg
        once the MTA has heard mta_junk_commands commands other than mail) --> COMMAND
    COMMAND --BDAT--> SYNCING (the first chunk: earlier replies in, spool open) --> CHUNK
        --its bytes in--> COMMAND (250, ours) --BDAT--> CHUNK ... --BDAT LAST's bytes in-->
        FILTERING --accept--> RELEASING (BDAT n LAST, or DATA and the message dot-stuffed)
    COMMAND --QUIT--> QUITTING --221--> CLOSING --flushed--> CLOSED
    any --failure, timeout, shutdown--> CLOSING; any --client gone--> CLOSED

Replies owed to the client are one queue of slots in command order: ours, ready at once;
or the MTA's, each with the reply classes its command may get (Postfix's
C{smtpd_proxy.c} C{WANT_OK}/C{WANT_MORE}). An MTA reply of another class, or one nobody
asked for, ends the MTA leg with 451 4.3.0: it is never relayed. Commands reach the MTA
only as mailproxy parsed them (L{wire.Command.toLine}), and one at a time when the MTA
did not offer PIPELINING.

Each MTA leg is introduced at the client's first EHLO or HELO (in HELLO, hidden from
the client): the client's EHLO (a HELO goes as EHLO) learns what the MTA offers;
STARTTLS to it when C{upstream_tls} wants it (then that EHLO again); XCLIENT with the
client's address and name when offered (the MTA starts afresh: then the client's own
EHLO or HELO), else XFORWARD before each MAIL. Nothing else is relayed before, and MAIL
is refused until then, so that the MTA never takes mail from a client it believes to
be mailproxy. Not before the banner: OpenSMTPD refuses a second EHLO. After the client's STARTTLS, whatever it pipelined behind the command
is dropped unread (CVE-2011-0411) and the session starts over before EHLO (RFC 3207).

BDAT (RFC 3030): C{_bdat} moves COMMAND to CHUNK (through SYNCING for the first chunk,
as DATA), where exactly the chunk's bytes go to the spool through a
L{wire.ChunkScanner} (the same limits, the same bare CR/LF policy); a refused BDAT's
bytes are read and discarded all the same. Our 250 answers each chunk but the last;
BDAT LAST joins DATA's path at FILTERING, and the release is one C{BDAT n LAST} when the
MTA offered CHUNKING, else DATA dot-stuffed.

The release (L{Release}) carries what goes on top of the spooled message (our trace
header, the filters' C{headers} of every stage) and the message filters' header edits;
the driver applies them to the spooled header block, and counts BDAT's size from what
it sends, so that the count is the bytes the MTA reads.

Between the scanner and the spool, every message's content goes through the header
grammar (L{headergrammar.HeaderChecker}, contract 12): at C{spoolClosed}, after the size
and the bare CR/LF checks, a NUL (C{nul_bytes = "reject"}) or an ambiguous header block
(C{header_syntax = "reject"}) is refused with 554 5.6.0 before any filter runs; with
C{"normalise"} the spool gets the rewritten header block, so that the filters read and
the release sends (its BDAT size counted from what it sends) the same bytes.

The PROXY protocol is the listener's: it holds the session back until the header is
read, so L{SessionInfo} has the client's address from the start; nothing here reads the
transport.

Bounds (L{_bound}, after every event): at most C{limits.commands_per_turn} command lines
per reactor turn, the rest buffered until L{proceed} (asked for with L{ContinueLater});
no line handled while the client does not read its replies (L{clientBacklogged}, from the
driver's producer on its transport) or while MAX_PENDING replies are owed. A session is
closed with 421 (L{LimitReached}, logged once) at its error limit (counted in reply order,
as Postfix counts), past its command limit, when a command line is not complete
C{timeouts.command} after its first byte, at C{timeouts.session} (a whole message is
answered first), or below C{limits.min_data_rate}.
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from mailproxy import headergrammar, replies, wire
from mailproxy.envelope import Envelope
from mailproxy.envelope import Session as SessionInfo
from mailproxy.replies import Answer, Reason
from mailproxy.verdict import HeaderEdit, Stage, Verdict
from mailproxy.wire import Reply

if TYPE_CHECKING:
    from mailproxy.config import Config

#: Stop reading from a client with this many unprocessed bytes or unanswered commands.
MAX_BUFFERED = 64 * 1024
MAX_PENDING = 1000
#: Seconds of a message's transfer before C{limits.min_data_rate} applies, and how often
#: its average is checked after that.
DATA_RATE_GRACE = 30.0
DATA_RATE_CHECK = 10.0

Headers = tuple[tuple[str, str], ...]


class State(enum.Enum):
    """Where a session is; each state decides what client bytes and MTA replies mean."""

    CHECKING_CONNECT = "connect"  # connect filters deciding; client bytes buffered
    TLS_HANDSHAKE = "tls handshake"  # STARTTLS answered, or implicit TLS: client bytes dropped
    PREGREET = "pregreet"  # connect filters passed; greeting_delay not over: no banner yet
    CONNECTING = "connecting"  # the MTA leg being made
    GREETING = "greeting"  # waiting for the MTA's banner
    COMMAND = "command"  # reading and relaying commands
    CHECKING = "checking"  # a command's filters deciding; later commands wait
    AUTHENTICATING = "authenticating"  # AUTH relayed: client lines are SASL responses
    HELLO = "hello"  # EHLO/HELO relayed; later commands wait for the extensions it offers
    SYNCING = "syncing"  # DATA: waiting for the replies before it, then the spool
    DATA = "data"  # receiving the message into the spool
    CHUNK = "chunk"  # reading a BDAT chunk's bytes: into the spool, or discarded
    FILTERING = "filtering"  # the message filters deciding
    RELEASING = "releasing"  # DATA sent to the MTA, the message streaming to it
    RELEASED = "released"  # the final dot sent, the MTA's reply awaited
    RECONNECTING = "reconnecting"  # a fresh MTA leg: banner, then the client's EHLO again
    QUITTING = "quitting"  # QUIT relayed; nothing more is read
    CLOSING = "closing"  # the last reply queued; close once it is written
    CLOSED = "closed"


S = State
#: Every move a session may make; L{Session._enter} refuses any other.
TRANSITIONS: dict[State, frozenset[State]] = {
    S.CHECKING_CONNECT: frozenset({S.CONNECTING, S.TLS_HANDSHAKE, S.PREGREET, S.COMMAND}),
    S.TLS_HANDSHAKE: frozenset({S.CHECKING_CONNECT, S.COMMAND}),
    S.PREGREET: frozenset({S.CONNECTING, S.COMMAND}),
    S.CONNECTING: frozenset({S.GREETING}),
    S.GREETING: frozenset({S.COMMAND}),
    S.COMMAND: frozenset(
        {
            S.CHECKING,
            S.HELLO,
            S.SYNCING,
            S.QUITTING,
            S.RECONNECTING,
            S.TLS_HANDSHAKE,
            S.AUTHENTICATING,
            S.CHUNK,
        }
    ),
    S.AUTHENTICATING: frozenset({S.COMMAND}),
    S.HELLO: frozenset({S.COMMAND}),
    S.CHECKING: frozenset({S.COMMAND}),
    S.SYNCING: frozenset({S.COMMAND, S.DATA, S.CHUNK}),
    S.DATA: frozenset({S.FILTERING}),
    S.CHUNK: frozenset({S.COMMAND, S.FILTERING}),
    S.FILTERING: frozenset({S.COMMAND, S.RELEASING}),
    S.RELEASING: frozenset({S.COMMAND, S.RELEASED}),
    S.RELEASED: frozenset({S.COMMAND}),
    S.RECONNECTING: frozenset({S.COMMAND}),
    S.QUITTING: frozenset(),
    S.CLOSING: frozenset(),
    S.CLOSED: frozenset(),
}
#: Before the banner: a client that sends anything now is an early talker (554 5.5.0).
_PREGREETING = frozenset({S.CHECKING_CONNECT, S.PREGREET, S.CONNECTING, S.GREETING})
#: States in which the client waits for us: it is not idle.
_WAITING = frozenset(
    {
        S.CHECKING_CONNECT, S.CONNECTING, S.GREETING, S.CHECKING, S.HELLO, S.SYNCING,
        S.FILTERING, S.RELEASING, S.RELEASED, S.RECONNECTING, S.QUITTING, S.PREGREET,
    }
)  # fmt: skip


class Timer(enum.Enum):
    IDLE = "idle"
    MTA_REPLY = "mta reply"
    KEEPALIVE = "keepalive"
    COMMAND = "command"  # the command line begun must be complete (timeouts.command)
    SESSION = "session"  # the whole session (timeouts.session)
    DATA_RATE = "data rate"  # the message's average rate (limits.min_data_rate)
    #: C{timeouts.greeting_delay}: the banner waits for it, watching for early talkers.
    GREETING_DELAY = "greeting delay"
    #: C{timeouts.mta_banner}: the MTA leg is connected and its banner awaited.
    MTA_BANNER = "mta banner"


class Counted(enum.Enum):
    """Simple counter events (L{Report})."""

    CONNECTION_ACCEPTED = "connection accepted"  # the MTA (or, greeting = "own", we) greeted with 220
    MESSAGE_ATTEMPTED = "message attempted"  # MAIL FROM
    RECIPIENT_ACCEPTED = "recipient accepted"
    RELEASED = "released"  # the final dot went to the MTA; its answer is awaited
    AUTH_SUCCEEDED = "auth succeeded"
    AUTH_FAILED = "auth failed"


# -- effects -----------------------------------------------------------------------------


@attrs.frozen
class SendClient:
    data: bytes


@attrs.frozen
class CloseClient:
    """Close the client's connection once what was sent is written."""


@attrs.frozen
class PauseClient:
    pass


@attrs.frozen
class ResumeClient:
    pass


@attrs.frozen
class ConnectMta:
    """Open the MTA leg; answer with L{Session.mtaConnected} or L{Session.mtaUnreachable}."""


@attrs.frozen
class CancelConnect:
    pass


@attrs.frozen
class StartTls:
    """Start TLS on the client's connection (our 220 to STARTTLS is written); answer with
    L{Session.tlsStarted} once the handshake is done (a failed one closes the connection)."""


@attrs.frozen
class StartMtaTls:
    """Start TLS on the MTA leg (it answered STARTTLS with 220); answer with
    L{Session.mtaTlsStarted}; a failed handshake or verification loses the leg."""


@attrs.frozen
class TlsEstablished:
    """A TLS handshake completed, with the client (C{side="client"}) or the MTA, for the counters."""

    side: str
    version: str
    cipher: str


@attrs.frozen
class ResolveClient:
    """Look up the client's name; answer with L{Session.clientNamed} (it never fails)."""

    address: str


@attrs.frozen
class SendMta:
    data: bytes


@attrs.frozen
class CloseMta:
    """Send QUIT (when C{quit}) and close the MTA leg; its later events are not wanted."""

    quit: bool = True


@attrs.frozen
class AbortMta:
    """Drop the MTA leg at once, so that it never sees the end of a message."""


@attrs.frozen
class RunCheck:
    """
    Ask the filters of C{stage}; answer with L{Session.verdict} (or L{Session.checkFailed}).
    For L{Stage.MESSAGE}, the spooled message is the driver's to hand over.
    """

    stage: Stage
    session: SessionInfo
    envelope: Envelope | None = None
    recipient: str | None = None


@attrs.frozen
class CancelCheck:
    pass


@attrs.frozen
class SpoolOpen:
    """Create the spool file; answer with L{Session.spoolOpened} or L{Session.spoolFailed}."""


@attrs.frozen
class SpoolWrite:
    data: bytes


@attrs.frozen
class SpoolClose:
    """Finish writing; answer with L{Session.spoolClosed} (after any L{Session.spoolFailed})."""


@attrs.frozen
class SpoolRemove:
    pass


@attrs.frozen
class Quarantine:
    """Keep the spooled message, refused by C{verdict}, if the quarantine wants it."""

    verdict: Verdict
    session: SessionInfo
    envelope: Envelope


@attrs.frozen
class Trace:
    """What our own C{Received:} header records of a session the MTA cannot see (TLS)."""

    helo: str
    address: str
    hostname: str
    protocol: str
    tls: tuple[str, str]
    session: str

    def header(self, date: str) -> tuple[str, str]:
        """The header field, with C{date} (RFC 5322) the time the message was received."""
        version, cipher = self.tls
        return (
            "Received",
            f"from {self.helo} ([{self.address}]) by {self.hostname} (mailproxy) with "
            f"{self.protocol} ({version}:{cipher}) id {self.session}; {date}",
        )


@attrs.frozen
class Release:
    """
    Stream the message to the MTA, dot-stuffed, then the final dot; answer with
    L{Session.releaseSent} or L{Session.releaseFailed}. On top: C{trace}, if set (the
    driver dates it), then C{headers}; then the spooled message with C{edits} applied to
    its header block (L{mailproxy.headeredit}: only the block is read and rewritten, the
    body streamed from the spool as it is).

    With C{chunked}, send one C{BDAT n LAST} (L{wire.bdatLine}) instead, then those bytes
    as they are: the driver counts C{n}, exactly the bytes it sends, from the edited
    header block and the rest of the spool.

    @ivar spooled: the size of the spooled message; the driver refuses to send a spool
        of another size (not the message the filters passed).
    @ivar edits: the message filters' header edits, in filter order. Only the message
        stage's count: the earlier stages' filters add C{headers}, never edit.
    @ivar stuffing: whether the spooled content may have a line starting with a dot
        (L{wire.DataScanner.dotLines}; the header grammar makes none). When not, the
        driver stuffs only what goes on top and need not search the rest for dots.
    """

    headers: Headers
    spooled: int
    trace: Trace | None = None
    edits: tuple[HeaderEdit, ...] = ()
    chunked: bool = False
    stuffing: bool = True


@attrs.frozen
class StartTimer:
    """(Re)start C{timer}: fire L{Session.timerFired} in C{seconds}."""

    timer: Timer
    seconds: float


@attrs.frozen
class CancelTimer:
    timer: Timer


@attrs.frozen
class Log:
    """A log event: C{format} in C{twisted.logger} style, C{session} added by the driver."""

    level: str
    format: str
    fields: dict[str, object] = attrs.field(factory=dict)


@attrs.frozen
class Report:
    """A counter event: L{Counted}."""

    what: Counted


@attrs.frozen
class Refused:
    """The client got C{reply}, a refusal at C{stage}, decided C{by} a filter or a L{Reason}."""

    stage: Stage
    reply: Reply
    sender: str | None
    by: str


@attrs.frozen
class Delivered:
    """The MTA answered the final dot with C{reply}, relayed to the client."""

    reply: Reply
    sender: str
    size: int


@attrs.frozen
class MtaError:
    """
    C{"unreachable"}, C{"lost"}, C{"timeout"}, C{"protocol"}, C{"tls"} or C{"banner"} (no
    banner within C{timeouts.mta_banner}: all its processes busy).
    """

    kind: str


@attrs.frozen
class ContinueLater:
    """
    Answer with L{Session.proceed} in a later reactor turn: command lines are left that
    this turn may not handle (C{limits.commands_per_turn}), so other sessions go first.
    """


@attrs.frozen
class LimitReached:
    """The session met a limit (C{what}: a L{Reason} value) and is closed with C{reply}."""

    what: str
    reply: Reply


Effect = (
    SendClient | CloseClient | PauseClient | ResumeClient | ConnectMta | CancelConnect
    | StartTls | StartMtaTls | TlsEstablished | ResolveClient | SendMta | CloseMta | AbortMta | RunCheck | CancelCheck | SpoolOpen | SpoolWrite
    | SpoolClose | SpoolRemove | Quarantine | Release | StartTimer | CancelTimer | Log
    | Report | Refused | Delivered | MtaError | ContinueLater | LimitReached
)  # fmt: skip


# -- the session -------------------------------------------------------------------------

_ANY = frozenset({2, 4, 5})
_MORE = frozenset({3, 4, 5})
_OK = frozenset({2})
_SASL = frozenset({2, 3, 4, 5})


@attrs.frozen
class Policy:
    """
    What a session offers and requires besides the configuration's limits: TLS each way,
    AUTH, telling the MTA who the client is. The driver builds it from the configuration
    and what it loaded (a certificate); tests give it directly.
    """

    #: A certificate is loaded: offer STARTTLS.
    startTls: bool = False
    #: MAIL before STARTTLS gets 530 5.7.0 (C{[tls] require}).
    requireTls: bool = False
    #: C{"tls"}: AUTH only over TLS (else 538 5.7.11); C{"always"}; C{"never"}.
    auth: str = "tls"
    #: Failed AUTH per session before 421.
    authFailures: int = 3
    #: STARTTLS to the MTA: C{"none"}, C{"opportunistic"} or C{"required"}.
    mtaTls: str = "none"
    #: Tell the MTA the client's address: XCLIENT when it offers it, else XFORWARD (the
    #: service always does; off, the MTA leg has no introduction unless for TLS).
    introduce: bool = False


@attrs.define
class _Slot:
    """
    One reply owed to the client, in command order: ours (ready at once) or the MTA's,
    which C{onReply} maps to the client's reply (C{None}: hidden, as for our own RSET).
    """

    reply: Reply | None = None
    ready: bool = False
    expects: frozenset[int] = _ANY
    onReply: Callable[[Reply], Reply | None] | None = None
    command: bytes = b""
    #: An effect to emit once this reply is written (L{StartTls} after our 220).
    after: Effect | None = None


@attrs.define
class _Transaction:
    """One mail transaction, MAIL to its end."""

    envelope: Envelope
    mailAccepted: bool = False
    recipientsAsked: int = 0
    headers: list[tuple[str, str]] = attrs.Factory(list)
    scanner: wire.DataScanner | wire.ChunkScanner | None = None
    #: The header block's grammar (contract 12), between the scanner and the spool.
    header: headergrammar.HeaderChecker | None = None
    spoolOpen: bool = False
    spoolError: str | None = None
    size: int = 0
    #: The slot of the MTA's reply to the final dot: it takes no reply until the dot is sent.
    final: _Slot | None = None
    #: BDAT commands in this transaction (then DATA is out of sequence), and whether one
    #: failed (then every later BDAT is refused, its bytes discarded, until RSET).
    chunks: int = 0
    chunksFailed: bool = False
    #: Release with BDAT: decided at BDAT LAST, from what the MTA offers.
    bdat: bool = False
    #: The release waits for the MTA's replies to our keepalives before its BDAT.
    pendingRelease: Callable[[], None] | None = None


@attrs.define
class _Chunk:
    """
    The BDAT chunk being read: C{left} of its C{size} bytes still to come; kept (spooled)
    or discarded, when C{reply} is our refusal, queued once its bytes are in.
    """

    size: int
    last: bool
    keep: bool = True
    reply: Answer | None = None
    left: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.left = self.size


@attrs.define
class _Auth:
    """An AUTH exchange in progress: the MTA's 334 awaits the client's response when C{awaiting}."""

    mechanism: bytes
    login: str | None = None
    responses: int = 0
    awaiting: bool = False


@attrs.define
class _Check:
    stage: Stage
    accepted: Callable[[Verdict], None]
    refused: Callable[[Verdict], None]


#: Verbs mailproxy knows and never relays: it implements them not (yet), or they are the
#: MTA's trust in mailproxy, not the client's.
NOT_FOR_CLIENTS = frozenset(
    {"AUTH", "STARTTLS", "XCLIENT", "XFORWARD", "ATRN", "ETRN", "TURN", "EXPN", "VERB"}
)
RELAYABLE = wire.RELAYABLE
#: What a client may send between BDAT chunks (anything else: 503 5.5.1).
_BETWEEN_CHUNKS = frozenset({"BDAT", "RSET", "QUIT", "NOOP"})
#: Commands MTAs count against their junk or non-mail limits (Exim's
#: C{smtp_accept_max_nonmail}, Postfix's C{smtpd_junk_command_limit}).
_NONMAIL = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN", "ETRN", "EHLO", "HELO"})
#: A whole message being decided or delivered: a session past its deadline closes once
#: its answer is relayed, so that no delivery becomes ambiguous.
_MESSAGE_WHOLE = frozenset({S.FILTERING, S.RELEASING, S.RELEASED})


class Session:
    """
    One client session and its MTA leg. Every public method is an event; it returns the
    effects to carry out, in order.

    @param config: the configuration the session runs under, whole, for its lifetime.
    @param info: the session as filters see it (its id and client address set).
    @param sizeLimit: the smallest message size limit of the filters, if any declares one.
    """

    def __init__(
        self,
        config: Config,
        info: SessionInfo,
        sizeLimit: int | None = None,
        policy: Policy = Policy(),
    ) -> None:
        self._config = config
        self._policy = policy
        self.info = info
        limit = config.limits.messageSize
        self._sizeLimit = min(limit, sizeLimit) if sizeLimit is not None else limit
        self._hostname = config.hostname
        self._relayable = frozenset(config.relayCommands)
        self._junkLimit = config.limits.mtaJunkCommands
        self._normalise = config.bareLineEndings.value == "normalise"
        self._normaliseHeaders = config.headerSyntax.value == "normalise"
        self._stripNul = config.nulBytes.value == "strip"
        self.state = State.CHECKING_CONNECT
        self._effects: list[Effect] = []
        self._commands = wire.CommandBuffer(config.limits.lineLength)
        self._replies: deque[_Slot] = deque()
        # The MTA leg: slots awaiting its replies, commands not yet sent, how many sent
        # and unanswered, and what it offered.
        self._mtaSlots: deque[_Slot] = deque()
        self._unsent: deque[tuple[bytes, bool]] = deque()
        self._inFlight = 0
        self._barrierInFlight = False
        self._mtaConnected = False
        self._pipelining = False
        self._junk = 0
        self._ehlos = 0
        #: Enhanced status codes in our replies: None until the client's EHLO is answered.
        self._enhanced: bool | None = None
        #: The EHLO keywords the client was offered.
        self._offered: frozenset[bytes] = frozenset()
        self._helo: wire.Command | None = None
        #: The MTA accepted the client's HELO or EHLO (since the last STARTTLS).
        self._greeted = False
        self._connectChecked = False
        # The MTA leg's introduction (L{_introduce}), redone for each new leg.
        self._introduced = True
        self._mtaTls = False
        self._mtaTlsDeclined = False
        self._mtaTlsWaiting: Callable[[], None] | None = None
        self._xclientSent = False
        self._xforward: tuple[bytes, ...] = ()
        self._anonymousLogged = False
        #: The client's name and reverse name, once looked up; who waits for them.
        self._clientName: tuple[str, str] | None = None
        self._naming: list[Callable[[], None]] = []
        #: SASL mechanisms the MTA offers that mailproxy relays, and those the client was offered.
        self._mtaAuth: tuple[bytes, ...] = ()
        self._authOffered: tuple[bytes, ...] = ()
        self._auth: _Auth | None = None
        self._authFailures = 0
        self._sessionHeaders: dict[Stage, Headers] = {}
        self._txn: _Transaction | None = None
        self._check: _Check | None = None
        self._quitSent = False
        self._inputEnded = False
        self._draining = False
        self._paused = False
        self._closeSent = False
        # BDAT: the chunk being read, and whether the MTA's EHLO offered CHUNKING.
        self._chunk: _Chunk | None = None
        self._mtaChunking = False
        # The session's bounds (L{_bound}): commands and errors counted; the command
        # lines this turn may still handle, whether some wait for a later turn and
        # whether it is asked for; the client not reading its replies; the timers.
        self._commandCount = 0
        self._errors = 0
        self._budget = config.limits.commandsPerTurn
        self._stalled = False
        self._continuing = False
        self._backlogged = False
        self._lineTimed: int | None = None
        self._sessionTimed = False
        self._expired = False
        self._rateTimed: _Transaction | None = None
        self._rateNext = 0.0
        self._rateElapsed = 0.0
        self._limited = False
        #: A limit met while earlier commands await the MTA's replies: it closes the
        #: session once they are relayed (L{_advance}).
        self._limitAfterReplies: Callable[[], None] | None = None
        # The greeting: ours (C{greeting = "own"}) or the MTA's; the delay before it; no MTA
        # leg yet (ours, before the first EHLO); one being made; its banner awaited.
        self._ownGreeting = config.greeting.value == "own"
        self._delaying = False
        self._legless = False
        self._mtaConnecting = False
        self._bannerPending = False

    # -- reading the session -------------------------------------------------------------

    @property
    def sender(self) -> str | None:
        return self._txn.envelope.mailFrom if self._txn is not None else None

    @property
    def commandsHandled(self) -> int:
        """Command lines the session handled so far (C{limits.commands} counts them)."""
        return self._commandCount

    @property
    def recipients(self) -> int:
        return len(self._txn.envelope.recipients) if self._txn is not None else 0

    # -- events: the client --------------------------------------------------------------

    def start(
        self, refusal: tuple[Answer, Reason | None] | None = None, implicitTls: bool = False
    ) -> list[Effect]:
        """
        The client connected; C{refusal}: the admission refused it (and why).
        C{implicitTls}: it came to a TLS listener (RFC 8314); nothing happens before
        L{tlsStarted}.
        """
        if refusal is not None:
            answer, reason = refusal
            reply = self._render(answer)
            self._log("warn", "refused connection from [{client}]: {reply}", reply=reply.text)
            if reason is not None:
                self._emit(Refused(Stage.CONNECT, reply, None, reason.value))
            self._closeWith(answer)
            return self._take()
        self._log(
            "info",
            "connect from [{client}]:{port}",
            port=self.info.clientPort,
        )
        self._touch()
        if implicitTls:
            self._enter(S.TLS_HANDSHAKE)
        else:
            self._checkConnect()
        return self._take()

    def _checkConnect(self) -> None:
        self._connectChecked = True
        delay = self._config.timeouts.greetingDelay
        if delay > 0:  # from the first moment SMTP is spoken (after implicit TLS)
            self._delaying = True
            self._emit(StartTimer(Timer.GREETING_DELAY, delay))
        self._ask(
            _Check(Stage.CONNECT, self._connectAccepted, self._connectRefused),
            RunCheck(Stage.CONNECT, self.info),
        )

    def tlsStarted(self, version: str, cipher: str) -> list[Effect]:
        """
        The client's TLS handshake is done. After STARTTLS the session starts over as
        RFC 3207 says: nothing the client said before counts, and it must EHLO again.
        """
        if self.state is not S.TLS_HANDSHAKE:
            return self._take()
        self.info.tls = (version, cipher)
        self._emit(TlsEstablished("client", version, cipher))
        self._log("info", "TLS with the client: {version} {cipher}", version=version, cipher=cipher)
        self._touch()
        if not self._connectChecked:
            self._enter(S.CHECKING_CONNECT)
            self._checkConnect()
            return self._take()
        self._helo, self._greeted = None, False
        self.info.helo, self.info.esmtp = None, False
        self._enhanced, self._offered, self._authOffered = None, frozenset(), ()
        self._enter(S.COMMAND)
        self._advance()
        return self._take()

    def clientData(self, data: bytes) -> list[Effect]:
        self._newTurn()
        if self.state in (S.CLOSING, S.CLOSED, S.QUITTING):
            return self._take()
        if self.state is S.TLS_HANDSHAKE:
            self._discardInjected(len(data))
            return self._take()
        if self.state in _PREGREETING:
            self._earlyTalker(data)
            return self._take()
        self._touch()
        if self.state is S.DATA:
            self._messageData(data)
        elif self.state is S.CHUNK:
            self._chunkData(data)
        else:
            self._commands.feed(data)
        self._advance()
        return self._take()

    def clientEnded(self) -> list[Effect]:
        """The client half-closed: finish what it pipelined, answer it all, then close."""
        if self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        self._inputEnded = True
        if self.state in (S.DATA, S.CHUNK):
            self._log("info", "client ended its input in the middle of a message")
            self._closeNow()
        else:
            self._advance()
        return self._take()

    def clientLost(self) -> list[Effect]:
        """The client's connection is gone: let go of everything the session holds."""
        if self.state is S.CLOSED:
            return self._take()
        midRelease = self.state in (S.RELEASING, S.RELEASED)
        connecting = self.state is S.CONNECTING or (
            self.state is S.RECONNECTING and not self._mtaConnected
        ) or self._mtaConnecting
        self.state = S.CLOSED
        for timer in Timer:
            self._emit(CancelTimer(timer))
        if self._check is not None:
            self._check = None
            self._emit(CancelCheck())
        self._endTransaction()
        if connecting:
            self._emit(CancelConnect())
        elif self._mtaConnected:
            self._mtaConnected = False
            # Mid-release the client will send the message again: the MTA must not get its end.
            self._emit(AbortMta() if midRelease else CloseMta(quit=not self._quitSent))
        self._log("info", "disconnect from [{client}]")
        return self._take()

    # -- events: the MTA -----------------------------------------------------------------

    def mtaConnected(self) -> list[Effect]:
        self._mtaConnected = True
        self._mtaConnecting = False
        if self.state is S.CONNECTING:
            self._enter(S.GREETING)
        self._armMtaTimer()
        if self._bannerPending:  # the banner has its own, shorter, timeout
            self._emit(CancelTimer(Timer.MTA_REPLY))
            self._emit(StartTimer(Timer.MTA_BANNER, self._config.timeouts.mtaBanner))
        return self._take()

    def mtaUnreachable(self, why: str) -> list[Effect]:
        self._mtaConnecting = False
        if self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        self._log("error", "cannot reach the MTA: {why}", why=why)
        self._emit(MtaError("unreachable"))
        reply = self._render(replies.MTA_UNREACHABLE)
        self._emit(Refused(self._legStage(), reply, None, Reason.MTA_DOWN.value))
        self._closeWith(replies.MTA_UNREACHABLE)
        return self._take()

    def mtaReply(self, reply: Reply) -> list[Effect]:
        """A reply from the MTA: it answers the oldest command sent and not yet answered."""
        if self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        if self._inFlight == 0:
            self._unasked(reply)
            return self._take()
        slot = self._mtaSlots.popleft()
        self._inFlight -= 1
        if reply.code // 100 not in slot.expects:
            self._confused(slot, reply)
            return self._take()
        assert slot.onReply is not None
        slot.reply, slot.ready = slot.onReply(reply), True
        self._armMtaTimer()
        if self.state is S.SYNCING and not self._mtaSlots:
            self._dataReady()
        self._releaseWhenSynced()
        self._advance()
        return self._take()

    def mtaTlsStarted(self, version: str, cipher: str) -> list[Effect]:
        """The MTA leg's TLS handshake (and its verification) succeeded."""
        then, self._mtaTlsWaiting = self._mtaTlsWaiting, None
        if then is None or self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        self._mtaTls = True
        self._emit(TlsEstablished("mta", version, cipher))
        self._log("info", "TLS with the MTA: {version} {cipher}", version=version, cipher=cipher)
        self._armMtaTimer()
        then()
        return self._take()

    def clientNamed(self, name: str, reverseName: str) -> list[Effect]:
        """The client's name (forward-confirmed) and its reverse name, or Postfix's placeholders."""
        if self._clientName is None:
            self._clientName = (name, reverseName)
            self.info.clientName = None if name.startswith("[") else name
            waiting, self._naming = self._naming, []
            if self.state not in (S.CLOSING, S.CLOSED):
                for then in waiting:
                    then()
                # The introduction may have finished (XFORWARD: the client's EHLO answered):
                # the commands it pipelined behind the EHLO go on now, not at its next bytes.
                self._advance()
        return self._take()

    def mtaProtocolError(self, why: str) -> list[Effect]:
        """The MTA sent something that is not an SMTP reply."""
        if self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        self._log("error", "MTA protocol error: {why}", why=why)
        self._emit(MtaError("protocol"))
        self._mtaBroken(self._render(replies.MTA_CONFUSED))
        return self._take()

    def mtaLost(self, why: str) -> list[Effect]:
        self._mtaConnected = False
        if self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        if self._mtaTlsWaiting is not None:
            self._mtaTlsWaiting = None
            self._log("error", "TLS with the MTA failed: {why}", why=why)
            self._emit(MtaError("tls"))
            self._refuseSession(replies.MTA_TLS_FAILED, Reason.MTA_TLS)
            return self._take()
        self._log("error", "lost the MTA in state {state}: {why}", state=self.state.value, why=why)
        self._emit(MtaError("lost"))
        self._closeWith(replies.MTA_LOST)
        return self._take()

    # -- events: filters, spool, release, timers, the service ----------------------------

    def verdict(self, stage: Stage, verdict: Verdict) -> list[Effect]:
        check, self._check = self._check, None
        # Closing (the MTA lost, a timeout, the grace run out while the filters ran): the
        # transaction is gone and the client has its 4xx; the verdict decides nothing.
        if check is None or self.state in (S.CLOSING, S.CLOSED):
            return self._take()
        assert check.stage is stage, (check.stage, stage)
        if self.state is S.CHECKING:
            self._enter(S.COMMAND)
        if verdict.refuses:
            check.refused(verdict)
        else:
            check.accepted(verdict)
        self._advance()
        return self._take()

    def checkFailed(self) -> list[Effect]:
        """A check failed in a way the pipeline does not handle: a bug, logged by the driver."""
        self._check = None
        if self.state not in (S.CLOSING, S.CLOSED):
            self._closeWith(replies.INTERNAL_ERROR)
        return self._take()

    def spoolOpened(self) -> list[Effect]:
        txn = self._txn
        if self.state is not S.SYNCING or txn is None:
            if self.state in (S.CLOSING, S.CLOSED):
                self._emit(SpoolRemove())  # closed while it was being created
            return self._take()
        if self._chunk is not None:
            self._chunksOpened(txn, self._chunk)
            return self._take()
        txn.spoolOpen = True
        txn.scanner = wire.DataScanner(self._normalise, stripNul=self._stripNul)
        txn.header = self._headerChecker()
        self._enter(S.DATA)
        self._log("info", "DATA")
        self._emit(StartTimer(Timer.KEEPALIVE, self._config.timeouts.mtaKeepalive))
        self._local(replies.START_INPUT)
        early = self._commands.takeRest()
        if early:
            self._messageData(early)
        self._advance()
        return self._take()

    def spoolFailed(self, why: str) -> list[Effect]:
        txn = self._txn
        if txn is None or self.state is S.CLOSED:
            return self._take()
        self._log("error", "spool failed: {why}", why=why)
        if self.state is S.SYNCING and self._chunk is not None:
            self._refuseChunk(self._chunk, replies.SPOOL_FAILED)
            self._advance()
        elif self.state is S.SYNCING:  # it could not even be created
            # The transaction stays open, at the MTA as here: the client may RSET or QUIT.
            self._local(replies.SPOOL_FAILED)
            self._enter(S.COMMAND)
            self._advance()
        elif txn.spoolError is None:
            txn.spoolError = why
        return self._take()

    def spoolClosed(self) -> list[Effect]:
        txn = self._txn
        if self.state is not S.FILTERING or txn is None or txn.scanner is None:
            return self._take()
        if txn.spoolError is not None:
            self._refuseMessage(replies.SPOOL_FAILED, Reason.SPOOL.value)
        elif txn.size > self._config.limits.messageSize:
            self._refuseMessage(replies.TOO_BIG, Reason.SIZE_LIMIT.value)
        elif txn.scanner.bare:
            self._refuseMessage(replies.BARE_LINE_ENDING, Reason.BARE_LINE_ENDING.value)
        elif txn.scanner.nul:
            self._refuseMessage(replies.NUL_CHARACTER, Reason.NUL.value)
        elif txn.header is not None and txn.header.finding is not None:
            self._refuseHeader(txn.header.finding)
        else:
            self._headerNormalised(txn)
            self._ask(
                _Check(Stage.MESSAGE, self._messageAccepted, self._messageRefused),
                RunCheck(Stage.MESSAGE, self.info, txn.envelope),
            )
        self._advance()
        return self._take()

    def releaseSent(self) -> list[Effect]:
        if self.state is S.RELEASING and self._txn is not None and self._txn.final is not None:
            self._txn.final.expects = _ANY
            self._enter(S.RELEASED)
            self._emit(Report(Counted.RELEASED))
            self._armMtaTimer()
        return self._take()

    def releaseFailed(self, why: str) -> list[Effect]:
        if self.state is S.RELEASING:
            self._log("error", "release stopped: {why}", why=why)
            self._mtaConnected = False
            self._emit(AbortMta())
            self._closeWith(replies.MTA_LOST)
        return self._take()

    def timerFired(self, timer: Timer) -> list[Effect]:
        if self.state is S.CLOSED:
            return self._take()
        if timer in (Timer.GREETING_DELAY, Timer.MTA_BANNER):
            self._greetingTimer(timer)
            return self._take()
        if timer is Timer.IDLE:
            if self.state in _WAITING or self._replies:
                self._touch()  # the client is waiting for us, not idle
            elif self.state not in (S.CLOSING,):
                self._log("info", "idle timeout")
                self._closeWith(replies.IDLE)
        elif timer is Timer.MTA_REPLY:
            if self._inFlight or self._mtaTlsWaiting is not None:
                self._mtaTlsWaiting = None
                self._log("error", "MTA did not answer in time")
                self._emit(MtaError("timeout"))
                self._mtaConnected = False
                self._emit(AbortMta())
                self._closeWith(replies.MTA_SILENT)
        elif timer is Timer.KEEPALIVE:
            self._keepalive()
        else:
            self._boundFired(timer)
        return self._take()

    def drain(self) -> list[Effect]:
        """The service is stopping: finish the transaction in flight, then close with 421."""
        self._draining = True
        if self.state in _PREGREETING:
            return self.shutDown()
        self._advance()
        return self._take()

    def shutDown(self) -> list[Effect]:
        """Close now with 421, whatever the session is doing: its grace time is over."""
        if self.state not in (S.CLOSING, S.CLOSED):
            self._log("info", "closed by the shutdown in state {state}", state=self.state.value)
            self._closeWith(replies.SHUTTING_DOWN)
        return self._take()

    # -- the connect stage ---------------------------------------------------------------

    def _connectAccepted(self, verdict: Verdict) -> None:
        self._sessionHeaders[Stage.CONNECT] = verdict.headers
        self._greet()

    def _greet(self) -> None:
        """
        The connect filters passed: once C{greeting_delay} is over, greet the client with
        our own banner (C{greeting = "own"}), or connect to the MTA to relay its banner.
        """
        if self._delaying:
            self._enter(S.PREGREET)
        elif self._ownGreeting:
            self._enter(S.COMMAND)
            # No MTA leg until the client's EHLO or HELO passed the HELO filters: until
            # then nothing is relayed (L{_withoutMta}, and the leg not introduced).
            self._legless, self._introduced = True, False
            self._emit(Report(Counted.CONNECTION_ACCEPTED))
            self._show(replies.greeting(self._hostname))
        else:
            self._enter(S.CONNECTING)
            self._connectMta()

    def _greetingTimer(self, timer: Timer) -> None:
        if timer is Timer.GREETING_DELAY:
            self._delaying = False
            if self.state is S.PREGREET:
                self._greet()
        elif self._bannerPending and self._mtaConnected and self.state is not S.CLOSING:
            seconds = self._config.timeouts.mtaBanner
            self._log(
                "error",
                "the MTA did not greet within {seconds} s (timeouts.mta_banner): are all its "
                "smtpd processes busy (Postfix: default_process_limit, master.cf maxproc)?",
                seconds=seconds,
            )
            self._emit(MtaError("banner"))
            reply = self._render(replies.MTA_UNREACHABLE)
            self._emit(Refused(self._legStage(), reply, None, Reason.MTA_DOWN.value))
            self._mtaConnected = False
            self._emit(AbortMta())
            self._closeWith(replies.MTA_UNREACHABLE)

    def _legStage(self) -> Stage:
        """The stage an MTA leg that failed refuses the client at: its EHLO with our banner."""
        return Stage.HELO if self.state is S.HELLO else Stage.CONNECT

    def _earlyTalker(self, data: bytes) -> None:
        """
        The client spoke before our banner was written (postscreen's pregreet test): it
        is no SMTP client that waits for the greeting. 554 5.5.0 and close; the MTA leg,
        if any, and the connect filters are let go.
        """
        self._log(
            "info",
            "early talker: [{client}] sent {count} bytes before the greeting: {sample}",
            count=len(data),
            sample=repr(data[:40])[2:-1],
        )
        reply = self._render(replies.EARLY_TALKER)
        self._emit(Refused(Stage.CONNECT, reply, None, Reason.EARLY_TALKER.value))
        if self._check is not None:
            self._check = None
            self._emit(CancelCheck())
        if self._mtaConnecting:
            self._mtaConnecting = False
            self._emit(CancelConnect())
        elif self._mtaConnected:
            self._mtaConnected = False
            self._emit(CloseMta(quit=False))  # it has not greeted: QUIT would be early too
        self._closeWith(replies.EARLY_TALKER)

    def _connectRefused(self, verdict: Verdict) -> None:
        answer = _answerOf(verdict)
        if answer.code // 100 == 4:
            answer = replies.closing(answer.enhanced, answer.text)
        self._emit(Refused(Stage.CONNECT, self._render(answer), None, _by(verdict)))
        self._closeWith(answer)

    def _connectMta(
        self,
        onBanner: Callable[[Reply], Reply | None] | None = None,
        expects: frozenset[int] = _ANY,
    ) -> None:
        """Open an MTA leg; its banner is the first reply it owes (C{onBanner} takes it)."""
        self._emit(ConnectMta())
        self._mtaConnecting, self._bannerPending = True, True
        handler = onBanner or self._banner

        def greeted(reply: Reply) -> Reply | None:
            self._bannerPending = False
            self._emit(CancelTimer(Timer.MTA_BANNER))
            return handler(reply)

        slot = _Slot(expects=expects, onReply=greeted, command=b"(banner)")
        self._replies.append(slot)
        self._mtaSlots.append(slot)
        self._inFlight = 1
        self._pipelining, self._junk, self._ehlos = False, 0, 0
        self._introduced = not self._introducing()
        self._mtaTls, self._mtaTlsDeclined = False, False
        self._xclientSent, self._xforward = False, ()

    def _banner(self, reply: Reply) -> Reply:
        if reply.code == 220:
            self._enter(S.COMMAND)
            self._emit(Report(Counted.CONNECTION_ACCEPTED))
        else:
            self._emit(Refused(Stage.CONNECT, reply, None, Reason.MTA.value))
            self._closeAfterFlush()
        return reply

    def _introducing(self) -> bool:
        return self._policy.introduce or self._policy.mtaTls != "none"

    def _openLeg(self) -> None:
        """
        C{greeting = "own"}: the client's first EHLO or HELO passed the HELO filters; only
        now is the MTA leg made. Its banner is hidden (the client had ours), unless it is
        a refusal: then it is the answer to the EHLO, and the session ends.
        """
        self._legless = False
        self._connectMta(self._hiddenBanner)

    def _hiddenBanner(self, reply: Reply) -> Reply | None:
        if reply.code == 220:
            return None
        self._log(
            "warn",
            "the MTA greeted with {reply}: the client's {verb} gets it, and is closed",
            reply=f"{reply.code} {reply.text}",
            verb=self._helo.verb if self._helo is not None else "EHLO",
        )
        self._emit(Refused(Stage.HELO, reply, None, Reason.MTA.value))
        self._mtaConnected = False
        self._emit(CloseMta(quit=True))
        self._dropUnready()  # the EHLO, never sent: this reply answers it
        self._closeAfterFlush()
        return reply

    def _withoutMta(self, command: wire.Command) -> bool:
        """
        Before the MTA leg exists (C{greeting = "own"}, before EHLO) answer what would go
        to the MTA: QUIT and RSET here; NOOP, HELP, VRFY and the like as on a leg not yet
        introduced (L{_command}); MAIL needs EHLO anyway. Whether it was answered.
        """
        if command.verb not in ("QUIT", "RSET"):
            return False
        if command.argument:
            self._local(replies.NO_ARGUMENTS)
        elif command.verb == "RSET":
            self._endTransaction()
            self._local(replies.OK)
        else:
            self._local(replies.BYE)
            self._closeAfterFlush()
        return True

    # -- commands ------------------------------------------------------------------------

    def _advance(self) -> None:
        """Handle buffered command lines until one has to wait."""
        if self._expired and self.state not in _MESSAGE_WHOLE:
            self._sessionExpired()
        if self._limitAfterReplies is not None and not self._mtaSlots:
            self._limitAfterReplies()
        while self.state in (S.COMMAND, S.AUTHENTICATING):
            if self.state is S.AUTHENTICATING:
                if self._auth is None or not self._auth.awaiting:
                    break
                response = self._commands.nextLine()
                if response is None:
                    break
                self._saslResponse(response)
                continue
            if self._draining and self._txn is None:
                if not self._mtaSlots:  # between transactions, every reply in
                    self._log("info", "closed: shutting down")
                    self._closeWith(replies.SHUTTING_DOWN)
                break
            if self._held():
                break
            line = self._commands.nextLine()
            if line is None:
                break
            if self._overCommandLimit():
                break
            if line is wire.TOO_LONG:
                self._local(replies.LINE_TOO_LONG)
                continue
            assert isinstance(line, bytes)
            try:
                command = wire.parseCommand(line)
            except wire.CommandSyntaxError as e:
                self._syntaxError(
                    line,
                    replies.BAD_CHARACTER if e.kind == wire.BAD_CHARACTER else replies.UNRECOGNISED,
                )
                continue
            self._command(command)
        if self._inputEnded and self.state is S.COMMAND and not self._mtaSlots and not self._stalled:
            self._log("info", "client ended its input")
            self._closeNow()

    def _syntaxError(self, line: bytes, answer: Answer) -> None:
        if line[:4].upper() == b"AUTH":
            line = b"AUTH ..."  # never a SASL payload in the log
        self._log(
            "info",
            "syntax error: {line}: {reply}",
            line=repr(line[:80])[2:-1],
            reply=f"{answer.code} {answer.text}",
        )
        self._local(answer)

    def _command(self, command: wire.Command) -> None:
        verb = command.verb
        if self._outOfSequence(verb):
            return
        if self._legless and self._withoutMta(command):
            return
        handler = {
            "EHLO": self._ehlo,
            "HELO": self._ehlo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "BDAT": self._bdat,
            "RSET": self._rset,
            "QUIT": self._quit,
            "STARTTLS": self._starttls,
            "AUTH": self._authenticate,
        }.get(verb)
        if handler is not None:
            handler(command)
        elif not self._introduced and verb in RELAYABLE:
            # The MTA would take them from mailproxy: nothing is relayed before EHLO.
            self._local(replies.OK if verb == "NOOP" else replies.NEED_HELO)
        elif verb in self._relayable and verb in RELAYABLE:
            self._relay(command.toLine(), _relayed)
        elif verb in NOT_FOR_CLIENTS or verb in RELAYABLE:
            self._local(replies.NOT_IMPLEMENTED)
        else:
            self._syntaxError(command.toLine(), replies.UNRECOGNISED)

    def _ehlo(self, command: wire.Command) -> None:
        if not command.argument or b" " in command.argument:
            self._local(replies.SYNTAX_HELO)
            return
        self.info.helo = command.argument.decode("utf-8", "replace")
        self.info.esmtp = command.verb == "EHLO"

        def accepted(verdict: Verdict) -> None:
            self._txn = None  # EHLO resets the transaction, at the MTA as here
            self._sessionHeaders[Stage.HELO] = verdict.headers
            self._helo = command
            self._enter(S.HELLO)
            self._hello(command, answered)

        def answered(reply: Reply) -> Reply:
            self._enter(S.COMMAND)
            self._logEvent(f"{command.verb} {self.info.helo}", reply)
            self._greeted = reply.code // 100 == 2
            if command.verb == "HELO":
                if reply.code // 100 == 2:
                    self._pipelining, self._enhanced, self._offered = False, False, frozenset()
                    self._authOffered = ()
                    self._mtaChunking = False
                return reply
            offered = wire.capabilities(reply)
            self._mtaAuth = tuple(
                m for m in wire.SASL_MECHANISMS if m in offered.params.get(b"AUTH", ())
            )
            auth = self._mtaAuth if self._authAllowed() else ()
            startTls = self._policy.startTls and self.info.tls is None
            edited = wire.editCapabilities(reply, self._sizeLimit, startTls, auth)
            if reply.code // 100 == 2:
                self._pipelining = offered.pipelining
                self._mtaChunking = offered.chunking
                self._enhanced = offered.enhancedStatusCodes
                self._offered = wire.capabilities(edited).keywords
                self._authOffered = auth
            return edited

        self._ask(
            _Check(Stage.HELO, accepted, self._refusedAt(Stage.HELO, None)),
            RunCheck(Stage.HELO, self.info),
        )

    # -- the MTA leg's introduction: STARTTLS to it, XCLIENT, XFORWARD ----------------

    def _hello(self, command: wire.Command, onAnswer: Callable[[Reply], Reply | None]) -> None:
        """
        Relay the client's EHLO or HELO; on an MTA leg not yet introduced (L{_introduce}),
        it goes as an EHLO that learns what the MTA offers first.
        """
        if self._legless:
            self._openLeg()
        if self._introduced:
            self._relay(command.toLine(), onAnswer, barrier=True)
            return

        def probed(reply: Reply) -> None:
            self._introduce(command, onAnswer, reply)

        self._relay(b"EHLO " + command.argument, probed, barrier=True)

    def _introduce(
        self, command: wire.Command, onAnswer: Callable[[Reply], Reply | None], reply: Reply
    ) -> None:
        """
        The next step of the MTA leg's introduction, from its answer to the client's EHLO
        (C{reply}), hidden from the client: STARTTLS to the MTA (then EHLO again), XCLIENT
        with the client's address and name (the MTA starts afresh: then the client's own
        command), or the name XFORWARD will carry; then the client gets its answer.

        It happens at the client's first EHLO rather than before the banner because some
        MTAs refuse a second EHLO (OpenSMTPD: "503 5.5.1 Invalid command: Already
        identified"): the client's EHLO is the one that learns what the MTA offers.
        """
        again = functools.partial(self._hello, command, onAnswer)
        proceed = functools.partial(self._introduce, command, onAnswer, reply)
        mode = self._policy.mtaTls
        if reply.code // 100 != 2:
            if mode == "required":
                self._mtaTlsFailed(f"it answered EHLO with {reply.code} {reply.text}")
            elif command.verb == "EHLO":
                self._show(onAnswer(reply))  # refused: the client may try another EHLO
            else:
                self._introduced = True  # an MTA without EHLO knows no XCLIENT either
                self._relay(command.toLine(), onAnswer, barrier=True)
            return
        offered = wire.capabilities(reply)
        if mode != "none" and not self._mtaTls and not self._mtaTlsDeclined:
            if offered.offers(b"STARTTLS"):
                self._relay(b"STARTTLS", functools.partial(self._mtaStartTls, again, proceed))
                return
            if mode == "required":
                self._mtaTlsFailed("it does not offer STARTTLS")
                return
            self._mtaTlsDeclined = True
            self._log("info", "the MTA does not offer STARTTLS: its leg stays in cleartext")
        if self._policy.introduce and offered.offers(b"XCLIENT") and not self._xclientSent:
            self._named(
                functools.partial(self._xclient, offered.params[b"XCLIENT"], command, onAnswer)
            )
            return
        if self._policy.introduce and offered.offers(b"XFORWARD") and not self._xclientSent:
            if self._clientName is None:
                self._named(proceed)
                return
            self._xforward = offered.params[b"XFORWARD"]
        if not self._xclientSent and not self._xforward and not self._anonymousLogged:
            self._anonymousLogged = True
            self._log(
                "debug",
                "the MTA offers neither XCLIENT nor XFORWARD: it sees the client as mailproxy",
            )
        self._introduced = True
        if command.verb == "EHLO":
            self._show(onAnswer(reply))
        else:
            # The MTA heard EHLO and would refuse a second greeting: HELO's answer is the
            # first line of EHLO's.
            self._show(onAnswer(Reply(reply.code, reply.lines[:1])))

    def _show(self, reply: Reply | None) -> None:
        self._replies.append(_Slot(reply=reply, ready=True))

    def _mtaStartTls(
        self, again: Callable[[], None], proceed: Callable[[], None], reply: Reply
    ) -> None:
        if reply.code == 220:
            self._mtaTlsWaiting = again
            self._emit(StartMtaTls())
        elif self._policy.mtaTls == "required":
            self._mtaTlsFailed(f"it answered STARTTLS with {reply.code} {reply.text}")
        else:
            self._mtaTlsDeclined = True
            self._log(
                "warn",
                "the MTA answered STARTTLS with {reply}: its leg stays in cleartext",
                reply=f"{reply.code} {reply.text}",
            )
            proceed()

    def _mtaTlsFailed(self, why: str) -> None:
        self._log("error", "no TLS with the MTA, which upstream_tls.mode requires: {why}", why=why)
        self._emit(MtaError("tls"))
        self._refuseSession(replies.MTA_TLS_FAILED, Reason.MTA_TLS)

    def _refuseSession(self, answer: Answer, reason: Reason) -> None:
        """Close the session with C{answer}, after the replies before it, counted as refused."""
        self._emit(Refused(Stage.HELO, self._render(answer), None, reason.value))
        self._mtaConnected = False
        self._emit(CloseMta(quit=True))
        self._closeWith(answer)

    def _named(self, then: Callable[[], None]) -> None:
        """Run C{then} once the client's name is known (looked up at the first need)."""
        if self._clientName is not None:
            then()
            return
        self._naming.append(then)
        if len(self._naming) == 1:
            self._emit(ResolveClient(self.info.clientAddress))

    def _xclient(
        self,
        offered: tuple[bytes, ...],
        command: wire.Command,
        onAnswer: Callable[[Reply], Reply | None],
    ) -> None:
        """Tell the MTA the client's address and name (Postfix's XCLIENT_README)."""
        assert self._clientName is not None
        name, reverseName = self._clientName
        attributes = [
            (b"ADDR", wire.xclientAddress(self.info.clientAddress)),
            (b"PORT", str(self.info.clientPort)),
            (b"NAME", name),
            (b"REVERSE_NAME", reverseName),
        ]
        if self.info.login is not None:
            attributes.append((b"LOGIN", self.info.login))
        line = wire.attributeCommand(b"XCLIENT", attributes, offered)
        self._xclientSent = True
        if line is None:
            self._log("warn", "the MTA offers XCLIENT without any attribute mailproxy sends")
            self._introduced = True
            self._relay(command.toLine(), onAnswer, barrier=True)
            return

        def introduced(reply: Reply) -> None:
            if reply.code // 100 == 2:
                # A fresh session at the MTA (its new banner is ours to hide): now the
                # client's own EHLO or HELO.
                self._introduced = True
                self._relay(command.toLine(), onAnswer, barrier=True)
                return
            self._log(
                "error",
                "the MTA refused XCLIENT: {reply}; is mailproxy in its "
                "smtpd_authorized_xclient_hosts?",
                reply=f"{reply.code} {reply.text}",
            )
            self._refuseSession(replies.MTA_INTRODUCTION, Reason.XCLIENT)

        self._relay(line, introduced, barrier=True, label=b"XCLIENT")

    def _forward(self) -> None:
        """XFORWARD the client before a transaction, when the MTA takes it and not XCLIENT."""
        if not self._xforward or self._clientName is None:
            return
        name, _ = self._clientName
        for attributes in (
            [
                (b"NAME", name),
                (b"ADDR", wire.xclientAddress(self.info.clientAddress)),
                (b"PORT", str(self.info.clientPort)),
            ],
            [
                (b"PROTO", "ESMTP" if self.info.esmtp else "SMTP"),
                (b"HELO", self.info.helo or "[UNAVAILABLE]"),
                (b"SOURCE", "REMOTE"),
            ],
        ):
            line = wire.attributeCommand(b"XFORWARD", attributes, self._xforward)
            if line is not None:
                self._relay(line, self._ownReply(b"XFORWARD"), label=b"XFORWARD")

    # -- STARTTLS and AUTH from the client ----------------------------------------------

    def _starttls(self, command: wire.Command) -> None:
        if not self._policy.startTls:
            self._local(replies.NOT_IMPLEMENTED)
        elif self.info.tls is not None:
            self._local(replies.TLS_ACTIVE)
        elif command.argument:
            self._local(replies.NO_ARGUMENTS)
        elif self._txn is not None:
            self._local(replies.IN_TRANSACTION)
        else:
            # Whatever the client sent after STARTTLS came in cleartext and must not be
            # read as if it came over TLS (CVE-2011-0411).
            self._discardInjected(len(self._commands.takeRest()))
            self._log("info", "STARTTLS")
            self._replies.append(
                _Slot(reply=self._render(replies.READY_FOR_TLS), ready=True, after=StartTls())
            )
            self._enter(S.TLS_HANDSHAKE)

    def _discardInjected(self, count: int) -> None:
        if count:
            self._log(
                "warn",
                "discarded {count} bytes sent after STARTTLS, before TLS (command injection)",
                count=count,
            )

    def _authAllowed(self) -> bool:
        policy = self._policy.auth
        return policy == "always" or (policy == "tls" and self.info.tls is not None)

    def _authenticate(self, command: wire.Command) -> None:
        mechanism, _, initial = command.argument.partition(b" ")
        mechanism = mechanism.upper()
        if self._policy.auth == "never":
            self._local(replies.AUTH_NOT_ENABLED)
        elif self._policy.auth == "tls" and self.info.tls is None:
            self._local(replies.AUTH_NEEDS_TLS)
        elif not self._authOffered:
            self._local(replies.AUTH_NOT_ENABLED)
        elif self.info.login is not None:
            self._local(replies.AUTH_ALREADY)
        elif self._txn is not None:
            self._local(replies.IN_TRANSACTION)
        elif not mechanism or b" " in initial:
            self._local(replies.SYNTAX_AUTH)
        elif mechanism not in self._authOffered:
            self._local(replies.AUTH_MECHANISM)
        elif initial and not wire.isBase64(initial):
            self._local(replies.AUTH_BASE64)
        else:
            auth = self._auth = _Auth(mechanism)
            if initial:
                auth.login = wire.saslLogin(mechanism, initial, first=True)
                auth.responses = 1
            line = b"AUTH " + mechanism + (b" " + initial if initial else b"")
            self._relay(line, self._authReply, expects=_SASL, barrier=True, label=b"AUTH")
            self._enter(S.AUTHENTICATING)

    def _saslResponse(self, line: bytes | wire._TooLong) -> None:
        """A client's line in an AUTH exchange: relayed if it is base64, else it cancels."""
        auth = self._auth
        assert auth is not None
        auth.awaiting = False
        if not isinstance(line, bytes) or not (line == b"*" or wire.isBase64(line)):
            line = b"*"  # cancels the exchange: the MTA's 501 is the client's answer
        elif auth.login is None:
            auth.login = wire.saslLogin(auth.mechanism, line, first=auth.responses == 0)
        auth.responses += 1
        self._relay(line, self._authReply, expects=_SASL, barrier=True, label=b"(SASL response)")

    def _authReply(self, reply: Reply) -> Reply:
        auth = self._auth
        assert auth is not None
        if reply.code == 334:
            auth.awaiting = True
            return reply
        self._auth = None
        self._enter(S.COMMAND)
        mechanism = auth.mechanism.decode()
        if reply.code // 100 == 2:
            self.info.login = auth.login or ""
            self._emit(Report(Counted.AUTH_SUCCEEDED))
            self._logEvent(f"AUTH {mechanism} login={self.info.login}", reply)
            return reply
        self._emit(Report(Counted.AUTH_FAILED))
        self._logEvent(f"AUTH {mechanism} failed login={auth.login or '-'}", reply)
        self._authFailures += 1
        if self._authFailures >= self._policy.authFailures:
            self._log("warn", "closed after {count} failed AUTH", count=self._authFailures)
            self._emit(
                Refused(
                    Stage.HELO, self._render(replies.AUTH_FAILURES), None,
                    Reason.AUTH_FAILURES.value,
                )
            )  # fmt: skip
            self._closeWith(replies.AUTH_FAILURES)
        return reply

    def _mail(self, command: wire.Command) -> None:
        try:
            path = wire.parsePath(command.argument, b"FROM:")
        except wire.PathSyntaxError:
            self._local(replies.SYNTAX_MAIL)
            return
        if not wire.parametersAllowed(path, "MAIL", self._offered):
            self._local(replies.BAD_PARAMETER)
            return
        if self._txn is not None:
            self._local(replies.NESTED_MAIL)
            return
        if not self._greeted or not self._introduced:  # RFC 5321 4.1.4; RFC 3207
            self._local(replies.NEED_HELO)
            return
        if self._policy.requireTls and self.info.tls is None:
            self._emit(
                Refused(
                    Stage.MAIL, self._render(replies.TLS_REQUIRED), path.address,
                    Reason.TLS_REQUIRED.value,
                )
            )  # fmt: skip
            self._local(replies.TLS_REQUIRED)
            return
        self._emit(Report(Counted.MESSAGE_ATTEMPTED))
        sender = path.address
        declared = path.parameter(b"SIZE")
        if declared is not None and int(declared) > self._sizeLimit:
            self._logEvent(
                f"MAIL FROM:<{sender}> SIZE={int(declared)}", self._render(replies.TOO_BIG)
            )
            self._emit(
                Refused(Stage.MAIL, self._render(replies.TOO_BIG), sender, Reason.SIZE_LIMIT.value)
            )
            self._local(replies.TOO_BIG)
            return
        envelope = Envelope(sender, path.parameterBytes().decode("utf-8", "surrogateescape"))
        txn = _Transaction(envelope)

        def accepted(verdict: Verdict) -> None:
            self._txn = txn
            txn.headers.extend(verdict.headers)
            self._forward()
            self._relay(b"MAIL " + path.toArgument(b"FROM:"), answered)

        def answered(reply: Reply) -> Reply:
            self._logEvent(f"MAIL FROM:<{sender}>", reply)
            if reply.code // 100 == 2:
                txn.mailAccepted = True
            else:
                self._emit(Refused(Stage.MAIL, reply, sender, Reason.MTA.value))
                if self._txn is txn:
                    self._txn = None
            return reply

        self._ask(
            _Check(Stage.MAIL, accepted, self._refusedAt(Stage.MAIL, sender)),
            RunCheck(Stage.MAIL, self.info, envelope),
        )

    def _rcpt(self, command: wire.Command) -> None:
        try:
            path = wire.parsePath(command.argument, b"TO:")
        except wire.PathSyntaxError:
            self._local(replies.SYNTAX_RCPT)
            return
        if not wire.parametersAllowed(path, "RCPT", self._offered):
            self._local(replies.BAD_PARAMETER)
            return
        txn = self._txn
        if txn is None:
            self._local(replies.NEED_MAIL)
            return
        recipient, envelope = path.address, txn.envelope
        if txn.recipientsAsked >= self._config.limits.recipients:
            self._logEvent(f"RCPT TO:<{recipient}>", self._render(replies.TOO_MANY_RECIPIENTS))
            self._emit(
                Refused(
                    Stage.RCPT,
                    self._render(replies.TOO_MANY_RECIPIENTS),
                    envelope.mailFrom,
                    Reason.RECIPIENT_LIMIT.value,
                )
            )
            self._local(replies.TOO_MANY_RECIPIENTS)
            return
        txn.recipientsAsked += 1

        def accepted(verdict: Verdict) -> None:
            txn.headers.extend(verdict.headers)
            self._relay(b"RCPT " + path.toArgument(b"TO:"), answered)

        def answered(reply: Reply) -> Reply:
            self._logEvent(f"RCPT TO:<{recipient}>", reply)
            if reply.code // 100 == 2:
                envelope.recipients.append(recipient)
                self._emit(Report(Counted.RECIPIENT_ACCEPTED))
            else:
                self._emit(Refused(Stage.RCPT, reply, envelope.mailFrom, Reason.MTA.value))
            return reply

        self._ask(
            _Check(Stage.RCPT, accepted, self._refusedAt(Stage.RCPT, envelope.mailFrom)),
            RunCheck(Stage.RCPT, self.info, envelope, recipient),
        )

    def _refusedAt(self, stage: Stage, sender: str | None) -> Callable[[Verdict], None]:
        def refused(verdict: Verdict) -> None:
            answer = _answerOf(verdict)
            self._emit(Refused(stage, self._render(answer), sender, _by(verdict)))
            self._local(answer)

        return refused

    def _rset(self, command: wire.Command) -> None:
        if command.argument:
            self._local(replies.NO_ARGUMENTS)
            return
        self._endTransaction()  # a BDAT transaction's spool file goes with it
        self._relay(b"RSET", _relayed)

    def _quit(self, command: wire.Command) -> None:
        if command.argument:
            self._local(replies.NO_ARGUMENTS)
            return

        def bye(reply: Reply) -> Reply:
            self._closeAfterFlush()
            return reply

        self._quitSent = True
        self._enter(S.QUITTING)  # nothing after QUIT is read
        self._relay(b"QUIT", bye, barrier=True)

    def _logEvent(self, event: str, reply: Reply) -> None:
        """One log line per SMTP event, with the reply the client got."""
        self._log(
            "info",
            "{event}: {code} {text}",
            event=event,
            code=reply.code,
            text=reply.lines[0].decode("utf-8", "replace") if reply.lines else "",
        )

    # -- the message ---------------------------------------------------------------------

    def _data(self, command: wire.Command) -> None:
        """DATA is a synchronisation point: decide once every earlier reply is in."""
        if command.argument:
            self._local(replies.NO_ARGUMENTS)
            return
        txn = self._txn
        if txn is None:
            self._local(replies.NEED_MAIL)
            return
        self._enter(S.SYNCING)
        if not self._mtaSlots:
            self._dataReady()

    def _dataReady(self) -> None:
        if self._chunk is not None:
            self._chunksReady(self._chunk)
            return
        txn = self._txn
        if txn is None or not txn.mailAccepted:
            self._txn = None
            self._local(replies.NEED_MAIL)
            self._enter(S.COMMAND)
        elif not txn.envelope.recipients:
            self._local(replies.NO_RECIPIENTS)
            self._enter(S.COMMAND)
        else:
            self._emit(SpoolOpen())

    def _messageData(self, data: bytes) -> None:
        txn = self._txn
        assert txn is not None and isinstance(txn.scanner, wire.DataScanner)
        content, rest = txn.scanner.feed(data)
        self._spoolChunk(txn, content)
        if rest is None:
            return
        self._enter(S.FILTERING)
        self._commands.feed(rest)
        self._closeSpool(txn)

    def _headerChecker(self) -> headergrammar.HeaderChecker:
        """
        The header grammar of a new message. A BINARYMIME scanner leaves NULs alone: the
        grammar strips or refuses those of the header block, as C{nul_bytes} says.
        """
        return headergrammar.HeaderChecker(self._normaliseHeaders, stripNul=self._stripNul)

    def _closeSpool(self, txn: _Transaction) -> None:
        """The content is complete: what the header grammar still holds, then close."""
        if txn.header is not None:
            self._spoolContent(txn, txn.header.end())
        self._emit(SpoolClose())

    def _refuseHeader(self, finding: headergrammar.Finding) -> None:
        """An ambiguous header block (or a NUL in a BINARYMIME message's): 554 5.6.0."""
        if finding.problem is headergrammar.Problem.NUL:
            self._refuseMessage(replies.NUL_CHARACTER, Reason.NUL.value)
        else:
            self._refuseMessage(replies.headerSyntax(finding.text), Reason.HEADER_SYNTAX.value)

    def _headerNormalised(self, txn: _Transaction) -> None:
        if txn.header is not None and txn.header.normalised:
            self._log(
                "info",
                "header block normalised: {what}",
                what="; ".join(f.text.removeprefix("Error: ") for f in txn.header.normalised),
            )

    def _messageAccepted(self, verdict: Verdict) -> None:
        txn = self._txn
        assert txn is not None
        early = [
            h for stage in (Stage.CONNECT, Stage.HELO) for h in self._sessionHeaders.get(stage, ())
        ]
        self._release((*early, *txn.headers, *verdict.headers), self._trace(), verdict.edits)

    def _messageRefused(self, verdict: Verdict) -> None:
        txn = self._txn
        assert txn is not None
        self._emit(Quarantine(verdict, self.info, txn.envelope))
        self._refuseMessage(_answerOf(verdict), _by(verdict))

    def _refuseMessage(self, answer: Answer, by: str) -> None:
        """Answer the client, reset the MTA's transaction, and go on with the session."""
        txn = self._txn
        assert txn is not None
        envelope = txn.envelope
        reply = self._render(answer)
        self._log(
            "info",
            "message refused ({why}): {reply}; from=<{sender}> rcpts={rcpts} size={size}",
            why=by,
            reply=f"{reply.code} {reply.text}",
            sender=envelope.mailFrom,
            rcpts=len(envelope.recipients),
            size=txn.size,
        )
        self._emit(Refused(Stage.MESSAGE, reply, envelope.mailFrom, by))
        self._local(answer)
        self._endTransaction()
        self._enter(S.COMMAND)
        self._resetMta()

    def _trace(self) -> Trace | None:
        """Our C{Received:} for a client over TLS, which the MTA (even with XCLIENT) cannot tell."""
        if self.info.tls is None:
            return None
        protocol = "ESMTPS" if self.info.esmtp else "SMTPS"
        if self.info.login is not None:
            protocol += "A"  # RFC 3848
        return Trace(
            self.info.helo or "unknown", self.info.clientAddress, self._hostname, protocol,
            self.info.tls, self.info.id,
        )  # fmt: skip

    def _release(
        self, headers: Headers, trace: Trace | None = None, edits: tuple[HeaderEdit, ...] = ()
    ) -> None:
        """Send DATA and then the spooled message to the MTA; relay its final reply."""
        txn = self._txn
        assert txn is not None
        envelope = txn.envelope
        self._enter(S.RELEASING)
        self._emit(CancelTimer(Timer.KEEPALIVE))

        def finalReply(reply: Reply) -> Reply:
            self._log(
                "info",
                "released: {reply}; queue_id={queueId} from=<{sender}> rcpts={rcpts} size={size}",
                reply=f"{reply.code} {reply.text}",
                queueId=wire.queueId(reply) or "-",
                sender=envelope.mailFrom,
                rcpts=len(envelope.recipients),
                size=txn.size,
            )
            self._emit(Delivered(reply, envelope.mailFrom, txn.size))
            self._endTransaction()
            self._enter(S.COMMAND)
            return reply

        if txn.bdat:
            self._releaseChunked(Release(headers, txn.size, trace, edits, chunked=True), finalReply)
            return

        def dataReply(reply: Reply) -> Reply | None:
            if reply.code // 100 != 3:
                self._log("warn", "MTA refused DATA: {reply}", reply=reply.text)
                self._emit(Refused(Stage.MESSAGE, reply, envelope.mailFrom, Reason.MTA.value))
                self._endTransaction()
                self._enter(S.COMMAND)
                self._resetMta()
                return reply
            # No reply is right before the dot is sent (L{releaseSent} opens the slot): an
            # MTA that answers the message early is confused, and its 250 is not relayed.
            txn.final = _Slot(expects=frozenset(), onReply=finalReply, command=b".")
            self._replies.append(txn.final)
            self._mtaSlots.append(txn.final)
            self._inFlight += 1
            stuffing = txn.scanner is None or txn.scanner.dotLines
            self._emit(Release(headers, txn.size, trace, edits, stuffing=stuffing))
            return None

        self._relay(b"DATA", dataReply, expects=_MORE, barrier=True)

    def _endTransaction(self) -> None:
        """Forget the transaction; remove its spool file, on every path."""
        txn, self._txn = self._txn, None
        if txn is not None and txn.spoolOpen:
            self._emit(CancelTimer(Timer.KEEPALIVE))
            self._emit(SpoolRemove())

    # -- BDAT (RFC 3030) -----------------------------------------------------------------

    def _bdat(self, command: wire.Command) -> None:
        """
        A chunk follows the command line: exactly its size in bytes, whatever they hold.
        The first chunk of a transaction is a synchronisation point, as DATA is.
        """
        try:
            size, last = wire.parseBdat(command.argument)
        except wire.BdatSyntaxError as e:
            if e.size is None:
                self._failChunks()
                self._local(replies.SYNTAX_BDAT)  # no size: what follows is commands
            else:
                self._refuseChunk(_Chunk(e.size, False), replies.SYNTAX_BDAT)
            return
        chunk = _Chunk(size, last)
        txn = self._txn
        if txn is None:
            self._refuseChunk(chunk, replies.NEED_MAIL)
            return
        txn.chunks += 1
        if txn.chunksFailed:
            self._refuseChunk(chunk, replies.CHUNKS_FAILED)
        elif txn.spoolOpen:
            self._readChunk(chunk)
        else:
            self._chunk = chunk
            self._enter(S.SYNCING)
            if not self._mtaSlots:
                self._chunksReady(chunk)

    def _chunksReady(self, chunk: _Chunk) -> None:
        """Every reply before the first BDAT is in: refuse it, or open the spool."""
        txn = self._txn
        if txn is None or not txn.mailAccepted:
            self._txn = None
            self._refuseChunk(chunk, replies.NEED_MAIL)
        elif not txn.envelope.recipients:
            self._refuseChunk(chunk, replies.NO_RECIPIENTS)
        else:
            self._emit(SpoolOpen())

    def _chunksOpened(self, txn: _Transaction, chunk: _Chunk) -> None:
        txn.spoolOpen = True
        raw = wire.binaryBody(txn.envelope.mailParameters)
        txn.scanner = wire.ChunkScanner(self._normalise, raw=raw, stripNul=self._stripNul)
        txn.header = self._headerChecker()
        self._log("info", "BDAT")
        self._emit(StartTimer(Timer.KEEPALIVE, self._config.timeouts.mtaKeepalive))
        self._readChunk(chunk)
        self._advance()

    def _refuseChunk(self, chunk: _Chunk, answer: Answer) -> None:
        """Answer C{answer} once the chunk's bytes are in, and discard them."""
        self._failChunks()
        chunk.keep, chunk.reply = False, answer
        self._readChunk(chunk)

    def _failChunks(self) -> None:
        """A BDAT failed: so does its transaction; later BDATs are refused until RSET."""
        txn = self._txn
        if txn is None:
            return
        txn.chunksFailed = True
        if txn.spoolOpen:
            txn.spoolOpen = False
            self._emit(CancelTimer(Timer.KEEPALIVE))
            self._emit(SpoolRemove())

    def _readChunk(self, chunk: _Chunk) -> None:
        """Read the chunk: first what the client already sent after the command line."""
        self._chunk = chunk
        self._enter(S.CHUNK)
        self._chunkData(self._commands.take(chunk.left))
        if self._inputEnded and self.state is S.CHUNK:
            self._log("info", "client ended its input in the middle of a message")
            self._closeNow()

    def _chunkData(self, data: bytes) -> None:
        """Bytes of the chunk being read; those after its end are commands again."""
        chunk = self._chunk
        assert chunk is not None
        content, rest = data[: chunk.left], data[chunk.left :]
        chunk.left -= len(content)
        txn = self._txn
        if chunk.keep and content:
            assert txn is not None and isinstance(txn.scanner, wire.ChunkScanner)
            self._spoolChunk(txn, txn.scanner.feed(content))
        if chunk.left:
            return
        self._chunk = None
        if rest:
            self._commands.feed(rest)
        if not chunk.keep:
            assert chunk.reply is not None
            self._local(chunk.reply)
            self._enter(S.COMMAND)
        elif not chunk.last:
            self._local(replies.chunkReceived(chunk.size))
            self._enter(S.COMMAND)
        else:
            assert txn is not None
            self._lastChunk(txn)

    def _spoolChunk(self, txn: _Transaction, content: bytes) -> None:
        """Content from the scanner: through the header grammar, to the spool."""
        if txn.header is not None:
            content = txn.header.feed(content)
        self._spoolContent(txn, content)

    def _spoolContent(self, txn: _Transaction, content: bytes) -> None:
        if content:
            txn.size += len(content)
            if txn.size <= self._config.limits.messageSize and txn.spoolError is None:
                self._emit(SpoolWrite(content))

    def _lastChunk(self, txn: _Transaction) -> None:
        """
        BDAT LAST is in: decide how the message will be released, and make the spooled
        copy exactly what the MTA will read (DATA needs a last line that ends in CRLF).
        """
        assert isinstance(txn.scanner, wire.ChunkScanner)
        self._spoolChunk(txn, txn.scanner.end())
        binary = wire.binaryBody(txn.envelope.mailParameters)
        txn.bdat = self._mtaChunking
        if binary and not txn.bdat:
            self._refuseMessage(replies.BINARY_UNAVAILABLE, Reason.MTA.value)
            return
        if not txn.bdat and not txn.scanner.endsLine:
            self._spoolChunk(txn, wire.CRLF)
        self._enter(S.FILTERING)
        self._closeSpool(txn)

    def _chunking(self) -> bool:
        """Whether a BDAT transaction is receiving: in a chunk, or between two."""
        txn = self._txn
        return txn is not None and txn.spoolOpen and self.state in (S.CHUNK, S.COMMAND)

    def _outOfSequence(self, verb: str) -> bool:
        """
        Refuse (503 5.5.1) what may not come now: between BDATs anything but BDAT, RSET,
        QUIT and NOOP (DATA included: RFC 3030 never mixes them); DATA for BINARYMIME.
        """
        txn = self._txn
        if txn is None:
            return False
        if txn.chunks and verb not in _BETWEEN_CHUNKS:
            self._local(replies.CHUNKS_IN_PROGRESS)
            return True
        if verb == "DATA" and wire.binaryBody(txn.envelope.mailParameters):
            self._local(replies.BINARY_NEEDS_BDAT)
            return True
        return False

    def _releaseChunked(self, release: Release, finalReply: Callable[[Reply], Reply]) -> None:
        """
        Release with one C{BDAT n LAST}: its reply is the MTA's reply to the message, and
        none is right before the last byte is sent. It goes once our keepalives are
        answered. The driver counts C{n}: only it knows the edited header block's size.
        """
        txn = self._txn
        assert txn is not None
        final = txn.final = _Slot(expects=frozenset(), onReply=finalReply, command=b"BDAT")
        self._replies.append(final)

        def send() -> None:
            txn.pendingRelease = None
            self._mtaSlots.append(final)
            self._inFlight += 1
            self._emit(release)

        txn.pendingRelease = send
        self._releaseWhenSynced()

    def _releaseWhenSynced(self) -> None:
        txn = self._txn
        if (
            self.state is S.RELEASING
            and txn is not None
            and txn.pendingRelease is not None
            and not self._mtaSlots
        ):
            txn.pendingRelease()

    # -- our own commands to the MTA -----------------------------------------------------

    def _resetMta(self) -> None:
        """
        Reset the MTA's transaction after a refusal: RSET, or — once the MTA has heard
        as many commands other than mail as it may count against us — a fresh MTA leg.
        """
        keepLeg = self.info.login is not None and not self._xclientSent
        if self._junk < self._junkLimit or keepLeg:  # a new leg would lose the AUTH
            self._relay(b"RSET", self._ownReply(b"RSET"))
            return
        self._log(
            "info",
            "reconnecting to the MTA: it heard {count} commands other than mail "
            "(limits.mta_junk_commands)",
            count=self._junk,
        )
        self._enter(S.RECONNECTING)
        self._emit(CloseMta(quit=True))
        self._mtaConnected = False
        self._dropUnready()  # only our own NOOPs can be outstanding here
        self._connectMta(self._rebanner, _OK)

    def _rebanner(self, reply: Reply) -> None:
        """The new MTA leg greeted: replay the client's EHLO, hidden (introducing the leg)."""
        helo = self._helo
        if helo is None:
            self._enter(S.COMMAND)
            return

        def greeted(r: Reply) -> None:
            if r.code // 100 != 2:
                self._log("error", "the MTA refused the client's {verb} again: {reply}",
                          verb=helo.verb, reply=f"{r.code} {r.text}")  # fmt: skip
                self._emit(MtaError("protocol"))
                self._mtaBroken(self._render(replies.MTA_CONFUSED))
                return
            if helo.verb == "EHLO":
                self._pipelining = wire.capabilities(r).pipelining
                self._mtaChunking = wire.capabilities(r).chunking
            self._enter(S.COMMAND)

        self._hello(helo, greeted)

    def _keepalive(self) -> None:
        """
        While a message is received and filtered the MTA hears nothing: NOOP it now and
        then, so that its idle timeout does not end the session under a slow client, as
        long as that stays within what it counts against us (C{mta_junk_commands}).
        """
        receiving = self.state in (S.DATA, S.FILTERING) or self._chunking()
        if not receiving or not self._mtaConnected:
            return
        if self._junk >= self._junkLimit - 1:  # keep one for the RSET after a refusal
            self._log(
                "info",
                "no more keepalives: the MTA heard {count} commands other than mail",
                count=self._junk,
            )
            return
        if not self._inFlight:
            self._relay(b"NOOP", self._ownReply(b"NOOP"))
        self._emit(StartTimer(Timer.KEEPALIVE, self._config.timeouts.mtaKeepalive))

    def _ownReply(self, command: bytes) -> Callable[[Reply], None]:
        def answered(reply: Reply) -> None:
            if reply.code // 100 != 2:
                self._log(
                    "warn",
                    "MTA answered our {command}: {reply}",
                    command=command.decode(),
                    reply=f"{reply.code} {reply.text}",
                )

        return answered

    # -- the reply queue and the MTA writer ----------------------------------------------

    def _relay(
        self,
        line: bytes,
        onReply: Callable[[Reply], Reply | None],
        expects: frozenset[int] = _ANY,
        barrier: bool = False,
        label: bytes | None = None,
    ) -> None:
        """
        Queue a command for the MTA; its reply takes the next slot of the client's queue
        (C{onReply} returning C{None} keeps it from the client: our own commands).
        C{label} names the command in the log instead of its verb (a SASL response).
        """
        verb = line.split(b" ", 1)[0].decode("ascii", "replace")
        if verb in ("EHLO", "HELO"):
            self._ehlos += 1
            if self._ehlos > 1:
                self._junk += 1
        elif verb in _NONMAIL:
            self._junk += 1
        slot = _Slot(expects=expects, onReply=onReply, command=label or line.split(b" ", 1)[0])
        self._replies.append(slot)
        self._mtaSlots.append(slot)
        self._unsent.append((line, barrier))

    def _local(self, answer: Answer) -> None:
        self._replies.append(_Slot(reply=self._render(answer), ready=True))

    def _render(self, answer: Answer) -> Reply:
        return answer.render(self._hostname, self._enhanced is not False)

    def _flushMta(self) -> None:
        """Send what may be sent: all of it to a pipelining MTA, else one at a time."""
        if not self._mtaConnected:
            return
        out = []
        while self._unsent:
            line, barrier = self._unsent[0]
            if self._inFlight and (barrier or self._barrierInFlight or not self._pipelining):
                break
            self._unsent.popleft()
            out.append(line + wire.CRLF)
            self._inFlight += 1
            self._barrierInFlight = barrier
        if out:
            self._emit(SendMta(b"".join(out)))
            self._armMtaTimer()

    def _flushClient(self) -> None:
        out = []
        while self._replies and self._replies[0].ready:
            slot = self._replies.popleft()
            if slot.reply is not None:
                out.append(slot.reply.toBytes())
                self._tally(slot)
            if slot.after is not None:
                if out:
                    self._emit(SendClient(b"".join(out)))
                    out = []
                self._emit(slot.after)
        if out:
            self._emit(SendClient(b"".join(out)))
        if self.state is S.CLOSING and not self._replies and not self._closeSent:
            self._closeSent = True
            self._emit(CloseClient())

    def _armMtaTimer(self) -> None:
        """
        Time the MTA's answer to what was sent, and its TLS handshake; not while the
        message streams to it (it answers only at the end: then L{releaseSent} re-arms).
        """
        waiting = self._inFlight or self._mtaTlsWaiting is not None
        txn = self._txn
        streaming = (
            self.state is S.RELEASING
            and txn is not None
            and txn.final is not None
            and txn.final in self._mtaSlots
        )
        if waiting and self._mtaConnected and not streaming:
            self._emit(StartTimer(Timer.MTA_REPLY, self._config.timeouts.mtaReply))
        else:
            self._emit(CancelTimer(Timer.MTA_REPLY))

    def _unasked(self, reply: Reply) -> None:
        """A reply nobody asked for: a 421 is the MTA leaving; anything else is confusion."""
        if reply.code == 421:
            self._log("warn", "MTA closing: {reply}", reply=reply.text)
            self._emit(MtaError("lost"))
            self._mtaConnected = False
            self._emit(AbortMta())
            self._closeWith(replies.MTA_LOST)
            return
        self._log("error", "unexpected MTA reply: {reply}", reply=f"{reply.code} {reply.text}")
        self._emit(MtaError("protocol"))
        self._mtaBroken(self._render(replies.MTA_CONFUSED))

    def _confused(self, slot: _Slot, reply: Reply) -> None:
        self._log(
            "error",
            "MTA answered {command} with {reply}, a reply of the wrong class",
            command=slot.command.decode("utf-8", "replace"),
            reply=f"{reply.code} {reply.text}",
        )
        self._emit(MtaError("protocol"))
        slot.reply, slot.ready = self._render(replies.MTA_CONFUSED), True
        self._mtaBroken(None)

    def _mtaBroken(self, reply: Reply | None) -> None:
        """End the MTA leg: the client gets C{reply} (if any) after what is ready, then the close."""
        self._mtaConnected = False
        self._emit(AbortMta())
        self._dropUnready()
        if reply is not None:
            self._replies.append(_Slot(reply=reply, ready=True))
        self._closeAfterFlush()

    # -- closing -------------------------------------------------------------------------

    def _dropUnready(self) -> None:
        for slot in self._replies:
            if not slot.ready:
                slot.ready, slot.reply = True, None
        self._mtaSlots.clear()
        self._unsent.clear()
        self._inFlight = 0
        self._barrierInFlight = False

    def _closeWith(self, answer: Answer) -> None:
        """Answer C{answer} after whatever replies are ready, then close both connections."""
        if self.state in (S.RELEASING, S.RELEASED) and self._mtaConnected:
            self._mtaConnected = False
            self._emit(AbortMta())  # no end of data for a message the client will retry
        self._dropUnready()
        self._replies.append(_Slot(reply=self._render(answer), ready=True))
        self._closeAfterFlush()

    def _closeAfterFlush(self) -> None:
        if self.state is not S.CLOSED:
            self.state = S.CLOSING
        self._endTransaction()

    def _closeNow(self) -> None:
        self._dropUnready()
        self._closeAfterFlush()

    # -- helpers -------------------------------------------------------------------------

    def _enter(self, state: State) -> None:
        if self.state in (S.CLOSING, S.CLOSED):
            return
        assert state in TRANSITIONS[self.state], f"{self.state} -> {state}"
        self.state = state

    def _ask(self, check: _Check, effect: RunCheck) -> None:
        if self.state is S.COMMAND:
            self._enter(S.CHECKING)
        self._check = check
        self._emit(effect)

    def _touch(self) -> None:
        self._emit(StartTimer(Timer.IDLE, self._config.timeouts.clientIdle))

    def _log(self, level: str, format: str, **fields: object) -> None:
        fields.setdefault("client", self.info.clientAddress)
        self._emit(Log(level, "{session} " + format, fields))

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _take(self) -> list[Effect]:
        """The effects of this event: what it queued, then the batched writes."""
        self._flushMta()
        self._flushClient()
        self._throttle()
        effects, self._effects = self._effects, []
        return effects

    def _throttle(self) -> None:
        """
        Stop reading from a client that sends faster than we can answer, or that does not
        read what we answer (L{clientBacklogged}); then the session's bounds (L{_bound}).
        """
        if self.state is S.CLOSED:
            return
        pause = (
            len(self._commands) > MAX_BUFFERED
            or len(self._replies) > MAX_PENDING
            or self._backlogged
        )
        if pause != self._paused:
            self._paused = pause
            self._emit(PauseClient() if pause else ResumeClient())
        self._bound()

    # -- bounds: limits, deadlines, back-pressure, fairness ------------------------------

    def proceed(self) -> list[Effect]:
        """A later reactor turn, asked for with L{ContinueLater}: the lines left, in turn."""
        self._continuing = False
        self._newTurn()
        if self.state not in (S.CLOSING, S.CLOSED):
            self._advance()
        return self._take()

    def _newTurn(self) -> None:
        """
        The client's bytes, or the later turn asked for: a reactor turn's share of lines
        (C{limits.commands_per_turn}) to handle, in this event and the others of its turn
        (the MTA's replies, verdicts). Bytes that come while a later turn is asked for
        wait for it: a flood gets one share a turn, however it arrives.
        """
        if not self._continuing:
            self._budget = self._config.limits.commandsPerTurn

    def clientBacklogged(self) -> list[Effect]:
        """
        The client's connection holds more replies than it has read (C{limits.reply_buffer}):
        stop reading from it, and stop handling what it sent, until L{clientDrained}.
        """
        if not self._backlogged and self.state not in (S.CLOSING, S.CLOSED):
            self._backlogged = True
            self._log("debug", "the client does not read its replies: not reading it either")
        return self._take()

    def clientDrained(self) -> list[Effect]:
        """The client read every reply written to it: read it again, handle what waits."""
        if self._backlogged:
            self._backlogged = False
            self._advance()
        return self._take()

    def _held(self) -> bool:
        """
        Whether the buffered command lines wait: this turn handled its share of them, the
        client does not read its replies, or too many are owed already.
        """
        if self._limitAfterReplies is not None:
            return True  # nothing more is read: the session closes
        if self._budget > 0 and not self._backlogged and len(self._replies) <= MAX_PENDING:
            return False
        self._stalled = len(self._commands) > 0
        return True

    def _overCommandLimit(self) -> bool:
        """Count a command line (of this turn's share too); past C{limits.commands}, close."""
        self._budget -= 1
        self._commandCount += 1
        limit = self._config.limits.commands
        if self._commandCount <= limit:
            return False
        # The commands before this one are answered first, the MTA's replies included.
        self._limitAfterReplies = functools.partial(
            self._limit, replies.TOO_MANY_COMMANDS, Reason.COMMAND_LIMIT,
            "more than {limit} commands (limits.commands)", limit=limit,
        )  # fmt: skip
        if not self._mtaSlots:
            self._limitAfterReplies()
        return True

    def _tally(self, slot: _Slot) -> None:
        """
        Count the errors the client makes as Postfix does (C{smtpd_hard_error_limit}):
        every command answered with 4xx or 5xx, ours or the MTA's, but for the recipients
        over C{limits.recipients} (Postfix's C{smtpd_recipient_overshoot_limit}); a
        delivered message forgives those before it. The last one allowed is followed by
        421 4.7.0, and nothing the client sent after it is answered.
        """
        reply = slot.reply
        assert reply is not None
        if self.state is S.CLOSING or slot.command == b"(banner)" or reply.code == 421:
            return
        if reply.code // 100 == 2 and slot.command in (b".", b"BDAT"):
            self._errors = 0
            return
        if reply.code // 100 not in (4, 5) or _tooManyRecipients(reply):
            return
        self._errors += 1
        limit = self._config.limits.errors
        if self._errors >= limit:
            self._replies.clear()
            self._limit(
                replies.TOO_MANY_ERRORS, Reason.ERROR_LIMIT,
                "{count} errors (limits.errors)", count=self._errors,
            )  # fmt: skip

    def _bound(self) -> None:
        """
        After each event: this turn's share of command lines, a later turn for those
        left; the deadline of the command line begun, the session's, the message's rate.
        """
        closing = self.state in (S.CLOSING, S.CLOSED)
        limits, timeouts = self._config.limits, self._config.timeouts
        if (
            self._stalled
            and not self._continuing
            and not self._backlogged
            and len(self._replies) <= MAX_PENDING
            and not closing
        ):
            self._stalled = False
            self._continuing = True
            self._emit(ContinueLater())
        if closing:
            return
        if not self._sessionTimed:
            self._sessionTimed = True
            self._emit(StartTimer(Timer.SESSION, timeouts.session))
        # A line is timed from the event that brought its first byte; a line end fed
        # since means that line is complete, and the one now unfinished is another.
        if self._commands.unfinished:
            if self._lineTimed != self._commands.lineEnds:
                self._lineTimed = self._commands.lineEnds
                self._emit(StartTimer(Timer.COMMAND, timeouts.command))
        elif self._lineTimed is not None:
            self._lineTimed = None
            self._emit(CancelTimer(Timer.COMMAND))
        if limits.minDataRate:
            txn = self._txn
            receiving = self.state is S.DATA or self._chunking()
            current = txn if receiving else None
            if current is not self._rateTimed:
                self._rateTimed = current
                if current is None:
                    self._emit(CancelTimer(Timer.DATA_RATE))
                else:
                    self._rateElapsed, self._rateNext = 0.0, DATA_RATE_GRACE
                    self._emit(StartTimer(Timer.DATA_RATE, DATA_RATE_GRACE))

    def _boundFired(self, timer: Timer) -> None:
        if self.state is S.CLOSING:
            return
        timeouts = self._config.timeouts
        if timer is Timer.SESSION:
            if self.state in _MESSAGE_WHOLE:
                self._expired = True  # closed by _advance once the message is answered
            else:
                self._sessionExpired()
        elif timer is Timer.COMMAND:
            if not self._commands.unfinished:
                return
            if self.state in _WAITING or self._replies or (self._paused and not self._backlogged):
                # The rest of the line may wait for us (we stopped reading), not the client.
                self._emit(StartTimer(Timer.COMMAND, timeouts.command))
                return
            self._limit(
                replies.COMMAND_TIMEOUT, Reason.COMMAND_TIMEOUT,
                "a command line not completed in {seconds} s (timeouts.command)",
                seconds=timeouts.command,
            )  # fmt: skip
        elif timer is Timer.DATA_RATE:
            txn = self._txn
            if txn is None or txn is not self._rateTimed:
                return
            self._rateElapsed += self._rateNext
            rate = txn.size / self._rateElapsed
            minimum = self._config.limits.minDataRate
            if rate >= minimum:
                self._rateNext = DATA_RATE_CHECK
                self._emit(StartTimer(Timer.DATA_RATE, DATA_RATE_CHECK))
                return
            self._limit(
                replies.DATA_TOO_SLOW, Reason.DATA_RATE,
                "{size} bytes of the message in {seconds:.0f} s, {rate:.0f} bytes/s, below "
                "{minimum} (limits.min_data_rate)",
                size=txn.size, seconds=self._rateElapsed, rate=rate, minimum=minimum,
            )  # fmt: skip

    def _sessionExpired(self) -> None:
        self._expired = False
        self._limit(
            replies.SESSION_TIMEOUT, Reason.SESSION_TIMEOUT,
            "the session lasted {seconds} s (timeouts.session)",
            seconds=self._config.timeouts.session,
        )  # fmt: skip

    def _limit(self, answer: Answer, reason: Reason, format: str, **fields: object) -> None:
        """
        Close the session with C{answer} after the replies ready before it: it met a limit,
        logged and counted once. A message not whole yet goes with it, unacknowledged.
        """
        if self._limited or self.state in (S.CLOSING, S.CLOSED):
            return
        self._limited = True
        reply = self._render(answer)
        self._log(
            "warn", f"closed, {reason.value}: {format}; {{reply}}",
            reply=f"{reply.code} {reply.text}", **fields,
        )  # fmt: skip
        self._emit(LimitReached(reason.value, reply))
        if self._check is not None:
            self._check = None
            self._emit(CancelCheck())
        self._closeWith(answer)


def _tooManyRecipients(reply: Reply) -> bool:
    """A 452 4.5.3: more recipients than allowed, ours or the MTA's (never an error)."""
    first = reply.lines[0] if reply.lines else b""
    return reply.code == 452 and (first.startswith(b"4.5.3") or b"too many recipients" in first)


def _relayed(reply: Reply) -> Reply:
    return reply


def _answerOf(verdict: Verdict) -> Answer:
    assert verdict.code is not None and verdict.enhanced is not None
    return Answer(verdict.code, verdict.enhanced, verdict.text)


def _by(verdict: Verdict) -> str:
    return verdict.filter or Reason.FILTERS.value
