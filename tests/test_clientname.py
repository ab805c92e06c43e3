"""
Tests for L{mailproxy.clientname}: the client's name by PTR and forward confirmation, with
a fake resolver and a Clock, and once against a real C{twisted.names} server on loopback.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns as names
from twisted.names import error, resolve
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.clientname import (
    TEMPUNAVAIL,
    UNAVAILABLE,
    UNKNOWN,
    ClientName,
    ClientNames,
    systemResolver,
    validName,
)
from mailproxy.config import Config, Timeouts
from tests.dnsserver import DNSServer, a, aaaa

PTR4 = "5.2.0.192.in-addr.arpa"
PTR6 = ipaddress.ip_address("2001:db8::5").reverse_pointer
NAME = "mail.example.org"


def ptr(name: str) -> names.RRHeader:
    return names.RRHeader(name=b"x", type=names.PTR, payload=names.Record_PTR(name.encode()))


def rrA(address: str) -> names.RRHeader:
    return names.RRHeader(name=b"x", type=names.A, payload=names.Record_A(address))


def rrAAAA(address: str) -> names.RRHeader:
    return names.RRHeader(name=b"x", type=names.AAAA, payload=names.Record_AAAA(address))


class FakeResolver:
    """
    Answers C{answers[(method, name)]}: records (a list), an exception to fail with, or
    L{None} (never answers). Records every call with its timeouts.
    """

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, tuple[float, ...]]] = []
        self.pending: list[Deferred[Any]] = []

    def _answer(self, method: str, name: str, timeout: tuple[float, ...]) -> Deferred[Any]:
        self.calls.append((method, name, tuple(timeout)))
        answer = self.answers.get((method, name), error.DNSNameError())
        if answer is None:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed((answer, [], []))

    def lookupPointer(self, name: str, timeout: tuple[float, ...]) -> Deferred[Any]:
        return self._answer("lookupPointer", name, timeout)

    def lookupAddress(self, name: str, timeout: tuple[float, ...]) -> Deferred[Any]:
        return self._answer("lookupAddress", name, timeout)

    def lookupIPV6Address(self, name: str, timeout: tuple[float, ...]) -> Deferred[Any]:
        return self._answer("lookupIPV6Address", name, timeout)


CONFIRMED = {
    ("lookupPointer", PTR4): [ptr(NAME)],
    ("lookupAddress", NAME): [rrA("192.0.2.9"), rrA("192.0.2.5")],
}


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def lookup(self, answers: dict[tuple[str, str], Any], address: str = "192.0.2.5") -> Any:
        self.resolver = FakeResolver(answers)
        self.names = ClientNames(self.resolver, self.clock, 10.0)
        return self.successResultOf(self.names.lookup(address))

    def test_confirmed(self) -> None:
        """A PTR name whose A records hold the address is the name, both ways."""
        self.assertEqual(self.lookup(CONFIRMED), ClientName(NAME, NAME))
        self.assertEqual(
            [c[:2] for c in self.resolver.calls],
            [("lookupPointer", PTR4), ("lookupAddress", NAME)],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ipv6(self) -> None:
        """IPv6: the nibble PTR name, confirmed by AAAA records."""
        answers = {
            ("lookupPointer", PTR6): [ptr(NAME + ".")],
            ("lookupIPV6Address", NAME): [rrAAAA("2001:db8::5")],
        }
        self.assertEqual(self.lookup(answers, "2001:db8::5"), ClientName(NAME, NAME))

    def test_ipv4Mapped(self) -> None:
        """An IPv4-mapped IPv6 address is looked up as its IPv4 address."""
        self.assertEqual(self.lookup(CONFIRMED, "::ffff:192.0.2.5"), ClientName(NAME, NAME))

    def test_noPointer(self) -> None:
        """No PTR record (NXDOMAIN, or no record of that type): unavailable, both ways."""
        self.assertEqual(self.lookup({}), UNKNOWN)
        self.assertEqual(self.lookup({("lookupPointer", PTR4): []}), UNKNOWN)
        self.assertEqual(len(self.resolver.calls), 1)

    def test_notConfirmed(self) -> None:
        """
        A PTR name that does not point back (other addresses, or no such name): NAME is
        unavailable, REVERSE_NAME is the PTR name.
        """
        answers = {
            ("lookupPointer", PTR4): [ptr(NAME)],
            ("lookupAddress", NAME): [rrA("192.0.2.9")],
        }
        self.assertEqual(self.lookup(answers), ClientName(UNAVAILABLE, NAME))
        answers = {("lookupPointer", PTR4): [ptr(NAME)]}
        self.assertEqual(self.lookup(answers), ClientName(UNAVAILABLE, NAME))

    def test_temporary(self) -> None:
        """
        SERVFAIL or a timeout of the PTR query: [TEMPUNAVAIL] both ways; of the forward
        query: NAME [TEMPUNAVAIL], REVERSE_NAME the PTR name.
        """
        for failure in (
            error.DNSServerError(names.Message()),
            error.DNSQueryTimeoutError(1),
            defer.TimeoutError(),
            error.DNSUnknownError(names.Message()),
            ConnectionRefusedError(),
        ):
            self.assertEqual(
                self.lookup({("lookupPointer", PTR4): failure}),
                ClientName(TEMPUNAVAIL, TEMPUNAVAIL),
                failure,
            )
            answers = {("lookupPointer", PTR4): [ptr(NAME)], ("lookupAddress", NAME): failure}
            self.assertEqual(self.lookup(answers), ClientName(TEMPUNAVAIL, NAME), failure)

    def test_permanent(self) -> None:
        """REFUSED, FORMERR and NOTIMP count as permanent, as the C library has them."""
        for failure in (
            error.DNSQueryRefusedError(names.Message()),
            error.DNSFormatError(names.Message()),
            error.DNSNotImplementedError(names.Message()),
        ):
            self.assertEqual(self.lookup({("lookupPointer", PTR4): failure}), UNKNOWN, failure)

    def test_invalidNames(self) -> None:
        """
        PTR names that are no host names (an address, spaces, empty labels, non-ASCII)
        are not used; the first valid one is.
        """
        for bad in (
            "192.0.2.5",
            "bad name.example",
            "a..example",
            "caf\u00e9.example",
            "-a.example",
        ):
            self.assertEqual(self.lookup({("lookupPointer", PTR4): [ptr(bad)]}), UNKNOWN, bad)
        answers = dict(CONFIRMED)
        answers[("lookupPointer", PTR4)] = [ptr("1.2.3.4"), ptr(NAME), ptr("other.example")]
        self.assertEqual(self.lookup(answers), ClientName(NAME, NAME))

    def test_validName(self) -> None:
        """Host names are letters, digits, - and _ in labels; not all digits; <= 255."""
        self.assertTrue(validName("mail-1.example.org"))
        self.assertTrue(validName("_x.example"))
        self.assertTrue(validName("localhost"))
        self.assertFalse(validName(""))
        self.assertFalse(validName("1.2.3"))
        self.assertFalse(validName("a-.example"))
        self.assertFalse(validName("a" * 64 + ".example"))
        self.assertFalse(validName(".".join(["a" * 60] * 5)))

    def test_noAddress(self) -> None:
        """An address that is none (a UNIX socket's client) is unknown, asked of nobody."""
        self.assertEqual(self.lookup(CONFIRMED, "unknown"), UNKNOWN)
        self.assertEqual(self.resolver.calls, [])

    def test_off(self) -> None:
        """Without a resolver ("off"), every client is unknown at once."""
        names_ = ClientNames(None, self.clock, 10.0)
        self.assertEqual(self.successResultOf(names_.lookup("192.0.2.5")), UNKNOWN)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unexpectedError(self) -> None:
        """A bug in a resolver is logged with its traceback, and the name is [TEMPUNAVAIL]."""
        result = self.lookup({("lookupPointer", PTR4): RuntimeError("bug")})
        self.assertEqual(result, ClientName(TEMPUNAVAIL, TEMPUNAVAIL))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BudgetTests(SynchronousTestCase):
    """The whole lookup is bounded by its timeout."""

    def setUp(self) -> None:
        self.clock = Clock()

    def start(self, answers: dict[tuple[str, str], Any]) -> Deferred[ClientName]:
        self.resolver = FakeResolver(answers)
        return ClientNames(self.resolver, self.clock, 9.0).lookup("192.0.2.5")

    def test_silentPointer(self) -> None:
        """No PTR answer within the timeout: [TEMPUNAVAIL] both ways, the query cancelled."""
        d = self.start({("lookupPointer", PTR4): None})
        self.clock.advance(8.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), ClientName(TEMPUNAVAIL, TEMPUNAVAIL))
        [pending] = self.resolver.pending
        self.assertTrue(pending.called)  # cancelled (the lookup consumed its failure)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silentForward(self) -> None:
        """No forward answer in time: NAME [TEMPUNAVAIL], REVERSE_NAME the PTR name."""
        d = self.start({("lookupPointer", PTR4): [ptr(NAME)], ("lookupAddress", NAME): None})
        self.clock.advance(9)
        self.assertEqual(self.successResultOf(d), ClientName(TEMPUNAVAIL, NAME))

    def test_queryTimeoutsShareTheBudget(self) -> None:
        """
        Each query may retry once, and its timeouts add up to what is left of the
        budget: the forward query gets what the PTR query left.
        """
        d = self.start({("lookupPointer", PTR4): None, ("lookupAddress", NAME): None})
        self.clock.advance(3)
        [pending] = self.resolver.pending
        pending.callback(([ptr(NAME)], [], []))
        self.assertEqual([c[2] for c in self.resolver.calls], [(3.0, 6.0), (2.0, 4.0)])
        self.clock.advance(6)
        self.assertEqual(self.successResultOf(d), ClientName(TEMPUNAVAIL, NAME))

    def test_cancelled(self) -> None:
        """A caller may cancel a lookup: its query is cancelled, no timer stays."""
        d = self.start({("lookupPointer", PTR4): None})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])


def configWith(clientNames: str) -> Config:
    return Config(
        path="test.toml",
        listen=("tcp:0",),
        upstream="tcp:host=127.0.0.1:port=1",
        hostname="proxy.test",
        spoolDir="/nonexistent",
        clientNames=clientNames,
        timeouts=attrs.evolve(Timeouts(), clientName=4.0),
    )


class FromConfigTests(SynchronousTestCase):
    def test_off(self) -> None:
        """C{"off"}: no resolver."""
        self.assertIsNone(ClientNames.fromConfig(configWith("off"), MemoryReactorClock())._resolver)

    def test_server(self) -> None:
        """C{"IP:PORT"}: a client of that server only, on the given reactor, no timer."""
        reactor = MemoryReactorClock()
        names_ = ClientNames.fromConfig(configWith("[::1]:5353"), reactor)
        self.assertEqual(names_._resolver.servers, [("::1", 5353)])
        self.assertIs(names_._resolver._reactor, reactor)
        self.assertEqual(names_._timeout, 4.0)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_system(self) -> None:
        """
        C{"system"}: the hosts file, then the servers of resolv.conf, read once when it is
        made; no timer runs (no cache, no periodic re-read).
        """
        reactor = MemoryReactorClock()
        names_ = ClientNames.fromConfig(configWith("system"), reactor)
        self.assertIsInstance(names_._resolver, resolve.ResolverChain)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_systemReadsResolvConf(self) -> None:
        """The servers come from the resolv.conf given; a missing one means 127.0.0.1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("search example.org\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
        reactor = MemoryReactorClock()
        chain = systemResolver(reactor, os.fsencode(path), b"/nonexistent")
        self.assertEqual(chain.resolvers[-1].dynServers, [("192.0.2.53", 53), ("2001:db8::53", 53)])
        missing = systemResolver(reactor, b"/nonexistent/resolv.conf", b"/nonexistent")
        self.assertEqual(missing.resolvers[-1].dynServers, [("127.0.0.1", 53)])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_systemHostsFile(self) -> None:
        """The hosts file confirms a name without asking the DNS."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"192.0.2.5 {NAME}\n")
        chain = systemResolver(MemoryReactorClock(), b"/nonexistent", os.fsencode(path))
        answers, _, _ = self.successResultOf(chain.lookupAddress(NAME))
        self.assertEqual([rr.payload.dottedQuad() for rr in answers], ["192.0.2.5"])


class LoopbackTests(TestCase):
    """Against an authoritative C{twisted.names} server on 127.0.0.1."""

    def test_realServer(self) -> defer.Deferred[None]:
        """
        Confirmed, forged (the name points elsewhere) and missing names, from a real DNS
        server over UDP through C{"IP:PORT"}.
        """
        from twisted.internet import reactor

        server = DNSServer(
            {
                PTR4: [names.Record_PTR(NAME.encode())],
                NAME: [a("192.0.2.5"), aaaa("2001:db8::5")],
                "9.2.0.192.in-addr.arpa": [names.Record_PTR(b"forged.example")],
                "forged.example": [a("198.51.100.1")],
            }
        )
        server.start(self)
        names_ = ClientNames.fromConfig(configWith(server.resolver), reactor)

        async def run() -> None:
            self.assertEqual(await names_.lookup("192.0.2.5"), ClientName(NAME, NAME))
            self.assertEqual(
                await names_.lookup("192.0.2.9"), ClientName(UNAVAILABLE, "forged.example")
            )
            self.assertEqual(await names_.lookup("192.0.2.77"), UNKNOWN)
            self.assertEqual(server.asked(PTR4), 1)
            self.assertEqual(server.asked(NAME), 1)

        return defer.Deferred.fromCoroutine(run())
