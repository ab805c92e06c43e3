"""
The spool: one private temporary file per message, written as the content arrives.

Files are created with mode 0600 in the configured directory, capped in size while
writing, removed at the end of every transaction, and swept at start-up. The spool
needs no fsync: nothing is acknowledged to the client before the MTA has it.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

from mailproxy.envelope import Message

PREFIX = "mailproxy-"
SUFFIX = ".msg"


class Spool:
    """
    One message being written to disk.

    Writes past C{maxSize} are dropped and noted in L{overflowed}; a failed write (disk
    full) is kept in L{error} and later writes are dropped, so the relay can answer
    once the client has finished sending.
    """

    def __init__(self, directory: str, maxSize: int) -> None:
        """@raise OSError: the file cannot be created."""
        fd, self.path = tempfile.mkstemp(prefix=PREFIX, suffix=SUFFIX, dir=directory)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
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
            self._file.write(data)
        except OSError as e:
            self.error = e

    def close(self) -> None:
        """Finish writing; a failure to flush counts as a write error."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError as e:
            self.error = self.error or e
        self._file = None

    def message(self) -> Message:
        return Message(self.path, self.size)

    def remove(self) -> None:
        """Close and delete the file; safe to call more than once."""
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
