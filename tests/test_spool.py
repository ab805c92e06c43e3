"""
Tests for L{mailproxy.spool}: private files, the size cap, write failures, cleanup and
the start-up sweep.
"""

from __future__ import annotations

import errno
import os
import stat

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailproxy.envelope import Message
from mailproxy.spool import PREFIX, SUFFIX, Spool, sweep


class FullDisk:
    """A file whose every write fails as on a full disk; it counts the attempts."""

    def __init__(self) -> None:
        self.writes = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.writes += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        self.closed = True


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def spool(self, maxSize: int = 1000) -> Spool:
        spool = Spool(self.directory, maxSize)
        self.addCleanup(spool.remove)
        return spool

    def test_private(self) -> None:
        """The file is a regular file in the configured directory, readable only by us."""
        spool = self.spool()
        self.assertEqual(os.path.dirname(spool.path), self.directory)
        name = os.path.basename(spool.path)
        self.assertTrue(name.startswith(PREFIX) and name.endswith(SUFFIX), name)
        mode = os.stat(spool.path).st_mode
        self.assertTrue(stat.S_ISREG(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_noDirectory(self) -> None:
        """A spool directory that does not exist is an OSError at creation."""
        self.assertRaises(OSError, Spool, os.path.join(self.directory, "missing"), 10)

    def test_content(self) -> None:
        """What is written is on disk once closed, and the message names it and its size."""
        spool = self.spool()
        for chunk in (b"Subject: x\r\n", b"", b"\r\nbody\r\n"):
            spool.write(chunk)
        spool.close()
        self.assertTrue(spool.usable)
        self.assertEqual(read(spool.path), b"Subject: x\r\n\r\nbody\r\n")
        message = spool.message()
        self.assertEqual(message, Message(spool.path, 20))
        with message.open() as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nbody\r\n")

    def test_exactlyMaxSize(self) -> None:
        """A message of exactly the limit is kept whole."""
        spool = self.spool(maxSize=10)
        spool.write(b"x" * 4)
        spool.write(b"y" * 6)
        spool.close()
        self.assertEqual((spool.overflowed, spool.usable), (False, True))
        self.assertEqual(read(spool.path), b"xxxxyyyyyy")

    def test_oneByteOver(self) -> None:
        """One byte over the limit is an overflow, and that write is dropped."""
        spool = self.spool(maxSize=10)
        spool.write(b"x" * 10)
        spool.write(b"y")
        spool.close()
        self.assertTrue(spool.overflowed)
        self.assertEqual(read(spool.path), b"x" * 10)

    def test_overflow(self) -> None:
        """Past the limit the spool notes the overflow and writes nothing more."""
        spool = self.spool(maxSize=10)
        spool.write(b"a" * 6)
        spool.write(b"b" * 6)
        spool.write(b"c" * 1000)
        spool.close()
        self.assertTrue(spool.overflowed)
        self.assertFalse(spool.usable)
        self.assertIsNone(spool.error)
        self.assertEqual(read(spool.path), b"a" * 6)
        self.assertEqual(spool.size, 1012)

    def test_writeError(self) -> None:
        """A failed write is kept in C{error}; later writes are not tried."""
        spool = self.spool()
        spool.write(b"first\r\n")
        real = spool._file
        assert real is not None
        real.close()
        disk = FullDisk()
        spool._file = disk  # type: ignore[assignment]
        spool.write(b"second\r\n")
        spool.write(b"third\r\n")
        self.assertIsInstance(spool.error, OSError)
        assert spool.error is not None
        self.assertEqual(spool.error.errno, errno.ENOSPC)
        self.assertFalse(spool.usable)
        self.assertEqual(disk.writes, 1)
        spool.remove()
        self.assertTrue(disk.closed)
        self.assertFalse(os.path.exists(spool.path))

    def test_devFull(self) -> None:
        """A disk that fills when the buffer is flushed at close counts as a write error."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full here")
        spool = self.spool()
        real = spool._file
        assert real is not None
        real.close()
        spool._file = open("/dev/full", "wb")
        spool.write(b"short\r\n")
        spool.close()
        assert spool.error is not None
        self.assertEqual(spool.error.errno, errno.ENOSPC)
        self.assertFalse(spool.usable)

    def test_devFullLargeWrite(self) -> None:
        """A write larger than the buffer fails at once and is kept in C{error}."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full here")
        spool = self.spool(maxSize=10**7)
        real = spool._file
        assert real is not None
        real.close()
        spool._file = open("/dev/full", "wb")
        spool.write(b"x" * 1_000_000)
        assert spool.error is not None
        self.assertEqual(spool.error.errno, errno.ENOSPC)

    def test_remove(self) -> None:
        """C{remove} deletes the file, open or closed, and may be called again."""
        spool = self.spool()
        spool.write(b"data")
        spool.remove()
        self.assertFalse(os.path.exists(spool.path))
        spool.remove()
        self.assertEqual(os.listdir(self.directory), [])

    def test_removeAfterClose(self) -> None:
        """A closed spool is removed the same way."""
        spool = self.spool()
        spool.close()
        spool.close()
        spool.remove()
        self.assertEqual(os.listdir(self.directory), [])


class SweepTests(SynchronousTestCase):
    def test_sweep(self) -> None:
        """Only files named like ours are removed at start-up; they are reported."""
        directory = self.mktemp()
        os.makedirs(directory)
        ours = ["mailproxy-abc123.msg", "mailproxy-zz.msg"]
        others = ["mailproxy-abc.txt", "other.msg", "notes", "xmailproxy-1.msg"]
        for name in ours + others:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"x")
        self.assertEqual(sweep(directory), ours)
        self.assertEqual(sorted(os.listdir(directory)), sorted(others))
        self.assertEqual(sweep(directory), [])

    def test_sweepLeftoverSpool(self) -> None:
        """A spool file left open by an earlier run is swept."""
        directory = self.mktemp()
        os.makedirs(directory)
        spool = Spool(directory, 100)
        self.addCleanup(spool.remove)
        spool.write(b"half a message")
        self.assertEqual(sweep(directory), [os.path.basename(spool.path)])
        self.assertEqual(os.listdir(directory), [])
