"""
The spf filter: pyspf's evaluation with a scripted DNS (unit), the policy per result,
and the proxy over loopback asking an in-process DNS server (integration).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import spf
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action as VerdictAction
from mailproxy.filters import IFilter, OptionError
from mailproxy.filters.spf import (
    Action,
    Answer,
    DnspythonLookup,
    Request,
    SPFFilter,
    SPFFilterFactory,
    _dispatch,
    _installDispatch,
    evaluate,
    receivedSPF,
)
from mailproxy.testing import unfolded
from tests.dnsserver import DNSServer, a, freePort, txt
from tests.fakes import ProxyTestCase


def scripted(records: Mapping[str, Sequence[str]], asked: list[str] | None = None) -> Any:
    """A pyspf DNS lookup answering TXT and A questions from C{records}, synchronously."""

    def lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> Any:
        if asked is not None:
            asked.append(f"{qtype} {name}")
        found = []
        for value in records.get(name.lower(), ()):
            isSPF = value.startswith("v=spf1")
            if qtype == "TXT" and isSPF:
                found.append(((name, "TXT"), [value.encode()]))
            elif qtype == "A" and not isSPF:
                found.append(((name, "A"), value))
        return found

    return lookup


def includes(count: int) -> dict[str, list[str]]:
    """many.example includes C{count} domains (each "-all"), then passes 127.0.0.1."""
    names = [f"i{n}.example" for n in range(count)]
    records = {n: ["v=spf1 -all"] for n in names}
    records["many.example"] = [
        "v=spf1 " + " ".join(f"include:{n}" for n in names) + " ip4:127.0.0.1 -all"
    ]
    return records


def request(sender: str = "a@example.org", helo: str = "client.example") -> Request:
    return Request("127.0.0.1", sender, helo, "proxy.test")


class EvaluateTests(SynchronousTestCase):
    """pyspf's evaluation (run synchronously here) with a scripted DNS."""

    def test_results(self) -> None:
        """Each record gives its RFC 7208 result for a client at 127.0.0.1."""
        for record, result in [
            ("v=spf1 ip4:127.0.0.1 -all", "pass"),
            ("v=spf1 -all", "fail"),
            ("v=spf1 ~all", "softfail"),
            ("v=spf1 ?all", "neutral"),
            ("v=spf1 ip4:127.0.0.1 moo -all", "permerror"),
        ]:
            answer = evaluate(request(), scripted({"example.org": [record]}), 5)
            self.assertEqual((answer.result, answer.domain), (result, "example.org"), record)
        answer = evaluate(request(), scripted({}), 5)
        self.assertEqual(answer.result, "none")

    def test_ipv6Client(self) -> None:
        """An IPv6 client is matched by ip6 mechanisms."""
        records = {"example.org": ["v=spf1 ip6:2001:db8::/32 -all"]}
        inside = Request("2001:db8::25", "a@example.org", "h.example", "proxy.test")
        outside = Request("2001:db9::25", "a@example.org", "h.example", "proxy.test")
        self.assertEqual(evaluate(inside, scripted(records), 5).result, "pass")
        self.assertEqual(evaluate(outside, scripted(records), 5).result, "fail")

    def test_tenLookupsPass(self) -> None:
        """Ten includes (RFC 7208 §4.6.4's limit) are evaluated: the sender passes."""
        answer = evaluate(request("a@many.example"), scripted(includes(10)), 5)
        self.assertEqual(answer.result, "pass")

    def test_elevenLookupsPermerror(self) -> None:
        """Eleven includes exceed the limit of ten DNS mechanisms: permerror."""
        asked: list[str] = []
        answer = evaluate(request("a@many.example"), scripted(includes(11), asked), 5)
        self.assertEqual(answer.result, "permerror")
        self.assertIn("Too many DNS lookups", answer.explanation)
        self.assertLessEqual(len(asked), 12)

    def test_voidLookups(self) -> None:
        """A third lookup that finds nothing exceeds the void-lookup limit (two): permerror."""
        record = "v=spf1 a:nx1.example a:nx2.example a:nx3.example ip4:127.0.0.1 -all"
        answer = evaluate(request(), scripted({"example.org": [record]}), 5)
        self.assertEqual(answer.result, "permerror")
        self.assertIn("Void lookup limit", answer.explanation)
        record = "v=spf1 a:nx1.example a:nx2.example ip4:127.0.0.1 -all"
        answer = evaluate(request(), scripted({"example.org": [record]}), 5)
        self.assertEqual(answer.result, "pass")

    def test_nullSenderChecksHelo(self) -> None:
        """For the null sender the HELO name is the identity checked (RFC 7208 §2.3)."""
        records = {"helo.example": ["v=spf1 ip4:127.0.0.1 -all"], "example.org": ["v=spf1 -all"]}
        answer = evaluate(request("", "helo.example"), scripted(records), 5)
        self.assertEqual(
            (answer.result, answer.identity, answer.domain), ("pass", "helo", "helo.example")
        )

    def test_noUsableDomain(self) -> None:
        """An address-literal HELO with the null sender, or a one-label domain: none, no DNS."""
        asked: list[str] = []
        for sender, helo in [("", "[127.0.0.1]"), ("", ""), ("a@localhost", "x.example")]:
            answer = evaluate(request(sender, helo), scripted({}, asked), 5)
            self.assertEqual(answer.result, "none", (sender, helo))
        self.assertEqual(asked, [])

    def test_dispatchPerThread(self) -> None:
        """
        Two threads checking at once each use their own lookup; a thread that set none
        gets pyspf's own function.
        """
        _installDispatch()
        self.assertIs(spf.DNSLookup, _dispatch)
        results: dict[str, str] = {}
        barrier = threading.Barrier(2, timeout=10)

        def run(tag: str, record: str) -> None:
            def lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> Any:
                barrier.wait()  # both threads are inside a check at the same time
                return [((name, "TXT"), [record.encode()])] if qtype == "TXT" else []

            results[tag] = evaluate(request(), lookup, 5).result

        threads = [
            threading.Thread(target=run, args=("p", "v=spf1 ip4:127.0.0.1 -all")),
            threading.Thread(target=run, args=("f", "v=spf1 -all")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        self.assertEqual(results, {"p": "pass", "f": "fail"})
        from mailproxy.filters import spf as ours

        self.assertIs(ours._pyspfLookup, spf.DNSLookup_dnspython)


class HeaderTests(SynchronousTestCase):
    def test_receivedSPF(self) -> None:
        """The Received-SPF value has RFC 7208 §9.1's form: result, comment, key-value pairs."""
        answer = Answer(
            "pass",
            "mailfrom",
            "example.org",
            "domain of example.org designates 127.0.0.1 as permitted sender",
            mechanism="ip4:127.0.0.1",
        )
        self.assertEqual(
            receivedSPF(request(), answer),
            "pass (proxy.test: domain of example.org designates 127.0.0.1 as permitted sender)"
            ' client-ip=127.0.0.1; envelope-from="a@example.org"; helo=client.example;'
            ' receiver=proxy.test; identity=mailfrom; mechanism="ip4:127.0.0.1";',
        )

    def test_heloIdentity(self) -> None:
        """With the HELO identity there is no envelope-from; a comment's parentheses are tamed."""
        answer = Answer("permerror", "helo", "h.example", "error (nested)", problem="moo")
        value = receivedSPF(request("", "h.example"), answer)
        self.assertEqual(
            value,
            "permerror (proxy.test: error [nested]) client-ip=127.0.0.1; helo=h.example;"
            " receiver=proxy.test; identity=helo; problem=moo;",
        )


def fixed(answer: Answer) -> Any:
    calls: list[Request] = []

    def check(r: Request) -> defer.Deferred[Answer]:
        calls.append(r)
        return defer.succeed(answer)

    check.calls = calls  # type: ignore[attr-defined]
    return check


def answer(result: str, explanation: str = "") -> Answer:
    return Answer(result, "mailfrom", "example.org", f"{result} comment", explanation)


class PolicyTests(SynchronousTestCase):
    """The filter's action per result, its notes and its header (pyspf replaced by a fake)."""

    def verdictFor(self, result: str, **kw: Any) -> tuple[Any, Envelope]:
        f = SPFFilter(
            check=fixed(answer(result, kw.pop("explanation", ""))), receiver="proxy.test", **kw
        )
        envelope = Envelope("a@example.org")
        session = Session("S", "127.0.0.1", 1, helo="client.example")
        return self.successResultOf(defer.maybeDeferred(f.checkMail, session, envelope)), envelope

    def test_interface(self) -> None:
        """The filter provides IFilter and checks at MAIL and at end of data."""
        f = SPFFilter(check=fixed(answer("pass")), receiver="x")
        self.assertTrue(verifyObject(IFilter, f))
        self.assertEqual({s.value for s in f.stages}, {"mail", "message"})

    def test_defaults(self) -> None:
        """
        By default fail is refused with 550 5.7.23, temperror with 451 4.7.24; pass,
        softfail, neutral, none and permerror are accepted.
        """
        replies = {}
        for result in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
            verdict, _ = self.verdictFor(result)
            replies[result] = (verdict.code, verdict.enhanced)
        self.assertEqual(
            replies,
            {
                "pass": (None, None),
                "fail": (550, "5.7.23"),
                "softfail": (None, None),
                "neutral": (None, None),
                "none": (None, None),
                "temperror": (451, "4.7.24"),
                "permerror": (None, None),
            },
        )

    def test_configured(self) -> None:
        """Configured actions: permerror refused (550 5.7.24), softfail tempfailed (451 4.7.23)."""
        actions = {"permerror": Action.REJECT, "softfail": Action.TEMPFAIL}
        verdict, _ = self.verdictFor("permerror", actions=actions, explanation="bad record")
        self.assertEqual((verdict.code, verdict.enhanced), (550, "5.7.24"))
        self.assertIn("bad record", verdict.text)
        verdict, _ = self.verdictFor("softfail", actions=actions)
        self.assertEqual((verdict.code, verdict.enhanced), (451, "4.7.23"))

    def test_failExplanation(self) -> None:
        """A domain's own explanation (exp=) is quoted in the refusal, made printable."""
        verdict, _ = self.verdictFor("fail", explanation="Go away\r\n\x00please")
        self.assertEqual(
            verdict.text,
            "SPF fail: example.org does not designate 127.0.0.1 as permitted sender"
            " (Go away please)",
        )

    def test_notesAndHeader(self) -> None:
        """
        The result is noted for Authentication-Results, and the message gets its
        Received-SPF header at end of data.
        """
        f = SPFFilter(check=fixed(answer("softfail")), receiver="proxy.test")
        envelope = Envelope("a@example.org")
        session = Session("S", "127.0.0.1", 1, helo="client.example")
        self.successResultOf(defer.maybeDeferred(f.checkMail, session, envelope))
        self.assertEqual(
            envelope.notes["authentication-results"], ["spf=softfail smtp.mailfrom=example.org"]
        )
        verdict = f.checkMessage(session, envelope, Message("/nonexistent", 0))
        [(name, value)] = verdict.headers
        self.assertEqual(name, "Received-SPF")
        self.assertTrue(
            value.startswith("softfail (proxy.test: softfail comment) client-ip=127.0.0.1;")
        )

    def test_skipNetworks(self) -> None:
        """A client in skip_networks is not checked: no DNS, no note, no header."""
        import ipaddress

        check = fixed(answer("fail"))
        f = SPFFilter(
            check=check, receiver="x", skipNetworks=(ipaddress.ip_network("127.0.0.0/8"),)
        )
        envelope = Envelope("a@example.org")
        session = Session("S", "127.0.0.9", 1)
        verdict = self.successResultOf(defer.maybeDeferred(f.checkMail, session, envelope))
        self.assertEqual(verdict.action, VerdictAction.ACCEPT)
        self.assertEqual(check.calls, [])
        self.assertEqual(envelope.notes, {})
        self.assertEqual(f.checkMessage(session, envelope, Message("/nonexistent", 0)).headers, ())

    def test_ipv4Mapped(self) -> None:
        """An IPv4-mapped IPv6 client is checked as its IPv4 address."""
        check = fixed(answer("pass"))
        f = SPFFilter(check=check, receiver="x")
        self.successResultOf(
            defer.maybeDeferred(
                f.checkMail, Session("S", "::ffff:127.0.0.1", 1), Envelope("a@b.example")
            )
        )
        self.assertEqual(check.calls[0].ip, "127.0.0.1")


class FactoryTests(SynchronousTestCase):
    def test_badOptions(self) -> None:
        """Each wrong option is refused naming its key."""
        from twisted.internet import reactor

        for options, key in [
            ({"resolver": "dns.example:53"}, "resolver"),
            ({"resolver": "127.0.0.1:99999"}, "resolver"),
            ({"fail": "bounce"}, "fail"),
            ({"lookup_time": "soon"}, "lookup_time"),
            ({"skip_networks": ["10.0.0.300/8"]}, "skip_networks"),
            ({"receiver": "two words"}, "receiver"),
            ({"reciever": "x"}, "reciever"),
        ]:
            error = self.assertRaises(OptionError, SPFFilterFactory().build, options, reactor)
            self.assertEqual(error.key, key, options)

    def test_defaults(self) -> None:
        """With no options the filter builds: resolver 127.0.0.1:53, default actions."""
        from twisted.internet import reactor

        f = SPFFilterFactory().build({"receiver": "mx.example"}, reactor)
        self.assertIsInstance(f, SPFFilter)


class DnspythonTests(TestCase):
    """pyspf's DNS through dnspython, against the in-process server, in a thread."""

    async def test_lookupTypes(self) -> None:
        """TXT and A answers come back in pyspf's shapes; NXDOMAIN is an empty list."""
        server = DNSServer({"example.org": [txt("v=spf1 -all"), a("127.0.0.5")]})
        server.start(self)
        lookup = DnspythonLookup(("127.0.0.1", server.port), 1.0)
        self.assertEqual(
            await deferToThread(lookup, "example.org", "TXT", True, 2.0),
            [(("example.org", "TXT"), (b"v=spf1 -all",))],
        )
        self.assertEqual(
            await deferToThread(lookup, "example.org", "A", True, 2.0),
            [(("example.org", "A"), "127.0.0.5")],
        )
        self.assertEqual(await deferToThread(lookup, "nx.example", "A", True, 2.0), [])

    async def test_ipv6Server(self) -> None:
        """The resolver may be an IPv6 address."""
        server = DNSServer({"example.org": [txt("v=spf1 -all")]}, interface="::1")
        server.start(self)
        lookup = DnspythonLookup(("::1", server.port), 1.0)
        self.assertEqual(
            await deferToThread(lookup, "example.org", "TXT", True, 2.0),
            [(("example.org", "TXT"), (b"v=spf1 -all",))],
        )

    async def test_servfailIsTempError(self) -> None:
        """A SERVFAIL is pyspf's TempError."""
        server = DNSServer({})
        server.servfail.add("broken.example")
        server.start(self)
        lookup = DnspythonLookup(("127.0.0.1", server.port), 1.0)
        d = deferToThread(lookup, "broken.example", "TXT", True, 2.0)
        with self.assertRaises(spf.TempError):
            await d


class SPFLoopbackTests(ProxyTestCase):
    """The proxy over real sockets, configured from a file, asking an in-process DNS server."""

    RECORDS: ClassVar[dict[str, list[Any]]] = {
        "pass.example": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "fail.example": [txt("v=spf1 ip4:192.0.2.1 -all")],
        "soft.example": [txt("v=spf1 ~all")],
        "helo.example": [txt("v=spf1 ip4:127.0.0.0/8 -all")],
        **{name: [txt(value) for value in values] for name, values in includes(11).items()},
    }

    def spfProxy(self, server: DNSServer, extra: str = "") -> int:
        return self.startProxy(
            "[filters.spf]\n"
            f'resolver = "{server.resolver}"\n'
            'receiver = "proxy.test"\n'
            "dns_timeout = 0.3\n"
            "lookup_time = 1\n" + extra
        )

    async def deliver(self, port: int, sender: str, helo: str = "client.example") -> list[str]:
        client = await self.connect(port)
        replies = await self.send(
            client,
            f"EHLO {helo}\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n".encode(),
            5,
        )
        if replies[-1].code == 354:
            replies = await self.send(client, b"Subject: t\r\n\r\nhi\r\n.\r\n", 6)
        return self.lines(replies[2:])

    async def test_pass(self) -> None:
        """
        A sender whose domain permits 127.0.0.1 is relayed, and the MTA receives the
        message with a Received-SPF: pass header on top.
        """
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server)
        self.assertEqual((await self.deliver(port, "a@pass.example"))[0], "250 2.1.0 Ok")
        [message] = self.mta.messages
        first = unfolded(message.content).split(b"\r\n")[0].decode()
        self.assertEqual(
            first,
            "Received-SPF: pass (proxy.test: domain of pass.example designates 127.0.0.1 as"
            ' permitted sender) client-ip=127.0.0.1; envelope-from="a@pass.example";'
            ' helo=client.example; receiver=proxy.test; identity=mailfrom; mechanism="ip4:127.0.0.1";',
        )
        self.assertEqual(server.queries, [("pass.example", "TXT")])

    async def test_fail(self) -> None:
        """A sender whose domain does not permit 127.0.0.1 gets 550 5.7.23 at MAIL."""
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server)
        lines = await self.deliver(port, "a@fail.example")
        self.assertEqual(
            lines[0],
            "550 5.7.23 SPF fail: fail.example does not designate 127.0.0.1 as permitted sender",
        )
        self.assertEqual(self.mta.messages, [])

    async def test_softfail(self) -> None:
        """softfail is accepted by default, with its header."""
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server)
        await self.deliver(port, "a@soft.example")
        [message] = self.mta.messages
        self.assertTrue(message.content.startswith(b"Received-SPF: softfail (proxy.test: "))

    async def test_nullSender(self) -> None:
        """MAIL FROM:<> checks the HELO name: passes, identity=helo in the header."""
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server)
        await self.deliver(port, "", helo="helo.example")
        [message] = self.mta.messages
        first = unfolded(message.content).split(b"\r\n")[0]
        self.assertTrue(first.startswith(b"Received-SPF: pass (proxy.test: domain of helo.example"))
        self.assertIn(b"identity=helo;", first)
        self.assertEqual(server.queries, [("helo.example", "TXT")])

    async def test_temperror(self) -> None:
        """With the DNS server down, MAIL gets 451 4.7.24 within lookup_time."""
        port = self.startProxy(
            "[filters.spf]\n"
            f'resolver = "127.0.0.1:{freePort()}"\n'
            "dns_timeout = 0.2\nlookup_time = 0.5\n"
        )
        lines = await self.deliver(port, "a@pass.example")
        self.assertEqual(
            lines[0], "451 4.7.24 SPF check of pass.example failed temporarily, try again later"
        )
        self.assertEqual(self.mta.messages, [])

    async def test_permerror(self) -> None:
        """
        A record needing eleven DNS lookups is a permerror: accepted by default with a
        permerror header; refused with 550 5.7.24 when permerror = "reject".
        """
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server)
        await self.deliver(port, "a@many.example")
        [message] = self.mta.messages
        first = unfolded(message.content).split(b"\r\n")[0]
        self.assertTrue(
            first.startswith(b"Received-SPF: permerror (proxy.test: permanent error"), first
        )
        self.assertLessEqual(len(server.queries), 12)
        port = self.spfProxy(server, 'permerror = "reject"\n')
        lines = await self.deliver(port, "a@many.example")
        self.assertTrue(
            lines[0].startswith("550 5.7.24 SPF record of many.example is in error: "), lines[0]
        )
        self.assertIn("Too many DNS lookups", lines[0])

    async def test_skipped(self) -> None:
        """A client in skip_networks is not checked: no DNS question, no header."""
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.spfProxy(server, 'skip_networks = ["127.0.0.0/8"]\n')
        await self.deliver(port, "a@fail.example")
        [message] = self.mta.messages
        self.assertEqual(message.content, b"Subject: t\r\n\r\nhi\r\n")
        self.assertEqual(server.queries, [])
