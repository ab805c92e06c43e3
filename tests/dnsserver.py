"""
An in-process authoritative DNS server for tests, on C{twisted.names}.

    server = DNSServer({"example.org": [txt("v=spf1 ip4:127.0.0.1 -all")],
                        "2.0.0.127.zen.test": [a("127.0.0.2")]})
    server.start(self)            # UDP and TCP on 127.0.0.1, a free port; stopped at cleanup
    server.resolver               # "127.0.0.1:PORT", for a filter's resolver option
    server.add(name, *records)    # more records, while it runs

(C{DNSServer(records, interface="::1")} serves on IPv6 loopback instead.)

It is authoritative for the root, so every name it has no records for is NXDOMAIN.
It records every question it gets (C{queries}); names in C{servfail} get SERVFAIL;
with C{silent} set it answers nothing (a dead server that still takes datagrams).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.names import authority, server
from twisted.names import dns as names
from twisted.trial.unittest import TestCase


def a(address: str, ttl: int = 300) -> names.Record_A:
    return names.Record_A(address, ttl=ttl)


def aaaa(address: str, ttl: int = 300) -> names.Record_AAAA:
    return names.Record_AAAA(address, ttl=ttl)


def txt(text: str, ttl: int = 300) -> names.Record_TXT:
    """A TXT record; text over 255 bytes is split into several strings, as DNS needs."""
    data = text.encode("ascii")
    return names.Record_TXT(
        *[data[i : i + 255] for i in range(0, len(data), 255)] or [b""], ttl=ttl
    )


def mx(exchange: str, preference: int = 10, ttl: int = 300) -> names.Record_MX:
    return names.Record_MX(preference, exchange.encode("ascii"), ttl=ttl)


class _Authority(authority.FileAuthority):
    """An authority for the root zone holding the records it is given."""

    def __init__(self, records: Mapping[str, Sequence[Any]]) -> None:
        self._given = records
        super().__init__(None)

    def add(self, name: str, records: Sequence[Any]) -> None:
        self.records.setdefault(name.lower().encode("ascii"), []).extend(records)

    def loadFile(self, filename: object) -> None:
        soa = names.Record_SOA(
            mname=b"ns.test", rname=b"hostmaster.test", serial=1, minimum=30, expire=30, ttl=30
        )
        self.soa = (b"", soa)
        self.records = {
            name.lower().encode("ascii"): list(records) for name, records in self._given.items()
        }


class _Factory(server.DNSServerFactory):  # type: ignore[misc]
    def __init__(self, owner: DNSServer, records: Mapping[str, Sequence[Any]]) -> None:
        self.authority = _Authority(records)
        super().__init__(authorities=[self.authority])
        self._owner = owner

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        name = query.name.name.decode("ascii").lower()
        self._owner.queries.append((name, names.QUERY_TYPES.get(query.type, str(query.type))))
        if self._owner.silent:
            return None
        if name in self._owner.servfail:
            self.sendReply(
                protocol, self._responseFromMessage(message=message, rCode=names.ESERVER), address
            )
            return None
        return super().handleQuery(message, protocol, address)


class DNSServer:
    """
    An authoritative server for C{records} (name → records), on 127.0.0.1 UDP and TCP.

    @ivar queries: C{(name, type)} of every question received, in order.
    @ivar silent: when true, questions are recorded and never answered.
    @ivar servfail: names answered with SERVFAIL.
    """

    def __init__(
        self, records: Mapping[str, Sequence[Any]] | None = None, interface: str = "127.0.0.1"
    ) -> None:
        self.interface = interface
        self.queries: list[tuple[str, str]] = []
        self.silent = False
        self.servfail: set[str] = set()
        self.port = 0
        self._ports: list[IListeningPort] = []
        self._factory = _Factory(self, records or {})

    def add(self, name: str, *records: Any) -> None:
        """Serve C{records} for C{name} too, from now on."""
        self._factory.authority.add(name, records)

    def start(self, case: TestCase | None = None) -> int:
        """Listen (stopped at C{case}'s cleanup, if given); return the port."""
        factory = self._factory
        for _ in range(50):  # a UDP port whose TCP twin is free too
            udp = reactor.listenUDP(  # type: ignore[attr-defined]
                0, names.DNSDatagramProtocol(factory), interface=self.interface
            )
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface=self.interface)  # type: ignore[attr-defined]
            except CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.port = port
            break
        else:
            raise RuntimeError(f"no free UDP/TCP port pair on {self.interface}")
        if case is not None:
            case.addCleanup(self.stop)
        return self.port

    def stop(self) -> defer.Deferred[object]:
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    @property
    def resolver(self) -> str:
        """The server's address as a filter's C{resolver} option."""
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.port}"

    def asked(self, name: str) -> int:
        """How many questions about C{name} (any type) arrived."""
        return sum(1 for n, _ in self.queries if n == name.lower())


def freePort() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on (a DNS server that is down)."""
    port = reactor.listenUDP(0, names.DNSDatagramProtocol(None), interface="127.0.0.1")  # type: ignore[attr-defined]
    number = int(port.getHost().port)
    port.stopListening()
    return number
