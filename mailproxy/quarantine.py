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

This module is the store, used by the relay and the service; an operator lists, shows,
releases (to the configured MTA) and deletes entries with the command line tool,
L{mailproxy.quarantinectl} (C{mailproxy-quarantine}).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
from collections.abc import Collection, Mapping
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy.config import Config
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, Verdict
from mailproxy.filters.support import inThreadPool, requireThreads

__all__ = ["Entry", "Quarantine"]

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
    @param reactor: its clock times the entries; its thread pool copies a message across
        file systems, where a hard link cannot be made.
    @raise NoThreadPoolError: C{reactor} has no thread pool.
    """

    _log = Logger()

    def __init__(
        self, directory: str, retentionDays: int, filters: Collection[str], reactor: IReactorTime
    ) -> None:
        self.directory = directory
        self.retentionDays = retentionDays
        self.filters = frozenset(filters)
        self._reactor = reactor
        requireThreads(reactor)  # now, rather than at the first copy

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
        """A hard link when it can (no copy); else a copy, in the thread pool."""
        try:
            os.link(source, target)
            return defer.succeed(None)
        except OSError:
            pass  # another file system, or no hard links here: copy
        # Opened now: the spool file is removed as soon as we return.
        src = open(source, "rb")  # closed by _copy
        return inThreadPool(self._reactor, _copy, src, target)

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


if __name__ == "__main__":
    # The command is mailproxy.quarantinectl (installed as mailproxy-quarantine); this
    # keeps `python -m mailproxy.quarantine ...` working for the scripts that run it.
    from mailproxy.quarantinectl import main

    main()
