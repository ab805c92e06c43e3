"""
A stand-in MTA: a small SMTP server that accepts any recipient and stores what it gets.

It serves two purposes. Trying mailproxy out on a machine with no MTA: run it on the
proxy's upstream address and read the accepted mail in a Maildir. And the recording MTA
of the integration tests: it keeps every raw byte each connection sent it (before any
parsing) and every message it accepted, and has knobs to misbehave (refuse recipients,
die in the middle of DATA, hang after the data).

It is built on L{twisted.mail.smtp.ESMTP}: commands are read a line at a time and
dispatched by the stock code (HELO, MAIL, RCPT, the address parsing, the
L{IMessageDelivery} checks), but the message content is read as a byte stream, scanned a
whole buffer at a time for the end-of-data marker, so body lines have no length limit, a
100 MB message costs a few C-level scans per received chunk, and a mode switch takes
effect at the exact byte even when commands and content arrive in one chunk.

Differences from stock C{twisted.mail.smtp}, on purpose:
  - no C{Received:} header is added, and the body is stored exactly as received (stock
    code also inserts a blank line before a first line that has no colon);
  - one message (one queue id, one Maildir file) per transaction, listing all of its
    recipients, as a real MTA queues it, rather than one copy per recipient;
  - replies carry enhanced status codes (RFC 2034; we announce ENHANCEDSTATUSCODES) and
    the end-of-data reply is Postfix-like: C{250 2.0.0 Ok: queued as 1A2B3C4D5E};
  - every reply is written with one C{transport.write}.

Run it alone with C{python -m mailproxy.localmta --listen tcp:10025:interface=127.0.0.1
--maildir ./Maildir}.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import IO, TYPE_CHECKING, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import COMMAND, DATA, ESMTP, Address, SMTPBadRcpt, SMTPServerError, User
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.address import IPv4Address

__all__ = ["DEFAULT_EXTENSIONS", "LocalMTA", "ReceivedMessage", "main"]

#: The EHLO keywords announced unless told otherwise (an empty list: the bare keyword).
DEFAULT_EXTENSIONS: dict[bytes, list[bytes]] = {
    b"PIPELINING": [],
    b"8BITMIME": [],
    b"SIZE": [b"1000000000"],
    b"ENHANCEDSTATUSCODES": [],
}

#: The end-of-data marker, and the CRLF that precedes the first line of every message
#: (the one ending the DATA command): seeding the scanner with it puts every line start,
#: the first included, right after a CRLF.
_END_OF_DATA = b"\r\n.\r\n"
_LINE_START = b"\r\n"

_XTEXT = re.compile(rb"\+([0-9A-Fa-f]{2})")


@attrs.define
class ReceivedMessage:
    """
    One message the stand-in accepted.

    @ivar mailFrom: the envelope sender; C{""} for the null sender C{<>}.
    @ivar recipients: the accepted recipients, in RCPT order.
    @ivar content: the message as delivered: CRLF line endings, dot-stuffing removed, no
        header added (this server adds no C{Received:}). C{b""} when the L{LocalMTA}'s
        C{keepContent} was false.
    @ivar queueId: the id in the C{250 2.0.0 Ok: queued as ...} reply.
    @ivar size: the length of the content in bytes (counted even when it is not kept).
    @ivar path: the Maildir file (under C{new/}), or L{None} without a Maildir.
    @ivar helo: the HELO/EHLO argument of the connection at DATA time.
    @ivar xclient: the XCLIENT attributes received on the connection (names upper-cased,
        values xtext-decoded); empty unless XCLIENT is announced and was used.
    @ivar xforward: the same for XFORWARD.
    """

    mailFrom: str
    recipients: list[str]
    content: bytes
    queueId: str
    size: int = 0
    path: str | None = None
    helo: str = ""
    xclient: dict[str, str] = attrs.Factory(dict)
    xforward: dict[str, str] = attrs.Factory(dict)
    #: The connection's TLS was started (STARTTLS) before this message.
    tls: bool = False
    #: The login the connection authenticated as (AUTH), if any.
    login: str | None = None


class LocalMTA:
    """
    Shared state and knobs of the stand-in MTA; one per test or per process.

    Every knob is a plain attribute, read when it is needed, so a test may change it
    between (or during) connections.

    @ivar messages: the accepted messages, in order.
    @ivar transcripts: one per connection, in order of arrival: every raw byte the
        server received on it (empty if C{keepTranscripts} was false).
    @ivar extensions: the EHLO keywords announced, in order (an empty list announces the
        bare keyword). Edit it to announce more or fewer. Announcing a keyword does not
        implement it: only XCLIENT, XFORWARD and CHUNKING (BDAT, RFC 3030; the content
        kept as it came) are understood, and only when announced; STARTTLS answers 454
        unless L{tls} is set, AUTH 504 unless L{logins} are. Unannounced, BDAT gets 502.
    @ivar tls: the server side of STARTTLS (announce C{STARTTLS} too); L{None}: 454.
    @ivar logins: the users AUTH PLAIN and LOGIN accept (announce C{AUTH PLAIN LOGIN}),
        by name, with their passwords.
    @ivar refuseSenders: MAIL FROM for which it returns true gets C{553 5.7.1}.
    @ivar refuseRecipients: RCPT TO for which it returns true gets C{550 5.1.1}.
    @ivar refuseMessage: called at end-of-data with the message about to be accepted;
        a C{(code, text)} it returns is sent as the reply instead (e.g. C{(554, "5.7.1
        Spam")}) and the message is not stored; L{None} accepts it.
    @ivar dropAfterDataBytes: once this many bytes of a message's DATA stream (all
        bytes after the DATA command line, the final C{.CRLF} included) have been
        received without its end among them, the connection is aborted: no reply, no
        message. C{0} dies right after the 354. A message that ends within the count is
        accepted. (DATA only: BDAT chunks are not counted.)
    @ivar silentAfterData: never answer end-of-data, nor anything after it on that
        connection (a hung MTA); the message is discarded and the connection stays open
        until the peer closes it.
    @ivar keepContent: keep each message's bytes in L{ReceivedMessage.content}.
    @ivar keepTranscripts: record the raw bytes of each connection.
    @ivar idleTimeout: seconds of client silence before C{421 4.4.2} and close; only
        with a clock.
    """

    _log = Logger()

    def __init__(
        self,
        maildir: str | None = None,
        hostname: str = "localmta.invalid",
        extensions: dict[bytes, list[bytes]] | None = None,
        clock: IReactorTime | None = None,
        record: bool = True,
    ) -> None:
        """
        @param maildir: the Maildir to deliver to, created (with C{tmp}, C{new}, C{cur})
            if missing; L{None} writes no files.
        @param record: keep what it received (L{messages}, L{transcripts}, contents) for
            tests to look at; a long-running stand-in passes C{False}, so that its memory
            does not grow with the mail it takes.
        @param hostname: the name in the greeting and the EHLO reply.
        @param extensions: EHLO keywords added to (or replacing the arguments of)
            L{DEFAULT_EXTENSIONS}.
        @param clock: schedules the idle timeout; without one there is none.
        """
        self.maildir = maildir
        self.hostname = hostname
        self.extensions: dict[bytes, list[bytes]] = {
            keyword: list(args)
            for keyword, args in {**DEFAULT_EXTENSIONS, **(extensions or {})}.items()
        }
        self.clock = clock
        self.messages: list[ReceivedMessage] = []
        self.transcripts: list[bytearray] = []
        self.refuseSenders: Callable[[str], bool] | None = None
        self.refuseRecipients: Callable[[str], bool] | None = None
        self.refuseMessage: Callable[[ReceivedMessage], tuple[int, str] | None] | None = None
        self.dropAfterDataBytes: int | None = None
        self.silentAfterData = False
        self.tls: IOpenSSLServerConnectionCreator | None = None
        self.logins: dict[str, str] = {}
        self.record = record
        self.keepContent = record
        self.keepTranscripts = record
        self.idleTimeout = 300.0
        self._queueIds: set[str] = set()
        self._closed: set[int] = set()
        self._closeWaiters: dict[int, list[Deferred[bytes]]] = {}
        self._delivery = _Delivery(self)
        if maildir is not None:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)

    def buildFactory(self) -> ServerFactory:
        """A factory of server protocols sharing this state."""
        return _LocalMTAFactory(self)

    def listen(self, endpoint: IStreamServerEndpoint) -> Deferred[IListeningPort]:
        """Listen on C{endpoint}; fires with the port (its C{getHost()} has the address)."""
        return endpoint.listen(self.buildFactory())

    def whenClosed(self, index: int) -> Deferred[bytes]:
        """
        Wait for a connection to end, so a test can assert on a complete transcript.

        @param index: the connection, counted from 0 in order of arrival; it need not
            have arrived yet.
        @return: fires with the connection's transcript once it has closed.
        """
        if index in self._closed:
            return defer.succeed(bytes(self.transcripts[index]))
        d: Deferred[bytes] = Deferred()
        self._closeWaiters.setdefault(index, []).append(d)
        return d

    def _connectionOpened(self) -> tuple[int, bytearray]:
        transcript = bytearray()
        if not self.record:
            return -1, transcript
        self.transcripts.append(transcript)
        return len(self.transcripts) - 1, transcript

    def _connectionClosed(self, index: int) -> None:
        if not self.record:
            return
        self._closed.add(index)
        for d in self._closeWaiters.pop(index, []):
            d.callback(bytes(self.transcripts[index]))

    def _newQueueId(self) -> str:
        # Postfix-like short ids: ten uppercase hex digits, unique within this instance.
        while True:
            queueId = secrets.token_hex(5).upper()
            if not self.record:
                return queueId  # 40 random bits; remembering them all would grow forever
            if queueId not in self._queueIds:
                self._queueIds.add(queueId)
                return queueId

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def _accepted(self, message: ReceivedMessage) -> None:
        if self.record:
            self.messages.append(message)
        self._log.info(
            "queued as {queueId}: from=<{mailFrom}> to={recipients} size={size}",
            queueId=message.queueId,
            mailFrom=message.mailFrom,
            recipients=message.recipients,
            size=message.size,
        )


@implementer(IMessageSMTP)
class _Message:
    """
    One message being received: streamed to a Maildir C{tmp/} file (and memory, if
    kept), moved into C{new/} when accepted, removed otherwise.
    """

    def __init__(
        self,
        mta: LocalMTA,
        mailFrom: str,
        recipients: list[str],
        helo: str = "",
        xclient: dict[str, str] | None = None,
        xforward: dict[str, str] | None = None,
    ) -> None:
        self._mta = mta
        self.tls = False
        self.login: str | None = None
        self.queueId = mta._newQueueId()
        self._envelope = (mailFrom, recipients, helo, dict(xclient or {}), dict(xforward or {}))
        self._size = 0
        self._content: io.BytesIO | None = io.BytesIO() if mta.keepContent else None
        self._file: IO[bytes] | None = None
        self._name = ""
        if mta.maildir is not None:
            now = mta._now()
            # The Maildir way: a name unique to this host and moment, written in tmp/.
            host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
            self._name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{self.queueId}.{host}"
            fd = os.open(
                os.path.join(mta.maildir, "tmp", self._name),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                0o600,
            )
            self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        """Store a piece of the content (CRLF lines, already un-stuffed)."""
        self._size += len(data)
        if self._file is not None:
            self._file.write(data)
        if self._content is not None:
            self._content.write(data)

    def lineReceived(self, line: bytes) -> None:
        """L{IMessageSMTP}: store one line, without its CRLF."""
        self.write(line + b"\r\n")

    def eomReceived(self) -> Deferred[ReceivedMessage]:
        """
        L{IMessageSMTP}: the content is complete; accept the message unless the
        L{LocalMTA}'s C{refuseMessage} says otherwise.

        @return: fires with the accepted message, or fails with L{SMTPServerError}
            carrying the refusal.
        """
        mailFrom, recipients, helo, xclient, xforward = self._envelope
        received = ReceivedMessage(
            mailFrom=mailFrom,
            recipients=recipients,
            content=self._content.getvalue() if self._content is not None else b"",
            queueId=self.queueId,
            size=self._size,
            helo=helo,
            xclient=xclient,
            xforward=xforward,
            tls=self.tls,
            login=self.login,
        )
        self._content = None
        refuse = self._mta.refuseMessage
        verdict = refuse(received) if refuse is not None else None
        if verdict is not None:
            self.connectionLost()
            code, text = verdict
            return defer.fail(SMTPServerError(code, text))
        if self._file is not None and self._mta.maildir is not None:
            self._file.close()
            self._file = None
            received.path = os.path.join(self._mta.maildir, "new", self._name)
            os.rename(os.path.join(self._mta.maildir, "tmp", self._name), received.path)
        self._mta._accepted(received)
        return defer.succeed(received)

    def connectionLost(self) -> None:
        """L{IMessageSMTP}: the message will not be accepted; forget it."""
        self._content = None
        if self._file is not None and self._mta.maildir is not None:
            self._file.close()
            self._file = None
            os.unlink(os.path.join(self._mta.maildir, "tmp", self._name))


@implementer(IMessageDelivery)
class _Delivery:
    """Accepts any sender and recipient, unless the L{LocalMTA}'s knobs refuse them."""

    def __init__(self, mta: LocalMTA) -> None:
        self._mta = mta

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: Address, recipients: Sequence[User]
    ) -> None:
        """No C{Received:} header: the content is kept exactly as the client sent it."""
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        """Accept the sender unless C{refuseSenders} refuses it (553 5.7.1)."""
        refuse = self._mta.refuseSenders
        sender = _text(origin)
        if refuse is not None and refuse(sender):
            raise SMTPServerError(553, f"5.7.1 <{sender}>: Sender address rejected: Access denied")
        return origin

    def validateTo(self, user: User) -> Callable[[], _Message]:
        """
        Accept the recipient unless C{refuseRecipients} refuses it (550 5.1.1).

        @return: what L{IMessageDelivery} asks for, a factory of a message for this
            recipient alone. The stand-in's own protocol does not call it: it makes one
            message per transaction with L{newMessage}.
        """
        refuse = self._mta.refuseRecipients
        recipient = _text(user.dest)
        if refuse is not None and refuse(recipient):
            raise SMTPBadRcpt(
                user.dest,
                550,
                f"5.1.1 <{recipient}>: Recipient address rejected: User unknown",
            )
        return partial(self.newMessage, _text(user.orig), [recipient])

    def newMessage(
        self,
        mailFrom: str,
        recipients: list[str],
        helo: str = "",
        xclient: dict[str, str] | None = None,
        xforward: dict[str, str] | None = None,
    ) -> _Message:
        """Start receiving one message for all of C{recipients}."""
        return _Message(self._mta, mailFrom, recipients, helo, xclient, xforward)


def _text(address: Address) -> str:
    return bytes(address).decode("utf-8", "replace")


class _LocalMTAFactory(ServerFactory):
    noisy = False

    def __init__(self, mta: LocalMTA) -> None:
        self._mta = mta

    def buildProtocol(self, addr: IAddress | None) -> _LocalSMTP:
        protocol = _LocalSMTP(self._mta)
        protocol.factory = self
        return protocol


class _LocalSMTP(ESMTP):
    """
    The server protocol of one connection.

    Commands go through the stock line dispatch (C{lineReceived} → C{state_COMMAND} →
    C{do_*}/C{ext_*}); in DATA mode L{_receiveData} scans whole buffers instead.
    """

    #: The longest command line accepted (message lines have no limit).
    MAX_LENGTH = 1 << 20
    #: Stock logging pre-formats strings on the legacy log; ours are structured.
    noisy = False

    _log = Logger()

    def __init__(self, mta: LocalMTA) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._mta = mta
        self._delivery = mta._delivery
        self.delivery = self._delivery
        self.host = mta.hostname
        self._hostBytes = mta.hostname.encode("ascii")
        self._clock = mta.clock
        # Stock code annotates an int; seconds may be a float, and None means no timeout.
        self.timeout = mta.idleTimeout if mta.clock is not None else None  # type: ignore[assignment]
        self._index = -1
        self._transcript = bytearray()
        self._pending = b""  # an incomplete command line
        self._closing = False  # we closed (or aborted) the connection
        self._silent = False  # silentAfterData took effect
        self._message: _Message | None = None
        self._dataTail = b""  # DATA bytes held back until the next chunk says what they are
        self._dataFirst = True  # the next content written still has the seeded CRLF
        self._dataCount = 0  # DATA-stream bytes of this message (for dropAfterDataBytes)
        self._chunkLeft = 0  # bytes of the BDAT chunk being read still to come
        self._chunkSize = 0
        self._chunkLast = False
        self._chunkRefusal: bytes | None = None  # the reply to a refused chunk, once read
        self._xclient: dict[str, str] = {}
        self._xforward: dict[str, str] = {}
        self._tlsStarted = self._tlsJustStarted = False
        self._login: str | None = None
        #: An AUTH exchange waiting for the client's next line: its mechanism and step.
        self._sasl: tuple[bytes, int, str] | None = None

    # -- connection

    def connectionMade(self) -> None:
        """Register the transcript, greet."""
        self._index, self._transcript = self._mta._connectionOpened()
        super().connectionMade()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Discard an unfinished message; wake whoever waits for this connection."""
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        message, self._message = self._message, None
        if message is not None:
            self._log.info("connection lost in DATA: {queueId} discarded", queueId=message.queueId)
            message.connectionLost()
        self._mta._connectionClosed(self._index)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """Schedule the idle timeout on the L{LocalMTA}'s clock, not the global reactor."""
        if self._clock is None:
            raise RuntimeError("an idle timeout needs the LocalMTA to have a clock")
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        """The client was idle too long."""
        self.sendCode(421, b"4.4.2 " + self._hostBytes + b" Error: timeout exceeded")
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._closing = True
        transport = cast(ITCPTransport, self.transport)
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    # -- bytes in

    def dataReceived(self, data: bytes) -> None:
        """Record the raw bytes, then route them: command lines, or a DATA stream."""
        if self._mta.keepTranscripts:
            self._transcript += data
        while data and not self._silent and not self._closing:
            if self._chunkLeft:
                data = self._receiveChunk(data)
            elif self.mode == DATA:
                data = self._receiveData(data)
            else:
                data = self._receiveCommands(data)

    def _receiveCommands(self, data: bytes) -> bytes:
        """
        Dispatch the complete command lines in C{data}.

        @return: the bytes after the line that switched to DATA mode (or closed or
            silenced the connection), for the caller to route; else C{b""}.
        """
        buf = self._pending + data
        self._pending = b""
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 2
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return b""
            self.lineReceived(line)
            if self._tlsJustStarted:
                self._tlsJustStarted = False
                return b""  # sent before the handshake: not to be read as if over TLS
            if self.mode == DATA or self._silent or self._closing or self._chunkLeft:
                return buf[start:]
        if len(buf) - start > self.MAX_LENGTH:
            self.lineLengthExceeded(buf[start:])
            return b""
        self._pending = buf[start:]
        return b""

    def _receiveData(self, data: bytes) -> bytes:
        """
        Take DATA-stream bytes; end the message at CRLF.CRLF.

        @return: the bytes after the end-of-data (commands), or C{b""}.
        """
        self.resetTimeout()  # type: ignore[no-untyped-call]
        limit = self._mta.dropAfterDataBytes
        beyond = b""
        if limit is not None:
            room = max(limit - self._dataCount, 0)
            data, beyond = data[:room], data[room:]
            self._dataCount += len(data)
        rest = self._scanData(data)
        if rest is not None:
            return rest + beyond
        if limit is not None and self._dataCount >= limit:
            self._dropMidData()
        return b""

    def _receiveChunk(self, data: bytes) -> bytes:
        """
        Take a BDAT chunk's bytes, as they are.

        @return: the bytes after the chunk (commands), or C{b""}.
        """
        self.resetTimeout()  # type: ignore[no-untyped-call]
        content, rest = data[: self._chunkLeft], data[self._chunkLeft :]
        self._chunkLeft -= len(content)
        if self._message is not None and self._chunkRefusal is None:
            self._message.write(content)
        if not self._chunkLeft:
            self._chunkEnd()
        return rest

    def _chunkEnd(self) -> None:
        refusal, self._chunkRefusal = self._chunkRefusal, None
        if refusal is not None:
            self.sendCode(503, refusal)
        elif self._chunkLast:
            self._endOfData()
        else:
            self.sendCode(250, b"2.0.0 Ok: %d octets received" % (self._chunkSize,))

    def _scanData(self, data: bytes) -> bytes | None:
        """
        Write the content in C{data} to the message, un-stuffed.

        The bytes kept back for the next call are those that might still turn out to
        be part of a C{CRLF.} (a dot to remove) or of the end marker: the tail from the
        last CRLF, or only the last four bytes when that CRLF is further back.

        @return: the bytes after the end-of-data, or L{None} if it has not come yet.
        """
        buf = self._dataTail + data
        end = buf.find(_END_OF_DATA)
        if end >= 0:
            self._dataTail = b""
            self._writeContent(buf[: end + 2])
            self._endOfData()
            return buf[end + len(_END_OF_DATA) :]
        cut = len(buf) - 4
        lastCRLF = buf.rfind(b"\r\n")
        if lastCRLF >= 0 and cut <= lastCRLF + 2:
            cut = lastCRLF
        if cut > 0:
            self._writeContent(buf[:cut])
            buf = buf[cut:]
        self._dataTail = buf
        return None

    def _writeContent(self, chunk: bytes) -> None:
        # chunk never splits a CRLF or a CRLF-dot, so one replace un-stuffs it all.
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        if self._dataFirst:
            chunk = chunk[len(_LINE_START) :]
            self._dataFirst = False
        assert self._message is not None
        self._message.write(chunk)

    def _dropMidData(self) -> None:
        self._log.info(
            "dropAfterDataBytes: aborting the connection after {count} bytes of DATA",
            count=self._dataCount,
        )
        self._close(abort=True)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A command line longer than L{MAX_LENGTH}: refuse it and hang up."""
        self.sendCode(500, b"5.5.2 Error: line too long")
        self._close()

    # -- replies

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Send a reply, one line per line of C{message}, in one write."""
        lines = message.splitlines() or [b""]
        reply = b"".join(b"%03d-%s\r\n" % (code, line) for line in lines[:-1])
        reply += b"%03d %s\r\n" % (code, lines[-1])
        assert self.transport is not None
        self.transport.write(reply)

    def greeting(self) -> bytes:
        """The text of the 220 banner."""
        return self._hostBytes + b" ESMTP mailproxy-localmta"

    def sendSyntaxError(self) -> None:
        """An empty command line."""
        self.sendCode(500, b"5.5.2 Error: bad syntax")

    # -- commands

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """The EHLO keywords, as stock ESMTP spells them (L{None}: no arguments)."""
        return {keyword: args or None for keyword, args in self._mta.extensions.items()}

    def do_EHLO(self, rest: bytes) -> None:
        """
        Greet and list the L{LocalMTA}'s extensions. Replaces the stock method, which
        fails on peers without a C{host} (UNIX sockets) and omits bare keywords whose
        argument list is empty.
        """
        peer = self._peerName()
        self._helo = (rest, peer)
        self._from = None
        self._to = []
        lines = [self._hostBytes + b" Hello " + peer + b", nice to meet you"]
        for keyword, args in self.extensions().items():
            lines.append(b" ".join([keyword, *(args or [])]))
        self.sendCode(250, b"\n".join(lines))

    def _peerName(self) -> bytes:
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = cast("IPv4Address", peer).host if hasattr(peer, "host") else str(peer)
        return host.encode("ascii", "backslashreplace")

    def _cbFromValidate(
        self, fromEmail: Address, code: int = 250, msg: bytes = b"2.1.0 Ok"
    ) -> None:
        # Private stock callback, overridden only for its reply text: the stock
        # "250 Sender address accepted" lacks the enhanced code we announce.
        super()._cbFromValidate(fromEmail, code, msg)  # type: ignore[no-untyped-call]

    def _cbToValidate(
        self, to: object, user: User | None = None, code: int = 250, msg: bytes = b"2.1.5 Ok"
    ) -> None:
        # Private stock callback, overridden only for its reply text (see above).
        super()._cbToValidate(to, user, code, msg)  # type: ignore[no-untyped-call]

    def do_DATA(self, rest: bytes) -> None:
        """
        Start one message for the whole transaction and switch to reading its content.
        Replaces the stock method, which makes a message per recipient, adds a
        C{Received:} header and hands the content over line by line.
        """
        if self._message is not None:
            self.sendCode(503, b"5.5.1 Error: DATA after BDAT")
            return
        if self._from is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        if not self._to:
            self.sendCode(503, b"5.5.1 Error: need RCPT command")
            return
        self._startMessage()
        self.mode = DATA
        self._dataTail = _LINE_START
        self._dataFirst = True
        self._dataCount = 0
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")
        limit = self._mta.dropAfterDataBytes
        if limit is not None and limit <= 0:
            self._dropMidData()

    def _startMessage(self) -> None:
        """One message for the whole transaction (DATA, or the first BDAT)."""
        helo = cast("tuple[bytes | None, bytes]", self._helo)[0] or b""
        assert self._from is not None
        self._message = self._delivery.newMessage(
            _text(self._from),
            [_text(user.dest) for user, _ in self._to],
            helo.decode("utf-8", "replace"),
            self._xclient,
            self._xforward,
        )
        self._message.tls, self._message.login = self._tlsStarted, self._login
        self._from = None
        self._to = []

    def ext_BDAT(self, rest: bytes) -> None:
        """
        RFC 3030's BDAT, when CHUNKING is announced: the chunk's bytes are content as
        they are; the reply to BDAT LAST is the end-of-data reply. A refused BDAT's
        bytes are read and dropped.
        """
        if b"CHUNKING" not in self._mta.extensions:
            self.do_UNKNOWN(rest)
            return
        parsed = re.fullmatch(rb"([0-9]{1,20})(?: +(LAST))?", rest.strip(), re.I)
        if parsed is None:
            self.sendCode(501, b"5.5.4 Syntax: BDAT count [LAST]")
            return
        self._chunkSize = self._chunkLeft = int(parsed.group(1))
        self._chunkLast = parsed.group(2) is not None
        if self._message is None:
            if self._from is None:
                self._chunkRefusal = b"5.5.1 Error: need MAIL command"
            elif not self._to:
                self._chunkRefusal = b"5.5.1 Error: need RCPT command"
            else:
                self._startMessage()
        if not self._chunkLeft:
            self._chunkEnd()

    def _endOfData(self) -> None:
        message, self._message = self._message, None
        assert message is not None
        self.mode = COMMAND
        if self._mta.silentAfterData:
            self._log.info(
                "silentAfterData: {queueId} discarded, unanswered", queueId=message.queueId
            )
            message.connectionLost()
            self._silent = True
            self.setTimeout(None)  # type: ignore[no-untyped-call]
            return
        d = defer.maybeDeferred(message.eomReceived)
        d.addCallbacks(self._queued, self._notQueued)
        d.addErrback(lambda f: self._log.failure("replying to end of data", f))

    def _queued(self, message: ReceivedMessage) -> None:
        self.sendCode(250, b"2.0.0 Ok: queued as " + message.queueId.encode("ascii"))

    def _notQueued(self, reason: Failure) -> None:
        if reason.check(SMTPServerError):
            error = cast(SMTPServerError, reason.value)
            self.sendCode(error.code, str(error.resp).encode("utf-8"))
            return
        self._log.failure("storing the message", reason)
        self.sendCode(451, b"4.3.0 Error: queue file write error")

    def do_RSET(self, rest: bytes) -> None:
        """Forget the transaction in progress, BDAT chunks included."""
        self._from = None
        self._to = []
        message, self._message = self._message, None
        if message is not None:
            message.connectionLost()
        self.sendCode(250, b"2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        """Do nothing, successfully (stock SMTP lacks NOOP)."""
        self.sendCode(250, b"2.0.0 Ok")

    def do_QUIT(self, rest: bytes) -> None:
        """Say goodbye and close."""
        self.sendCode(221, b"2.0.0 Bye")
        self._close()

    def do_UNKNOWN(self, rest: bytes) -> None:
        """Any command not implemented (VRFY, BDAT, ...), as Postfix answers it."""
        self.sendCode(502, b"5.5.2 Error: command not recognized")

    def lineReceived(self, line: bytes) -> None:
        """A command, or the client's response in an AUTH exchange."""
        if self._sasl is not None:
            self._saslStep(line)
            return
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def ext_AUTH(self, rest: bytes) -> None:
        """AUTH PLAIN and LOGIN against L{LocalMTA.logins}, when announced (else 504)."""
        if b"AUTH" not in self._mta.extensions:
            self.do_UNKNOWN(rest)
            return
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        if self._login is not None:
            self.sendCode(503, b"5.5.1 Error: already authenticated")
        elif not self._mta.logins or mechanism not in (b"PLAIN", b"LOGIN"):
            self.sendCode(504, b"5.5.4 Unrecognized authentication type")
        elif initial:
            self._sasl = (mechanism, 0, "")
            self._saslStep(initial)
        else:
            self._sasl = (mechanism, 0, "")
            self.sendCode(334, b"VXNlcm5hbWU6" if mechanism == b"LOGIN" else b"")

    def _saslStep(self, line: bytes) -> None:
        assert self._sasl is not None
        mechanism, step, user = self._sasl
        self._sasl = None
        if line == b"*":
            self.sendCode(501, b"5.7.0 Authentication aborted")
            return
        try:
            decoded = base64.b64decode(line, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            self.sendCode(501, b"5.5.2 Cannot decode response")
            return
        if mechanism == b"LOGIN" and step == 0:
            self._sasl = (mechanism, 1, decoded)
            self.sendCode(334, b"UGFzc3dvcmQ6")
            return
        if mechanism == b"LOGIN":
            password = decoded
        else:
            parts = decoded.split("\0")
            if len(parts) != 3:
                self.sendCode(501, b"5.5.2 Invalid PLAIN response")
                return
            user, password = parts[1], parts[2]
        if self._mta.logins.get(user) == password:
            self._login = user
            self.sendCode(235, b"2.7.0 Authentication successful")
        else:
            self.sendCode(535, b"5.7.8 Error: authentication failed")

    def ext_STARTTLS(self, rest: bytes) -> None:
        """STARTTLS, when announced: with L{LocalMTA.tls}, else 454 (no certificate)."""
        if b"STARTTLS" not in self._mta.extensions:
            self.do_UNKNOWN(rest)
            return
        if self._mta.tls is None or self._tlsStarted:
            self.sendCode(454, b"4.7.0 TLS not available due to local problem")
            return
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        self._tlsStarted = self._tlsJustStarted = True
        self._helo = None
        assert self.transport is not None
        self.transport.startTLS(self._mta.tls)  # type: ignore[attr-defined]

    def ext_XCLIENT(self, rest: bytes) -> None:
        """
        Postfix's XCLIENT, when announced: record the attributes, reset the session
        and greet again (the client then sends EHLO anew).
        """
        attributes = self._forwardedAttributes(b"XCLIENT", rest)
        if attributes is not None:
            self._xclient.update(attributes)
            self._helo = (None, self._peerName())
            self.sendCode(220, self.greeting())

    def ext_XFORWARD(self, rest: bytes) -> None:
        """Postfix's XFORWARD, when announced: record the attributes."""
        attributes = self._forwardedAttributes(b"XFORWARD", rest)
        if attributes is not None:
            self._xforward.update(attributes)
            self.sendCode(250, b"2.0.0 Ok")

    def _forwardedAttributes(self, command: bytes, rest: bytes) -> dict[str, str] | None:
        """
        Parse C{NAME=value ...} (xtext values) of XCLIENT or XFORWARD, or reply with
        the error and return L{None}.
        """
        announced = self._mta.extensions.get(command)
        if announced is None:
            self.do_UNKNOWN(rest)
            return None
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Error: MAIL transaction in progress")
            return None
        allowed = {name.upper() for name in announced}
        attributes: dict[str, str] = {}
        for item in rest.split():
            name, equals, value = item.partition(b"=")
            if not equals or name.upper() not in allowed:
                self.sendCode(501, b"5.5.4 Bad " + command + b" attribute name: " + name)
                return None
            decoded = _XTEXT.sub(lambda m: bytes([int(m.group(1), 16)]), value)
            attributes[name.upper().decode("ascii")] = decoded.decode("utf-8", "replace")
        if not attributes:
            self.sendCode(501, b"5.5.4 Syntax: " + command + b" attribute=value...")
            return None
        return attributes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailproxy-localmta",
        description="A stand-in MTA: accepts any mail and stores it in a Maildir.",
    )
    parser.add_argument(
        "--listen",
        default="tcp:10025:interface=127.0.0.1",
        help="Twisted endpoint to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--maildir",
        default="./Maildir",
        help="Maildir to deliver to, created if missing; '' keeps no files (default: %(default)s)",
    )
    parser.add_argument(
        "--hostname",
        default="localmta.invalid",
        help="name in the greeting and EHLO reply (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stand-in MTA until interrupted, logging each accepted message."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args = _parser().parse_args(argv)
    log = Logger(namespace="mailproxy.localmta")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    mta = LocalMTA(
        maildir=args.maildir or None, hostname=args.hostname, clock=reactor, record=False
    )

    def listening(port: IListeningPort) -> None:
        log.info(
            "listening on {address}, delivering to {maildir}",
            address=port.getHost(),
            maildir=mta.maildir or "(memory only)",
        )

    exitCode: list[int] = []

    def failed(reason: Failure) -> None:
        log.error("cannot listen on {listen}: {error}", listen=args.listen, error=reason.value)
        exitCode.append(1)
        reactor.stop()

    def start() -> None:
        mta.listen(serverFromString(reactor, args.listen)).addCallbacks(listening, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    if exitCode:
        sys.exit(exitCode[0])


if __name__ == "__main__":
    # Run from the importable module, not this __main__ copy of it, so that classes
    # and log namespaces are mailproxy.localmta's.
    from mailproxy.localmta import main as _main

    _main()
