"""
The DNS list filters: dnsbl (the client's address) and surbl (the links in a message);
their shared plumbing in L{mailproxy.dns}; and both over loopback against an in-process
DNS server.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import quopri
from collections.abc import Sequence
from typing import Any, ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns as names
from twisted.names import error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.dns import (
    MAX_TTL,
    NEGATIVE_TTL,
    Codes,
    ListLookup,
    Zone,
    parseServer,
    readZones,
    reversedName,
)
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, FilterError, IFilter, OptionError, Stage
from mailproxy.filters.dnsbl import DNSBLFilter, DNSBLFilterFactory
from mailproxy.filters.options import Options
from mailproxy.filters.support import Patterns
from mailproxy.filters.surbl import (
    LinkFinder,
    SURBLFilter,
    SURBLFilterFactory,
    hostKey,
    registrableDomain,
    scanMessage,
)
from tests.dnsserver import DNSServer, a
from tests.fakes import ProxyTestCase


class FakeResolver:
    """
    An C{IResolver} for A lookups: C{records[name]} is a list of addresses (with
    C{ttl}), an exception to fail with, or missing (NXDOMAIN). With C{hold}, lookups
    wait until L{release}.
    """

    def __init__(self, records: dict[str, Any] | None = None, ttl: int = 300) -> None:
        self.records = records or {}
        self.ttl = ttl
        self.asked: list[str] = []
        self.hold = False
        self.held: list[tuple[str, defer.Deferred[Any]]] = []

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        self.asked.append(name)
        d: defer.Deferred[Any] = defer.Deferred()
        if self.hold:
            self.held.append((name, d))
        else:
            self._answer(name, d)
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for name, d in held:
            self._answer(name, d)

    def _answer(self, name: str, d: defer.Deferred[Any]) -> None:
        found = self.records.get(name)
        if found is None:
            d.errback(error.DNSNameError(names.Message()))
        elif isinstance(found, Exception):
            d.errback(found)
        else:
            d.callback(
                (
                    [
                        names.RRHeader(name, names.A, ttl=self.ttl, payload=names.Record_A(x))
                        for x in found
                    ],
                    [],
                    [],
                )
            )


def lookupOver(resolver: FakeResolver, clock: Clock | None = None, size: int = 100) -> ListLookup:
    return ListLookup(resolver, clock or Clock(), 5.0, size)


class NamesTests(SynchronousTestCase):
    def test_reversedIPv4(self) -> None:
        """IPv4 addresses are queried as reversed octets (RFC 5782 §2.1)."""
        self.assertEqual(reversedName(ipaddress.ip_address("192.0.2.99")), "99.2.0.192")
        self.assertEqual(reversedName(ipaddress.ip_address("127.0.0.1")), "1.0.0.127")

    def test_reversedIPv6(self) -> None:
        """IPv6 addresses are queried as 32 reversed nibbles (RFC 5782 §2.4's example)."""
        self.assertEqual(
            reversedName(ipaddress.ip_address("2001:db8:1:2:3:4:567:89ab")),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2",
        )
        self.assertEqual(reversedName(ipaddress.ip_address("::1")), "1" + ".0" * 31)

    def test_parseServer(self) -> None:
        """Resolver addresses: host:port, IPv6 in brackets, port 53 by default."""
        self.assertEqual(parseServer("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parseServer("127.0.0.1"), ("127.0.0.1", 53))
        self.assertEqual(parseServer("[::1]:5353"), ("::1", 5353))
        self.assertEqual(parseServer("::1"), ("::1", 53))
        for bad in ("localhost:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x", "1.2.3:53"):
            self.assertRaises(ValueError, parseServer, bad)

    def test_codes(self) -> None:
        """Return codes: single addresses, ranges and networks; others do not count."""
        codes = Codes.parse(["127.0.0.2-127.0.0.11", "127.0.1.0/24", "127.0.0.99"])
        self.assertEqual(
            codes.matching(
                ["127.0.0.1", "127.0.0.2", "127.0.0.11", "127.0.0.12", "127.0.1.7", "127.0.0.99"]
            ),
            ("127.0.0.2", "127.0.0.11", "127.0.1.7", "127.0.0.99"),
        )
        default = Codes.parse(Codes.DEFAULT)
        self.assertEqual(
            default.matching(["127.0.0.1", "127.0.0.2", "127.255.255.254", "10.0.0.1"]),
            ("127.0.0.2",),
        )
        for bad in (["127.0.0.300"], ["127.0.0.9-127.0.0.2"], ["::1"]):
            self.assertRaises(ValueError, Codes.parse, bad)

    def test_zonesOption(self) -> None:
        """Errors inside a zone table name the table and the key: zones[1].weight."""
        zones = readZones(Options({"zones": ({"zone": "Zen.Example.", "weight": 2},)}), "zones")
        self.assertEqual([(z.zone, z.weight) for z in zones], [("zen.example", 2.0)])
        for table, key in [
            ({"zone": "a.example", "weight": "x"}, "zones[1].weight"),
            ({"zone": "nodots"}, "zones[1].zone"),
            ({"zone": "a.example", "codes": ["x"]}, "zones[1].codes"),
            ({"zone": "a.example", "wieght": 1}, "zones[1].wieght"),
            ({}, "zones[1].zone"),
        ]:
            options = Options({"zones": ({"zone": "ok.example"}, table)})
            e = self.assertRaises(OptionError, readZones, options, "zones")
            self.assertEqual(e.key, key)


class ListLookupTests(SynchronousTestCase):
    """Cached, concurrent lookups (a fake resolver, a fake clock)."""

    def test_cachedForTTL(self) -> None:
        """An answer is served from the cache until its TTL ends, then asked again."""
        clock = Clock()
        resolver = FakeResolver({"x.zone": ["127.0.0.2"]}, ttl=60)
        lookup = lookupOver(resolver, clock)
        self.assertEqual(self.successResultOf(lookup.lookup("x.zone")), ("127.0.0.2",))
        clock.advance(59)
        self.assertEqual(self.successResultOf(lookup.lookup("X.Zone")), ("127.0.0.2",))
        self.assertEqual(resolver.asked, ["x.zone"])
        clock.advance(1)
        self.successResultOf(lookup.lookup("x.zone"))
        self.assertEqual(resolver.asked, ["x.zone", "x.zone"])

    def test_ttlCapped(self) -> None:
        """A TTL longer than MAX_TTL is cut to it."""
        clock = Clock()
        resolver = FakeResolver({"x.zone": ["127.0.0.2"]}, ttl=10 * MAX_TTL)
        lookup = lookupOver(resolver, clock)
        self.successResultOf(lookup.lookup("x.zone"))
        clock.advance(MAX_TTL)
        self.successResultOf(lookup.lookup("x.zone"))
        self.assertEqual(len(resolver.asked), 2)

    def test_negativeCached(self) -> None:
        """NXDOMAIN is "not listed" and is cached (NEGATIVE_TTL when no SOA came with it)."""
        clock = Clock()
        resolver = FakeResolver()
        lookup = lookupOver(resolver, clock)
        self.assertEqual(self.successResultOf(lookup.lookup("nx.zone")), ())
        clock.advance(NEGATIVE_TTL - 1)
        self.successResultOf(lookup.lookup("nx.zone"))
        self.assertEqual(len(resolver.asked), 1)

    def test_negativeTTLFromSOA(self) -> None:
        """With an SOA in the answer, its MINIMUM (if lower than its TTL) is the negative TTL."""
        clock = Clock()
        message = names.Message()
        message.authority = [
            names.RRHeader(b"zone", names.SOA, ttl=600, payload=names.Record_SOA(minimum=5))
        ]
        resolver = FakeResolver({"nx.zone": error.DNSNameError(message)})
        lookup = lookupOver(resolver, clock)
        self.assertEqual(self.successResultOf(lookup.lookup("nx.zone")), ())
        clock.advance(5)
        self.successResultOf(lookup.lookup("nx.zone"))
        self.assertEqual(len(resolver.asked), 2)

    def test_errors(self) -> None:
        """A timeout, a SERVFAIL or a socket error is a FilterError naming the name; none is cached."""
        for exception in (
            defer.TimeoutError("t"),
            error.DNSServerError(names.Message()),
            OSError("no sockets"),
        ):
            resolver = FakeResolver({"x.zone": exception})
            lookup = lookupOver(resolver)
            failure = self.failureResultOf(lookup.lookup("x.zone"), FilterError)
            self.assertIn("x.zone", failure.getErrorMessage())
            self.assertEqual(lookup.cached, 0)

    def test_inFlightShared(self) -> None:
        """Concurrent lookups of one name send one query; cancelling one waiter spares the rest."""
        resolver = FakeResolver({"x.zone": ["127.0.0.2"]})
        resolver.hold = True
        lookup = lookupOver(resolver)
        first, second = lookup.lookup("x.zone"), lookup.lookup("x.zone")
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        resolver.release()
        self.assertEqual(self.successResultOf(second), ("127.0.0.2",))
        self.assertEqual(resolver.asked, ["x.zone"])

    def test_bounded(self) -> None:
        """The cache never holds more than its size."""
        resolver = FakeResolver({f"{n}.zone": ["127.0.0.2"] for n in range(100)})
        lookup = lookupOver(resolver, size=10)
        for n in range(100):
            self.successResultOf(lookup.lookup(f"{n}.zone"))
            self.assertLessEqual(lookup.cached, 10)
        self.successResultOf(lookup.lookup("99.zone"))
        self.assertEqual(len(resolver.asked), 100)  # the newest is still cached


def dnsbl(
    records: dict[str, Any], zones: Sequence[Zone] = (Zone("bl.test"),), **kw: Any
) -> tuple[DNSBLFilter, FakeResolver]:
    resolver = FakeResolver(records)
    return DNSBLFilter(lookup=lookupOver(resolver), zones=tuple(zones), **kw), resolver


class DNSBLTests(SynchronousTestCase):
    """The dnsbl filter's decisions (a fake resolver)."""

    def connect(self, f: DNSBLFilter, client: str = "192.0.2.1") -> tuple[Any, Session]:
        session = Session("S", client, 1)
        d = defer.maybeDeferred(f.checkConnect, session)
        return d, session

    def test_interface(self) -> None:
        """The filter provides IFilter and checks at connect by default."""
        f, _ = dnsbl({})
        self.assertTrue(verifyObject(IFilter, f))
        self.assertEqual(f.stages, frozenset({Stage.CONNECT}))

    def test_listed(self) -> None:
        """A listed client is refused with 554 5.7.1 naming the list; the hit is noted."""
        f, resolver = dnsbl({"1.2.0.192.bl.test": ["127.0.0.2"]})
        d, session = self.connect(f)
        verdict = self.successResultOf(d)
        self.assertEqual(
            (verdict.code, verdict.enhanced, verdict.text),
            (554, "5.7.1", "Service unavailable; client [192.0.2.1] blocked using bl.test"),
        )
        self.assertEqual(session.notes["dnsbl"]["listed"], {"bl.test": ["127.0.0.2"]})
        self.assertEqual(resolver.asked, ["1.2.0.192.bl.test"])

    def test_ipv6(self) -> None:
        """An IPv6 client is asked about by nibbles; an IPv4-mapped one by its IPv4 octets."""
        f, resolver = dnsbl({})
        self.successResultOf(self.connect(f, "::1")[0])
        self.successResultOf(self.connect(f, "::ffff:192.0.2.1")[0])
        self.assertEqual(resolver.asked, ["1" + ".0" * 31 + ".bl.test", "1.2.0.192.bl.test"])

    def test_codes(self) -> None:
        """A return code outside the zone's codes is not a listing."""
        zone = Zone("bl.test", codes=Codes.parse(["127.0.0.2-127.0.0.11"]))
        f, _ = dnsbl({"1.2.0.192.bl.test": ["127.0.0.20"]}, [zone])
        self.assertEqual(self.successResultOf(self.connect(f)[0]).action, Action.ACCEPT)

    def test_weights(self) -> None:
        """Weights add up: one half-weight listing passes, two reach the threshold."""
        zones = [Zone("a.test", 0.5), Zone("b.test", 0.5)]
        f, _ = dnsbl({"1.2.0.192.a.test": ["127.0.0.2"]}, zones)
        self.assertEqual(self.successResultOf(self.connect(f)[0]).action, Action.ACCEPT)
        f, _ = dnsbl({"1.2.0.192.a.test": ["127.0.0.2"], "1.2.0.192.b.test": ["127.0.0.3"]}, zones)
        verdict = self.successResultOf(self.connect(f)[0])
        self.assertEqual(
            verdict.text, "Service unavailable; client [192.0.2.1] blocked using a.test, b.test"
        )

    def test_allowed(self) -> None:
        """A listing in an allow zone allows the session, even if a blocklist lists it too."""
        f, _ = dnsbl(
            {"1.2.0.192.wl.test": ["127.0.10.1"], "1.2.0.192.bl.test": ["127.0.0.2"]},
            allowZones=(Zone("wl.test"),),
        )
        self.assertEqual(self.successResultOf(self.connect(f)[0]).action, Action.ALLOW)

    def test_errors(self) -> None:
        """
        A list that does not answer is an error only when it could change the verdict:
        the listing weight already reached refuses; one that could not reach it accepts.
        """
        timeout = defer.TimeoutError()
        zones = [Zone("a.test", 1.0), Zone("b.test", 0.4)]
        f, _ = dnsbl({"1.2.0.192.a.test": ["127.0.0.2"], "1.2.0.192.b.test": timeout}, zones)
        self.assertEqual(self.successResultOf(self.connect(f)[0]).code, 554)
        f, _ = dnsbl({"1.2.0.192.a.test": timeout}, zones)
        self.failureResultOf(self.connect(f)[0], FilterError)
        f, _ = dnsbl({"1.2.0.192.b.test": timeout}, zones)
        self.assertEqual(self.successResultOf(self.connect(f)[0]).action, Action.ACCEPT)
        # An allow list that fails could have allowed a listed client: undecided.
        f, _ = dnsbl(
            {"1.2.0.192.a.test": ["127.0.0.2"], "1.2.0.192.wl.test": timeout},
            zones,
            allowZones=(Zone("wl.test"),),
        )
        self.failureResultOf(self.connect(f)[0], FilterError)

    def test_rcptStage(self) -> None:
        """At the RCPT stage a listed client is refused per recipient, but postmaster passes."""
        f, _ = dnsbl(
            {"1.2.0.192.bl.test": ["127.0.0.2"]},
            stage=Stage.RCPT,
            exemptRecipients=Patterns(("postmaster", "postmaster@*")),
        )
        self.assertEqual(f.stages, frozenset({Stage.RCPT}))
        session, envelope = Session("S", "192.0.2.1", 1), Envelope("a@b")
        refused = self.successResultOf(defer.maybeDeferred(f.checkRcpt, session, envelope, "u@x"))
        self.assertEqual(refused.code, 554)
        passed = self.successResultOf(
            defer.maybeDeferred(f.checkRcpt, session, envelope, "PostMaster@x")
        )
        self.assertEqual(passed.action, Action.ACCEPT)

    def test_factory(self) -> None:
        """The factory reads every option, and names the one at fault."""
        from twisted.internet import reactor

        built = DNSBLFilterFactory().build(
            {
                "zones": (
                    {"zone": "zen.example", "weight": 1.0, "codes": ["127.0.0.2-127.0.0.11"]},
                ),
                "allow_zones": ({"zone": "wl.example"},),
                "threshold": 2,
                "stage": "rcpt",
                "resolver": "[::1]:5353",
                "dns_timeout": 1,
                "cache_size": 10,
                "skip_networks": ["127.0.0.0/8"],
                "exempt_recipients": ["postmaster@*"],
            },
            reactor,
        )
        assert isinstance(built, DNSBLFilter)
        self.assertEqual((built.threshold, built.stage), (2.0, Stage.RCPT))
        for options, key in [
            ({}, "zones"),
            ({"zones": ({"zone": "a.example"},), "stage": "data"}, "stage"),
            ({"zones": ({"zone": "a.example"},), "threshold": 0}, "threshold"),
            ({"zones": ({"zone": "a.example"},), "resolver": "ns.example"}, "resolver"),
            ({"zones": "zen.example"}, "zones"),
        ]:
            e = self.assertRaises(OptionError, DNSBLFilterFactory().build, options, reactor)
            self.assertEqual(e.key, key)


class DomainTests(SynchronousTestCase):
    def test_registrableDomain(self) -> None:
        """
        The name under its public suffix (the ICANN section of the Public Suffix List:
        any suffix, not a hand-kept few); None for what cannot be one.
        """
        for host, expected in [
            ("www.example.com", "example.com"),
            ("a.b.c.Example.COM.", "example.com"),
            ("shop.example.co.uk", "example.co.uk"),
            ("example.co.uk", "example.co.uk"),
            ("x.y.example.com.au", "example.com.au"),
            ("co.uk", None),
            ("www.example.ac.at", "example.ac.at"),  # not in the old hand-kept list
            ("a.b.example.kawasaki.jp", "b.example.kawasaki.jp"),  # a wildcard rule
            ("x.blogspot.com", "blogspot.com"),  # a private-section suffix: not used
            ("localhost", None),
            ("example.123", None),
            ("a..example.com", None),
            ("-bad-.example.com", "example.com"),
            ("x.-bad-.com", None),
            ("bücher.xn--p1ai", None),
            ("xn--bcher-kva.xn--p1ai", "xn--bcher-kva.xn--p1ai"),
        ]:
            self.assertEqual(registrableDomain(host), expected, host)

    def test_hostKey(self) -> None:
        """IPv4 hosts stay addresses; IDN hosts become punycode; IPv6 literals are skipped."""
        self.assertEqual(hostKey(b"1.2.3.4"), "1.2.3.4")
        self.assertEqual(hostKey("www.bücher.de".encode()), "xn--bcher-kva.de")
        self.assertIsNone(hostKey(b"[::1]"))
        self.assertIsNone(hostKey(b"3232235777"))
        self.assertIsNone(hostKey(b"\xff\xfe.com"))


def mime(*parts: tuple[str, str, bytes]) -> bytes:
    """A multipart/mixed message of (content type, transfer encoding, encoded body) parts."""
    out = [
        b'Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="==b"\r\n\r\n'
    ]
    for ctype, cte, body in parts:
        out.append(
            f"--==b\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode()
            + body
            + b"\r\n"
        )
    out.append(b"--==b--\r\n")
    return b"".join(out)


def qp(text: bytes) -> bytes:
    return quopri.encodestring(text).replace(b"\n", b"\r\n")


def b64(text: bytes) -> bytes:
    return base64.encodebytes(text).replace(b"\n", b"\r\n")


HTML = (
    b'<html><body><a href="https://click.listed.example/track?id=1&amp;u=2">offer</a></body></html>'
)


class ScanTests(SynchronousTestCase):
    """Finding the link domains of a message, streamed."""

    def scan(self, message: bytes, maxKeys: int = 50, chunk: int = 65536) -> list[str]:
        return scanMessage(io.BytesIO(message), maxKeys, chunkSize=chunk)

    def test_plain(self) -> None:
        """A message with no MIME structure is text: its http, https and www. links count."""
        message = b"Subject: x\r\n\r\nsee http://a.example.org/x, https://b.example.net and www.c.example.com.\r\n"
        self.assertEqual(self.scan(message), ["example.org", "example.net", "example.com"])

    def test_encodings(self) -> None:
        """Quoted-printable and base64 text parts are decoded; non-text parts are not read."""
        message = mime(
            ("text/html", "quoted-printable", qp(b"x" * 70 + HTML)),
            ("text/html; charset=utf-8", "base64", b64(b"<a href='http://b64.example.net/'>")),
            ("image/png", "base64", b64(b"http://image.example.com/")),
            ("text/plain", "7bit", b"plain http://www.plain.example.org/"),
        )
        self.assertEqual(self.scan(message), ["listed.example", "example.net", "example.org"])

    def test_headersNotScanned(self) -> None:
        """Links in the header (a List-Unsubscribe, a Subject) are not the message's text."""
        message = b"Subject: http://subject.example.com\r\nX-Url: www.x.example.com\r\n\r\nbody\r\n"
        self.assertEqual(self.scan(message), [])

    def test_nestedMessage(self) -> None:
        """A forwarded message (message/rfc822) has its own header and text parts."""
        inner = (
            b"Subject: inner\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64(b"inner link http://inner.example.com/")
        )
        message = mime(
            ("message/rfc822", "7bit", inner), ("text/plain", "7bit", b"www.outer.example.org")
        )
        self.assertEqual(self.scan(message), ["example.com", "example.org"])

    def test_ipAddress(self) -> None:
        """A link to an IPv4 address is kept as the address (user info and port dropped)."""
        message = b"\r\nhttp://user:pw@192.0.2.7:8080/x http://[2001:db8::1]/\r\n"
        self.assertEqual(self.scan(message), ["192.0.2.7"])

    def test_maxKeys(self) -> None:
        """At most max_uris distinct domains are collected; the scan stops there."""
        message = b"\r\n" + b"".join(b"http://d%d.example%d.com/\r\n" % (n, n) for n in range(200))
        self.assertEqual(self.scan(message, 5), [f"example{n}.com" for n in range(5)])

    def test_chunking(self) -> None:
        """The result does not depend on how the file is read: every chunk size finds the same."""
        message = mime(
            ("text/html", "quoted-printable", qp(HTML * 3)),
            ("text/html", "base64", b64(HTML.replace(b"listed", b"other"))),
        )
        expected = self.scan(message)
        self.assertEqual(expected, ["listed.example", "other.example"])
        for size in (1, 2, 3, 5, 16, 77, 1000):
            self.assertEqual(self.scan(message, chunk=size), expected, size)

    def test_longLine(self) -> None:
        """A link far into a line longer than the line bound is still found."""
        message = b"\r\n" + b"x " * 100000 + b"http://far.example.com/ " + b"y" * 100000 + b"\r\n"
        self.assertEqual(self.scan(message), ["example.com"])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=3000), st.integers(1, 600), st.integers(1, 20))
    def test_robust(self, data: bytes, chunk: int, maxKeys: int) -> None:
        """Any bytes: the scanner never raises, returns at most maxKeys valid keys."""
        keys = self.scan(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + data, maxKeys, chunk
        )
        self.assertLessEqual(len(keys), maxKeys)
        for key in keys:
            self.assertTrue(key.isascii() and "." in key, key)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    "http://",
                    "www.",
                    "ab",
                    "c-d",
                    ".",
                    ".com",
                    ".co.uk",
                    "=",
                    " ",
                    "\r\n",
                    "1.2.3.4",
                    "/x",
                    "é",
                ]
            ),
            max_size=300,
        ),
        st.sampled_from(["7bit", "quoted-printable", "base64"]),
        st.integers(1, 300),
    )
    def test_chunkingInvariant(self, tokens: list[str], encoding: str, chunk: int) -> None:
        """For any text in any transfer encoding, reading in small chunks finds what one read finds."""
        text = "".join(tokens).encode()
        body = {"7bit": text, "quoted-printable": qp(text), "base64": b64(text)}[encoding]
        message = mime(("text/plain; charset=utf-8", encoding, body))
        self.assertEqual(self.scan(message, chunk=chunk), self.scan(message))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    "http://",
                    "https://",
                    "www.",
                    "a",
                    ".",
                    "-",
                    "=",
                    "\n",
                    " ",
                    '"',
                    "ex",
                    ".com",
                    "é",
                ]
            ),
            max_size=400,
        )
    )
    def test_finderTailBounded(self, pieces: list[str]) -> None:
        """Fed link-like fragments, the finder keeps a bounded tail and never raises."""
        finder = LinkFinder(50)
        for piece in pieces:
            finder.feed(piece.encode())
            self.assertLessEqual(len(finder._carry), 1024 + 1)
        finder.feed(b"", final=True)
        self.assertEqual(finder._carry, b"")


def synchronousScan(message: Message) -> defer.Deferred[list[str]]:
    with message.open() as f:
        return defer.succeed(scanMessage(f, 50))


class SURBLTests(SynchronousTestCase):
    """The surbl filter's decisions (a fake resolver, the scan run synchronously)."""

    def check(self, body: bytes, records: dict[str, Any]) -> tuple[Any, FakeResolver]:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        resolver = FakeResolver(records)
        f = SURBLFilter(
            lookup=lookupOver(resolver), zones=(Zone("uri.test"),), scan=synchronousScan
        )
        self.assertTrue(verifyObject(IFilter, f))
        d = f.checkMessage(Session("S", "192.0.2.1", 1), Envelope("a@b"), Message(path, len(body)))
        return d, resolver

    def test_listed(self) -> None:
        """A listed link domain refuses the message with 554 5.7.1 naming domain and list."""
        d, resolver = self.check(
            b"\r\nhttp://a.clean.example/ http://x.listed.example/\r\n",
            {"listed.example.uri.test": ["127.0.0.2"]},
        )
        verdict = self.successResultOf(d)
        self.assertEqual(
            (verdict.code, verdict.enhanced, verdict.text),
            (554, "5.7.1", "Message refused: URI listed.example blocked by uri.test"),
        )
        self.assertEqual(resolver.asked, ["clean.example.uri.test", "listed.example.uri.test"])

    def test_ipListed(self) -> None:
        """An IPv4 link is asked about by reversed octets."""
        d, _ = self.check(b"\r\nhttp://192.0.2.7/x\r\n", {"7.2.0.192.uri.test": ["127.0.0.2"]})
        self.assertEqual(
            self.successResultOf(d).text, "Message refused: URI 192.0.2.7 blocked by uri.test"
        )

    def test_clean(self) -> None:
        """No listed link: accepted, nothing added."""
        d, _ = self.check(b"\r\nhttp://clean.example/\r\n", {})
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.action, verdict.headers), (Action.ACCEPT, ()))

    def test_error(self) -> None:
        """A lookup that fails with no listing found is a FilterError (on_error applies)."""
        d, _ = self.check(
            b"\r\nhttp://clean.example/\r\n", {"clean.example.uri.test": defer.TimeoutError()}
        )
        self.failureResultOf(d, FilterError)

    def test_factory(self) -> None:
        """The factory requires zones and names a wrong option."""
        from twisted.internet import reactor

        built = SURBLFilterFactory().build(
            {
                "zones": ({"zone": "multi.surbl.example", "codes": ["127.0.0.2-127.0.0.254"]},),
                "max_uris": 10,
                "ignore_domains": ["example.org"],
            },
            reactor,
        )
        self.assertIsInstance(built, SURBLFilter)
        for options, key in [
            ({}, "zones"),
            ({"zones": ({"zone": "a.example"},), "max_uris": 0}, "max_uris"),
            ({"zones": ({"zone": "a.example", "weight": 1},)}, "zones[0].weight"),
        ]:
            e = self.assertRaises(OptionError, SURBLFilterFactory().build, options, reactor)
            self.assertEqual(e.key, key)


# -- over loopback ---------------------------------------------------------------------------


class DNSBLLoopbackTests(ProxyTestCase):
    """The proxy over real sockets, from a configuration file, asking an in-process DNS server."""

    def dnsbl(self, server: DNSServer, zones: str, extra: str = "", after: str = "") -> int:
        return self.startProxy(
            f'[filters.dnsbl]\nresolver = "{server.resolver}"\nzones = {zones}\n{extra}{after}'
        )

    async def test_listed(self) -> None:
        """A client listed with a code the zone counts gets 554 at connect and is closed."""
        server = DNSServer({"1.0.0.127.bl.test": [a("127.0.0.2")]})
        server.start(self)
        port = self.dnsbl(server, '[{ zone = "bl.test", codes = ["127.0.0.2-127.0.0.11"] }]')
        client = await self.connect(port)
        await client.lost
        self.assertEqual(
            self.lines(client.replies),
            ["554 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test"],
        )
        self.assertEqual(self.mta.transcripts, [])

    async def test_codeOutside(self) -> None:
        """A return code outside the zone's codes is no listing: the MTA's banner comes."""
        server = DNSServer({"1.0.0.127.bl.test": [a("127.0.0.20")]})
        server.start(self)
        port = self.dnsbl(server, '[{ zone = "bl.test", codes = ["127.0.0.2-127.0.0.11"] }]')
        client = await self.connect(port)
        self.assertEqual(client.codes, [220])
        self.assertEqual(server.queries, [("1.0.0.127.bl.test", "A")])

    async def test_threshold(self) -> None:
        """Two zones of weight 0.6 and threshold 1: one listing passes, two refuse."""
        server = DNSServer({"1.0.0.127.a.test": [a("127.0.0.2")]})
        server.start(self)
        zones = '[{ zone = "a.test", weight = 0.6 }, { zone = "b.test", weight = 0.6 }]'
        client = await self.connect(self.dnsbl(server, zones))
        self.assertEqual(client.codes, [220])
        server.add("1.0.0.127.b.test", a("127.0.0.4"))
        client = await self.connect(self.dnsbl(server, zones))  # a new proxy: a fresh cache
        await client.lost
        self.assertEqual(
            self.lines(client.replies),
            ["554 5.7.1 Service unavailable; client [127.0.0.1] blocked using a.test, b.test"],
        )

    async def test_allowSkipsLater(self) -> None:
        """A DNSWL listing allows the session: a later filter that would refuse the sender is skipped."""
        server = DNSServer({"1.0.0.127.wl.test": [a("127.0.10.1")]})
        server.start(self)
        port = self.dnsbl(
            server,
            '[{ zone = "bl.test" }]',
            'allow_zones = [{ zone = "wl.test" }]\n',
            '[filters.access]\ndeny_senders = ["*@refused.example"]\n',
        )
        client = await self.connect(port)
        replies = await self.send(
            client, b"EHLO c\r\nMAIL FROM:<x@refused.example>\r\nRCPT TO:<b@y>\r\nDATA\r\n", 5
        )
        self.assertEqual([r.code for r in replies], [220, 250, 250, 250, 354])

    async def test_cached(self) -> None:
        """A second connection from the same client is decided from the cache: one query in all."""
        server = DNSServer({"1.0.0.127.bl.test": [a("127.0.0.20")]})
        server.start(self)
        port = self.dnsbl(server, '[{ zone = "bl.test", codes = ["127.0.0.2"] }]')
        for _ in range(2):
            client = await self.connect(port)
            self.assertEqual(client.codes, [220])
        self.assertEqual(server.asked("1.0.0.127.bl.test"), 1)

    async def test_notAnswering(self) -> None:
        """
        A list server that never answers is a filter error: by default the client gets
        421 4.7.1 and is closed; with on_error = "accept" it goes on.
        """
        server = DNSServer({})
        server.silent = True
        server.start(self)
        port = self.dnsbl(server, '[{ zone = "bl.test" }]', "dns_timeout = 0.3\n")
        client = await self.connect(port)
        await client.lost
        self.assertEqual(client.codes, [421])
        self.assertTrue(client.replies[0].lines[0].startswith(b"4.7.1"))
        port = self.dnsbl(
            server, '[{ zone = "bl.test" }]', 'dns_timeout = 0.3\non_error = "accept"\n'
        )
        client = await self.connect(port)
        self.assertEqual(client.codes, [220])
        self.assertGreaterEqual(server.asked("1.0.0.127.bl.test"), 2)

    async def test_ipv6Resolver(self) -> None:
        """The lists' server can be reached over IPv6 ([::1]:PORT)."""
        server = DNSServer({"1.0.0.127.bl.test": [a("127.0.0.2")]}, interface="::1")
        server.start(self)
        self.assertTrue(server.resolver.startswith("[::1]:"))
        client = await self.connect(self.dnsbl(server, '[{ zone = "bl.test" }]'))
        await client.lost
        self.assertEqual(client.codes, [554])

    async def test_rcptStage(self) -> None:
        """With stage = "rcpt" a listed client is greeted, refused per recipient, but reaches postmaster."""
        server = DNSServer({"1.0.0.127.bl.test": [a("127.0.0.2")]})
        server.start(self)
        port = self.dnsbl(server, '[{ zone = "bl.test" }]', 'stage = "rcpt"\n')
        client = await self.connect(port)
        replies = await self.send(
            client,
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<user@y>\r\nRCPT TO:<postmaster@y>\r\nDATA\r\n",
            6,
        )
        self.assertEqual(
            self.lines(replies[3:5]),
            [
                "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test",
                "250 2.1.5 Ok",
            ],
        )
        self.assertEqual(replies[5].code, 354)


class SURBLLoopbackTests(ProxyTestCase):
    """surbl over real sockets: messages with listed links in each encoding are refused."""

    RECORDS: ClassVar[dict[str, list[Any]]] = {
        "listed.example.uri.test": [a("127.0.0.2")],
        "2.0.0.127.uri.test": [a("127.0.0.4")],
    }

    async def deliver(self, port: int, message: bytes) -> str:
        client = await self.connect(port)
        await self.send(
            client, b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n", 5
        )
        replies = await self.send(client, message + b".\r\n", 6)
        return self.lines(replies)[-1]

    async def test_refusedAndClean(self) -> None:
        """
        A listed domain in a plain, a quoted-printable HTML or a base64 HTML part, or a
        listed IP link, refuses the message with 554; a clean message reaches the MTA.
        """
        server = DNSServer(self.RECORDS)
        server.start(self)
        port = self.startProxy(
            f'[filters.surbl]\nresolver = "{server.resolver}"\nzones = [{{ zone = "uri.test" }}]\n'
        )
        refused = "554 5.7.1 Message refused: URI listed.example blocked by uri.test"
        for message in [
            b"Subject: plain\r\n\r\nGo to http://www.listed.example/now\r\n",
            mime(("text/html", "quoted-printable", qp(b"y" * 74 + HTML))),
            mime(("text/plain", "7bit", b"hello"), ("text/html", "base64", b64(HTML))),
        ]:
            self.assertEqual(await self.deliver(port, message), refused)
        self.assertEqual(
            await self.deliver(port, b"Subject: ip\r\n\r\nhttp://127.0.0.2/x\r\n"),
            "554 5.7.1 Message refused: URI 127.0.0.2 blocked by uri.test",
        )
        self.assertEqual(self.mta.messages, [])
        clean = mime(("text/html", "base64", b64(HTML.replace(b"listed", b"clean"))))
        self.assertTrue((await self.deliver(port, clean)).startswith("250 "))
        [message] = self.mta.messages
        self.assertEqual(message.content, clean)


class SampleConfigTests(SynchronousTestCase):
    def test_sampleSectionsBuild(self) -> None:
        """
        The commented dnsbl, spf and surbl sections of conf/mailproxy.toml, uncommented,
        are valid: each filter builds from them.
        """
        import os
        import re
        import tomllib

        from twisted.internet import reactor

        from mailproxy.filters.spf import SPFFilterFactory

        path = os.path.join(os.path.dirname(__file__), "..", "conf", "mailproxy.toml")
        with open(path) as f:
            sample = f.read()
        setting = re.compile(r"# ([a-z_]+ = .*|  \{.*\},?|\])$")
        factories = {
            "dnsbl": DNSBLFilterFactory(),
            "spf": SPFFilterFactory(),
            "surbl": SURBLFilterFactory(),
        }
        for name, factory in factories.items():
            section = sample.split(f"# [filters.{name}]\n", 1)[1].split("\n\n", 1)[0]
            lines = [m.group(1) for m in map(setting.match, section.splitlines()) if m]
            options = tomllib.loads("\n".join(lines))
            self.assertIn("resolver", options, name)
            factory.build(options, reactor)
