"""
Benchmark: mailproxy against its peers, smtp-source -> proxy -> smtp-sink, in one run.

    python3 bench/peers.py                    # as root: the whole comparison, a few minutes
    python3 bench/peers.py --quick            # fewer messages, to try it
    python3 bench/peers.py --only direct,mailproxy-w1 --rounds 5

It finds Postfix's smtp-source and smtp-sink, HAProxy and proxsmtp (installing the Debian
packages with apt-get when they are missing), installs aiosmtpd, matplotlib and this checkout
(a regular C{pip install .}) into venvs of their own under the work directory, then
re-executes itself in a private network namespace that has only loopback (C{unshare --net})
and measures every peer there, interleaved (one round runs each peer once, the order rotated
from round to round), taking the median over the rounds. A run counts only if the sink
received every message it was sent. It writes a Markdown table and a PNG chart to
bench/results/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
HOST = "127.0.0.1"
SINK_PORT = 20025
KB = 1024
MB = 1024 * 1024
START_TIMEOUT = 30.0
RUN_TIMEOUT = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
HAPROXY = "/usr/sbin/haproxy"
PROXSMTPD = "/usr/sbin/proxsmtpd"

# --- the peers -------------------------------------------------------------------------------


@dataclass
class Peer:
    """
    One thing measured: how to start it in front of the sink, or nothing for C{direct}.

    @ivar name: its name on the command line (C{--only}) and in the result files.
    @ivar label: its column heading in the table.
    @ivar port: where it listens (the sink's port for C{direct}).
    @ivar pending: why it is not measured on this checkout, or C{None}.
    """

    name: str
    label: str
    port: int
    start: Callable[[Peer, Path], subprocess.Popen[bytes]] | None = None
    pending: str | None = None
    notes: list[str] = field(default_factory=list)
    #: The 1 KB runs send this many times fewer messages (a peer too slow for 2,000 in the
    #: time budget); the rates stay per second.
    divisor: int = 1


def startHAProxy(peer: Peer, work: Path) -> subprocess.Popen[bytes]:
    """HAProxy in tcp mode: bytes relayed as they come, no SMTP."""
    conf = work / "haproxy.cfg"
    conf.write_text(
        "global\n"
        "    maxconn 4096\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 10s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        f"listen smtp\n"
        f"    bind {HOST}:{peer.port}\n"
        f"    server sink {HOST}:{SINK_PORT}\n"
    )
    return spawn([HAPROXY, "-db", "-f", str(conf)], work / "haproxy.log")


def startAiosmtpd(peer: Peer, work: Path) -> subprocess.Popen[bytes]:
    """aiosmtpd's own C{aiosmtpd.handlers.Proxy}: the message held, then sent with smtplib."""
    python = work / "venv-aiosmtpd" / "bin" / "python"
    command = [str(python), str(HERE / "peers" / "aiosmtpd_proxy.py"), HOST, str(peer.port)]
    command += [HOST, str(SINK_PORT), str(200 * MB)]
    return spawn(command, work / "aiosmtpd.log")


def startPortforward(peer: Peer, work: Path) -> subprocess.Popen[bytes]:
    """Twisted's C{portforward} TCP relay (in mailproxy's venv): the floor of a Twisted proxy."""
    python = work / "venv-mailproxy" / "bin" / "python"
    command = [str(python), str(HERE / "peers" / "twisted_portforward.py"), HOST, str(peer.port)]
    return spawn([*command, HOST, str(SINK_PORT)], work / "portforward.log")


def startProxsmtp(peer: Peer, work: Path) -> subprocess.Popen[bytes]:
    """Debian's proxsmtpd with no FilterCommand: DATA spooled to a file, then sent on."""
    tmp = work / "proxsmtp-tmp"
    tmp.mkdir(exist_ok=True)
    conf = work / "proxsmtpd.conf"
    conf.write_text(
        f"OutAddress: {HOST}:{SINK_PORT}\n"
        f"Listen: {HOST}:{peer.port}\n"
        "MaxConnections: 256\n"
        "TimeOut: 300\n"
        f"TempDirectory: {tmp}\n"
    )
    return spawn([PROXSMTPD, "-d", "0", "-f", str(conf)], work / "proxsmtpd.log")


def mailproxyConfig(peer: Peer, work: Path, workers: int, filters: bool) -> Path:
    """
    Write the configuration of one mailproxy peer: the sample's defaults but for the
    addresses, no client-name lookups (the namespace has no DNS), limits that let 20
    sessions from 127.0.0.1 and a 100 MB message in, and C{[proxy] workers} where the
    checkout knows the key (its default is the number of cores, so 1 is written too).
    """
    spool = work / f"spool-{peer.name}"
    spool.mkdir(exist_ok=True)
    lines = [
        "[proxy]",
        f'listen = "tcp:{peer.port}:interface={HOST}:backlog=1024"',
        f'upstream = "tcp:host={HOST}:port={SINK_PORT}"',
        'client_names = "off"',
        f'spool_dir = "{spool}"',
        f"workers = {workers}",
    ]
    lines += [
        "",
        "[limits]",
        f"message_size = {200 * MB}",
        "connections = 1000",
        "connections_per_client = 1000",
        "",
    ]
    if filters:
        lines += [
            "[filters.access]",
            'deny_networks = ["192.0.2.0/24"]',
            'deny_senders = ["*@spammer.example"]',
            "",
            "[filters.mime]",
            'block_types = ["application/x-msdownload"]',
            'block_filenames = ["*.exe", "*.scr", "*.com", "*.pif", "*.bat", "*.js", "*.vbs"]',
            "",
        ]
    path = work / f"{peer.name}.toml"
    path.write_text("\n".join(lines))
    return path


def mailproxyStarter(
    workers: int, filters: bool
) -> Callable[[Peer, Path], subprocess.Popen[bytes]]:
    """A start function for mailproxy with C{workers} processes and the filters on or off."""

    def start(peer: Peer, work: Path) -> subprocess.Popen[bytes]:
        conf = mailproxyConfig(peer, work, workers, filters)
        twistd = work / "venv-mailproxy" / "bin" / "twistd"
        log = work / f"{peer.name}.log"
        command = [str(twistd), "-n", "--pidfile=", "mailproxy", "--config", str(conf)]
        return spawn(command, log, cwd=work)

    return start


def allPeers() -> list[Peer]:
    """Every peer, in the table's column order."""
    return [
        Peer("direct", "direct", SINK_PORT),
        Peer("haproxy", "HAProxy tcp mode", 20101, startHAProxy),
        Peer("portforward", "Twisted portforward", 20107, startPortforward),
        Peer("aiosmtpd", "aiosmtpd Proxy", 20102, startAiosmtpd),
        Peer("proxsmtp", "proxsmtp", 20103, startProxsmtp, divisor=10),
        Peer("mailproxy-w1", "mailproxy workers=1", 20104, mailproxyStarter(1, False)),
        Peer("mailproxy-w2", "mailproxy workers=2", 20105, mailproxyStarter(2, False)),
        Peer("mailproxy-filters", "mailproxy + access, mime", 20106, mailproxyStarter(1, True)),
    ]


# --- processes -------------------------------------------------------------------------------


def spawn(command: Sequence[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start C{command} in its own process group, its output appended to C{log}."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
    finally:
        out.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL if it is still there after 15 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def processTree(pid: int) -> list[int]:
    """C{pid} and its living descendants (the workers of a master), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def cpuSeconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of C{pids} (threads included), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def memory(pids: Sequence[int], key: str) -> list[float]:
    """C{key} (VmHWM, VmRSS) of each of C{pids} in MiB, from /proc/PID/status."""
    values = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        if match:
            values.append(int(match.group(1)) / 1024)
    return values


def waitForBanner(port: int, process: subprocess.Popen[bytes] | None) -> None:
    """Wait until something on C{port} greets with 220 (through a proxy: the sink's)."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "nothing"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} at start")
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                banner = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            if banner.startswith(b"220"):
                return
            last = repr(banner)
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"no 220 on port {port} within {START_TIMEOUT:.0f} s: {last}")


# --- the sink --------------------------------------------------------------------------------


class Sink:
    """
    Postfix's smtp-sink with C{-c}: it prints a running C{mesg=N} counter of the messages
    it received (each C{.} it answered with 250), which is read before and after each run.
    """

    def __init__(self, work: Path) -> None:
        self.out = work / "smtp-sink.out"
        self.out.write_bytes(b"")
        command = [SMTP_SINK, "-c", "-u", "nobody", "-m", "2048", f"{HOST}:{SINK_PORT}", "2048"]
        self.process = spawn(command, self.out)
        waitForBanner(SINK_PORT, self.process)

    def count(self) -> int:
        """Messages received so far."""
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes()[-4096:])
        return int(found[-1]) if found else 0

    def waitFor(self, expected: int, timeout: float = 5.0) -> int:
        """The count once it reaches C{expected} (or C{timeout} passes): the output may lag."""
        deadline = time.monotonic() + timeout
        while (count := self.count()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return count


# --- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    """One smtp-source run, or the latency client, with what to read off it."""

    key: str
    label: str
    sessions: int
    messages: int
    size: int


def workloads(quick: bool) -> list[Workload]:
    """The issue's workloads (C{--quick}: a tenth of the messages, a 20 MB big one)."""
    scale = 10 if quick else 1
    return [
        Workload("small1", "1 KB, 1 session (msg/s)", 1, 2000 // scale, KB),
        Workload("small20", "1 KB, 20 sessions (msg/s)", 20, 2000 // scale, KB),
        Workload("large4", "1 MB, 4 sessions (msg/s)", 4, 100 // scale, MB),
        Workload("latency", "latency", 1, 200 // (4 if quick else 1), KB),
        Workload("big", "one 100 MB message", 1, 1, (20 if quick else 100) * MB),
    ]


def smtpSource(port: int, load: Workload, sink: Sink) -> tuple[float, bool, str]:
    """
    Run smtp-source once (one message per connection, its default); return the seconds it
    took, whether the sink got every message, and why not.
    """
    before = sink.count()
    command = [SMTP_SOURCE, "-s", str(load.sessions), "-m", str(load.messages)]
    command += ["-l", str(load.size), f"{HOST}:{port}"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return RUN_TIMEOUT, False, f"smtp-source timed out after {RUN_TIMEOUT:.0f} s"
    elapsed = time.monotonic() - started
    got = sink.waitFor(before + load.messages) - before
    if done.returncode != 0 or got != load.messages:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return elapsed, False, f"sink got {got}/{load.messages}, status {done.returncode} {why[0]}"
    return elapsed, True, ""


class Conversation:
    """A blocking SMTP client connection: one command, one (possibly multi-line) reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """The last line of the next reply."""
        while True:
            line = self.reader.readline()
            if not line:
                raise OSError("connection closed")
            if line[3:4] != b"-":
                return line

    def command(self, line: bytes, expect: bytes) -> None:
        """Send C{line}; fail unless the reply starts with C{expect}."""
        self.sock.sendall(line)
        answer = self.reply()
        if not answer.startswith(expect):
            raise OSError(f"{line[:40]!r} answered {answer!r}")

    def close(self) -> None:
        """Close the connection."""
        self.reader.close()
        self.sock.close()


def transactionTimes(port: int, count: int, size: int) -> list[float]:
    """
    C{count} sequential transactions, one connection each; the seconds from MAIL to the
    221 of QUIT of each (the connection and EHLO are not timed), one command at a time.
    """
    body = b"Subject: latency\r\nFrom: <a@bench.example>\r\n\r\n"
    body += (b"x" * 78 + b"\r\n") * (size // 80) + b".\r\n"
    times = []
    for _ in range(count):
        smtp = Conversation(port)
        try:
            smtp.reply()
            smtp.command(b"EHLO bench.example\r\n", b"250")
            started = time.perf_counter()
            smtp.command(b"MAIL FROM:<a@bench.example>\r\n", b"250")
            smtp.command(b"RCPT TO:<b@bench.example>\r\n", b"250")
            smtp.command(b"DATA\r\n", b"354")
            smtp.command(body, b"250")
            smtp.command(b"QUIT\r\n", b"221")
            times.append(time.perf_counter() - started)
        finally:
            smtp.close()
    return times


# --- one round -------------------------------------------------------------------------------

Results = dict[str, dict[str, list[float]]]
"""peer name -> measurement key -> one value per valid round."""


def measurePeer(
    peer: Peer,
    loads: list[Workload],
    sink: Sink,
    work: Path,
    results: Results,
    failures: list[str],
    round: int,
) -> None:
    """Start C{peer} afresh, run every workload through it, record, stop it."""
    mine = results.setdefault(peer.name, {})
    process = None
    if peer.start is not None:
        process = peer.start(peer, work)
        try:
            waitForBanner(peer.port, process)
        except RuntimeError as e:
            failures.append(f"round {round}: {peer.name} did not start: {e}")
            stop(process)
            return
        time.sleep(0.5)
        mine.setdefault("idle_rss", []).append(sum(memory(processTree(process.pid), "VmRSS")))
    # A warm-up, not measured: every peer's first connections (imports, caches, the kernel's
    # socket structures) are not what is compared.
    _, ok, why = smtpSource(peer.port, Workload("warmup", "", 4, 40, KB), sink)
    if not ok:
        failures.append(f"round {round}: {peer.name} warm-up: {why}")

    def tree() -> list[int]:
        return processTree(process.pid) if process is not None else []

    try:
        for load in loads:
            if process is not None and process.poll() is not None:
                failures.append(f"round {round}: {peer.name} exited ({process.returncode})")
                return
            if load.key == "latency":
                if peer.divisor > 1:
                    # 45 ms a transaction: a quarter of them is plenty for a median.
                    load = Workload(load.key, load.label, 1, load.messages // 4, load.size)
                before = sink.count()
                try:
                    times = transactionTimes(peer.port, load.messages, load.size)
                except OSError as e:
                    failures.append(f"round {round}: {peer.name} latency: {e}")
                    continue
                got = sink.waitFor(before + load.messages) - before
                if got != load.messages:
                    failures.append(f"round {round}: {peer.name} latency: sink got {got}")
                    continue
                mine.setdefault("latency", []).append(statistics.median(times) * 1000)
                continue
            if load.size == KB and peer.divisor > 1:
                load = Workload(
                    load.key, load.label, load.sessions, load.messages // peer.divisor, load.size
                )
            cpuBefore = cpuSeconds(tree())
            elapsed, ok, why = smtpSource(peer.port, load, sink)
            cpu = cpuSeconds(tree()) - cpuBefore
            if not ok:
                failures.append(f"round {round}: {peer.name} {load.key}: {why}")
                continue
            if load.key == "big":
                mine.setdefault("big_s", []).append(elapsed)
                if process is not None:
                    hwm = memory(tree(), "VmHWM")
                    mine.setdefault("big_hwm_sum", []).append(sum(hwm))
                    mine.setdefault("big_hwm_max", []).append(max(hwm))
                continue
            mine.setdefault(load.key, []).append(load.messages / elapsed)
            if load.key == "small20" and process is not None:
                mine.setdefault("cpu_ms", []).append(cpu * 1000 / load.messages)
    finally:
        if process is not None:
            stop(process)


# --- the report ------------------------------------------------------------------------------


def median(values: list[float] | None) -> float | None:
    """The median, or C{None} for no value."""
    return statistics.median(values) if values else None


def number(value: float | None, digits: int = 0, prefix: str = "") -> str:
    """A table cell: thousands separated, C{—} for nothing."""
    if value is None:
        return "—"
    return f"{prefix}{value:,.{digits}f}"


def tableRows(peers: list[Peer], results: Results) -> list[tuple[str, list[str]]]:
    """The table's rows: a label and one cell per peer."""

    def cells(render: Callable[[Peer, dict[str, list[float]]], str]) -> list[str]:
        out = []
        for peer in peers:
            if peer.pending:
                out.append("pending")
            else:
                out.append(render(peer, results.get(peer.name, {})))
        return out

    direct = median(results.get("direct", {}).get("latency"))

    def latency(peer: Peer, mine: dict[str, list[float]]) -> str:
        value = median(mine.get("latency"))
        if peer.name == "direct" or value is None or direct is None:
            return f"({number(value, 2)} ms)" if value is not None else "—"
        return f"{value - direct:+.2f} ms"

    def ms(key: str, digits: int) -> Callable[[Peer, dict[str, list[float]]], str]:
        return lambda peer, mine: (
            "—" if peer.name == "direct" else f"{number(median(mine.get(key)), digits)}"
        )

    def rss(peer: Peer, mine: dict[str, list[float]]) -> str:
        if peer.name == "direct":
            return "—"
        total, most = median(mine.get("big_hwm_sum")), median(mine.get("big_hwm_max"))
        if total is None or most is None:
            return "—"
        if abs(total - most) < 0.05:
            return f"{total:.0f} MiB"
        return f"{total:.0f} MiB ({most:.0f} max)"

    rows = [
        ("1 KB, 1 session (msg/s)", cells(lambda p, m: number(median(m.get("small1"))))),
        ("1 KB, 20 sessions (msg/s)", cells(lambda p, m: number(median(m.get("small20"))))),
        ("1 MB, 4 sessions (msg/s)", cells(lambda p, m: number(median(m.get("large4")), 1))),
        ("added latency, one sequential 1 KB transaction", cells(latency)),
        ("CPU per 1 KB message at 20 sessions (ms)", cells(ms("cpu_ms", 2))),
        ("one 100 MB message (s)", cells(lambda p, m: number(median(m.get("big_s")), 2))),
        ("peak RSS with the 100 MB message (VmHWM, all processes)", cells(rss)),
        ("RSS at start, idle (MiB)", cells(ms("idle_rss", 1))),
    ]
    return rows


def targetChecks(results: Results) -> list[str]:
    """
    The issue's targets, as ratios measured in this run; beside each, what Twisted's own
    TCP relay (portforward, one process, no SMTP at all) reaches: a proxy on Twisted's
    reactor that does more than move bytes can hardly pass it.
    """

    def get(name: str, key: str) -> float | None:
        return median(results.get(name, {}).get(key))

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def added(name: str) -> float | None:
        mine, direct = get(name, "latency"), get("direct", "latency")
        return mine - direct if mine is not None and direct is not None else None

    # label, mailproxy's peer, workload, the reference, wanted, at least (else at most)
    rated = [
        ("1 KB at 20 sessions, workers=2 / aiosmtpd", "mailproxy-w2", "small20", "aiosmtpd", 2.5),
        ("1 KB at 20 sessions, workers=2 / HAProxy", "mailproxy-w2", "small20", "haproxy", 0.5),
        ("1 KB at 20 sessions, workers=1 / aiosmtpd", "mailproxy-w1", "small20", "aiosmtpd", 1.5),
        ("1 KB at 1 session, workers=1 / aiosmtpd", "mailproxy-w1", "small1", "aiosmtpd", 1.5),
        ("1 MB at 4 sessions, workers=1 / direct", "mailproxy-w1", "large4", "direct", 0.6),
    ]
    checks: list[tuple[str, float | None, float | None, float, bool]] = [
        (
            label,
            ratio(get(name, key), get(ref, key)),
            ratio(get("portforward", key), get(ref, key)),
            wanted,
            True,
        )
        for label, name, key, ref, wanted in rated
    ]
    checks.append(
        ("added latency, workers=1 (ms)", added("mailproxy-w1"), added("portforward"), 0.7, False)
    )
    for name in ("mailproxy-w1", "mailproxy-w2"):
        checks.append(
            (
                f"peak RSS per process with 100 MB, {name} (MiB)",
                get(name, "big_hwm_max"),
                None,
                80.0,
                False,
            )
        )

    def shown(value: float | None, atLeast: bool) -> str:
        if value is None:
            return "—"
        return f"{value:.2f}x" if atLeast else f"{value:.2f}"

    lines = [
        "| target | measured | wanted | met | Twisted portforward |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for label, value, floor, wanted, atLeast in checks:
        want = f"{'≥' if atLeast else '≤'} {wanted:g}{'x' if atLeast else ''}"
        met = "—"
        if value is not None:
            met = "yes" if (value >= wanted if atLeast else value <= wanted) else "no"
        lines.append(
            f"| {label} | {shown(value, atLeast)} | {want} | {met} | {shown(floor, atLeast)} |"
        )
    return lines


def machine(work: Path, checkout: Path) -> dict[str, str]:
    """What the table was measured on, and the versions of what was measured."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def output(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (done.stdout or done.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else "?"

    mailpy = str(work / "venv-mailproxy" / "bin" / "python")
    aiopy = str(work / "venv-aiosmtpd" / "bin" / "python")
    revision = output(["git", "-C", str(checkout), "describe", "--always", "--dirty"])
    branch = output(["git", "-C", str(checkout), "rev-parse", "--abbrev-ref", "HEAD"])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": output([mailpy, "-c", "import sys; print(sys.version.split()[0])"]),
        "twisted": output([mailpy, "-c", "import twisted; print(twisted.__version__)"]),
        "mailproxy": f"{revision} (branch {branch}, {checkout})",
        "haproxy": output([HAPROXY, "-v"]).replace("HAProxy version ", ""),
        "postfix": output(["/usr/sbin/postconf", "-d", "-h", "mail_version"]),
        "aiosmtpd": output([aiopy, "-c", "import aiosmtpd; print(aiosmtpd.__version__)"]),
        "proxsmtp": output([PROXSMTPD, "-v"]) if Path(PROXSMTPD).exists() else "not installed",
    }


SPREAD = [
    ("1 KB, 1 session (msg/s)", "small1", 0),
    ("1 KB, 20 sessions (msg/s)", "small20", 0),
    ("1 MB, 4 sessions (msg/s)", "large4", 1),
    ("latency, MAIL to 221 (ms, not minus direct)", "latency", 2),
    ("CPU per 1 KB message at 20 sessions (ms)", "cpu_ms", 2),
]
"""The rows of the spread table: label, measurement key, decimals."""


def report(peers: list[Peer], results: Results, info: dict[str, object]) -> str:
    """The Markdown file: the table, the targets, the machine, the command, the failures."""
    rows = tableRows(peers, results)
    head = "| workload | " + " | ".join(p.label for p in peers) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in peers) + " |"
    lines = [f"# mailproxy and its peers, {info['date']}", "", head, rule]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    rounds = info["rounds"]
    lines.append(
        f"Medians of {rounds} interleaved rounds (each round runs every peer once, fresh, the"
        " order rotated), smtp-source → peer → smtp-sink in a private network namespace with"
        " only loopback, one message per connection. A run counts only if smtp-sink received"
        " every message. Added latency: the median of "
        f"{info['latency_n']} sequential transactions timed from MAIL to the 221 of QUIT,"
        " minus direct's (in parentheses). CPU: the peer's processes' user+system time over"
        " the 20-session run, divided by its messages. Peak RSS: VmHWM summed over the peer's"
        " processes (and the largest one's), over the peer's whole life in that round."
    )
    lines.append("")
    for peer in peers:
        if peer.pending:
            lines.append(f"- **{peer.label}**: pending: {peer.pending}")
        for note in peer.notes:
            lines.append(f"- **{peer.label}**: {note}")
    lines += ["", "## Spread: lowest and highest of the rounds", "", head, rule]
    for label, key, digits in SPREAD:
        cells = []
        for peer in peers:
            values = results.get(peer.name, {}).get(key)
            if peer.pending or not values:
                cells.append("—")
            else:
                cells.append(f"{min(values):,.{digits}f} to {max(values):,.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    load: list[float] = info["load"]  # type: ignore[assignment]
    if load:
        lines += [
            "",
            f"Load average (1 min) as each peer started: {min(load):.1f} to {max(load):.1f},"
            f" median {statistics.median(load):.1f}, on {os.cpu_count()} CPUs"
            + (
                ": the machine was busy with other work, which slows every peer and widens"
                " the spread; compare columns of one run, not runs of different days."
                if max(load) > 1.5
                else "."
            ),
        ]
    lines += ["", "## The issue's targets (issue 10)", "", *targetChecks(results)]
    lines += ["", "## Machine and versions", ""]
    for key, value in info["machine"].items():  # type: ignore[attr-defined]
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Command",
        "",
        f"    {info['command']}",
        "",
        f"Wall time: {info['wall']:.0f} s.",
        "",
    ]
    failures = info["failures"]
    lines += ["## Runs that did not count", ""]
    lines += [f"- {f}" for f in failures] if failures else ["None."]  # type: ignore[union-attr]
    lines.append("")
    return "\n".join(lines)


def plot(data: Path, png: Path) -> None:
    """The chart (run with the plotting venv's Python): one panel per measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = json.loads(data.read_text())
    labels: list[str] = saved["labels"]
    names: list[str] = saved["names"]
    results: Results = saved["results"]
    direct = median(results.get("direct", {}).get("latency"))
    panels = [
        ("1 KB, 1 session (msg/s)", "small1", None),
        ("1 KB, 20 sessions (msg/s)", "small20", None),
        ("1 MB, 4 sessions (msg/s)", "large4", None),
        ("added latency, 1 KB (ms)", "latency", direct),
        ("CPU per 1 KB message (ms)", "cpu_ms", None),
        ("peak RSS, 100 MB message (MiB)", "big_hwm_sum", None),
    ]
    pending = set(saved.get("pending", []))
    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, key, offset) in zip(axes.flat, panels, strict=True):
        values: list[float | None] = []
        for name in names:
            value = median(results.get(name, {}).get(key))
            if value is not None and offset is not None:
                value = None if name == "direct" else value - offset
            values.append(value)
        bars = axis.barh(
            range(len(names)),
            [v or 0.0 for v in values],
            color=[colours[i % len(colours)] for i in range(len(names))],
        )
        axis.set_yticks(range(len(names)), labels if axis in axes[:, 0] else [""] * len(names))
        axis.invert_yaxis()
        axis.set_title(title)
        texts = []
        for name, value in zip(names, values, strict=True):
            if name in pending:
                texts.append("pending")
            elif value is None:
                texts.append("—")
            else:
                texts.append(f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
        axis.bar_label(bars, labels=texts, padding=2, fontsize=8)
        axis.margins(x=0.2)
    figure.suptitle(saved["title"])
    figure.tight_layout()
    figure.savefig(png, dpi=90)


# --- setup, outside the namespace ------------------------------------------------------------


def aptInstall(package: str) -> bool:
    """C{apt-get install -y PACKAGE}; whether it worked."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, capture_output=True)
    return done.returncode == 0


def venv(work: Path, name: str, packages: list[str], refresh: bool = False) -> Path:
    """A venv under C{work} with C{packages} pip-installed (once; C{refresh}: every time)."""
    path = work / f"venv-{name}"
    python = path / "bin" / "python"
    fresh = not python.exists()
    if fresh:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    if fresh or refresh:
        print(f"peers: pip install {' '.join(packages)} into {path}", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
            check=True,
        )
    return python


def setup(work: Path, checkout: Path) -> None:
    """Find or install every peer; return notes for the peers that cannot run."""
    work.mkdir(parents=True, exist_ok=True)
    missing = []
    for path, package in ((SMTP_SOURCE, "postfix"), (HAPROXY, "haproxy")):
        if not Path(path).exists() and not aptInstall(package):
            missing.append(f"{path} not found, and apt-get install {package} failed")
    if missing:
        raise SystemExit("peers: " + "; ".join(missing))
    if not Path(PROXSMTPD).exists() and not aptInstall("proxsmtp"):
        print("peers: apt-get install proxsmtp failed: it is left out", flush=True)
    venv(work, "aiosmtpd", ["aiosmtpd"])
    venv(work, "plot", ["matplotlib"])
    python = venv(work, "mailproxy", [str(checkout)])
    # A regular install of this checkout, again each run: first what it needs that the venv
    # lacks (a dependency added since), then the checkout itself over the installed one.
    print(f"peers: pip install {checkout} into {python.parent.parent}", flush=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(checkout)], check=True)
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(checkout)], check=True)


# --- main ------------------------------------------------------------------------------------


def inside(options: argparse.Namespace, argv: list[str]) -> int:
    """In the namespace: bring loopback up, run the rounds, write the results."""
    started = time.monotonic()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if options.nice:
        # Every peer, the sink and smtp-source inherit it: the same for all, and ahead of
        # whatever else the machine is running.
        os.nice(options.nice)
    work = Path(options.workdir)
    peers = allPeers()
    if options.only:
        wanted = set(options.only.split(","))
        unknown = wanted - {p.name for p in peers}
        if unknown:
            raise SystemExit(f"peers: unknown --only names: {', '.join(sorted(unknown))}")
        peers = [p for p in peers if p.name in wanted]
    if not Path(PROXSMTPD).exists():
        for peer in peers:
            if peer.name == "proxsmtp":
                peer.pending = "not installed (Debian package proxsmtp)"
    for peer in peers:
        if peer.name == "aiosmtpd":
            peer.notes.append(
                "holds each message in memory and delivers it with smtplib,"
                " blocking its event loop, after the client's end of data"
            )
        if peer.name == "proxsmtp":
            peer.notes.append(
                "no FilterCommand: each message spooled to a file under its TempDirectory,"
                " then sent on, a write() per line without TCP_NODELAY, so the final dot"
                " waits for the sink's delayed ACK (about 40 ms a message); it listens with"
                " a backlog of 5 (listen(3, 5)), so at 20 sessions connections wait for"
                " SYN retries (1 s). To stay in the time budget its 1 KB runs send a tenth"
                " of the messages, and its latency is the median of a quarter of the"
                " transactions"
            )
    loads = workloads(options.quick)
    sink = Sink(work)
    results: Results = {}
    failures: list[str] = []
    loads1: list[float] = []
    try:
        active = [p for p in peers if not p.pending]
        for round in range(options.rounds):
            shift = round % len(active)
            order = active[shift:] + active[:shift]
            print(
                f"peers: round {round + 1}/{options.rounds}: " + " ".join(p.name for p in order),
                flush=True,
            )
            for peer in order:
                loads1.append(os.getloadavg()[0])
                began = time.monotonic()
                measurePeer(peer, loads, sink, work, results, failures, round + 1)
                print(f"peers:   {peer.name}: {time.monotonic() - began:.1f} s", flush=True)
    finally:
        stop(sink.process)
    now = datetime.now(UTC)
    info: dict[str, object] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": options.rounds,
        "latency_n": loads[3].messages,
        "machine": machine(work, Path(options.checkout).resolve()),
        "load": loads1,
        "command": "python3 bench/peers.py " + " ".join(argv),
        "wall": time.monotonic() - started + options.setup_seconds,
        "failures": failures,
    }
    text = report(peers, results, info)
    out = Path(options.results)
    out.mkdir(parents=True, exist_ok=True)
    # Only a full run of this checkout is "latest"; the others are named for what they were.
    checkout = Path(options.checkout).resolve()
    stem = f"peers-{now:%Y-%m-%d}"
    if checkout != CHECKOUT:
        stem += "-" + re.sub(r"[^\w.-]", "_", checkout.name)
    stem += ("-quick" if options.quick else "") + ("-only" if options.only else "")
    (out / f"{stem}.md").write_text(text)
    data = work / "results.json"
    data.write_text(
        json.dumps(
            {
                "labels": [p.label for p in peers],
                "names": [p.name for p in peers],
                "pending": [p.name for p in peers if p.pending],
                "results": results,
                "title": f"mailproxy and its peers, {info['date']}"
                f" ({os.cpu_count()} CPUs, {info['machine']['cpu']})",  # type: ignore[index]
            }
        )
    )
    (out / f"{stem}.json").write_text(data.read_text())
    plotter = work / "venv-plot" / "bin" / "python"
    subprocess.run(
        [str(plotter), __file__, "--plot", str(data), str(out / f"{stem}.png")], check=True
    )
    if stem == f"peers-{now:%Y-%m-%d}":
        shutil.copy(out / f"{stem}.md", out / "latest.md")
        shutil.copy(out / f"{stem}.png", out / "latest.png")
    print(text)
    print(f"peers: wrote {out / stem}.md and .png", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument(
        "--only", help="comma-separated peers: " + ",".join(p.name for p in allPeers())
    )
    parser.add_argument(
        "--workdir",
        default="/var/tmp/mailproxy-bench",
        help="venvs, configurations, logs, spools (default %(default)s)",
    )
    parser.add_argument(
        "--results",
        default=str(HERE / "results"),
        help="where the table and chart go (default bench/results)",
    )
    parser.add_argument(
        "--checkout",
        default=str(CHECKOUT),
        help="the mailproxy checkout to pip install and measure (default: this one)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run everything at this nice value, e.g. -10 on a machine busy with other work",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--plot", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.plot:
        plot(Path(options.plot[0]), Path(options.plot[1]))
        return 0
    if options.inside:
        return inside(
            options, [a for a in argv if not a.startswith("--setup-seconds") and a != "--inside"]
        )
    if os.geteuid() != 0:
        raise SystemExit("peers: run as root (unshare --net, smtp-sink -u nobody)")
    began = time.monotonic()
    setup(Path(options.workdir), Path(options.checkout).resolve())
    elapsed = time.monotonic() - began
    command = [
        "unshare",
        "--net",
        "--",
        sys.executable,
        __file__,
        *argv,
        "--inside",
        f"--setup-seconds={elapsed:.1f}",
    ]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
