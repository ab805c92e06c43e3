"""
mailproxy's own SMTP replies, named, and the reasons it refuses.

An L{Answer} is a reply before it knows its session: the code, the RFC 3463 enhanced code
and the text. The session renders it (L{Answer.render}) with or without the enhanced code,
as the client's EHLO exchange allows (RFC 2034), and with the host name in a closing 421.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from mailproxy.wire import Reply


@attrs.frozen
class Answer:
    """
    One of our replies: C{Answer(550, "5.7.1", "Refused")}.

    @ivar closing: a reply the connection is closed after (421): its text starts with our
        host name, as RFC 5321 section 3.8 asks.
    """

    code: int
    enhanced: str
    text: str
    closing: bool = False

    def render(self, hostname: str, enhanced: bool) -> Reply:
        """The reply as the client gets it."""
        parts = [self.enhanced] if enhanced and self.enhanced else []
        if self.closing:
            parts.append(hostname)
        parts.append(self.text.replace("\r", " ").replace("\n", " "))
        return Reply(self.code, (" ".join(parts).encode("utf-8", "replace"),))


def closing(enhanced: str, text: str) -> Answer:
    return Answer(421, enhanced, text, closing=True)


def greeting(hostname: str) -> Reply:
    """Our own banner (C{proxy.greeting = "own"}), as Postfix's C{smtpd_banner} begins."""
    return Reply(220, (f"{hostname} ESMTP".encode("utf-8", "replace"),))


# Commands.
START_INPUT: Final = Answer(354, "", "End data with <CR><LF>.<CR><LF>")
LINE_TOO_LONG: Final = Answer(500, "5.5.2", "Error: line too long")
BAD_CHARACTER: Final = Answer(500, "5.5.2", "Error: bad character in command")
UNRECOGNISED: Final = Answer(502, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED: Final = Answer(502, "5.5.1", "Error: command not implemented")
SYNTAX_HELO: Final = Answer(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_MAIL: Final = Answer(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT: Final = Answer(501, "5.5.4", "Syntax: RCPT TO:<address>")
NO_ARGUMENTS: Final = Answer(501, "5.5.4", "Syntax error: no arguments allowed")
BAD_PARAMETER: Final = Answer(555, "5.5.4", "Error: unsupported or malformed parameter")
NEED_MAIL: Final = Answer(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL: Final = Answer(503, "5.5.1", "Error: nested MAIL command")
NO_RECIPIENTS: Final = Answer(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS: Final = Answer(452, "4.5.3", "Error: too many recipients")
# BDAT (RFC 3030).
SYNTAX_BDAT: Final = Answer(501, "5.5.4", "Syntax: BDAT count [LAST]")
CHUNKS_IN_PROGRESS: Final = Answer(503, "5.5.1", "Error: BDAT transaction in progress")
CHUNKS_FAILED: Final = Answer(503, "5.5.1", "Error: the BDAT transaction failed, send RSET")
BINARY_NEEDS_BDAT: Final = Answer(503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT")
BINARY_UNAVAILABLE: Final = Answer(554, "5.6.3", "Error: BODY=BINARYMIME cannot be relayed now")


def chunkReceived(size: int) -> Answer:
    """Our reply to a BDAT chunk that is not the last."""
    return Answer(250, "2.0.0", f"Ok: {size} octets received")


# The message.
TOO_BIG: Final = Answer(552, "5.3.4", "Error: message size exceeds fixed limit")
BARE_LINE_ENDING: Final = Answer(554, "5.6.0", "Error: bare CR or LF in message content")
NUL_CHARACTER: Final = Answer(554, "5.6.0", "Error: NUL character in message content")


def headerSyntax(text: str) -> Answer:
    """Our refusal of an ambiguous header block (L{mailproxy.headergrammar.Finding.text})."""
    return Answer(554, "5.6.0", text)


SPOOL_FAILED: Final = Answer(452, "4.3.1", "Error: insufficient system storage")
# The session.
OK: Final = Answer(250, "2.0.0", "Ok")
#: QUIT answered by mailproxy: before the MTA leg exists (C{greeting = "own"}).
BYE: Final = Answer(221, "2.0.0", "Bye")
#: The client sent before the banner (postscreen's pregreet test, Haraka's early_talker).
EARLY_TALKER: Final = Answer(554, "5.5.0", "Error: talking before the greeting")
NEED_HELO: Final = Answer(503, "5.5.1", "Error: send HELO/EHLO first")
IN_TRANSACTION: Final = Answer(503, "5.5.1", "Error: MAIL transaction in progress")
READY_FOR_TLS: Final = Answer(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE: Final = Answer(503, "5.5.1", "Error: TLS already active")
TLS_REQUIRED: Final = Answer(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_NOT_ENABLED: Final = Answer(503, "5.5.1", "Error: authentication not enabled")
AUTH_NEEDS_TLS: Final = Answer(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_ALREADY: Final = Answer(503, "5.5.1", "Error: already authenticated")
SYNTAX_AUTH: Final = Answer(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM: Final = Answer(504, "5.5.4", "Error: unsupported authentication mechanism")
AUTH_BASE64: Final = Answer(501, "5.5.2", "Error: invalid base64 data")
AUTH_FAILURES: Final = closing("4.7.0", "Error: too many failed authentication attempts")
MTA_TLS_FAILED: Final = closing("4.7.0", "Error: no secure connection to the MTA, try again later")
MTA_INTRODUCTION: Final = closing(
    "4.3.0", "Error: the MTA refused to hear the client, try again later"
)
MTA_UNREACHABLE: Final = closing("4.3.2", "Service not available, try again later")
MTA_LOST: Final = closing("4.4.2", "Error: lost connection to the MTA")
MTA_SILENT: Final = closing("4.4.2", "Error: the MTA did not answer")
MTA_CONFUSED: Final = Answer(451, "4.3.0", "Error: the MTA answered out of turn, try again later")
INTERNAL_ERROR: Final = closing("4.3.0", "Error: internal error, try again later")
IDLE: Final = closing("4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN: Final = closing("4.3.2", "Service shutting down")
TOO_MANY_CONNECTIONS: Final = closing("4.7.0", "Error: too many connections")
TOO_MANY_FROM_YOU: Final = closing("4.7.0", "Error: too many connections from you")
# The session's own limits (C{[limits]} errors, commands, min_data_rate; C{[timeouts]}
# command, session).
TOO_MANY_ERRORS: Final = closing("4.7.0", "Error: too many errors")
TOO_MANY_COMMANDS: Final = closing("4.7.0", "Error: too many commands")
COMMAND_TIMEOUT: Final = closing("4.4.2", "Error: command not completed in time")
SESSION_TIMEOUT: Final = closing("4.4.2", "Error: session time limit exceeded")
DATA_TOO_SLOW: Final = closing("4.4.2", "Error: message data too slow")


class Reason(enum.Enum):
    """Why mailproxy itself refused (a filter's refusal is counted by the filter's name)."""

    CONNECTION_LIMIT = "connection limit"
    CLIENT_LIMIT = "client limit"
    MTA_DOWN = "mta down"
    #: The client sent before the banner.
    EARLY_TALKER = "early talker"
    #: The MTA's own refusal, relayed.
    MTA = "mta"
    RECIPIENT_LIMIT = "recipient limit"
    SIZE_LIMIT = "size limit"
    TLS_REQUIRED = "tls required"
    AUTH_FAILURES = "auth failures"
    #: No TLS to the MTA where upstream_tls requires it.
    MTA_TLS = "mta tls"
    #: The MTA offered XCLIENT and then refused it.
    XCLIENT = "xclient"
    BARE_LINE_ENDING = "bare line ending"
    NUL = "nul character"
    #: An ambiguous header block (C{header_syntax = "reject"}).
    HEADER_SYNTAX = "header syntax"
    SPOOL = "spool"
    SYNTAX = "syntax"
    #: A refusal of the filters whose filter is unknown (a stage timed out as a whole).
    FILTERS = "filters"
    # The session's limits, each of which closes it with 421 (L{mailproxy.stats.LIMITS}).
    ERROR_LIMIT = "error limit"
    COMMAND_LIMIT = "command limit"
    COMMAND_TIMEOUT = "command timeout"
    SESSION_TIMEOUT = "session timeout"
    DATA_RATE = "data rate"
