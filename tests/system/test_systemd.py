"""
The shipped systemd unit (conf/mailproxy.service) under a real systemd, booted in a
throwaway container (systemd-nspawn on this machine's own /usr, a fresh /etc and /var, no
network but loopback), with the sample configuration (conf/mailproxy.toml) as
/etc/mailproxy/mailproxy.toml and the mailproxy user made from conf/mailproxy.sysusers, in
front of the stand-in MTA on 127.0.0.1:10025: a message sent with swaks inside the
container goes through, and every path the sample names works under the unit's hardening.

The unit is used as shipped; a drop-in only puts the code under test first on the path.
Its C{ExecStart} names /opt/mailproxy/bin/twistd, the README's virtualenv: the container
has one there, made of this machine's /usr/bin/python3 and the site-packages of the
virtualenv running these tests (its own scripts name where it was made, which the container
may not see), with console scripts written for it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial import unittest

import mailproxy
from mailproxy.startup import descriptorsNeeded
from tests.system import harness

#: Where the container sees the README's virtualenv, and the code under test.
VENV = "/opt/mailproxy"
CODE = "/opt/mailproxy-code"
#: The longest the container may take, from start to power-off (then SIGTERM: nspawn asks
#: the container's systemd to power off; 10 s later SIGKILL).
BOOT_TIMEOUT = 60.0
#: The interpreter of the container's virtualenv: only /usr is the machine's there.
PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
#: The console scripts of the container's virtualenv, as pip writes them.
SCRIPTS = {
    "twistd": "from twisted.scripts.twistd import run",
    "mailproxy-localmta": "from mailproxy.localmta import main as run",
}

ROOT = Path(mailproxy.__file__).resolve().parent.parent


def skipReason() -> str | None:
    """Why the container cannot run here (in CI it must: no reason there but MAILPROXY_SYSTEM)."""
    reason = harness.systemSkipReason()
    if reason is not None:
        return reason
    if os.environ.get("CI") == "true":
        return None  # a missing systemd-nspawn fails the test, loudly
    if os.getuid() != 0:
        return "system test: systemd-nspawn needs root"
    if shutil.which("systemd-nspawn") is None:
        return "system test: systemd-nspawn not installed (apt-get install systemd-container)"
    if not os.path.exists(PYTHON):
        return f"system test: no {PYTHON} for the container's virtualenv (it sees only /usr)"
    return None


def virtualenv(directory: Path) -> None:
    """The container's /opt/mailproxy: a virtualenv of L{PYTHON}, its site-packages to bind."""
    (directory / "bin").mkdir(parents=True)
    (directory / SITE).mkdir(parents=True)
    (directory / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\n"
        f"version = {sys.version_info.major}.{sys.version_info.minor}\n"
    )
    (directory / "bin" / "python").symlink_to(PYTHON)
    for name, line in SCRIPTS.items():
        script = directory / "bin" / name
        script.write_text(f"#!{VENV}/bin/python\nimport sys\n{line}\nsys.exit(run())\n")
        script.chmod(0o755)


#: Runs inside the container once mailproxy and the stand-in MTA are started: sends a
#: message, records what a postmaster would look at in /out, stops mailproxy, powers off.
CHECK = r"""#!/bin/sh
exec >/out/check.log 2>&1
set -x
PY=@VENV@/bin/python
# Type=simple: started is not listening yet. Wait (at most 20 s) for the port.
$PY -c '
import socket, time
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", 2525), 1).close()
        break
    except OSError:
        time.sleep(0.1)
'
swaks --server 127.0.0.1:2525 --from me@example.org --to you@example.net \
    --header "Subject: through the unit" --body "hello from nspawn" >/out/swaks.txt 2>&1
echo $? >/out/swaks.status
$PY -c '
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/var/lib/mailproxy/mailproxy.sock")
data = b""
while chunk := s.recv(65536):
    data += chunk
open("/out/stats.json", "wb").write(data)
' >/out/stats.err 2>&1
stat -c '%n %U %G %a %F' /var/lib/mailproxy /var/lib/mailproxy/mailproxy.sock \
    /var/lib/mailproxy/spool /run/mailproxy /var/log/mailproxy >/out/stat.txt 2>&1
pid=$(systemctl show -p MainPID --value mailproxy)
grep -E '^(Uid|Gid|CapEff|CapBnd|NoNewPrivs):' /proc/$pid/status >/out/process.txt
grep -E '^Max open files' /proc/$pid/limits >>/out/process.txt
systemctl stop mailproxy
systemctl show mailproxy -p Result -p ExecMainStatus -p NRestarts >/out/result.txt
journalctl -u mailproxy --no-pager -o cat >/out/journal.txt
journalctl -b --no-pager -o short-monotonic >/out/boot-journal.txt
systemctl --no-block poweroff
"""

TARGET = """[Unit]
Description=mailproxy's systemd test
Wants=mailproxy.service mailproxy-localmta.service mailproxy-check.service
"""

LOCAL_MTA = f"""[Unit]
Description=the stand-in MTA on 127.0.0.1:10025
Before=mailproxy.service

[Service]
Environment=PYTHONPATH={CODE}
ExecStart={VENV}/bin/mailproxy-localmta --listen tcp:10025:interface=127.0.0.1 --maildir /out/Maildir
"""

CHECK_UNIT = """[Unit]
Description=send a message through mailproxy, record, power off
After=mailproxy.service mailproxy-localmta.service

[Service]
Type=oneshot
ExecStart=/bin/sh /out/check.sh
"""

DROP_IN = f"""[Service]
# The code under test first (the virtualenv may hold another copy of it).
Environment=PYTHONPATH={CODE}
"""


async def boot(reactor: Any, argv: list[str]) -> harness.ProcessResult:
    """Run the container; past L{BOOT_TIMEOUT}, SIGTERM (a clean power-off), then SIGKILL."""
    collect = harness._Collect(b"")
    process = reactor.spawnProcess(collect, argv[0], argv, env=dict(os.environ))
    timers = [
        reactor.callLater(BOOT_TIMEOUT, process.signalProcess, "TERM"),
        reactor.callLater(BOOT_TIMEOUT + 10, process.signalProcess, "KILL"),
    ]
    try:
        return await collect.ended
    finally:
        for timer in timers:
            if timer.active():
                timer.cancel()


class SystemdUnitTests(unittest.TestCase):
    skip = skipReason()

    async def test_sampleConfigurationUnderTheUnit(self) -> None:
        """
        Booted under systemd with the shipped unit and the sample configuration, mailproxy
        starts as the mailproxy user (no root, only CAP_NET_BIND_SERVICE, the unit's
        LimitNOFILE), its relative spool and stats socket land in /var/lib/mailproxy (the
        unit's WorkingDirectory), swaks's message reaches the stand-in MTA's Maildir, the
        stats socket (the user's, mode 0660) counts it, the journal has no traceback, and
        mailproxy stops cleanly.
        """
        reactor = harness.reactor()
        out = Path(self.mktemp()).resolve()
        (out / "units").mkdir(parents=True)
        (out / "Maildir").mkdir()
        units = out / "units"
        virtualenv(out / "venv")
        (units / "test.conf").write_text(DROP_IN)
        (units / "t.target").write_text(TARGET)
        (units / "mailproxy-localmta.service").write_text(LOCAL_MTA)
        (units / "mailproxy-check.service").write_text(CHECK_UNIT)
        (out / "check.sh").write_text(CHECK.replace("@VENV@", VENV))
        system = "/etc/systemd/system"
        binds = {
            str(out / "venv"): VENV,
            str(Path(sys.prefix) / SITE): f"{VENV}/{SITE}",
            str(ROOT): CODE,
            str(ROOT / "conf" / "mailproxy.toml"): "/etc/mailproxy/mailproxy.toml",
            str(ROOT / "conf" / "mailproxy.sysusers"): "/etc/sysusers.d/mailproxy.conf",
            str(ROOT / "conf" / "mailproxy.service"): f"{system}/mailproxy.service",
            str(units / "test.conf"): f"{system}/mailproxy.service.d/test.conf",
            str(units / "t.target"): f"{system}/t.target",
            str(units / "mailproxy-localmta.service"): f"{system}/mailproxy-localmta.service",
            str(units / "mailproxy-check.service"): f"{system}/mailproxy-check.service",
        }
        argv = [
            shutil.which("systemd-nspawn") or "systemd-nspawn",
            "-D",
            "/",
            "--volatile=yes",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            *[f"--bind-ro={source}:{target}" for source, target in binds.items()],
            f"--bind={out}:/out",
            "-b",
            "systemd.unit=t.target",
            "systemd.firstboot=off",
            "systemd.mask=timers.target",
            "systemd.mask=sockets.target",
            # The unit wants network-online.target; with loopback only, networkd's wait
            # would last its two minutes.
            "systemd.mask=systemd-networkd-wait-online.service",
        ]
        started = time.monotonic()
        booted = await boot(reactor, argv)
        took = time.monotonic() - started
        (out / "nspawn.log").write_text(booted.out + booted.err)

        def read(name: str) -> str:
            path = out / name
            return path.read_text() if path.exists() else f"({name} missing)"

        context = (
            f"nspawn exited {booted.status} after {took:.1f} s\n--- check.log\n"
            f"{read('check.log')}\n--- journal\n{read('journal.txt')}\n--- nspawn\n"
            f"{booted.err[-3000:]}"
        )
        self.assertTrue((out / "result.txt").exists(), context)
        self.assertEqual(read("swaks.status").strip(), "0", read("swaks.txt") + context)
        self.assertIn("<-  250 ", read("swaks.txt"))

        delivered = list((out / "Maildir" / "new").iterdir())
        self.assertEqual(len(delivered), 1, context)
        message = delivered[0].read_bytes()
        self.assertIn(b"Subject: through the unit", message)
        self.assertIn(b"hello from nspawn", message)

        stats = json.loads(read("stats.json"))
        self.assertEqual(stats["total"]["messages"]["accepted"], 1, stats)

        paths = {line.split()[0]: line.split()[1:] for line in read("stat.txt").splitlines()}
        self.assertEqual(
            paths["/var/lib/mailproxy/mailproxy.sock"], ["mailproxy", "mailproxy", "660", "socket"]
        )
        self.assertEqual(paths["/var/lib/mailproxy/spool"][:3], ["mailproxy", "mailproxy", "700"])
        self.assertEqual(paths["/run/mailproxy"][:2], ["mailproxy", "mailproxy"])

        process = dict(
            line.split(":", 1) for line in read("process.txt").splitlines() if ":" in line
        )
        self.assertNotEqual(process["Uid"].split()[0], "0", read("process.txt"))
        self.assertEqual(int(process["CapEff"], 16), 1 << 10, "only CAP_NET_BIND_SERVICE")
        # LimitNOFILE=65536, or the container's hard limit when that is lower.
        [limit] = [line for line in read("process.txt").splitlines() if "open files" in line]
        soft = int(limit.split()[3])
        self.assertEqual(soft, min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        self.assertGreaterEqual(soft, descriptorsNeeded(500))
        self.assertNotIn("file descriptors:", read("journal.txt"))

        journal = read("journal.txt")
        self.assertIn("mailproxy listening on tcp:2525:interface=127.0.0.1", journal)
        self.assertIn("stats socket on /var/lib/mailproxy/mailproxy.sock", journal)
        self.assertNotIn("Traceback", journal)
        self.assertIn("Result=success", read("result.txt"), journal)
        self.assertIn("NRestarts=0", read("result.txt"), journal)
        (out / "boot-seconds").write_text(f"{took:.2f}\n")


class AnalyzeTests(unittest.TestCase):
    """systemd's own checks of the shipped unit: no unknown or wrong settings, and its
    exposure rating (systemd-analyze security) stays "OK" or better."""

    skip = harness.systemSkipReason("systemd-analyze")

    #: The most exposure allowed, in tenths (an integer): the unit rates 1.7; the unit
    #: before it, run as root until twistd -u, rated 4.5.
    THRESHOLD = "20"

    async def analyze(self, *args: str) -> harness.ProcessResult:
        """systemd-analyze ARGS on the shipped unit, its ExecStart's program made to exist."""
        venv = Path(self.mktemp()).resolve()
        virtualenv(venv)
        unit = venv / "mailproxy.service"
        shipped = (ROOT / "conf" / "mailproxy.service").read_text()
        unit.write_text(shipped.replace(f"{VENV}/bin/", f"{venv}/bin/"))
        return await harness.runProcess(harness.reactor(), ["systemd-analyze", *args, str(unit)])

    async def test_verify(self) -> None:
        """systemd-analyze verify: exit 0 and nothing on stderr (it exits 0 for unknown keys)."""
        result = await self.analyze("verify")
        self.assertEqual((result.status, result.err), (0, ""))

    async def test_security(self) -> None:
        """systemd-analyze security --offline: at or below the threshold."""
        result = await self.analyze("security", "--offline=yes", f"--threshold={self.THRESHOLD}")
        self.assertEqual(result.status, 0, result.out[-2000:] + result.err)
        self.assertIn("Overall exposure level for mailproxy.service", result.out)
