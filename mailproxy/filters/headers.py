"""
The headers filter: refuses messages by regular expressions on their header fields, and
adds the one C{Authentication-Results} header (RFC 8601) that gathers what the other
filters found (C{envelope.notes["authentication-results"]}).

It reads only the message's own (top-level) header block, bounded, in the reactor's
thread pool, by the header grammar the session checked it with
(L{mailproxy.headergrammar}); a block that grammar refuses (which only a message that
did not come through the session can have) is refused here too, 554 5.6.0. It runs at the message stage and must be the last filter configured: it
reports the results of the filters before it.

The one C{Authentication-Results} field gathers every method result the filters before
it noted (spf, dkim per signature, dmarc, arc, ...), deduplicated, in the order noted;
the release folds it to 78 columns, after a C{";"} between results where it can (RFC
8601 section 2.2).

RFC 8601 section 5: a receiver trusts an C{Authentication-Results} field that carries its
own authserv-id, so one that arrives with the message, claiming that id, is forged (or
left from an earlier pass), and must be deleted. By default (C{forged_results =
"remove"}) the filter asks the release to remove every such field (a L{HeaderEdit}
matching our authserv-id in the field's value, in any case, comments skipped: the
reading of L{authservId}), and logs that it did; fields of other authserv-ids stay. With
C{"reject"} such a message is refused (550 5.7.1); with C{"accept"} it goes through as it
came, with a warning: then only the topmost field (ours) is to be trusted downstream.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    BaseFilter,
    HeaderEdit,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)
from mailproxy.filters.options import Options, reKeyed
from mailproxy.filters.support import (
    DEFAULT_MAX_HEADER_BYTES,
    AmbiguousHeaderError,
    LineReader,
    MimeStructureError,
    decodeText,
    inThreadPool,
    parseHeaders,
    readHeaderBlock,
    requireThreads,
    stripComments,
)

AUTHENTICATION_RESULTS = "Authentication-Results"
# An authserv-id as this filter accepts it: a domain-like token (RFC 8601 allows a
# quoted string too, which nobody uses).
_AUTHSERV_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\Z")


class ForgedResults(enum.Enum):
    """C{forged_results}: what to do with a message's fields that claim our authserv-id."""

    REMOVE = "remove"
    REJECT = "reject"
    ACCEPT = "accept"


@attrs.frozen
class Rule:
    """Refuse a message whose C{header} field (any of them) matches C{pattern}."""

    header: str
    pattern: re.Pattern[str]
    text: str


@attrs.frozen
class _Findings:
    refusal: Verdict | None
    forged: tuple[str, ...]


def authservId(value: str) -> str:
    """
    The authserv-id of an C{Authentication-Results} value, lower case: its first word
    once quotes are opened and comments (nested too, as RFC 5322 reads them) skipped.
    """
    bare = stripComments(value, keepQuoted=True).strip()
    return re.split(r"[\s;]", bare, maxsplit=1)[0].strip('"').lower()


def claiming(authserv: str) -> Callable[[str], bool]:
    """
    Whether an C{Authentication-Results} value claims C{authserv} (as L{authservId}
    reads it): the release's removal (L{HeaderEdit.remove}'s C{matching}).
    """
    ours = authserv.lower()
    return lambda value: authservId(value) == ours


def resultsValue(authserv: str, results: object) -> str:
    """
    The value of the C{Authentication-Results} field: C{authserv; r1; r2} or
    C{authserv; none}, from the method results other filters noted.
    """
    found: list[str] = []
    if isinstance(results, list | tuple):
        for result in results:
            text = " ".join(str(result).split()).strip("; ")
            if text and text not in found:
                found.append(text)
    return f"{authserv}; " + ("; ".join(found) if found else "none")


@implementer(IFilter)
@attrs.frozen
class HeadersFilter(BaseFilter):
    """
    Refuses (550 5.7.1) a message whose header matches a rule; else adds the one
    C{Authentication-Results}, and has the forged ones removed (or refuses or keeps the
    message, as C{forgedResults} says).
    """

    authservId: str
    rules: tuple[Rule, ...] = ()
    addResults: bool = True
    forgedResults: ForgedResults = ForgedResults.REMOVE
    maxHeaderBytes: int = DEFAULT_MAX_HEADER_BYTES
    always: bool = True
    #: The reactor whose thread pool the blocking read runs in (L{inThreadPool}).
    threads: IReactorThreads = attrs.field(kw_only=True, eq=False)
    name = "headers"
    stages = frozenset({Stage.MESSAGE})

    _log = Logger()

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Deferred[Verdict]:
        def decide(findings: _Findings) -> Verdict:
            if findings.refusal is not None:
                return findings.refusal
            edits: tuple[HeaderEdit, ...] = ()
            if findings.forged:
                removing = self.forgedResults is ForgedResults.REMOVE
                self._log.warn(
                    "{session} headers: the message carries Authentication-Results with our "
                    "authserv-id {authserv}{removed}: {values}",
                    session=session.id,
                    authserv=self.authservId,
                    removed=" (removed on release)" if removing else "",
                    values=list(findings.forged),
                )
                if self.forgedResults is ForgedResults.REJECT:
                    return Verdict.reject(
                        f"Message carries a forged {AUTHENTICATION_RESULTS} header "
                        f"({self.authservId})"
                    )
                if removing:
                    edits = (
                        HeaderEdit.remove(
                            AUTHENTICATION_RESULTS, matching=claiming(self.authservId)
                        ),
                    )
            if not self.addResults:
                return Verdict.accept(edits=edits)
            value = resultsValue(self.authservId, envelope.notes.get("authentication-results"))
            return Verdict.accept(headers=((AUTHENTICATION_RESULTS, value),), edits=edits)

        return inThreadPool(self.threads, self.examine, message).addCallback(decide)

    def examine(self, message: Message) -> _Findings:
        """Read the header block (blocking); the first rule it breaks, and forged fields."""
        with message.open() as f:
            try:
                block = readHeaderBlock(LineReader(f), self.maxHeaderBytes)
            except AmbiguousHeaderError as e:
                # Only a message that did not come through the session gets here.
                return _Findings(Verdict.reject(e.text, 554, "5.6.0"), ())
            except MimeStructureError:
                text = f"Message header block too large (limit {self.maxHeaderBytes} bytes)"
                return _Findings(Verdict.reject(text, 554, "5.6.0"), ())
        fields = parseHeaders(block)
        forged = []
        ours = self.authservId.lower()
        for name, value in fields:
            if name.lower() == AUTHENTICATION_RESULTS.lower() and authservId(value) == ours:
                forged.append(decodeText(value))
        for rule in self.rules:
            for name, value in fields:
                if name.lower() == rule.header and rule.pattern.search(decodeText(value)):
                    return _Findings(Verdict.reject(rule.text), tuple(forged))
        return _Findings(None, tuple(forged))


def _rule(table: Mapping[str, object]) -> Rule:
    o = Options(table)
    header = o.string("header").strip()
    if not header or ":" in header or any(c.isspace() for c in header):
        raise OptionError("header", f"not a header field name: {header!r}")
    source = o.string("pattern")
    try:
        pattern = re.compile(source)
    except re.error as e:
        raise OptionError("pattern", f"not a regular expression: {e}") from None
    text = o.string("text", f"Message refused: {header} header refused by policy")
    o.finish()
    return Rule(header.lower(), pattern, text)


@implementer(IPlugin, IFilterFactory)
class HeadersFilterFactory:
    name = "headers"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        authserv = o.string("authserv_id")
        if not _AUTHSERV_ID.match(authserv):
            raise OptionError("authserv_id", f"not a host-name-like token: {authserv!r}")
        rules = []
        for index, table in enumerate(o.tables("reject")):
            try:
                rules.append(_rule(table))
            except OptionError as e:
                raise reKeyed(e, f"reject[{index}]") from None
        built = HeadersFilter(
            authservId=authserv,
            rules=tuple(rules),
            addResults=o.boolean("authentication_results", True),
            forgedResults=ForgedResults(
                o.choice("forged_results", tuple(f.value for f in ForgedResults), "remove")
            ),
            maxHeaderBytes=o.integer("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, minimum=1024),
            always=o.boolean("always", True),
            threads=requireThreads(reactor),
        )
        o.finish()
        return built
