"""
Benchmark: the mime filter on a big many-part message, and on a MIME bomb.

    PYTHONPATH=. .venv/bin/python bench/mimemessage.py [--size-mb 100] [--parts 1000]

It reuses bigmessage.py's sink, client and process helpers. It starts the sink and two
proxies in front of it (C{twistd -n mailproxy}): one without filters, one with
C{[filters.mime]}, and sends, with a client that generates the message while it streams it:

  1. the clean message straight to the sink, then through both proxies (250 expected);
  2. the same message with a blocked attachment as its very last part, through the mime
     proxy (550: the whole message is walked);
  3. a 10,000-deep nested multipart through the mime proxy (554, at once).

It prints the times and the mime proxy's peak RSS (VmHWM, read from /proc before it is
stopped); the exit status is 1 when a reply is not the one expected or the peak RSS
misses bigmessage.py's target. See README.md, "### mime".
"""

from __future__ import annotations

import argparse
import base64
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bigmessage as big

MIME_CONFIG = (
    "[filters.mime]\n"
    'block_types = ["application/x-msdownload", "application/x-ms*"]\n'
    'block_filenames = ["*.exe", "*.scr", "*.js", "*.vbs", "*.bat"]\n'
)
BOMB_DEPTH = 10000
#: Each message/rfc822 group holds 4 entities: itself, a multipart, two leaves.
GROUP = 4


def _names(index: int) -> str:
    """Headers naming attachment C{index}, in turn plain, RFC 2231 and RFC 2047."""
    kind = index % 3
    if kind == 0:
        return f'Content-Disposition: attachment; filename="report-{index}.pdf"\r\n'
    if kind == 1:
        return (
            "Content-Disposition: attachment;\r\n"
            f" filename*0*=UTF-8''%D1%81%D1%87%D1%91%D1%82-{index}; filename*1*=.pdf\r\n"
        )
    encoded = base64.b64encode(f"Übersicht-{index}.pdf".encode()).decode()
    return f'Content-Disposition: attachment; filename="=?UTF-8?B?{encoded}?="\r\n'


def _leaf(index: int, size: int, block: bytes, last: str | None = None) -> Iterator[bytes]:
    """One base64 attachment of about C{size} bytes (C{last}: its file name instead)."""
    if last is None:
        yield ("Content-Type: application/pdf\r\n" + _names(index)).encode()
    else:
        yield f'Content-Type: application/octet-stream; name="{last}"\r\n'.encode()
    yield b"Content-Transfer-Encoding: base64\r\n\r\n"
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), big.roundUp(size - sent))]
        sent += len(chunk)
        yield chunk


def generateMessage(sizeBytes: int, parts: int, blocked: str | None = None) -> Iterator[bytes]:
    """
    A multipart/mixed message of C{parts} entities besides itself, about C{sizeBytes}
    long, streamed in chunks: plain attachments, and one in ten entities in groups of a
    message/rfc822 holding a multipart/alternative of two parts. C{blocked} replaces the
    last attachment by one of that name. Ends with the end-of-data line.
    """
    boundary = "=_mixed_" + secrets.token_hex(6)
    groups = parts // 10 // GROUP
    plain = parts - groups * GROUP
    leaves = plain + 2 * groups
    perLeaf = max(sizeBytes // max(leaves, 1), 78)
    block = big.lineBlock()
    yield (
        "From: <bench@client.example>\r\nTo: <sink@sink.example>\r\n"
        "Subject: mailproxy MIME benchmark\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        "This is a multi-part message in MIME format.\r\n"
    ).encode()
    step = plain // groups if groups else 0
    inserted = 0
    for i in range(plain):
        if inserted < groups and i % step == 0:
            inserted += 1
            inner = f"=_alt_{i}"
            yield (
                f"--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n"
                f"Subject: forwarded {i}\r\nMIME-Version: 1.0\r\n"
                f'Content-Type: multipart/alternative; boundary="{inner}"\r\n\r\n'
            ).encode()
            for j in range(2):
                yield f"--{inner}\r\n".encode()
                yield from _leaf(plain + 2 * i + j, perLeaf, block)
            yield f"--{inner}--\r\n".encode()
        yield f"--{boundary}\r\n".encode()
        yield from _leaf(i, perLeaf, block, blocked if i == plain - 1 else None)
    yield f"--{boundary}--\r\n.\r\n".encode()


def generateBomb(depth: int) -> Iterator[bytes]:
    """A multipart nested C{depth} levels deep, each level one part: the next level."""
    for i in range(depth):
        yield b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
    yield b"Content-Type: text/plain\r\n\r\nbottom\r\n.\r\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=100.0, help="message size in MiB")
    parser.add_argument("--parts", type=int, default=1000, help="MIME entities besides the message")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    sizeBytes = int(args.size_mb * big.MIB)
    workdir = Path(tempfile.mkdtemp(prefix="mailproxy-bench-mime."))
    sink, sinkPort = big.startSink(workdir)
    proxies: list[subprocess.Popen[bytes]] = []
    failures: list[str] = []

    def run(label: str, port: int, chunks: Iterator[bytes], want: int) -> float:
        elapsed, _, code, text = big.transaction(port, chunks)
        print(f"{label:<34} {elapsed:7.2f} s  {text}")
        if code != want:
            failures.append(f"{label}: expected {want}, got {text!r}")
        return elapsed

    try:
        plain, plainPort = big.startProxy(workdir / "plain", sinkPort, sizeBytes)
        proxies.append(plain)
        mime, mimePort = big.startProxy(workdir / "mime", sinkPort, sizeBytes, MIME_CONFIG)
        proxies.append(mime)
        baseline = big.memory(mime.pid)

        print(f"message: {sizeBytes / big.MIB:.0f} MiB, {args.parts} MIME parts, base64 lines")
        direct = run("direct to the sink", sinkPort, generateMessage(sizeBytes, args.parts), 250)
        unfiltered = run("through mailproxy, no filter", plainPort, generateMessage(sizeBytes, args.parts), 250)
        filtered = run("through mailproxy, mime filter", mimePort, generateMessage(sizeBytes, args.parts), 250)
        blocked = run(
            "last part blocked, mime filter",
            mimePort,
            generateMessage(sizeBytes, args.parts, blocked="zz-invoice.exe"),
            550,
        )
        bomb = run(f"{BOMB_DEPTH}-deep nesting, mime filter", mimePort, generateBomb(BOMB_DEPTH), 554)
        after = big.memory(mime.pid)
    finally:
        for process in proxies:
            big.stop(process)
        big.stop(sink)

    peak = after["VmHWM"]
    ok = peak < big.PEAK_RSS_TARGET_MB and not failures
    print()
    print(f"time ratio:          {filtered / direct:.2f}x mime proxy / direct, "
          f"{unfiltered / direct:.2f}x plain proxy / direct")  # fmt: skip
    print(f"mime filter cost:    {filtered - unfiltered:+.2f} s on the clean message "
          f"(walk of all {args.parts} parts)")  # fmt: skip
    print(f"bomb refused in:     {bomb:.2f} s (client's whole transaction)")
    print(f"blocked, walked in:  {blocked:.2f} s (refused, nothing released)")
    print(f"mime proxy RSS at start:  {baseline['VmRSS']:.1f} MiB")
    print(f"mime proxy RSS at end:    {after['VmRSS']:.1f} MiB")
    print(
        f"mime proxy peak RSS:      {peak:.1f} MiB (VmHWM) -- target < "
        f"{big.PEAK_RSS_TARGET_MB:.0f} MiB: {'met' if peak < big.PEAK_RSS_TARGET_MB else 'MISSED'}"
    )
    for failure in failures:
        print(f"UNEXPECTED: {failure}")
    big.removeWorkdir(workdir, args.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
