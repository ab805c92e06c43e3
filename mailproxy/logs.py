"""
Where the log goes besides twistd's own log: syslog (facility mail, over UDP or a UNIX
datagram socket, RFC 3164 or RFC 5424) and JSON lines for log shippers.

Both are observers of the global log publisher, added by L{LogService} (a child of the
proxy's service) before anything else starts, and removed when it stops. They never
block and never raise: a datagram the syslog daemon cannot take is dropped and counted.

Every session logs each step of its SMTP dialogue, so the text of an event is made
cheaply: L{eventText} fills a plain format with C{str.format_map} (Twisted's formatter
is Python code, field by field), and L{ClassicText}, the formatter of twistd's own log
(L{textFileObserver}), makes its time stamp once per second.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
from types import FrameType
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from mailproxy.config import SYSLOG_FACILITIES, Logging, SyslogFormat, syslogAddress

#: Syslog severities (RFC 5424) of Twisted's log levels; debug events are not sent.
SEVERITIES = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}
#: Longest message part of one datagram, in bytes (rsyslog's default maximum is 8 KiB).
MAX_MESSAGE = 4096
#: Most datagrams per event: a traceback longer than this is cut.
MAX_LINES = 100
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def eventText(event: LogEvent) -> str:
    """
    What L{formatEvent} makes of C{event}, faster for a plain format (named fields, with
    attributes, indexes, conversions and specs): C{str.format_map} fills it. Anything else
    (a C{{callable()}} field, a missing one, a flattened event read back from JSON) is
    Twisted's to format, with its own fallbacks.
    """
    format = event.get("log_format")
    if type(format) is not str or "log_flattened" in event:
        return formatEvent(event)
    try:
        return format.format_map(event)
    except Exception:
        return formatEvent(event)  # which says what went wrong, in its text


class ClassicText:
    """
    Twisted's L{formatEventAsClassicLogText} with RFC 3339 time stamps (twistd's log
    lines), the same text for less: the time stamp is made once per second and the
    event's text by L{eventText}; an event with a traceback is left to Twisted.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if not 0 <= when - second < 0.999999:
            # Rounded to the microsecond, as datetime does, it may be the next second.
            return formatTime(when, timeFormatRFC3339)
        if second != self._second:
            self._stamp, self._second = formatTime(second, timeFormatRFC3339), second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        if "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        text = eventText(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def textFileObserver(logfile: str | None, nodaemon: bool) -> ILogObserver:
    """
    twistd's log observer (a file, rotated at 1 MB and on SIGUSR1; stdout with C{-n}
    and no C{--logfile}, or C{--logfile=-}), formatting with L{ClassicText}.
    """
    out: IO[Any]
    if logfile == "-" or (nodaemon and not logfile):
        out = sys.stdout
    else:
        logFile = LogFile.fromFullPath(logfile or "twistd.log")
        out = logFile
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(signum: int, frame: FrameType | None) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

            signal.signal(signal.SIGUSR1, rotate)
    return FileLogObserver(out, ClassicText())


#: twistd's C{--logger} takes the name of a factory of no arguments: the plugin names
#: L{twistdObserver} and leaves it twistd's C{--logfile} and C{--nodaemon} here.
TWISTD_OBSERVER = "mailproxy.logs.twistdObserver"
_twistdLog: tuple[str | None, bool] = (None, False)


def forTwistd(logfile: str | None, nodaemon: bool) -> str:
    """Keep twistd's log options for L{twistdObserver}; @return: its name, for C{--logger}."""
    global _twistdLog
    _twistdLog = (logfile, nodaemon)
    return TWISTD_OBSERVER


def twistdObserver() -> ILogObserver:
    """The observer twistd would make from its options, as L{textFileObserver}."""
    return textFileObserver(*_twistdLog)


def _lines(event: LogEvent) -> list[str]:
    """An event's text, a line each, with the traceback of its failure if it has one."""
    text = eventText(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    return [line for line in text.splitlines() if line.strip()][:MAX_LINES] or [""]


@implementer(ILogObserver)
class SyslogObserver:
    """
    Sends each event (info and above) to a syslog daemon, one datagram per line.

    @param address: C{"udp:127.0.0.1:514"} or C{"unix:/dev/log"}.
    """

    def __init__(
        self,
        address: str,
        syslogFormat: SyslogFormat = SyslogFormat.RFC3164,
        facility: str = "mail",
        tag: str = "mailproxy",
        hostname: str | None = None,
    ) -> None:
        family, self._address = syslogAddress(address)
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._format = syslogFormat
        self._facility = SYSLOG_FACILITIES[facility]
        self._tag = tag
        # A local socket takes no host name in RFC 3164 (as glibc's syslog() sends it).
        self._local = family == socket.AF_UNIX
        self._hostname = hostname or socket.gethostname()
        self._pid = os.getpid()
        #: Datagrams the daemon could not take (not listening, queue full).
        self.dropped = 0

    def __call__(self, event: LogEvent) -> None:
        severity = SEVERITIES.get(event.get("log_level", LogLevel.info), 6)
        if severity > 6:
            return
        when = datetime.datetime.fromtimestamp(
            event.get("log_time") or 0.0, datetime.UTC
        ).astimezone()
        for line in _lines(event):
            self._send(self._datagram(self._facility * 8 + severity, when, line))

    def _datagram(self, priority: int, when: datetime.datetime, line: str) -> bytes:
        message = line.encode("utf-8", "replace")[:MAX_MESSAGE]
        if self._format is SyslogFormat.RFC5424:
            stamp = when.isoformat(timespec="microseconds")
            header = f"<{priority}>1 {stamp} {self._hostname} {self._tag} {self._pid} - - "
        else:
            stamp = f"{_MONTHS[when.month - 1]} {when.day:2d} {when:%H:%M:%S}"
            host = "" if self._local else f"{self._hostname} "
            header = f"<{priority}>{stamp} {host}{self._tag}[{self._pid}]: "
        return header.encode("ascii", "replace") + message

    def _send(self, datagram: bytes) -> None:
        try:
            self._socket.sendto(datagram, self._address)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        self._socket.close()


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Appends each event to a file as one line of JSON (Twisted's L{eventAsJSON}, which
    L{twisted.logger.eventsFromJSONLogFile} reads back), with two fields added for
    log shippers: C{text}, the formatted message, and C{level}, its level's name.

    The file is created with mode 0640; L{reopen} (on SIGHUP) starts a new one after
    logrotate has moved it away.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file, self._observer = self._open()

    def _open(self) -> tuple[IO[str], ILogObserver]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        f = open(fd, "a", encoding="utf-8")
        return f, jsonFileLogObserver(f, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        extra: dict[str, Any] = {
            "text": "\n".join(_lines(event)),
            "level": level.name if level is not None else "info",
        }
        self._observer({**event, **extra})

    def reopen(self) -> None:
        """
        Open the file again by its path (after rotation).

        @raise OSError: it cannot be opened; the old file stays in use.
        """
        old = self._file
        self._file, self._observer = self._open()
        old.close()

    def close(self) -> None:
        self._file.close()


class LogService(Service):
    """Adds the configured observers to the log publisher while it runs."""

    def __init__(self, settings: Logging, publisher: LogPublisher = globalLogPublisher) -> None:
        self.settings = settings
        self._publisher = publisher
        self.syslog: SyslogObserver | None = None
        self.json: JSONLinesObserver | None = None

    def privilegedStartService(self) -> None:
        """Open the files and sockets first: with twistd's -u, before privileges go."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        if self.syslog is None and self.settings.syslog is not None:
            self.syslog = SyslogObserver(
                self.settings.syslog,
                self.settings.syslogFormat,
                self.settings.syslogFacility,
                self.settings.syslogTag,
            )
            self._publisher.addObserver(self.syslog)
        if self.json is None and self.settings.json is not None:
            self.json = JSONLinesObserver(self.settings.json)
            self._publisher.addObserver(self.json)

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        for observer in (self.syslog, self.json):
            if observer is not None:
                self._publisher.removeObserver(observer)
                observer.close()
        self.syslog = self.json = None

    def reopen(self) -> None:
        """Reopen the JSON file (after logrotate moved it)."""
        if self.json is not None:
            self.json.reopen()
