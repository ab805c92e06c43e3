"""
The quarantine's command line: list, show, release (to the configured MTA) and delete the
messages mailproxy quarantined (see L{mailproxy.quarantine})::

    mailproxy-quarantine --config /etc/mailproxy/mailproxy.toml list
    mailproxy-quarantine --config ... show ID
    mailproxy-quarantine --config ... release ID
    mailproxy-quarantine --config ... delete ID

(C{python -m mailproxy.quarantinectl}, and the older C{python -m mailproxy.quarantine},
run the same command.)

A release talks SMTP to the configured upstream with Twisted, under L{react}: the
upstream endpoint string is parsed by C{clientFromString}, so any endpoint the proxy can
relay to (C{tcp:}, C{tcp6:}, C{unix:}, C{tls:}, ...) can be released to; the message file
is streamed (L{FileSender}, dot-stuffed chunk by chunk), never read whole.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import IO, Any, NoReturn, cast

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import react
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mailproxy.config import DEFAULT_CONFIG, Config, ConfigError, load
from mailproxy.quarantine import Quarantine
from mailproxy.wire import ProtocolError, Reply, ReplyParser, Stuffer

__all__ = ["PROGRAM", "ReleaseError", "command", "main", "release"]

#: The command's name, in its usage and at the start of its error lines.
PROGRAM = "mailproxy-quarantine"


class ReleaseError(Exception):
    """The MTA refused the message (or could not be reached); C{str()} says why."""


def _shown(reply: Reply) -> str:
    """A reply on one line, as the operator reads it: C{250 2.0.0 Ok: queued as 4bX}."""
    return f"{reply.code} " + " / ".join(line.decode("utf-8", "replace") for line in reply.lines)


class _MTA(Protocol):
    """The connection to the MTA, as the replies it sends, awaited one at a time."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiting: Deferred[Reply] | None = None
        #: Why the conversation cannot go on (the connection lost, a garbled reply).
        self.failed: str | None = None
        #: Fires once the connection is closed.
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            self._replies.extend(self._parser.feed(data))
        except ProtocolError as e:
            self.abort(f"the MTA's answer is not SMTP: {e}")
            return
        if self._waiting is not None and self._replies:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._replies.popleft())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fail("the MTA closed the connection")
        self.closed.callback(None)

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(ReleaseError(self.failed))

    def abort(self, why: str) -> None:
        """Give up: drop the connection, saying why to whoever waits for a reply."""
        self._fail(why)
        # Every stream transport can abort (TCP, UNIX, TLS); ITCPTransport declares it.
        cast(ITCPTransport, self.transport).abortConnection()

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def reply(self) -> Deferred[Reply]:
        """The next reply; fails with L{ReleaseError} if the conversation is over."""
        assert self._waiting is None, "one reply at a time"
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.failed is not None:
            return defer.fail(ReleaseError(self.failed))

        def cancel(d: Deferred[Reply]) -> None:
            self._waiting = None

        self._waiting = Deferred(cancel)
        return self._waiting


def _line(value: object, what: str) -> bytes:
    """A sidecar's field as bytes for a command line, which it must not be able to end."""
    text = str(value)
    if "\r" in text or "\n" in text:
        raise ReleaseError(f"the sidecar's {what} holds a line break")
    # The envelope was decoded with surrogate escapes for the bytes that were not UTF-8.
    return text.encode("utf-8", "surrogateescape")


async def _converse(
    reactor: IReactorTime, mta: _MTA, config: Config, meta: Mapping[str, Any], message: IO[bytes]
) -> tuple[Reply, list[tuple[str, Reply]]]:
    """The whole transaction; the final reply, and the recipients the MTA refused."""
    timeout = config.timeouts.mtaReply

    async def ask(line: bytes | None, what: str) -> Reply:
        if line is not None:
            mta.send(line)
        d = mta.reply()
        d.addTimeout(timeout, reactor)
        try:
            return await d
        except defer.TimeoutError:
            mta.abort(f"{what}: no reply in {timeout:g} s")
            raise ReleaseError(mta.failed) from None

    sender = _line(meta["sender"], "sender")
    parameters = _line(meta.get("mail_parameters") or "", "MAIL parameters").split()
    recipients = [_line(r, "recipient") for r in meta["recipients"]]
    reply = await ask(None, "MTA greeting")
    if reply.code != 220:
        raise ReleaseError(f"MTA greeting: {_shown(reply)}")
    hostname = config.hostname.encode("ascii", "replace")
    reply = await ask(b"EHLO " + hostname, "EHLO")
    if reply.code != 250:
        reply = await ask(b"HELO " + hostname, "HELO")
        if reply.code != 250:
            raise ReleaseError(f"HELO: {_shown(reply)}")
    reply = await ask(b" ".join([b"MAIL FROM:<" + sender + b">", *parameters]), "MAIL FROM")
    if reply.code != 250:
        raise ReleaseError(f"MAIL FROM: {_shown(reply)}")
    refused = []
    for recipient in recipients:
        reply = await ask(b"RCPT TO:<" + recipient + b">", "RCPT TO")
        if reply.code not in (250, 251):
            refused.append((recipient.decode("utf-8", "replace"), reply))
    if len(refused) == len(recipients):
        await ask(b"RSET", "RSET")
        raise ReleaseError("the MTA accepted no recipient")
    reply = await ask(b"DATA", "DATA")
    if reply.code != 354:
        raise ReleaseError(f"DATA: {_shown(reply)}")
    await _stream(reactor, mta, message, timeout)
    reply = await ask(None, "end of data")
    if reply.code != 250:
        raise ReleaseError(f"end of data: {_shown(reply)}")
    return reply, refused


async def _stream(reactor: IReactorTime, mta: _MTA, message: IO[bytes], timeout: float) -> None:
    """
    Send the message after DATA's 354, a chunk at a time as the connection takes it,
    dot-stuffed, then the end-of-data line. A connection that takes nothing for
    C{timeout} seconds is dropped.
    """
    stuffer = Stuffer()
    tail = b""  # the last bytes sent: does the message end its last line?

    def stalled() -> None:
        mta.abort(f"the MTA took no data for {timeout:g} s")

    idle: IDelayedCall = reactor.callLater(timeout, stalled)

    def transform(chunk: bytes) -> bytes:
        nonlocal tail
        idle.reset(timeout)
        tail = (tail + chunk)[-2:]
        return stuffer(chunk)

    assert mta.transport is not None
    try:
        await FileSender().beginFileTransfer(message, mta.transport, transform)
    except Exception:
        # FileSender fails with a bare Exception when its consumer (the connection) is
        # gone; anything else is a bug.
        if mta.failed is None:
            raise
        raise ReleaseError(f"sending the message: {mta.failed}") from None
    finally:
        if idle.active():
            idle.cancel()
    mta.transport.write(b".\r\n" if tail in (b"", b"\r\n") else b"\r\n.\r\n")


async def _release(
    reactor: IReactorTime,
    config: Config,
    meta: Mapping[str, Any],
    message: IO[bytes],
    err: IO[str],
) -> str:
    mta = _MTA()
    connecting: Deferred[Any] = connectProtocol(clientFromString(reactor, config.upstream), mta)
    connecting.addTimeout(config.timeouts.mtaConnect, reactor)
    try:
        await connecting
    except (error.ConnectError, defer.TimeoutError, OSError) as e:
        raise ReleaseError(f"{config.upstream}: cannot connect: {e}") from None
    try:
        reply, refused = await _converse(reactor, mta, config, meta, message)
        for recipient, refusal in refused:
            print(f"RCPT TO:<{recipient}>: {_shown(refusal)}", file=err)
        return _shown(reply)
    finally:
        if mta.failed is None:
            mta.send(b"QUIT")
            assert mta.transport is not None
            mta.transport.loseConnection()
        closing = mta.closed.addTimeout(config.timeouts.mtaReply, reactor)
        try:
            await closing
        except defer.TimeoutError:
            pass  # an MTA that never closes: the command is done anyway


def release(
    reactor: IReactorTime,
    config: Config,
    meta: Mapping[str, Any],
    message: IO[bytes],
    err: IO[str] | None = None,
) -> Deferred[str]:
    """
    Send a quarantined message to the configured MTA, as it was sent to us, with its
    envelope (C{meta}: an entry's sidecar). It stays in the quarantine; the caller
    removes it. The recipients the MTA refuses are printed to C{err}.

    @param reactor: connects (the upstream endpoint is parsed with C{clientFromString})
        and times the MTA's replies (C{timeouts.mta_connect}, C{timeouts.mta_reply}).
    @param message: the message file, read a chunk at a time from where it is.
    @return: fires with the MTA's final reply (C{"250 2.0.0 Ok: queued as ..."}), or
        fails with L{ReleaseError}: the MTA refused the sender, every recipient, or the
        message; or it could not be reached, or stopped answering.
    """
    return Deferred.fromCoroutine(_release(reactor, config, meta, message, err or sys.stderr))


# -- the command ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="List, show, release or delete the messages mailproxy quarantined.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="the configuration file (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per message, oldest first")
    for name, what in [
        ("show", "print a message's envelope and verdict, then the message"),
        ("release", "send a message to the MTA, then remove it from the quarantine"),
        ("delete", "remove a message from the quarantine"),
    ]:
        commands.add_parser(name, help=what).add_argument("id")
    return parser


async def command(reactor: IReactorTime, argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    """
    Run the command line C{argv}; return its exit status (0: done, 1: failed).

    @param reactor: parses the configuration's endpoints; a release runs on it.
    """
    args = _parser().parse_args(argv)
    try:
        config = load(args.config, reactor)
    except ConfigError as e:
        print(f"{PROGRAM}: {e}", file=err)
        return 1
    quarantine = Quarantine.fromConfig(config, reactor)
    if quarantine is None:
        print(f"{PROGRAM}: {config.path}: no [quarantine] dir", file=err)
        return 1
    if args.command == "list":
        try:
            entries = quarantine.entries()
        except OSError as e:
            print(f"{PROGRAM}: cannot read {quarantine.directory}: {e.strerror}", file=err)
            return 1
        for entry in entries:
            meta = entry.meta
            print(
                f"{entry.id}  {meta.get('time')}  {meta.get('filter')}  "
                f"<{meta.get('sender')}> -> {', '.join(map(str, meta.get('recipients', [])))}  "
                f"{meta.get('reply')}",
                file=out,
            )
        return 0
    try:
        entry = quarantine.get(args.id)
    except KeyError:
        print(f"{PROGRAM}: no such message: {args.id}", file=err)
        return 1
    if args.command == "show":
        print(json.dumps(dict(entry.meta), indent=1), file=out)
        print(file=out)
        with open(entry.messagePath, encoding="utf-8", errors="replace", newline="") as f:
            shutil.copyfileobj(f, out)
    elif args.command == "release":
        try:
            with open(entry.messagePath, "rb") as message:
                reply = await release(reactor, config, entry.meta, message, err)
        except (ReleaseError, OSError) as e:
            print(f"{PROGRAM}: {entry.id} not released: {e}", file=err)
            return 1
        quarantine.remove(entry.id)
        print(f"{entry.id} released: {reply}", file=out)
    else:
        quarantine.remove(entry.id)
        print(f"{entry.id} deleted", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run the command on the reactor, and exit with its status."""
    arguments = sys.argv[1:] if argv is None else list(argv)

    async def run(reactor: IReactorTime) -> None:
        status = await command(reactor, arguments, sys.stdout, sys.stderr)
        if status:
            raise SystemExit(status)

    react(run)


if __name__ == "__main__":
    main()
