"""
The p0f filter: the passive OS fingerprint of each client, asked of a running p0f (version 3)
over its UNIX socket API when the client connects.

The guess goes into C{session.notes["p0f"]} for later filters and into the log; rules may
refuse or tempfail clients by OS, flavor and link type. p0f is advisory: a missing socket, a
refused connection, a slow or malformed answer are logged and the client is accepted, whatever
C{on_error} says. (p0f knows a connection from its SYN; we ask after the TCP handshake, so
the answer is there.)

The API (p0f's README, section 4): a 21-byte query, C{magic 0x50304601} (native byte order),
the address type (4 or 6) and 16 bytes of address; a 232-byte answer, C{magic 0x50304602},
a status (0x00 bad query, 0x10 OK, 0x20 no match), then the host's record.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailproxy.envelope import Session
from mailproxy.filters import (
    BaseFilter,
    FilterError,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.daemon import ask
from mailproxy.filters.options import Options, checkSocketPath, reKeyed
from mailproxy.net import clientIP

QUERY_MAGIC = 0x50304601
ANSWER_MAGIC = 0x50304602
STATUS_BAD_QUERY = 0x00
STATUS_OK = 0x10
STATUS_NO_MATCH = 0x20
DEFAULT_SOCKET = "/var/run/p0f.sock"
DEFAULT_QUERY_TIMEOUT = 2.0

#: p0f's api.h, packed, native byte order: magic, status, seven u32 counters and times,
#: s16 distance, u8 bad_sw, u8 os_match_q, then six NUL-padded 32-byte strings.
QUERY = struct.Struct("=IB16s")
ANSWER = struct.Struct("=9IhBB32s32s32s32s32s32s")
_FIELDS = (
    "magic",
    "status",
    "first_seen",
    "last_seen",
    "total_conn",
    "uptime_min",
    "up_mod_days",
    "last_nat",
    "last_chg",
    "distance",
    "bad_sw",
    "os_match_q",
    "os_name",
    "os_flavor",
    "http_name",
    "http_flavor",
    "link_type",
    "language",
)


class P0fError(FilterError):
    """p0f's answer was not one."""


def query(address: str) -> bytes | None:
    """The 21-byte query for C{address}, or C{None} if it is not an IP address."""
    ip = clientIP(address)
    if ip is None:
        return None
    return QUERY.pack(QUERY_MAGIC, ip.version, ip.packed)


@attrs.frozen
class P0fAnswer:
    """
    p0f's record of a host.

    @ivar status: L{STATUS_OK} or L{STATUS_NO_MATCH}; the other fields mean something only
        with L{STATUS_OK}.
    @ivar raw: every field of the answer by its p0f name (C{first_seen}, C{os_match_q}, ...).
    """

    status: int
    os: str
    flavor: str
    distance: int
    link: str
    raw: Mapping[str, int | str]

    @property
    def matched(self) -> bool:
        return self.status == STATUS_OK

    def notes(self) -> dict[str, Any]:
        """The C{session.notes["p0f"]} dict: os, flavor, distance, link, raw."""
        return {
            "os": self.os,
            "flavor": self.flavor,
            "distance": self.distance,
            "link": self.link,
            "raw": dict(self.raw),
        }


def parseAnswer(data: bytes) -> P0fAnswer:
    """
    Parse one 232-byte answer, pure code.

    @raise P0fError: wrong size or magic, a bad-query status, or an unknown status.
    """
    if len(data) != ANSWER.size:
        raise P0fError(f"p0f answered {len(data)} bytes, not {ANSWER.size}")
    values = ANSWER.unpack(data)
    fields: dict[str, int | str] = {}
    for name, value in zip(_FIELDS, values, strict=True):
        if isinstance(value, bytes):
            text = value.split(b"\0", 1)[0].decode("ascii", "replace")
            fields[name] = "".join(c if c.isprintable() else "?" for c in text)
        else:
            fields[name] = value
    if fields["magic"] != ANSWER_MAGIC:
        raise P0fError(f"p0f answered with magic {fields['magic']:#010x}, not {ANSWER_MAGIC:#x}")
    status = fields["status"]
    if status == STATUS_BAD_QUERY:
        raise P0fError("p0f answered 'bad query'")
    if status not in (STATUS_OK, STATUS_NO_MATCH):
        raise P0fError(f"p0f answered an unknown status {status:#x}")
    raw = {k: v for k, v in fields.items() if k not in ("magic", "status")}
    return P0fAnswer(
        status=int(status),
        os=str(fields["os_name"]),
        flavor=str(fields["os_flavor"]),
        distance=int(fields["distance"]),
        link=str(fields["link_type"]),
        raw=raw,
    )


class _P0fProtocol(Protocol):
    """One query and its answer, then the connection is closed."""

    def __init__(self, request: bytes, answer: Deferred[P0fAnswer]) -> None:
        self._request = request
        self._answer = answer
        self._buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._answer.called:
            return
        self._buffer += data
        if len(self._buffer) < ANSWER.size:
            return
        assert self.transport is not None
        self.transport.loseConnection()
        try:
            answer = parseAnswer(self._buffer[: ANSWER.size])
        except P0fError:
            self._answer.errback()
        else:
            self._answer.callback(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._answer.called:
            self._answer.errback(
                P0fError(f"p0f closed the connection after {len(self._buffer)} bytes")
            )


@attrs.frozen
class P0fClient:
    """Asks p0f's API socket, one connection per query."""

    path: str
    reactor: Any
    timeout: float = DEFAULT_QUERY_TIMEOUT

    def lookup(self, address: str) -> Deferred[P0fAnswer]:
        """
        p0f's record of C{address}, within C{timeout} seconds.

        @raise FilterError: (asynchronously) not an IP address, no p0f, no valid answer in
            time.
        """
        request = query(address)
        if request is None:
            return defer.fail(FilterError(f"{address!r} is not an IP address"))
        endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=max(1, int(self.timeout)))
        asked = ask(endpoint, f"p0f at {self.path}", partial(_P0fProtocol, request))
        d = Deferred.fromCoroutine(asked)
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._timedOut)

    def _timedOut(self, failure: Failure) -> P0fAnswer:
        failure.trap(defer.TimeoutError)
        raise FilterError(f"p0f did not answer within {self.timeout:g} s")


@attrs.frozen
class Rule:
    """
    Refuse or tempfail clients whose p0f record matches every given glob (case-insensitive;
    a key left out matches anything).
    """

    action: str
    os: str = "*"
    flavor: str = "*"
    link: str = "*"
    text: str = ""

    def matches(self, answer: P0fAnswer) -> bool:
        pairs = ((self.os, answer.os), (self.flavor, answer.flavor), (self.link, answer.link))
        return all(fnmatch.fnmatchcase(value.lower(), p.lower()) for p, value in pairs)

    def verdict(self, answer: P0fAnswer) -> Verdict:
        text = self.text or f"Connections from {answer.os} {answer.flavor} are not accepted"
        if self.action == "tempfail":
            return Verdict.tempfail(text, 421, "4.7.0")
        return Verdict.reject(text, 554)


def _rules(options: Options) -> tuple[Rule, ...]:
    rules = []
    for index, table in enumerate(options.tables("rules")):
        o = Options(table)
        try:
            action = o.string("action")
            if action not in ("reject", "tempfail"):
                raise OptionError("action", f"must be 'reject' or 'tempfail', not {action!r}")
            rule = Rule(
                action=action,
                os=o.string("os", "*"),
                flavor=o.string("flavor", "*"),
                link=o.string("link", "*"),
                text=o.string("text") if "text" in table else "",
            )
            o.finish()
        except OptionError as e:
            raise reKeyed(e, f"rules[{index}]") from None
        if not rule.text.isprintable():
            raise OptionError(f"rules[{index}].text", f"must be printable, not {rule.text!r}")
        rules.append(rule)
    return tuple(rules)


@implementer(IFilter)
@attrs.frozen
class P0fFilter(BaseFilter):
    """Notes each client's OS guess at connect, and applies the rules to it."""

    client: P0fClient
    rules: tuple[Rule, ...] = ()
    name = "p0f"
    stages = frozenset({Stage.CONNECT})
    _log = Logger()

    def checkConnect(self, session: Session) -> Deferred[Verdict]:
        return self.client.lookup(session.clientAddress).addCallbacks(
            self._verdict, self._failed, callbackArgs=(session,), errbackArgs=(session,)
        )

    def _verdict(self, answer: P0fAnswer, session: Session) -> Verdict:
        if not answer.matched:
            self._log.info(
                "{session} p0f: [{client}] no match",
                session=session.id,
                client=session.clientAddress,
            )
            return Verdict.accept()
        session.notes["p0f"] = answer.notes()
        self._log.info(
            "{session} p0f: [{client}] os={os} flavor={flavor} distance={distance} link={link}",
            session=session.id,
            client=session.clientAddress,
            os=answer.os or "?",
            flavor=answer.flavor or "?",
            distance=answer.distance,
            link=answer.link or "?",
        )
        for rule in self.rules:
            if rule.matches(answer):
                return rule.verdict(answer)
        return Verdict.accept()

    def _failed(self, failure: Failure, session: Session) -> Verdict:
        """p0f is advisory: its absence or nonsense never holds mail up."""
        failure.trap(FilterError, error.ConnectionLost, error.ConnectionDone)
        self._log.warn(
            "{session} p0f: no answer for [{client}] ({why}); accepted",
            session=session.id,
            client=session.clientAddress,
            why=str(failure.value) or type(failure.value).__name__,
        )
        return Verdict.accept()


@implementer(IPlugin, IFilterFactory)
class P0fFilterFactory:
    name = "p0f"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        path = o.string("socket", DEFAULT_SOCKET)
        checkSocketPath("socket", path)
        built = P0fFilter(
            client=P0fClient(
                path=path,
                reactor=reactor,
                timeout=o.number("query_timeout", DEFAULT_QUERY_TIMEOUT, minimum=0.001),
            ),
            rules=_rules(o),
        )
        o.finish()
        return built
