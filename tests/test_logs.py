"""
The log outputs of C{[logging]}: syslog datagrams (RFC 3164 and RFC 5424, facility mail by
default) received on loopback sockets, and JSON lines read back.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    eventsFromJSONLogFile,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import Logging, SyslogFormat
from mailproxy.logs import (
    ClassicText,
    JSONLinesObserver,
    LogService,
    SyslogObserver,
    eventText,
    textFileObserver,
    twistdObserver,
)
from tests.test_relay import STUFFED, Harness, envelope

RFC3164 = re.compile(
    rb"<(?P<pri>\d+)>(?P<month>[A-Z][a-z]{2}) [ \d]\d \d\d:\d\d:\d\d "
    rb"(?:(?P<host>\S+) )?(?P<tag>[^\[ ]+)\[(?P<pid>\d+)\]: (?P<msg>.*)"
)
RFC5424 = re.compile(
    rb"<(?P<pri>\d+)>1 (?P<time>\S+) (?P<host>\S+) (?P<tag>\S+) (?P<pid>\d+) - - (?P<msg>.*)"
)


class Receiver:
    """A datagram socket on loopback (UDP) or a path (UNIX) that a test reads without waiting."""

    def __init__(self, case: SynchronousTestCase, family: socket.AddressFamily) -> None:
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        case.addCleanup(self.socket.close)
        if family == socket.AF_UNIX:
            path = os.path.abspath(case.mktemp())
            self.socket.bind(path)
            self.address = f"unix:{path}"
        else:
            self.socket.bind(("127.0.0.1", 0))
            self.address = f"udp:127.0.0.1:{self.socket.getsockname()[1]}"
        self.socket.setblocking(False)

    def datagrams(self) -> list[bytes]:
        received = []
        for _ in range(10000):
            try:
                received.append(self.socket.recv(65536))
            except BlockingIOError:
                break
        return received


class SyslogTests(SynchronousTestCase):
    def publish(self, observer: SyslogObserver) -> Logger:
        publisher = LogPublisher(observer)
        self.addCleanup(observer.close)
        return Logger(namespace="mailproxy.test", observer=publisher)

    def test_rfc3164OverUDP(self) -> None:
        """
        An event arrives over UDP as one RFC 3164 datagram: priority mail.info (22),
        the host name, the tag and our pid, and the formatted message.
        """
        receiver = Receiver(self, socket.AF_INET)
        log = self.publish(SyslogObserver(receiver.address, hostname="mx.test"))
        log.info("{session} connect from [{client}]", session="429C1EE089", client="192.0.2.1")
        [datagram] = receiver.datagrams()
        match = RFC3164.fullmatch(datagram)
        assert match is not None, datagram
        self.assertEqual(match["pri"], b"22")
        self.assertEqual(match["host"], b"mx.test")
        self.assertEqual((match["tag"], int(match["pid"])), (b"mailproxy", os.getpid()))
        self.assertEqual(match["msg"], b"429C1EE089 connect from [192.0.2.1]")

    def test_rfc5424(self) -> None:
        """RFC 5424: version 1, an ISO 8601 time with its offset; the facility as configured."""
        receiver = Receiver(self, socket.AF_INET)
        observer = SyslogObserver(
            receiver.address, SyslogFormat.RFC5424, facility="local3", tag="mp", hostname="mx"
        )
        self.publish(observer).warn("the MTA is slow")
        [datagram] = receiver.datagrams()
        match = RFC5424.fullmatch(datagram)
        assert match is not None, datagram
        self.assertEqual(match["pri"], str(19 * 8 + 4).encode())
        self.assertRegex(match["time"], rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$")
        self.assertEqual((match["host"], match["tag"]), (b"mx", b"mp"))
        self.assertEqual(match["msg"], b"the MTA is slow")

    def test_unixSocket(self) -> None:
        """
        Over a UNIX datagram socket (like /dev/log) an RFC 3164 line has no host name,
        as glibc's syslog() sends it.
        """
        receiver = Receiver(self, socket.AF_UNIX)
        self.publish(SyslogObserver(receiver.address)).error("cannot reach the MTA")
        [datagram] = receiver.datagrams()
        match = RFC3164.fullmatch(datagram)
        assert match is not None, datagram
        self.assertEqual((match["pri"], match["host"]), (b"19", None))
        self.assertEqual(match["msg"], b"cannot reach the MTA")

    def test_levelsAndTracebacks(self) -> None:
        """
        Debug events are not sent; a failure's traceback follows its message, a
        datagram per line, at the event's severity.
        """
        receiver = Receiver(self, socket.AF_INET)
        log = self.publish(SyslogObserver(receiver.address))
        log.debug("noise")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("filter raised", Failure())
        datagrams = receiver.datagrams()
        self.assertTrue(datagrams[0].endswith(b": filter raised"))
        self.assertTrue(datagrams[-1].endswith(b"ZeroDivisionError: division by zero"))
        self.assertEqual({d[:4] for d in datagrams}, {b"<18>"})  # mail.crit

    def test_nobodyListening(self) -> None:
        """With no daemon on the socket, events are dropped and counted; nothing raises."""
        path = os.path.abspath(self.mktemp())
        observer = SyslogObserver(f"unix:{path}")
        log = self.publish(observer)
        log.info("one")
        log.info("two")
        self.assertEqual(observer.dropped, 2)

    def test_smtpSession(self) -> None:
        """
        The lines of one SMTP session arrive, each with its session id: connect, EHLO,
        MAIL, RCPT, DATA, the release with the MTA's reply, disconnect.
        """
        receiver = Receiver(self, socket.AF_INET)
        observer = SyslogObserver(receiver.address)
        self.addCleanup(observer.close)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        h = Harness(self)
        client = h.greeted()
        [session] = [s.session.id for s in h.memory.factory.sessions]
        h.send(client, envelope() + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
        messages = [RFC3164.fullmatch(d) for d in receiver.datagrams()]
        lines = [m["msg"].decode() for m in messages if m is not None]
        expected = [
            "connect from [127.0.0.1]",
            "EHLO client.example: 250",
            "MAIL FROM:<a@example.org>: 250",
            "RCPT TO:<b@example.net>: 250",
            "DATA",
            "released: 250 2.0.0 Ok: queued as",
            "disconnect from [127.0.0.1]",
        ]
        for text in expected:
            self.assertTrue(any(line.startswith(f"{session} {text}") for line in lines), text)


class JSONLinesTests(SynchronousTestCase):
    def test_linesReadBack(self) -> None:
        """
        Each event is one line of JSON, with its fields, the formatted text and the
        level's name; Twisted reads the file back as events. The file is mode 0640.
        """
        path = self.mktemp()
        observer = JSONLinesObserver(path)
        self.addCleanup(observer.close)
        log = Logger(namespace="mailproxy.relay", observer=LogPublisher(observer))
        log.info("{session} connect from [{client}]", session="429C1EE089", client="192.0.2.1")
        log.warn("{session} idle timeout", session="429C1EE089")
        with open(path) as f:
            lines = f.read().splitlines()
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["session"], "429C1EE089")
        self.assertEqual(first["client"], "192.0.2.1")
        self.assertEqual(first["text"], "429C1EE089 connect from [192.0.2.1]")
        self.assertEqual((first["level"], second["level"]), ("info", "warn"))
        self.assertEqual(first["log_namespace"], "mailproxy.relay")
        with open(path) as f:
            events = list(eventsFromJSONLogFile(f))
        self.assertEqual(events[1]["log_level"], LogLevel.warn)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    def test_reopen(self) -> None:
        """After logrotate moved the file away, reopen starts a new one at the path."""
        path = self.mktemp()
        observer = JSONLinesObserver(path)
        self.addCleanup(observer.close)
        log = Logger(observer=LogPublisher(observer))
        log.info("before")
        os.rename(path, path + ".1")
        observer.reopen()
        log.info("after")
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual([json.loads(line)["text"] for line in old], ["before"])
            self.assertEqual([json.loads(line)["text"] for line in new], ["after"])


class LogServiceTests(SynchronousTestCase):
    def test_observersWhileRunning(self) -> None:
        """The configured observers receive events while the service runs, and not after."""
        receiver = Receiver(self, socket.AF_INET)
        path = self.mktemp()
        publisher = LogPublisher()
        service = LogService(Logging(syslog=receiver.address, json=path), publisher)
        log = Logger(observer=publisher)
        service.privilegedStartService()
        service.startService()
        log.info("running")
        service.stopService()
        log.info("stopped")
        self.assertEqual(len(receiver.datagrams()), 1)
        with open(path) as f:
            self.assertEqual([json.loads(line)["text"] for line in f], ["running"])


#: Field values rich in what a formatter may trip on: braces, newlines, non-ASCII, bytes.
_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["{x}", "}{", "a\nb", "\t", "é", "{{"]),
    st.integers(),
    st.binary(max_size=4),
    st.none(),
)
#: Formats as the sessions write them, and ones only Twisted's formatter can fill.
_formats = st.one_of(
    st.sampled_from(
        [
            "{session} MAIL FROM:<{sender}>: {reply}",
            "{session} connect from [{client}]:{port}",
            "{a!r} and {b:>6}",
            "{a} {missing}",
            "{call()}",
            "no fields at all",
            "{a.real}",
            "",
            "line one\nline two {a}",
            "{",
        ]
    ),
    st.text(max_size=20),
)


class ClassicTextTests(SynchronousTestCase):
    """L{ClassicText} is twistd's line format, made faster: the same text, whatever the event."""

    @settings(max_examples=300, deadline=None)
    @given(
        _formats,
        st.dictionaries(st.sampled_from(["session", "sender", "reply", "client", "port", "a", "b"]), _values),
        st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
        st.one_of(st.none(), st.sampled_from(list(LogLevel.iterconstants()))),
        st.one_of(st.none(), st.sampled_from(["mailproxy.relay.InboundProtocol", "x"])),
        st.one_of(st.none(), st.sampled_from(["-", "sys"])),
    )
    def test_sameAsTwisted(
        self,
        format: str,
        fields: dict[str, object],
        when: float | None,
        level: LogLevel | None,
        namespace: str | None,
        system: str | None,
    ) -> None:
        """Every event, plain or not, gets the line Twisted's classic formatter makes."""
        event: dict[str, object] = {"log_format": format, "call": lambda: "called", **fields}
        for key, value in (
            ("log_time", when),
            ("log_level", level),
            ("log_namespace", namespace),
            ("log_system", system),
        ):
            if value is not None:
                event[key] = value
        twisted = formatEventAsClassicLogText(
            event, formatTime=lambda t: formatTime(t, timeFormatRFC3339)
        )
        ours = ClassicText()
        self.assertEqual(ours(event), twisted)
        self.assertEqual(ours(event), twisted)  # the time stamp cached
        self.assertEqual(eventText(event), formatEvent(event))

    def test_traceback(self) -> None:
        """An event with a failure keeps its traceback, indented as twistd indents it."""
        failure = Failure(ZeroDivisionError("division by zero"))
        event = {"log_format": "{session} internal error", "session": "A1", "log_failure": failure}
        line = ClassicText()(event)
        assert line is not None
        self.assertIn("A1 internal error\n\tTraceback", line)
        self.assertIn("ZeroDivisionError", line)

    def test_observerFile(self) -> None:
        """Given a --logfile, twistd's lines go to that file, one line per event."""
        path = os.path.abspath(self.mktemp())
        observer = textFileObserver(path, True)
        observer({"log_format": "{session} DATA", "session": "A1", "log_time": 0.0})
        with open(path) as f:
            self.assertTrue(f.read().endswith(" [-#-] A1 DATA\n"))

    def test_observerStdout(self) -> None:
        """With -n and no --logfile, or --logfile=-, twistd's lines go to stdout."""
        for logfile in (None, "-"):
            observer = textFileObserver(logfile, True)
            self.assertIs(observer._outFile, sys.stdout)  # type: ignore[attr-defined]


class TwistdLoggerTests(SynchronousTestCase):
    """The twistd plugin hands twistd L{ClassicText}'s observer, unless told otherwise."""

    def options(self, **twistd: object) -> dict[str, object]:
        from mailproxy import tap

        parent: dict[str, object] = {"logger": None, "syslog": False, "logfile": None}
        parent.update(twistd)
        options = tap.Options()
        options.parent = parent  # type: ignore[assignment]
        tap._cheapLog(options)
        return parent

    def test_default(self) -> None:
        """Without --logger or --syslog, twistd is given mailproxy's observer, by name."""
        parent = self.options(logfile="/var/log/mailproxy.log", nodaemon=False)
        self.assertEqual(parent["logger"], "mailproxy.logs.twistdObserver")
        self.assertIsInstance(twistdObserver(), FileLogObserver)

    def test_toldOtherwise(self) -> None:
        """--logger, --syslog and a daemon logging to stdout are twistd's to handle."""
        self.assertEqual(self.options(logger="my.Observer")["logger"], "my.Observer")
        self.assertIsNone(self.options(syslog=True)["logger"])
        self.assertIsNone(self.options(logfile="-", nodaemon=False)["logger"])
