"""
Tests for the headers filter: refusal by header regex on the decoded header block, the
Authentication-Results header it adds from the other filters' results, forged
Authentication-Results, through the in-memory proxy and over real loopback sockets.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailproxy.config import ConfigError, load
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import BaseFilter, IFilter, OptionError, Stage, Verdict
from mailproxy.filters.headers import (
    ForgedResults,
    HeadersFilter,
    HeadersFilterFactory,
    authservId,
    resultsValue,
)
from mailproxy.filters.pipeline import buildPipeline, filterFactories
from mailproxy.testing_threads import ThreadedClock
from mailproxy.wire import Reply
from tests.test_mime import LoopbackProxy, crlf, stuffed
from tests.test_relay import Harness, envelope


def build(**options: object) -> HeadersFilter:
    options.setdefault("authserv_id", "mx.example.org")
    built = HeadersFilterFactory().build(options, ThreadedClock())
    assert isinstance(built, HeadersFilter)
    return built


SPAM_RULE = {"header": "Subject", "pattern": "(?i)viagra", "text": "Spam subject refused"}

PLAIN = crlf("From: a@example.org\nSubject: hello\n\nHello.\n")


@implementer(IFilter)
@attrs.define
class Results(BaseFilter):
    """Notes RFC 8601 method results, as SPF or DNSBL filters do, at MAIL and at the message."""

    mail: tuple[str, ...] = ()
    message: tuple[str, ...] = ()
    name = "results"
    stages = frozenset({Stage.MAIL, Stage.MESSAGE})

    def checkMail(self, session: Session, envelope: Envelope) -> Verdict:
        envelope.notes.setdefault("authentication-results", []).extend(self.mail)
        return Verdict.accept()

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> Verdict:
        envelope.notes.setdefault("authentication-results", []).extend(self.message)
        return Verdict.accept()


class OptionTests(SynchronousTestCase):
    """The filter's options."""

    def test_defaults(self) -> None:
        """
        A minimal section: an IFilter of the message stage, adding results, removing
        forged ones, always run.
        """
        f = build()
        self.assertTrue(verifyObject(IFilter, f))
        self.assertEqual(f.stages, frozenset({Stage.MESSAGE}))
        self.assertEqual(
            (f.authservId, f.rules, f.addResults, f.forgedResults, f.always, f.maxHeaderBytes),
            ("mx.example.org", (), True, ForgedResults.REMOVE, True, 131072),
        )
        for choice in ForgedResults:
            self.assertIs(build(forged_results=choice.value).forgedResults, choice)

    def test_rules(self) -> None:
        """Reject rules are an array of inline tables; text is optional."""
        f = build(reject=[SPAM_RULE, {"header": "X-Mailer", "pattern": "^BadBulk"}])
        self.assertEqual(
            [(r.header, r.pattern.pattern, r.text) for r in f.rules],
            [
                ("subject", "(?i)viagra", "Spam subject refused"),
                ("x-mailer", "^BadBulk", "Message refused: X-Mailer header refused by policy"),
            ],
        )

    def test_badOptions(self) -> None:
        """Wrong options name the key at fault, down to the rule and its field."""
        ok = {"authserv_id": "mx.example.org"}
        cases: list[tuple[dict[str, object], str]] = [
            ({}, "authserv_id"),
            ({"authserv_id": "two words"}, "authserv_id"),
            ({"authserv_id": "a;b"}, "authserv_id"),
            ({**ok, "reject": {"header": "Subject"}}, "reject"),
            ({**ok, "reject": ["Subject"]}, "reject"),
            ({**ok, "reject": [SPAM_RULE, {"header": "Subject", "pattern": "("}]}, "reject[1].pattern"),
            ({**ok, "reject": [{"pattern": "x"}]}, "reject[0].header"),
            ({**ok, "reject": [{"header": "Sub ject", "pattern": "x"}]}, "reject[0].header"),
            ({**ok, "reject": [{"header": "Subject", "patern": "x"}]}, "reject[0].pattern"),
            ({**ok, "reject": [{**SPAM_RULE, "code": 551}]}, "reject[0].code"),
            ({**ok, "forged_results": "delete"}, "forged_results"),
            ({**ok, "authentication_results": "yes"}, "authentication_results"),
            ({**ok, "max_header_bytes": 100}, "max_header_bytes"),
        ]
        for options, key in cases:
            with self.assertRaises(OptionError) as caught:
                HeadersFilterFactory().build(options, ThreadedClock())
            self.assertEqual(caught.exception.key, key, options)

    def test_configFile(self) -> None:
        """
        In the configuration file, a bad rule is reported with the file and the full key;
        a good one loads.
        """
        path = self.mktemp()
        section = (
            '[proxy]\nlisten = "tcp:0"\nupstream = "tcp:host=127.0.0.1:port=1"\n'
            "[filters.headers]\n"
            'authserv_id = "mx.example.org"\n'
            'reject = [{ header = "Subject", pattern = "(?i)viagra", text = "Spam subject refused" },\n'
            '          { header = "From", pattern = "[" }]\n'
        )
        with open(path, "w") as f:
            f.write(section)
        with self.assertRaises(ConfigError) as caught:
            buildPipeline(load(path, Clock()), ThreadedClock(), None, filterFactories())
        self.assertIn("filters.headers.reject[1].pattern", str(caught.exception))
        with open(path, "w") as f:
            f.write(section.replace('pattern = "["', 'pattern = "@spam\\\\.example"'))
        pipeline = buildPipeline(load(path, Clock()), ThreadedClock(), None, filterFactories())
        self.assertTrue(pipeline.wants(Stage.MESSAGE))


class ValueTests(SynchronousTestCase):
    """The Authentication-Results value, and reading the authserv-id of one."""

    def test_resultsValue(self) -> None:
        """Results are joined with "; ", cleaned and deduplicated; none gives "none"."""
        self.assertEqual(resultsValue("mx.example.org", None), "mx.example.org; none")
        self.assertEqual(resultsValue("mx.example.org", []), "mx.example.org; none")
        self.assertEqual(
            resultsValue(
                "mx.example.org",
                ["spf=pass smtp.mailfrom=example.org", "dnsbl=pass\r\n  policy.ip=192.0.2.1;", "spf=pass smtp.mailfrom=example.org"],
            ),
            "mx.example.org; spf=pass smtp.mailfrom=example.org; dnsbl=pass policy.ip=192.0.2.1",
        )

    def test_authservId(self) -> None:
        """The authserv-id is the first token, after comments, in lower case."""
        self.assertEqual(authservId("MX.example.org; spf=pass"), "mx.example.org")
        self.assertEqual(authservId(" (comment; x) mx.example.org 1; none"), "mx.example.org")
        self.assertEqual(authservId('"mx.example.org"; none'), "mx.example.org")
        self.assertEqual(authservId("mx.example.org;none"), "mx.example.org")


class HeadersProxyTests(SynchronousTestCase):
    """The filter in the proxy, in memory: what the client and the MTA see."""

    def transaction(self, h: Harness, message: bytes) -> Reply:
        """Send C{message}; the client's final reply."""
        client = h.greeted()
        h.send(client, envelope() + b"DATA\r\n")
        h.send(client, stuffed(message))
        return client.replies[-1]

    def test_resultsAddedOnTop(self) -> None:
        """
        The one Authentication-Results header, gathering the results noted at MAIL and by
        message filters before it, is at the top of what the MTA receives, folded to 78
        columns after a ";"; the message follows byte for byte.
        """
        results = Results(("spf=pass smtp.mailfrom=example.org",), ("dnsbl=pass",))
        h = Harness(self, results, build())
        self.assertEqual(self.transaction(h, PLAIN).code, 250)
        [received] = h.mta.messages
        self.assertEqual(
            received.content,
            b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org;\r\n"
            b" dnsbl=pass\r\n" + PLAIN,
        )

    def test_noResults(self) -> None:
        """Without results the header says "none"; with the option off, nothing is added."""
        h = Harness(self, build())
        self.transaction(h, PLAIN)
        self.assertEqual(
            h.mta.messages[0].content, b"Authentication-Results: mx.example.org; none\r\n" + PLAIN
        )
        h = Harness(self, build(authentication_results=False))
        self.transaction(h, PLAIN)
        self.assertEqual(h.mta.messages[0].content, PLAIN)

    def test_ruleRefuses(self) -> None:
        """
        A header matching a rule, even RFC 2047-encoded and folded, is refused with 550
        5.7.1 and the rule's text; the MTA gets nothing.
        """
        h = Harness(self, build(reject=[SPAM_RULE]))
        spam = crlf("From: a@example.org\nSubject: =?UTF-8?B?Q2hlYXAgVmlh?=\n =?UTF-8?Q?gra_now?=\n\nbuy\n")
        reply = self.transaction(h, spam)
        self.assertEqual((reply.code, reply.lines), (550, (b"5.7.1 Spam subject refused",)))
        self.assertEqual(h.mta.messages, [])
        self.assertNotIn(b"DATA", bytes(h.mta.transcripts[0]))

    def test_onlyTheHeaderBlock(self) -> None:
        """
        Only the message's own header block is matched: the body, and the headers of
        an attached message, are not.
        """
        h = Harness(self, build(reject=[SPAM_RULE]))
        message = crlf(
            "Subject: minutes\nContent-Type: message/rfc822\n\nSubject: viagra\n\nviagra\n"
        )
        self.assertEqual(self.transaction(h, message).code, 250)

    def test_everyOccurrence(self) -> None:
        """Every field of the rule's name is matched, not only the first; names ignore case."""
        h = Harness(self, build(reject=[{"header": "received", "pattern": r"from bad\.example"}]))
        message = crlf(
            "Received: from good.example by a\nRECEIVED: from bad.example by b\nSubject: x\n\nx\n"
        )
        self.assertEqual(self.transaction(h, message).code, 550)

    def test_forgedRemoved(self) -> None:
        """
        By default, every Authentication-Results arriving with the message that claims
        our authserv-id (any case, after a comment, in quotes, folded) is removed from
        the released copy, which has ours on top; fields of other authserv-ids, and the
        rest of the message, stay byte for byte.
        """
        forged = crlf(
            "Authentication-Results: MX.Example.Org; spf=pass\n"
            "Subject: x\n"
            "Authentication-Results: mx.sender.example; dkim=pass\n"
            "Authentication-Results: (hop 1)\n \"mx.example.org\"; dkim=pass\n"
            "Authentication-Results: mx.example.org.evil; none\n"
            "\nx\n"
        )
        h = Harness(self, build())
        self.assertEqual(self.transaction(h, forged).code, 250)
        self.assertEqual(
            h.mta.messages[0].content,
            crlf(
                "Authentication-Results: mx.example.org; none\n"
                "Subject: x\n"
                "Authentication-Results: mx.sender.example; dkim=pass\n"
                "Authentication-Results: mx.example.org.evil; none\n"
                "\nx\n"
            ),
        )

    def test_forgedRefused(self) -> None:
        """
        With forged_results = "reject", a message arriving with an Authentication-Results
        that claims our authserv-id is refused; with "accept" it is let through as it
        came, our own header then on top.
        """
        forged = crlf("Authentication-Results: MX.Example.Org; spf=pass\nSubject: x\n\nx\n")
        h = Harness(self, build(forged_results="reject"))
        reply = self.transaction(h, forged)
        self.assertEqual(reply.code, 550)
        self.assertEqual(
            reply.lines,
            (b"5.7.1 Message carries a forged Authentication-Results header (mx.example.org)",),
        )
        self.assertEqual(h.mta.messages, [])
        h = Harness(self, build(forged_results="accept"))
        self.assertEqual(self.transaction(h, forged).code, 250)
        self.assertEqual(
            h.mta.messages[0].content,
            b"Authentication-Results: mx.example.org; none\r\n" + forged,
        )

    def test_othersResultsKept(self) -> None:
        """Authentication-Results from other hosts are no forgery."""
        other = crlf("Authentication-Results: mx.sender.example; dkim=pass\nSubject: x\n\nx\n")
        h = Harness(self, build())
        self.assertEqual(self.transaction(h, other).code, 250)

    def test_headerTooLarge(self) -> None:
        """A header block over the limit is refused with 554 5.6.0."""
        h = Harness(self, build(max_header_bytes=1024), limits={"messageSize": 10**6})
        big = b"X-Filler: " + b"y" * 2000 + b"\r\n\r\nbody\r\n"
        reply = self.transaction(h, big)
        self.assertEqual(reply.code, 554)
        self.assertEqual(reply.lines, (b"5.6.0 Message header block too large (limit 1024 bytes)",))


class HeadersLoopbackTests(TestCase):
    """The headers filter configured in a file, over real loopback sockets."""

    def test_configured(self) -> defer.Deferred[None]:
        """
        Configured as [filters.headers] after another filter: a refused subject gets 550
        with the rule's text, a clean message reaches the MTA with our header on top.
        """

        async def go() -> None:
            proxy = LoopbackProxy(
                self,
                "[filters.mime]\n"
                'block_filenames = ["*.exe"]\n'
                "[filters.headers]\n"
                'authserv_id = "mx.example.org"\n'
                'reject = [{ header = "Subject", pattern = "(?i)viagra", text = "Spam subject refused" }]\n',
            )
            client = await proxy.send(crlf("Subject: VIAGRA\n\nx\n"))
            self.assertEqual(client.replies[-2].code, 550)
            self.assertEqual(client.replies[-2].lines, (b"5.7.1 Spam subject refused",))
            client = await proxy.send(PLAIN)
            self.assertEqual(client.codes[-2:], [250, 221])
            self.assertEqual(
                [m.content for m in proxy.mta.messages],
                [b"Authentication-Results: mx.example.org; none\r\n" + PLAIN],
            )

        return defer.Deferred.fromCoroutine(go())
