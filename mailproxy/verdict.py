"""
What filters answer: the stages they are asked at, and the L{Verdict}.

Pure values, with no Twisted: the session core (L{mailproxy.session}) reads them too.
L{mailproxy.filters} re-exports every name here.
"""

from __future__ import annotations

import enum
import re

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


def _checkVerdict(verdict: Verdict) -> None:
    action, code, enhanced = verdict.action, verdict.code, verdict.enhanced
    if action in (Action.ACCEPT, Action.ALLOW):
        if code is not None or enhanced is not None or verdict.text:
            raise InvalidVerdictError(f"{action.value} carries no code or text: {verdict!r}")
        return
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
    @raise InvalidVerdictError: on construction, when the code contradicts the action.
    """

    action: Action
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    #: The filter that refused, set by the pipeline (for the logs, the counters and the
    #: quarantine); not part of the verdict's value.
    filter: str | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        _checkVerdict(self)

    @classmethod
    def accept(cls, headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        return cls(Action.ACCEPT, headers=headers)

    @classmethod
    def allow(cls, headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        return cls(Action.ALLOW, headers=headers)

    @classmethod
    def reject(cls, text: str, code: int = 550, enhanced: str = "5.7.1") -> Verdict:
        return cls(Action.REJECT, code, enhanced, text)

    @classmethod
    def tempfail(cls, text: str, code: int = 451, enhanced: str = "4.7.1") -> Verdict:
        return cls(Action.TEMPFAIL, code, enhanced, text)

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL)
