"""
Soak: many concurrent hostile and ordinary clients through mailproxy for minutes, while the MTA
is restarted and a filter daemon hangs; then every message is reconciled with the MTA's Maildir.

    PYTHONPATH=. .venv/bin/python bench/soak.py                   # 200 clients, 5 minutes
    PYTHONPATH=. .venv/bin/python bench/soak.py --duration 60     # CI's version

It starts, as subprocesses on 127.0.0.1: the stand-in MTA (C{python -m mailproxy.localmta}
with a Maildir; or, with C{--mta postfix}, the private Postfix of C{.ci/run}, from the
C{MAILPROXY_POSTFIX_*} variables), a tiny spamd (this script with C{--spamd}: the SPAMC/SPAMD
protocol, a high score for messages carrying C{SOAK-SPAM}, and after SIGUSR1 no answer for
C{--hang} seconds), and mailproxy (C{twistd -n mailproxy}) with [filters.access],
[filters.spamd] and [filters.headers]. Then C{--clients} asyncio clients, each running one
session after another until C{--duration} is over, mix clean messages (DATA and BDAT),
messages the filters refuse, oversized ones, smuggling attempts, NOOP floods, slow clients,
and sessions abandoned mid-command, mid-DATA and just after the final dot. Every message
carries a unique token (C{X-Soak-Token}). See bench/README.md for the table it prints and
what makes it exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bigmessage import HOST, freePort, stop, twistdCommand, waitForBanner

#: Every client reply is awaited at most this long: the proxy's own timeouts
#: (mta_reply, filters) are below it, so a client that waits this long found a hang.
REPLY_TIMEOUT = 60.0
#: The proxy's message_size in the soak; oversized messages are a third over it.
MESSAGE_SIZE = 256 * 1024
#: The spamd filter's timeout (and so how soon a hung spamd turns into 451s).
SPAMD_TIMEOUT = 5
#: After the clients are done: how long the proxy may take to close its last sessions
#: and give back their descriptors, and how long Postfix may take to empty its queue.
SETTLE_TIMEOUT = 30.0
QUEUE_TIMEOUT = 120.0
#: Bounds on the proxy process after the load, against its figures before it (see
#: bench/README.md): descriptors must come back to the start (a small margin for the
#: thread pool's wake-up pipe and a log reopened); RSS may stay a little higher, as
#: CPython keeps freed arenas and Twisted's caches fill, but not by a load's worth.
FD_SLACK = 4
RSS_SLACK_MIB = 48.0

DENIED_SENDER = "denied@soak-denied.example"
REFUSED_SUBJECT = "SOAK-REFUSE"
SPAM_MARK = "SOAK-SPAM"

# --- the hanging spamd ---------------------------------------------------------------------


class SpamdHandler(socketserver.StreamRequestHandler):
    """One SYMBOLS request: score 20 with L{SPAM_MARK} in the message, else 0.5; while the
    server is hanging (after SIGUSR1), the answer waits until the hang is over."""

    server: SpamdServer

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk or len(head) > 65536:
                return
            head += chunk
        head, _, body = head.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        want = int(length.group(1)) if length else 0
        while len(body) < want:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            body += chunk
        deadline = time.monotonic() + self.server.hangSeconds + 1
        while time.monotonic() < min(self.server.hangUntil, deadline):
            time.sleep(0.1)
        spam = SPAM_MARK.encode() in body
        symbols = b"SOAK_SPAM" if spam else b"SOAK_HAM"
        verdict = b"True ; 20.0 / 5.0" if spam else b"False ; 0.5 / 5.0"
        answer = b"SPAMD/1.5 0 EX_OK\r\nContent-length: %d\r\nSpam: %s\r\n\r\n%s" % (
            len(symbols),
            verdict,
            symbols,
        )
        try:
            self.request.sendall(answer)
        except OSError:
            pass  # the proxy gave up on us (its filter timeout) while we hung


class SpamdServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    hangUntil = 0.0
    hangSeconds = 0.0


def runSpamd(port: int, hangSeconds: float) -> None:
    """Serve the fake spamd on 127.0.0.1:C{port}; SIGUSR1 hangs it for C{hangSeconds}."""
    with SpamdServer((HOST, port), SpamdHandler) as server:
        server.hangSeconds = hangSeconds

        def hang(*_: object) -> None:
            server.hangUntil = time.monotonic() + hangSeconds
            print(f"spamd: hanging for {hangSeconds} s", flush=True)

        signal.signal(signal.SIGUSR1, hang)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"spamd: listening on {HOST}:{port}", flush=True)
        server.serve_forever()


def waitForPort(port: int, process: subprocess.Popen[bytes]) -> None:
    """Poll (bounded) until something accepts connections on C{port}."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection((HOST, port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


# --- the MTAs -----------------------------------------------------------------------------


class StandInMTA:
    """C{python -m mailproxy.localmta} with a Maildir, killed (SIGKILL) and started again on
    the same port."""

    name = "stand-in (mailproxy.localmta)"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = freePort()
        self.maildir = workdir / "Maildir"
        self.domain = "soak.example"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.workdir / f"mta-{self.starts}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mailproxy.localmta",
                    "--listen",
                    f"tcp:{self.port}:interface={HOST}",
                    "--maildir",
                    str(self.maildir),
                    "--hostname",
                    "mta.soak.invalid",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=childEnv(),
            )
        waitForBanner(self.port, self.process, log)

    def restart(self, down: float) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        time.sleep(down)
        self.start()

    def settle(self) -> None:
        """Nothing to wait for: the stand-in writes into new/ before it answers 250."""

    def close(self) -> None:
        if self.process is not None:
            stop(self.process)

    @property
    def upstream(self) -> str:
        return f"tcp:host={HOST}:port={self.port}"


class PostfixMTA:
    """The private Postfix of C{.ci/run} (C{tests/system/postfix/instance.sh}), restarted with
    C{postfix stop} and C{start}; its queue is drained before the Maildir is read."""

    name = "Postfix"

    def __init__(self, workdir: Path) -> None:
        env = os.environ
        missing = [
            f"MAILPROXY_POSTFIX_{n}"
            for n in ("HOST", "PORT", "DOMAIN", "MAILDIR", "CONFIG")
            if f"MAILPROXY_POSTFIX_{n}" not in env
        ]
        if missing:
            raise SystemExit(f"--mta postfix: {', '.join(missing)} unset (see .ci/run)")
        self.port = int(env["MAILPROXY_POSTFIX_PORT"])
        self.host = env["MAILPROXY_POSTFIX_HOST"]
        self.maildir = Path(env["MAILPROXY_POSTFIX_MAILDIR"])
        self.domain = env["MAILPROXY_POSTFIX_DOMAIN"]
        self.config = env["MAILPROXY_POSTFIX_CONFIG"]

    def start(self) -> None:
        subprocess.run(["postfix", "-c", self.config, "start"], check=False, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Postfix did not come back")

    def restart(self, down: float) -> None:
        subprocess.run(["postfix", "-c", self.config, "stop"], check=False, timeout=60)
        time.sleep(down)
        self.start()

    def settle(self) -> None:
        deadline = time.monotonic() + QUEUE_TIMEOUT
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["postqueue", "-c", self.config, "-p"], capture_output=True, text=True, timeout=30
            ).stdout
            if "Mail queue is empty" in out:
                return
            time.sleep(1)
        print("warning: Postfix's queue is not empty: undelivered mail counts as lost")

    def close(self) -> None:
        """Postfix belongs to .ci/run: left running."""

    @property
    def upstream(self) -> str:
        return f"tcp:host={self.host}:port={self.port}"


def childEnv() -> dict[str, str]:
    """The environment for children: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    return env


# --- the proxy ------------------------------------------------------------------------------


def listenOverflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all
    sockets of the host: on a quiet test machine, ours)."""
    try:
        rows = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(rows[::2], rows[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return None


def proxyConfig(
    workdir: Path, port: int, upstream: str, spamdPort: int, backlog: int | None = None
) -> str:
    """The soak's configuration: three filters (a denied sender, spamd, a Subject rule), small
    timeouts so that faults show within a client's L{REPLY_TIMEOUT}, and the stats socket."""
    return f"""\
[proxy]
listen = "tcp:{port}:interface={HOST}{f":backlog={backlog}" if backlog else ""}"
upstream = "{upstream}"
spool_dir = "{workdir / "spool"}"
hostname = "mailproxy.soak"
client_names = "off"
bare_line_endings = "reject"
# One process: the soak's descriptor and memory checks read the process that serves.
workers = 1

[limits]
message_size = {MESSAGE_SIZE}
connections = 500
connections_per_client = 20

[timeouts]
client_idle = 30
mta_connect = 5
mta_reply = 30
filters = 30
shutdown_grace = 5

[filters.access]
deny_senders = ["{DENIED_SENDER}"]

[filters.spamd]
spamd = "tcp:host={HOST}:port={spamdPort}"
timeout = {SPAMD_TIMEOUT}
on_error = "tempfail"
reject_score = 10.0

[filters.headers]
reject = [{{ header = "Subject", pattern = "{REFUSED_SUBJECT}", text = "soak: subject refused" }}]
authserv_id = "mailproxy.soak"

[stats]
socket = "{workdir / "stats.sock"}"
"""


def readStats(path: Path) -> dict[str, object]:
    """The stats socket's JSON snapshot."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    result: dict[str, object] = json.loads(data)
    return result


def fdCount(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rssMiB(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Sampler:
    """The proxy's descriptors and RSS, sampled every second."""

    pid: int
    fds: list[int] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)

    def sample(self) -> None:
        try:
            self.fds.append(fdCount(self.pid))
            self.rss.append(rssMiB(self.pid))
        except OSError:
            pass  # it died: the end of the run says so

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stopped.wait(), 1.0)
            except TimeoutError:
                pass


# --- the ledger -----------------------------------------------------------------------------

#: What became of a message at the client: its final reply's class, or none.
ACKED, REFUSED, TEMPFAILED, AMBIGUOUS, UNSENT = (
    "acknowledged",
    "refused",
    "tempfailed",
    "ambiguous",
    "unsent",
)


@dataclass
class Entry:
    """One message: its kind, whether the filters must refuse it, what the client saw."""

    token: str
    kind: str
    mustRefuse: bool
    outcome: str = UNSENT
    reply: str = ""
    #: A smuggled message inside another: it must never be a message of its own.
    smuggled: bool = False


class Ledger:
    """Every message of the run by token; tokens are C{soak-RUN-N}, unique to this run."""

    def __init__(self) -> None:
        self.run = secrets.token_hex(4)
        self.entries: dict[str, Entry] = {}
        self.latencies: list[float] = []
        self.pattern = re.compile(rb"^X-Soak-Token: (soak-" + self.run.encode() + rb"-\d+)", re.M)

    def new(self, kind: str, mustRefuse: bool = False, smuggled: bool = False) -> Entry:
        token = f"soak-{self.run}-{len(self.entries):07d}"
        entry = Entry(token, kind, mustRefuse, smuggled=smuggled)
        self.entries[token] = entry
        return entry


def message(entry: Entry, sender: str, rcpt: str, subject: str = "", body: bytes = b"") -> bytes:
    """A message (CRLF lines, not dot-stuffed: no line starts with a dot) carrying its token."""
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\n"
        f"Subject: soak {entry.kind} {entry.token} {subject}\r\n"
        f"Message-ID: <{entry.token}@soak.example>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"X-Soak-Token: {entry.token}\r\n\r\n"
    ).encode()
    return head + (body or f"token {entry.token}\r\nsoak body line\r\n".encode())


# --- the clients ------------------------------------------------------------------------------


class ClosedError(Exception):
    """The proxy closed the connection (or reset it)."""


class Refused421Error(Exception):
    """The proxy answered 421: it is closing."""


class UnexpectedReplyError(Exception):
    """A reply the script did not expect."""


class Conn:
    """One client connection: raw writes, replies read one (multi-line) at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        #: What the next reply answers, for the errors.
        self.after = "the banner"

    @classmethod
    async def open(cls, port: int, source: str) -> Conn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(source, 0), limit=1 << 20),
            REPLY_TIMEOUT,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.after = repr(data[:24])
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"could not send for {REPLY_TIMEOUT:.0f} s") from None
        except (ConnectionError, OSError) as e:
            raise ClosedError(f"{e.__class__.__name__} sending {self.after}") from e

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            except TimeoutError:
                # (3.11: TimeoutError is an OSError: caught first.)
                raise TimeoutError(f"no reply to {self.after} in {REPLY_TIMEOUT:.0f} s") from None
            except (ConnectionError, OSError) as e:
                raise ClosedError(
                    f"{e.__class__.__name__} awaiting the reply to {self.after}"
                ) from e
            if not line.endswith(b"\n"):
                raise ClosedError(f"closed, no reply to {self.after}")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                text = "\n".join(lines)
                try:
                    return int(line[:3]), text
                except ValueError:
                    raise UnexpectedReplyError(f"not a reply: {text!r}") from None

    async def expect(self, *codes: int) -> tuple[int, str]:
        """The next reply, which must have one of C{codes}; 421 raises L{Refused421Error}."""
        code, text = await self.reply()
        if code in codes:
            return code, text
        if code == 421:
            raise Refused421Error(text)
        raise UnexpectedReplyError(f"expected {codes}, got {text!r}")

    def abort(self) -> None:
        """Drop the connection at once (RST), as a client that vanishes."""
        self.writer.transport.abort()

    async def quit(self) -> None:
        await self.send(b"QUIT\r\n")
        while True:  # replies owed before QUIT's (an early end-of-data would leave some)
            code, _ = await self.reply()
            if code == 221:
                break
        self.writer.close()


def finish(entry: Entry, code: int | None, text: str) -> None:
    """Record the final reply to a message's end of data (C{None}: none came)."""
    entry.reply = text
    if code is None:
        entry.outcome = AMBIGUOUS
    elif 200 <= code < 300:
        entry.outcome = ACKED
    elif 500 <= code < 600:
        entry.outcome = REFUSED
    else:
        entry.outcome = TEMPFAILED


async def finalReply(conn: Conn, entry: Entry) -> int:
    """Wait for the reply to the end of data and record it; a lost connection is ambiguous."""
    try:
        code, text = await conn.reply()
    except (ClosedError, TimeoutError) as e:
        finish(entry, None, f"no reply: {e}")
        raise
    finish(entry, code, text)
    if code == 421:
        raise Refused421Error(text)
    return code


class Client:
    """One of the concurrent clients: sessions of random kinds until the deadline."""

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.rng = random.Random(f"{soak.args.seed}-{index}")
        # A few clients per loopback address (the per-client limit is 20).
        self.source = f"127.0.{index // 50 + 1}.{index % 50 + 1}"
        self.index = index

    @property
    def rcpt(self) -> str:
        return f"rcpt{self.rng.randrange(50)}@{self.soak.mta.domain}"

    @property
    def sender(self) -> str:
        return f"client{self.index}@soak-client.example"

    async def run(self, deadline: float) -> None:
        kinds = self.soak.kinds
        weights = [KINDS[k][1] for k in kinds]
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            began = time.monotonic()
            outcome = await self.session(kind)
            self.soak.sessions[kind][outcome] += 1
            took = time.monotonic() - began
            if took > self.soak.longest[kind][0]:
                self.soak.longest[kind] = (took, outcome)
            if outcome in ("421 at connect", "connect failed"):
                await asyncio.sleep(0.5)  # the MTA is down: do not spin

    async def session(self, kind: str) -> str:
        script = KINDS[kind][0]
        try:
            conn = await Conn.open(self.soak.proxyPort, self.source)
        except (OSError, TimeoutError):
            return "connect failed"
        try:
            code, _ = await conn.reply()
            if code != 220:
                return "421 at connect" if code == 421 else f"{code} at connect"
            await conn.send(b"EHLO client.soak.example\r\n")
            await conn.expect(250)
            result = await script(self, conn)
            if result is not None:
                return result
            await conn.quit()
            return "completed"
        except Refused421Error:
            return "closed by proxy (421)"
        except ClosedError as e:
            # A reply that came before the connection closed says why (a 421, say).
            why = ""
            try:
                said = (await asyncio.wait_for(conn.reply(), 0.5))[1]
                why = f" (it said {said[:40]!r})"
            except (ClosedError, TimeoutError, UnexpectedReplyError):
                pass
            self.soak.closes[kind][(str(e) + why)[:120]] += 1
            return "connection lost"
        except TimeoutError as e:
            self.soak.closes[kind][f"timeout: {e}"[:90]] += 1
            return "client timeout"
        except UnexpectedReplyError as e:
            self.soak.unexpected.append(f"{kind}: {e}")
            return "unexpected reply"
        finally:
            conn.writer.transport.abort()

    # Each script runs after EHLO; it returns None to QUIT normally, or the session's
    # outcome when it ended the session itself.

    async def envelope(self, conn: Conn, sender: str | None = None) -> None:
        await conn.send(
            f"MAIL FROM:<{sender or self.sender}>\r\nRCPT TO:<{self.rcpt}>\r\n".encode()
        )
        await conn.expect(250)
        await conn.expect(250)

    async def dataMessage(self, conn: Conn, entry: Entry, content: bytes) -> int:
        started = time.monotonic()
        await self.envelope(conn)
        await conn.send(b"DATA\r\n")
        await conn.expect(354)
        try:
            await conn.send(content + b".\r\n")
        except ClosedError:
            # Cut off while sending: the proxy may have answered (552, 421) and closed.
            finish(entry, None, "connection lost while sending the message")
            entry.outcome = UNSENT
            raise
        code = await finalReply(conn, entry)
        if code == 250 and entry.kind in ("clean", "bdat"):
            self.soak.ledger.latencies.append(time.monotonic() - started)
        return code

    async def clean(self, conn: Conn) -> str | None:
        for _ in range(self.rng.randint(1, 3)):
            entry = self.soak.ledger.new("clean")
            await self.dataMessage(conn, entry, message(entry, self.sender, self.rcpt))
        return None

    async def refusedSubject(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("refused-subject", mustRefuse=True)
        await self.dataMessage(
            conn, entry, message(entry, self.sender, self.rcpt, subject=REFUSED_SUBJECT)
        )
        return None

    async def spam(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("spam", mustRefuse=True)
        body = f"token {entry.token}\r\n{SPAM_MARK} buy now\r\n".encode()
        await self.dataMessage(conn, entry, message(entry, self.sender, self.rcpt, body=body))
        return None

    async def deniedSender(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("denied-sender", mustRefuse=True)
        # Pipelined, as a spammer would: the refused MAIL must make RCPT and DATA fail.
        await conn.send(
            f"MAIL FROM:<{DENIED_SENDER}>\r\nRCPT TO:<{self.rcpt}>\r\nDATA\r\n".encode()
        )
        await conn.expect(550, 553, 554)
        await conn.expect(503, 550, 554)
        code, text = await conn.reply()
        if code == 354:
            await conn.send(message(entry, DENIED_SENDER, self.rcpt) + b".\r\n")
            await finalReply(conn, entry)
        elif code == 421:
            raise Refused421Error(text)
        else:
            finish(entry, code, text)  # refused before DATA: nothing was sent
            entry.outcome = REFUSED if 500 <= code < 600 else entry.outcome
        return None

    async def oversized(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("oversized", mustRefuse=True)
        line = b"x" * 98 + b"\r\n"
        body = f"token {entry.token}\r\n".encode() + line * (MESSAGE_SIZE * 4 // 3 // len(line))
        await self.dataMessage(conn, entry, message(entry, self.sender, self.rcpt, body=body))
        return None

    async def smuggle(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("smuggle", mustRefuse=True)
        inner = self.soak.ledger.new("smuggled", mustRefuse=True, smuggled=True)
        ending = self.rng.choice(SMUGGLE_ENDINGS)
        body = (
            f"token {entry.token}\r\nbefore the fake end".encode()
            + ending
            + f"MAIL FROM:<smuggler@soak.example>\r\nRCPT TO:<{self.rcpt}>\r\nDATA\r\n".encode()
            + message(inner, "smuggler@soak.example", self.rcpt)
            if ending
            else f"token {entry.token}\r\na bare LF\nin a line\r\n".encode()
        )
        await self.dataMessage(conn, entry, message(entry, self.sender, self.rcpt, body=body))
        return None

    async def noopFlood(self, conn: Conn) -> str | None:
        count = self.soak.args.flood
        flood = b"NOOP\r\n" * count

        async def read() -> None:
            for _ in range(count):
                await conn.expect(250)

        await asyncio.gather(conn.send(flood), read())
        return await self.clean(conn)

    async def slow(self, conn: Conn) -> str | None:
        delay = self.soak.args.slow_ms / 1000

        async def trickle(data: bytes) -> None:
            for i in range(len(data)):
                await conn.send(data[i : i + 1])
                await asyncio.sleep(delay)

        entry = self.soak.ledger.new("slow")
        await trickle(f"MAIL FROM:<{self.sender}>\r\n".encode())
        await conn.expect(250)
        await trickle(f"RCPT TO:<{self.rcpt}>\r\n".encode())
        await conn.expect(250)
        await trickle(b"DATA\r\n")
        await conn.expect(354)
        await trickle(message(entry, self.sender, self.rcpt) + b".\r\n")
        await finalReply(conn, entry)
        return None

    async def abandonCommand(self, conn: Conn) -> str | None:
        await conn.send(b"MAIL FROM:<abandoned@soak")
        await asyncio.sleep(self.rng.uniform(0, 0.5))
        conn.abort()
        return "abandoned (by design)"

    async def abandonData(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("abandon-data")
        content = message(entry, self.sender, self.rcpt)
        await self.envelope(conn)
        await conn.send(b"DATA\r\n")
        await conn.expect(354)
        await conn.send(content[: self.rng.randrange(1, len(content))])
        await asyncio.sleep(self.rng.uniform(0, 0.5))
        conn.abort()
        return "abandoned (by design)"

    async def abandonAfterDot(self, conn: Conn) -> str | None:
        entry = self.soak.ledger.new("abandon-after-dot")
        await self.envelope(conn)
        await conn.send(b"DATA\r\n")
        await conn.expect(354)
        await conn.send(message(entry, self.sender, self.rcpt) + b".\r\n")
        finish(entry, None, "the client left after its dot")
        await asyncio.sleep(self.rng.choice([0, 0, 0.001, 0.01, 0.05]))
        # A reply already here is not ambiguous: take it (a short wait reads what the
        # kernel holds); only what had not come when the client left is.
        try:
            code, text = await asyncio.wait_for(conn.reply(), 0.001)
            finish(entry, code, text)
        except (TimeoutError, ClosedError, UnexpectedReplyError):
            pass
        conn.abort()
        return "abandoned (by design)"

    async def bdat(self, conn: Conn) -> str | None:
        refuse = self.rng.random() < 0.2
        entry = self.soak.ledger.new("bdat-refused" if refuse else "bdat", mustRefuse=refuse)
        content = message(entry, self.sender, self.rcpt, subject=REFUSED_SUBJECT if refuse else "")
        started = time.monotonic()
        await self.envelope(conn)
        cut = self.rng.randrange(1, len(content))
        await conn.send(b"BDAT %d\r\n" % cut + content[:cut])
        await conn.expect(250)
        await conn.send(b"BDAT %d LAST\r\n" % (len(content) - cut) + content[cut:])
        if await finalReply(conn, entry) == 250:
            self.soak.ledger.latencies.append(time.monotonic() - started)
        return None


#: End-of-data look-alikes (RFC 5321 4.1.1.4 and the 2023 SMTP smuggling variants); b""
#: is a lone bare LF in a line.
SMUGGLE_ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b""]

ScriptT = Callable[[Client, Conn], Awaitable[str | None]]
#: Session kinds: the script and its weight in the mix.
KINDS: dict[str, tuple[ScriptT, int]] = {
    "clean": (Client.clean, 30),
    "bdat": (Client.bdat, 10),
    "refused-subject": (Client.refusedSubject, 8),
    "denied-sender": (Client.deniedSender, 5),
    "spam": (Client.spam, 5),
    "oversized": (Client.oversized, 4),
    "smuggle": (Client.smuggle, 8),
    "noop-flood": (Client.noopFlood, 5),
    "slow": (Client.slow, 5),
    "abandon-command": (Client.abandonCommand, 5),
    "abandon-data": (Client.abandonData, 5),
    "abandon-after-dot": (Client.abandonAfterDot, 5),
}


# --- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.ledger = Ledger()
        self.sessions: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.unexpected: list[str] = []
        #: Why sessions saw their connection lost, by kind.
        self.closes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        #: The longest session of each kind: seconds, outcome.
        self.longest: dict[str, tuple[float, str]] = collections.defaultdict(lambda: (0.0, ""))
        self.kinds = args.only.split(",") if args.only else list(KINDS)
        self.events: list[str] = []
        self.mta: StandInMTA | PostfixMTA = (
            PostfixMTA(workdir) if args.mta == "postfix" else StandInMTA(workdir)
        )
        self.proxyPort = 0
        self.overflows: int | None = None
        self.started = 0.0

    def event(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f} s  {what}"
        self.events.append(line)
        print(line, flush=True)

    async def faults(self, spamd: subprocess.Popen[bytes]) -> None:
        """Restart the MTA C{--mta-restarts} times and hang spamd C{--hangs} times, spread
        over the run."""
        duration = self.args.duration
        plan: list[tuple[float, str]] = []
        n = self.args.mta_restarts
        plan += [((i + 1) / (n + 1) * duration, "mta") for i in range(n)]
        m = self.args.hangs
        plan += [((j + 1) / (m + 1) * duration, "hang") for j in range(m)]
        for at, what in sorted(plan):
            await asyncio.sleep(max(0.0, self.started + at - time.monotonic()))
            if what == "mta":
                self.event(f"MTA: restart ({self.args.mta_down} s down)")
                await asyncio.to_thread(self.mta.restart, self.args.mta_down)
                self.event("MTA: back")
            else:
                self.event(f"spamd: hangs for {self.args.hang} s")
                spamd.send_signal(signal.SIGUSR1)

    async def load(self, proxyPid: int, spamd: subprocess.Popen[bytes], sampler: Sampler) -> None:
        stopped = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stopped))
        self.started = time.monotonic()
        deadline = self.started + self.args.duration
        self.event(f"{self.args.clients} clients for {self.args.duration} s")
        faults = asyncio.create_task(self.faults(spamd))
        clients = [Client(self, i).run(deadline) for i in range(self.args.clients)]
        await asyncio.gather(*clients)
        self.event("clients done")
        await faults
        stopped.set()
        await sampling


def reconcile(ledger: Ledger, maildir: Path) -> tuple[collections.Counter[str], list[str]]:
    """How many Maildir files carry each token as their own (in their header block), and the
    tokens seen inside other messages' bodies."""
    own: collections.Counter[str] = collections.Counter()
    files = [p for sub in ("new", "cur") for p in (maildir / sub).glob("*")]
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
        found = ledger.pattern.findall(head)
        if found:
            own[found[0].decode()] += 1
    return own, [str(p) for p in files]


def table(rows: list[tuple[str, object]], title: str) -> None:
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--seed", default="mailproxy-soak", help="the clients' random seed")
    parser.add_argument("--mta", choices=["standin", "postfix"], default="standin")
    parser.add_argument("--mta-restarts", type=int, default=2)
    parser.add_argument("--mta-down", type=float, default=3.0, help="seconds the MTA stays down")
    parser.add_argument("--hangs", type=int, default=1, help="times spamd hangs")
    parser.add_argument("--hang", type=float, help="seconds spamd hangs (default duration/15)")
    parser.add_argument("--flood", type=int, default=2000, help="NOOPs in one flood")
    parser.add_argument("--slow-ms", type=float, default=20.0, help="slow clients: ms a byte")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--backlog",
        type=int,
        default=1024,
        help="the listener's backlog= (default 1024, as the sample configuration; 0: Twisted's 50)",
    )
    parser.add_argument("--only", help="comma-separated session kinds (default: all)")
    parser.add_argument("--spamd", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hang is None:
        args.hang = max(SPAMD_TIMEOUT * 2, args.duration / 15)
    if args.spamd:
        runSpamd(args.port, args.hang)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="mailproxy-soak."))
    (workdir / "spool").mkdir()
    soak = Soak(args, workdir)
    mta = soak.mta
    children: list[subprocess.Popen[bytes]] = []
    try:
        mta.start()
        spamdPort = freePort()
        with (workdir / "spamd.log").open("wb") as out:
            spamd = subprocess.Popen(
                [sys.executable, __file__, "--spamd", "--port", str(spamdPort),
                 "--hang", str(args.hang)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        children.append(spamd)
        waitForPort(spamdPort, spamd)
        soak.proxyPort = freePort()
        config = workdir / "mailproxy.toml"
        config.write_text(
            proxyConfig(workdir, soak.proxyPort, mta.upstream, spamdPort, args.backlog)
        )
        proxyLog = workdir / "proxy.log"
        with proxyLog.open("wb") as out:
            proxy = subprocess.Popen(
                [*twistdCommand(), "-n", "--pidfile=", "mailproxy", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, env=childEnv(), cwd=workdir,
            )  # fmt: skip
        children.append(proxy)
        waitForBanner(soak.proxyPort, proxy, proxyLog)
        time.sleep(1)  # the banner probe's session ends
        sampler = Sampler(proxy.pid)
        sampler.sample()
        fdStart, rssStart = sampler.fds[0], sampler.rss[0]

        overflowsBefore = listenOverflows()
        asyncio.run(soak.load(proxy.pid, spamd, sampler))
        overflowsAfter = listenOverflows()
        soak.overflows = (
            overflowsAfter - overflowsBefore
            if overflowsBefore is not None and overflowsAfter is not None
            else None
        )

        # Let the proxy finish: no session active, the spool empty, descriptors back.
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline and proxy.poll() is None:
            active = readStats(workdir / "stats.sock")["active"]
            if not active and fdCount(proxy.pid) <= fdStart + FD_SLACK:
                break
            time.sleep(0.5)
        proxyAlive = proxy.poll() is None
        soak.event("proxy settled" if proxyAlive else "proxy DIED")
        if proxyAlive:
            sampler.sample()
            stats = readStats(workdir / "stats.sock")
        else:
            stats = {}
        fdEnd, rssEnd = (sampler.fds[-1], sampler.rss[-1]) if proxyAlive else (-1, -1.0)
        spoolLeft = sorted(str(p) for p in (workdir / "spool").rglob("*") if not p.is_dir())
        mta.settle()
        own, _ = reconcile(soak.ledger, mta.maildir)
        stop(proxy)
        proxyExit = proxy.returncode
    finally:
        for child in reversed(children):
            stop(child)
        mta.close()

    return report(soak, own, stats, sampler, (fdStart, fdEnd), (rssStart, rssEnd),
                  spoolLeft, proxyAlive, proxyExit, proxyLog)  # fmt: skip


def report(
    soak: Soak,
    own: collections.Counter[str],
    stats: dict[str, object],
    sampler: Sampler,
    fds: tuple[int, int],
    rss: tuple[float, float],
    spoolLeft: list[str],
    proxyAlive: bool,
    proxyExit: int | None,
    proxyLog: Path,
) -> int:
    args = soak.args
    ledger = soak.ledger
    entries = [e for e in ledger.entries.values() if not e.smuggled]
    outcomes = collections.Counter(e.outcome for e in entries)
    lost = [e for e in entries if e.outcome == ACKED and own[e.token] == 0]
    duplicated = [e for e in ledger.entries.values() if own[e.token] > 1]
    refusedDelivered = [e for e in entries if e.outcome == REFUSED and own[e.token]]
    unsentDelivered = [e for e in entries if e.outcome == UNSENT and own[e.token]]
    smuggledDelivered = [e for e in ledger.entries.values() if e.smuggled and own[e.token]]
    filterMissed = [e for e in entries if e.mustRefuse and e.outcome == ACKED]
    tempfailedDelivered = [e for e in entries if e.outcome == TEMPFAILED and own[e.token]]
    ambiguousDelivered = [e for e in entries if e.outcome == AMBIGUOUS and own[e.token]]
    cleanRefused = [e for e in entries if not e.mustRefuse and e.outcome == REFUSED]
    delivered = sum(1 for e in ledger.entries.values() if own[e.token])
    unknown = sum(own.values()) - sum(own[t] for t in ledger.entries)
    total = stats.get("total", {}) if isinstance(stats, dict) else {}
    proxyMessages = total.get("messages", {}) if isinstance(total, dict) else {}
    proxyAmbiguous = proxyMessages.get("ambiguous", "?") if isinstance(proxyMessages, dict) else "?"
    logText = proxyLog.read_text(errors="replace")
    tracebacks = logText.count("Traceback (most recent call last)")

    print(f"\nmailproxy soak: {args.clients} clients, {args.duration:.0f} s, seed {args.seed!r}, "
          f"MTA {soak.mta.name}, {args.mta_restarts} MTA restart(s), "
          f"{args.hangs} spamd hang(s) of {args.hang:.0f} s")  # fmt: skip
    for line in soak.events:
        print(f"  {line}")

    allOutcomes = sorted({o for c in soak.sessions.values() for o in c})
    width = max(len(k) for k in KINDS)
    print("\nsessions by kind and outcome")
    print("  " + " " * width + "".join(f"  {o[:22]:>22}" for o in allOutcomes) + f"  {'total':>7}")
    for kind in KINDS:
        counts = soak.sessions.get(kind, collections.Counter())
        print(f"  {kind:<{width}}" + "".join(f"  {counts[o]:>22}" for o in allOutcomes)
              + f"  {sum(counts.values()):>7}")  # fmt: skip
    sessionTotal = collections.Counter[str]()
    for c in soak.sessions.values():
        sessionTotal.update(c)
    print(f"  {'all':<{width}}" + "".join(f"  {sessionTotal[o]:>22}" for o in allOutcomes)
          + f"  {sum(sessionTotal.values()):>7}")  # fmt: skip

    print("\nlongest session of each kind")
    for kind in KINDS:
        if kind in soak.longest:
            took, outcome = soak.longest[kind]
            print(f"  {kind:<{width}}  {took:6.1f} s  {outcome}")

    sent = sum(1 for e in entries if e.outcome != UNSENT)
    latencies = sorted(ledger.latencies)

    def pct(q: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))]:.3f} s"

    checks: list[tuple[str, bool]] = []

    def row(name: str, value: object, ok: bool | None = None) -> tuple[str, object]:
        if ok is not None:
            checks.append((name, ok))
            value = f"{value}  {'ok' if ok else 'FAILED'}"
        return name, value

    table(
        [
            row("messages begun", len(entries)),
            row("sent (end of data)", sent),
            row("acknowledged (250)", outcomes[ACKED]),
            row("delivered (in the Maildir)", delivered),
            row("refused (5xx)", outcomes[REFUSED]),
            row("tempfailed (4xx)", outcomes[TEMPFAILED]),
            row("ambiguous (no reply after the dot)", outcomes[AMBIGUOUS]),
            row("  of which delivered", len(ambiguousDelivered)),
            row("tempfailed, delivered all the same", len(tempfailedDelivered)),
            row(
                "mailproxy's ambiguous counter (>= the above)",
                proxyAmbiguous,
                isinstance(proxyAmbiguous, int) and proxyAmbiguous >= len(tempfailedDelivered),
            ),
            row("unsent (cut off before the dot)", outcomes[UNSENT]),
            row("lost (acknowledged, not delivered)", len(lost), not lost),
            row("duplicated (delivered twice or more)", len(duplicated), not duplicated),
            row("refused but delivered", len(refusedDelivered), not refusedDelivered),
            row("cut off but delivered", len(unsentDelivered), not unsentDelivered),
            row("smuggled message delivered", len(smuggledDelivered), not smuggledDelivered),
            row("must-refuse acknowledged", len(filterMissed), not filterMissed),
            row("clean refused (5xx)", len(cleanRefused)),
            row("Maildir files of no known token", unknown),
            row("unexpected replies", len(soak.unexpected)),
            row("listen queue overflows (kernel, host-wide)", soak.overflows),
            row(
                "clean 250s: p50 / p99 / max MAIL→250",
                f"{pct(0.5)} / {pct(0.99)} / {latencies[-1]:.3f} s" if latencies else "-",
            ),
            row("clean 250s", len(latencies), bool(latencies)),
        ],
        "messages",
    )
    fdStart, fdEnd = fds
    rssStart, rssEnd = rss
    table(
        [
            row("proxy alive after the load", proxyAlive, proxyAlive),
            row("leaked spool files", len(spoolLeft), not spoolLeft),
            row(
                f"fds start / peak / end (end <= start + {FD_SLACK})",
                f"{fdStart} / {max(sampler.fds)} / {fdEnd}",
                proxyAlive and fdEnd <= fdStart + FD_SLACK,
            ),
            row(
                f"RSS MiB start / peak / end (end <= start + {RSS_SLACK_MIB:.0f})",
                f"{rssStart:.1f} / {max(sampler.rss):.1f} / {rssEnd:.1f}",
                proxyAlive and rssEnd <= rssStart + RSS_SLACK_MIB,
            ),
            row("tracebacks in proxy.log", tracebacks, tracebacks == 0),
            # twistd stops cleanly on SIGTERM, then exits by that signal (-15); -9 is stop()'s
            # SIGKILL after 10 s: a proxy that did not stop.
            row("proxy exit status (SIGTERM)", proxyExit, proxyExit in (0, -signal.SIGTERM)),
        ],
        "the proxy process",
    )
    for what, items in [
        ("lost", lost),
        ("duplicated", duplicated),
        ("refused but delivered", refusedDelivered),
        ("cut off but delivered", unsentDelivered),
        ("smuggled delivered", smuggledDelivered),
        ("must-refuse acknowledged", filterMissed),
    ]:
        for e in items[:10]:
            print(f"  {what}: {e.token} {e.kind} {e.outcome} {e.reply!r}")
    for line in soak.unexpected[:10]:
        print(f"  unexpected: {line}")
    for kind, reasons in soak.closes.items():
        for reason, n in reasons.most_common(4):
            print(f"  lost or timed out ({kind}): {n} x {reason}")
    failed = [name for name, ok in checks if not ok]
    print(f"\nwork directory: {soak.workdir}" if args.keep or failed else "")
    if not (args.keep or failed):
        shutil.rmtree(soak.workdir, ignore_errors=True)
    print("soak: " + ("FAILED: " + "; ".join(failed) if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
