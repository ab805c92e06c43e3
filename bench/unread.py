"""
Clients that send commands and never read the replies: does the proxy's memory stay bounded?

The issue that asked for back-pressure measured a proxy going from 73 to 233 MB of RSS under
such clients, and staying there after they left. This starts the real proxy (twistd) in front
of the stand-in MTA, greets N clients (each reads its banner, so none is an early talker),
then has each write pipelined NOOPs as fast as the proxy takes them, for a bounded time,
without ever reading; then they close. The proxy's RSS and open files are sampled
throughout, and the bytes each client got written.

    PYTHONPATH=. .venv/bin/python bench/unread.py                   # 10 clients, 20 s
    PYTHONPATH=. .venv/bin/python bench/unread.py --clients 50 --seconds 30
    PYTHONPATH=. .venv/bin/python bench/unread.py --reply-buffer 1073741824   # ~no bound
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bigmessage import HOST, freePort, stop, twistdCommand
from soak import StandInMTA, childEnv, fdCount, rssMiB

CHUNK = b"NOOP\r\n" * 2000


def config(workdir: Path, port: int, upstream: str, replyBuffer: int) -> str:
    return f"""\
[proxy]
listen = "tcp:{port}:interface={HOST}:backlog=1024"
upstream = "{upstream}"
spool_dir = "{workdir / "spool"}"
hostname = "mailproxy.bench"
client_names = "off"
# One process: the one measured.
workers = 1

[limits]
connections = 500
connections_per_client = 500
commands = 100000000
reply_buffer = {replyBuffer}
"""


def client(port: int, seconds: float, sent: list[int]) -> None:
    """Greet, then write NOOPs without reading for C{seconds}; C{sent} gets the bytes written."""
    total = 0
    with socket.create_connection((HOST, port), 10) as s:
        s.recv(4096)  # the banner: no early talking
        s.sendall(b"EHLO bench.example\r\n")
        s.settimeout(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                total += s.send(CHUNK)
            except TimeoutError:
                continue  # the proxy stopped reading us: that is the point
            except OSError:
                break
    sent.append(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--reply-buffer", type=int, default=262144)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailproxy-unread-") as tmp:
        workdir = Path(tmp)
        mta = StandInMTA(workdir)
        mta.start()
        port = freePort()
        path = workdir / "mailproxy.toml"
        path.write_text(config(workdir, port, mta.upstream, args.reply_buffer))
        with (workdir / "proxy.log").open("wb") as log:
            proxy = subprocess.Popen(
                [*twistdCommand(), "-n", "--pidfile=", "mailproxy", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=childEnv(),
                cwd=workdir,
            )
        try:
            for _ in range(200):
                try:
                    socket.create_connection((HOST, port), 1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            time.sleep(0.5)
            start = (rssMiB(proxy.pid), fdCount(proxy.pid))
            peak = list(start)
            sent: list[int] = []
            threads = [
                threading.Thread(target=client, args=(port, args.seconds, sent))
                for _ in range(args.clients)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak[0] = max(peak[0], rssMiB(proxy.pid))
                peak[1] = max(peak[1], fdCount(proxy.pid))
                time.sleep(0.2)
            for t in threads:
                t.join()
            time.sleep(3)  # the sessions notice their clients left
            end = (rssMiB(proxy.pid), fdCount(proxy.pid))
        finally:
            stop(proxy)
            mta.close()
    written = sum(sent)
    print(f"{args.clients} clients, {args.seconds:g} s each, reply_buffer = {args.reply_buffer}")
    print(f"NOOPs written by the clients: {written // 6} ({written / 2**20:.1f} MiB)")
    print(f"{'':14}{'start':>8}{'peak':>8}{'end':>8}")
    print(f"{'RSS (MiB)':14}{start[0]:8.1f}{peak[0]:8.1f}{end[0]:8.1f}")
    print(f"{'open files':14}{start[1]:8d}{peak[1]:8d}{end[1]:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
