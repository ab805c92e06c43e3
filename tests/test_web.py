"""
The status page, C{/stats.json} and C{/metrics}: served over loopback by a proxy that
carried real traffic, parsed by Prometheus' own parser, and escaped against hostile input.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from mailproxy.envelope import Session
from mailproxy.filters import Stage, Verdict
from mailproxy.filters.pipeline import Checked
from mailproxy.service import ProxyService
from mailproxy.stats import SessionInfo, Stats
from mailproxy.testing import RawClient
from mailproxy.web import page, registryFor, render
from mailproxy.wire import Reply
from tests.test_control import ACCESS, BODY, ProxyRun, readSocket, sendTraffic, shortTempDir

HOSTILE = '<script>alert("x")</script>'


async def get(
    url: str, accept: str | None = None, method: bytes = b"GET"
) -> tuple[int, Headers, bytes]:
    """Fetch C{url}: the status code, the headers and the body."""
    headers = Headers({b"accept": [accept.encode()]}) if accept else None
    response = await Agent(reactor).request(method, url.encode(), headers)
    body = await readBody(response)
    return response.code, response.headers, body


def header(headers: Headers, name: str) -> str:
    values = headers.getRawHeaders(name) or [b""]
    return values[0].decode() if isinstance(values[0], bytes) else values[0]


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class WebTests(ProxyRun, TestCase):
    """The web server of a proxy built from a configuration file, over loopback."""

    def setUp(self) -> None:
        self.startMta()

    def startWeb(self, extra: str = "") -> tuple[ProxyService, str, str]:
        """A proxy with the web on an ephemeral loopback port: the service, base URL, socket."""
        sock = f"{shortTempDir(self)}/stats.sock"
        service = self.startProxy(
            extra + f'[stats]\nsocket = "{sock}"\n[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
        )
        web = service.getServiceNamed("web tcp:0:interface=127.0.0.1")
        port = web._waitingForPort.result.getHost().port  # type: ignore[attr-defined]
        return service, f"http://127.0.0.1:{port}/", sock

    def test_metricsAfterTraffic(self) -> None:
        """
        After 5 clean messages and 2 refused by the access filter, /metrics parses with
        Prometheus' parser and its numbers are the traffic's: messages by outcome and
        filter, attempts, bytes, recipients, connections, the filter's latency histogram
        (7 observations, +Inf bucket included) and no active session.
        """

        async def run() -> None:
            service, base, _ = self.startWeb(ACCESS)
            await sendTraffic(self.proxyPort(service), clean=5, refused=2)
            code, headers, body = await get(base + "metrics")
            self.assertEqual(code, 200)
            self.assertTrue(header(headers, "content-type").startswith("text/plain"))
            samples = metrics(body.decode())
            self.assertEqual(
                samples["mailproxy_messages_total", (("filter", ""), ("outcome", "accepted"))], 5
            )
            self.assertEqual(
                samples[
                    "mailproxy_messages_total", (("filter", "access"), ("outcome", "rejected"))
                ],
                2,
            )
            self.assertEqual(samples["mailproxy_messages_attempted_total", ()], 7)
            self.assertEqual(samples["mailproxy_accepted_bytes_total", ()], 5 * len(BODY))
            self.assertEqual(
                samples["mailproxy_recipients_total", (("outcome", "accepted"), ("reason", ""))], 5
            )
            self.assertEqual(
                samples["mailproxy_connections_total", (("outcome", "accepted"), ("reason", ""))], 1
            )
            self.assertEqual(samples["mailproxy_connections_opened_total", ()], 1)
            self.assertEqual(samples["mailproxy_active_sessions", ()], 0)
            self.assertEqual(
                samples["mailproxy_filter_latency_seconds_count", (("filter", "access"),)], 7
            )
            self.assertEqual(
                samples[
                    "mailproxy_filter_latency_seconds_bucket",
                    (("filter", "access"), ("le", "+Inf")),
                ],
                7,
            )
            self.assertEqual(
                samples[
                    "mailproxy_filter_checks_total", (("filter", "access"), ("verdict", "reject"))
                ],
                2,
            )
            self.assertEqual(samples["mailproxy_mta_errors_total", (("kind", "lost"),)], 0)
            self.assertEqual(samples["mailproxy_ambiguous_deliveries_total", ()], 0)
            # OpenMetrics when the scraper asks for it.
            code, headers, body = await get(
                base + "metrics", accept="application/openmetrics-text; version=1.0.0"
            )
            self.assertTrue(
                header(headers, "content-type").startswith("application/openmetrics-text")
            )
            self.assertTrue(body.endswith(b"# EOF\n"))

        return defer.Deferred.fromCoroutine(run())

    def test_statsJsonMatchesSocket(self) -> None:
        """/stats.json answers the same counters as the stats socket."""

        async def run() -> None:
            service, base, sock = self.startWeb(ACCESS)
            await sendTraffic(self.proxyPort(service), clean=2, refused=1)
            code, headers, body = await get(base + "stats.json")
            self.assertEqual(code, 200)
            self.assertEqual(header(headers, "content-type"), "application/json")
            fromWeb: dict[str, Any] = json.loads(body)
            fromSocket = await readSocket(sock)
            for key in ("today", "total", "filters", "refusals", "active"):
                self.assertEqual(_withoutTimes(fromWeb[key]), _withoutTimes(fromSocket[key]), key)
            self.assertEqual(fromWeb["today"]["messages"]["accepted"], 2)
            self.assertEqual(fromWeb["today"]["messages"]["rejected"], {"access": 1})

        return defer.Deferred.fromCoroutine(run())

    def test_pageShowsCountsAndEscapes(self) -> None:
        """
        The page shows today's counts where a reader looks (accepted 3, refused 1), and
        a client whose HELO is a script tag appears as text in the active sessions: the
        markup is escaped, and the page forbids scripts by its Content-Security-Policy.
        """

        async def run() -> None:
            service, base, _ = self.startWeb(ACCESS)
            port = self.proxyPort(service)
            await sendTraffic(port, clean=3, refused=1)
            client = RawClient()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            self.addCleanup(lambda: client.transport and client.transport.loseConnection())
            await client.expect(1)  # the banner first: who talks before it gets 554
            client.send(b"EHLO " + HOSTILE.encode() + b"\r\nMAIL FROM:<x@example.org>\r\n")
            await client.expect(3).addTimeout(20, reactor)
            code, headers, body = await get(base)
            self.assertEqual(code, 200)
            html = body.decode()
            self.assertNotIn("<script", html)
            self.assertIn('&lt;script&gt;alert("x")&lt;/script&gt;', html)
            csp = header(headers, "content-security-policy")
            self.assertIn("default-src 'none'", csp)
            self.assertNotIn("script-src", csp)
            self.assertEqual(_cell(html, "today-messages-accepted"), "3")
            self.assertEqual(_cell(html, "today-messages-rejected"), "1")
            self.assertEqual(_cell(html, "card-accepted"), "3")
            self.assertEqual(_cell(html, "card-active"), "1")
            self.assertRegex(html, r'<meta content="10" http-equiv="refresh" />')

        return defer.Deferred.fromCoroutine(run())

    def test_otherPaths(self) -> None:
        """Unknown paths answer 404; POST 405 and DELETE 501: nothing but GET is served."""

        async def run() -> None:
            _, base, _ = self.startWeb()
            self.assertEqual((await get(base + "nosuch"))[0], 404)
            self.assertEqual((await get(base, method=b"POST"))[0], 405)
            self.assertEqual((await get(base + "metrics", method=b"DELETE"))[0], 501)

        return defer.Deferred.fromCoroutine(run())


def _cell(html: str, id: str) -> str:
    """The text of the element with the given id."""
    found = re.search(rf'<[a-z]+ [^>]*id="{id}"[^>]*>([^<]*)<', html)
    assert found is not None, id
    return found.group(1)


def _withoutTimes(value: Any) -> Any:
    """The value with ages and times removed (they differ between two reads)."""
    if isinstance(value, dict):
        return {k: _withoutTimes(v) for k, v in value.items() if k not in ("age", "now", "uptime")}
    if isinstance(value, list):
        return [_withoutTimes(v) for v in value]
    return value


class _Hostile:
    """A session whose every field is markup."""

    def describe(self) -> SessionInfo:
        return SessionInfo(HOSTILE, HOSTILE, HOSTILE, HOSTILE, 1, HOSTILE)


class MetricsTests(SynchronousTestCase):
    """The Prometheus collector, read directly."""

    def test_proxyRefused(self) -> None:
        """Refused PROXY headers are exposed by reason, every reason present."""
        stats = Stats(Clock())
        stats.proxyRefused("invalid")
        samples = metrics(generate_latest(registryFor(stats)).decode())
        self.assertEqual(
            {
                why: samples["mailproxy_proxy_refused_total", (("reason", why),)]
                for why in ("untrusted", "invalid", "timeout")
            },
            {"untrusted": 0, "invalid": 1, "timeout": 0},
        )
        html = render(page(stats.snapshot(), "proxy.test", 10)).decode()
        self.assertIn('id="total-proxy-refused" class="n">1<', html)

    def test_tlsAndAuth(self) -> None:
        """TLS handshakes by side and version, AUTH by outcome: metrics, JSON and the page."""
        stats = Stats(Clock())
        stats.tlsEstablished("client", "TLSv1.3")
        stats.tlsEstablished("client", "TLSv1.3")
        stats.tlsEstablished("mta", "TLSv1.2")
        stats.authenticated(True)
        stats.authenticated(False)
        samples = metrics(generate_latest(registryFor(stats)).decode())
        self.assertEqual(
            samples["mailproxy_tls_handshakes_total", (("side", "client"), ("version", "TLSv1.3"))],
            2,
        )
        self.assertEqual(
            samples["mailproxy_tls_handshakes_total", (("side", "mta"), ("version", "TLSv1.2"))], 1
        )
        self.assertEqual(samples["mailproxy_auth_total", (("outcome", "failed"),)], 1)
        today = stats.snapshot()["today"]
        self.assertEqual(today["tls"], {"client TLSv1.3": 2, "mta TLSv1.2": 1})
        self.assertEqual(today["auth"], {"succeeded": 1, "failed": 1})
        html = render(page(stats.snapshot(), "proxy.test", 10)).decode()
        self.assertIn('id="total-tls" class="n">3<', html)
        self.assertIn('id="total-auth-failed" class="n">1<', html)


class PageTests(SynchronousTestCase):
    """The page, rendered from counters fed directly."""

    def test_everythingEscaped(self) -> None:
        """
        Markup in any client-controlled or filter-given string (client, HELO, sender,
        filter name, reply text) comes out as text, in every table of the page.
        """
        stats = Stats(Clock())
        session = Session(HOSTILE, HOSTILE, 1)
        stats.sessionStarted(_Hostile())
        stats.filterChecked(
            Checked(session, Stage.MAIL, HOSTILE, 0.01, Verdict.reject(HOSTILE), False)
        )
        stats.refused(session, Stage.MAIL, Reply.make(550, "5.7.1", HOSTILE), HOSTILE)
        html = render(page(stats.snapshot(), HOSTILE, 10)).decode()
        self.assertNotIn("<script", html)
        self.assertGreaterEqual(html.count("&lt;script&gt;"), 8)

    def test_chart(self) -> None:
        """The chart has one bar per kind and hour with messages, and a tooltip per hour."""
        clock = Clock()
        clock.rightNow = 1_700_000_000.0
        stats = Stats(clock)
        session = Session("S", "127.0.0.1", 1)
        stats.delivered(session, Reply.make(250, "2.0.0", "Ok"), "a@x", 10)
        clock.advance(3600)
        stats.refused(session, Stage.MESSAGE, Reply.make(550, "5.7.1", "No"), "a@x", "size limit")
        stats.refused(session, Stage.MESSAGE, Reply.make(451, "4.7.1", "Later"), "a@x", "spamd")
        html = render(page(stats.snapshot(), "mx", 10)).decode()
        svg = html[html.index("<svg") : html.index("</svg>")]
        self.assertEqual(svg.count("<title>"), 24)
        self.assertEqual(len(re.findall(r'<rect [^>]*fill="#(?:2e7d32|ef8f00|c62828)"', svg)), 3)
        self.assertIn("1 accepted, 0 rejected", svg)
