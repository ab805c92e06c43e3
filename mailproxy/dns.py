"""
DNS plumbing shared by the DNS-based filters (dnsbl, surbl, spf).

The resolver address option (C{"127.0.0.1:53"}, C{"[::1]:53"}); the query names of DNS
lists (reversed IPv4 octets, IPv6 nibbles); return-code filters (C{"127.0.0.2-127.0.0.11"});
the C{zones} option; and L{ListLookup}, asynchronous A lookups through C{twisted.names}
with a small TTL cache that expires by the injected clock.

The system resolver is never used: every lookup goes to the configured server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, error
from twisted.names import dns as names
from twisted.python.failure import Failure

from mailproxy.filters import FilterError, OptionError
from mailproxy.filters.options import Options, reKeyed
from mailproxy.net import IPAddress

#: Seconds an answer stays cached at most, whatever its TTL says.
MAX_TTL = 3600
#: Seconds a negative answer (NXDOMAIN, no A record) stays cached when the server sent
#: no SOA to take its negative TTL from (RFC 2308).
NEGATIVE_TTL = 60
#: Lookups in flight at once, per filter (each uses one UDP socket).
CONCURRENCY = 32


def parseServer(text: str) -> tuple[str, int]:
    """
    A resolver address: C{"127.0.0.1:53"}, C{"127.0.0.1"}, C{"[::1]:5353"} or C{"::1"}.

    @return: C{(address, port)}.
    @raise ValueError: not an IP address with an optional port in 1-65535.
    """
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not an address: {text!r}")
        port = rest[1:] if rest else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"not an IP address (with an optional port): {text!r}; write IPv6 as [::1]:53"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a port number: {port!r}")
    return str(address), int(port)


def reversedName(ip: IPAddress) -> str:
    """
    The DNS list query label of an address: C{1.0.0.127} for 127.0.0.1, the 32 reversed
    nibbles for IPv6 (C{1.0.0.0....0.0.0.0} for ::1), as RFC 5782 §2.1 and §2.4 define.
    """
    pointer = ip.reverse_pointer
    return pointer.rsplit(".", 2)[0]


def readServer(options: Options, key: str = "resolver") -> tuple[str, int]:
    try:
        return parseServer(options.string(key, "127.0.0.1:53"))
    except ValueError as e:
        raise OptionError(key, str(e)) from None


@attrs.frozen
class Codes:
    """
    The return codes (A records) that count as a listing: inclusive ranges of IPv4
    addresses, given as C{"127.0.0.2"}, C{"127.0.0.2-127.0.0.11"} or C{"127.0.0.0/24"}.
    """

    ranges: tuple[tuple[int, int], ...]

    #: By default any 127.0.0.0/8 answer but 127.0.0.1 (never a listing, RFC 5782 §5;
    #: URIBL and SURBL answer it when they refuse a query) and 127.255.255.0/24, which
    #: lists such as Spamhaus use for errors ("query refused", "typing error").
    DEFAULT = ("127.0.0.2-127.255.254.255",)

    def matching(self, addresses: Sequence[str]) -> tuple[str, ...]:
        """The C{addresses} that are listing codes."""
        found = []
        for address in addresses:
            try:
                value = int(ipaddress.IPv4Address(address))
            except ValueError:
                continue
            if any(low <= value <= high for low, high in self.ranges):
                found.append(address)
        return tuple(found)

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Codes:
        """@raise ValueError: naming the entry at fault."""
        ranges = []
        for text in texts:
            try:
                if "/" in text:
                    network = ipaddress.IPv4Network(text, strict=False)
                    low, high = network.network_address, network.broadcast_address
                else:
                    first, _, last = text.partition("-")
                    low = ipaddress.IPv4Address(first.strip())
                    high = ipaddress.IPv4Address(last.strip()) if last else low
            except ValueError:
                raise ValueError(f"not an IPv4 address, range (a-b) or network: {text!r}") from None
            if high < low:
                raise ValueError(f"empty range: {text!r}")
            ranges.append((int(low), int(high)))
        return cls(tuple(ranges))


@attrs.frozen
class Zone:
    """One DNS list: its zone, the weight of a listing, the codes that count."""

    zone: str
    weight: float = 1.0
    codes: Codes = attrs.field(factory=lambda: Codes.parse(Codes.DEFAULT))


def _zoneName(text: str) -> str:
    name = text.strip().strip(".").lower()
    labels = name.split(".")
    if len(labels) < 2 or not all(0 < len(label) < 64 for label in labels) or len(name) > 200:
        raise ValueError(f"not a DNS zone name: {text!r}")
    return name


def readZones(options: Options, key: str, weights: bool = True) -> tuple[Zone, ...]:
    """
    C{key} as an array of tables C{{ zone = "...", weight = 1.0, codes = [...] }}
    (C{weight} only when C{weights}).
    """
    zones = []
    for index, table in enumerate(options.tables(key)):
        o = Options(table)
        try:
            try:
                zone = _zoneName(o.string("zone"))
            except ValueError as e:
                raise OptionError("zone", str(e)) from None
            weight = o.number("weight", 1.0) if weights else 1.0
            try:
                codes = Codes.parse(o.strings("codes", Codes.DEFAULT) or Codes.DEFAULT)
            except ValueError as e:
                raise OptionError("codes", str(e)) from None
            o.finish()
        except OptionError as e:
            raise reKeyed(e, f"{key}[{index}]") from None
        zones.append(Zone(zone, weight, codes))
    return tuple(zones)


def makeResolver(server: tuple[str, int], reactor: Any) -> Any:
    """
    A C{twisted.names} client resolver that asks C{server} only.

    Not C{client.createResolver}: that one takes no reactor (it uses the global one),
    rereads its resolv.conf every minute by a timer, and chains a hosts file and an
    unbounded cache whose timers outlive a stopped service; L{ListLookup} has its own
    bounded cache.
    """
    return client.Resolver(servers=[server], reactor=reactor)


def retryTimeouts(timeout: float) -> tuple[float, float]:
    """
    C{twisted.names}' timeouts for a lookup that must end within C{timeout} seconds: one
    retry, so that a lost UDP datagram costs a third of the time, not all of it.
    """
    return (timeout / 3, timeout * 2 / 3)


class LookupTempError(Exception):
    """A lookup that may succeed later: it timed out, or the server or the socket failed."""


async def lookupTexts(resolver: Any, name: str, timeouts: tuple[float, ...]) -> list[bytes]:
    """
    The TXT records at C{name}, each one's strings joined; none when the name does not
    exist. @raise LookupTempError: saying why, for the log line or the 4xx.
    """
    d: Deferred[Any] = resolver.lookupText(name, timeout=timeouts)
    try:
        answers, _, _ = await d
    except error.DNSNameError:
        return []
    except defer.TimeoutError:
        raise LookupTempError(f"DNS lookup of {name} timed out") from None
    except (error.DomainError, OSError) as e:
        raise LookupTempError(f"DNS lookup of {name} failed: {type(e).__name__}") from None
    return [b"".join(rr.payload.data) for rr in answers if getattr(rr.payload, "data", None)]


def _minimumTTL(records: Sequence[Any]) -> int | None:
    ttls = [int(rr.ttl) for rr in records]
    return min(ttls) if ttls else None


def _negativeTTL(authority: Sequence[Any]) -> int:
    """RFC 2308 §5: the negative TTL is the lesser of the SOA's TTL and its MINIMUM."""
    for rr in authority:
        if rr.type == names.SOA:
            return min(int(rr.ttl), int(rr.payload.minimum))
    return NEGATIVE_TTL


class ListLookup:
    """
    Lookups of DNS list names (A records): concurrent, asynchronous and cached.

    L{lookup} fires with the addresses answered (empty when the name does not exist or
    has no A record), or fails with L{FilterError} when the server errs or does not
    answer within C{timeout} seconds.

    @param resolver: an C{IResolver} (L{makeResolver}); tests pass a fake.
    @param clock: for cache expiry.
    @param cacheSize: most names cached; beyond it expired and then oldest entries go.
    """

    _log = Logger()

    def __init__(
        self, resolver: Any, clock: IReactorTime, timeout: float, cacheSize: int = 10000
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._timeouts = retryTimeouts(timeout)
        self._cacheSize = cacheSize
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._inFlight: dict[str, list[Deferred[tuple[str, ...]]]] = {}
        self._semaphore = defer.DeferredSemaphore(CONCURRENCY)

    def lookup(self, name: str) -> Deferred[tuple[str, ...]]:
        """The A records of C{name}, from the cache while their TTL lasts."""
        name = name.lower()
        cached = self._cache.get(name)
        if cached is not None:
            expires, addresses = cached
            if self._clock.seconds() < expires:
                return defer.succeed(addresses)
            del self._cache[name]
        # Each caller gets its own Deferred: cancelling one (a filter's timeout) does
        # not cancel the query the others wait for.
        waiter: Deferred[tuple[str, ...]] = Deferred()
        waiting = self._inFlight.get(name)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._inFlight[name] = [waiter]
        query: Deferred[tuple[str, ...]] = self._semaphore.run(self._query, name)
        query.addBoth(self._answered, name)
        return waiter

    def _query(self, name: str) -> Deferred[tuple[str, ...]]:
        d: Deferred[Any] = self._resolver.lookupAddress(name, timeout=self._timeouts)
        return d.addCallbacks(
            self._listed, self._notListed, callbackArgs=(name,), errbackArgs=(name,)
        )

    def _listed(
        self, result: tuple[Sequence[Any], Sequence[Any], Sequence[Any]], name: str
    ) -> tuple[str, ...]:
        answers, authority, _ = result
        records = [rr for rr in answers if rr.type == names.A]
        addresses = tuple(rr.payload.dottedQuad() for rr in records)
        ttl = _minimumTTL(records) if records else _negativeTTL(authority)
        self._store(name, addresses, ttl if ttl is not None else NEGATIVE_TTL)
        return addresses

    def _notListed(self, failure: Failure, name: str) -> tuple[str, ...] | Failure:
        if failure.check(error.DNSNameError):
            args = getattr(failure.value, "args", ())
            message = args[0] if args else None
            authority = getattr(message, "authority", ())
            self._store(name, (), _negativeTTL(authority))
            return ()
        if failure.check(defer.TimeoutError):
            raise FilterError(f"DNS lookup of {name} timed out")
        if failure.check(error.DomainError):
            raise FilterError(f"DNS lookup of {name} failed: {type(failure.value).__name__}")
        if failure.check(OSError):
            raise FilterError(f"DNS lookup of {name} failed: {failure.getErrorMessage()}")
        return failure

    def _answered(self, result: tuple[str, ...] | Failure, name: str) -> None:
        for waiter in self._inFlight.pop(name, []):
            if not waiter.called:  # a cancelled waiter has fired already
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    def _store(self, name: str, addresses: tuple[str, ...], ttl: int) -> None:
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0 or self._cacheSize == 0:
            return
        if len(self._cache) >= self._cacheSize:
            now = self._clock.seconds()
            for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[key]
            if len(self._cache) >= self._cacheSize:
                # Drop the oldest tenth at once, so that a full cache costs one scan per
                # tenth of its size in insertions, not one per insertion.
                for key in list(self._cache)[: self._cacheSize // 10 + 1]:
                    del self._cache[key]
        self._cache[name] = (self._clock.seconds() + ttl, addresses)

    @property
    def cached(self) -> int:
        """How many names are cached (expired entries included, until they are purged)."""
        return len(self._cache)


async def lookupAll(
    lookup: ListLookup, queries: list[tuple[str, Zone]]
) -> list[tuple[Zone, tuple[str, ...] | Failure]]:
    """
    Ask every C{(name, zone)} at once; each zone with its listing codes (empty: not
    listed) or the L{FilterError} failure of its lookup.
    """
    results = await defer.DeferredList(
        [lookup.lookup(name) for name, _ in queries], consumeErrors=True
    )
    out: list[tuple[Zone, tuple[str, ...] | Failure]] = []
    for (_, zone), (ok, value) in zip(queries, results, strict=True):
        if ok:
            out.append((zone, zone.codes.matching(value)))
        else:
            failure = cast(Failure, value)
            failure.trap(FilterError)  # anything else is a bug: let it through
            out.append((zone, failure))
    return out
