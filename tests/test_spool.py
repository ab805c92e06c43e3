"""
Tests for L{mailproxy.spool}: private files, the size cap, write failures, cleanup and
the start-up sweep; the release's L{SpoolSender}.
"""

from __future__ import annotations

import errno
import io
import os
import stat

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IPullProducer
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.envelope import Message
from mailproxy.spool import PREFIX, RELEASE_CHUNK, SUFFIX, Spool, SpoolSender, sweep, sweepAll
from mailproxy.wire import Stuffer
from tests.test_wire import contents, stuffWhole


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
        """
        A disk that is full fails the write itself (the spool is unbuffered: nothing is
        left to fail at close), and the error is kept.
        """
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full here")
        spool = self.spool()
        real = spool._file
        assert real is not None
        real.close()
        spool._file = open("/dev/full", "wb", buffering=0)
        spool.write(b"short\r\n")
        assert spool.error is not None
        self.assertEqual(spool.error.errno, errno.ENOSPC)
        self.assertFalse(spool.usable)
        spool.close()
        self.assertFalse(spool.usable)

    def test_readerOutlivesRemoval(self) -> None:
        """
        The release's reader starts at the beginning, and keeps reading the message after
        the spool is removed (an MTA that answers before the release ends); each reader
        is a file of its own.
        """
        spool = self.spool()
        spool.write(b"Subject: x\r\n\r\nbody\r\n")
        spool.close()
        reader = spool.reader()
        self.addCleanup(reader.close)
        self.assertEqual(reader.read(9), b"Subject: ")
        again = spool.reader()  # a second release: the file opened again, from its start
        self.addCleanup(again.close)
        self.assertEqual(again.read(), b"Subject: x\r\n\r\nbody\r\n")
        spool.remove()
        self.assertEqual(reader.read(), b"x\r\n\r\nbody\r\n")
        self.assertRaises(OSError, spool.reader)

    def test_namesDiffer(self) -> None:
        """Every spool of a process has its own file, even past a name already taken."""
        first = self.spool()
        taken = first.path.replace(f"-{first.path.rsplit('-', 1)[1]}", "")
        serial = int(first.path[len(taken) + 1 : -len(SUFFIX)])
        with open(f"{taken}-{serial + 1}{SUFFIX}", "wb"):
            pass  # the next name, left by an earlier process of the same pid
        second = self.spool()
        self.assertNotIn(second.path, (first.path, f"{taken}-{serial + 1}{SUFFIX}"))
        self.assertEqual(read(second.path), b"")

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

    def test_sweepAll(self) -> None:
        """
        At start-up, however many workers run now, the files every worker of an earlier
        run left are swept too, and nothing else.
        """
        directory = self.mktemp()
        for sub in ("worker-1", "worker-7", "worker-x", "other"):
            os.makedirs(os.path.join(directory, sub))
        for path in ("mailproxy-a.msg", "worker-1/mailproxy-b.msg", "worker-7/mailproxy-c.msg",
                     "worker-x/mailproxy-d.msg", "other/mailproxy-e.msg"):  # fmt: skip
            with open(os.path.join(directory, path), "wb") as f:
                f.write(b"x")
        self.assertEqual(
            sweepAll(directory),
            ["mailproxy-a.msg", "worker-1/mailproxy-b.msg", "worker-7/mailproxy-c.msg"],
        )
        self.assertEqual(os.listdir(os.path.join(directory, "worker-x")), ["mailproxy-d.msg"])
        self.assertEqual(os.listdir(os.path.join(directory, "other")), ["mailproxy-e.msg"])

    def test_sweepLeftoverSpool(self) -> None:
        """A spool file left open by an earlier run is swept."""
        directory = self.mktemp()
        os.makedirs(directory)
        spool = Spool(directory, 100)
        self.addCleanup(spool.remove)
        spool.write(b"half a message")
        self.assertEqual(sweep(directory), [os.path.basename(spool.path)])
        self.assertEqual(os.listdir(directory), [])


class PullConsumer:
    """
    A consumer as Twisted's socket transports are for a pull producer: it asks for the
    first write when the producer registers, and for the next one each time L{drain}
    says the last has been sent. It records every write.
    """

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer: SpoolSender | None = None

    def registerProducer(self, producer: SpoolSender, streaming: bool) -> None:
        assert not streaming
        self.producer = producer
        producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def drain(self) -> None:
        if self.producer is not None:
            self.producer.resumeProducing()


def release(content: bytes, chunkSize: int = RELEASE_CHUNK) -> tuple[PullConsumer, list[object]]:
    """Release C{content} as after DATA (headers, stuffing, the dot), draining the consumer."""
    consumer = PullConsumer()
    sender = SpoolSender(
        io.BufferedReader(io.BytesIO(content)),  # type: ignore[arg-type]
        prefix=b"X-H: 1\r\n",
        suffix=b".\r\n",
        transform=Stuffer(),
        chunkSize=chunkSize,
    )
    results: list[object] = []
    sender.beginTransfer(consumer).addBoth(results.append)
    for _ in range(len(content) // chunkSize + 2):
        consumer.drain()
    return consumer, results


class SpoolSenderTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """A L{SpoolSender} is a pull producer."""
        self.assertTrue(verifyObject(IPullProducer, SpoolSender(io.BytesIO())))  # type: ignore[arg-type]

    def test_smallMessageOneWrite(self) -> None:
        """
        A message smaller than a chunk reaches the MTA in one write: headers, the stuffed
        content and the final dot; the transfer is done once that write is taken.
        """
        consumer = PullConsumer()
        sender = SpoolSender(
            io.BytesIO(b"Subject: a\r\n\r\n.hi\r\n"),  # type: ignore[arg-type]
            prefix=b"X-H: 1\r\n",
            suffix=b".\r\n",
            transform=Stuffer(),
        )
        done = sender.beginTransfer(consumer)
        self.assertEqual(consumer.writes, [b"X-H: 1\r\nSubject: a\r\n\r\n..hi\r\n.\r\n"])
        self.assertNoResult(done)
        consumer.drain()
        self.assertIsNone(self.successResultOf(done))
        self.assertIsNone(consumer.producer)

    def test_largeMessageFewWrites(self) -> None:
        """A megabyte goes in a few large writes, not one per 16 KiB (Twisted's FileSender)."""
        content = (b"x" * 998 + b"\r\n") * 1024
        consumer, results = release(content)
        self.assertEqual(results, [None])
        self.assertLessEqual(len(consumer.writes), len(content) // RELEASE_CHUNK + 1)
        self.assertEqual(b"".join(consumer.writes), b"X-H: 1\r\n" + content + b".\r\n")

    @settings(max_examples=200, deadline=None)
    @given(contents, st.integers(min_value=1, max_value=4000))
    def test_anyChunkSize(self, content: bytes, chunkSize: int) -> None:
        """
        Whatever the chunk size (every split point of the content), the MTA receives the
        headers, the content stuffed as a whole and the dot, in one write per chunk.
        """
        consumer, results = release(content, chunkSize)
        self.assertEqual(results, [None])
        self.assertEqual(
            b"".join(consumer.writes), b"X-H: 1\r\n" + stuffWhole(content) + b".\r\n"
        )
        self.assertEqual(len(consumer.writes), len(content) // chunkSize + 1)

    def test_stopped(self) -> None:
        """The consumer's connection lost mid-transfer: the transfer fails, nothing more is written."""
        consumer = PullConsumer()
        sender = SpoolSender(io.BytesIO(b"a\r\n" * 100), chunkSize=16)  # type: ignore[arg-type]
        done = sender.beginTransfer(consumer)
        sender.stopProducing()
        self.failureResultOf(done, ConnectionError)
        consumer.drain()
        self.assertEqual(len(consumer.writes), 1)
