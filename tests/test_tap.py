"""The twistd plugin: options, configuration errors, and the service it builds."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Mapping

from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailproxy import tap
from mailproxy.filters import IFilterFactory, pipeline
from mailproxy.filters.pipeline import filterFactories
from mailproxy.service import ProxyService, StartupError


class TapTests(SynchronousTestCase):
    def writeConfig(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def goodConfig(self, extra: str = "", spool: str | None = None) -> str:
        spool = spool or os.path.abspath(self.mktemp())
        return self.writeConfig(
            '[proxy]\nlisten = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]\n'
            'upstream = "tcp:host=127.0.0.1:port=10025"\n'
            f'spool_dir = "{spool}"\nworkers = 1\n' + extra
        )

    def test_dropin(self) -> None:
        """twistd finds the mailproxy plugin through the dropin."""
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("mailproxy", names)

    def test_configErrorIsOneLine(self) -> None:
        """A bad configuration stops start-up with one line naming the file and key."""
        path = self.writeConfig(
            '[proxy]\nlisten = "tcp:25"\nupstream = "tcp:host=a:port=1"\n[limits]\nrecipients = 0\n'
        )
        options = tap.Options()
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(["--config", path])
        message = str(raised.exception.code)
        self.assertIn(path, message)
        self.assertIn("limits.recipients", message)
        self.assertNotIn("\n", message)

    def build(self, path: str) -> IService:
        """What twistd does: parse the options, then make the service."""
        options = tap.Options()
        options.parseOptions(["--config", path])
        return tap.makeService(options)

    def test_unknownFilter(self) -> None:
        """A filter section naming no installed filter stops start-up with one line."""
        path = self.goodConfig("[filters.nosuch]\n")
        with self.assertRaises(SystemExit) as raised:
            self.build(path)
        self.assertEqual(
            raised.exception.code,
            f"mailproxy: {path}: filters.nosuch: no such filter is installed (known: "
            + ", ".join(sorted(filterFactories()))
            + ")",
        )

    def test_badFilterOption(self) -> None:
        """A wrong filter option stops start-up with one line naming the filter's key."""
        with self.assertRaises(SystemExit) as raised:
            self.build(self.goodConfig('[filters.access]\ndeny_networks = ["300.1.2.3/8"]\n'))
        message = str(raised.exception.code)
        self.assertIn("filters.access.deny_networks", message)
        self.assertNotIn("\n", message)

    def test_filtersFoundAndBuiltOnce(self) -> None:
        """
        Start-up looks for the installed filters once, while the options are read, and
        builds each configured filter once; the service keeps that registry.
        """
        found = []
        built = []
        real = pipeline.filterFactories

        def counting() -> Mapping[str, IFilterFactory]:
            factories = real()
            found.append(factories)
            access = factories["access"]

            @implementer(IFilterFactory)
            class Counting:
                name = "access"

                def build(self, options: Mapping[str, object], reactor: object) -> object:
                    built.append(options)
                    return access.build(options, reactor)  # type: ignore[arg-type]

            return {**factories, "access": Counting()}

        self.patch(tap, "filterFactories", counting)
        service = self.build(self.goodConfig('[filters.access]\ndeny_senders = ["*@x"]\n'))
        assert isinstance(service, ProxyService)
        self.assertEqual((len(found), len(built)), (1, 1))

    def test_configRequired(self) -> None:
        """Without --config and without the default file, the usage error says so."""
        self.patch(tap, "DEFAULT_CONFIG", self.mktemp())
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions([])
        self.assertIn("--config is required", str(raised.exception))

    def test_service(self) -> None:
        """The service has one listener per listen endpoint."""
        options = tap.Options()
        options.parseOptions(["--config", self.goodConfig()])
        service = tap.makeService(options)
        assert isinstance(service, ProxyService)
        self.assertEqual(len(service.listeners), 2)

    def test_localMTA(self) -> None:
        """With --local-mta the stand-in MTA runs beside the proxy."""
        options = tap.Options()
        options.parseOptions(
            [
                "--config",
                self.goodConfig(),
                "--local-mta",
                "tcp:0:interface=127.0.0.1",
                "--maildir",
                self.mktemp(),
            ]
        )
        service = tap.makeService(options)
        assert isinstance(service, MultiService)
        self.assertEqual(len(list(service)), 2)

    def test_sweepAtStart(self) -> None:
        """Spool files left by an earlier run are removed at start-up; others stay."""
        options = tap.Options()
        options.parseOptions(["--config", self.goodConfig()])
        service = tap.makeService(options)
        assert isinstance(service, ProxyService)
        spool = service.config.spoolDir
        os.mkdir(spool)
        for name in ("mailproxy-abc.msg", "keep.txt"):
            open(os.path.join(spool, name), "w").close()
        for listener in service:
            listener.startService = lambda: None  # type: ignore[method-assign]
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(os.listdir(spool), ["keep.txt"])

    def test_directoriesMadeAtStart(self) -> None:
        """
        Parsing the options and building the service create nothing; the spool and
        quarantine directories are made (mode 0700) when the service starts.
        """
        spool = os.path.abspath(self.mktemp())
        quarantine = os.path.join(spool, "quarantine")
        options = tap.Options()
        options.parseOptions(
            [
                "--config",
                self.goodConfig(spool=spool, extra=f'[quarantine]\ndir = "{quarantine}"\n'),
            ]
        )
        service = tap.makeService(options)
        assert isinstance(service, ProxyService)
        self.assertFalse(os.path.lexists(spool))
        for listener in service:
            listener.startService = lambda: None  # type: ignore[method-assign]
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [stat.S_IMODE(os.stat(d).st_mode) for d in (spool, quarantine)], [0o700, 0o700]
        )

    def test_directoryErrorAtStartIsOneLine(self) -> None:
        """
        A directory that cannot be made when twistd starts the service (it became a file
        after the options were read) stops start-up with one line naming the file and
        the key, and nothing is bound.
        """
        spool = os.path.abspath(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--config", self.goodConfig(spool=spool)])
        service = tap.makeService(options)
        assert isinstance(service, ProxyService)
        open(spool, "w").close()
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        self.assertEqual(
            raised.exception.code,
            f"mailproxy: {options['config']}: proxy.spool_dir: {spool!r} exists and is not a directory",
        )
        self.assertEqual([listener._waitingForPort for listener in service.listeners], [None, None])

    def test_directoryErrorDaemonised(self) -> None:
        """
        Under twistd in the background (no -n), the same error is a StartupError, which
        twistd reports to the process that launched it (a SystemExit would leave that
        process waiting); its text is the same one line.
        """
        from twisted.scripts._twistd_unix import ServerOptions

        spool = os.path.abspath(self.mktemp())
        path = self.goodConfig(spool=spool)
        twistd = ServerOptions()
        twistd.parseOptions(["mailproxy", "--config", path])
        service = tap.makeService(twistd.subOptions)
        assert isinstance(service, ProxyService)
        open(spool, "w").close()
        with self.assertRaises(StartupError) as raised:
            service.privilegedStartService()
        self.assertEqual(
            str(raised.exception),
            f"{path}: proxy.spool_dir: {spool!r} exists and is not a directory",
        )


#: Run in a fresh interpreter: what twistd's start-up imports and installs, printed.
_STARTUP_PROBE = """
import sys
from mailproxy import tap
options = tap.Options()
options.parseOptions(["--config", sys.argv[1]])
tap.makeService(options)
from twisted.internet import reactor
print(type(reactor).__module__)
print(" ".join(sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[2:])))))
"""


class StartupImportTests(SynchronousTestCase):
    """What a process started without the optional parts loads (a fresh interpreter each)."""

    def probe(self, config: str) -> tuple[str, set[str]]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                '[proxy]\nlisten = "tcp:0:interface=127.0.0.1"\n'
                'upstream = "tcp:host=127.0.0.1:port=10025"\n'
                f'spool_dir = "{os.path.abspath(self.mktemp())}"\n' + config
            )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", _STARTUP_PROBE, path, *_OPTIONAL],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
        ).stdout.splitlines()
        return out[0], set(out[1].split()) if len(out) > 1 else set()

    def test_notConfiguredNotImported(self) -> None:
        """
        Without [manhole] and [web], neither conch, twisted.web's server nor
        prometheus_client is imported (they are most of an idle process's memory); and on
        Linux the reactor is epoll's, chosen by the plugin.
        """
        reactor, loaded = self.probe("")
        self.assertEqual(loaded, set())
        if sys.platform.startswith("linux"):
            self.assertEqual(reactor, "twisted.internet.epollreactor")

    def test_webImportedWhenConfigured(self) -> None:
        """With [web], its modules are loaded (the probe above can see them)."""
        _, loaded = self.probe('[web]\nlisten = "tcp:0:interface=127.0.0.1"\n')
        self.assertIn("mailproxy.web", loaded)
        self.assertIn("twisted.web.server", loaded)


#: Packages of the optional parts: the manhole (conch), the status page and /metrics.
_OPTIONAL = (
    "twisted.conch",
    # The status page's server side (the rspamd filter's HTTP client is twisted.web's too,
    # and imported with every filter at discovery: about 2 MiB for all of them).
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.web.template",
    "prometheus_client",
    "mailproxy.web",
    "mailproxy.manhole",
)
