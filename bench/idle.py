"""
Benchmark: 5,000 concurrent idle clients on one mailproxy process, and a 5,001st served.

    python3 bench/idle.py                 # as root: 5,000 clients, held 3 s
    python3 bench/idle.py --quick         # 500 clients, held 1 s (well under 30 s)
    python3 bench/idle.py --clients 2000 --hold 10

It starts Postfix's smtp-sink as the MTA (C{-m} raised to take every session's MTA leg),
then mailproxy (C{twistd -n mailproxy}, C{workers = 1},
C{[limits] connections} = clients + 1000) under C{prlimit --nofile=65536:65536}, as the
systemd unit's C{LimitNOFILE=65536} would; raises this process's own limit the same way;
opens the clients from 127.0.2.1 to 127.0.2.10 (the proxy's
C{connections_per_client} raised too), each reading the banner -- with C{greeting = "mta"},
the default, that banner is the sink's, so every idle client holds its MTA connection --;
then, while they idle, sends one whole message through from a further client and checks
the sink counted it. It reports the proxy's RSS (VmRSS before, VmHWM after), its open
descriptors, and that a mailproxy started under C{prlimit --nofile=1024:1024} with the same
configuration logs the start-up warning about the limit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bigmessage as big

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
HOST = "127.0.0.1"
SOURCES = [f"127.0.2.{n}" for n in range(1, 11)]
#: The systemd unit's LimitNOFILE; lowered to the hard limit where this process may not raise
#: it (no CAP_SYS_RESOURCE, e.g. in a container).
UNIT_NOFILE = 65536
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = UNIT_NOFILE if _HARD == resource.RLIM_INFINITY else min(UNIT_NOFILE, _HARD)
START_TIMEOUT = 30.0
RSS_TARGET_MB = 200.0


def memory(pid: int, key: str) -> float:
    """C{key} (VmRSS, VmHWM) of C{pid} in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def descriptors(pid: int) -> int:
    """How many files C{pid} has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def sinkCount(out: Path) -> int:
    """Messages smtp-sink C{-c} has counted so far."""
    found = re.findall(rb"mesg=(\d+)", out.read_bytes()[-4096:])
    return int(found[-1]) if found else 0


def configuration(work: Path, port: int, sinkPort: int, connections: int) -> Path:
    """mailproxy's configuration: defaults but for the addresses and the two limits."""
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    path = work / "mailproxy.toml"
    path.write_text(
        "[proxy]\n"
        f'listen = "tcp:{port}:interface={HOST}:backlog=4096"\n'
        f'upstream = "tcp:host={HOST}:port={sinkPort}"\n'
        'client_names = "off"\n'
        f'spool_dir = "{spool}"\n'
        "workers = 1\n"  # one process: the one measured
        "\n"
        "[limits]\n"
        f"connections = {connections}\n"
        f"connections_per_client = {connections}\n"
    )
    return path


def twistd(config: Path, log: Path, nofile: int) -> subprocess.Popen[bytes]:
    """mailproxy from this checkout under C{prlimit --nofile=N:N}, logging to C{log}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(CHECKOUT), env.get("PYTHONPATH")] if p)
    command = [
        "prlimit",
        f"--nofile={nofile}:{nofile}",
        "--",
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "-l",
        str(log),
        "mailproxy",
        "--config",
        str(config),
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=config.parent
    )


def checkWarning(work: Path, config: Path) -> str:
    """Start mailproxy with 1024 descriptors and the same configuration: the warning line."""
    log = work / "lowlimit.log"
    process = twistd(config, log, 1024)
    deadline = time.monotonic() + START_TIMEOUT
    found = ""
    try:
        while time.monotonic() < deadline and not found and process.poll() is None:
            time.sleep(0.2)
            text = log.read_text(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if "file descriptors:" in line:
                    found = line.split("] ", 1)[-1]
    finally:
        big.stop(process, 40)
    return found


async def openIdle(
    port: int,
    count: int,
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    failures: list[str],
) -> None:
    """Open C{count} clients, a few hundred at a time, each reading its banner."""
    gate = asyncio.Semaphore(200)

    async def one(n: int) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, port, local_addr=(SOURCES[n % len(SOURCES)], 0)),
                    30,
                )
                banner = await asyncio.wait_for(reader.readline(), 30)
            except (OSError, TimeoutError) as e:
                failures.append(f"client {n}: {e!r}")
                return
            if not banner.startswith(b"220"):
                failures.append(f"client {n}: banner {banner!r}")
                writer.close()
                return
            opened.append((reader, writer))

    await asyncio.gather(*(one(n) for n in range(count)))


def oneMessage(port: int) -> tuple[float, list[bytes]]:
    """A whole transaction from a further client; the seconds it took and the replies."""
    started = time.perf_counter()
    replies = []
    with socket.create_connection(
        (HOST, port), timeout=30, source_address=("127.0.3.1", 0)
    ) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if not line or line[3:4] != b"-":
                    replies.append(line.rstrip())
                    return line

        reply()
        for command in (
            b"EHLO idle.example\r\n",
            b"MAIL FROM:<a@idle.example>\r\n",
            b"RCPT TO:<b@idle.example>\r\n",
            b"DATA\r\n",
            b"Subject: the 5,001st\r\nFrom: <a@idle.example>\r\n\r\nhello\r\n.\r\n",
            b"QUIT\r\n",
        ):
            sock.sendall(command)
            reply()
    return time.perf_counter() - started, replies


async def run(options: argparse.Namespace, work: Path) -> int:
    """Everything but the setup and the clean-up."""
    sinkPort, port = big.freePort(), big.freePort()
    connections = options.clients + 1000
    sinkOut = work / "smtp-sink.out"
    sink = subprocess.Popen(
        [
            "prlimit",
            f"--nofile={NOFILE}:{NOFILE}",
            "--",
            "/usr/sbin/smtp-sink",
            "-c",
            "-u",
            "nobody",
            "-m",
            str(connections + 100),
            f"{HOST}:{sinkPort}",
            "4096",
        ],
        stdout=sinkOut.open("wb"),
        stderr=subprocess.STDOUT,
    )
    proxy = None
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        big.waitForBanner(sinkPort, sink, None, START_TIMEOUT)
        config = configuration(work, port, sinkPort, connections)
        warning = checkWarning(work, config) if not options.skip_warning else "(skipped)"
        log = work / "mailproxy.log"
        proxy = twistd(config, log, NOFILE)
        big.waitForBanner(port, proxy, None, START_TIMEOUT)
        # prlimit execs the Python, so the pid is mailproxy's.
        pid = proxy.pid
        time.sleep(0.5)
        rssStart, fdsStart = memory(pid, "VmRSS"), descriptors(pid)
        failures: list[str] = []
        began = time.monotonic()
        await openIdle(port, options.clients, opened, failures)
        openSeconds = time.monotonic() - began
        print(f"idle: {len(opened)} clients got their banner in {openSeconds:.1f} s", flush=True)
        before = sinkCount(sinkOut)
        seconds, replies = await asyncio.to_thread(oneMessage, port)
        await asyncio.sleep(0.2)
        delivered = sinkCount(sinkOut) - before
        await asyncio.sleep(options.hold)
        rssIdle, hwm, fds = memory(pid, "VmRSS"), memory(pid, "VmHWM"), descriptors(pid)
        # A client the proxy closed has had its EOF fed to its reader by now.
        alive = sum(1 for r, w in opened if not r.at_eof() and not w.is_closing())
        served = delivered == 1 and any(r.startswith(b"250 ") for r in replies[5:6])
        raised = ""
        for line in log.read_text(errors="replace").splitlines():
            if "file descriptors:" in line:
                raised = line.split("] ", 1)[-1]
        perSession = (hwm - rssStart) * 1024 / max(len(opened), 1)
        print(
            f"""
idle clients opened           {len(opened)} of {options.clients} ({len(failures)} failed)
  still open after the hold   {alive} ({options.hold:g} s)
proxy RSS at start            {rssStart:.1f} MiB ({fdsStart} open files)
proxy RSS with them idle      {rssIdle:.1f} MiB ({fds} open files)
proxy peak RSS (VmHWM)        {hwm:.1f} MiB (target: under {RSS_TARGET_MB:.0f} MiB)
  per idle session            {perSession:.1f} KiB
{"client no. " + format(options.clients + 1, ","):<30}{"served" if served else "NOT served"}: \
{seconds * 1000:.1f} ms from connect to 221, sink counted {delivered}
  replies                     {" / ".join(r.decode(errors="replace")[:40] for r in replies)}
descriptor limit              mailproxy under prlimit --nofile={NOFILE}:{NOFILE}\
{"" if NOFILE == UNIT_NOFILE else f" (the hard limit here; the unit sets {UNIT_NOFILE})"}, \
this client {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
  mailproxy logged            {raised or "(nothing: the soft limit was enough)"}
  with --nofile=1024:1024     {warning or "NO WARNING LOGGED"}
""",
            flush=True,
        )
        for failure in failures[:5]:
            print(f"  failed: {failure}")
        ok = (
            served
            and len(opened) == options.clients
            and alive == len(opened)
            and hwm < RSS_TARGET_MB
            and bool(warning)
        )
        return 0 if ok else 1
    finally:
        for _, writer in opened:
            writer.close()
        if proxy is not None:
            big.stop(proxy, 40)  # mailproxy's shutdown grace is 30 s
        big.stop(sink)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000, help="idle clients (5000)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds they idle (3)")
    parser.add_argument("--quick", action="store_true", help="500 clients, held 1 s")
    parser.add_argument(
        "--skip-warning", action="store_true", help="do not check the low-limit start-up warning"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    if options.quick:
        options.clients, options.hold = 500, 1.0
    if os.geteuid() != 0:
        raise SystemExit("idle: run as root (prlimit raises hard limits; smtp-sink -u nobody)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    work = Path(tempfile.mkdtemp(prefix="mailproxy-idle."))
    try:
        return asyncio.run(run(options, work))
    finally:
        if options.keep:
            print(f"idle: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
