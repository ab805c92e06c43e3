"""
The client's host name, for the MTA (XCLIENT C{NAME} and C{REVERSE_NAME}), found as
Postfix's smtpd finds it: the PTR record of the client's address, then the A (IPv4) or
AAAA (IPv6) records of that name, which must hold the address (forward-confirmed).

What Postfix's XCLIENT_README says the attributes carry:
  - C{name} (NAME): the forward-confirmed name; C{[UNAVAILABLE]} when the lookup failed
    for good (no PTR record, no such name, a name that does not point back to the
    address); C{[TEMPUNAVAIL]} when it failed for now (a DNS server failure, or no answer
    in time).
  - C{reverseName} (REVERSE_NAME): the PTR name, confirmed or not; C{[UNAVAILABLE]} or
    C{[TEMPUNAVAIL]} in the same way when there is none.

All DNS goes through C{twisted.names}; a whole lookup takes at most C{timeouts.client_name}
seconds, and never fails: every error is one of the two placeholders.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, error, hosts, resolve
from twisted.names import dns as names
from twisted.python.failure import Failure

from mailproxy.config import Config
from mailproxy.dns import makeResolver, parseServer
from mailproxy.net import IPAddress, clientIP

#: The name could not be found, for good (Postfix's XCLIENT placeholder).
UNAVAILABLE = "[UNAVAILABLE]"
#: The name could not be found for now: the DNS failed, or did not answer in time.
TEMPUNAVAIL = "[TEMPUNAVAIL]"

RESOLV_CONF = b"/etc/resolv.conf"
HOSTS = b"/etc/hosts"

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@attrs.frozen
class ClientName:
    """What the MTA is told of the client's name (see the module's docstring)."""

    name: str
    reverseName: str


#: Nothing known, for good: no lookup, no PTR record, or no address to look up.
UNKNOWN = ClientName(UNAVAILABLE, UNAVAILABLE)


class _TemporaryError(Exception):
    """A lookup failed for now."""


class _PermanentError(Exception):
    """A lookup failed for good."""


def validName(text: str) -> bool:
    """
    Whether a PTR record's name can stand for a host: letters, digits, C{-} and C{_} in
    dot-separated labels, at most 255 characters, and not an address or all digits (the
    name of a PTR record could be anything, Postfix takes only such names).
    """
    if not 0 < len(text) <= 255:
        return False
    labels = text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


class _ResolvConfResolver(client.Resolver):
    """
    A C{twisted.names} client of the servers in a resolv.conf file, read once when it is
    made (each reload makes a new one): C{client.Resolver} would read it again every minute
    from a timer that outlives the service.
    """

    _log = Logger()

    def maybeParseConfig(self) -> None:
        if self.resolv is None:
            return
        lines: Any = ()  # a missing file, as client.Resolver takes it: the local server
        try:
            with open(self.resolv, "rb") as f:
                lines = f.readlines()
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warn(
                "cannot read {path}, asking 127.0.0.1:53: {why}",
                path=self.resolv.decode("utf-8", "replace"),
                why=e.strerror or e,
            )
        self.parseConfig(lines)  # type: ignore[no-untyped-call]


def systemResolver(reactor: Any, resolvConf: bytes = RESOLV_CONF, hostsFile: bytes = HOSTS) -> Any:
    """
    The system's resolver, as C{twisted.names.client.createResolver} builds it (the hosts
    file first, then the servers of resolv.conf), on C{reactor} rather than the global one,
    and without its parts that keep timers running past the service: the cache (its
    entries expire by timers) and the periodic re-read of resolv.conf.
    """
    return resolve.ResolverChain(
        [
            hosts.Resolver(hostsFile),
            _ResolvConfResolver(resolv=resolvConf, reactor=reactor),  # type: ignore[no-untyped-call]
        ]
    )


class ClientNames:
    """
    Looks up clients' names (L{lookup}).

    @param resolver: an C{IResolver} (L{fromConfig} makes it); L{None}: no lookups, every
        client is L{UNKNOWN}.
    @param clock: bounds each lookup to C{timeout} seconds.
    """

    _log = Logger()

    def __init__(self, resolver: Any | None, clock: IReactorTime, timeout: float) -> None:
        self._resolver = resolver
        self._clock = clock
        self._timeout = timeout

    @classmethod
    def fromConfig(cls, config: Config, reactor: Any) -> ClientNames:
        """
        The lookups C{proxy.client_names} asks for: C{"system"} (L{systemResolver}), a
        server C{"IP:PORT"} only, or C{"off"}; bounded by C{timeouts.client_name}. Nothing
        is asked yet, and nothing keeps running: it can be dropped on reload.
        """
        setting = config.clientNames
        resolver: Any | None
        if setting == "off":
            resolver = None
        elif setting == "system":
            resolver = systemResolver(reactor)
        else:
            resolver = makeResolver(parseServer(setting), reactor)
        return cls(resolver, reactor, config.timeouts.clientName)

    def lookup(self, address: str) -> Deferred[ClientName]:
        """
        The name of the client at C{address} (IPv4, IPv6, IPv4-mapped IPv6). Fires within
        the timeout, never with a failure (unless cancelled).
        """
        ip = clientIP(address)
        if self._resolver is None or ip is None:
            return defer.succeed(UNKNOWN)
        deadline = self._clock.seconds() + self._timeout
        found = _Found()
        work = Deferred.fromCoroutine(self._lookup(ip, deadline, found))

        def cancel(result: Deferred[ClientName]) -> None:
            if timer.active():
                timer.cancel()
            work.cancel()

        result: Deferred[ClientName] = Deferred(cancel)

        def timedOut() -> None:
            self._log.debug(
                "name of [{address}]: no answer within {seconds:g}s",
                address=address,
                seconds=self._timeout,
            )
            result.callback(ClientName(TEMPUNAVAIL, found.reverseName))
            work.cancel()

        timer = self._clock.callLater(self._timeout, timedOut)

        def done(outcome: ClientName | Failure) -> None:
            if timer.active():
                timer.cancel()
            if result.called or (
                isinstance(outcome, Failure) and outcome.check(defer.CancelledError)
            ):
                return  # timed out (answered already) or cancelled by the caller
            if isinstance(outcome, Failure):
                self._log.failure("name of [{address}]", outcome, address=address)
                outcome = ClientName(TEMPUNAVAIL, found.reverseName)
            result.callback(outcome)

        work.addBoth(done)
        return result

    async def _lookup(self, ip: IPAddress, deadline: float, found: _Found) -> ClientName:
        try:
            answers = await self._query("lookupPointer", ip.reverse_pointer, deadline)
        except _TemporaryError:
            return ClientName(TEMPUNAVAIL, TEMPUNAVAIL)
        except _PermanentError:
            return UNKNOWN
        name = next(
            (
                n
                for n in (_text(rr.payload.name) for rr in answers if rr.type == names.PTR)
                if validName(n)
            ),
            None,
        )
        if name is None:
            return UNKNOWN
        found.reverseName = name
        method = "lookupAddress" if ip.version == 4 else "lookupIPV6Address"
        try:
            answers = await self._query(method, name, deadline)
        except _TemporaryError:
            return ClientName(TEMPUNAVAIL, name)
        except _PermanentError:
            return ClientName(UNAVAILABLE, name)
        if ip not in _addresses(answers):
            self._log.debug("[{ip}]: {name} does not point back to it", ip=str(ip), name=name)
            return ClientName(UNAVAILABLE, name)
        return ClientName(name, name)

    async def _query(self, method: str, name: str, deadline: float) -> list[Any]:
        """
        The answer records of one query.

        @raise _TemporaryError: the DNS failed for now (SERVFAIL, no answer in time, no
            server reachable).
        @raise _PermanentError: NXDOMAIN, or a server that cannot answer this (REFUSED,
            FORMERR, NOTIMP), as the C library's resolver takes them (NO_RECOVERY).
        """
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            raise _TemporaryError()
        # One retry: a lost UDP datagram costs a third of the time, not all of it.
        timeouts = (remaining / 3, remaining * 2 / 3)
        try:
            answers, _, _ = await getattr(self._resolver, method)(name, timeout=timeouts)
        except (
            error.DNSNameError,
            error.DNSQueryRefusedError,
            error.DNSFormatError,
            error.DNSNotImplementedError,
        ):
            raise _PermanentError() from None
        except (defer.TimeoutError, error.DomainError, error.ResolverError, OSError):
            raise _TemporaryError() from None
        return list(answers)


@attrs.define
class _Found:
    """What one lookup has found so far, for the answer when its time runs out."""

    reverseName: str = TEMPUNAVAIL


def _text(name: names.Name) -> str:
    """A DNS name as text, without the root's dot; non-ASCII names become invalid ones."""
    return name.name.decode("ascii", "replace").removesuffix(".")


def _addresses(answers: list[Any]) -> set[IPAddress]:
    """The addresses of the A and AAAA records among C{answers}."""
    found: set[IPAddress] = set()
    for rr in answers:
        if rr.type == names.A:
            found.add(ipaddress.IPv4Address(rr.payload.address))
        elif rr.type == names.AAAA:
            found.add(ipaddress.IPv6Address(rr.payload.address))
    return found
