"""
Benchmark: one big message through mailproxy, against the same message sent straight to the
sink MTA, with the proxy's peak memory.

    PYTHONPATH=. .venv/bin/python bench/bigmessage.py [--size-mb 100] [--parts 1]

It starts a raw SMTP sink (this script with C{--sink}: counts bytes, keeps nothing) and
mailproxy (C{twistd -n mailproxy}) in front of it, both as subprocesses on 127.0.0.1, then sends
the message once directly to the sink and once through the proxy with a blocking socket
client that generates the message while it streams it (76-character lines), and prints the
times, their ratio and the proxy's peak RSS (VmHWM, read from /proc before it is stopped).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

HOST = "127.0.0.1"
MIB = 1024 * 1024
LINE_LENGTH = 76
CHUNK = 256 * 1024
START_TIMEOUT = 20.0
REPLY_TIMEOUT = 600.0
PEAK_RSS_TARGET_MB = 80.0
END_OF_DATA = b"\r\n.\r\n"

# --- the sink ------------------------------------------------------------------------------


class SinkHandler(socketserver.BaseRequestHandler):
    """One SMTP session that accepts everything and keeps only a byte count of each message."""

    request: socket.socket

    def send(self, line: str) -> None:
        """Write one reply line."""
        self.request.sendall(line.encode() + b"\r\n")

    def handle(self) -> None:
        """Answer commands line by line; in DATA, scan whole buffers for CRLF.CRLF."""
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send("220 sink.bench ESMTP")
        buffer = b""
        while True:
            while b"\r\n" not in buffer:
                chunk = sock.recv(CHUNK)
                if not chunk:
                    return
                buffer += chunk
                if len(buffer) > 65536:
                    self.send("500 5.5.2 line too long")
                    return
            line, buffer = buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                sock.sendall(
                    b"250-sink.bench\r\n250-PIPELINING\r\n250-SIZE 0\r\n250-8BITMIME\r\n"
                    b"250 ENHANCEDSTATUSCODES\r\n"
                    if verb == b"EHLO"
                    else b"250 sink.bench\r\n"
                )
            elif verb in (b"MAIL", b"RSET", b"NOOP"):
                self.send("250 2.0.0 Ok")
            elif verb == b"RCPT":
                self.send("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.send("354 End data with <CR><LF>.<CR><LF>")
                result = self.readData(buffer)
                if result is None:
                    return
                size, buffer = result
                self.send(f"250 2.0.0 Ok: queued as {secrets.token_hex(5).upper()} size={size}")
            elif verb == b"QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("502 5.5.1 command not implemented")

    def readData(self, buffer: bytes) -> tuple[int, bytes] | None:
        """Read content until CRLF.CRLF; returns its size (as sent, the last line's CRLF
        included) and the bytes after it, or None when the connection was lost. Memory
        stays at one chunk."""
        # The CRLF ending the DATA command line counts towards the end-of-data marker.
        tail = b"\r\n"
        received = 0
        pending = buffer
        while True:
            if not pending:
                pending = self.request.recv(CHUNK)
                if not pending:
                    return None
            window = tail + pending
            at = window.find(END_OF_DATA)
            if at >= 0:
                end = at + len(END_OF_DATA) - len(tail)
                return received + end - len(b".\r\n"), pending[end:]
            received += len(pending)
            tail = window[-(len(END_OF_DATA) - 1) :]
            pending = b""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def runSink(port: int) -> None:
    """Serve the sink on 127.0.0.1:C{port} until SIGTERM."""
    with _Server((HOST, port), SinkHandler) as server:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.serve_forever()


# --- the message -----------------------------------------------------------------------------


def lineBlock(lines: int = 1024) -> bytes:
    """A block of distinct 76-character base64-alphabet lines (no line starts with a dot)."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    rows = []
    for i in range(lines):
        row = bytes(alphabet[(i * 7 + j * 13) % 64] for j in range(LINE_LENGTH))
        rows.append(row + b"\r\n")
    return b"".join(rows)


def generateMessage(sizeBytes: int, parts: int) -> Iterator[bytes]:
    """The message in chunks of about L{CHUNK} bytes, C{sizeBytes} long or a little over,
    ending with the end-of-data line. With C{parts > 1}, a multipart/mixed message with that
    many base64 parts of equal size. Never holds more than one chunk."""
    boundary = "bench-" + secrets.token_hex(8)
    head = [
        "From: <bench@client.example>",
        "To: <sink@sink.example>",
        "Subject: mailproxy big message benchmark",
        f"Message-ID: <{secrets.token_hex(8)}@client.example>",
        "MIME-Version: 1.0",
    ]
    if parts > 1:
        head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    else:
        head.append("Content-Type: text/plain; charset=us-ascii")
    yield ("\r\n".join(head) + "\r\n\r\n").encode()
    block = lineBlock()
    perPart = max(sizeBytes // max(parts, 1), len(block))
    for part in range(max(parts, 1)):
        if parts > 1:
            yield (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f'Content-Disposition: attachment; filename="part{part}.bin"\r\n'
                "Content-Transfer-Encoding: base64\r\n\r\n"
            ).encode()
        sent = 0
        while sent < perPart:
            chunk = block[: min(len(block), roundUp(perPart - sent))]
            sent += len(chunk)
            yield chunk
    if parts > 1:
        yield f"--{boundary}--\r\n".encode()
    yield b".\r\n"


def roundUp(n: int) -> int:
    """C{n} rounded up to whole lines."""
    line = LINE_LENGTH + 2
    return -(-n // line) * line


# --- the client -----------------------------------------------------------------------------


class SMTPClient:
    """A blocking SMTP client on a raw socket: one command, one reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=REPLY_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def reply(self) -> tuple[int, str]:
        """The next (possibly multi-line) reply: its code and its text."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"connection closed; got {lines!r}")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def command(self, line: str, expect: int) -> str:
        """Send C{line}, check that the reply has code C{expect}, return its text."""
        self.sock.sendall(line.encode() + b"\r\n")
        return self.expect(expect, line)

    def expect(self, code: int, after: str) -> str:
        """Read a reply and fail unless it has C{code}."""
        got, text = self.reply()
        if got != code:
            raise RuntimeError(f"after {after!r}: expected {code}, got {text!r}")
        return text

    def close(self) -> None:
        """Say QUIT and close."""
        try:
            self.command("QUIT", 221)
        finally:
            self.sock.close()


def transaction(port: int, chunks: Iterable[bytes]) -> tuple[float, int, int, str]:
    """One transaction streaming C{chunks} (the content and its end-of-data line); returns the
    seconds from connect to the final reply, the bytes of content sent, and the final reply's
    code and text."""
    start = time.perf_counter()
    client = SMTPClient(port)
    try:
        client.expect(220, "connect")
        client.command("EHLO client.example", 250)
        client.command("MAIL FROM:<bench@client.example>", 250)
        client.command("RCPT TO:<sink@sink.example>", 250)
        client.command("DATA", 354)
        sent = 0
        for chunk in chunks:
            client.sock.sendall(chunk)
            sent += len(chunk)
        code, text = client.reply()
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    return elapsed, sent, code, text


def sendMessage(port: int, sizeBytes: int, parts: int) -> tuple[float, int, str]:
    """One whole transaction of L{generateMessage}'s message, which must be accepted; returns
    the seconds from connect to the final reply, the bytes of content sent, and the final
    reply."""
    elapsed, sent, code, final = transaction(port, generateMessage(sizeBytes, parts))
    if code != 250:
        raise RuntimeError(f"after 'end of data': expected 250, got {final!r}")
    return elapsed, sent, final


# --- processes --------------------------------------------------------------------------------


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def waitForBanner(
    port: int,
    process: subprocess.Popen[bytes],
    log: Path | None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll (bounded by C{timeout} seconds) until a 220 greeting comes from C{port}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection((HOST, port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            time.sleep(0.1)
    detail = log.read_text(errors="replace") if log and log.exists() else ""
    raise RuntimeError(f"nothing greeted on port {port} within {timeout} s\n{detail}")


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after C{grace} seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of C{pid}, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def proxyConfig(workdir: Path, port: int, sinkPort: int, sizeBytes: int, extra: str) -> Path:
    """Write the proxy's configuration: no filters unless C{extra} (TOML) adds some."""
    path = workdir / "mailproxy.toml"
    limit = sizeBytes + sizeBytes // 10 + 10 * MIB
    path.write_text(
        "[proxy]\n"
        f'listen = "tcp:{port}:interface={HOST}"\n'
        f'upstream = "tcp:host={HOST}:port={sinkPort}"\n'
        f'spool_dir = "{workdir / "spool"}"\n'
        'hostname = "mailproxy.bench"\n'
        "workers = 1\n"  # one process: the one measured
        "[limits]\n"
        f"message_size = {limit}\n" + extra
    )
    return path


def twistdCommand() -> list[str]:
    """This Python's twistd."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def startSink(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The sink (this script with C{--sink}), logging to C{workdir/sink.log}, greeting on
    its port."""
    port = freePort()
    log = workdir / "sink.log"
    with log.open("wb") as out:
        sink = subprocess.Popen(
            [sys.executable, __file__, "--sink", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _greeted(port, sink, log)
    return sink, port


def startProxy(
    workdir: Path, sinkPort: int, sizeBytes: int, extra: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """mailproxy (C{twistd -n mailproxy}) in front of the sink, with its configuration, spool
    and C{proxy.log} in C{workdir} (made if missing), greeting on its port."""
    (workdir / "spool").mkdir(parents=True)
    port = freePort()
    config = proxyConfig(workdir, port, sinkPort, sizeBytes, extra)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [*twistdCommand(), "-n", "--pidfile=", "mailproxy", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    _greeted(port, proxy, log)
    return proxy, port


def _greeted(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for C{process}'s banner on C{port}; stop it if it never comes."""
    try:
        waitForBanner(port, process, log)
    except BaseException:
        stop(process)
        raise


def removeWorkdir(workdir: Path, keep: bool) -> None:
    """Remove the work directory, or with C{keep} say where it is."""
    if keep:
        print(f"work directory:      {workdir}")
    else:
        shutil.rmtree(workdir)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the summary; exit status 1 if the RSS target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=float, default=100.0, help="message size in MiB")
    parser.add_argument("--parts", type=int, default=1, help="MIME parts (1: a plain message)")
    parser.add_argument("--extra-config", type=Path, help="TOML appended to the proxy's config")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        runSink(args.port)
        return 0

    sizeBytes = int(args.size_mb * MIB)
    extra = args.extra_config.read_text() if args.extra_config else ""
    workdir = Path(tempfile.mkdtemp(prefix="mailproxy-bench."))
    sink, sinkPort = startSink(workdir)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        proxy, proxyPort = startProxy(workdir, sinkPort, sizeBytes, extra)
        baseline = memory(proxy.pid)

        print(f"message: {sizeBytes / MIB:.0f} MiB, {args.parts} part(s), 76-character lines")
        directTime, sent, directReply = sendMessage(sinkPort, sizeBytes, args.parts)
        print(f"direct to the sink:  {directTime:7.2f} s  ({directReply})")
        proxyTime, _, proxyReply = sendMessage(proxyPort, sizeBytes, args.parts)
        print(f"through mailproxy:   {proxyTime:7.2f} s  ({proxyReply})")
        after = memory(proxy.pid)
    finally:
        if proxy is not None:
            stop(proxy)
        stop(sink)

    peak = after["VmHWM"]
    ok = peak < PEAK_RSS_TARGET_MB
    print()
    print(f"content sent:        {sent / MIB:.1f} MiB per transaction")
    print(f"throughput:          direct {sent / MIB / directTime:.0f} MiB/s, "
          f"proxy {sent / MIB / proxyTime:.0f} MiB/s")  # fmt: skip
    print(f"time ratio:          {proxyTime / directTime:.2f}x (proxy / direct)")
    print(f"proxy RSS at start:  {baseline['VmRSS']:.1f} MiB")
    print(f"proxy RSS at end:    {after['VmRSS']:.1f} MiB")
    print(
        f"proxy peak RSS:      {peak:.1f} MiB (VmHWM) -- target < {PEAK_RSS_TARGET_MB:.0f} MiB: "
        f"{'met' if ok else 'MISSED'}"
    )
    removeWorkdir(workdir, args.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
