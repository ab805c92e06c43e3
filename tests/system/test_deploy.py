"""
mailproxy deployed on port 25 (issue 8), checked as a postmaster would: in front of a real
Postfix that trusts only the proxy (the "edge" instance: C{tests/system/postfix/edge.sh},
set up with the README's "Putting mailproxy in front of Postfix" lines, front-main.cf), and
behind a real HAProxy (the README's "Scaling out", components/haproxy-scaling.cfg).

What Postfix's maillog, its C{Received:} header and its relay decisions say about the client
is what these tests look at: XCLIENT, the PROXY protocol, STARTTLS both ways, implicit TLS,
BDAT, AUTH only over TLS.

Every proxy is a twistd subprocess; HAProxy is started per test (C{haproxy -db}); clients
connect from other loopback addresses (127.0.0.5, ...), whose reverse names an in-process DNS
server gives mailproxy (C{client_names}).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from email.utils import formatdate
from pathlib import Path

from twisted.internet import error
from twisted.names import dns as names
from twisted.trial import unittest

import mailproxy
from tests.dnsserver import DNSServer, a
from tests.system import harness

HERE = Path(__file__).resolve().parent
FRONT_MAIN_CF = HERE / "postfix" / "front-main.cf"
HAPROXY_SCALING = HERE / "components" / "haproxy-scaling.cfg"
#: What the README has where the tested files have placeholders.
README_TLS_DIR = "/etc/postfix/tls"
README_HAPROXY = {"@BIND@": ":25", "@MX1@": "192.0.2.11:25", "@MX2@": "192.0.2.12:25"}

#: A recipient domain neither Postfix instance delivers to: relaying there needs permission.
REMOTE = "someone@remote.example"
SENDER = "sender@client.example"
RELAY_DENIED = f"554 5.7.1 <{REMOTE}>: Relay access denied"

#: Client addresses (all local: any 127.x.y.z is) and the names DNS gives them.
CLIENTS = {
    "127.0.0.5": "mail5.client.example",
    "127.0.0.6": "mail6.client.example",
    "127.0.0.7": "mail7.client.example",
}
OUTSIDE = ("203.0.113.7", "mail.remote.example")
#: The HAProxy global section of every test: logs on stderr (the test's haproxy.log), one
#: thread (a strict round robin).
HAPROXY_GLOBAL = "global\n    log stderr format raw local0 info\n    nbthread 1\n"


def _ptr(address: str) -> str:
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


def _keywords(ehlo: harness.Reply) -> set[str]:
    return {line[4:].split(" ", 1)[0].upper() for line in ehlo.lines[1:]}


def proxyHeader(source: str, port: int = 40000) -> bytes:
    """A PROXY v1 header: C{source}:C{port} connected to 192.0.2.25:25."""
    return f"PROXY TCP4 {source} 192.0.2.25 {port} 25\r\n".encode()


class DeployCase(unittest.TestCase):
    """The edge Postfix, a DNS server for the clients' names, helpers for proxies in front."""

    skip = harness.systemSkipReason("swaks", "postfix", "haproxy", "openssl")

    def setUp(self) -> None:
        self.reactor = harness.reactor()
        self.edge = harness.PostfixInstance.fromEnvironment(prefix="MAILPROXY_EDGE")
        env = harness.componentEnv(
            "MAILPROXY_EDGE_TLS_NAME",
            "MAILPROXY_EDGE_TLS_CA",
            "MAILPROXY_EDGE_SASL_USER",
            "MAILPROXY_EDGE_SASL_PASSWORD",
        )
        self.edgeName = env["MAILPROXY_EDGE_TLS_NAME"]
        self.edgeCa = env["MAILPROXY_EDGE_TLS_CA"]
        self.saslUser = env["MAILPROXY_EDGE_SASL_USER"]
        self.saslPassword = env["MAILPROXY_EDGE_SASL_PASSWORD"]
        self.maildir = harness.Maildir(self.edge.maildir)
        self.edgeLogStart = self.edge.maillogSize()
        records: dict[str, list[object]] = {}
        for address, name in [*CLIENTS.items(), OUTSIDE]:
            records[_ptr(address)] = [names.Record_PTR(name)]
            records[name] = [a(address)]
        self.dns = DNSServer(records)
        self.dns.start(self)

    # -- proxies -------------------------------------------------------------------------

    def sections(
        self,
        port: int,
        workdir: Path,
        upstream: str | None = None,
        filters: Mapping[str, Mapping[str, harness.TomlValue]] | None = None,
        proxy: Mapping[str, harness.TomlValue] | None = None,
        **more: Mapping[str, harness.TomlValue],
    ) -> dict[str, dict[str, harness.TomlValue]]:
        """A proxy configuration relaying to the edge Postfix (or C{upstream}); the clients'
        names from the test's DNS; more sections by name (C{tls=...}, C{upstream_tls=...})."""
        options: dict[str, harness.TomlValue] = {"client_names": f"127.0.0.1:{self.dns.port}"}
        options.update(proxy or {})
        config = harness.proxyConfig(
            workdir, port, upstream or self.edge.endpoint, filters=filters, proxy=options
        )
        for name, table in more.items():
            config[name] = dict(table)
        return config

    async def startProxy(
        self,
        upstream: str | None = None,
        filters: Mapping[str, Mapping[str, harness.TomlValue]] | None = None,
        proxy: Mapping[str, harness.TomlValue] | None = None,
        preamble: bytes = b"",
        bindAddress: str | None = None,
        **more: Mapping[str, harness.TomlValue],
    ) -> harness.ProxyProcess:
        """Start a proxy (see L{sections}); stopped at test end. C{proxy["listen"]} may use
        C{{port}} for the port the readiness check uses; C{preamble} and C{bindAddress}:
        what that check sends first (a PROXY header) and where it connects from."""
        workdir = Path(self.mktemp()).resolve()
        port = harness.freePort()
        options = dict(proxy or {})
        if isinstance(options.get("listen"), str):
            options["listen"] = str(options["listen"]).format(port=port)
        config = self.sections(port, workdir, upstream, filters, options, **more)
        return await harness.runProxy(
            self, self.reactor, workdir, config, port, preamble=preamble, bindAddress=bindAddress
        )

    async def tlsFiles(self, name: str = "mailproxy.test") -> dict[str, str]:
        """A CA and a certificate for C{name} it signed, made with openssl: the [tls] section
        of a proxy (certificate, key) and, under "ca", the CA a client can verify it with."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        ca, caKey = directory / "ca.pem", directory / "ca.key"
        cert, key, csr = directory / "cert.pem", directory / "key.pem", directory / "cert.csr"
        ext = directory / "cert.ext"
        ext.write_text(f"subjectAltName = DNS:{name}\nextendedKeyUsage = serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        steps = [
            ["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=mailproxy test CA",
             "-keyout", str(caKey), "-out", str(ca)],
            ["openssl", "req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", str(key),
             "-out", str(csr)],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(caKey),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
        ]  # fmt: skip
        for argv in steps:
            result = await harness.runProcess(self.reactor, argv, timeout=30)
            self.assertEqual(result.status, 0, f"{argv}: {result.err}")
        return {"certificate": str(cert), "key": str(key), "ca": str(ca)}

    # -- clients ---------------------------------------------------------------------------

    def token(self) -> str:
        """A marker unique to this test run, put into the message to find it again."""
        return f"{self.id().rsplit('.', 1)[-1]}-{uuid.uuid4().hex}"

    async def swaks(self, port: int, *args: str, source: str | None = None) -> harness.SwaksResult:
        """swaks to the proxy (or Postfix) on C{port}, from C{source} if given."""
        where = ["--local-interface", source] if source is not None else []
        return await harness.swaks(self.reactor, port, *where, *args)

    async def send(
        self,
        port: int,
        token: str,
        *args: str,
        source: str | None = None,
        helo: str = "client.example",
        recipient: str | None = None,
    ) -> harness.SwaksResult:
        """A message tagged C{token} from L{SENDER} with swaks (more options: C{args})."""
        return await self.swaks(
            port,
            "--ehlo", helo,
            "--from", SENDER,
            "--to", recipient or f"bob@{self.edge.domain}",
            "--add-header", f"X-Mailproxy-Test: {token}",
            *args,
            source=source,
        )  # fmt: skip

    async def session(
        self, port: int, source: str | None = None, banner: int | None = 220
    ) -> harness.SmtpSession:
        """A scripted client session from C{source}, past a C{banner} greeting (C{None}: not
        read); closed at test end."""
        session = await harness.SmtpSession.open(self.reactor, port, bindAddress=source)
        self.addCleanup(session.close)
        if banner is not None:
            greeting = await session.reply()
            self.assertEqual(greeting.code, banner, session.transcript())
        return session

    # -- what Postfix says -------------------------------------------------------------------

    def edgeLog(self) -> str:
        """The edge maillog since the test began."""
        return self.edge.maillogText(self.edgeLogStart)

    async def waitForLog(
        self, postfix: harness.PostfixInstance, since: int, pattern: str, why: str = ""
    ) -> re.Match[str]:
        """Wait (bounded) until C{pattern} shows in C{postfix}'s maillog after byte C{since};
        its match. Fails the test with the new part of the maillog if it does not."""
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = re.search(pattern, postfix.maillogText(since), re.M)
            if m:
                found.append(m)
            return m is not None

        if not await harness.waitUntil(self.reactor, check):
            self.fail(
                f"no {pattern!r} in {postfix.maillog} within {harness.DELIVERY_TIMEOUT} s"
                f"{': ' + why if why else ''}\n--- maillog since the test began:\n"
                + postfix.maillogText(since)
            )
        return found[0]

    def explain(self, result: harness.SwaksResult, *proxies: harness.ProxyProcess) -> str:
        """A failure message: swaks' transcript, the proxies' logs, the edge maillog."""
        parts = [f"--- swaks (exit {result.status}):\n{result.output}"]
        for proxy in proxies:
            parts.append("--- proxy log, last 40 lines:\n" + _tail(proxy.log()))
        parts.append("--- edge maillog since the test began:\n" + self.edgeLog())
        return "\n".join(parts)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class XclientTests(DeployCase):
    """Postfix sees mailproxy's client, not mailproxy: its address, name and HELO."""

    async def test_postfixLogsAndReceivedShowTheClient(self) -> None:
        """
        A client connecting from 127.0.0.5 with EHLO client.example: Postfix's maillog has
        its queue id with client=mail5.client.example[127.0.0.5] (the name mailproxy looked
        up, passed with XCLIENT NAME), and the delivered message's Received header says
        "from client.example (mail5.client.example [127.0.0.5])": no trace of 127.0.0.1 or
        of mailproxy's own name.
        """
        proxy = await self.startProxy()
        token = self.token()
        result = await self.send(proxy.port, token, source="127.0.0.5")
        explain = self.explain(result, proxy)
        self.assertEqual(result.status, 0, explain)
        queueId = result.queueId()
        self.assertIsNotNone(queueId, explain)
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            rf"^.* postfix/smtpd\[\d+\]: {queueId}: client=mail5\.client\.example\[127\.0\.0\.5\]$",
        )  # fmt: skip
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            r"disconnect from mail5\.client\.example\[127\.0\.0\.5\] ",
        )  # fmt: skip
        delivered = await self.maildir.waitFor(self.reactor, token)
        headers = harness.headerBlock(delivered)
        self.assertRegex(
            headers,
            r"(?m)^Received: from client\.example \(mail5\.client\.example \[127\.0\.0\.5\]\)\n"
            rf"\tby mta\.test \(Postfix\) with ESMTP id {queueId}\n",
        )
        received = headers.split("Received:", 1)[1].split("\nDate:", 1)[0]
        self.assertNotIn("127.0.0.1", received)
        self.assertNotIn("mailproxy.test", received)

    async def test_relayFromTheClientIsRefused(self) -> None:
        """
        Postfix's mynetworks is 127.0.0.1/32, the proxy's own address only: relaying from
        the client at 127.0.0.5 to a remote domain through the proxy is refused, "554 5.7.1
        Relay access denied", logged for that client and its HELO. (The same RCPT straight
        from 127.0.0.1 is permitted: the test can tell the two apart.)
        """
        direct = await self.swaks(
            self.edge.port, "--from", SENDER, "--to", REMOTE, "--quit-after", "RCPT"
        )
        self.assertIn("<-  250 2.1.5 Ok", direct.output, "the control case: mynetworks relays")
        proxy = await self.startProxy()
        result = await self.swaks(
            proxy.port,
            "--ehlo", "client.example", "--from", SENDER, "--to", REMOTE,
            "--quit-after", "RCPT",
            source="127.0.0.5",
        )  # fmt: skip
        explain = self.explain(result, proxy)
        self.assertIn(f"<** {RELAY_DENIED}", result.output, explain)
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            r"NOQUEUE: reject: RCPT from mail5\.client\.example\[127\.0\.0\.5\]: "
            rf"{re.escape(RELAY_DENIED)}; from=<{re.escape(SENDER)}> to=<{re.escape(REMOTE)}> "
            r"proto=ESMTP helo=<client\.example>",
        )  # fmt: skip

    async def test_onlyTheProxyMayUseXclient(self) -> None:
        """
        A client straight to Postfix from 127.0.0.5 is not offered XCLIENT (only 127.0.0.1
        is, smtpd_authorized_xclient_hosts) and cannot relay; through the proxy, XCLIENT
        from the client is answered by mailproxy, never relayed, and its relaying is still
        refused.
        """
        direct = await self.swaks(
            self.edge.port, "--from", SENDER, "--to", REMOTE, "--quit-after", "RCPT",
            source="127.0.0.5",
        )  # fmt: skip
        self.assertNotIn("XCLIENT", direct.output)
        self.assertIn(f"<** {RELAY_DENIED}", direct.output)
        proxy = await self.startProxy()
        session = await self.session(proxy.port, source="127.0.0.5")
        ehlo = await session.command(b"EHLO client.example")
        self.assertEqual(ehlo.code, 250, session.transcript())
        self.assertEqual(_keywords(ehlo) & {"XCLIENT", "XFORWARD"}, set(), session.transcript())
        forged = await session.command(b"XCLIENT ADDR=127.0.0.1 NAME=localhost")
        self.assertGreaterEqual(forged.code, 500, session.transcript())
        self.assertEqual((await session.command(f"MAIL FROM:<{SENDER}>".encode())).code, 250)
        rcpt = await session.command(f"RCPT TO:<{REMOTE}>".encode())
        self.assertEqual(rcpt.text, RELAY_DENIED, session.transcript())
        await session.command(b"QUIT")
        self.assertNotRegex(self.edgeLog(), r"XCLIENT ADDR=127\.0\.0\.1 NAME=localhost")


class ProxyProtocolTests(DeployCase):
    """The client's address through HAProxy (PROXY v2) reaches mailproxy's filters and Postfix."""

    def haproxyScaling(self, bind: int, mx1: int, mx2: int) -> str:
        """The README's "Scaling out" configuration on loopback ports."""
        lines = HAPROXY_SCALING.read_text().splitlines(keepends=True)
        text = "".join(line for line in lines if not line.startswith("#"))
        for placeholder, value in {
            "@BIND@": f"127.0.0.1:{bind}",
            "@MX1@": f"127.0.0.1:{mx1}",
            "@MX2@": f"127.0.0.1:{mx2}",
        }.items():
            text = text.replace(placeholder, value)
        return HAPROXY_GLOBAL + text

    async def test_haproxyInFrontOfTwoProxies(self) -> None:
        """
        HAProxy (the README's configuration: round robin, send-proxy-v2, SMTP health checks)
        in front of two mailproxy instances listening "haproxy:tcp:PORT", each denying
        127.0.0.5 in its access filter. Two clients from 127.0.0.5: the 554 of the access
        filter, naming [127.0.0.5], at connect, and Postfix never hears of them; two from
        127.0.0.6: delivered, Postfix logging client=mail6.client.example[127.0.0.6] and
        saying so in Received. Each instance served one client of each address.
        """
        access = {"access": {"deny_networks": ["127.0.0.5/32"]}}
        listen = {"listen": "haproxy:tcp:{port}:interface=127.0.0.1"}
        ready = proxyHeader("127.0.0.9")
        proxies = [
            await self.startProxy(filters=access, proxy=listen, preamble=ready) for _ in range(2)
        ]
        bind = harness.freePort()
        balancer = await harness.runHaproxy(
            self, self.reactor, Path(self.mktemp()).resolve(),
            self.haproxyScaling(bind, proxies[0].port, proxies[1].port),
        )  # fmt: skip
        details = lambda: "\n".join(  # noqa: E731
            [f"--- haproxy log:\n{balancer.log()}"]
            + [f"--- proxy {i + 1} log:\n{_tail(p.log())}" for i, p in enumerate(proxies)]
            + [f"--- edge maillog:\n{self.edgeLog()}"]
        )
        for _ in range(2):
            session = await self.session(bind, source="127.0.0.5", banner=None)
            banner = await session.reply()
            self.assertEqual(banner.code, 554, session.transcript() + "\n" + details())
            self.assertIn("[127.0.0.5]", banner.text)
            session.close()
        tokens = [self.token() for _ in range(2)]
        for token in tokens:
            result = await self.send(bind, token, source="127.0.0.6", helo="client6.example")
            self.assertEqual(result.status, 0, self.explain(result, *proxies) + details())
            queueId = result.queueId()
            await self.waitForLog(
                self.edge, self.edgeLogStart,
                rf"{queueId}: client=mail6\.client\.example\[127\.0\.0\.6\]$",
            )  # fmt: skip
            delivered = await self.maildir.waitFor(self.reactor, token)
            self.assertIn(
                "Received: from client6.example (mail6.client.example [127.0.0.6])",
                harness.headerBlock(delivered),
            )
        self.assertNotIn("127.0.0.5", self.edgeLog())
        for proxy in proxies:
            self.assertRegex(proxy.log(), r"connect from \[127\.0\.0\.5\]", details())
            self.assertRegex(proxy.log(), r"connect from \[127\.0\.0\.6\]", details())

    async def test_addressFromOutsideLoopbackIsNotMynetworks(self) -> None:
        """
        Behind HAProxy (accept-proxy: the test plays a client at 203.0.113.7), in front of
        Postfix with Debian's default mynetworks (127.0.0.0/8, the first instance): relaying
        to a remote domain is refused, since Postfix sees 203.0.113.7 through XCLIENT, not
        the proxy's 127.0.0.1. (From 127.0.0.9 the same RCPT passes the relay check: the
        error transport then refuses it with 550 5.1.1.)
        """
        postfix = harness.PostfixInstance.fromEnvironment()
        since = postfix.maillogSize()
        proxy = await self.startProxy(
            upstream=postfix.endpoint,
            proxy={"listen": "haproxy:tcp:{port}:interface=127.0.0.1"},
            preamble=proxyHeader("127.0.0.9"),
        )
        bind = harness.freePort()
        config = (
            HAPROXY_GLOBAL
            + "defaults\n    mode tcp\n    log global\n    option tcplog\n"
            + "    timeout connect 10s\n    timeout client 10m\n    timeout server 10m\n"
            + f"frontend outside\n    bind 127.0.0.1:{bind} accept-proxy\n"
            + "    default_backend mailproxy\n"
            + f"backend mailproxy\n    server mx1 127.0.0.1:{proxy.port} send-proxy-v2\n"
        )
        balancer = await harness.runHaproxy(
            self, self.reactor, Path(self.mktemp()).resolve(), config
        )
        replies = {}
        for source in (OUTSIDE[0], "127.0.0.9"):
            session = await self.session(bind, banner=None)
            session.write(proxyHeader(source))
            banner = await session.reply()
            self.assertEqual(banner.code, 220, session.transcript() + balancer.log())
            self.assertEqual((await session.command(b"EHLO outside.example")).code, 250)
            self.assertEqual((await session.command(f"MAIL FROM:<{SENDER}>".encode())).code, 250)
            replies[source] = await session.command(f"RCPT TO:<{REMOTE}>".encode())
            await session.command(b"QUIT")
        self.assertEqual(replies[OUTSIDE[0]].text, RELAY_DENIED, proxy.log())
        self.assertNotIn("Relay access denied", replies["127.0.0.9"].text)
        await self.waitForLog(
            postfix, since,
            r"NOQUEUE: reject: RCPT from mail\.remote\.example\[203\.0\.113\.7\]: "
            rf"{re.escape(RELAY_DENIED)};",
        )  # fmt: skip

    async def test_untrustedProxyHeaderIsClosedWithoutBanner(self) -> None:
        """
        proxy_protocol_from = ["127.0.0.2/32"]: a PROXY header (v1 or v2) from 127.0.0.1 gets
        no byte back, not even a banner, and the connection is closed at once (not after the
        header timeout); from 127.0.0.2 the same header is served (the readiness check).
        """
        header = proxyHeader("192.0.2.5")
        v2 = (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            + bytes([192, 0, 2, 5, 192, 0, 2, 25])
            + (40000).to_bytes(2, "big")
            + (25).to_bytes(2, "big")
        )
        proxy = await self.startProxy(
            proxy={
                "listen": "haproxy:tcp:{port}:interface=127.0.0.1",
                "proxy_protocol_from": ["127.0.0.2/32"],
            },
            timeouts={"proxy_header": 10},
            preamble=header,
            bindAddress="127.0.0.2",
        )
        for sent in (header, v2):
            session = await self.session(proxy.port, source="127.0.0.1", banner=None)
            start = self.reactor.seconds()
            session.write(sent)
            with self.assertRaises((error.ConnectionDone, error.ConnectionLost)):
                await session.reply(timeout=8)
            self.assertEqual(session.bytesReceived, 0, session.transcript())
            self.assertLess(self.reactor.seconds() - start, 5, "closed only by the timeout")
        self.assertNotIn("192.0.2.5", self.edgeLog())


class TlsTests(DeployCase):
    """STARTTLS from clients, implicit TLS on a second listener, STARTTLS to Postfix."""

    async def test_starttlsFromTheClient(self) -> None:
        """
        swaks --tls to a proxy with a certificate: STARTTLS answered 220, the session goes on
        encrypted (swaks' <~ lines), the message is delivered, and the proxy logs the TLS
        version.
        """
        tls = await self.tlsFiles()
        proxy = await self.startProxy(tls={"certificate": tls["certificate"], "key": tls["key"]})
        token = self.token()
        result = await self.send(proxy.port, token, "--tls", source="127.0.0.6")
        explain = self.explain(result, proxy)
        self.assertEqual(result.status, 0, explain)
        self.assertRegex(result.output, r"(?m)^<-  220 .*\n=== TLS started", explain)
        self.assertRegex(result.output, r"(?m)^<~  250 2\.0\.0 Ok: queued as \w+", explain)
        await self.maildir.waitFor(self.reactor, token)
        self.assertRegex(proxy.log(), r"TLSv1\.[23]", "the TLS version is not in the log")

    async def test_implicitTlsListener(self) -> None:
        """swaks --tlsc (TLS from the first byte, RFC 8314) to proxy.listen_tls delivers."""
        tls = await self.tlsFiles()
        tlsPort = harness.freePort()
        proxy = await self.startProxy(
            proxy={"listen_tls": [f"tcp:{tlsPort}:interface=127.0.0.1"]},
            tls={"certificate": tls["certificate"], "key": tls["key"]},
        )
        token = self.token()
        result = await self.send(tlsPort, token, "--tlsc", source="127.0.0.6")
        explain = self.explain(result, proxy)
        self.assertEqual(result.status, 0, explain)
        self.assertRegex(result.output, r"(?m)^<~  220 ", explain)
        self.assertRegex(result.output, r"(?m)^<~  250 2\.0\.0 Ok: queued as \w+", explain)
        await self.maildir.waitFor(self.reactor, token)

    async def test_starttlsToPostfixVerified(self) -> None:
        """
        upstream_tls mode "required", name mta.test, ca_file the CA of Postfix's certificate:
        Postfix logs a TLS connection from the proxy, and the message is delivered with
        Postfix's queue id.
        """
        proxy = await self.startProxy(
            upstream_tls={"mode": "required", "name": self.edgeName, "ca_file": self.edgeCa}
        )
        token = self.token()
        result = await self.send(proxy.port, token, source="127.0.0.6")
        explain = self.explain(result, proxy)
        self.assertEqual(result.status, 0, explain)
        queueId = result.queueId()
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            r"TLS connection established from \S+\[127\.0\.0\.[16]\]: TLSv1\.[23] with cipher",
        )  # fmt: skip
        delivered = await self.maildir.waitFor(self.reactor, token)
        self.assertIn(f"id {queueId}", harness.headerBlock(delivered))

    async def test_starttlsToPostfixWrongNameTempfails(self) -> None:
        """
        upstream_tls mode "required" with name wrong.test (Postfix's certificate is for
        mta.test): the client gets a 4xx, never a 250 for its message, and nothing is
        delivered; no cleartext transaction reaches Postfix.
        """
        proxy = await self.startProxy(
            upstream_tls={"mode": "required", "name": "wrong.test", "ca_file": self.edgeCa}
        )
        token = self.token()
        result = await self.send(proxy.port, token, source="127.0.0.6")
        explain = self.explain(result, proxy)
        self.assertNotEqual(result.status, 0, explain)
        self.assertTrue(any(r[:1] == "4" for r in result.replies()), f"no 4xx\n{explain}")
        self.assertIsNone(result.queueId(), explain)
        sentinel = self.token()
        await self.send(self.edge.port, sentinel)
        await self.maildir.waitFor(self.reactor, sentinel)
        self.assertEqual(self.maildir.find(token), [])
        self.assertNotRegex(self.edgeLog(), r"client=\S+\[127\.0\.0\.6\]", explain)


class BdatTests(DeployCase):
    """BDAT (CHUNKING, RFC 3030) from a client, through the proxy, to Postfix."""

    def message(self, token: str, recipient: str) -> bytes:
        """A message with what a careless relay would change: lines of dots, a lone dot,
        leading and trailing blanks, a folded header, a long line, empty lines at the end."""
        lines = [
            f"From: Sender <{SENDER}>",
            f"To: <{recipient}>",
            f"Subject: BDAT through mailproxy {token}",
            f"Date: {formatdate(localtime=False)}",
            f"Message-ID: <{token}@client.example>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            f"X-Mailproxy-Test: {token}",
            "X-Folded: first part,",
            "\tsecond part",
            "",
            "Line one.",
            ".",
            "..two dots",
            ". a dot and a space",
            "  leading blanks and trailing ones  ",
            "From the start of a line",
            "x" * 900,
            "\tA tab.",
            "",
            "",
        ]
        return "\r\n".join(lines).encode() + b"\r\n"

    async def test_bdatMessageIsDeliveredByteIdentical(self) -> None:
        """
        The proxy offers CHUNKING; a message sent in three BDAT chunks (one ending in the
        middle of a CRLF, one right after CRLF ".") and a final "BDAT 0 LAST" gets a 250 for
        each chunk and Postfix's "queued as" at the end. In the Maildir, below what Postfix
        adds (Return-Path, X-Original-To, Delivered-To, its Received), the message is
        exactly the bytes sent, CRLF stored as LF as Postfix stores every message.
        """
        proxy = await self.startProxy()
        token = self.token()
        recipient = f"bob@{self.edge.domain}"
        data = self.message(token, recipient)
        first = data.index(b"Line one.\r") + len(b"Line one.\r")
        second = data.index(b"\r\n.\r\n") + len(b"\r\n.")
        chunks = [data[:first], data[first:second], data[second:]]
        self.assertEqual(b"".join(chunks), data)
        session = await self.session(proxy.port, source="127.0.0.6")
        ehlo = await session.command(b"EHLO client.example")
        self.assertIn("CHUNKING", _keywords(ehlo), session.transcript())
        self.assertEqual((await session.command(f"MAIL FROM:<{SENDER}>".encode())).code, 250)
        self.assertEqual((await session.command(f"RCPT TO:<{recipient}>".encode())).code, 250)
        for chunk in chunks:
            session.write(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            reply = await session.reply()
            self.assertEqual(reply.code, 250, session.transcript())
        last = await session.command(b"BDAT 0 LAST")
        self.assertEqual(last.code, 250, session.transcript())
        queued = re.search(r"queued as (\w+)", last.text)
        self.assertIsNotNone(queued, session.transcript())
        assert queued is not None
        queueId = queued.group(1)
        await session.command(b"QUIT")
        delivered = await self.maildir.waitFor(self.reactor, token)
        added = re.match(
            rb"Return-Path: <" + re.escape(SENDER.encode()) + rb">\n"
            rb"X-Original-To: " + re.escape(recipient.encode()) + rb"\n"
            rb"Delivered-To: " + re.escape(recipient.encode()) + rb"\n"
            rb"Received: from client\.example \(mail6\.client\.example \[127\.0\.0\.6\]\)\n"
            rb"\tby mta\.test \(Postfix\) with E?SMTPS?A? id " + queueId.encode() + rb"\n"
            rb"\tfor <" + re.escape(recipient.encode()) + rb">; [^\n]+\n",
            delivered,
        )  # fmt: skip
        self.assertIsNotNone(added, f"not Postfix's own headers first:\n{delivered[:600]!r}")
        assert added is not None
        self.assertEqual(delivered[added.end() :], data.replace(b"\r\n", b"\n"))


class AuthTests(DeployCase):
    """AUTH through the proxy to Postfix's SASL (Dovecot): only over TLS."""

    def plain(self) -> bytes:
        return base64.b64encode(f"\0{self.saslUser}\0{self.saslPassword}".encode())

    async def test_authPlainOverStarttlsRelays(self) -> None:
        """
        STARTTLS to the proxy, AUTH PLAIN alice@test.example (Postfix's SASL, Dovecot; the
        proxy's hop to Postfix is STARTTLS too, since Postfix offers AUTH only then): 235,
        and the message to a remote domain is accepted for relay (permit_sasl_authenticated;
        the client at 127.0.0.5 is not in mynetworks): Postfix logs sasl_username and
        discards it as the edge instance does with remote mail.
        """
        tls = await self.tlsFiles()
        proxy = await self.startProxy(
            tls={"certificate": tls["certificate"], "key": tls["key"]},
            upstream_tls={"mode": "required", "name": self.edgeName, "ca_file": self.edgeCa},
        )
        result = await self.swaks(
            proxy.port,
            "--ehlo", "client.example", "--from", self.saslUser, "--to", REMOTE, "--tls",
            "--auth", "PLAIN", "--auth-user", self.saslUser,
            "--auth-password", self.saslPassword,
            source="127.0.0.5",
        )  # fmt: skip
        explain = self.explain(result, proxy)
        self.assertEqual(result.status, 0, explain)
        self.assertRegex(result.output, r"(?m)^<~  235 2\.7\.0 ", explain)
        self.assertRegex(result.output, r"(?m)^<~  250 2\.1\.5 ", explain)
        queueId = result.queueId()
        self.assertIsNotNone(queueId, explain)
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            rf"{queueId}: client=mail5\.client\.example\[127\.0\.0\.5\], "
            rf"(?:sasl_method=PLAIN, )?sasl_username={re.escape(self.saslUser)}$",
        )  # fmt: skip
        await self.waitForLog(
            self.edge, self.edgeLogStart,
            rf"{queueId}: to=<{re.escape(REMOTE)}>, relay=none, .*status=sent \(remote mail is",
        )  # fmt: skip
        self.assertNotIn(self.saslPassword, proxy.log())
        self.assertNotIn(self.plain().decode(), proxy.log())

    async def test_authWithoutTlsIsRefusedByTheProxy(self) -> None:
        """
        Without STARTTLS the proxy offers no AUTH (STARTTLS it does), answers AUTH PLAIN
        itself with 538 5.7.11 (or 530), and Postfix never hears an AUTH: its disconnect
        line for the client counts no auth; the client stays unauthenticated (its relaying
        is refused).
        """
        tls = await self.tlsFiles()
        proxy = await self.startProxy(
            tls={"certificate": tls["certificate"], "key": tls["key"]},
            upstream_tls={"mode": "required", "name": self.edgeName, "ca_file": self.edgeCa},
        )
        session = await self.session(proxy.port, source="127.0.0.7")
        ehlo = await session.command(b"EHLO client.example")
        self.assertEqual(ehlo.code, 250, session.transcript())
        self.assertIn("STARTTLS", _keywords(ehlo), session.transcript())
        self.assertNotIn("AUTH", _keywords(ehlo), session.transcript())
        auth = await session.command(b"AUTH PLAIN " + self.plain())
        self.assertIn(auth.code, (530, 538), session.transcript())
        self.assertRegex(auth.text, r"^53[08] 5\.7\.(11|0) ", session.transcript())
        self.assertEqual((await session.command(f"MAIL FROM:<{self.saslUser}>".encode())).code, 250)
        rcpt = await session.command(f"RCPT TO:<{REMOTE}>".encode())
        self.assertEqual(rcpt.text, RELAY_DENIED, session.transcript())
        await session.command(b"QUIT")
        line = await self.waitForLog(
            self.edge, self.edgeLogStart,
            r"^.* disconnect from mail7\.client\.example\[127\.0\.0\.7\] .*$",
        )  # fmt: skip
        self.assertNotIn(" auth=", line.group(0))
        self.assertNotRegex(self.edgeLog(), r"\[127\.0\.0\.7\].*sasl_username")
        self.assertNotIn(self.saslPassword, proxy.log())


class ReadmeTests(unittest.TestCase):
    """The README's deployment lines are the ones these tests run with."""

    skip = harness.systemSkipReason()

    def section(self, title: str) -> list[str]:
        """The stripped lines of the README's section C{title} (up to the next heading of
        the same or a higher level)."""
        readme = Path(mailproxy.__file__).resolve().parent.parent / "README.md"
        text = readme.read_text()
        m = re.search(rf"(?m)^(#+) {re.escape(title)}\s*$", text)
        self.assertIsNotNone(m, f"no section {title!r} in {readme}")
        assert m is not None
        level = len(m.group(1))
        rest = text[m.end() :]
        end = re.search(rf"(?m)^#{{1,{level}}} ", rest)
        return [line.strip() for line in rest[: end.start() if end else None].splitlines()]

    def test_postfixLines(self) -> None:
        """Every setting of front-main.cf (the edge instance's) is a line of the README's
        "Putting mailproxy in front of Postfix", with /etc/postfix/tls for the TLS files."""
        section = self.section("Putting mailproxy in front of Postfix")
        for line in FRONT_MAIN_CF.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                expected = line.replace("@TLS_DIR@", README_TLS_DIR).strip()
                self.assertIn(expected, section, f"{expected!r}: not in the README's section")

    def test_haproxyConfiguration(self) -> None:
        """Every line of haproxy-scaling.cfg (what the HAProxy test runs) is in the README's
        "Scaling out", in the same order, with the README's addresses."""
        section = self.section("Scaling out")
        position = 0
        for line in HAPROXY_SCALING.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            for placeholder, value in README_HAPROXY.items():
                line = line.replace(placeholder, value)
            self.assertIn(
                line.strip(),
                section[position:],
                f"{line.strip()!r}: not in the README's Scaling out (after its line {position})",
            )
            position = section.index(line.strip(), position) + 1
