"""
Asking a local daemon one question per connection: spamd and clamd (the spooled message
streamed to them), p0f (a fixed-size query).

L{ask} connects, maps the connection errors and waits for the answer; L{StreamingQuery}
is the protocol spamd and clamd share: a request, the spool file sent by a L{FileSender}
(so the message is never read whole into memory), then an answer read into a bounded
buffer and parsed by pure code as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Generic, TypeVar

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mailproxy.envelope import Message
from mailproxy.filters import FilterError

T = TypeVar("T")


def shown(data: bytes) -> str:
    """Bytes from the wire, safe and short enough for a log line or an SMTP reply."""
    text = data[:200].decode("ascii", "backslashreplace")
    return "".join(c if c.isprintable() else "?" for c in text)


async def ask(
    endpoint: IStreamClientEndpoint,
    daemon: str,
    makeProtocol: Callable[[Deferred[T]], Protocol],
) -> T:
    """
    Connect to a daemon with a protocol made for one question, and wait for its answer.

    Cancelling (a timeout) while connecting is a L{CancelledError}, which the pipeline's
    timeout turns into a C{TimeoutError}; cancelling while waiting aborts the connection.

    @param daemon: the daemon and its address, for the error (C{"spamd at unix:/..."}).
    @param makeProtocol: builds the protocol that fires the given Deferred with the answer.
    @raise FilterError: the daemon cannot be reached.
    """
    protocol: Protocol | None = None

    def cancel(d: Deferred[T]) -> None:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]

    answer: Deferred[T] = Deferred(cancel)
    protocol = makeProtocol(answer)
    try:
        await connectProtocol(endpoint, protocol)
    except error.ConnectingCancelledError:
        raise CancelledError() from None
    except (error.ConnectError, OSError) as e:
        raise FilterError(f"{daemon} unreachable: {e}") from e
    return await answer


class StreamingQuery(Protocol, Generic[T]):
    """
    One exchange with a scanning daemon: C{prefix}, the spooled message (each block passed
    through C{transform}), C{suffix}; then the answer, handed to C{parse} as it grows until
    C{parse} returns it, raises L{FilterError}, or it is over C{maxAnswer} bytes.

    A daemon that answers before it has read the whole message (an error, a size limit) is
    not sent the rest: the connection is aborted. The spool file is closed with the
    connection.
    """

    def __init__(
        self,
        message: Message,
        answer: Deferred[T],
        parse: Callable[[bytes, bool], T | None],
        *,
        daemon: str,
        maxAnswer: int,
        prefix: bytes = b"",
        suffix: bytes = b"",
        transform: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """
        @param parse: C{parse(data, closed)}: the answer in C{data}, or C{None} while it is
            incomplete and the daemon has not C{closed} the connection.
        @param daemon: the daemon's name, for errors.
        """
        self._message = message
        self._answer = answer
        self._parse = parse
        self._daemon = daemon
        self._maxAnswer = maxAnswer
        self._prefix = prefix
        self._suffix = suffix
        self._transform = transform
        self._buffer = bytearray()
        self._files = ExitStack()
        self._sender: FileSender | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        try:
            spool = self._files.enter_context(self._message.open())
        except OSError as e:
            self._answer.errback(FilterError(f"cannot read the spooled message: {e}"))
            self.abort()
            return
        self.transport.write(self._prefix)
        self._sender = FileSender()
        sent = self._sender.beginFileTransfer(spool, self.transport, self._transform)
        sent.addCallback(self._sent).addErrback(self._notSent)

    def _sent(self, lastByte: object) -> None:
        self._sender = None
        if self._suffix:
            assert self.transport is not None
            self.transport.write(self._suffix)

    def _notSent(self, failure: Failure) -> None:
        # The connection went away mid-stream (FileSender.stopProducing): the answer, or
        # its absence, is settled in connectionLost.
        self._sender = None

    def dataReceived(self, data: bytes) -> None:
        if self._answer.called:
            return
        self._buffer += data
        if len(self._buffer) > self._maxAnswer:
            tooLong = FilterError(f"{self._daemon}'s answer is over {self._maxAnswer} bytes")
            self._settle(Failure(tooLong))
            return
        try:
            answer = self._parse(bytes(self._buffer), False)
        except FilterError:
            self._settle(Failure())
            return
        if answer is not None:
            self._settle(answer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._files.close()
        if self._answer.called:
            return
        try:
            answer = self._parse(bytes(self._buffer), True)
        except FilterError:
            self._answer.errback()
        else:
            assert answer is not None
            self._answer.callback(answer)

    def abort(self) -> None:
        """Give up: drop the connection (the answer is no longer awaited)."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _settle(self, result: T | Failure) -> None:
        assert self.transport is not None
        if self._sender is not None:
            # The daemon answered before reading the whole message: stop sending.
            self.abort()
        else:
            self.transport.loseConnection()
        if isinstance(result, Failure):
            self._answer.errback(result)
        else:
            self._answer.callback(result)
