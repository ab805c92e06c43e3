"""
Helpers for the system tests: the environment they need, the proxy as a twistd subprocess, a
scripted SMTP client, swaks, and a Maildir to watch. Every wait is bounded; nothing blocks the
reactor except reading small local files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial import unittest

import mailproxy

SYSTEM_ENV = "MAILPROXY_SYSTEM"

# Seconds: generous for a loaded CI machine, still bounded.
PROXY_START_TIMEOUT = 20.0
PROXY_STOP_TIMEOUT = 10.0
REPLY_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 20.0
POLL_INTERVAL = 0.1

_log = Logger()

#: A TOML value; arrays hold strings or (for rules) inline tables of strings.
TomlValue = str | int | float | bool | Sequence[str] | Sequence[Mapping[str, str]]


def reactor() -> Any:
    """The global reactor, looked up late (tests run under trial's reactor)."""
    from twisted.internet import reactor as globalReactor

    return globalReactor


def systemSkipReason(*programs: str) -> str | None:
    """Why system tests must be skipped here, or C{None} when they can run."""
    if os.environ.get(SYSTEM_ENV) != "1":
        return f"system test: set {SYSTEM_ENV}=1 and start the components (see .ci/run)"
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        return f"system test: {', '.join(missing)} not installed"
    return None


def componentEnv(*names: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The C{MAILPROXY_*} variables .ci/run exports for a started component (spamd, ...).

    @raise RuntimeError: one is unset (with C{MAILPROXY_SYSTEM=1} that is an error, not a
        reason to skip): start the component with C{tests/system/components/daemons.sh}.
    """
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise RuntimeError(
            f"{SYSTEM_ENV}=1 but {', '.join(missing)} unset: start the component with "
            "tests/system/components/daemons.sh start COMPONENT BASE (see .ci/run)"
        )
    return {name: env[name] for name in names}


@attrs.frozen
class PostfixInstance:
    """Where the private Postfix instance started by C{tests/system/postfix/instance.sh} is."""

    host: str
    port: int
    domain: str
    maildir: Path
    maillog: Path

    @classmethod
    def fromEnvironment(
        cls, env: Mapping[str, str] = os.environ, prefix: str = "MAILPROXY_POSTFIX"
    ) -> PostfixInstance:
        """Read the instance from the C{MAILPROXY_POSTFIX_*} variables (C{prefix}: another
        instance's, e.g. C{MAILPROXY_EDGE} for C{tests/system/postfix/edge.sh}'s); one
        missing is an error."""
        names = ["HOST", "PORT", "DOMAIN", "MAILDIR", "MAILLOG"]
        missing = [f"{prefix}_{n}" for n in names if f"{prefix}_{n}" not in env]
        if missing:
            script = "edge.sh" if prefix == "MAILPROXY_EDGE" else "instance.sh"
            raise RuntimeError(
                f"{SYSTEM_ENV}=1 but {', '.join(missing)} unset: start Postfix with "
                f"tests/system/postfix/{script} (see .ci/run)"
            )
        return cls(
            host=env[f"{prefix}_HOST"],
            port=int(env[f"{prefix}_PORT"]),
            domain=env[f"{prefix}_DOMAIN"],
            maildir=Path(env[f"{prefix}_MAILDIR"]),
            maillog=Path(env[f"{prefix}_MAILLOG"]),
        )

    @property
    def endpoint(self) -> str:
        """The Postfix smtpd as a Twisted client endpoint string, for the proxy's upstream."""
        return f"tcp:host={self.host}:port={self.port}"

    def maillogText(self, since: int = 0) -> str:
        """The maillog so far (small: one instance per CI run), from byte C{since} on (a
        L{maillogSize} taken earlier: what was logged after that)."""
        with self.maillog.open("rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace")

    def maillogSize(self) -> int:
        """How long the maillog is now, for L{maillogText}'s C{since}."""
        return self.maillog.stat().st_size


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the proxy binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tomlValue(value: TomlValue) -> str:
    """One TOML value; JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_tomlItem(v) for v in value) + "]"


def _tomlItem(value: str | Mapping[str, str]) -> str:
    """An array item: a string, or an inline table of strings (C{{ os = "Linux" }})."""
    if isinstance(value, str):
        return json.dumps(value)
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"


def renderConfig(sections: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A TOML document from C{{"proxy": {...}, "filters.access": {...}}}."""
    out: list[str] = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_tomlValue(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


def proxyConfig(
    workdir: Path,
    port: int,
    upstream: str,
    filters: Mapping[str, Mapping[str, TomlValue]] | None = None,
    proxy: Mapping[str, TomlValue] | None = None,
) -> dict[str, dict[str, TomlValue]]:
    """The sections of a minimal working configuration, plus the given filters and overrides."""
    sections: dict[str, dict[str, TomlValue]] = {
        "proxy": {
            "listen": f"tcp:{port}:interface=127.0.0.1",
            "upstream": upstream,
            "spool_dir": str(workdir / "spool"),
            "hostname": "mailproxy.test",
            **(proxy or {}),
        }
    }
    for name, options in (filters or {}).items():
        sections[f"filters.{name}"] = dict(options)
    return sections


def twistdCommand() -> list[str]:
    """The argv that runs this Python's twistd, whether or not the venv's script is on PATH."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def subprocessEnv() -> dict[str, str]:
    """Our environment, with the directory holding the C{mailproxy} we import put first on
    PYTHONPATH so the subprocess runs the same code (checkout or installed)."""
    env = dict(os.environ)
    root = str(Path(mailproxy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _OutputToFile(ProcessProtocol):
    """Copy a child's stdout and stderr into one file; C{ended} fires with its exit status."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("ab")
        self.ended: Deferred[int | None] = Deferred()
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self._file.close()
        status = getattr(reason.value, "exitCode", None)
        self.ended.callback(status)


@attrs.define
class _Child:
    """A process we started whose stdout and stderr go to C{logPath}."""

    logPath: Path
    configPath: Path
    _protocol: _OutputToFile
    _reactor: Any

    def log(self) -> str:
        """Everything it printed so far."""
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return not self._protocol.exited


@attrs.define
class ProxyProcess(_Child):
    """A running C{twistd -n mailproxy}: its port, its log, and how to stop it."""

    port: int = 0

    async def waitUntilReady(
        self,
        timeout: float = PROXY_START_TIMEOUT,
        greeting: int = 220,
        preamble: bytes = b"",
        bindAddress: str | None = None,
    ) -> None:
        """Poll (bounded) until the proxy greets with C{greeting} (a connect filter may
        refuse this client: 554) on its port.

        @param preamble: sent first (a PROXY header, for a C{haproxy:} listener).
        @param bindAddress: the address to connect from (default: the system's choice).
        @raise RuntimeError: it exited or did not greet in time; the message holds its log.
        """
        deadline = self._reactor.seconds() + timeout
        banner: Reply | None = None
        while self.running and self._reactor.seconds() < deadline:
            try:
                banner = await readBanner(
                    self._reactor, self.port, preamble=preamble, bindAddress=bindAddress
                )
                break
            except (error.ConnectError, error.ConnectionLost, error.TimeoutError):
                await deferLater(self._reactor, POLL_INTERVAL, lambda: None)
        if banner is not None and banner.code == greeting:
            return
        if not self.running:
            why = "exited"
        elif banner is None:
            why = f"did not listen within {timeout} s"
        else:
            why = f"greeted with {banner.text!r}"
        raise RuntimeError(f"mailproxy {why} (port {self.port}); its log:\n{self.log()}")

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after L{PROXY_STOP_TIMEOUT}; returns the exit status."""
        return await _terminate(self._protocol, self._reactor, "proxy")

    @property
    def pid(self) -> int | None:
        """The process id, or C{None} once it has exited."""
        return getattr(self._protocol.transport, "pid", None)


async def _terminate(
    protocol: _OutputToFile,
    reactor: Any,
    what: str,
    signals: Sequence[tuple[str | int, float]] = (
        ("TERM", PROXY_STOP_TIMEOUT),
        ("KILL", PROXY_STOP_TIMEOUT),
    ),
) -> int | None:
    """Signal a child (by default SIGTERM, then SIGKILL after L{PROXY_STOP_TIMEOUT}), each
    signal of C{signals} in turn until it has exited within that signal's timeout; its
    exit status."""
    ended = protocol.ended
    if protocol.exited:
        return await ended
    for signum, timeout in signals:
        try:
            protocol.transport.signalProcess(signum)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            break
        waiter: Deferred[int | None] = Deferred()
        ended.addBoth(_chain, waiter)
        waiter.addTimeout(timeout, reactor)
        try:
            return await waiter
        except error.TimeoutError:
            pid = getattr(protocol.transport, "pid", None)
            _log.warn("{what} {pid} ignored signal {signum}", what=what, pid=pid, signum=signum)
    return await ended


def _chain(result: object, waiter: Deferred[Any]) -> object:
    """Pass a result on to a second Deferred unless it gave up already (timed out)."""
    if not waiter.called:
        waiter.callback(result)
    return result


def spawnProxy(
    reactor: Any,
    workdir: Path,
    sections: Mapping[str, Mapping[str, TomlValue]],
    port: int,
    twistdOptions: Sequence[str] = (),
) -> ProxyProcess:
    """Write the configuration into C{workdir} and spawn the proxy (not waiting for it).

    @param twistdOptions: more of twistd's own options (C{--syslog}, C{-u}, ...).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spool").mkdir(exist_ok=True)
    configPath = workdir / "mailproxy.toml"
    configPath.write_text(renderConfig(sections))
    logPath = workdir / "proxy.log"
    protocol = _OutputToFile(logPath)
    argv = [*twistdCommand(), "-n", "--pidfile=", *twistdOptions]
    argv += ["mailproxy", "--config", str(configPath)]
    reactor.spawnProcess(protocol, argv[0], argv, env=subprocessEnv(), path=str(workdir))
    return ProxyProcess(logPath, configPath, protocol, reactor, port=port)


async def runProxy(
    case: unittest.TestCase,
    reactor: Any,
    workdir: Path,
    sections: Mapping[str, Mapping[str, TomlValue]],
    port: int,
    twistdOptions: Sequence[str] = (),
    greeting: int = 220,
    preamble: bytes = b"",
    bindAddress: str | None = None,
) -> ProxyProcess:
    """Spawn the proxy (L{spawnProxy}) and wait until it greets with C{greeting}; it is
    stopped when C{case} ends, its output copied into the test log.

    @param preamble: what the readiness check sends first (a PROXY header for C{haproxy:}).
    @param bindAddress: the address the readiness check connects from.
    """
    process = spawnProxy(reactor, workdir, sections, port, twistdOptions)
    case.addCleanup(stopAndLog, process)
    await process.waitUntilReady(greeting=greeting, preamble=preamble, bindAddress=bindAddress)
    return process


async def stopAndLog(process: ProxyProcess) -> int | None:
    """Stop the proxy, copy its output into the test log; its exit status."""
    try:
        return await process.stop()
    finally:
        log.msg(f"mailproxy output ({process.logPath}):\n{process.log()}")


@attrs.frozen
class Reply:
    """One SMTP reply: the code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """All lines joined, for messages and searches."""
        return "\n".join(self.lines)


class ReplyReader(LineOnlyReceiver):
    """Collect multi-line SMTP replies and hand them out in order, one per L{nextReply}."""

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._waiting: deque[Deferred[Reply]] = deque()
        self._lost: Failure | None = None
        #: Every byte received so far, whole lines or not.
        self.bytesReceived = 0

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self._lines.append(text)
        if len(text) >= 4 and text[3] == "-":
            return
        reply = Reply(int(text[:3]) if text[:3].isdigit() else 0, tuple(self._lines))
        self._lines = []
        if self._waiting:
            self._waiting.popleft().callback(reply)
        else:
            self._replies.append(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        while self._waiting:
            self._waiting.popleft().errback(reason)

    def nextReply(self, reactor: Any, timeout: float = REPLY_TIMEOUT) -> Deferred[Reply]:
        """The next complete reply, failing after C{timeout} seconds or on disconnection."""
        if self._replies:
            d: Deferred[Reply] = Deferred()
            d.callback(self._replies.popleft())
            return d
        if self._lost is not None:
            d = Deferred()
            d.errback(self._lost)
            return d
        d = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        d.addTimeout(timeout, reactor)
        return d


async def _connect(reactor: Any, port: int, bindAddress: str | None = None) -> ReplyReader:
    """A L{ReplyReader} connected to 127.0.0.1:C{port}, from C{bindAddress} if given (any
    127.x.y.z is a local address: a client "from 127.0.0.5")."""
    bind = (bindAddress, 0) if bindAddress is not None else None
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5, bindAddress=bind)
    reader = ReplyReader()
    await connectProtocol(endpoint, reader).addTimeout(10, reactor)
    return reader


async def readBanner(
    reactor: Any,
    port: int,
    timeout: float = 5.0,
    preamble: bytes = b"",
    bindAddress: str | None = None,
) -> Reply:
    """Connect (from C{bindAddress}), send C{preamble} if any (a PROXY header), read the
    greeting, say QUIT and hang up."""
    reader = await _connect(reactor, port, bindAddress)
    try:
        if preamble:
            reader.transport.write(preamble)  # type: ignore[union-attr]
        return await reader.nextReply(reactor, timeout)
    finally:
        reader.sendLine(b"QUIT")
        reader.transport.loseConnection()  # type: ignore[union-attr]


async def converse(reactor: Any, port: int, script: Sequence[bytes]) -> list[Reply]:
    """Send each item of C{script} and read one reply after each; the banner comes first.

    An item is a command without its CRLF, or, after a 354, a whole message body that ends
    with C{b"\\r\\n.\\r\\n"} (sent as is). Returns the banner and one reply per item.
    """
    reader = await _connect(reactor, port)
    try:
        replies = [await reader.nextReply(reactor)]
        for item in script:
            if item.endswith(b"\r\n.\r\n"):
                reader.transport.write(item)  # type: ignore[union-attr]
            else:
                reader.sendLine(item)
            replies.append(await reader.nextReply(reactor))
        return replies
    finally:
        reader.transport.loseConnection()  # type: ignore[union-attr]


def message(
    token: str, sender: str, recipient: str, body: str = "Hello.", subject: str | None = None
) -> bytes:
    """A small RFC 5322 message tagged with C{token}, dot-terminated for DATA."""
    lines = [
        f"From: <{sender}>",
        f"To: <{recipient}>",
        f"Subject: {subject if subject is not None else 'mailproxy system test ' + token}",
        f"Message-ID: <{token}@client.example>",
        f"X-Mailproxy-Test: {token}",
        "",
        body,
    ]
    return ("\r\n".join(lines) + "\r\n.\r\n").encode()


@attrs.frozen
class SwaksResult:
    """What swaks printed (the whole transcript) and its exit status."""

    output: str
    status: int

    def replies(self) -> list[str]:
        """The server's lines, in order (C{<-} ok, C{<**} error), without swaks' markers."""
        return [
            line.split(" ", 1)[1].strip() if " " in line else ""
            for line in self.output.splitlines()
            if line.startswith(("<-", "<**"))
        ]

    def queueId(self) -> str | None:
        """The queue id from a C{250 ... queued as ID} reply, if any."""
        # swaks prints "<-" for what came in cleartext, "<~" over TLS.
        m = re.search(r"^<[-~]\s+250 .*queued as ([0-9A-Za-z]+)", self.output, re.MULTILINE)
        return m.group(1) if m else None


async def swaks(reactor: Any, port: int, *args: str, timeout: int = 30) -> SwaksResult:
    """Run swaks against 127.0.0.1:C{port} with C{args}; never raises on SMTP errors."""
    executable = shutil.which("swaks")
    if executable is None:
        raise RuntimeError("swaks is not installed")
    argv = ["--server", f"127.0.0.1:{port}", "--timeout", str(timeout), *args]
    out, err, status = await getProcessOutputAndValue(
        executable, argv, env=dict(os.environ), reactor=reactor
    )
    return SwaksResult((out + err).decode("utf-8", "replace"), status)


@attrs.frozen
class Maildir:
    """A Maildir the MTA delivers into; messages are found by a token they contain."""

    path: Path

    def files(self) -> list[Path]:
        """Every delivered message file (new/ and cur/)."""
        return [f for sub in ("new", "cur") for f in sorted((self.path / sub).glob("*"))]

    def find(self, token: str) -> list[bytes]:
        """The contents of every message containing C{token}."""
        needle = token.encode()
        found = []
        for f in self.files():
            try:
                data = f.read_bytes()
            except FileNotFoundError:  # moved from new/ to cur/ meanwhile
                continue
            if needle in data:
                found.append(data)
        return found

    async def waitFor(self, reactor: Any, token: str, timeout: float = DELIVERY_TIMEOUT) -> bytes:
        """The first message containing C{token}, polling until C{timeout} seconds.

        @raise LookupError: it did not arrive in time.
        """
        for _ in range(int(timeout / POLL_INTERVAL)):
            found = self.find(token)
            if found:
                return found[0]
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
        raise LookupError(f"no message with {token!r} in {self.path} after {timeout} s")


def headerBlock(data: bytes) -> str:
    """The header section of a message, unfolded lines kept, as text."""
    head = data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    return head.decode("utf-8", "replace")


class PostfixCase(unittest.TestCase):
    """The proxy as a twistd process in front of the private Postfix that C{.ci/run}
    starts, with swaks as the client and Postfix's Maildir to watch."""

    skip = systemSkipReason("swaks", "postfix")

    def setUp(self) -> None:
        self.reactor = reactor()
        self.postfix = PostfixInstance.fromEnvironment()
        self.maildir = Maildir(self.postfix.maildir)

    async def startProxy(
        self, filters: Mapping[str, Mapping[str, TomlValue]], greeting: int = 220
    ) -> ProxyProcess:
        """Start a proxy in front of Postfix with these filters; stop it at test end.

        @param greeting: the reply that shows it is ready (554 if it refuses us at connect).
        """
        workdir = Path(self.mktemp()).resolve()
        port = freePort()
        sections = proxyConfig(workdir, port, self.postfix.endpoint, filters=filters)
        return await runProxy(self, self.reactor, workdir, sections, port, greeting=greeting)

    def token(self) -> str:
        """A marker unique to this test run, put into the message to find it again."""
        return f"{self.id().rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"

    def rcpt(self, local: str = "alice") -> str:
        """An address in the domain Postfix delivers to its Maildir."""
        return f"{local}@{self.postfix.domain}"

    async def sendDirect(self, token: str, local: str = "sentinel") -> None:
        """Send a message tagged C{token} straight to Postfix (bypassing the proxy) and wait
        until it lands."""
        result = await swaks(
            self.reactor,
            self.postfix.port,
            "--from", "sentinel@client.example",
            "--to", self.rcpt(local),
            "--add-header", f"X-Mailproxy-Test: {token}",
        )  # fmt: skip
        self.assertEqual(result.status, 0, result.output)
        await self.maildir.waitFor(self.reactor, token)


async def waitUntil(
    reactor: Any, check: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT
) -> bool:
    """Poll C{check} every L{POLL_INTERVAL} until it is true or C{timeout} seconds pass;
    whether it came true."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() >= deadline:
            return False
        await deferLater(reactor, POLL_INTERVAL, lambda: None)
    return True


@attrs.frozen
class MtaInstance:
    """
    An MTA that C{tests/system/components/mtas.sh start COMPONENT BASE} started (Exim or
    OpenSMTPD, unpacked): where it listens, the domain it delivers into its Maildir, its log.
    """

    name: str
    port: int
    domain: str
    maildir: Path
    log: Path

    @classmethod
    def fromEnvironment(cls, component: str, env: Mapping[str, str] = os.environ) -> MtaInstance:
        """The instance whose variables start with C{MAILPROXY_<COMPONENT>_}.

        @raise RuntimeError: they are unset (start it with mtas.sh, as .ci/run does).
        """
        prefix = "MAILPROXY_" + component.upper().replace("-", "_") + "_"
        names = [prefix + key for key in ("PORT", "DOMAIN", "MAILDIR", "LOG")]
        missing = [name for name in names if not env.get(name)]
        if missing:
            raise RuntimeError(
                f"{SYSTEM_ENV}=1 but {', '.join(missing)} unset: start {component} with "
                f"tests/system/components/mtas.sh start {component} BASE (see .ci/run)"
            )
        port, domain, maildir, logPath = (env[name] for name in names)
        return cls(component, int(port), domain, Path(maildir), Path(logPath))

    @property
    def endpoint(self) -> str:
        """The MTA as a Twisted client endpoint string, for the proxy's upstream."""
        return f"tcp:host=127.0.0.1:port={self.port}"

    def logText(self) -> str:
        """Its whole log so far (Exim's mainlog, OpenSMTPD's stderr)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logTail(self, lines: int = 60) -> str:
        """The end of its log, to put in a failure message."""
        tail = "\n".join(self.logText().splitlines()[-lines:])
        return f"--- {self.name} log ({self.log}), last {lines} lines:\n{tail}"


class SmtpSession:
    """
    A client connection that writes exactly the bytes it is given (several commands in one
    write, odd separators, bare LF) and reads replies one by one, each within a deadline.
    Everything sent and received is kept in L{transcript}, for failure messages.
    """

    def __init__(self, reactor: Any, reader: ReplyReader) -> None:
        self._reactor = reactor
        self._reader = reader
        self._transcript: list[str] = []

    @classmethod
    async def open(cls, reactor: Any, port: int, bindAddress: str | None = None) -> SmtpSession:
        """Connect to 127.0.0.1:C{port}, from C{bindAddress} if given (the banner is the
        first L{reply})."""
        return cls(reactor, await _connect(reactor, port, bindAddress))

    def write(self, data: bytes) -> None:
        """Send C{data} as it is, in one write."""
        self._transcript.append(f"C: {data!r}")
        self._reader.transport.write(data)  # type: ignore[union-attr]

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The next reply.

        @raise error.TimeoutError: none came within C{timeout} seconds.
        @raise error.ConnectionDone: the server closed the connection first.
        """
        try:
            r = await self._reader.nextReply(self._reactor, timeout)
        except Exception as e:
            self._transcript.append(f"S: ({type(e).__name__})")
            raise
        self._transcript.append("S: " + "\nS: ".join(r.lines))
        return r

    async def command(self, line: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send C{line} and CRLF, and read one reply."""
        self.write(line + b"\r\n")
        return await self.reply(timeout)

    @property
    def connected(self) -> bool:
        """Whether the server has not closed the connection."""
        return self._reader._lost is None

    @property
    def bytesReceived(self) -> int:
        """How many bytes the server sent, complete replies or not."""
        return self._reader.bytesReceived

    def close(self) -> None:
        """Hang up (idempotent)."""
        if self._reader.transport is not None:
            self._reader.transport.loseConnection()

    def transcript(self) -> str:
        """What was sent (C:) and received (S:), in order."""
        return "\n".join(self._transcript)


@attrs.frozen
class ProcessResult:
    """What a child process wrote on stdout and stderr, and how it ended."""

    out: str
    err: str
    status: int | None


class _Collect(ProcessProtocol):
    """Feed a child its stdin, collect its output; C{ended} fires with a L{ProcessResult}."""

    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self.ended: Deferred[ProcessResult] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(
            ProcessResult(
                b"".join(self._out).decode("utf-8", "replace"),
                b"".join(self._err).decode("utf-8", "replace"),
                getattr(reason.value, "exitCode", None),
            )
        )


async def runProcess(
    reactor: Any, argv: Sequence[str], stdin: bytes = b"", timeout: float = 90.0
) -> ProcessResult:
    """Run C{argv} with C{stdin}; killed (SIGKILL) if it takes more than C{timeout} seconds."""
    protocol = _Collect(stdin)
    process = reactor.spawnProcess(protocol, argv[0], list(argv), env=dict(os.environ))
    timer = reactor.callLater(timeout, process.signalProcess, "KILL")
    try:
        return await protocol.ended
    finally:
        if timer.active():
            timer.cancel()


HAPROXY_START_TIMEOUT = 10.0


@attrs.define
class HaproxyProcess(_Child):
    """
    A running C{haproxy -db -f CONFIG}: its log (stderr and, with C{log stderr}, one line
    a connection), how to stop it.
    """

    async def stop(self) -> int | None:
        """SIGUSR1 (a soft stop: connections still open end first, and get logged), after
        2 s SIGTERM (at once), then SIGKILL; returns the exit status."""
        signals: list[tuple[str | int, float]] = [
            (signal.SIGUSR1, 2.0),  # Twisted knows this one by number only
            ("TERM", PROXY_STOP_TIMEOUT),
            ("KILL", PROXY_STOP_TIMEOUT),
        ]
        return await _terminate(self._protocol, self._reactor, "haproxy", signals)


async def runHaproxy(
    case: unittest.TestCase, reactor: Any, workdir: Path, config: str
) -> HaproxyProcess:
    """
    Run HAProxy in the foreground with C{config} (its C{frontend}s bound on 127.0.0.1) and
    wait (bounded) until it listens; it is stopped when C{case} ends, its log copied into the
    test log.

    Readiness is a frontend of its own appended to C{config}, which accepts and closes at
    once: probing a frontend of the test's would take a turn of its round robin.

    @raise RuntimeError: it exited (a bad configuration) or did not listen in time.
    """
    executable = shutil.which("haproxy")
    if executable is None:
        raise RuntimeError("haproxy is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    readyPort = freePort()
    configPath = workdir / "haproxy.cfg"
    configPath.write_text(
        config.rstrip("\n")
        + "\n\n# mailproxy's tests: readiness probe\n"
        + "frontend mailproxy_test_ready\n"
        + "    mode tcp\n"
        + f"    bind 127.0.0.1:{readyPort}\n"
        + "    tcp-request connection reject\n"
    )
    logPath = workdir / "haproxy.log"
    protocol = _OutputToFile(logPath)
    argv = [executable, "-db", "-f", str(configPath)]
    reactor.spawnProcess(protocol, argv[0], argv, env=dict(os.environ), path=str(workdir))
    process = HaproxyProcess(logPath, configPath, protocol, reactor)

    async def stop() -> None:
        try:
            await process.stop()
        finally:
            log.msg(f"haproxy output ({logPath}):\n{process.log()}")

    case.addCleanup(stop)
    deadline = reactor.seconds() + HAPROXY_START_TIMEOUT
    while process.running and reactor.seconds() < deadline:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", readyPort, timeout=2)
        try:
            probe = await connectProtocol(endpoint, ReplyReader()).addTimeout(5, reactor)
        except (error.ConnectError, error.TimeoutError):
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
            continue
        probe.transport.loseConnection()  # type: ignore[union-attr]
        return process
    why = "exited" if not process.running else f"did not listen within {HAPROXY_START_TIMEOUT} s"
    raise RuntimeError(f"haproxy {why}; config {configPath}; its log:\n{process.log()}")
