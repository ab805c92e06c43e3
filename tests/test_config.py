"""
Tests for L{mailproxy.config}: the mapping of the TOML file to frozen objects, and the
one-line errors that stop a bad configuration before anything listens.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailproxy.config import (
    AuthPolicy,
    BareLineEndings,
    Config,
    ConfigError,
    FilterSpec,
    Greeting,
    HeaderSyntax,
    Limits,
    Logging,
    Manhole,
    NulBytes,
    OnError,
    QuarantineSettings,
    StatsSocket,
    Timeouts,
    TLSSettings,
    UpstreamTLS,
    UpstreamTLSMode,
    Web,
    load,
)
from tests.certs import CertificateAuthority

SECTIONS = (
    "proxy, limits, timeouts, tls, upstream_tls, filters, logging, manhole, quarantine, stats, web"
)
SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "mailproxy.toml"
)
UPSTREAM = "tcp:host=127.0.0.1:port=10025"


def snake(name: str) -> str:
    """C{connectionsPerClient} -> C{connections_per_client}."""
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def camel(name: str) -> str:
    """C{upstream_tls} -> C{upstreamTls}."""
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


class ConfigTestCase(SynchronousTestCase):
    """Helpers: write a configuration file in a temporary directory and load it."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spool = os.path.abspath(self.mktemp())

    def write(self, text: str) -> str:
        """Write C{text} to a new temporary file; return its path."""
        path: str = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def configure(self, body: str = "", proxy: str = "", before: str = "") -> str:
        """
        Write C{before}, a valid [proxy] section with the C{proxy} lines added, then C{body}.

        @return: the path of the file.
        """
        return self.write(
            f'{before}\n[proxy]\nlisten = "tcp:2525"\nupstream = "{UPSTREAM}"\n'
            f"spool_dir = '{self.spool}'\n{proxy}\n{body}"
        )

    def load(self, path: str) -> Config:
        return load(path, self.reactor)

    def error(self, path: str) -> str:
        """The one-line message of the L{ConfigError} that loading C{path} raises."""
        e = self.assertRaises(ConfigError, load, path, self.reactor)
        self.assertNotIn("\n", str(e))
        return str(e)

    def assertError(self, path: str, key: str, message: str) -> None:
        self.assertEqual(self.error(path), f"{path}: {key}: {message}")


class SampleTests(ConfigTestCase):
    """The shipped C{conf/mailproxy.toml}."""

    def test_sampleLoads(self) -> None:
        """
        The sample loads as shipped, with the documented addresses and both filters in file
        order; its relative spool directory is in the working directory (and not created:
        the service makes it when it starts).
        """
        self.addCleanup(os.chdir, os.getcwd())
        # Short: the sample's stats socket lands here, and UNIX socket paths are limited.
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="mp-sample-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, workdir, True)
        os.chdir(workdir)
        config = self.load(SAMPLE)
        self.assertEqual(config.path, SAMPLE)
        self.assertEqual(config.listen, ("tcp:2525:interface=127.0.0.1:backlog=1024",))
        self.assertEqual(config.upstream, UPSTREAM)
        self.assertEqual(config.spoolDir, os.path.join(workdir, "spool"))
        self.assertEqual(os.listdir(workdir), [])
        self.assertEqual([f.name for f in config.filters], ["access", "size"])
        self.assertEqual(config.filters[0].options["deny_networks"], ("192.0.2.0/24",))
        self.assertEqual(config.filters[1].options, {"max_bytes": 26214400})
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_sampleDocumentsEveryKey(self) -> None:
        """Every key mailproxy knows appears in the sample, set or commented out."""
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()

        def keys(cls: type, *skip: str) -> list[str]:
            return [snake(a.name) for a in attrs.fields(cls) if a.name not in skip]

        sections = [camel(name) for name in SECTIONS.split(", ")[1:]]
        names = [
            *keys(Config, "path", "source", *sections),
            *keys(Limits),
            *keys(TLSSettings),
            *keys(UpstreamTLS),
            *keys(Timeouts),
            *keys(FilterSpec, "name", "options"),
            *keys(Logging),
            *keys(Manhole),
            *keys(QuarantineSettings),
            *keys(StatsSocket),
            *keys(Web),
        ]
        self.assertEqual(len(names), 64)
        for name in names:
            self.assertRegex(text, rf"(?m)^#? *{name} *=", name)


class MappingTests(ConfigTestCase):
    """What the keys become."""

    def test_workersShareConnections(self) -> None:
        """
        The workers share limits.connections: by default no more of them than there are
        connections (however many cores); more, set by hand, is refused with one line.
        """
        few = self.configure("[limits]\nconnections = 1\n")
        self.assertEqual(self.load(few).workers, 1)
        self.assertError(
            self.configure("[limits]\nconnections = 1\n", "workers = 2"),
            "proxy.workers",
            "2 is more than limits.connections (1), which the workers share: each needs one"
            " at least",
        )

    def test_minimal(self) -> None:
        """
        With only the required keys, everything else takes its default, the host name is
        C{socket.gethostname()}, the workers are as many as the cores, and C{path} is the
        path as given.
        """
        path = self.configure()
        config = self.load(path)
        self.assertEqual(
            config,
            Config(
                path=path,
                listen=("tcp:2525",),
                upstream=UPSTREAM,
                hostname=socket.gethostname(),
                spoolDir=self.spool,
                workers=min(len(os.sched_getaffinity(0)), 90),
            ),
        )
        self.assertIs(config.bareLineEndings, BareLineEndings.REJECT)
        self.assertEqual(config.limits, Limits())
        self.assertEqual(config.timeouts, Timeouts())
        self.assertEqual(config.filters, ())

    def test_defaultSpoolDir(self) -> None:
        """
        Without C{spool_dir} the spool is C{spool} in the working directory, stored as an
        absolute path.
        """
        self.addCleanup(os.chdir, os.getcwd())
        path = os.path.abspath(
            self.write(f'[proxy]\nlisten = "tcp:2525"\nupstream = "{UPSTREAM}"\n')
        )
        workdir = os.path.abspath(self.mktemp())
        os.mkdir(workdir)
        os.chdir(workdir)
        config = self.load(path)
        self.assertEqual(config.spoolDir, os.path.join(workdir, "spool"))

    def test_everyKey(self) -> None:
        """
        Every key maps to its camelCase attribute; integer seconds become floats and
        decimal ones are kept.
        """
        config = self.load(
            self.configure(
                proxy='hostname = "mx.example.org"\nbare_line_endings = "normalise"',
                body="[limits]\nmessage_size = 1000\nrecipients = 2\nline_length = 512\n"
                "connections = 3\nconnections_per_client = 1\n"
                "[timeouts]\nclient_idle = 1\nmta_connect = 2.5\nmta_reply = 3\nfilters = 0.25\n",
            )
        )
        self.assertEqual(config.hostname, "mx.example.org")
        self.assertIs(config.bareLineEndings, BareLineEndings.NORMALISE)
        self.assertEqual(config.limits, Limits(1000, 2, 512, 3, 1))
        self.assertEqual(config.timeouts, Timeouts(1.0, 2.5, 3.0, 0.25))
        self.assertIsInstance(config.timeouts.clientIdle, float)

    def test_relativeSpoolDirIsAbsolute(self) -> None:
        """A relative C{spool_dir} is stored as an absolute path."""
        relative = self.mktemp()
        os.mkdir(relative)
        config = self.load(
            self.write(
                f'[proxy]\nlisten = "tcp:2525"\nupstream = "{UPSTREAM}"\n'
                f"spool_dir = '{relative}/spool'\n"
            )
        )
        self.assertEqual(config.spoolDir, os.path.abspath(os.path.join(relative, "spool")))

    def test_listenList(self) -> None:
        """An array of listen endpoints becomes a tuple in the same order."""
        path = self.write(
            '[proxy]\nlisten = ["tcp:25", "tcp6:25:interface=\\\\:\\\\:", "haproxy:tcp:2526"]\n'
            f"upstream = \"{UPSTREAM}\"\nspool_dir = '{self.spool}'\n"
        )
        self.assertEqual(
            self.load(path).listen, ("tcp:25", "tcp6:25:interface=\\:\\:", "haproxy:tcp:2526")
        )

    def test_nothingListensOrConnects(self) -> None:
        """Checking the endpoint strings neither listens nor connects."""
        self.load(self.configure())
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.reactor.unixServers, [])
        self.assertEqual(self.reactor.unixClients, [])

    def test_filtersInFileOrder(self) -> None:
        """Filters come out in the order of their sections in the file, not sorted."""
        config = self.load(self.configure("[filters.spamd]\n[filters.access]\n[filters.clamd]\n"))
        self.assertEqual([f.name for f in config.filters], ["spamd", "access", "clamd"])

    def test_filterCommonKeys(self) -> None:
        """
        C{timeout}, C{on_error} and C{dry_run} become attributes with their defaults when
        left out; the other keys, and only those, become options.
        """
        config = self.load(
            self.configure(
                "[filters.a]\ntimeout = 5\non_error = \"accept\"\ndry_run = true\nhost = 'x'\n"
                "[filters.b]\n"
            )
        )
        self.assertEqual(
            config.filters,
            (
                FilterSpec("a", 5.0, OnError.ACCEPT, True, {"host": "x"}),
                FilterSpec("b", 30.0, OnError.TEMPFAIL, False, {}),
            ),
        )

    def test_filterOptionsReadOnly(self) -> None:
        """A filter's options cannot be changed: tables are read-only, arrays are tuples."""
        options = (
            self.load(self.configure("[filters.a]\nlist = [1, [2]]\ntable = { k = [3] }\n"))
            .filters[0]
            .options
        )
        self.assertEqual(options["list"], (1, (2,)))
        self.assertIsInstance(options["table"], Mapping)
        self.assertEqual(options["table"], {"k": (3,)})
        with self.assertRaises(TypeError):
            options["new"] = 1  # type: ignore[index]
        with self.assertRaises(TypeError):
            options["table"]["k"] = 1  # type: ignore[index]


class FileErrorTests(ConfigTestCase):
    """The file as a whole."""

    def test_missingFile(self) -> None:
        """A missing file is named, with the reason and no traceback."""
        path = self.mktemp()
        self.assertEqual(self.error(path), f"{path}: cannot read: No such file or directory")

    def test_directory(self) -> None:
        """A directory given as the file is an error naming it."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertEqual(self.error(path), f"{path}: cannot read: Is a directory")

    def test_invalidToml(self) -> None:
        """Invalid TOML is reported with tomllib's message, line and column."""
        path = self.write('[proxy]\nlisten = "tcp:25"\nupstream = tcp\n')
        self.assertEqual(
            self.error(path), f"{path}: not valid TOML: Invalid value (at line 3, column 12)"
        )

    def test_notUtf8(self) -> None:
        """A file that is not UTF-8 is an error, not a traceback."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b'[proxy]\nhostname = "\xff"\n')
        self.assertEqual(self.error(path), f"{path}: not UTF-8 text: invalid start byte at byte 20")

    def test_emptyFile(self) -> None:
        """An empty file lacks the required C{proxy.listen}."""
        path = self.write("")
        self.assertError(path, "proxy.listen", "missing: a server endpoint string is required")


class TextTests(ConfigTestCase):
    """A text read before (a worker's, from its master) is validated instead of the file."""

    def test_source(self) -> None:
        """What was read is kept as the configuration's source, byte for byte."""
        path = self.configure(proxy='hostname = "read.test"')
        with open(path, "rb") as f:
            text = f.read()
        self.assertEqual(self.load(path).source, text)

    def test_textNotFile(self) -> None:
        """The text is what counts: the file, changed or gone since, is not read."""
        path = self.configure(proxy='hostname = "checked.test"')
        with open(path, "rb") as f:
            text = f.read()
        os.remove(path)
        config = load(path, self.reactor, text)
        self.assertEqual((config.hostname, config.path, config.source), ("checked.test", path, text))

    def test_errorsNameThePath(self) -> None:
        """A text that is wrong is reported as the file's error would be."""
        path = self.configure()
        e = self.assertRaises(ConfigError, load, path, self.reactor, b"[nosuch]\n")
        self.assertEqual(str(e).split(": ")[0], path)
        e = self.assertRaises(ConfigError, load, path, self.reactor, b'hostname = "\xff"')
        self.assertEqual(str(e), f"{path}: not UTF-8 text: invalid start byte at byte 12")


class KeyErrorTests(ConfigTestCase):
    """Unknown, missing and misplaced keys and sections."""

    def test_missingRequired(self) -> None:
        """C{proxy.listen} and C{proxy.upstream} are required."""
        path = self.write(f'[proxy]\nlisten = "tcp:25"\nspool_dir = "{self.spool}"\n')
        self.assertError(path, "proxy.upstream", "missing: a client endpoint string is required")
        path = self.write(f'[proxy]\nupstream = "{UPSTREAM}"\n')
        self.assertError(path, "proxy.listen", "missing: a server endpoint string is required")

    def test_unknownSection(self) -> None:
        """An unknown section is an error, suggesting the nearest known one when close."""
        path = self.configure("[limit]\nrecipients = 5\n")
        self.assertError(path, "limit", 'unknown section, did you mean "limits"?')
        path = self.configure("[smtpd]\n")
        self.assertError(path, "smtpd", f"unknown section; known: {SECTIONS}")

    def test_topLevelKey(self) -> None:
        """A key outside any section is an unknown section."""
        path = self.write(f'upstream = "{UPSTREAM}"\n[proxy]\nlisten = "tcp:25"\n')
        self.assertError(path, "upstream", f"unknown section; known: {SECTIONS}")

    def test_unknownKey(self) -> None:
        """A misspelt key is an error suggesting the right one, never silently ignored."""
        path = self.configure("[limits]\nmessage_sise = 10\n")
        self.assertError(path, "limits.message_sise", 'unknown key, did you mean "message_size"?')
        path = self.configure(proxy='upsteam = "tcp:host=a:port=1"')
        self.assertError(path, "proxy.upsteam", 'unknown key, did you mean "upstream"?')
        path = self.configure("[timeouts]\nclientidle = 10\n")
        self.assertError(path, "timeouts.clientidle", 'unknown key, did you mean "client_idle"?')

    def test_unknownKeyNoSuggestion(self) -> None:
        """An unknown key close to nothing lists the known keys."""
        path = self.configure("[limits]\nfoo = 10\n")
        self.assertError(
            path,
            "limits.foo",
            "unknown key; known: message_size, recipients, line_length, connections, "
            "connections_per_client, mta_junk_commands, auth_failures, errors, commands, "
            "reply_buffer, commands_per_turn, min_data_rate",
        )

    def test_relayCommands(self) -> None:
        """relay_commands takes only harmless commands, named in any case."""
        path = self.configure(proxy='relay_commands = ["noop", "Help"]')
        self.assertEqual(load(path, self.reactor).relayCommands, ("NOOP", "HELP"))
        path = self.configure(proxy='relay_commands = ["NOOP", "XCLIENT"]')
        self.assertError(
            path,
            "proxy.relay_commands",
            "XCLIENT cannot be relayed (possible: ETRN, EXPN, HELP, NOOP, VRFY)",
        )

    def test_sectionNotTable(self) -> None:
        """A section given as a plain value is an error."""
        path = self.configure(before="limits = 5")
        self.assertError(path, "limits", "must be a table ([limits]), not 5")

    def test_filtersNotTable(self) -> None:
        """C{filters} must be a table of tables."""
        path = self.configure(before='filters = ["a"]')
        self.assertError(path, "filters", "must be a table ([filters]), not an array")
        path = self.configure("[filters]\naccess = true\n")
        self.assertError(path, "filters.access", "must be a table ([filters.access]), not true")


class ValueErrorTests(ConfigTestCase):
    """Values of the wrong type or out of range."""

    def test_integerNotString(self) -> None:
        """A string where an integer belongs is quoted in the error."""
        path = self.configure('[limits]\nmessage_size = "big"\n')
        self.assertError(path, "limits.message_size", 'must be a positive integer, not "big"')

    def test_integerNotBoolOrFloat(self) -> None:
        """A boolean is not an integer, nor is a decimal number."""
        path = self.configure("[limits]\nrecipients = true\n")
        self.assertError(path, "limits.recipients", "must be a positive integer, not true")
        path = self.configure("[limits]\nrecipients = 1.5\n")
        self.assertError(path, "limits.recipients", "must be a positive integer, not 1.5")
        path = self.configure("[limits]\nrecipients = [1]\n")
        self.assertError(path, "limits.recipients", "must be a positive integer, not an array")

    def test_integerRange(self) -> None:
        """Limits must be positive, and C{line_length} at least RFC 5321's 512."""
        for key in ("message_size", "recipients", "connections", "connections_per_client"):
            for value in ("0", "-1"):
                path = self.configure(f"[limits]\n{key} = {value}\n")
                self.assertError(path, f"limits.{key}", f"must be a positive integer, not {value}")
        path = self.configure("[limits]\nline_length = 511\n")
        self.assertError(path, "limits.line_length", "must be an integer >= 512, not 511")

    def test_sessionBounds(self) -> None:
        """
        The session's bounds: C{errors}, C{commands}, C{commands_per_turn} at least 1,
        C{reply_buffer} at least 4096 bytes, C{min_data_rate} 0 (off) or more; the command
        and session deadlines are seconds. Their defaults are Postfix's error limit (20),
        10000 commands, 256 KiB, 100 a turn, no minimum rate, 300 s and 3600 s.
        """
        config = self.load(self.configure())
        limits, timeouts = config.limits, config.timeouts
        self.assertEqual(
            (limits.errors, limits.commands, limits.replyBuffer, limits.commandsPerTurn),
            (20, 10000, 262144, 100),
        )
        self.assertEqual(limits.minDataRate, 0)
        self.assertEqual((timeouts.command, timeouts.session), (300.0, 3600.0))
        config = self.load(
            self.configure(
                "[limits]\nerrors = 5\ncommands = 50\nreply_buffer = 4096\n"
                "commands_per_turn = 1\nmin_data_rate = 100\n"
                "[timeouts]\ncommand = 1.5\nsession = 60\n"
            )
        )
        self.assertEqual(
            attrs.evolve(Limits(), errors=5, commands=50, replyBuffer=4096, commandsPerTurn=1,
                         minDataRate=100),
            config.limits,
        )  # fmt: skip
        self.assertEqual((config.timeouts.command, config.timeouts.session), (1.5, 60.0))
        for key in ("errors", "commands", "commands_per_turn"):
            path = self.configure(f"[limits]\n{key} = 0\n")
            self.assertError(path, f"limits.{key}", "must be a positive integer, not 0")
        path = self.configure("[limits]\nreply_buffer = 4095\n")
        self.assertError(path, "limits.reply_buffer", "must be an integer >= 4096, not 4095")
        path = self.configure("[limits]\nmin_data_rate = -1\n")
        self.assertError(path, "limits.min_data_rate", "must be a non-negative integer, not -1")
        path = self.configure("[timeouts]\nsession = 0\n")
        self.assertError(path, "timeouts.session", "must be a positive number of seconds, not 0")

    def test_seconds(self) -> None:
        """Timeouts must be positive, finite numbers; not booleans or strings."""
        for value, shown in [
            ("0", "0"),
            ("-1.5", "-1.5"),
            ("true", "true"),
            ('"30"', '"30"'),
            ("inf", "inf"),
            ("nan", "nan"),
            ("1979-05-27", "a date"),
        ]:
            path = self.configure(f"[timeouts]\nmta_reply = {value}\n")
            self.assertError(
                path, "timeouts.mta_reply", f"must be a positive number of seconds, not {shown}"
            )

    def test_enum(self) -> None:
        """A bad choice lists the allowed values."""
        path = self.configure(proxy='bare_line_endings = "normalize"')
        self.assertError(
            path,
            "proxy.bare_line_endings",
            'must be one of "reject", "normalise", not "normalize"',
        )

    def test_hostname(self) -> None:
        """The host name must be non-empty, without spaces or control characters."""
        path = self.configure(proxy='hostname = ""')
        self.assertError(path, "proxy.hostname", 'must be a non-empty string, not ""')
        path = self.configure(proxy='hostname = "mx\\r\\n250 ok"')
        self.assertError(
            path,
            "proxy.hostname",
            'must be a host name without spaces or control characters, not "mx\\r\\n250 ok"',
        )

    def test_filterCommonKeys(self) -> None:
        """A filter's common keys are checked, under the filter's dotted key."""
        path = self.configure("[filters.access]\ntimeout = 0\n")
        self.assertError(
            path, "filters.access.timeout", "must be a positive number of seconds, not 0"
        )
        path = self.configure('[filters.access]\non_error = "reject"\n')
        self.assertError(
            path,
            "filters.access.on_error",
            'must be one of "tempfail", "accept", not "reject"',
        )
        path = self.configure('[filters.access]\ndry_run = "yes"\n')
        self.assertError(path, "filters.access.dry_run", 'must be true or false, not "yes"')

    def test_quotedFilterName(self) -> None:
        """A filter name that is not a bare key is quoted in the dotted key, as TOML would."""
        path = self.configure('[filters."my filter"]\ntimeout = -1\n')
        self.assertError(
            path, 'filters."my filter".timeout', "must be a positive number of seconds, not -1"
        )


class MessageSyntaxTests(ConfigTestCase):
    """C{proxy.header_syntax} and C{proxy.nul_bytes} (contract 12)."""

    def test_defaults(self) -> None:
        """Both refuse by default."""
        config = self.load(self.configure())
        self.assertIs(config.headerSyntax, HeaderSyntax.REJECT)
        self.assertIs(config.nulBytes, NulBytes.REJECT)

    def test_set(self) -> None:
        """The other choices: normalise the header block, strip NULs."""
        config = self.load(self.configure(proxy='header_syntax = "normalise"\nnul_bytes = "strip"'))
        self.assertIs(config.headerSyntax, HeaderSyntax.NORMALISE)
        self.assertIs(config.nulBytes, NulBytes.STRIP)

    def test_badChoice(self) -> None:
        """A bad choice names the key and lists the allowed values."""
        path = self.configure(proxy='header_syntax = "normalize"')
        self.assertError(
            path, "proxy.header_syntax", 'must be one of "reject", "normalise", not "normalize"'
        )
        path = self.configure(proxy='nul_bytes = "remove"')
        self.assertError(path, "proxy.nul_bytes", 'must be one of "reject", "strip", not "remove"')


class EndpointTests(ConfigTestCase):
    """Endpoint strings are parsed by Twisted, and their errors named."""

    def listen(self, value: str) -> str:
        return self.write(
            f"[proxy]\nlisten = {value}\nupstream = \"{UPSTREAM}\"\nspool_dir = '{self.spool}'\n"
        )

    def test_badServerEndpoint(self) -> None:
        """A listen string Twisted cannot parse is quoted, with Twisted's reason."""
        for value, reason in [
            ("tcp:abc", "invalid literal for int() with base 10: 'abc'"),
            ("bogus:25", "Unknown endpoint type: 'bogus'"),
            ("tcp:25:colour=red", "_parseTCP() got an unexpected keyword argument 'colour'"),
        ]:
            self.assertError(
                self.listen(f'"{value}"'),
                "proxy.listen",
                f'"{value}" is not a valid server endpoint: {reason}',
            )

    def test_badEndpointInList(self) -> None:
        """A bad string inside a listen array is found and quoted."""
        self.assertError(
            self.listen('["tcp:25", "tcp:x"]'),
            "proxy.listen",
            "\"tcp:x\" is not a valid server endpoint: invalid literal for int() with base 10: 'x'",
        )

    def test_missingCertificate(self) -> None:
        """An C{ssl:} listener whose certificate cannot be read is a configuration error."""
        key = os.path.abspath(self.mktemp())
        path = self.listen(f"'ssl:465:privateKey={key}'")
        self.assertIn(
            f"is not a valid server endpoint: [Errno 2] No such file or directory: '{key}'",
            self.error(path),
        )

    def test_listenShape(self) -> None:
        """Listen is a string or a non-empty array of distinct strings."""
        self.assertError(
            self.listen("25"),
            "proxy.listen",
            "must be an endpoint string or an array of them, not 25",
        )
        self.assertError(
            self.listen("[]"),
            "proxy.listen",
            "must list at least one server endpoint, not an empty array",
        )
        self.assertError(
            self.listen('["tcp:25", "tcp:25"]'), "proxy.listen", "lists the same endpoint twice"
        )
        self.assertError(self.listen("[25]"), "proxy.listen", "must be a non-empty string, not 25")

    def test_badClientEndpoint(self) -> None:
        """An upstream string Twisted cannot parse is quoted, with Twisted's reason."""
        path = self.write(
            f'[proxy]\nlisten = "tcp:25"\nupstream = "tcp:host=mta"\nspool_dir = \'{self.spool}\'\n'
        )
        self.assertError(
            path,
            "proxy.upstream",
            '"tcp:host=mta" is not a valid client endpoint: TCP4ClientEndpoint.__init__() '
            "missing 1 required positional argument: 'port'",
        )


class SpoolTests(ConfigTestCase):
    """
    The spool and quarantine directories are checked at load time, and never created
    nor changed: the service makes them when it starts (L{mailproxy.directories}).
    """

    def spoolAt(self, spool: str, extra: str = "") -> str:
        return self.write(
            f'[proxy]\nlisten = "tcp:25"\nupstream = "{UPSTREAM}"\nspool_dir = \'{spool}\'\n'
            + extra
        )

    def test_missingIsNotCreated(self) -> None:
        """A missing spool directory in an existing directory is valid, and not created."""
        self.assertEqual(self.load(self.spoolAt(self.spool)).spoolDir, self.spool)
        self.assertFalse(os.path.lexists(self.spool))

    def test_parentMissing(self) -> None:
        """A spool directory whose parent is missing is an error naming the key."""
        spool = os.path.join(self.spool, "a", "b")
        self.assertError(
            self.spoolAt(spool),
            "proxy.spool_dir",
            f'cannot create "{spool}": no such directory "{os.path.dirname(spool)}"',
        )
        self.assertFalse(os.path.lexists(self.spool))

    def test_quarantineInMissingSpool(self) -> None:
        """A quarantine directly inside a missing spool is valid (the spool is made first);
        one deeper, or in any other missing directory, is an error naming its key."""
        inside = os.path.join(self.spool, "quarantine")
        config = self.load(self.spoolAt(self.spool, f"[quarantine]\ndir = '{inside}'\n"))
        self.assertEqual(config.quarantine.dir, inside)
        deeper = os.path.join(self.spool, "q", "quarantine")
        self.assertError(
            self.spoolAt(self.spool, f"[quarantine]\ndir = '{deeper}'\n"),
            "quarantine.dir",
            f'cannot create "{deeper}": no such directory "{os.path.dirname(deeper)}"',
        )
        self.assertFalse(os.path.lexists(self.spool))

    def test_quarantineIsAFile(self) -> None:
        """A file where the quarantine directory should be is an error naming its key."""
        os.mkdir(self.spool)
        where = os.path.join(self.spool, "quarantine")
        open(where, "w").close()
        self.assertError(
            self.spoolAt(self.spool, f"[quarantine]\ndir = '{where}'\n"),
            "quarantine.dir",
            f'"{where}" exists and is not a directory',
        )

    def test_existing(self) -> None:
        """An existing writable spool directory is used as it is."""
        os.mkdir(self.spool, 0o750)
        self.assertEqual(self.load(self.spoolAt(self.spool)).spoolDir, self.spool)
        self.assertEqual(stat.S_IMODE(os.stat(self.spool).st_mode), 0o750)

    def test_isAFile(self) -> None:
        """A regular file where the spool directory should be is an error."""
        with open(self.spool, "w"):
            pass
        self.assertError(
            self.spoolAt(self.spool),
            "proxy.spool_dir",
            f'"{self.spool}" exists and is not a directory',
        )

    def test_cannotCreate(self) -> None:
        """A spool directory that cannot be created is an error (even for root)."""
        with open(self.spool, "w"):
            pass
        spool = os.path.join(self.spool, "spool")
        self.assertError(
            self.spoolAt(spool),
            "proxy.spool_dir",
            f'cannot create "{spool}": "{self.spool}" is not a directory',
        )

    def test_parentNotWritable(self) -> None:
        """A missing spool directory we could not create is an error."""
        if os.geteuid() == 0:
            raise SkipTest("root may write anywhere")
        os.mkdir(self.spool, 0o500)
        self.addCleanup(os.chmod, self.spool, 0o700)
        spool = os.path.join(self.spool, "spool")
        self.assertError(
            self.spoolAt(spool),
            "proxy.spool_dir",
            f'cannot create "{spool}": "{self.spool}" is not writable',
        )

    def test_notWritable(self) -> None:
        """An existing spool directory we may not write to is an error."""
        if os.geteuid() == 0:
            raise SkipTest("root may write anywhere")
        os.mkdir(self.spool, 0o500)
        self.addCleanup(os.chmod, self.spool, 0o700)
        self.assertError(
            self.spoolAt(self.spool), "proxy.spool_dir", f'"{self.spool}" is not writable'
        )

    def test_notCreatedWhenInvalid(self) -> None:
        """A configuration with an error creates no spool directory either."""
        path = self.configure("[limits]\nrecipients = 0\n")
        self.error(path)
        self.assertFalse(os.path.exists(self.spool))


class TLSTests(ConfigTestCase):
    """
    C{[tls]}, C{[upstream_tls]}, C{proxy.listen_tls}, C{proxy.auth} and
    C{limits.auth_failures}: the files are read and checked, nothing else is touched.
    """

    def setUp(self) -> None:
        super().setUp()
        self.certs = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(self.certs)
        self.issued = self.ca.issue("mx.example.org")

    def tls(self, extra: str = "", proxy: str = "", **keys: str) -> str:
        """A file whose [tls] holds the issued certificate and key, then C{extra}."""
        values = {"certificate": self.issued.chain, "key": self.issued.key, **keys}
        lines = "".join(f"{k} = '{v}'\n" for k, v in values.items())
        return self.configure(f"[tls]\n{lines}{extra}", proxy=proxy)

    def test_defaults(self) -> None:
        """Without the sections: no TLS either way, no implicit-TLS listener, AUTH only
        over TLS, three failed AUTH attempts per session."""
        config = self.load(self.configure())
        self.assertEqual(config.tls, TLSSettings(None, None, "TLSv1.2", "", False))
        self.assertEqual(config.upstreamTls, UpstreamTLS(UpstreamTLSMode.NONE, None, None))
        self.assertEqual(config.listenTls, ())
        self.assertIs(config.auth, AuthPolicy.TLS)
        self.assertEqual(config.limits.authFailures, 3)

    def test_everyKey(self) -> None:
        """Every key maps to its attribute; relative paths become absolute."""
        config = self.load(
            self.tls(
                'min_version = "TLSv1.3"\nciphers = "ECDHE+AESGCM"\nrequire = true\n'
                '[upstream_tls]\nmode = "required"\nname = "mta.example.org"\n'
                f"ca_file = '{os.path.relpath(self.ca.ca)}'\n"
                "[limits]\nauth_failures = 1\n",
                proxy='listen_tls = ["tcp:465", "tcp:2465"]\nauth = "always"',
            )
        )
        self.assertEqual(
            config.tls,
            TLSSettings(self.issued.chain, self.issued.key, "TLSv1.3", "ECDHE+AESGCM", True),
        )
        self.assertEqual(
            config.upstreamTls,
            UpstreamTLS(UpstreamTLSMode.REQUIRED, "mta.example.org", self.ca.ca),
        )
        self.assertEqual(config.listenTls, ("tcp:465", "tcp:2465"))
        self.assertIs(config.auth, AuthPolicy.ALWAYS)
        self.assertEqual(config.limits.authFailures, 1)

    def test_emptyStringsAreNone(self) -> None:
        """C{""} for a file or a name is the same as leaving the key out."""
        config = self.load(
            self.configure(
                "[tls]\ncertificate = ''\nkey = ''\n"
                "[upstream_tls]\nmode = 'opportunistic'\nname = ''\nca_file = ''\n"
            )
        )
        self.assertEqual(config.tls, TLSSettings())
        self.assertEqual(config.upstreamTls, UpstreamTLS(UpstreamTLSMode.OPPORTUNISTIC))

    def test_listenTlsString(self) -> None:
        """One implicit-TLS endpoint may be given as a string, and none as C{[]}."""
        self.assertEqual(
            self.load(self.tls(proxy='listen_tls = "tcp:465"')).listenTls, ("tcp:465",)
        )
        self.assertEqual(self.load(self.configure(proxy="listen_tls = []")).listenTls, ())

    def test_combinedFile(self) -> None:
        """The certificate and the key may share one PEM file."""
        combined = os.path.join(self.certs, "combined.pem")
        with open(combined, "wb") as f:
            for name in (self.issued.chain, self.issued.key):
                with open(name, "rb") as part:
                    f.write(part.read())
        config = self.load(self.tls(certificate=combined, key=combined))
        self.assertEqual((config.tls.certificate, config.tls.key), (combined, combined))

    def test_bothOrNeither(self) -> None:
        """A certificate without its key, or a key without its certificate, is an error."""
        self.assertError(
            self.configure(f"[tls]\ncertificate = '{self.issued.chain}'\n"),
            "tls.key",
            "missing: it is needed with tls.certificate",
        )
        self.assertError(
            self.configure(f"[tls]\nkey = '{self.issued.key}'\n"),
            "tls.certificate",
            "missing: it is needed with tls.key",
        )

    def test_unreadable(self) -> None:
        """A file that cannot be read is named, with the reason."""
        missing = os.path.join(self.certs, "missing.pem")
        self.assertError(
            self.tls(certificate=missing),
            "tls.certificate",
            f'cannot read "{missing}": No such file or directory',
        )
        self.assertError(
            self.tls(key=missing), "tls.key", f'cannot read "{missing}": No such file or directory'
        )

    def test_unreadableForUser(self) -> None:
        """A key the user may not read is an error (as the user twistd runs as)."""
        if os.geteuid() == 0:
            raise SkipTest("root may read anything")
        os.chmod(self.issued.key, 0)
        self.assertError(
            self.tls(), "tls.key", f'cannot read "{self.issued.key}": Permission denied'
        )

    def test_notPem(self) -> None:
        """A certificate file without a certificate, or a key file without a key."""
        self.assertError(
            self.tls(certificate=self.issued.key),
            "tls.certificate",
            f'"{self.issued.key}" holds no PEM certificate',
        )
        self.assertError(
            self.tls(key=self.issued.chain),
            "tls.key",
            f'"{self.issued.chain}" holds no PEM private key',
        )

    def test_encryptedKey(self) -> None:
        """A key with a passphrase cannot be used: nobody types it at start-up."""
        from cryptography.hazmat.primitives import serialization

        with open(self.issued.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = os.path.join(self.certs, "encrypted.pem")
        with open(encrypted, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        self.assertError(
            self.tls(key=encrypted),
            "tls.key",
            f'the key in "{encrypted}" is encrypted: mailproxy needs it without a passphrase',
        )

    def test_keyOfAnotherCertificate(self) -> None:
        """The key must be that of the certificate, the first one of the file."""
        other = self.ca.issue("other.example.org")
        self.assertError(
            self.tls(key=other.key),
            "tls.key",
            f'"{other.key}" is not the key of the certificate in "{self.issued.chain}"'
            " (the first one of the file)",
        )

    def test_minVersion(self) -> None:
        """min_version is TLSv1.2 or TLSv1.3; the obsolete versions are refused, saying
        why."""
        for version in ("TLSv1.2", "TLSv1.3"):
            config = self.load(self.tls(min_version=version))
            self.assertEqual(config.tls.minVersion, version)
        for bad in ("TLSv1.4", "1.2", "tlsv1.2"):
            self.assertError(
                self.tls(min_version=bad),
                "tls.min_version",
                f'must be one of "TLSv1.2", "TLSv1.3", not "{bad}"',
            )
        for obsolete in ("TLSv1", "TLSv1.1", "SSLv3"):
            self.assertError(
                self.tls(min_version=obsolete),
                "tls.min_version",
                f'"{obsolete}" is obsolete (RFC 8996) and OpenSSL would not negotiate it;'
                ' use "TLSv1.2" or "TLSv1.3"',
            )

    def test_ciphers(self) -> None:
        """ciphers is tried on an OpenSSL context: a string matching no cipher is an error."""
        self.assertEqual(
            self.load(self.tls(ciphers="ECDHE+AESGCM:ECDHE+CHACHA20")).tls.ciphers,
            "ECDHE+AESGCM:ECDHE+CHACHA20",
        )
        for bad in ("BOGUS", "TLS_AES_128_GCM_SHA256"):
            self.assertError(
                self.tls(ciphers=bad),
                "tls.ciphers",
                f'"{bad}" matches no cipher of this OpenSSL for TLS 1.2 and below',
            )
        self.assertError(
            self.tls(ciphers="HIGH: !aNULL"),
            "tls.ciphers",
            'must be an OpenSSL cipher string without spaces, not "HIGH: !aNULL"',
        )

    def test_requireNeedsCertificate(self) -> None:
        """require = true without a certificate would refuse every MAIL."""
        self.assertError(
            self.configure("[tls]\nrequire = true\n"),
            "tls.require",
            "needs a certificate: set certificate and key",
        )

    def test_listenTlsNeedsCertificate(self) -> None:
        """An implicit-TLS listener needs the certificate of [tls]."""
        self.assertError(
            self.configure(proxy='listen_tls = ["tcp:465"]'),
            "proxy.listen_tls",
            "needs a certificate: set certificate and key in [tls]",
        )

    def test_listenTlsEndpoints(self) -> None:
        """listen_tls endpoints are parsed like listen's, are distinct, and none of them
        is a listen endpoint too."""
        self.assertError(
            self.tls(proxy='listen_tls = ["tcp:x"]'),
            "proxy.listen_tls",
            "\"tcp:x\" is not a valid server endpoint: invalid literal for int() with base 10: 'x'",
        )
        self.assertError(
            self.tls(proxy='listen_tls = ["tcp:465", "tcp:465"]'),
            "proxy.listen_tls",
            "lists the same endpoint twice",
        )
        self.assertError(
            self.tls(proxy='listen_tls = ["tcp:465", "tcp:2525"]'),
            "proxy.listen_tls",
            '"tcp:2525" is in proxy.listen too',
        )
        self.assertError(
            self.tls(proxy="listen_tls = 465"),
            "proxy.listen_tls",
            "must be an endpoint string or an array of them, not 465",
        )
        self.assertEqual(self.reactor.tcpServers, [])

    def test_auth(self) -> None:
        """auth is "tls", "always" or "never"; auth_failures a positive integer."""
        for policy in AuthPolicy:
            config = self.load(self.configure(proxy=f'auth = "{policy.value}"'))
            self.assertIs(config.auth, policy)
        self.assertError(
            self.configure(proxy='auth = "yes"'),
            "proxy.auth",
            'must be one of "tls", "always", "never", not "yes"',
        )
        self.assertError(
            self.configure("[limits]\nauth_failures = 0\n"),
            "limits.auth_failures",
            "must be a positive integer, not 0",
        )

    def test_upstream(self) -> None:
        """mode "required" needs the name to verify; the name is a host name; the CA
        file must hold a certificate."""
        self.assertError(
            self.configure("[upstream_tls]\nmode = 'required'\n"),
            "upstream_tls.name",
            'missing: mode = "required" verifies the MTA\'s certificate against this name',
        )
        self.assertError(
            self.configure("[upstream_tls]\nmode = 'required'\nname = 'mta example'\n"),
            "upstream_tls.name",
            'must be a host name without spaces or control characters, not "mta example"',
        )
        self.assertError(
            self.configure("[upstream_tls]\nmode = 'verify'\n"),
            "upstream_tls.mode",
            'must be one of "none", "opportunistic", "required", not "verify"',
        )
        self.assertError(
            self.configure(f"[upstream_tls]\nca_file = '{self.issued.key}'\n"),
            "upstream_tls.ca_file",
            f'"{self.issued.key}" holds no PEM certificate',
        )
        missing = os.path.join(self.certs, "missing.pem")
        self.assertError(
            self.configure(f"[upstream_tls]\nca_file = '{missing}'\n"),
            "upstream_tls.ca_file",
            f'cannot read "{missing}": No such file or directory',
        )

    def test_unknownKey(self) -> None:
        """A misspelt key in the new sections is named, with the right one."""
        self.assertError(
            self.configure("[tls]\ncertficate = 'x'\n"),
            "tls.certficate",
            'unknown key, did you mean "certificate"?',
        )
        self.assertError(
            self.configure("[upstream_tls]\ncafile = 'x'\n"),
            "upstream_tls.cafile",
            'unknown key, did you mean "ca_file"?',
        )


class ProxyHeaderAndClientNameTests(ConfigTestCase):
    """proxy.proxy_protocol_from, proxy.client_names, timeouts.proxy_header and client_name."""

    def test_defaults(self) -> None:
        """Loopback may send PROXY headers; names come from the system; 10 s each."""
        config = self.load(self.configure())
        self.assertEqual(
            config.proxyProtocolFrom,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(config.clientNames, "system")
        self.assertEqual((config.timeouts.proxyHeader, config.timeouts.clientName), (10.0, 10.0))

    def test_mapping(self) -> None:
        """
        The keys map to their attributes: networks IPv4 and IPv6, a lone address a
        network of one, host bits dropped (as in the access filter); seconds as floats.
        """
        config = self.load(
            self.configure(
                proxy='proxy_protocol_from = ["10.1.2.3/8", "2001:db8::/32", "192.0.2.7"]\n'
                'client_names = "[::1]:5353"',
                body="[timeouts]\nproxy_header = 3\nclient_name = 0.5\n",
            )
        )
        self.assertEqual(
            config.proxyProtocolFrom,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("192.0.2.7/32"),
            ),
        )
        self.assertEqual(config.clientNames, "[::1]:5353")
        self.assertEqual(config.timeouts.proxyHeader, 3.0)
        self.assertIsInstance(config.timeouts.proxyHeader, float)
        self.assertEqual(config.timeouts.clientName, 0.5)

    def test_noTrustedPeers(self) -> None:
        """An empty list is allowed: no peer may send a PROXY header."""
        config = self.load(self.configure(proxy="proxy_protocol_from = []"))
        self.assertEqual(config.proxyProtocolFrom, ())

    def test_badNetwork(self) -> None:
        """An entry that is no CIDR network is named in the error."""
        for value, shown in [
            ('"10.0.0.0/33"', '"10.0.0.0/33"'),
            ('"proxy.example"', '"proxy.example"'),
        ]:
            path = self.configure(proxy=f"proxy_protocol_from = [{value}]")
            self.assertError(
                path,
                "proxy.proxy_protocol_from",
                f'{shown} is not a CIDR network (such as "10.0.0.0/8" or "::1/128")',
            )

    def test_networksNotArray(self) -> None:
        """A single string, or an array of other things, is refused."""
        path = self.configure(proxy='proxy_protocol_from = "127.0.0.0/8"')
        self.assertError(
            path,
            "proxy.proxy_protocol_from",
            'must be an array of CIDR networks, not "127.0.0.0/8"',
        )
        path = self.configure(proxy="proxy_protocol_from = [1]")
        self.assertError(
            path, "proxy.proxy_protocol_from", "must be an array of CIDR networks, not an array"
        )

    def test_clientNames(self) -> None:
        """ "system", "off" and a server's address are taken; anything else is refused."""
        for value in ("system", "off", "127.0.0.1", "127.0.0.1:5353", "[::1]:53"):
            path = self.configure(proxy=f'client_names = "{value}"')
            self.assertEqual(self.load(path).clientNames, value)
        path = self.configure(proxy='client_names = "dns.example"')
        e = self.error(path)
        self.assertTrue(
            e.startswith(
                f'{path}: proxy.client_names: must be "system", "off" or a DNS server'
                ' ("127.0.0.1:53", "[::1]:53"): not an IP address'
            ),
            e,
        )
        path = self.configure(proxy='client_names = "127.0.0.1:0"')
        self.assertIn("not a port number", self.error(path))
        path = self.configure(proxy="client_names = false")
        self.assertError(path, "proxy.client_names", "must be a non-empty string, not false")

    def test_timeoutsPositive(self) -> None:
        """The new timeouts are seconds like the others."""
        for key in ("proxy_header", "client_name"):
            path = self.configure(f"[timeouts]\n{key} = 0\n")
            self.assertError(path, f"timeouts.{key}", "must be a positive number of seconds, not 0")


class GreetingKeyTests(ConfigTestCase):
    """proxy.greeting, timeouts.mta_banner and greeting_delay, and the connections default."""

    def test_defaults(self) -> None:
        """
        The MTA's banner, timed by mta_banner (30 s); no delay; 90 connections, below
        Postfix's default_process_limit of 100.
        """
        config = self.load(self.configure())
        self.assertIs(config.greeting, Greeting.MTA)
        self.assertEqual((config.timeouts.mtaBanner, config.timeouts.greetingDelay), (30.0, 0.0))
        self.assertEqual(config.limits.connections, 90)

    def test_mapping(self) -> None:
        """The keys map to their attributes, seconds as floats; a delay of 0 is allowed."""
        config = self.load(
            self.configure(
                proxy='greeting = "own"',
                body="[timeouts]\nmta_banner = 5\ngreeting_delay = 6\n",
            )
        )
        self.assertIs(config.greeting, Greeting.OWN)
        self.assertEqual(config.timeouts.mtaBanner, 5.0)
        self.assertIsInstance(config.timeouts.greetingDelay, float)
        self.assertEqual(config.timeouts.greetingDelay, 6.0)
        config = self.load(self.configure("[timeouts]\ngreeting_delay = 0\n"))
        self.assertEqual(config.timeouts.greetingDelay, 0.0)

    def test_invalid(self) -> None:
        """Another greeting, a banner timeout of 0, a negative or infinite delay: refused."""
        self.assertError(
            self.configure(proxy='greeting = "postscreen"'),
            "proxy.greeting",
            'must be one of "mta", "own", not "postscreen"',
        )
        self.assertError(
            self.configure("[timeouts]\nmta_banner = 0\n"),
            "timeouts.mta_banner",
            "must be a positive number of seconds, not 0",
        )
        for value in ("-1", "inf", "true"):
            self.assertError(
                self.configure(f"[timeouts]\ngreeting_delay = {value}\n"),
                "timeouts.greeting_delay",
                f"must be a number of seconds >= 0, not {value}",
            )
