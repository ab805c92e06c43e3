"""
The spool: one private file per message, written as the content arrives.

Files are created with mode 0600 in the configured directory, capped in size while
writing, removed at the end of every transaction, and swept at start-up. The spool
needs no fsync: nothing is acknowledged to the client before the MTA has it.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer
from zope.interface import implementer

from mailproxy.envelope import Message

PREFIX = "mailproxy-"
SUFFIX = ".msg"

#: Names are this process's own (its pid and a count): the directory is private, and
#: O_EXCL refuses a name already taken, so they need no randomness (L{tempfile}'s costs
#: a dozen Python calls a message).
_serial = itertools.count()
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Spool:
    """
    One message being written to disk.

    Writes past C{maxSize} are dropped and noted in L{overflowed}; a failed write (disk
    full) is kept in L{error} and later writes are dropped, so the relay can answer
    once the client has finished sending.
    """

    def __init__(self, directory: str, maxSize: int) -> None:
        """@raise OSError: the file cannot be created."""
        pid = os.getpid()
        while True:
            self.path = os.path.join(directory, f"{PREFIX}{pid}-{next(_serial)}{SUFFIX}")
            try:
                fd = os.open(self.path, _FLAGS, 0o600)
            except FileExistsError:
                continue  # left by an earlier process of the same pid: the next name
            break
        # Unbuffered: content comes in large pieces, each one write; nothing to flush.
        self._file: BinaryIO | None = open(fd, "wb", buffering=0)
        self._removed = False
        self._maxSize = maxSize
        self.size = 0
        self.overflowed = False
        self.error: OSError | None = None

    @property
    def usable(self) -> bool:
        """Whether everything received so far is on disk."""
        return not self.overflowed and self.error is None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self._maxSize:
            self.overflowed = True
        if not self.usable or self._file is None:
            return
        try:
            view, written = memoryview(data), 0
            while written < len(data):  # a regular file takes it all, or fails
                taken = self._file.write(view[written:])
                if not taken:
                    raise OSError(errno.EIO, "the spool file took no bytes")
                written += taken
        except OSError as e:
            self.error = e

    def close(self) -> None:
        """
        Finish writing: the descriptor is closed, so that a session's filters may open the
        file (C{SESSION_DESCRIPTORS} counts the spool or a filter's reader, not both).
        """
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self.error = self.error or e
            self._file = None

    def reader(self) -> BinaryIO:
        """
        The file from its start, unbuffered (the release reads it in large chunks), for the
        caller to close; it outlives the spool's removal.

        @raise OSError: the spool was removed, or the file cannot be opened.
        """
        if self._removed:
            raise OSError("the spool file was removed")
        return open(self.path, "rb", buffering=0)

    def message(self) -> Message:
        return Message(self.path, self.size)

    def remove(self) -> None:
        """Close and delete the file; safe to call more than once."""
        self._removed = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the file is going away; its content no longer matters
            self._file = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


#: Bytes read from the spool per write to the MTA on release: a 1 MB message goes in four
#: writes (Twisted's FileSender reads 16 KiB, 64 writes and Python calls per megabyte),
#: while a session releasing holds at most about two of these in memory.
RELEASE_CHUNK = 256 * 1024


class SpoolChangedError(Exception):
    """The spool file is shorter than the message the session counted."""


@implementer(IPullProducer)
class SpoolSender:
    """
    Sends a spooled message to a consumer (the MTA's transport) in large chunks: the
    first write carries C{prefix} (the BDAT line, the added headers) and the last one
    C{suffix} (the final dot), so a message smaller than C{chunkSize} is one write.

    @param transform: applied to each chunk read (L{mailproxy.wire.Stuffer}), not to
        C{prefix} or C{suffix}.
    @param length: the bytes to send from the file's position: no more are read, and a
        file that ends before them fails the transfer (L{SpoolChangedError}) before the
        C{suffix} is written. L{None}: up to the end of the file.
    """

    def __init__(
        self,
        file: BinaryIO,
        prefix: bytes = b"",
        suffix: bytes = b"",
        transform: Callable[[bytes], bytes] | None = None,
        chunkSize: int = RELEASE_CHUNK,
        length: int | None = None,
    ) -> None:
        self._file: BinaryIO | None = file
        self._left = length
        self._prefix = prefix
        self._suffix = suffix
        self._transform = transform
        self._chunkSize = chunkSize
        self._consumer: IConsumer | None = None
        self._written = False
        self._done: Deferred[None] = Deferred()

    def beginTransfer(self, consumer: IConsumer) -> Deferred[None]:
        """
        Start writing to C{consumer}; fires once the last write is taken (with L{None}),
        or fails if the consumer stops it (its connection is lost). The file stays open.
        """
        self._consumer = consumer
        consumer.registerProducer(self, False)
        return self._done

    def resumeProducing(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        if self._written:
            # The consumer wants more after the last write: it has taken all of it.
            self._file = self._consumer = None
            consumer.unregisterProducer()
            self._done.callback(None)
            return
        assert self._file is not None
        wanted = self._chunkSize if self._left is None else min(self._chunkSize, self._left)
        chunk = self._file.read(wanted)
        # A read of a regular file (the release reads it unbuffered) is short only at its end.
        last = len(chunk) < wanted
        if self._left is not None:
            self._left -= len(chunk)
            if last and self._left:
                self._file = self._consumer = None
                consumer.unregisterProducer()
                self._done.errback(SpoolChangedError(f"the spool ended {self._left} bytes early"))
                return
            last = not self._left
        data = self._transform(chunk) if chunk and self._transform is not None else chunk
        if self._prefix:
            data, self._prefix = self._prefix + data, b""
        if last:
            data += self._suffix
            self._written = True
        if data:
            consumer.write(data)
        elif self._written:
            self.resumeProducing()

    def pauseProducing(self) -> None:
        """A pull producer is never paused: it writes only when asked."""

    def stopProducing(self) -> None:
        if self._consumer is not None:
            self._file = self._consumer = None
            self._done.errback(ConnectionError("the MTA's connection stopped the release"))


def sweep(directory: str) -> list[str]:
    """Remove spool files left by an earlier run (a crash, a kill -9); return their names."""
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(PREFIX) and name.endswith(SUFFIX) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def sweepAll(directory: str) -> list[str]:
    """
    L{sweep} C{directory} and every worker's subdirectory of it (C{worker-N}, of this run's
    workers or an earlier run's, with more workers or one); the names, relative to it.
    """
    removed = sweep(directory)
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith("worker-") and name[7:].isdigit() and os.path.isdir(path):
            removed += [os.path.join(name, left) for left in sweep(path)]
    return removed
