"""
Benchmark: one client flooding pipelined NOOPs through mailproxy to a fast MTA while
other clients each do one short session; the short sessions' times with and without the
per-turn cap (C{[limits] commands_per_turn}), in the same run.

    PYTHONPATH=. .venv/bin/python bench/fairness.py [--noops 50000] [--sessions 5]

Every party is its own process on 127.0.0.1, so that none waits for another's share of a
Python lock: a sink MTA (this script with C{--sink}: one process, one C{selectors} loop,
every complete line of a read answered in one write, so that it is both fast and fair and
what is measured is the proxy);
for each cap in turn, mailproxy (C{twistd -n mailproxy}) in front of it; the flooder (this
script with C{--flood}), which writes EHLO and all its NOOPs at once and reads the replies
as fast as they come (it is not the slow reader of the back-pressure case); and this
process, which, once the flood's first replies are in, runs the short sessions one after
the other (EHLO, MAIL, RCPT, DATA, a small message, QUIT), each timed from connect to the
221. It prints, per cap, a short session's time with no flood, the short sessions' median
and worst time during the flood, how many of them finished before the flood did, the
flood's duration and the proxy's CPU seconds over it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bigmessage  # the processes and the client are shared

HOST = bigmessage.HOST
#: Without a cap: more lines than a session ever has buffered at once.
UNCAPPED = 1_000_000


def cpuSeconds(pid: int) -> float:
    """User and system CPU time of C{pid} so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(port: int, noops: int) -> int:
    """
    The flooder (C{--flood}): EHLO and C{noops} NOOPs written at once by a thread, every
    reply read as it comes; prints C{first} once 1000 replies are in, then C{done SECONDS
    REPLIES}.
    """
    import threading

    sock = socket.create_connection((HOST, port), timeout=bigmessage.REPLY_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    payload = b"EHLO flood.bench\r\n" + b"NOOP\r\n" * noops
    threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
    wanted, replies, buffer, first = noops + 2, 0, b"", False
    while replies < wanted:
        data = sock.recv(262144)
        if not data:
            break
        buffer += data
        lines = buffer.split(b"\r\n")
        buffer = lines.pop()
        replies += sum(1 for line in lines if line[3:4] == b" ")  # final lines only
        if not first and replies > 1000:
            first = True
            print("first", flush=True)
    print(f"done {time.perf_counter() - start} {replies}", flush=True)
    sock.close()
    return 0


_ANSWERS = {
    b"EHLO": b"250-sink.bench\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"DATA": b"354 go ahead\r\n",
    b"QUIT": b"221 2.0.0 bye\r\n",
}


def sink(port: int) -> int:
    """
    The sink (C{--sink}): every connection in one C{selectors} loop; each read's complete
    lines answered with one write (C{250 2.0.0 Ok} unless L{_ANSWERS} says otherwise), a
    message skipped to its CRLF.CRLF.
    """
    server = socket.create_server((HOST, port))
    server.setblocking(False)
    loop = selectors.DefaultSelector()
    loop.register(server, selectors.EVENT_READ)
    state: dict[socket.socket, list[bytes | bool]] = {}
    while True:
        for key, _ in loop.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.sendall(b"220 sink.bench ESMTP\r\n")
                loop.register(conn, selectors.EVENT_READ)
                state[conn] = [b"", False]
                continue
            data = sock.recv(262144)
            if not data:
                loop.unregister(sock)
                del state[sock]
                sock.close()
                continue
            buffered, inData = state[sock]
            assert isinstance(buffered, bytes)
            buffer, out = buffered + data, []
            while True:
                if inData:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        buffer = buffer[-4:]
                        break
                    buffer, inData = buffer[end + 5 :], False
                    out.append(b"250 2.0.0 Ok: queued as SINK\r\n")
                    continue
                line, sep, rest = buffer.partition(b"\r\n")
                if not sep:
                    break
                buffer = rest
                verb = line[:4].upper()
                out.append(_ANSWERS.get(verb, b"250 2.0.0 Ok\r\n"))
                if verb == b"DATA":
                    buffer, inData = b"\r\n" + buffer, True
            state[sock] = [buffer, inData]
            if out:
                sock.sendall(b"".join(out))


def startMta(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The sink (C{--sink}), greeting on its port."""
    port = bigmessage.freePort()
    log = workdir / "sink.log"
    with log.open("wb") as out:
        mta = subprocess.Popen(
            [sys.executable, __file__, "--sink", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    bigmessage._greeted(port, mta, log)
    return mta, port


def shortSession(port: int) -> float:
    """One whole short session; its seconds from connect to the 221."""
    start = time.perf_counter()
    client = bigmessage.SMTPClient(port)
    client.expect(220, "connect")
    client.command("EHLO short.bench", 250)
    client.command("MAIL FROM:<a@example.org>", 250)
    client.command("RCPT TO:<b@example.net>", 250)
    client.command("DATA", 354)
    client.command("Subject: short\r\n\r\nhello\r\n.", 250)
    client.close()
    return time.perf_counter() - start


def run(workdir: Path, sinkPort: int, cap: int, noops: int, sessions: int) -> dict[str, float]:
    extra = f"commands = {noops + 100}\ncommands_per_turn = {cap}\n"
    proxy, port = bigmessage.startProxy(workdir, sinkPort, bigmessage.MIB, extra)
    try:
        alone = statistics.median(shortSession(port) for _ in range(3))
        cpuBefore = cpuSeconds(proxy.pid)
        flooder = subprocess.Popen(
            [sys.executable, __file__, "--flood", str(port), "--noops", str(noops)],
            stdout=subprocess.PIPE,
        )
        assert flooder.stdout is not None
        if flooder.stdout.readline().strip() != b"first":
            raise RuntimeError("the flooder got no replies")
        times, during = [], 0
        for _ in range(sessions):
            times.append(shortSession(port))
            during += flooder.poll() is None
        _, seconds, replies = flooder.stdout.readline().split()
        flooder.wait(bigmessage.REPLY_TIMEOUT)
        cpu = cpuSeconds(proxy.pid) - cpuBefore
    finally:
        bigmessage.stop(proxy)
    return {
        "alone": alone,
        "flood": float(seconds),
        "replies": int(replies),
        "median": statistics.median(times),
        "worst": max(times),
        "during": during,
        "cpu": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--noops", type=int, default=50_000, help="NOOPs the flooder sends")
    parser.add_argument("--sessions", type=int, default=5, help="short sessions during it")
    parser.add_argument("--cap", type=int, default=100, help="commands_per_turn to compare")
    parser.add_argument("--flood", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood:
        return flood(args.flood, args.noops)
    if args.sink:
        return sink(args.sink)
    workdir = Path(tempfile.mkdtemp(prefix="mailproxy-fairness-"))
    mta, sinkPort = startMta(workdir)
    try:
        results = {
            cap: run(workdir / f"cap-{cap}", sinkPort, cap, args.noops, args.sessions)
            for cap in (args.cap, UNCAPPED)
        }
    finally:
        bigmessage.stop(mta)
        bigmessage.removeWorkdir(workdir, keep=False)
    print(f"flood: {args.noops} pipelined NOOPs; {args.sessions} short sessions during it")
    print(
        f"{'commands_per_turn':>18} {'alone':>8} {'median':>8} {'worst':>8} "
        f"{'during flood':>12} {'flood':>8} {'proxy CPU':>10}"
    )
    for cap, r in results.items():
        name = "no cap" if cap == UNCAPPED else str(cap)
        print(
            f"{name:>18} {r['alone'] * 1000:7.1f}ms {r['median'] * 1000:7.1f}ms "
            f"{r['worst'] * 1000:7.1f}ms {int(r['during']):>8}/{args.sessions:<3} "
            f"{r['flood']:7.2f}s {r['cpu']:9.2f}s"
        )
        if r["replies"] != args.noops + 2:
            print(f"  the flooder got {int(r['replies'])} replies of {args.noops + 2}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
