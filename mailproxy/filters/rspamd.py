"""
The rspamd filter: rspamd's verdict on each message, asked of its normal worker over HTTP
(C{POST /checkv2}, the protocol rspamc and rspamd's proxy speak).

The spooled message is the request's body, streamed from the spool file in chunks by a
L{FileBodyProducer} (with a C{Content-Length}); it is never read whole into memory. The
session's facts go in rspamd's request headers (C{IP}, C{Helo}, C{Hostname}, C{From}, one
C{Rcpt} per recipient, C{User}, C{Queue-Id}, C{TLS-Cipher} and C{TLS-Version}). rspamd's
answer is a JSON object, read into a bounded buffer and parsed defensively: its C{action}
becomes the verdict, its C{milter} block's C{add_headers} and C{remove_headers} header
edits. rspamd unreachable, answering an HTTP error, something that is not such an object,
or an action we do not know, is a filter error (C{on_error}).

Adds go in the verdict's C{headers}, removals and the rewritten subject in its C{edits}.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from typing import IO, Any

import attrs
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    BaseFilter,
    FilterError,
    HeaderEdit,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.daemon import shown
from mailproxy.filters.options import Options
from mailproxy.filters.support import tooLarge

#: rspamd's normal worker (C{worker-normal.inc}'s C{bind_socket}).
DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=11333"
#: rspamd's own C{max_message} (50 MiB): it refuses bigger messages anyway.
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
#: The longest answer we read: a verdict with its symbols and their options is a few KiB;
#: anything past this is a broken or hostile daemon.
MAX_ANSWER = 1024 * 1024
#: How much of the spool each read of the body producer takes.
CHUNK_SIZE = 64 * 1024
#: The longest reason from rspamd we put in an SMTP reply.
MAX_REASON = 200
#: The longest header value we write (unfolded): well under RFC 5322's 998 per line.
MAX_HEADER_VALUE = 900
#: At most this many header edits from one answer's milter block.
MAX_EDITS = 50
DEFAULT_SPAM_HEADER = "X-Spam"
DEFAULT_SPAM_VALUE = "Yes"

#: The actions rspamd 3.x answers (the default actions.conf, less custom ones).
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")

_FIELD_NAME = re.compile(r"[!-9;-~]{1,100}")
_FOLD = re.compile(r"\r?\n[ \t]+")


@attrs.frozen
class RspamdAnswer:
    """
    What rspamd said of one message, checked.

    @ivar reason: C{messages.smtp_message}, sanitised for an SMTP reply; C{None} if none.
    @ivar subject: the rewritten subject (C{rewrite subject}), sanitised.
    @ivar addHeaders: C{(name, value)} from C{milter.add_headers}, in rspamd's order.
    @ivar removeHeaders: C{(name, occurrence)} from C{milter.remove_headers}.
    """

    action: str
    score: float
    required: float
    symbols: tuple[str, ...] = ()
    reason: str | None = None
    subject: str | None = None
    addHeaders: tuple[tuple[str, str], ...] = ()
    removeHeaders: tuple[tuple[str, int], ...] = ()


def oneLine(text: str, limit: int) -> str:
    """C{text} on one line of printable ASCII, at most C{limit} characters: for a reply."""
    flat = " ".join(text.split())
    clean = "".join(c if " " <= c <= "~" else "?" for c in flat)
    if len(clean) > limit:
        clean = clean[: limit - 3] + "..."
    return clean


def headerValue(text: str, limit: int = MAX_HEADER_VALUE) -> str:
    """
    A header value from rspamd, unfolded, without CR, LF, NUL or other controls, at most
    C{limit} characters; non-ASCII letters are kept (the release writes UTF-8).
    """
    flat = " ".join(_FOLD.sub(" ", text).split())
    clean = "".join(c if c.isprintable() else "?" for c in flat)
    if len(clean) > limit:
        clean = clean[: limit - 3] + "..."
    return clean


def _finite(value: float) -> bool:
    """Whether C{value} is a finite float (a JSON integer of 400 digits is not one)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(answer: Mapping[str, Any], key: str) -> float:
    value = answer.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise FilterError(f"rspamd's {key} is not a number: {shown(repr(value).encode())!r}")
    return float(value)


def _theirs(name: str) -> bool:
    """
    A field rspamd's milter headers may not touch: the one C{Authentication-Results} is the
    headers filter's (RFC 8601: ours added, forged ones with our authserv-id removed, the
    others kept), not rspamd's own routine's, which adds one and removes every other.
    """
    return name.lower() == "authentication-results"


def _addHeaders(block: object) -> tuple[tuple[str, str], ...]:
    """
    C{milter.add_headers}: C{{name: value}}, a value being a string, a C{{value, order}}
    object, or a list of them; sorted by C{order} (stable), the bad ones dropped.
    """
    if not isinstance(block, Mapping):
        return ()
    found: list[tuple[float, int, str, str]] = []
    for name, values in block.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            continue
        if _theirs(name):
            continue
        for item in values if isinstance(values, list) else [values]:
            order: object = 0
            value: object = item
            if isinstance(item, Mapping):
                value, order = item.get("value"), item.get("order", 0)
            if not isinstance(value, str):
                continue
            if isinstance(order, bool) or not isinstance(order, int | float) or not _finite(order):
                order = 0
            found.append((float(order), len(found), name, headerValue(value)))
    found.sort()
    return tuple((name, value) for _, _, name, value in found[:MAX_EDITS])


def _removeHeaders(block: object) -> tuple[tuple[str, int], ...]:
    """C{milter.remove_headers}: C{{name: occurrence}} (0 every one, N the Nth, -N from
    the bottom), the bad ones dropped."""
    if not isinstance(block, Mapping):
        return ()
    found = []
    for name, occurrence in block.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name) or _theirs(name):
            continue
        if isinstance(occurrence, bool) or not isinstance(occurrence, int):
            continue
        found.append((name, occurrence))
    return tuple(found[:MAX_EDITS])


def parseAnswer(data: bytes) -> RspamdAnswer:
    """
    Parse rspamd's C{/checkv2} answer, pure code.

    @raise FilterError: not JSON, not an object, no known C{action}, or a bad score.
    """
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise FilterError(f"rspamd's answer is not JSON ({e}): {shown(data)!r}") from None
    if not isinstance(answer, dict):
        raise FilterError(f"rspamd's answer is not a JSON object: {shown(data)!r}")
    if "error" in answer and "action" not in answer:
        raise FilterError(f"rspamd answered an error: {shown(str(answer['error']).encode())!r}")
    action = answer.get("action")
    if action not in ACTIONS:
        raise FilterError(f"rspamd answered an unknown action: {shown(repr(action).encode())!r}")
    symbols = answer.get("symbols")
    names = tuple(
        sorted(str(name) for name in symbols if _FIELD_NAME.fullmatch(str(name)))
        if isinstance(symbols, dict)
        else ()
    )
    messages = answer.get("messages")
    reason = messages.get("smtp_message") if isinstance(messages, dict) else None
    reason = oneLine(reason, MAX_REASON) if isinstance(reason, str) else None
    subject = answer.get("subject")
    milter = answer.get("milter")
    milter = milter if isinstance(milter, dict) else {}
    return RspamdAnswer(
        action=action,
        score=_number(answer, "score"),
        required=_number(answer, "required_score"),
        symbols=names,
        reason=reason or None,
        subject=headerValue(subject) if isinstance(subject, str) else None,
        addHeaders=_addHeaders(milter.get("add_headers")),
        removeHeaders=_removeHeaders(milter.get("remove_headers")),
    )


def requestHeaders(
    session: Session,
    envelope: Envelope,
    *,
    mtaName: str | None = None,
    settingsId: str | None = None,
    password: str | None = None,
) -> Headers:
    """
    rspamd's request headers: what it would learn from the MTA (its milter or Postfix's
    macros), from the session and the envelope.
    """
    headers = Headers()

    def put(name: str, value: str | None) -> None:
        if value:
            headers.setRawHeaders(name, [" ".join(value.split())])

    # Only an address: not the relay's "unknown" (a client on a UNIX socket); rspamd 3.4
    # takes that as no address, but another version need not.
    try:
        put("IP", str(ipaddress.ip_address(session.clientAddress)))
    except ValueError:
        pass
    put("Helo", session.helo)
    put("Hostname", session.clientName)
    put("From", envelope.mailFrom or "<>")
    if envelope.recipients:
        headers.setRawHeaders("Rcpt", [" ".join(r.split()) for r in envelope.recipients])
    put("User", session.login)
    put("Queue-Id", session.id)
    if session.tls is not None:
        version, cipher = session.tls
        put("TLS-Version", version)
        put("TLS-Cipher", cipher)
    put("MTA-Name", mtaName)
    put("Settings-ID", settingsId)
    put("Password", password)
    return headers


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _OneEndpoint:
    """Every request to rspamd goes to its configured endpoint, TCP or UNIX."""

    endpoint: IStreamClientEndpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoint


class _CappedBody(Protocol):
    """Collects a response body of at most C{limit} bytes; past it, drops the connection."""

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self._limit = limit
        self._done = done
        self._buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._buffer.clear()
            self._done.errback(FilterError(f"rspamd's answer is over {self._limit} bytes"))
            if self.transport is not None:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        # PotentialDataLoss: a body without a length, ended by closing (HTTP/1.0's way).
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(bytes(self._buffer))
        else:
            self._done.errback(FilterError(f"rspamd's answer was cut short: {reason.value}"))


def _readCapped(response: IResponse, limit: int) -> Deferred[bytes]:
    """The body of C{response}, or a L{FilterError} once it is over C{limit} bytes."""
    protocol: _CappedBody | None = None

    def cancel(d: Deferred[bytes]) -> None:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    done: Deferred[bytes] = Deferred(cancel)
    protocol = _CappedBody(limit, done)
    response.deliverBody(protocol)
    return done


def _wasCancelled(e: BaseException) -> bool:
    """Whether C{e} is (or wraps, as twisted.web's errors do) a cancellation."""
    if isinstance(e, CancelledError):
        return True
    reasons = getattr(e, "reasons", None)
    return isinstance(reasons, list) and any(
        isinstance(r, Failure) and r.check(CancelledError) for r in reasons
    )


def _why(e: BaseException) -> str:
    """A short account of a twisted.web error, with the reasons it wraps."""
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(
            str(r.value) or type(r.value).__name__ for r in reasons if isinstance(r, Failure)
        )
    return str(e) or type(e).__name__


@attrs.frozen
class RspamdClient:
    """
    Asks rspamd about messages, one HTTP connection per message (no keep-alive: nothing
    idles between messages, and a restarted rspamd is found at once).

    @ivar address: the endpoint string, for messages.
    """

    agent: IAgent
    address: str
    maxAnswer: int = MAX_ANSWER
    chunkSize: int = CHUNK_SIZE

    @classmethod
    def connecting(
        cls, reactor: object, endpoint: IStreamClientEndpoint, address: str
    ) -> RspamdClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint), pool)
        return cls(agent, address)

    def check(self, message: Message, headers: Headers) -> Deferred[RspamdAnswer]:
        """
        Stream C{message} to rspamd's C{/checkv2} with C{headers}; fire with its answer.

        Cancelling (the filter's timeout) drops the connection.

        @raise FilterError: (asynchronously) rspamd cannot be reached or answered badly.
        """
        return Deferred.fromCoroutine(self._check(message, headers))

    async def _check(self, message: Message, headers: Headers) -> RspamdAnswer:
        where = f"rspamd at {self.address}"
        try:
            with message.open() as spool:
                body = await self._ask(spool, headers, where)
        except OSError as e:
            raise FilterError(f"{where}: cannot read the spooled message: {e}") from e
        return parseAnswer(body)

    async def _ask(self, spool: IO[bytes], headers: Headers, where: str) -> bytes:
        producer = FileBodyProducer(spool, readSize=self.chunkSize)
        try:
            response = await self.agent.request(
                b"POST", b"http://rspamd/checkv2", headers, producer
            )
            if response.code != 200:
                raise FilterError(f"{where} answered HTTP {response.code}{await _error(response)}")
            if response.length is not UNKNOWN_LENGTH and response.length > self.maxAnswer:
                response.deliverBody(_Discard())
                raise FilterError(f"{where}: its answer is over {self.maxAnswer} bytes")
            return await _readCapped(response, self.maxAnswer)
        except FilterError:
            raise
        except Exception as e:
            if _wasCancelled(e):
                raise CancelledError() from None
            if isinstance(e, error.ConnectError | OSError):
                raise FilterError(f"{where} unreachable: {e}") from e
            raise FilterError(f"{where} failed: {_why(e)}") from e


#: How much of an HTTP error's body we read, for its reason.
MAX_ERROR = 4096


async def _error(response: IResponse) -> str:
    """What an HTTP error's body says (rspamd's C{{"error": ...}}), for the log: C{""} when
    it says nothing we can show."""
    if response.length is not UNKNOWN_LENGTH and response.length > MAX_ERROR:
        response.deliverBody(_Discard())
        return ""
    try:
        body = await _readCapped(response, MAX_ERROR)
    except FilterError:
        return ""
    try:
        said = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        said = None
    text = said if isinstance(said, str) else body.decode("utf-8", "replace")
    return f": {oneLine(text, MAX_REASON)}" if text.strip() else ""


class _Discard(Protocol):
    """Takes an unwanted response body and drops the connection."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@implementer(IFilter)
@attrs.frozen
class RspamdFilter(BaseFilter):
    """Maps rspamd's action on each message to a verdict and header edits."""

    client: RspamdClient
    maxSize: int = DEFAULT_MAX_SIZE
    scoreHeaders: bool = True
    spamHeader: tuple[str, str] = (DEFAULT_SPAM_HEADER, DEFAULT_SPAM_VALUE)
    milterHeaders: bool = True
    mtaName: str | None = None
    settingsId: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    name = "rspamd"
    stages = frozenset({Stage.MESSAGE})
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        if tooLarge(self._log, self.name, session, message, self.maxSize):
            return succeed(Verdict.accept())
        headers = requestHeaders(
            session,
            envelope,
            mtaName=self.mtaName,
            settingsId=self.settingsId,
            password=self.password,
        )
        return self.client.check(message, headers).addCallback(self._verdict, session)

    def _verdict(self, answer: RspamdAnswer, session: Session) -> Verdict:
        self._log.info(
            "{session} rspamd: {action} score {score:.2f} required {required:.2f}"
            " symbols={symbols}",
            session=session.id,
            action=answer.action,
            score=answer.score,
            required=answer.required,
            symbols=",".join(answer.symbols) or "none",
        )
        action = answer.action
        if action == "reject":
            return Verdict.reject(answer.reason or "Message refused as spam by rspamd")
        if action == "soft reject":
            return Verdict.tempfail(answer.reason or "Message deferred by rspamd, try again later")
        if action == "greylist":
            return Verdict.tempfail(answer.reason or "Greylisted, please try again later")
        headers: list[tuple[str, str]] = []
        edits: list[HeaderEdit] = []
        if self.scoreHeaders:
            headers += [
                ("X-Rspamd-Score", f"{answer.score:.2f} / {answer.required:.2f}"),
                ("X-Rspamd-Action", action),
            ]
        if action == "add header":
            headers.append(self.spamHeader)
        if action == "rewrite subject":
            if answer.subject is None:
                raise FilterError("rspamd asked to rewrite the subject, and gave none")
            edits.append(HeaderEdit.replace("Subject", answer.subject))
        if self.milterHeaders:
            headers += answer.addHeaders
            edits += (HeaderEdit.remove(name, n) for name, n in answer.removeHeaders)
        return Verdict.accept(tuple(headers), tuple(edits))


def _printable(key: str, value: str | None) -> str | None:
    if value is not None and not (value.isprintable() and value.isascii()):
        raise OptionError(key, f"must be printable ASCII, not {value!r}")
    return value


def _spamHeader(key: str, name: str, value: str) -> tuple[str, str]:
    if not _FIELD_NAME.fullmatch(name):
        raise OptionError(key, f"not a header field name: {name!r}")
    return name, value


@implementer(IPlugin, IFilterFactory)
class RspamdFilterFactory:
    name = "rspamd"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        address = o.string("rspamd", DEFAULT_ENDPOINT)
        endpoint = o.endpoint("rspamd", DEFAULT_ENDPOINT, reactor)

        def optional(key: str) -> str | None:
            return _printable(key, o.string(key)) if key in options else None

        spamValue = o.string("spam_header_value", DEFAULT_SPAM_VALUE)
        if not spamValue.isprintable():
            raise OptionError("spam_header_value", f"must be printable, not {spamValue!r}")
        built = RspamdFilter(
            client=RspamdClient.connecting(reactor, endpoint, address),
            maxSize=o.integer("max_size", DEFAULT_MAX_SIZE),
            scoreHeaders=o.boolean("score_headers", True),
            spamHeader=_spamHeader(
                "spam_header", o.string("spam_header", DEFAULT_SPAM_HEADER), spamValue
            ),
            milterHeaders=o.boolean("milter_headers", True),
            mtaName=optional("mta_name"),
            settingsId=optional("settings_id"),
            password=optional("password"),
        )
        o.finish()
        return built
