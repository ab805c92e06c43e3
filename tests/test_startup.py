"""
Start-up failures at run time are one line naming what failed, like configuration errors
(under C{twistd -n} a C{SystemExit}, daemonised a L{StartupError} that twistd reports to
the process that launched it); every listener, the stats socket included, is bound in
C{privilegedStartService}, before twistd drops privileges; and the limit on open files is
made enough for C{limits.connections}, or warned about.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import socket
import stat

from twisted.application.service import IService, IServiceCollection
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy import startup, tap
from mailproxy.control import StatsSocketService
from mailproxy.service import ProxyService
from mailproxy.startup import StartupError
from tests.test_control import shortTempDir


def unbind(service: IService) -> Deferred[object]:
    """
    Stop whatever C{service} bound (its listeners, the stats socket), started or not: a
    start that failed halfway leaves some bound (twistd's process then exits).
    """
    stops = []
    for child in [service, *IServiceCollection(service, [])]:
        if child is not service and IServiceCollection(child, None) is not None:
            stops.append(unbind(child))
        elif getattr(child, "_waitingForPort", None) is not None or isinstance(
            child, StatsSocketService
        ):
            stops.append(defer.maybeDeferred(child.stopService))
    return defer.gatherResults(stops)


def freePort() -> socket.socket:
    """A socket bound and listening on a free loopback port (held until closed)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    return held


class OneLineTests(TestCase):
    def config(self, extra: str = "", listen: str = "tcp:0:interface=127.0.0.1") -> str:
        """A configuration file: a listener, an upstream, a spool, then C{extra}."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                f'[proxy]\nlisten = "{listen}"\nupstream = "tcp:host=127.0.0.1:port=1"\n'
                f'spool_dir = "{os.path.abspath(self.mktemp())}"\n' + extra
            )
        return path

    def build(self, path: str, *twistd: str, local: list[str] | None = None) -> IService:
        """What twistd does: parse its options (C{twistd TWISTD mailproxy ...}), make the service."""
        from twisted.scripts._twistd_unix import ServerOptions

        options = ServerOptions()
        options.parseOptions([*twistd, "mailproxy", "--config", path, *(local or [])])
        return tap.makeService(options.subOptions)

    def start(self, service: IService) -> None:
        """twistd's start: privilegedStartService (binding), then startService."""
        self.addCleanup(unbind, service)
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()

    def exitLine(self, service: IService) -> str:
        """The SystemExit text of starting C{service}; it must be one line."""
        with self.assertRaises(SystemExit) as raised:
            self.start(service)
        message = str(raised.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("mailproxy: "), message)
        return message

    def test_portInUse(self) -> None:
        """
        A listen port another process holds stops twistd -n with one line naming the
        file, the key, the endpoint and why; nothing else of the service starts.
        """
        held = freePort()
        self.addCleanup(held.close)
        port = held.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        path = self.config(listen=endpoint)
        service = self.build(path, "-n")
        self.assertEqual(
            self.exitLine(service),
            f"mailproxy: {path}: proxy.listen: cannot listen on {endpoint!r}: Address already in use",
        )
        self.assertFalse(service.running)

    def test_portInUseDaemonised(self) -> None:
        """
        Daemonised (no -n), the same failure is a StartupError with the same line: twistd
        writes it to the process that launched it, which prints it (a SystemExit would
        leave that process waiting).
        """
        held = freePort()
        self.addCleanup(held.close)
        endpoint = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
        path = self.config(listen=endpoint)
        service = self.build(path)
        with self.assertRaises(StartupError) as raised:
            self.start(service)
        self.assertEqual(
            str(raised.exception),
            f"{path}: proxy.listen: cannot listen on {endpoint!r}: Address already in use",
        )

    def test_webPortInUse(self) -> None:
        """The status page's port in use: one line naming web.listen."""
        held = freePort()
        self.addCleanup(held.close)
        endpoint = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
        path = self.config(f'[web]\nlisten = "{endpoint}"\n')
        self.assertEqual(
            self.exitLine(self.build(path, "-n")),
            f"mailproxy: {path}: web.listen: cannot listen on {endpoint!r}: Address already in use",
        )

    def test_localMtaPortInUse(self) -> None:
        """The stand-in MTA's port in use (the README's first command): one line."""
        held = freePort()
        self.addCleanup(held.close)
        endpoint = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
        service = self.build(
            self.config(""), "-n", local=["--local-mta", endpoint, "--maildir", self.mktemp()]
        )
        self.assertEqual(
            self.exitLine(service),
            f"mailproxy: --local-mta: cannot listen on {endpoint!r}: Address already in use",
        )

    def test_localMtaEndpointUnparseable(self) -> None:
        """A --local-mta that is no endpoint string: one line, not a traceback."""
        with self.assertRaises(SystemExit) as raised:
            self.build(self.config(""), "-n", local=["--local-mta", "nonsense:1"])
        message = str(raised.exception.code)
        self.assertTrue(message.startswith("mailproxy: --local-mta 'nonsense:1': "), message)
        self.assertNotIn("\n", message)

    def test_liveStatsSocket(self) -> None:
        """
        A stats socket another process listens on stops start-up with one line, and the
        other process's socket is left alone.
        """
        sock = os.path.join(shortTempDir(self), "s.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(sock)
        live.listen(1)
        path = self.config(f'[stats]\nsocket = "{sock}"\n')
        self.assertEqual(
            self.exitLine(self.build(path, "-n")),
            f"mailproxy: {path}: stats.socket: another process is listening on {sock}",
        )
        self.assertTrue(stat.S_ISSOCK(os.stat(sock).st_mode))

    def test_statsSocketUnbindable(self) -> None:
        """
        A stats socket whose directory cannot be written at start (it was removed after
        the configuration was read: under systemd, a read-only file system) is one line
        naming the key, the path and why.
        """
        directory = shortTempDir(self)
        sock = os.path.join(directory, "gone", "s.sock")
        os.mkdir(os.path.dirname(sock))
        path = self.config(f'[stats]\nsocket = "{sock}"\n')
        service = self.build(path, "-n")
        os.rmdir(os.path.dirname(sock))
        self.assertEqual(
            self.exitLine(service),
            f"mailproxy: {path}: stats.socket: cannot listen on {sock!r}: No such file or directory",
        )

    def test_staleStatsSocketReplaced(self) -> None:
        """A socket file nobody listens on (a crash) is replaced at start, with a warning."""
        sock = os.path.join(shortTempDir(self), "s.sock")
        old = socket.socket(socket.AF_UNIX)
        old.bind(sock)
        old.close()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.start(self.build(self.config(f'[stats]\nsocket = "{sock}"\n'), "-n"))
        self.assertIn(f"removed stale stats socket {sock}", [formatEvent(e) for e in events])
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(sock)  # accepted into the backlog: the new socket listens

    def test_statsSocketBoundBeforeStart(self) -> None:
        """
        The stats socket is bound in privilegedStartService, with the configured mode:
        it accepts before startService (which, under twistd, runs after the drop).
        """
        sock = os.path.join(shortTempDir(self), "s.sock")
        service = self.build(self.config(f'[stats]\nsocket = "{sock}"\nmode = "0640"\n'), "-n")
        self.addCleanup(unbind, service)
        service.privilegedStartService()
        self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o640)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(sock)


class HandOverTests(TestCase):
    """As root with twistd's -u: the stats socket is bound as root and given to the user."""

    skip = None if os.getuid() == 0 else "needs root, to hand the socket to another user"

    def test_statsSocketHandedOver(self) -> None:
        """
        After privilegedStartService with C{-u nobody -g nogroup}, the stats socket is
        nobody's and nogroup's, with the configured mode, and accepts.
        """
        directory = shortTempDir(self)
        sock = os.path.join(directory, "s.sock")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                '[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\n'
                f'upstream = "tcp:host=127.0.0.1:port=1"\nspool_dir = "{directory}/spool"\n'
                # One process: nobody cannot run this Python (the workers' start-up check).
                "workers = 1\n"
                f'[stats]\nsocket = "{sock}"\nmode = "0660"\n'
            )
        from twisted.scripts._twistd_unix import ServerOptions

        options = ServerOptions()
        options.parseOptions(["-n", "-u", "nobody", "-g", "nogroup", "mailproxy", "--config", path])
        service = tap.makeService(options.subOptions)
        assert isinstance(service, ProxyService)
        self.addCleanup(unbind, service)
        service.privilegedStartService()
        info = os.stat(sock)
        nobody = pwd.getpwnam("nobody")
        self.assertEqual(
            (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)),
            (nobody.pw_uid, grp.getgrnam("nogroup").gr_gid, 0o660),
        )
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(sock)


class DescriptorTests(SynchronousTestCase):
    """The limit on open files against what limits.connections needs."""

    def check(self, soft: int, hard: int, connections: int = 500) -> list[tuple[int, int]]:
        """Run the check against a fake limit; the limits it set."""
        set: list[tuple[int, int]] = []

        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            self.assertEqual(which, resource.RLIMIT_NOFILE)
            set.append(limits)

        startup.checkDescriptors(connections, lambda which: (soft, hard), setrlimit)
        return set

    def test_estimate(self) -> None:
        """Four descriptors a session (client, MTA, spool, a filter's), and 64 besides."""
        self.assertEqual(startup.descriptorsNeeded(500), 2064)

    def test_enough(self) -> None:
        """A soft limit that is enough is left alone, and nothing is logged."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.check(65536, 65536), [])
        self.assertEqual(len(events), 0)

    def test_softRaised(self) -> None:
        """
        A soft limit below the need, under a hard limit above it (systemd's default for
        services: 1024 and 524288), is raised to the need, and that is logged.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.check(1024, 524288), [(2064, 524288)])
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])
        self.assertIn("from 1024 to 2064", formatEvent(events[0]))

    def test_hardTooLow(self) -> None:
        """
        A hard limit below the need: a warning naming the limit, the need, the key and
        the fix (LimitNOFILE in the unit); nothing is changed.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.check(1024, 1024), [])
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        text = formatEvent(event)
        for part in ("is 1024", "the 2064", "limits.connections = 500", "LimitNOFILE=2064"):
            self.assertIn(part, text)


class DescriptorsAtStartTests(TestCase):
    def test_atStart(self) -> None:
        """The service checks the limit when it starts (the process's real one)."""
        checked: list[int] = []
        self.patch(startup, "checkDescriptors", checked.append)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                '[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\n'
                f'upstream = "tcp:host=127.0.0.1:port=1"\nspool_dir = "{os.path.abspath(self.mktemp())}"\n'
                "[limits]\nconnections = 7\n"
            )
        options = tap.Options()
        options.parseOptions(["--config", path])
        service = tap.makeService(options)
        self.addCleanup(service.stopService)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(checked, [7])
