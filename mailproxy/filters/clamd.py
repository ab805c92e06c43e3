"""
The clamd filter: ClamAV's verdict on each message, asked of clamd with C{zINSTREAM}.

The message is streamed from the spool in chunks (a 4-byte big-endian length, then the data;
a zero-length chunk ends the stream), over TCP or a UNIX socket; it is never read whole into
memory. A virus is refused with C{550 5.7.1 Virus found: NAME}; clamd's errors (its
C{StreamMaxLength} exceeded, a scan error) and an unreachable clamd are filter errors, handled
by C{on_error}. The filter runs even in sessions an allow-list has trusted (C{always}).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from functools import partial

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, FilterError, IFilter, IFilterFactory, Stage, Verdict
from mailproxy.filters.daemon import StreamingQuery, ask, shown
from mailproxy.filters.options import Options
from mailproxy.filters.support import tooLarge

#: The command: "z" makes clamd end its reply with a NUL rather than a newline.
COMMAND = b"zINSTREAM\0"
#: The zero-length chunk that ends the stream.
END_OF_STREAM = b"\0\0\0\0"
#: Debian's clamd listens here (clamd.conf's LocalSocket).
DEFAULT_ENDPOINT = "unix:/run/clamav/clamd.ctl"
#: The longest reply we keep reading: clamd's are one short line.
MAX_REPLY = 4096

_FOUND = re.compile(r"stream: (.+) FOUND")
_CHUNK_LENGTH = struct.Struct(">I")


@attrs.frozen
class ClamdAnswer:
    """What clamd said of one message: the virus found, or C{None} when clean."""

    virus: str | None
    reply: str


def chunk(data: bytes) -> bytes:
    """One INSTREAM chunk: the length of C{data} (4 bytes, big-endian), then C{data}."""
    return _CHUNK_LENGTH.pack(len(data)) + data


def parseReply(data: bytes, closed: bool) -> ClamdAnswer | None:
    """
    Parse clamd's reply to zINSTREAM, pure code: C{None} while it is incomplete.

    C{stream: OK} is clean, C{stream: NAME FOUND} a virus; anything ending in C{ERROR}
    (C{INSTREAM size limit exceeded. ERROR}, C{stream: ... ERROR}) or unexpected is a
    L{FilterError}.

    @param closed: whether clamd has closed the connection (nothing more will come).
    """
    line, nul, _ = data.partition(b"\0")
    if not nul:
        if not closed:
            return None
        if not data:
            raise FilterError("clamd closed the connection without answering")
        line = data.rstrip(b"\r\n")  # a reply ended by a newline: take it as it is
    reply = shown(line)
    if reply == "stream: OK":
        return ClamdAnswer(None, reply)
    found = _FOUND.fullmatch(reply)
    if found is not None:
        return ClamdAnswer(found.group(1), reply)
    if reply.endswith("ERROR"):
        raise FilterError(f"clamd answered: {reply}")
    raise FilterError(f"clamd answered something unexpected: {reply}")


class _ClamdProtocol(StreamingQuery[ClamdAnswer]):
    """One zINSTREAM exchange: the command, the message in chunks, the reply."""

    def __init__(self, message: Message, answer: Deferred[ClamdAnswer]) -> None:
        super().__init__(
            message,
            answer,
            parseReply,
            daemon="clamd",
            maxAnswer=MAX_REPLY,
            prefix=COMMAND,
            suffix=END_OF_STREAM,
            transform=chunk,
        )


@attrs.frozen
class ClamdClient:
    """
    Asks clamd about messages, one connection per message.

    @ivar address: the endpoint string, for messages.
    """

    endpoint: IStreamClientEndpoint
    address: str

    def scan(self, message: Message) -> Deferred[ClamdAnswer]:
        """
        Stream C{message} to clamd and fire with its answer.

        @raise FilterError: (asynchronously) clamd cannot be reached, answered an error or
            something unexpected.
        """
        return Deferred.fromCoroutine(
            ask(self.endpoint, f"clamd at {self.address}", partial(_ClamdProtocol, message))
        )


@implementer(IFilter)
@attrs.frozen
class ClamdFilter(BaseFilter):
    """Refuses messages in which clamd finds a virus."""

    client: ClamdClient
    #: Messages larger than this are not scanned; 0: every message is.
    maxSize: int = 0
    name = "clamd"
    stages = frozenset({Stage.MESSAGE})
    always = True
    _log = Logger()

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        if tooLarge(self._log, self.name, session, message, self.maxSize):
            return succeed(Verdict.accept())
        return self.client.scan(message).addCallback(self._verdict, session)

    def _verdict(self, answer: ClamdAnswer, session: Session) -> Verdict:
        self._log.info("{session} clamd: {reply}", session=session.id, reply=answer.reply)
        if answer.virus is not None:
            return Verdict.reject(f"Virus found: {answer.virus}")
        return Verdict.accept()


@implementer(IPlugin, IFilterFactory)
class ClamdFilterFactory:
    name = "clamd"

    def build(self, options: Mapping[str, object], reactor: IReactorTime) -> IFilter:
        o = Options(options)
        address = o.string("clamd", DEFAULT_ENDPOINT)
        built = ClamdFilter(
            client=ClamdClient(o.endpoint("clamd", DEFAULT_ENDPOINT, reactor), address),
            maxSize=o.integer("max_size", 0),
        )
        o.finish()
        return built
