"""
Tests for the p0f filter: the API's query and answer in pure code, the rules and options, a
silent p0f on a fake clock, and the filter in the running proxy against an in-process p0f
API socket.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, BaseFilter, IFilter, OptionError, Stage, Verdict
from mailproxy.filters.p0f import (
    ANSWER,
    STATUS_NO_MATCH,
    STATUS_OK,
    P0fClient,
    P0fError,
    P0fFilter,
    P0fFilterFactory,
    Rule,
    parseAnswer,
    query,
)
from tests.fakes import FakeP0f, P0fHost, ProxyTestCase, p0fAnswer

#: What p0f 3.09b answered, byte for byte, for 127.0.0.1 after a few loopback connections
#: (Linux 2.2.x-3.x, distance 0, no link type; trailing NULs cut here).
REAL_ANSWER = bytes.fromhex(
    "02463050100000001098086b3599086b32070000cbd70000310000003599086b3599086b00000002"
    "4c696e7578000000000000000000000000000000000000000000000000000000322e322e782d332e78"
).ljust(232, b"\0")

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


class WireTests(SynchronousTestCase):
    """The API's query and answer, without I/O."""

    def test_queries(self) -> None:
        """
        21 bytes: the magic in native order, 4 or 6, the address left-aligned in 16 bytes;
        an IPv4-mapped IPv6 client is asked as IPv4; a non-address is not asked.
        """
        v4 = query("192.0.2.7")
        self.assertEqual(v4, b"\x01\x46\x30\x50\x04" + socket.inet_aton("192.0.2.7") + b"\0" * 12)
        self.assertEqual(
            query("2001:db8::1"),
            b"\x01\x46\x30\x50\x06" + socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
        )
        self.assertEqual(query("::ffff:192.0.2.7"), v4)
        self.assertEqual(query("fe80::1%eth0"), query("fe80::1"))
        self.assertIsNone(query("unknown"))

    def test_realAnswer(self) -> None:
        """p0f's real answer: Linux 2.2.x-3.x, distance 0, and every field in C{raw}."""
        self.assertEqual(ANSWER.size, 232)
        answer = parseAnswer(REAL_ANSWER)
        self.assertTrue(answer.matched)
        self.assertEqual(
            (answer.os, answer.flavor, answer.distance, answer.link),
            ("Linux", "2.2.x-3.x", 0, ""),
        )
        self.assertEqual(answer.raw["first_seen"], 1795725328)
        self.assertEqual(answer.raw["total_conn"], 1842)
        self.assertEqual(answer.raw["uptime_min"], 55243)
        self.assertEqual(answer.raw["up_mod_days"], 49)
        self.assertEqual(answer.raw["os_match_q"], 2)
        self.assertEqual(sorted(answer.notes()), ["distance", "flavor", "link", "os", "raw"])

    def test_fields(self) -> None:
        """Every string and number lands in its place (the fake's independent packing)."""
        host = P0fHost(
            os="Windows",
            flavor="7 or 8",
            distance=-1,
            link="DSL",
            httpName="Firefox",
            httpFlavor="10.x",
            language="English",
            badSw=2,
            osMatchQ=1,
        )
        answer = parseAnswer(p0fAnswer(0x10, host))
        self.assertEqual(
            (answer.os, answer.flavor, answer.distance, answer.link),
            ("Windows", "7 or 8", -1, "DSL"),
        )
        self.assertEqual(
            {k: answer.raw[k] for k in ("http_name", "http_flavor", "language", "bad_sw")},
            {"http_name": "Firefox", "http_flavor": "10.x", "language": "English", "bad_sw": 2},
        )

    def test_noMatch(self) -> None:
        """Status 0x20 is an answer without a match."""
        self.assertEqual(parseAnswer(p0fAnswer(0x20)).status, STATUS_NO_MATCH)

    def test_bad(self) -> None:
        """A bad-query status, a wrong magic, an unknown status or size: P0fError."""
        for data in [
            p0fAnswer(0x00),
            b"\0" * 232,
            p0fAnswer(0x30),
            REAL_ANSWER[:231],
            REAL_ANSWER + b"\0",
        ]:
            self.assertRaises(P0fError, parseAnswer, data)


class RuleTests(SynchronousTestCase):
    """Rules and options."""

    def build(self, **options: object) -> P0fFilter:
        built = P0fFilterFactory().build(options, Clock())
        self.assertTrue(verifyObject(IFilter, built))
        assert isinstance(built, P0fFilter)
        return built

    def test_defaults(self) -> None:
        """By default: /var/run/p0f.sock, 2 s per query, no rules, at connect only."""
        built = self.build()
        self.assertEqual((built.client.path, built.client.timeout), ("/var/run/p0f.sock", 2.0))
        self.assertEqual(built.rules, ())
        self.assertEqual(built.stages, frozenset({Stage.CONNECT}))

    def test_rules(self) -> None:
        """Rules are case-insensitive globs on os, flavor and link; a missing key matches all."""
        built = self.build(
            socket="/tmp/p0f.sock",
            query_timeout=0.5,
            rules=[
                {"os": "windows", "flavor": "7*", "action": "reject", "text": "No Windows 7"},
                {"link": "DSL", "action": "tempfail"},
            ],
        )
        win7, dsl = built.rules
        self.assertEqual(win7, Rule("reject", "windows", "7*", "*", "No Windows 7"))
        windows = parseAnswer(p0fAnswer(STATUS_OK, P0fHost(os="Windows", flavor="7 or 8")))
        linux = parseAnswer(p0fAnswer(STATUS_OK, P0fHost(link="DSL")))
        self.assertTrue(win7.matches(windows))
        self.assertFalse(win7.matches(linux))
        self.assertTrue(dsl.matches(linux))
        refused = win7.verdict(windows)
        self.assertEqual(
            (refused.action, refused.code, refused.enhanced, refused.text),
            (Action.REJECT, 554, "5.7.1", "No Windows 7"),
        )
        later = dsl.verdict(linux)
        self.assertEqual(
            (later.action, later.code, later.text),
            (Action.TEMPFAIL, 421, "Connections from Linux 2.2.x-3.x are not accepted"),
        )

    def test_badOptions(self) -> None:
        """Bad values name their key, inside a rule too."""
        for options, key in [
            ({"socket": ""}, "socket"),
            ({"socket": "/run/" + "p" * 103}, "socket"),
            ({"query_timeout": 0}, "query_timeout"),
            ({"rules": {"os": "x"}}, "rules"),
            ({"rules": [{"os": "x", "action": "drop"}]}, "rules[0].action"),
            ({"rules": [{"action": "reject"}, {"oss": "x", "action": "reject"}]}, "rules[1].oss"),
            ({"rules": [{"os": "Windows"}]}, "rules[0].action"),
            ({"rules": [{"action": "reject", "text": "a\r\n250 ok"}]}, "rules[0].text"),
            ({"on_connect": True}, "on_connect"),
        ]:
            with self.assertRaises(OptionError) as caught:
                P0fFilterFactory().build(options, Clock())
            self.assertEqual(caught.exception.key, key, options)


class SilentP0fTests(SynchronousTestCase):
    """A p0f that never answers, on a fake clock."""

    def test_queryTimeout(self) -> None:
        """
        If p0f's socket never answers, the client is accepted after query_timeout seconds
        (not the filter's own timeout, which would follow on_error), and it is logged.
        """
        reactor = MemoryReactorClock()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        f = P0fFilter(P0fClient("/run/p0f.sock", reactor, timeout=2.0))
        d = f.checkConnect(Session("s1", "192.0.2.7", 40000))
        [(path, *_)] = reactor.unixClients
        self.assertEqual(path, "/run/p0f.sock")
        self.assertNoResult(d)
        reactor.advance(1.9)
        self.assertNoResult(d)
        reactor.advance(0.2)
        self.assertEqual(self.successResultOf(d), Verdict.accept())
        self.assertTrue(any("p0f: no answer for [192.0.2.7]" in formatEvent(e) for e in events))


@implementer(IFilter)
@attrs.define
class NotesRecorder(BaseFilter):
    """Records C{session.notes} as the message stage sees them."""

    name: str = "recorder"
    seen: list[dict[str, Any]] = attrs.Factory(list)
    stages = frozenset({Stage.MESSAGE})

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        self.seen.append(dict(session.notes))
        return Verdict.accept()


class P0fThroughProxyTests(ProxyTestCase):
    """The proxy with the p0f filter, an in-process p0f API socket, and the stand-in MTA."""

    def p0f(self, fake: FakeP0f) -> str:
        return self.listenUNIX(fake.buildFactory())

    async def test_notesAndLog(self) -> None:
        """
        p0f is asked about the client (the exact query bytes are checked), and its guess is
        in session.notes["p0f"] for later filters and in the log; the mail is delivered.
        """
        fake = FakeP0f(
            {"127.0.0.1": P0fHost(os="Linux", flavor="2.2.x-3.x", link="Ethernet or modem")}
        )
        path = self.p0f(fake)
        recorder = NotesRecorder()
        port = self.proxyWith(P0fFilterFactory().build({"socket": path}, reactor), recorder)
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(
            fake.queries,
            [b"\x01\x46\x30\x50\x04\x7f\x00\x00\x01" + b"\0" * 12],
        )
        [notes] = recorder.seen
        p0f = notes["p0f"]
        self.assertEqual(
            (p0f["os"], p0f["flavor"], p0f["distance"], p0f["link"]),
            ("Linux", "2.2.x-3.x", 0, "Ethernet or modem"),
        )
        self.assertEqual(p0f["raw"]["total_conn"], 3)
        self.assertTrue(
            self.logged(
                "p0f: [127.0.0.1] os=Linux flavor=2.2.x-3.x distance=0 link=Ethernet or modem"
            )
        )
        self.assertEqual(len(self.mta.messages), 1)

    async def test_ruleRejects(self) -> None:
        """
        A rule matching the client's OS (from the configuration file) refuses it at connect
        with 554 5.7.1 and the rule's text; the MTA is never contacted.
        """
        path = self.p0f(FakeP0f({"127.0.0.1": P0fHost(os="Windows", flavor="7 or 8")}))
        port = self.startProxy(
            "[filters.p0f]\n"
            f'socket = "{path}"\n'
            'rules = [{ os = "Linux", action = "tempfail" }, '
            '{ os = "windows", flavor = "7*", action = "reject", text = "No Windows 7 here" }]\n'
        )
        client = await self.connect(port)
        await client.lost
        self.assertEqual(client.codes, [554])
        self.assertEqual(client.replies[0].lines, (b"5.7.1 No Windows 7 here",))
        self.assertEqual(self.mta.transcripts, [])

    async def test_ruleTempfails(self) -> None:
        """A tempfail rule answers 421 4.7.0 at connect and closes."""
        path = self.p0f(FakeP0f({"127.0.0.1": P0fHost(link="DSL")}))
        port = self.startProxy(
            f'[filters.p0f]\nsocket = "{path}"\nrules = [{{ link = "dsl", action = "tempfail" }}]\n'
        )
        client = await self.connect(port)
        await client.lost
        self.assertEqual(client.codes, [421])
        self.assertTrue(client.replies[0].lines[0].startswith(b"4.7.0 proxy.test "))

    async def test_p0fTroubleNeverBlocksMail(self) -> None:
        """
        No socket, a socket nobody answers on, a bad answer, no match: each time the mail
        flows (with on_error = "tempfail"), and the trouble is logged.
        """
        silent = FakeP0f(answer=b"")
        garbage = FakeP0f(answer=b"\0" * 232)
        nomatch = FakeP0f()
        missing = os.path.join(os.path.dirname(self.p0f(FakeP0f())), "absent.sock")
        for path in [missing, self.p0f(silent), self.p0f(garbage), self.p0f(nomatch)]:
            port = self.startProxy(
                f'[filters.p0f]\non_error = "tempfail"\nsocket = "{path}"\nquery_timeout = 0.3\n'
            )
            client = await self.sendMessage(port, MESSAGE)
            self.assertEqual(client.replies[-1].code, 250, path)
        self.assertEqual(len(self.mta.messages), 4)
        self.assertTrue(
            self.logged(f"p0f: no answer for [127.0.0.1] (p0f at {missing} unreachable")
        )
        self.assertTrue(
            self.logged("p0f: no answer for [127.0.0.1] (p0f did not answer within 0.3 s)")
        )
        self.assertTrue(self.logged("p0f answered with magic 0x00000000"))
        self.assertTrue(self.logged("p0f: [127.0.0.1] no match"))
