"""
The proxy's log in a real syslog daemon: rsyslog on loopback receives the SMTP dialogue of
one session (connect, EHLO, MAIL, RCPT, DATA, released or refused, disconnect, each with the
session's id), from C{[logging] syslog} over UDP or a UNIX socket, and from
C{twistd --syslog} through /dev/log.

The upstream MTA is the stand-in, in this process; mailproxy runs as a twistd process.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from twisted.internet import error
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailproxy.localmta import LocalMTA
from tests.system import harness

RSYSLOG_START_TIMEOUT = 10.0
#: rsyslog's line for each message: facility.severity, program, message.
TEMPLATE = "%syslogfacility-text%.%syslogseverity-text% %programname% %msg:::drop-last-lf%\\n"
DEV_LOG = "/dev/log"


def freeUdpPort() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (rsyslog binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Rsyslog:
    """A private rsyslogd (-n) writing every message it receives to one file."""

    def __init__(self, reactor: object, workdir: Path, inputs: str) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.messages = workdir / "messages.log"
        self.config = workdir / "rsyslog.conf"
        self.config.write_text(
            f'global(workDirectory="{workdir}")\n'
            + inputs
            + f'template(name="line" type="string" string="{TEMPLATE}")\n'
            + f'*.* action(type="omfile" file="{self.messages}" template="line")\n'
        )
        self.output = harness._OutputToFile(workdir / "rsyslogd.out")
        argv = ["rsyslogd", "-n", "-f", str(self.config), "-i", str(workdir / "rsyslogd.pid")]
        self.reactor.spawnProcess(  # type: ignore[attr-defined]
            self.output, shutil.which("rsyslogd"), argv, env={"PATH": os.environ["PATH"]}
        )

    def lines(self) -> list[str]:
        try:
            return self.messages.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    async def waitFor(self, text: str, timeout: float = harness.DELIVERY_TIMEOUT) -> list[str]:
        """Poll (bounded) until a line containing C{text} has arrived; all lines so far."""
        for _ in range(int(timeout / harness.POLL_INTERVAL)):
            lines = self.lines()
            if any(text in line for line in lines):
                return lines
            if self.output.exited:
                break
            await deferLater(self.reactor, harness.POLL_INTERVAL, lambda: None)
        out = (self.workdir / "rsyslogd.out").read_text(errors="replace")
        raise AssertionError(f"no {text!r} in {self.messages}: {self.lines()}\nrsyslogd: {out}")

    async def ready(self, probe: socket.socket, address: object) -> None:
        """Send probes until rsyslog logs one: it is listening."""
        for n in range(int(RSYSLOG_START_TIMEOUT / harness.POLL_INTERVAL)):
            try:
                probe.sendto(f"<14>probe[1]: ready {n}".encode(), address)  # type: ignore[arg-type]
            except OSError:
                pass  # its socket is not there yet
            if any("ready" in line for line in self.lines()):
                return
            if self.output.exited:
                break
            await deferLater(self.reactor, harness.POLL_INTERVAL, lambda: None)
        raise AssertionError(f"rsyslogd did not start: {self.output.exited=}, {self.lines()}")

    async def stop(self) -> None:
        if not self.output.exited:
            try:
                self.output.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except error.ProcessExitedAlready:
                pass
        await self.output.ended.addTimeout(harness.PROXY_STOP_TIMEOUT, self.reactor)


class SyslogTests(unittest.TestCase):
    """mailproxy's SMTP log lines arrive in rsyslog."""

    skip = harness.systemSkipReason("rsyslogd")

    def setUp(self) -> None:
        self.reactor = harness.reactor()
        self.mta = LocalMTA()
        self.mtaPort = self.reactor.listenTCP(0, self.mta.buildFactory(), interface="127.0.0.1")
        self.addCleanup(self.mtaPort.stopListening)
        # Short: a UNIX socket path (rsyslog's input) is limited to 107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="mp-syslog-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    async def rsyslog(self, inputs: str, probe: socket.socket, address: object) -> Rsyslog:
        daemon = Rsyslog(self.reactor, self.workdir, inputs)
        self.addCleanup(daemon.stop)
        self.addCleanup(probe.close)
        await daemon.ready(probe, address)
        return daemon

    async def proxy(self, logging: dict[str, harness.TomlValue], *twistd: str) -> int:
        """Start mailproxy in front of the stand-in MTA, with the access filter; its port."""
        port = harness.freePort()
        sections: dict[str, dict[str, harness.TomlValue]] = harness.proxyConfig(
            self.workdir / "proxy",
            port,
            f"tcp:host=127.0.0.1:port={self.mtaPort.getHost().port}",
            filters={"access": {"deny_senders": ["*@refused.example"]}},
        )
        if logging:
            sections["logging"] = logging
        await harness.runProxy(self, self.reactor, self.workdir / "proxy", sections, port, twistd)
        return port

    async def session(self, port: int) -> None:
        """One relayed message and one refused sender, on one connection."""
        replies = await harness.converse(
            self.reactor,
            port,
            [
                b"EHLO client.example",
                b"MAIL FROM:<a@example.org>",
                b"RCPT TO:<b@example.net>",
                b"DATA",
                harness.message("syslog", "a@example.org", "b@example.net"),
                b"MAIL FROM:<x@refused.example>",
                b"QUIT",
            ],
        )
        self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 354, 250, 550, 221])

    async def dialogue(self, daemon: Rsyslog) -> tuple[str, list[str]]:
        """Wait for the whole session in the log; its id, and the log's lines."""
        lines = await daemon.waitFor(" EHLO client.example")
        match = re.search(r" ([0-9A-F]{10}) EHLO client.example", "\n".join(lines))
        assert match is not None, lines
        return match[1], await daemon.waitFor(f" {match[1]} disconnect from")

    def assertDialogue(self, session: str, lines: list[str], prefix: str) -> None:
        """Every event of the session, in order, each line at C{prefix}."""
        ours = [line for line in lines if f" {session} " in line]
        expected = [
            "connect from [127.0.0.1]",
            "EHLO client.example: 250",
            "MAIL FROM:<a@example.org>: 250",
            "RCPT TO:<b@example.net>: 250",
            "DATA",
            "released: 250 2.0.0 Ok: queued as",
            "mail: refused by access: 550 5.7.1",
            "disconnect from [127.0.0.1]",
        ]
        position = 0
        for text in expected:
            found = [i for i, line in enumerate(ours[position:], position) if text in line]
            self.assertTrue(found, (text, ours))
            position = found[0]
            self.assertTrue(ours[position].startswith(prefix), ours[position])

    async def test_udp(self) -> None:
        """
        C{[logging] syslog = "udp:127.0.0.1:PORT"} (RFC 5424): the session's lines reach
        rsyslog's imudp, as mail.info from the program "mailproxy".
        """
        udpPort = freeUdpPort()
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        daemon = await self.rsyslog(
            f'module(load="imudp")\ninput(type="imudp" address="127.0.0.1" port="{udpPort}")\n',
            probe,
            ("127.0.0.1", udpPort),
        )
        port = await self.proxy({"syslog": f"udp:127.0.0.1:{udpPort}", "syslog_format": "rfc5424"})
        await self.session(port)
        self.assertDialogue(*await self.dialogue(daemon), "mail.info mailproxy ")

    async def test_unixSocket(self) -> None:
        """
        C{[logging] syslog = "unix:PATH"} (RFC 3164, as to /dev/log): the lines reach
        rsyslog's imuxsock, with the configured facility and tag.
        """
        path = self.workdir / "log.sock"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        daemon = await self.rsyslog(
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{path}" RateLimit.Interval="0")\n',
            probe,
            str(path),
        )
        port = await self.proxy(
            {"syslog": f"unix:{path}", "syslog_facility": "local5", "syslog_tag": "mx-in"}
        )
        await self.session(port)
        self.assertDialogue(*await self.dialogue(daemon), "local5.info mx-in ")

    async def test_twistdSyslog(self) -> None:
        """
        C{twistd --syslog --prefix=mailproxy}: twistd's own syslog observer sends the
        same lines to /dev/log (facility user, twistd's choice), received by rsyslog.
        The test serves /dev/log only where nothing else does, and removes it after.
        """
        if os.path.exists(DEV_LOG):
            raise unittest.SkipTest(f"{DEV_LOG} belongs to this machine's syslog: left alone")
        if not os.access(os.path.dirname(DEV_LOG), os.W_OK):
            raise unittest.SkipTest(f"cannot create {DEV_LOG} (not root)")
        self.addCleanup(self.removeDevLog)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        daemon = await self.rsyslog(
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{DEV_LOG}" RateLimit.Interval="0")\n',
            probe,
            DEV_LOG,
        )
        port = await self.proxy({}, "--syslog", "--prefix=mailproxy")
        await self.session(port)
        self.assertDialogue(*await self.dialogue(daemon), "user.info mailproxy ")

    def removeDevLog(self) -> None:
        """Remove the /dev/log this test's rsyslog served, if it left it behind."""
        try:
            if stat.S_ISSOCK(os.lstat(DEV_LOG).st_mode):
                os.unlink(DEV_LOG)
        except FileNotFoundError:
            pass
