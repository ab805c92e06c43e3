"""
The spamd filter: SpamAssassin's score for each message, asked of spamd over the SPAMC/SPAMD
protocol (the C{SYMBOLS} command: the score, spamd's required score and the names of the rules
hit, without the rewritten message).

The message is streamed from the spool to spamd, over TCP or a UNIX socket; it is never read
whole into memory. A message scoring C{reject_score} or more is refused with 550 5.7.1;
below it the message is tagged with C{X-Spam-Status} and C{X-Spam-Score} (and
C{X-Spam-Flag: YES} when spamd calls it spam). A message larger than C{max_size} is not
scanned, as C{spamc -s} does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    BaseFilter,
    FilterError,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.daemon import StreamingQuery, ask, shown
from mailproxy.filters.options import Options
from mailproxy.filters.support import tooLarge

#: The protocol version we speak: spamd answers SYMBOLS with a Content-length and a
#: C{Spam:} header, then the comma-separated rule names.
SPAMC_VERSION = b"1.5"
DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=783"
#: spamc's default C{-s}: 500 KiB. Bigger messages are not sent to spamd.
DEFAULT_MAX_SIZE = 500 * 1024
DEFAULT_REJECT_SCORE = 10.0
#: The longest answer we keep reading: a SYMBOLS answer is a few hundred bytes.
MAX_ANSWER = 64 * 1024
#: Header lines are written unfolded: keep X-Spam-Status well under RFC 5322's 998.
_MAX_STATUS = 900

_STATUS_LINE = re.compile(rb"SPAMD/(\d+\.\d+) (\d+) ?(.*)")
_SPAM_HEADER = re.compile(r"(True|False|Yes|No) ; (-?\d+(?:\.\d+)?) / (-?\d+(?:\.\d+)?)")
_TEST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@attrs.frozen
class SpamdAnswer:
    """
    What spamd said of one message.

    @ivar scoreText: the score as spamd wrote it (C{"12.3"}), for headers and replies.
    @ivar tests: the names of the rules the message hit.
    """

    isSpam: bool
    score: float
    required: float
    scoreText: str
    requiredText: str
    tests: tuple[str, ...]


def request(size: int, user: str | None = None) -> bytes:
    """The request that precedes C{size} bytes of message: C{SYMBOLS SPAMC/1.5} and headers."""
    lines = [b"SYMBOLS SPAMC/" + SPAMC_VERSION, b"Content-length: %d" % size]
    if user is not None:
        lines.append(b"User: " + user.encode("utf-8"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parseAnswer(data: bytes, closed: bool) -> SpamdAnswer | None:
    """
    Parse spamd's answer to SYMBOLS, pure code: C{None} while it is incomplete.

    @param closed: whether spamd has closed the connection (nothing more will come).
    @raise FilterError: spamd answered an error, or something that is not an answer.
    """
    head, crlf, rest = data.partition(b"\r\n")
    if not crlf:
        if closed:
            what = f"a truncated answer: {shown(data)!r}" if data else "no answer"
            raise FilterError(f"spamd closed the connection with {what}")
        return None
    status = _STATUS_LINE.fullmatch(head)
    if status is None:
        raise FilterError(f"spamd answered something else than SPAMD/x.y: {shown(head)!r}")
    if status.group(2) != b"0":
        raise FilterError(f"spamd answered {shown(head)!r}")
    headerBlock, blank, body = rest.partition(b"\r\n\r\n")
    if not blank:
        if closed:
            raise FilterError(f"spamd's answer ended in its headers: {shown(data)!r}")
        return None
    headers: dict[str, str] = {}
    for line in headerBlock.split(b"\r\n"):
        name, colon, value = line.decode("ascii", "replace").partition(":")
        if not colon:
            raise FilterError(f"spamd sent a malformed header line: {shown(line)!r}")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise FilterError(f"spamd sent a bad Content-length: {length!r}")
        if len(body) < int(length):
            if closed:
                raise FilterError("spamd closed the connection in the middle of its answer")
            return None
        body = body[: int(length)]
    elif not closed:
        return None
    spam = _SPAM_HEADER.fullmatch(headers.get("spam", ""))
    if spam is None:
        raise FilterError(f"spamd's answer has no valid Spam header: {shown(headerBlock)!r}")
    tests = tuple(
        name for name in (t.strip() for t in body.decode("ascii", "replace").split(",")) if name
    )
    if not all(_TEST_NAME.fullmatch(name) for name in tests):
        raise FilterError(f"spamd's rule names are malformed: {shown(body)!r}")
    return SpamdAnswer(
        isSpam=spam.group(1) in ("True", "Yes"),
        score=float(spam.group(2)),
        required=float(spam.group(3)),
        scoreText=spam.group(2),
        requiredText=spam.group(3),
        tests=tests,
    )


class _SpamdProtocol(StreamingQuery[SpamdAnswer]):
    """One SYMBOLS exchange: the request, the message streamed from the spool, the answer."""

    def __init__(self, request: bytes, message: Message, answer: Deferred[SpamdAnswer]) -> None:
        super().__init__(
            message, answer, parseAnswer, daemon="spamd", maxAnswer=MAX_ANSWER, prefix=request
        )


@attrs.frozen
class SpamdClient:
    """
    Asks spamd about messages, one connection per message.

    @ivar address: the endpoint string, for messages.
    """

    endpoint: IStreamClientEndpoint
    address: str
    user: str | None = None

    def check(self, message: Message) -> Deferred[SpamdAnswer]:
        """
        Stream C{message} to spamd and fire with its answer.

        @raise FilterError: (asynchronously) spamd cannot be reached or answered badly.
        """
        query = partial(_SpamdProtocol, request(message.size, self.user), message)
        return Deferred.fromCoroutine(ask(self.endpoint, f"spamd at {self.address}", query))


@implementer(IFilter)
@attrs.frozen
class SpamdFilter(BaseFilter):
    """Refuses messages spamd scores at or above C{rejectScore}; tags the others."""

    client: SpamdClient
    rejectScore: float = DEFAULT_REJECT_SCORE
    addHeaders: bool = True
    maxSize: int = DEFAULT_MAX_SIZE
    name = "spamd"
    stages = frozenset({Stage.MESSAGE})
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        if tooLarge(self._log, self.name, session, message, self.maxSize):
            return succeed(Verdict.accept())
        if message.size == 0:
            return succeed(Verdict.accept())
        return self.client.check(message).addCallback(self._verdict, session)

    def _verdict(self, answer: SpamdAnswer, session: Session) -> Verdict:
        self._log.info(
            "{session} spamd: score {score} required {required} ({spam}) tests={tests}",
            session=session.id,
            score=answer.scoreText,
            required=answer.requiredText,
            spam="spam" if answer.isSpam else "ham",
            tests=",".join(answer.tests) or "none",
        )
        if answer.score >= self.rejectScore:
            return Verdict.reject(f"Message refused as spam (score {answer.scoreText})")
        if not self.addHeaders:
            return Verdict.accept()
        return Verdict.accept(spamHeaders(answer))


def spamHeaders(answer: SpamdAnswer) -> tuple[tuple[str, str], ...]:
    """C{X-Spam-Flag} (spam only), C{X-Spam-Status} and C{X-Spam-Score}, as SpamAssassin
    writes them."""
    status = (
        f"{'Yes' if answer.isSpam else 'No'}, score={answer.scoreText}"
        f" required={answer.requiredText} tests="
    )
    tests = ",".join(answer.tests) or "none"
    if len(status) + len(tests) > _MAX_STATUS:
        tests = tests[: _MAX_STATUS - len(status) - 4].rsplit(",", 1)[0] + ",..."
    headers = [("X-Spam-Status", status + tests), ("X-Spam-Score", answer.scoreText)]
    if answer.isSpam:
        headers.insert(0, ("X-Spam-Flag", "YES"))
    return tuple(headers)


@implementer(IPlugin, IFilterFactory)
class SpamdFilterFactory:
    name = "spamd"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        address = o.string("spamd", DEFAULT_ENDPOINT)
        endpoint = o.endpoint("spamd", DEFAULT_ENDPOINT, reactor)
        user = o.string("user") if "user" in options else None
        if user is not None and not user.isprintable():
            raise OptionError("user", f"must be printable, not {user!r}")
        built = SpamdFilter(
            client=SpamdClient(endpoint, address, user),
            rejectScore=o.number("reject_score", DEFAULT_REJECT_SCORE, minimum=-1000.0),
            addHeaders=o.boolean("add_headers", True),
            maxSize=o.integer("max_size", DEFAULT_MAX_SIZE, minimum=1),
        )
        o.finish()
        return built
