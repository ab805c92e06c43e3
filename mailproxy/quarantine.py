"""
The quarantine: messages a filter refused, kept for a while with their envelope and verdict.

A filter's section with C{quarantine = true} sends the messages it refuses (with a 5xx: a
tempfail will be sent again) to the directory of C{[quarantine] dir}. Each entry is two
files, both mode 0600:

  - C{ID.eml}: the message as the client sent it (CRLF lines, no dot-stuffing);
  - C{ID.json}: its sidecar: C{id}, C{time} (UTC, ISO 8601), C{timestamp}, C{session},
    C{client}, C{client_port}, C{helo}, C{sender}, C{mail_parameters}, C{recipients},
    C{filter}, C{reply} (what the client was told) and C{size}.

The sidecar is written last, and atomically: an entry without one is incomplete and is
not listed. Entries older than C{retention_days} are removed at start-up and daily.

An operator lists, shows, releases (to the configured MTA) and deletes entries with::

    python -m mailproxy.quarantine --config /etc/mailproxy/mailproxy.toml list
    python -m mailproxy.quarantine --config ... show ID
    python -m mailproxy.quarantine --config ... release ID
    python -m mailproxy.quarantine --config ... delete ID
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import shutil
import smtplib
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.config import Config
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, Verdict

__all__ = ["Entry", "Quarantine", "main", "release"]

#: What an entry's id looks like: when, the session, and a random part.
_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9A-Za-z]{1,32}-[0-9a-f]{6}")
_DAY = 86400.0


@attrs.frozen
class Entry:
    """One quarantined message: its id, the message file, and its sidecar."""

    id: str
    messagePath: str
    meta: Mapping[str, Any]


class Quarantine:
    """
    A quarantine directory, and which filters' refusals go into it.

    @param filters: the names of the filters whose refusals are kept.
    @param reactor: its clock times the entries; its thread pool (if it has one) copies a
        message across file systems, where a hard link cannot be made.
    """

    _log = Logger()

    def __init__(
        self, directory: str, retentionDays: int, filters: Collection[str], reactor: IReactorTime
    ) -> None:
        self.directory = directory
        self.retentionDays = retentionDays
        self.filters = frozenset(filters)
        self._reactor = reactor

    @classmethod
    def fromConfig(cls, config: Config, reactor: IReactorTime) -> Quarantine | None:
        """The quarantine of a configuration, or L{None} without C{[quarantine] dir}."""
        if config.quarantine.dir is None:
            return None
        names = [spec.name for spec in config.filters if spec.quarantine]
        return cls(config.quarantine.dir, config.quarantine.retentionDays, names, reactor)

    def wants(self, verdict: Verdict) -> bool:
        """Whether a refusal is to be kept: a permanent one, by a quarantining filter."""
        return verdict.action is Action.REJECT and verdict.filter in self.filters

    # -- keeping ---------------------------------------------------------------------------

    def keep(
        self, message: Message, session: Session, envelope: Envelope, verdict: Verdict
    ) -> Deferred[str | None]:
        """
        Keep a refused message; call it before the spool file is removed. Never fails:
        a failure is logged, and the SMTP dialogue does not depend on it.

        @return: fires with the entry's id, or L{None} if it could not be kept.
        """
        now = self._reactor.seconds()
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
        entryId = f"{stamp:%Y%m%dT%H%M%SZ}-{session.id}-{secrets.token_hex(3)}"
        meta = {
            "id": entryId,
            "time": stamp.isoformat(timespec="seconds"),
            "timestamp": now,
            "session": session.id,
            "client": session.clientAddress,
            "client_port": session.clientPort,
            "helo": session.helo,
            "sender": envelope.mailFrom,
            "mail_parameters": envelope.mailParameters,
            "recipients": list(envelope.recipients),
            "filter": verdict.filter,
            "reply": f"{verdict.code} {verdict.enhanced} {verdict.text}",
            "size": message.size,
        }
        target = self._path(entryId, ".eml")
        try:
            copied = self._store(message.path, target)
        except OSError as e:
            copied = defer.fail(e)
        copied.addCallback(lambda _: self._writeMeta(entryId, meta))

        def kept(_: object) -> str:
            self._log.info(
                "{session} quarantined as {entry} (refused by {filter})",
                session=session.id,
                entry=entryId,
                filter=verdict.filter,
            )
            return entryId

        def failed(failure: Failure) -> None:
            failure.trap(OSError)
            self._log.error(
                "{session} cannot quarantine the message: {why}",
                session=session.id,
                why=failure.getErrorMessage(),
            )
            for suffix in (".eml", ".json.tmp"):
                _unlink(self._path(entryId, suffix))

        return copied.addCallbacks(kept, failed)

    def _store(self, source: str, target: str) -> Deferred[None]:
        """A hard link when it can (no copy); else a copy, in the thread pool if any."""
        try:
            os.link(source, target)
            return defer.succeed(None)
        except OSError:
            pass  # another file system, or no hard links here: copy
        # Opened now: the spool file is removed as soon as we return.
        src = open(source, "rb")  # closed by _copy
        if IReactorThreads.providedBy(self._reactor):
            pool = self._reactor.getThreadPool()
            d: Deferred[None] = deferToThreadPool(self._reactor, pool, _copy, src, target)
            return d
        return defer.execute(_copy, src, target)

    def _writeMeta(self, entryId: str, meta: Mapping[str, Any]) -> None:
        temporary = self._path(entryId, ".json.tmp")
        with _create(temporary, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.rename(temporary, self._path(entryId, ".json"))

    # -- reading, removing ---------------------------------------------------------------

    def _path(self, entryId: str, suffix: str) -> str:
        return os.path.join(self.directory, entryId + suffix)

    def entries(self) -> list[Entry]:
        """The complete entries, oldest first."""
        found = []
        for name in sorted(os.listdir(self.directory)):
            entryId, _, suffix = name.partition(".")
            if suffix == "json" and _ID.fullmatch(entryId):
                try:
                    found.append(self.get(entryId))
                except KeyError:
                    continue  # removed meanwhile, or unreadable
        return found

    def get(self, entryId: str) -> Entry:
        """@raise KeyError: there is no such (complete, readable) entry."""
        if not _ID.fullmatch(entryId):
            raise KeyError(entryId)
        try:
            with open(self._path(entryId, ".json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            raise KeyError(entryId) from None
        if not isinstance(meta, dict) or not os.path.exists(self._path(entryId, ".eml")):
            raise KeyError(entryId)
        return Entry(entryId, self._path(entryId, ".eml"), meta)

    def remove(self, entryId: str) -> None:
        """Remove an entry: its sidecar first, so that it is never listed half-removed."""
        if not _ID.fullmatch(entryId):
            raise KeyError(entryId)
        for suffix in (".json", ".eml"):
            _unlink(self._path(entryId, suffix))

    def expire(self) -> list[str]:
        """
        Remove the entries older than the retention time, and the remains of incomplete
        ones; return the ids of the entries removed.
        """
        cutoff = self._reactor.seconds() - self.retentionDays * _DAY
        removed = []
        for name in sorted(os.listdir(self.directory)):
            entryId, _, suffix = name.partition(".")
            path = os.path.join(self.directory, name)
            if not _ID.fullmatch(entryId):
                continue
            try:
                if suffix == "json":
                    when = self._timestamp(entryId, path)
                elif not os.path.exists(self._path(entryId, ".json")):
                    when = os.stat(path).st_mtime  # incomplete: no sidecar
                else:
                    continue
            except OSError:
                continue  # removed meanwhile
            if when < cutoff:
                self.remove(entryId)
                _unlink(self._path(entryId, ".json.tmp"))
                if suffix == "json":
                    removed.append(entryId)
        return removed

    def _timestamp(self, entryId: str, path: str) -> float:
        try:
            timestamp = self.get(entryId).meta.get("timestamp")
        except KeyError:
            timestamp = None
        if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
            return float(timestamp)
        return os.stat(path).st_mtime


def _create(path: str, mode: str) -> IO[Any]:
    """A new file, mode 0600 whatever the umask."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), mode)


def _copy(source: IO[bytes], target: str) -> None:
    try:
        with _create(target, "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
    finally:
        source.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- releasing to the MTA (the command line; smtplib, since no reactor runs here) -----------


def _splitEndpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """A Twisted endpoint string as its kind, positional and keyword arguments."""
    parts: list[str] = [""]
    escaped = False
    for char in description:
        if escaped:
            parts[-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("")
        else:
            parts[-1] += char
    kind, args, kwargs = parts[0], [], {}
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if equals:
            kwargs[name] = value
        else:
            args.append(part)
    return kind, args, kwargs


def upstreamAddress(description: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """
    Where the MTA of an upstream endpoint string is, as a socket family and address.

    @raise ValueError: not a C{tcp:}, C{tcp6:} or C{unix:} endpoint.
    """
    kind, args, kwargs = _splitEndpoint(description)
    if kind in ("tcp", "tcp6"):
        host = kwargs.get("host", args[0] if args else "")
        port = kwargs.get("port", args[1] if len(args) > 1 else "")
        if not host or not port.isdigit():
            raise ValueError(f"{description!r}: no host and port")
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        return family, (host, int(port))
    if kind == "unix":
        path = kwargs.get("path", args[0] if args else "")
        if not path:
            raise ValueError(f"{description!r}: no path")
        return socket.AF_UNIX, path
    raise ValueError(f"{description!r}: only tcp:, tcp6: and unix: upstreams can be released to")


class _SMTP(smtplib.SMTP):
    """smtplib over a socket of any family (a UNIX socket too)."""

    def __init__(
        self, family: socket.AddressFamily, address: str | tuple[str, int], **kw: Any
    ) -> None:
        self._family = family
        self._address = address
        super().__init__(**kw)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        if self._family == socket.AF_INET:
            return socket.create_connection(self._address, timeout)  # type: ignore[arg-type]
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._address)
        except OSError:
            sock.close()
            raise
        return sock


class ReleaseError(Exception):
    """The MTA refused the message (or could not be reached); C{str()} says why."""


def release(config: Config, entry: Entry, err: IO[str] | None = None) -> str:
    """
    Send a quarantined message to the configured MTA, as it was sent to us, with its
    envelope. It stays in the quarantine; the caller removes it.

    @return: the MTA's final reply (C{"250 2.0.0 Ok: queued as ..."}).
    @raise ReleaseError: the MTA refused the sender, every recipient, or the message; or
        it could not be reached.
    """
    family, address = upstreamAddress(config.upstream)
    err = err or sys.stderr
    meta = entry.meta
    options = str(meta.get("mail_parameters") or "").split()
    try:
        with _SMTP(
            family, address, local_hostname=config.hostname, timeout=config.timeouts.mtaReply
        ) as smtp:
            code, text = smtp.connect()
            if code != 220:
                raise ReleaseError(f"MTA greeting: {code} {text.decode('utf-8', 'replace')}")
            smtp.ehlo_or_helo_if_needed()
            code, text = smtp.mail(str(meta["sender"]), options)
            if code != 250:
                raise ReleaseError(f"MAIL FROM: {code} {text.decode('utf-8', 'replace')}")
            accepted = 0
            for recipient in meta["recipients"]:
                code, text = smtp.rcpt(str(recipient))
                if code in (250, 251):
                    accepted += 1
                else:
                    print(
                        f"RCPT TO:<{recipient}>: {code} {text.decode('utf-8', 'replace')}",
                        file=err,
                    )
            if not accepted:
                smtp.rset()
                raise ReleaseError("the MTA accepted no recipient")
            with open(entry.messagePath, "rb") as f:
                content = f.read()
            code, text = smtp.data(content)
            if code != 250:
                raise ReleaseError(f"end of data: {code} {text.decode('utf-8', 'replace')}")
            return f"{code} {text.decode('utf-8', 'replace')}"
    except (OSError, smtplib.SMTPException) as e:
        raise ReleaseError(f"{config.upstream}: {e}") from None


# -- the command ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailproxy.quarantine",
        description="List, show, release or delete the messages mailproxy quarantined.",
    )
    parser.add_argument("--config", "-c", help="the configuration file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per message, oldest first")
    for name, what in [
        ("show", "print a message's envelope and verdict, then the message"),
        ("release", "send a message to the MTA, then remove it from the quarantine"),
        ("delete", "remove a message from the quarantine"),
    ]:
        commands.add_parser(name, help=what).add_argument("id")
    return parser


def main(
    argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Run the command; returns the exit status (0: done, 1: failed)."""
    from twisted.internet import reactor

    from mailproxy.config import ConfigError, load
    from mailproxy.tap import DEFAULT_CONFIG

    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    parser.set_defaults(config=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    try:
        config = load(args.config, reactor)
    except ConfigError as e:
        print(f"mailproxy.quarantine: {e}", file=err)
        return 1
    quarantine = Quarantine.fromConfig(config, reactor)
    if quarantine is None:
        print(f"mailproxy.quarantine: {config.path}: no [quarantine] dir", file=err)
        return 1
    if args.command == "list":
        for entry in quarantine.entries():
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
        print(f"mailproxy.quarantine: no such message: {args.id}", file=err)
        return 1
    if args.command == "show":
        print(json.dumps(dict(entry.meta), indent=1), file=out)
        print(file=out)
        with open(entry.messagePath, encoding="utf-8", errors="replace", newline="") as f:
            shutil.copyfileobj(f, out)
    elif args.command == "release":
        try:
            reply = release(config, entry, err)
        except ReleaseError as e:
            print(f"mailproxy.quarantine: {entry.id} not released: {e}", file=err)
            return 1
        quarantine.remove(entry.id)
        print(f"{entry.id} released: {reply}", file=out)
    else:
        quarantine.remove(entry.id)
        print(f"{entry.id} deleted", file=out)
    return 0


if __name__ == "__main__":
    from mailproxy.quarantine import main as _main

    sys.exit(_main())
