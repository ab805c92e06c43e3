"""
The dmarc filter: policy records, alignment, p/sp/pct, the actions and local overrides,
the From: field as RFC 7489 6.6.1 wants it, and its place after spf and dkim.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.config import Config, ConfigError, FilterSpec
from mailproxy.envelope import Envelope, Session
from mailproxy.filters import Action, EditKind, IFilter, OptionError
from mailproxy.filters.dmarc import (
    DMARCFilterFactory,
    FromError,
    Policy,
    Record,
    authorDomains,
    evaluate,
    parseRecord,
)
from mailproxy.filters.pipeline import buildPipeline, filterFactories
from mailproxy.filters.support import Patterns
from mailproxy.testing_threads import ThreadedClock
from tests.dnsserver import DNSServer, txt
from tests.fakes import ProxyTestCase
from tests.test_dkim import MESSAGE, arcSeal, keyRecords, rsaKey, sign, spooled

NOBODY = Patterns(())


def dkimPass(domain: str) -> dict[str, Any]:
    return {"dkim": [{"result": "pass", "domain": domain}]}


class RecordTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Tags as RFC 7489 6.3 defines them; bad optional tags take their defaults."""
        self.assertEqual(
            parseRecord("example.org", "v=DMARC1; p=reject; sp=none; adkim=s; aspf=x; pct=20"),
            Record("example.org", Policy.REJECT, Policy.NONE, "s", "r", 20),
        )
        self.assertEqual(parseRecord("e.org", "v=DMARC1; p=quarantine; pct=x").pct, 100)  # type: ignore[union-attr]

    def test_badPolicy(self) -> None:
        """An invalid p: no policy, unless rua is there: then p=none (6.6.3)."""
        self.assertIsNone(parseRecord("e.org", "v=DMARC1; p=maybe"))
        self.assertEqual(
            parseRecord("e.org", "v=DMARC1; p=maybe; rua=mailto:d@e.org"),
            Record("e.org", Policy.NONE),
        )


class FromTests(SynchronousTestCase):
    def test_domains(self) -> None:
        """Mailboxes, display names (quoted, with @ in them), comments, groups, IDN."""
        for value, expected in [
            ("alice@Example.ORG", ["example.org"]),
            ('"bob@evil.example" <bob@example.org>', ["example.org"]),
            ("Bob (bob@evil.example) <bob@example.org>", ["example.org"]),
            ("a@x.example, B <b@y.example>, c@x.example", ["x.example", "y.example"]),
            ("team: a@x.example, b@y.example;", ["x.example", "y.example"]),
            ("<a@bücher.example>", ["xn--bcher-kva.example"]),
            ("Bob (x (y z) \\) <e@evil.example>) <bob@example.org>", ["example.org"]),
            ('"A \\" (x) <e@evil.example>" <bob@example.org>', ["example.org"]),
            ("(" * 5000 + ")" * 5000 + " bob@example.org", ["example.org"]),
            ("x " * 30000 + "<bob@example.org>", ["example.org"]),
        ]:
            self.assertEqual(authorDomains(value), expected, value)

    def test_noDomain(self) -> None:
        """
        No address, an address without a usable domain, an unclosed comment, or more
        than MAX_AUTHOR_DOMAINS (10) author domains: FromError.
        """
        for value in [
            "",
            "Alice",
            "alice@",
            "<alice>",
            "a@[192.0.2.1]",
            "a@localhost",
            "undisclosed:;",
            "(unclosed <a@example.org>",
            ", ".join(f"a@d{n}.example" for n in range(11)),
        ]:
            self.assertRaises(FromError, authorDomains, value)


class EvaluateTests(SynchronousTestCase):
    """L{evaluate}: alignment, p and sp, pct, overrides, on noted results."""

    REJECT = Record("example.org", Policy.REJECT)

    def evaluate(
        self,
        notes: dict[str, Any],
        record: Record | None = REJECT,
        domain: str = "example.org",
        **kw: Any,
    ) -> Any:
        return evaluate(
            domain,
            record,
            notes,
            kw.get("random", lambda: 0.0),
            kw.get("allow", NOBODY),
            kw.get("sealers", NOBODY),
        )

    def test_none(self) -> None:
        """No record: dmarc=none."""
        self.assertEqual(
            self.evaluate({}, None).methodResult(), "dmarc=none header.from=example.org"
        )

    def test_dkimAligned(self) -> None:
        """A DKIM pass of the domain, or (relaxed) of a domain under the same organisational domain."""
        self.assertEqual(self.evaluate(dkimPass("example.org")).result, "pass")
        self.assertEqual(self.evaluate(dkimPass("mail.example.org")).result, "pass")
        strict = Record("example.org", Policy.REJECT, adkim="s")
        self.assertEqual(self.evaluate(dkimPass("mail.example.org"), strict).result, "fail")
        self.assertEqual(self.evaluate(dkimPass("example.org.evil.example")).result, "fail")
        failed = {"dkim": [{"result": "fail", "domain": "example.org"}]}
        self.assertEqual(self.evaluate(failed).result, "fail")

    def test_organisationalDomain(self) -> None:
        """Relaxed alignment by the Public Suffix List: co.uk is a suffix, not an organisation."""
        record = Record("example.co.uk", Policy.REJECT)
        self.assertEqual(
            self.evaluate(dkimPass("mail.example.co.uk"), record, "example.co.uk").result, "pass"
        )
        self.assertEqual(
            self.evaluate(dkimPass("other.co.uk"), record, "example.co.uk").result, "fail"
        )

    def test_spfAligned(self) -> None:
        """An SPF pass of the MAIL FROM domain aligns like DKIM's (aspf)."""
        spf = {"spf": {"result": "pass", "identity": "mailfrom", "domain": "bounce.example.org"}}
        self.assertEqual(self.evaluate(spf).result, "pass")
        strict = Record("example.org", Policy.REJECT, aspf="s")
        self.assertEqual(self.evaluate(spf, strict).result, "fail")
        softfail = {"spf": {"result": "softfail", "domain": "example.org"}}
        self.assertEqual(self.evaluate(softfail).result, "fail")

    def test_subdomainPolicy(self) -> None:
        """A subdomain under the organisational domain's record gets sp (or p without one)."""
        record = Record("example.org", Policy.REJECT, sp=Policy.QUARANTINE)
        e = self.evaluate({}, record, "news.example.org")
        self.assertEqual((e.policy, e.disposition), (Policy.QUARANTINE, Policy.QUARANTINE))
        e = self.evaluate({}, Record("example.org", Policy.REJECT), "news.example.org")
        self.assertEqual(e.disposition, Policy.REJECT)

    def test_pct(self) -> None:
        """pct samples: outside the sample, the next policy down (6.6.4)."""
        record = Record("example.org", Policy.REJECT, pct=30)
        self.assertEqual(self.evaluate({}, record, random=lambda: 0.29).disposition, Policy.REJECT)
        self.assertEqual(
            self.evaluate({}, record, random=lambda: 0.30).disposition, Policy.QUARANTINE
        )
        record = Record("example.org", Policy.QUARANTINE, pct=0)
        self.assertEqual(self.evaluate({}, record, random=lambda: 0.0).disposition, Policy.NONE)

    def test_overrides(self) -> None:
        """Allow-listed domains and a passing ARC chain from a trusted sealer are accepted, marked."""
        e = self.evaluate({}, allow=Patterns(("example.org",)))
        self.assertEqual(
            (e.result, e.disposition, e.override), ("fail", Policy.NONE, "local_policy")
        )
        arc = {"arc": {"result": "pass", "sealers": ("list.example", "other.example")}}
        e = self.evaluate(arc, sealers=Patterns(("list.example",)))
        self.assertEqual(
            e.methodResult(),
            "dmarc=fail (p=reject dis=none override=trusted_forwarder) header.from=example.org"
            " policy.arc-override=list.example",
        )
        # Only the newest sealer counts; and only a passing chain.
        self.assertEqual(
            self.evaluate(arc, sealers=Patterns(("other.example",))).disposition, Policy.REJECT
        )
        failed = {"arc": {"result": "fail", "sealers": ("list.example",)}}
        self.assertEqual(
            self.evaluate(failed, sealers=Patterns(("list.example",))).disposition, Policy.REJECT
        )


class FilterTests(TestCase):
    """The filter with its records served over DNS; the spf and dkim results as noted."""

    RECORDS: ClassVar[dict[str, list[Any]]] = {
        "_dmarc.example.org": [txt("v=DMARC1; p=reject; sp=quarantine")],
        "_dmarc.quarantine.example": [txt("v=DMARC1; p=quarantine")],
        "_dmarc.none.example": [txt("v=DMARC1; p=none")],
        "_dmarc.two.example": [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")],
        "_dmarc.other.example": [txt("v=spf1 -all")],
    }

    def setUp(self) -> None:
        self.server = DNSServer(self.RECORDS)
        self.server.start(self)

    def build(self, **options: object) -> IFilter:
        options.setdefault("resolver", self.server.resolver)
        return DMARCFilterFactory().build({"dns_timeout": 0.5, **options}, reactor)

    async def check(
        self,
        f: IFilter,
        sender: str,
        notes: dict[str, Any] | None = None,
        fromLine: str | None = None,
    ) -> tuple[Any, Envelope]:
        envelope = Envelope("a@example.org", notes=dict(notes or {}))
        header = fromLine if fromLine is not None else f"From: <{sender}>\r\n"
        message = spooled(self, header.encode() + b"Subject: x\r\n\r\nbody\r\n")
        verdict = await f.checkMessage(Session("s1", "127.0.0.1", 1), envelope, message)
        return verdict, envelope

    async def test_reject(self) -> None:
        """p=reject and no aligned pass: 550 5.7.1 naming the domain; AR noted."""
        verdict, envelope = await self.check(
            self.build(), "alice@example.org", dkimPass("other.example")
        )
        self.assertEqual(
            (verdict.action, verdict.code, verdict.enhanced), (Action.REJECT, 550, "5.7.1")
        )
        self.assertIn("DMARC policy of example.org", verdict.text)
        self.assertEqual(
            envelope.notes["authentication-results"],
            ["dmarc=fail (p=reject dis=reject) header.from=example.org"],
        )

    async def test_pass(self) -> None:
        verdict, envelope = await self.check(
            self.build(), "alice@example.org", dkimPass("example.org")
        )
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(
            envelope.notes["authentication-results"],
            ["dmarc=pass (p=reject) header.from=example.org"],
        )

    async def test_organisationalRecord(self) -> None:
        """A subdomain with no record of its own: the organisational domain's, sp applied."""
        verdict, _ = await self.check(self.build(), "a@news.example.org")
        self.assertEqual(verdict.action, Action.ACCEPT)  # quarantine: tagged by default
        [edit] = verdict.edits
        self.assertEqual((edit.kind, edit.name), (EditKind.ADD, "X-DMARC"))
        self.assertEqual(edit.value, "fail policy=quarantine header.from=news.example.org")
        self.assertEqual(
            self.server.queries, [("_dmarc.news.example.org", "TXT"), ("_dmarc.example.org", "TXT")]
        )

    async def test_actions(self) -> None:
        """Each policy's action is configurable: quarantine refuses (for the quarantine), accept only notes."""
        f = self.build(
            reject_action="tag", quarantine_action="quarantine", tag_header="X-Spam-DMARC"
        )
        verdict, _ = await self.check(f, "a@quarantine.example")
        self.assertEqual((verdict.action, verdict.code), (Action.REJECT, 550))
        self.assertTrue(verdict.text.startswith("Message quarantined: "))
        verdict, _ = await self.check(f, "a@example.org")
        self.assertEqual(verdict.edits[0].name, "X-Spam-DMARC")
        verdict, envelope = await self.check(self.build(reject_action="accept"), "a@example.org")
        self.assertEqual((verdict.action, verdict.edits), (Action.ACCEPT, ()))
        self.assertIn("dis=reject", envelope.notes["authentication-results"][0])

    async def test_noneAndNoRecord(self) -> None:
        """p=none, no record, several records, a non-DMARC TXT: accepted."""
        for sender, result in [
            ("a@none.example", "dmarc=fail (p=none dis=none) header.from=none.example"),
            ("a@nowhere.example", "dmarc=none header.from=nowhere.example"),
            ("a@two.example", "dmarc=none header.from=two.example"),
            ("a@other.example", "dmarc=none header.from=other.example"),
        ]:
            verdict, envelope = await self.check(self.build(), sender)
            self.assertEqual((verdict.action, verdict.edits), (Action.ACCEPT, ()), sender)
            self.assertEqual(envelope.notes["authentication-results"], [result])

    async def test_temperror(self) -> None:
        """
        SERVFAIL for the policy record, or an aligned DKIM key that could not be fetched:
        dmarc=temperror, 451 4.7.1 (the sender retries), or accepted with
        temperror_action = "accept".
        """
        unknownKey = {"dkim": [{"result": "temperror", "domain": "example.org"}]}
        for sender, notes in [("a@temp.example.org", {}), ("a@example.org", unknownKey)]:
            self.server.servfail.add("_dmarc.temp.example.org")
            verdict, envelope = await self.check(self.build(), sender, notes)
            self.assertEqual((verdict.code, verdict.enhanced), (451, "4.7.1"), sender)
            self.assertTrue(
                envelope.notes["authentication-results"][0].startswith("dmarc=temperror")
            )
            verdict, _ = await self.check(self.build(temperror_action="accept"), sender, notes)
            self.assertEqual(verdict.action, Action.ACCEPT)
        # A failed aligned signature is no excuse: that is a fail.
        failed = {"dkim": [{"result": "fail", "domain": "example.org"}]}
        verdict, _ = await self.check(self.build(), "a@example.org", failed)
        self.assertEqual(verdict.code, 550)

    async def test_severalAuthors(self) -> None:
        """One From: with several domains: each evaluated, the strictest failing policy applies."""
        verdict, envelope = await self.check(
            self.build(),
            "",
            dkimPass("quarantine.example"),
            "From: a@quarantine.example, b@example.org\r\n",
        )
        self.assertEqual(verdict.code, 550)
        self.assertEqual(len(envelope.notes["authentication-results"]), 2)

    async def test_badFrom(self) -> None:
        """No From:, two From: fields, or no address: refused (6.6.1), or with bad_from = "accept" noted."""
        for fromLine in [
            "",
            "From: a@example.org\r\nFrom: b@example.org\r\n",
            "From: undisclosed\r\n",
        ]:
            verdict, envelope = await self.check(self.build(), "", fromLine=fromLine)
            self.assertEqual((verdict.code, verdict.enhanced), (550, "5.7.1"), fromLine)
            self.assertIn("exactly one From: field", verdict.text)
            verdict, envelope = await self.check(
                self.build(bad_from="accept"), "", fromLine=fromLine
            )
            self.assertEqual(verdict.action, Action.ACCEPT)
            self.assertTrue(
                envelope.notes["authentication-results"][0].startswith("dmarc=permerror")
            )

    def test_options(self) -> None:
        for key, value in [
            ("reject_action", "drop"),
            ("bad_from", "tag"),
            ("tag_header", "X Bad"),
            ("nope", 1),
        ]:
            e = self.assertRaises(OptionError, DMARCFilterFactory().build, {key: value}, reactor)
            self.assertEqual(e.key, key)


class OrderTests(SynchronousTestCase):
    """dmarc reads spf's and dkim's results: a configuration must put them first."""

    def build(self, *names: str) -> Any:
        options: dict[str, dict[str, object]] = {
            "spf": {"resolver": "127.0.0.1:53"},
            "dkim": {},
            "dmarc": {},
        }
        config = Config(
            path="t.toml",
            listen=("tcp:25",),
            upstream="tcp:host=127.0.0.1:port=10025",
            hostname="mx.example",
            spoolDir="/tmp",
            filters=tuple(FilterSpec(n, options=options[n]) for n in names),
        )
        return buildPipeline(config, ThreadedClock(), None, filterFactories())

    def test_order(self) -> None:
        """spf, dkim, dmarc builds; dmarc before dkim, or without spf, is refused by name."""
        self.build("spf", "dkim", "dmarc")
        e = self.assertRaises(ConfigError, self.build, "spf", "dmarc", "dkim")
        self.assertEqual(e.key, "filters.dmarc")
        self.assertIn("put a [filters.dkim] section before it", e.message)
        e = self.assertRaises(ConfigError, self.build, "dkim", "dmarc")
        self.assertIn("[filters.spf]", e.message)


class LoopbackTests(ProxyTestCase):
    """spf, dkim, dmarc and headers through the proxy over real sockets, DNS served in-process."""

    def proxy(self, server: DNSServer, dmarc: str = "") -> int:
        common = f'resolver = "{server.resolver}"\ndns_timeout = 0.5\n'
        return self.startProxy(
            "[filters.spf]\n" + common + 'receiver = "proxy.test"\n'
            "[filters.dkim]\n"
            + common
            + "[filters.dmarc]\n"
            + common
            + 'trusted_sealers = ["forwarder.example"]\n'
            + dmarc
            + '[filters.headers]\nauthserv_id = "proxy.test"\n'
        )

    def records(self) -> DNSServer:
        server = DNSServer(
            {
                "example.org": [txt("v=spf1 ?all")],
                "_dmarc.example.org": [txt("v=DMARC1; p=reject")],
                **keyRecords(
                    **{
                        "sel._domainkey.other.example": rsaKey()[1],
                        "arc._domainkey.forwarder.example": rsaKey()[1],
                    }
                ),
            }
        )
        server.start(self)
        return server

    async def test_rejected(self) -> None:
        """p=reject, signed only by an unaligned domain: the client sees 550 5.7.1; nothing relayed."""
        port = self.proxy(self.records())
        client = await self.sendMessage(port, sign(MESSAGE, domain="other.example"))
        final = self.lines(client.replies)[-1]
        self.assertTrue(
            final.startswith("550 5.7.1 Message refused: DMARC policy of example.org"), final
        )
        self.assertEqual(self.mta.messages, [])

    async def test_trustedSealer(self) -> None:
        """The same message with a valid ARC chain from a trusted sealer is relayed, marked."""
        port = self.proxy(self.records())
        sealed = arcSeal(sign(MESSAGE, domain="other.example"), "forwarder.example")
        client = await self.sendMessage(port, sealed)
        final = self.lines(client.replies)[-1]
        self.assertTrue(final.startswith("250"), final)
        [message] = self.mta.messages
        header = re.sub(
            r"\r\n[ \t]+", " ", message.content[: message.content.index(b"\r\n\r\n")].decode()
        )
        [ar] = [
            line
            for line in header.split("\r\n")
            if line.startswith("Authentication-Results: proxy.test")
        ]
        self.assertIn("dkim=pass header.d=other.example", ar)
        self.assertIn("arc=pass", ar)
        self.assertIn(
            "dmarc=fail (p=reject dis=none override=trusted_forwarder) header.from=example.org"
            " policy.arc-override=forwarder.example",
            ar,
        )

    async def test_tagged(self) -> None:
        """
        With reject_action = "tag", the message that p=reject would refuse is relayed with
        the tag header on top and its body as sent.
        """
        port = self.proxy(self.records(), 'reject_action = "tag"\n')
        client = await self.sendMessage(port, sign(MESSAGE, domain="other.example"))
        final = self.lines(client.replies)[-1]
        self.assertTrue(final.startswith("250"), final)
        [message] = self.mta.messages
        head, _, body = message.content.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nX-DMARC: ", b"\r\n" + head)
        self.assertEqual(body, MESSAGE.partition(b"\r\n\r\n")[2])


class SampleTests(SynchronousTestCase):
    """conf/mailproxy.toml's commented dkim and dmarc sections build as they are written."""

    def test_sampleSections(self) -> None:
        """Uncommented, each section's keys are all known to its filter and valid."""
        from mailproxy.filters.dkim import DKIMFilterFactory

        text = (Path(__file__).parent.parent / "conf" / "mailproxy.toml").read_text()
        for name, factory in [("dkim", DKIMFilterFactory()), ("dmarc", DMARCFilterFactory())]:
            block = text.split(f"# [filters.{name}]\n")[1].split("\n\n")[0]
            lines = [line[2:] for line in block.splitlines() if re.match(r"# [a-z_]+ = ", line)]
            options = tomllib.loads("\n".join(lines))
            self.assertGreaterEqual(len(options), 8, name)
            factory.build(options, ThreadedClock())
