"""
Debian's opendkim signs a message (its own opendkim-genkey key, served by the tests' DNS
server in this process); mailproxy verifies it on the way to the real Postfix.

opendkim runs as the milter it is (C{opendkim -f -x CONF}, on a loopback port, started
and stopped by the test, every wait bounded); the test speaks the MTA's side of the milter
protocol to it (L{tests.system.milter}), as Postfix's smtpd would.
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

import dkim  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from tests.dnsserver import DNSServer, txt
from tests.system import harness
from tests.system.milter import MilterClient

OPENDKIM = "/usr/sbin/opendkim"
GENKEY = "/usr/sbin/opendkim-genkey"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
DOMAIN = "example.org"
SELECTOR = "sel1"


class _Daemon(ProcessProtocol):
    """opendkim's output, kept for the failure message; C{ended} fires when it exits."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class OpenDKIMTests(harness.PostfixCase):
    """A message opendkim signed is verified as dkim=pass, and delivered with one AR."""

    skip = harness.systemSkipReason("swaks", "postfix", "opendkim", "opendkim-genkey")

    async def startOpenDKIM(self) -> tuple[int, str]:
        """
        Make a key with opendkim-genkey and start opendkim signing with it; stopped at the
        test's end. Returns its port and the key's DNS record.
        """
        directory = tempfile.mkdtemp(prefix="mailproxy-opendkim-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.chmod(directory, 0o755)  # opendkim reads the key as its own user
        out, err, status = await getProcessOutputAndValue(
            GENKEY,
            ["-D", directory, "-d", DOMAIN, "-s", SELECTOR, "-b", "2048"],
            reactor=self.reactor,
        ).addTimeout(30, self.reactor)
        self.assertEqual(status, 0, (out + err).decode("utf-8", "replace"))
        key = Path(directory, f"{SELECTOR}.private")
        os.chown(key, pwd.getpwnam("opendkim").pw_uid, -1)
        record = "".join(re.findall(r'"([^"]*)"', Path(directory, f"{SELECTOR}.txt").read_text()))
        port = harness.freePort()
        conf = Path(directory, "opendkim.conf")
        conf.write_text(
            "Mode s\n"
            f"Domain {DOMAIN}\nSelector {SELECTOR}\nKeyFile {key}\n"
            f"Socket inet:{port}@127.0.0.1\n"
            "UserID opendkim\n"
            f"PidFile {directory}/opendkim.pid\n"
            "Syslog no\n"
            "SignatureAlgorithm rsa-sha256\n"
            # Every client may have its mail signed (the default is 127.0.0.1 only).
            "InternalHosts 0.0.0.0/0\n"
            # The key is under /tmp, whose other users could read it: allowed here.
            "RequireSafeKeys no\n"
        )
        daemon = _Daemon()
        process = self.reactor.spawnProcess(
            daemon, OPENDKIM, [OPENDKIM, "-f", "-x", str(conf)], env={}
        )

        async def stop() -> None:
            if daemon.ended.called:
                return
            process.signalProcess(signal.SIGTERM)
            try:
                await daemon.ended.addTimeout(STOP_TIMEOUT, self.reactor)
            except Exception:
                process.signalProcess(signal.SIGKILL)

        self.addCleanup(stop)
        for _ in range(int(START_TIMEOUT / 0.1)):
            if _listening(port):
                return port, record
            if daemon.ended.called:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        self.fail(f"opendkim did not listen on {port}: {daemon.output.decode('utf-8', 'replace')}")

    async def signedMessage(
        self, port: int, token: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        """A message from alice@example.org signed by opendkim, CRLF lines, for DATA."""
        headers = [
            *extra,
            ("From", " Alice <alice@example.org>"),
            ("To", f" <{self.rcpt()}>"),
            ("Subject", f" signed by opendkim {token}"),
            ("Date", " Tue, 1 Dec 2026 12:00:00 +0000"),
            ("Message-ID", f" <{token}@example.org>"),
            ("X-Mailproxy-Test", f" {token}"),
        ]
        body = b"Hello Alice,\r\n\r\n  this was signed   by opendkim.\r\n"

        def sign() -> list[tuple[str, str]]:
            client = MilterClient("127.0.0.1", port)
            try:
                return client.sign("alice@example.org", self.rcpt(), headers, body)
            finally:
                client.close()

        added = await deferToThread(sign).addTimeout(30, self.reactor)
        [(name, value)] = added
        self.assertEqual(name, "DKIM-Signature")
        head = f"{name}: {value}".replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"
        head += "".join(f"{n}:{v}\r\n" for n, v in headers)
        return head.encode() + b"\r\n" + body

    async def deliver(self, records: dict[str, str], content: bytes, token: str) -> bytes:
        server = DNSServer({name: [txt(value)] for name, value in records.items()})
        server.start(self)
        proxy = await self.startProxy(
            {
                "dkim": {"resolver": server.resolver, "dns_timeout": 2.0},
                "headers": {"authserv_id": "proxy.test"},
            }
        )
        replies = await harness.converse(
            self.reactor,
            proxy.port,
            [
                b"EHLO client.example",
                b"MAIL FROM:<alice@example.org>",
                f"RCPT TO:<{self.rcpt()}>".encode(),
                b"DATA",
                content + b".\r\n",
            ],
        )
        self.assertEqual(replies[-1].code, 250, [r.text for r in replies])
        return await self.maildir.waitFor(self.reactor, token)

    def ourResults(self, delivered: bytes) -> list[str]:
        """The delivered copy's Authentication-Results fields with our authserv-id, unfolded."""
        head = re.sub(r"\n[ \t]+", " ", harness.headerBlock(delivered))
        return [
            line
            for line in head.split("\n")
            if re.match(r"(?i)Authentication-Results:\s*proxy\.test\s*;", line)
        ]

    async def test_opendkimSignedPasses(self) -> None:
        """
        opendkim's signature, its key served over DNS, is dkim=pass through the proxy; the
        copy Postfix delivers carries exactly one Authentication-Results with our
        authserv-id, saying so, and still verifies (the body untouched).
        """
        port, record = await self.startOpenDKIM()
        token = self.token()
        content = await self.signedMessage(port, token)
        b = re.sub(r"\s+", "", re.search(rb"\bb=([^;]*)", content).group(1).decode())[:8]  # type: ignore[union-attr]
        key = f"{SELECTOR}._domainkey.{DOMAIN}"
        delivered = await self.deliver({key: record}, content, token)
        [ar] = self.ourResults(delivered)
        self.assertIn(f"dkim=pass header.d={DOMAIN} header.s={SELECTOR} header.b={b}", ar)

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            return record.encode() if name.decode().rstrip(".") == key else None

        self.assertTrue(dkim.verify(delivered.replace(b"\n", b"\r\n"), dnsfunc=dnsfunc))

    async def test_forgedResultsRemoved(self) -> None:
        """
        A message that arrives with an Authentication-Results claiming our authserv-id
        (dkim=pass for another domain) is delivered with only ours: the forged one removed
        on release (RFC 8601 section 5), opendkim's signature still passing.
        """
        port, record = await self.startOpenDKIM()
        token = self.token()
        forged = [("Authentication-Results", " proxy.test; dkim=pass header.d=bank.example")]
        content = await self.signedMessage(port, token, tuple(forged))
        delivered = await self.deliver({f"{SELECTOR}._domainkey.{DOMAIN}": record}, content, token)
        [ar] = self.ourResults(delivered)
        self.assertIn(f"dkim=pass header.d={DOMAIN}", ar)
        self.assertNotIn("bank.example", ar)
