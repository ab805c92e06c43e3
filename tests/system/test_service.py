"""
mailproxy run as a service: started as root, it binds a privileged port, drops to an
unprivileged user (twistd's -u/-g), writes a pidfile, still spools, reloads on SIGHUP, and
stops cleanly on SIGTERM. The upstream is the stand-in MTA, in this process.

L{HandOverTests} only need root (they parse twistd's options and start the service's
privileged part in this process), so they also run with the unit tests.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from twisted.internet.task import deferLater
from twisted.trial import unittest

import mailproxy
import mailproxy.plugins
from mailproxy import tap
from mailproxy.localmta import LocalMTA
from mailproxy.service import ProxyService
from tests.system import harness

USER, GROUP = "nobody", "nogroup"


def privilegedPort() -> int:
    """A port below 1024 free on 127.0.0.1 (a bounded search)."""
    for port in range(600, 1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024 on 127.0.0.1")


def uids(pid: int) -> list[int]:
    """The real, effective, saved and filesystem uids of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(n) for n in line.split()[1:]]
    raise LookupError(pid)


class PrivilegeTests(unittest.TestCase):
    skip = harness.systemSkipReason() or (
        None if os.getuid() == 0 else "system test: needs root, to bind a port below 1024"
    )

    async def test_dropPrivileges(self) -> None:
        """
        As root with C{-u nobody -g nogroup --pidfile}: the proxy listens on a port below
        1024, then runs as nobody (every uid), with its pid in the pidfile and the spool
        directory handed over to nobody; it relays a message, applies a reloaded
        configuration on SIGHUP, and on SIGTERM shuts down cleanly and removes its pidfile.
        """
        reactor = harness.reactor()
        mta = LocalMTA()
        mtaPort = reactor.listenTCP(0, mta.buildFactory(), interface="127.0.0.1")
        self.addCleanup(mtaPort.stopListening)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        for directory in [workdir, *workdir.parents]:  # trial's are 0700: let nobody in
            directory.chmod(directory.stat().st_mode | 0o011)
            if directory == Path.cwd():
                break
        run = workdir / "run"  # the pidfile's directory: nobody's, to remove it at exit
        run.mkdir()
        nobody = pwd.getpwnam(USER)
        os.chown(run, nobody.pw_uid, nobody.pw_gid)
        pidfile = run / "mailproxy.pid"
        port = privilegedPort()
        # One process: worker processes are started as the -u user, who cannot run the
        # test's Python here (the master refuses to start then; tests/test_workers.py).
        sections = harness.proxyConfig(
            workdir,
            port,
            f"tcp:host=127.0.0.1:port={mtaPort.getHost().port}",
            proxy={"workers": 1},
        )
        process = harness.spawnProxy(
            reactor, workdir, sections, port, ["-u", USER, "-g", GROUP, f"--pidfile={pidfile}"]
        )
        try:
            await process.waitUntilReady()
            assert process.pid is not None
            self.assertEqual(uids(process.pid), [nobody.pw_uid] * 4)
            self.assertEqual(int(pidfile.read_text()), process.pid)
            self.assertEqual((workdir / "spool").stat().st_uid, nobody.pw_uid)

            script = [
                b"EHLO client.example",
                b"MAIL FROM:<a@example.org>",
                b"RCPT TO:<b@example.net>",
                b"DATA",
                harness.message("service", "a@example.org", "b@example.net"),
                b"QUIT",
            ]
            replies = await harness.converse(reactor, port, script)
            self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 354, 250, 221])
            self.assertEqual(len(mta.messages), 1)

            sections["filters.access"] = {"deny_senders": ["*@example.org"]}
            process.configPath.write_text(harness.renderConfig(sections))
            os.kill(process.pid, 1)  # SIGHUP
            for _ in range(int(harness.DELIVERY_TIMEOUT / harness.POLL_INTERVAL)):
                if "reloaded" in process.log():
                    break
                await deferLater(reactor, harness.POLL_INTERVAL, lambda: None)
            replies = await harness.converse(reactor, port, [*script[:2], b"QUIT"])
            self.assertEqual([r.code for r in replies], [220, 250, 550, 221])
        finally:
            status = await harness.stopAndLog(process)
        # twistd ends a clean shutdown on SIGTERM by re-raising it: the status is the signal.
        self.assertIn(status, (0, None))
        self.assertIn("Server Shut Down.", process.log())
        self.assertFalse(pidfile.exists())
        self.assertEqual(os.listdir(workdir / "spool"), [])


class HandOverTests(unittest.SynchronousTestCase):
    """
    twistd's -u as root: whether the directories can be handed over is checked while
    twistd reads its options; they are made and handed over in privilegedStartService,
    before twistd drops privileges.
    """

    skip = None if os.getuid() == 0 else "needs root, to own directories as another user"

    def parse(self, spool: Path, extra: str = "") -> ProxyService:
        """Parse twistd's options as C{twistd -n -u nobody mailproxy} does; build the service."""
        from twisted.scripts._twistd_unix import ServerOptions

        config = Path(self.mktemp())
        config.write_text(
            f'[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'upstream = "tcp:host=127.0.0.1:port=1"\nspool_dir = "{spool}"\nworkers = 1\n'
            + extra
        )
        options = ServerOptions()
        options.parseOptions(["-n", "-u", USER, "mailproxy", "--config", str(config)])
        service = tap.makeService(options.subOptions)
        assert isinstance(service, ProxyService)
        return service

    def start(self, service: ProxyService) -> None:
        """What twistd does as root: privilegedStartService (it binds the listeners)."""
        service.privilegedStartService()
        for listener in service.listeners:
            self.addCleanup(listener.stopService)

    def test_emptyDirectoryHandedOver(self) -> None:
        """
        A missing spool directory is not created while the options are read; at start
        it is created (0700) and given to the -u user.
        """
        spool = Path(self.mktemp()).resolve()
        service = self.parse(spool)
        self.assertFalse(spool.exists())
        self.start(service)
        info = spool.stat()
        self.assertEqual((info.st_uid, info.st_mode & 0o777), (pwd.getpwnam(USER).pw_uid, 0o700))

    def test_quarantineInsideSpool(self) -> None:
        """A new spool with a new quarantine inside it: both are given to the user."""
        spool = Path(self.mktemp()).resolve()
        self.start(self.parse(spool, f'[quarantine]\ndir = "{spool}/quarantine"\n'))
        nobody = pwd.getpwnam(USER).pw_uid
        self.assertEqual([spool.stat().st_uid, (spool / "quarantine").stat().st_uid], [nobody] * 2)

    def test_foreignDirectoryRefused(self) -> None:
        """
        A spool directory with files in it that the user does not own stops start-up
        while twistd reads its options (before it daemonises), with one line.
        """
        spool = Path(self.mktemp()).resolve()
        spool.mkdir(mode=0o700)
        (spool / "something").touch()
        with self.assertRaises(SystemExit) as raised:
            self.parse(spool)
        message = str(raised.exception.code)
        self.assertIn("proxy.spool_dir", message)
        self.assertIn(f"must belong to uid {pwd.getpwnam(USER).pw_uid}", message)
        self.assertNotIn("\n", message)
        self.assertEqual(spool.stat().st_uid, 0)

    def test_foreignDirectoryAtStart(self) -> None:
        """
        A directory that became unusable after the options were read stops
        privilegedStartService with the same one line, before anything is bound.
        """
        spool = Path(self.mktemp()).resolve()
        service = self.parse(spool)
        spool.mkdir(mode=0o700)
        (spool / "something").touch()
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        message = str(raised.exception.code)
        self.assertTrue(message.startswith("mailproxy: "), message)
        self.assertIn("proxy.spool_dir: ", message)
        self.assertIn(f"must belong to uid {pwd.getpwnam(USER).pw_uid}", message)
        self.assertEqual(spool.stat().st_uid, 0)
        self.assertEqual([listener._waitingForPort for listener in service.listeners], [None])

class CodeUnreadableTests(unittest.TestCase):
    """
    The service user cannot read the installed code: CI clones into a directory of mode
    0700, say, and twistd runs with C{-u nobody}. Everything mailproxy needs from the code
    is loaded before privileges drop, so a reload still works.
    """

    skip = harness.systemSkipReason("setpriv") or (
        None if os.getuid() == 0 else "system test: needs root, to run the proxy as nobody"
    )

    async def test_reloadAppliesWhenCodeUnreadable(self) -> None:
        """
        With the directory that holds the code (the checkout, and the virtualenv when it is
        inside) made 0700 for the length of the test, a proxy started as root with C{-u
        nobody -g nogroup} relays a message; after its configuration changes and a SIGHUP it
        logs C{reloaded ...: new sessions run under it}, and a new session runs under the
        new configuration (a sender it now denies gets 550).
        """
        reactor = harness.reactor()
        code = Path(mailproxy.__file__).resolve().parent.parent
        plugins = Path(mailproxy.plugins.__file__).resolve().parent
        mode = code.stat().st_mode & 0o7777
        code.chmod(0o700)
        self.addCleanup(code.chmod, mode)
        unreadable = await harness.runProcess(
            reactor,
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(plugins)],
        )
        self.assertNotEqual(unreadable.status, 0, f"nobody can still list {plugins}")

        # The proxy's own directory must stay reachable by nobody: not under the code.
        workdir = Path(tempfile.mkdtemp(prefix="mailproxy-unreadable.")).resolve()
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        self.assertNotIn(code, workdir.parents, "the temporary directory is inside the code")
        workdir.chmod(0o755)
        mta = LocalMTA()
        mtaPort = reactor.listenTCP(0, mta.buildFactory(), interface="127.0.0.1")
        self.addCleanup(mtaPort.stopListening)
        port = harness.freePort()
        # One process: worker processes, started after the drop, would need the code.
        sections = harness.proxyConfig(
            workdir,
            port,
            f"tcp:host=127.0.0.1:port={mtaPort.getHost().port}",
            proxy={"workers": 1},
        )
        process = harness.spawnProxy(reactor, workdir, sections, port, ["-u", USER, "-g", GROUP])
        self.addCleanup(self._keepLog, process)
        self.addCleanup(harness.stopAndLog, process)
        await process.waitUntilReady()
        assert process.pid is not None
        self.assertEqual(uids(process.pid), [pwd.getpwnam(USER).pw_uid] * 4)

        script = [
            b"EHLO client.example",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<b@example.net>",
            b"DATA",
            harness.message("unreadable", "a@example.org", "b@example.net"),
            b"QUIT",
        ]
        replies = await harness.converse(reactor, port, script)
        self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 354, 250, 221])

        sections["filters.access"] = {"deny_senders": ["*@example.org"]}
        process.configPath.write_text(harness.renderConfig(sections))
        process.configPath.chmod(0o644)
        os.kill(process.pid, signal.SIGHUP)
        outcome = re.compile(r"reloaded \S+: new sessions run under it|reload refused.*")
        await harness.waitUntil(reactor, lambda: outcome.search(process.log()) is not None)
        found = outcome.search(process.log())
        self.assertIsNotNone(found, f"no reload logged:\n{process.log()}")
        assert found is not None
        self.assertTrue(found.group(0).startswith("reloaded"), f"{found.group(0)}\n{process.log()}")
        replies = await harness.converse(reactor, port, [*script[:2], b"QUIT"])
        self.assertEqual([r.code for r in replies], [220, 250, 550, 221])

    def _keepLog(self, process: harness.ProxyProcess) -> None:
        """Copy the proxy's log next to the test's (the work directory is removed)."""
        keep = Path(self.mktemp())
        keep.mkdir(parents=True)
        (keep / "proxy.log").write_text(process.log())
