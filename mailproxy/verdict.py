"""
What filters answer: the stages they are asked at, and the L{Verdict}.

Pure values, with no Twisted: the session core (L{mailproxy.session}) reads them too.
L{mailproxy.filters} re-exports every name here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

import attrs


class Stage(enum.Enum):
    """The points of an SMTP session at which filters are asked."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    MESSAGE = "message"


class Action(enum.Enum):
    ACCEPT = "accept"
    #: Accept, and trust the session: later filters are skipped for the rest of it,
    #: but those that declare C{always = True} (a virus scanner).
    ALLOW = "allow"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class InvalidVerdictError(ValueError):
    """A verdict whose code contradicts its action: a bug in the filter that made it."""


_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
#: A header field name (RFC 5322 section 3.6.8: printable US-ASCII but the colon).
_FIELD_NAME = re.compile(r"[!-9;-~]+")


#: What picks the fields a removal removes, by their unfolded value: a pattern to search,
#: or a predicate (for what no regular expression reads, as nested comments).
Matching = re.Pattern[str] | Callable[[str], bool]


class EditKind(enum.Enum):
    """What a L{HeaderEdit} does to the released message's header block."""

    #: Prepend a new field (on top, below mailproxy's own trace header).
    ADD = "add"
    #: Remove the chosen fields of that name.
    REMOVE = "remove"
    #: Change the value of the chosen fields in place; when there is none, add one.
    REPLACE = "replace"


@attrs.frozen
class HeaderEdit:
    """
    A change to the message's header block that a filter asks for, applied on release
    while the spool is streamed to the MTA (the body is never touched).

    Removals and replacements see the fields the client sent, not those other filters
    add. Build one with L{add}, L{remove} or L{replace}; it is checked when made.

    @ivar occurrence: which fields of C{name}: 0 every one; N > 0 the Nth from the top;
        N < 0 the Nth from the bottom (milter's and rspamd's convention).
    @ivar matching: for L{EditKind.REMOVE}, only the fields whose unfolded value this
        pattern searches successfully, or this predicate holds of.
    """

    kind: EditKind
    name: str
    value: str | None = None
    occurrence: int = 0
    matching: Matching | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        if not _FIELD_NAME.fullmatch(self.name):
            raise InvalidVerdictError(f"not a header field name: {self.name!r}")
        if (self.value is None) != (self.kind is EditKind.REMOVE):
            raise InvalidVerdictError(f"{self.kind.value} {self.name}: value {self.value!r}")
        if self.value is not None and any(c in self.value for c in "\r\n\0"):
            raise InvalidVerdictError(f"{self.name}: a value holds no CR, LF or NUL")
        if self.matching is not None and self.kind is not EditKind.REMOVE:
            raise InvalidVerdictError("only a removal matches values")

    @classmethod
    def add(cls, name: str, value: str) -> HeaderEdit:
        return cls(EditKind.ADD, name, value)

    @classmethod
    def remove(
        cls, name: str, occurrence: int = 0, matching: Matching | None = None
    ) -> HeaderEdit:
        return cls(EditKind.REMOVE, name, None, occurrence, matching)

    @classmethod
    def replace(cls, name: str, value: str, occurrence: int = 0) -> HeaderEdit:
        return cls(EditKind.REPLACE, name, value, occurrence)


def _checkVerdict(verdict: Verdict) -> None:
    action, code, enhanced = verdict.action, verdict.code, verdict.enhanced
    for name, _ in verdict.headers:
        if not _FIELD_NAME.fullmatch(name):
            raise InvalidVerdictError(f"not a header field name: {name!r}")
    if action in (Action.ACCEPT, Action.ALLOW):
        if code is not None or enhanced is not None or verdict.text:
            raise InvalidVerdictError(f"{action.value} carries no code or text: {verdict!r}")
        return
    if verdict.headers or verdict.edits:
        raise InvalidVerdictError(f"{action.value} changes no header: {verdict!r}")
    wanted = 5 if action is Action.REJECT else 4
    if not isinstance(code, int) or code // 100 != wanted or not 0 <= code % 100 <= 99:
        raise InvalidVerdictError(f"{action.value} needs a {wanted}xx code, not {code!r}")
    if enhanced is None or not _ENHANCED.fullmatch(enhanced) or int(enhanced[0]) != wanted:
        raise InvalidVerdictError(
            f"{action.value} needs a {wanted}.x.x enhanced code, not {enhanced!r}"
        )
    if not isinstance(verdict.text, str) or not verdict.text.strip():
        raise InvalidVerdictError(f"{action.value} needs a text for the client")


@attrs.frozen
class Verdict:
    """
    A filter's answer: accept (optionally adding headers), allow, reject, or tempfail.

    Build it with L{accept}, L{allow}, L{reject} or L{tempfail}. It is checked when made:
    a reject carries a 5xx code and a 5.x.x enhanced code, a tempfail 4xx and 4.x.x, and
    accept and allow no code at all, so that no verdict can tell the client "250" for a
    message the MTA never saw.

    @ivar headers: C{(name, value)} pairs to prepend to the message on release.
    @ivar edits: L{HeaderEdit}s to apply on release, after C{headers} (message stage).
    @raise InvalidVerdictError: on construction, when the code contradicts the action.
    """

    action: Action
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    edits: tuple[HeaderEdit, ...] = ()
    #: The filter that refused, set by the pipeline (for the logs, the counters and the
    #: quarantine); not part of the verdict's value.
    filter: str | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        _checkVerdict(self)

    @classmethod
    def accept(
        cls, headers: tuple[tuple[str, str], ...] = (), edits: tuple[HeaderEdit, ...] = ()
    ) -> Verdict:
        return cls(Action.ACCEPT, headers=headers, edits=edits)

    @classmethod
    def allow(
        cls, headers: tuple[tuple[str, str], ...] = (), edits: tuple[HeaderEdit, ...] = ()
    ) -> Verdict:
        return cls(Action.ALLOW, headers=headers, edits=edits)

    @classmethod
    def reject(cls, text: str, code: int = 550, enhanced: str = "5.7.1") -> Verdict:
        return cls(Action.REJECT, code, enhanced, text)

    @classmethod
    def tempfail(cls, text: str, code: int = 451, enhanced: str = "4.7.1") -> Verdict:
        return cls(Action.TEMPFAIL, code, enhanced, text)

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL)
