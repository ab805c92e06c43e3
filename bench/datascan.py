"""
The CPU the DATA path costs per megabyte, without sockets: the scanner on the buffers
the relay reads (up to 256 KiB: C{limits.reply_buffer}), the release's stuffing on its
256 KiB chunks, and the whole-buffer operations they are made of on the same buffers;
each the best of several timeit runs (repeatable where a whole load's CPU time is not).

    PYTHONPATH=. .venv/bin/python bench/datascan.py             # this checkout
    PYTHONPATH=../other .venv/bin/python bench/datascan.py      # another, to compare

The content is a 1 MiB message of 78-byte CRLF lines of words and sentences; C{--dots N}
starts every Nth line with a dot (stuffed on the wire).
"""

from __future__ import annotations

import argparse
import random
import re
import timeit
from collections.abc import Callable

from mailproxy import wire

MB = 1 << 20
WORDS = (
    b"the of and to in is that for it as with was on be by this are at from or an have not "
    b"message mail proxy filter header body line relay spool release client server"
).split()


def message(dots: int) -> bytes:
    """About a MiB of 76-character lines (sentences end in dots) and CRLF."""
    rng = random.Random(1)
    lines = []
    while sum(map(len, lines)) < MB:
        line = b""
        while len(line) < 76:
            line += rng.choice(WORDS) + (b". " if rng.random() < 0.1 else b" ")
        line = line[:76]
        if dots and len(lines) % dots == 0:
            line = b"." + line[1:]
        lines.append(line + b"\r\n")
    return b"".join(lines)


def best(f: Callable[[], object], number: int = 20) -> float:
    """Milliseconds per call of C{f}, the best of 7 runs."""
    return min(timeit.repeat(f, number=number, repeat=7)) / number * 1000


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def each(op: Callable[[bytes], object], buffers: list[bytes]) -> Callable[[], object]:
    return lambda: [op(buffer) for buffer in buffers]


def scanData(stream: bytes, normalise: bool, size: int) -> Callable[[], object]:
    buffers = pieces(stream, size)

    def run() -> object:
        scanner = wire.DataScanner(normalise)
        for buffer in buffers:
            scanner.feed(buffer)
        assert scanner.done and not scanner.bare
        return scanner

    return run


def stuff(content: bytes, size: int = 256 * 1024) -> Callable[[], object]:
    chunks = pieces(content, size)

    def run() -> object:
        stuffer = wire.Stuffer()
        return [stuffer(chunk) for chunk in chunks]

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dots", type=int, default=0, help="start every Nth line with a dot")
    p.add_argument("--buffer", type=int, default=256 * 1024, help="bytes per received buffer")
    a = p.parse_args()
    content = message(a.dots)
    stream = content.replace(b"\r\n.", b"\r\n..").removeprefix(b".") + b".\r\n"
    if content.startswith(b"."):
        stream = b"." + stream
    scale = MB / len(content)  # per MiB of content
    scanner = scanData(stream, False, a.buffer)()
    dotLines = getattr(scanner, "dotLines", "(none)")
    print(f"{len(content)} bytes of content in {a.buffer}-byte buffers, dot lines: {dotLines}")
    buffers, chunks = pieces(stream, a.buffer), pieces(content, 256 * 1024)
    rows: list[tuple[str, Callable[[], object]]] = [
        ("DataScanner.feed, reject mode", scanData(stream, False, a.buffer)),
        ("DataScanner.feed, normalise mode", scanData(stream, True, a.buffer)),
        ("Stuffer(), 256 KiB chunks", stuff(content)),
    ]
    if dotLines is False:
        stuffer = wire.Stuffer()
        rows.append(("Stuffer().dotFree (no dot line), same", each(stuffer.dotFree, chunks)))
    rows += [
        ("  find CRLF.CRLF", each(lambda b: b.find(b"\r\n.\r\n"), buffers)),
        ("  split CRLF dot", each(lambda b: b.split(b"\r\n."), buffers)),
        ("  replace CRLF dot", each(lambda b: b.replace(b"\r\n.", b"\r\n"), buffers)),
        ("  count CRLF", each(lambda b: b.count(b"\r\n"), buffers)),
        ("  count CR", each(lambda b: b.count(b"\r"), buffers)),
        ("  count LF", each(lambda b: b.count(b"\n"), buffers)),
        ("  NUL in (memchr)", each(lambda b: b"\x00" in b, buffers)),
        ("  regex normalise", each(lambda b: re.sub(rb"\r\n|\r|\n", b"\r\n", b), buffers)),
        ("  replace LF dot (stuffing)", each(lambda b: b.replace(b"\n.", b"\n.."), chunks)),
    ]
    if hasattr(wire, "_hasBare"):
        rows.append(("  _hasBare (two translates)", each(wire._hasBare, buffers)))
    for name, f in rows:
        print(f"{name:40s} {best(f) * scale:6.3f} ms/MB")


if __name__ == "__main__":
    main()
