"""
A quick, repeatable load for profiling the hot path: Postfix's smtp-sink as the MTA,
mailproxy under twistd in front of it, smtp-source as the clients, all on 127.0.0.1.

    PYTHONPATH=. .venv/bin/python bench/hotpath.py                    # 1 KB x 20, x 1; 1 MB x 4
    PYTHONPATH=. .venv/bin/python bench/hotpath.py --tree ../other    # another checkout
    PYTHONPATH=. .venv/bin/python bench/hotpath.py --extra-config filters.toml 1024:2000:20
    PYTHONPATH=. .venv/bin/python bench/hotpath.py --direct           # no proxy: the floor
    PYTHONPATH=. .venv/bin/python bench/hotpath.py --strace 1024:2000:20  # syscalls per run

A load is SIZE:MESSAGES:SESSIONS (smtp-source -l, -m, -s; one message per connection).
Each prints the median msg/s over --runs, and the proxy's CPU time per message (user and
system, from /proc/PID/stat): on a shared machine the CPU per message moves less than
the rate. --strace prints strace -c of the proxy during the first run: syscalls per
message are exact where times are not. --profile FILE passes twistd's cProfile options.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    """A port nothing listens on now, so that two runs (or a test suite) can share the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SINK_PORT = freePort()
PROXY_PORT = freePort()


def waitFor(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of C{pid} and its live children (the workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (OSError, IndexError):
                continue
    user = system = 0.0
    for each in pids:
        fields = _stat(each)
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def rss(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("VmRSS"))


def config(work: str, extra: str | None, workers: int = 1) -> str:
    path = os.path.join(work, "mailproxy.toml")
    with open(path, "w") as f:
        f.write(
            "[proxy]\n"
            f'listen = "tcp:{PROXY_PORT}:interface=127.0.0.1:backlog=1024"\n'
            f'upstream = "tcp:host=127.0.0.1:port={SINK_PORT}"\n'
            'client_names = "off"\n'
            f"workers = {workers}\n"
            f'spool_dir = "{os.path.join(work, "spool")}"\n'
            "[limits]\nconnections = 200\nconnections_per_client = 200\n"
            "message_size = 52428800\n"
        )
        if extra:
            with open(extra) as e:
                f.write(e.read())
    os.mkdir(os.path.join(work, "spool"))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", default=".", help="the checkout to run (PYTHONPATH)")
    p.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    p.add_argument("--extra-config", help="TOML appended to the configuration")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="[proxy] workers (default 1)")
    p.add_argument("--direct", action="store_true", help="smtp-source straight to the sink")
    p.add_argument("--profile", help="twistd --profile=FILE --profiler=cprofile --savestats")
    p.add_argument("--strace", action="store_true")
    p.add_argument("loads", nargs="*", default=["1024:2000:20", "1024:2000:1", "1048576:100:4"])
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="mailproxy-hotpath-")
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{SINK_PORT}", "1000"],
        stdout=subprocess.DEVNULL,
    )
    proxy = None
    try:
        waitFor(SINK_PORT)
        port = SINK_PORT
        if not a.direct:
            cmd = [a.twistd, "-n", "--pidfile=", "-l", os.path.join(work, "proxy.log")]
            if a.profile:
                cmd += [f"--profile={a.profile}", "--profiler=cprofile", "--savestats"]
            cmd += ["mailproxy", "--config", config(work, a.extra_config, a.workers)]
            env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
            proxy = subprocess.Popen(cmd, env=env, cwd=work)
            port = PROXY_PORT
            waitFor(port)
            time.sleep(0.5)
            print(f"idle RSS {int(rss(proxy.pid)) / 1024:.1f} MiB")
        for load in a.loads:
            size, count, sessions = load.split(":")
            rates, users, systems = [], [], []
            for run in range(a.runs):
                tracer = None
                if a.strace and proxy is not None and run == 0:
                    out = os.path.join(work, "strace")
                    tracer = subprocess.Popen(
                        ["strace", "-c", "-f", "-o", out, "-p", str(proxy.pid)]
                    )
                    time.sleep(1)
                before = cpu(proxy.pid) if proxy else (0.0, 0.0)
                start = time.perf_counter()
                done = subprocess.run(
                    ["smtp-source", "-s", sessions, "-m", count, "-l", size, f"127.0.0.1:{port}"],
                    capture_output=True,
                )
                elapsed = time.perf_counter() - start
                after = cpu(proxy.pid) if proxy else (0.0, 0.0)
                if done.returncode:
                    print("smtp-source failed:", done.stderr.decode()[-300:])
                if tracer is not None:
                    tracer.send_signal(2)
                    tracer.wait()
                    with open(out) as f:
                        print(f.read())
                rates.append(int(count) / elapsed)
                users.append((after[0] - before[0]) * 1000 / int(count))
                systems.append((after[1] - before[1]) * 1000 / int(count))
            print(
                f"{load}: {statistics.median(rates):8.1f} msg/s "
                f"({' '.join(f'{r:.0f}' for r in rates)}); CPU ms/msg user "
                f"{statistics.median(users):.3f} + system {statistics.median(systems):.3f}"
            )
        if proxy is not None:
            print(f"RSS at the end {int(rss(proxy.pid)) / 1024:.1f} MiB")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        sink.terminate()
        sink.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
