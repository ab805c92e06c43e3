"""
The PROXY protocol (v1 and v2) on C{haproxy:} listeners: the client's address as the load
balancer in front of mailproxy saw it.

Twisted's own wrapper (L{twisted.protocols.haproxy}) parses the header, but connects the
wrapped protocol at once: mailproxy would greet, run its connect filters and count the
balancer's address before the header has arrived. L{ProxyHeaderProtocol} keeps Twisted's
parsers and holds the wrapped protocol back: it is built and connected only once the header
is parsed, so its C{transport.getPeer()} is the real client from the first moment, and the
bytes that followed the header in the same packet reach it after C{connectionMade}.

Refused, closed without a byte written, logged once and counted
(L{mailproxy.stats.Stats.proxyRefused}):
  - a peer outside C{proxy.proxy_protocol_from} (C{"untrusted"}); a peer on a UNIX socket
    is trusted, the socket's permissions decide who connects;
  - anything but a valid header, or one longer than the protocol allows (C{"invalid"});
  - a header not complete within C{timeouts.proxy_header} seconds (C{"timeout"}).

A header that names no client (v2 C{LOCAL}, HAProxy's health checks; v1 C{UNKNOWN}; v2
C{UNSPEC} or UNIX addresses) is served with the balancer's own address, as the protocol
says.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailproxy.config import Config
from mailproxy.net import clientIP, inNetworks
from mailproxy.stats import Stats

#: The endpoint prefix of a listener that reads a PROXY header first.
PREFIX = "haproxy:"
#: The longest v1 header, C{PROXY} to CRLF included (the protocol's own limit).
V1_MAX = 107
#: The largest v2 length field accepted (the address block and the TLVs after the 16
#: fixed bytes). The protocol allows 65535; HAProxy's TLVs (ALPN, authority, unique id,
#: SSL details) take a few hundred bytes, so a peer claiming more is not buffered for.
V2_MAX_LENGTH = 4096

_V1_START = V1Parser.PROXYSTR + b" "
_V2_FIXED = 16


class Refusal(enum.Enum):
    """Why a connection was closed before its header was served (the counter's labels)."""

    UNTRUSTED = "untrusted"
    INVALID = "invalid"
    TIMEOUT = "timeout"


class _State(enum.Enum):
    AWAITING = "awaiting the header"
    SERVING = "serving"
    REFUSED = "refused"
    CLOSED = "closed"


class _InvalidHeaderError(Exception):
    """The bytes are no acceptable PROXY header; C{str()} says why."""


class _V1Parser(V1Parser):
    """Twisted's v1 parser, taking also the shortest header, C{PROXY UNKNOWN} and CRLF
    (Twisted's wants more after C{UNKNOWN})."""

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == V1Parser.PROXYSTR + b" " + V1Parser.UNKNOWN_PROTO:
            return ProxyInfo(line, None, None)
        return super().parse(line)


class _Unborn(Protocol):
    """Stands for the wrapped protocol until the header names the client it is built for."""


def describePeer(address: IAddress) -> str:
    """An address as the logs show it: C{1.2.3.4}, C{2001:db8::1}, or a socket's path."""
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host
    if isinstance(address, UNIXAddress):
        name = address.name
        path = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")
        return f"unix:{path}"
    return str(address)


def _trusted(peer: IAddress, config: Config) -> bool:
    """Whether C{peer}, the real TCP peer, may send a PROXY header."""
    if isinstance(peer, UNIXAddress):
        return True
    if isinstance(peer, IPv4Address | IPv6Address):
        return inNetworks(clientIP(peer.host), config.proxyProtocolFrom)
    return False


def _checked(address: IAddress | None) -> IPv4Address | IPv6Address | None:
    """
    A header's address as a TCP address in canonical form; L{None} when it names none (or
    a UNIX socket, which is no client on the network).

    @raise _InvalidHeaderError: a v1 address that is not an IP address of its family, or a
        port outside 0-65535 (Twisted's v1 parser takes them as they are written).
    """
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise _InvalidHeaderError(f"{address.host!r} is not an IP address") from None
    kind = IPv4Address if ip.version == 4 else IPv6Address
    if not isinstance(address, kind):
        raise _InvalidHeaderError(f"{address.host} is not an address of the family it claims")
    if not 0 <= address.port <= 65535:
        raise _InvalidHeaderError(f"{address.port} is not a port number")
    return kind("TCP", str(ip), address.port)


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """
    Reads the PROXY header with Twisted's parsers, then builds and connects the wrapped
    protocol for the client it names; refuses silently what L{ProxyHeaderFactory} does not
    allow. Half-closes are passed on to a wrapped protocol that takes them.
    """

    _log = Logger()
    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]
        self._state = _State.AWAITING
        #: The bytes received before the header's version is known (at most 16).
        self._prefix = b""
        self._timer: IDelayedCall | None = None
        #: What the header may claim, from the configuration in force when it connected.
        self._config: Config | None = None

    def logPrefix(self) -> str:
        """The listener's (the wrapped protocol may not exist yet when the reactor asks)."""
        return self.factory.logPrefix()

    # -- the real connection ------------------------------------------------------------

    def makeConnection(self, transport: ITransport) -> None:
        """Take the transport; the wrapped protocol waits for the header (L{_serve})."""
        directlyProvides(self, providedBy(transport))
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        assert self.transport is not None
        config = self._config = self.factory.config()
        if not _trusted(self.transport.getPeer(), config):
            self._refuse(Refusal.UNTRUSTED, "not in proxy.proxy_protocol_from")
            return
        self._timer = self.factory.clock.callLater(
            config.timeouts.proxyHeader, self._timedOut, config.timeouts.proxyHeader
        )

    def dataReceived(self, data: bytes) -> None:
        if self._state is _State.SERVING:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._state is not _State.AWAITING:
            return  # refused: the rest is not read
        try:
            parsed = self._feed(data)
            if parsed is None:
                return
            info, rest = parsed
            served = ProxyInfo(info.header, _checked(info.source), _checked(info.destination))
        except _InvalidHeaderError as e:
            self._refuse(Refusal.INVALID, str(e))
            return
        self._serve(served, rest)

    def readConnectionLost(self) -> None:
        if self._state is _State.SERVING:
            halfCloseable = IHalfCloseableProtocol(self.wrappedProtocol, None)
            if halfCloseable is not None:
                halfCloseable.readConnectionLost()
                return
        self.loseConnection()  # type: ignore[no-untyped-call]

    def writeConnectionLost(self) -> None:
        if self._state is _State.SERVING:
            halfCloseable = IHalfCloseableProtocol(self.wrappedProtocol, None)
            if halfCloseable is not None:
                halfCloseable.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        state, self._state = self._state, _State.CLOSED
        if state is _State.SERVING:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
            return
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
        if state is _State.AWAITING:
            self._log.debug(
                "connection from [{peer}] closed before its PROXY header", peer=self._peer()
            )

    # -- the header ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        """
        Feed Twisted's parser (chosen by the first bytes) with C{data}.

        @return: the header and the bytes after it, or L{None} while it is incomplete.
        @raise _InvalidHeaderError: the bytes cannot be, or cannot become, a valid header.
        """
        parser = self._parser
        if parser is None:
            self._prefix += data
            parser = self._chooseParser(self._prefix)
            if parser is None:
                return None
            data, self._prefix = self._prefix, b""
            self._parser = parser
        try:
            info, rest = parser.feed(data)
        except (InvalidProxyHeader, ValueError):
            # ValueError: Twisted's v1 parser reads the ports with int() unchecked.
            raise _InvalidHeaderError("not a valid PROXY protocol header") from None
        if info is None or rest is None:
            return None
        if isinstance(parser, V1Parser) and len(info.header) + 2 > V1_MAX:
            # Twisted refuses more than 107 bytes only when no CRLF came with them.
            raise _InvalidHeaderError(f"a v1 header longer than {V1_MAX} bytes")
        return info, rest

    @staticmethod
    def _chooseParser(prefix: bytes) -> V1Parser | V2Parser | None:
        """
        The parser for a header that starts with C{prefix}, or L{None} while too few bytes
        have come to tell.

        @raise _InvalidHeaderError: C{prefix} starts neither version, or claims a v2 header
            longer than L{V2_MAX_LENGTH}.
        """
        signature = V2Parser.PREFIX
        if prefix.startswith(_V1_START):
            return _V1Parser()
        if len(prefix) >= _V2_FIXED and prefix.startswith(signature):
            if prefix[12] & 0xF0 != 0x20:
                raise _InvalidHeaderError(f"PROXY protocol version {prefix[12] >> 4} is not 2")
            (length,) = struct.unpack("!H", prefix[14:16])
            if length > V2_MAX_LENGTH:
                raise _InvalidHeaderError(
                    f"a v2 header of {_V2_FIXED + length} bytes (at most"
                    f" {_V2_FIXED + V2_MAX_LENGTH} are read)"
                )
            return V2Parser()
        if len(prefix) < len(_V1_START) and _V1_START.startswith(prefix):
            return None
        if len(prefix) < _V2_FIXED and prefix[: len(signature)] == signature[: len(prefix)]:
            return None
        raise _InvalidHeaderError("not a PROXY protocol header")

    def _serve(self, info: ProxyInfo, rest: bytes) -> None:
        """Build the wrapped protocol for the client named, connect it, then give it C{rest}."""
        self._cancelTimer()
        self._proxyInfo = info
        self._state = _State.SERVING
        if info.source is None:
            self._log.debug(
                "PROXY header from [{peer}] names no client: served as the balancer's address",
                peer=self._peer(),
            )
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()  # type: ignore[no-untyped-call]
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    # -- refusals -----------------------------------------------------------------------

    def _timedOut(self, seconds: float) -> None:
        self._timer = None
        if self._state is _State.AWAITING:
            self._refuse(Refusal.TIMEOUT, f"not complete within {seconds:g} seconds")

    def _refuse(self, why: Refusal, text: str) -> None:
        """Close without a byte written; log it once and count it."""
        self._state = _State.REFUSED
        self._cancelTimer()
        emit = self._log.info if why is Refusal.TIMEOUT else self._log.warn
        emit(
            "PROXY header refused from [{peer}]: {why}",
            peer=self._peer(),
            why=text,
            refusal=why.value,
        )
        if self.factory.stats is not None:
            self.factory.stats.proxyRefused(why.value)
        self.loseConnection()  # type: ignore[no-untyped-call]

    def _peer(self) -> str:
        """The real TCP peer (the balancer), for the logs."""
        return describePeer(self.transport.getPeer()) if self.transport is not None else "?"

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """
    Wraps the factory of a C{haproxy:} listener (the relay's, or a TLS factory around it:
    the PROXY header comes first, in clear): its protocols are built only for connections
    whose header was accepted, for the address the header names.

    @param clock: for the header's timeout.
    @param config: answers the configuration in force (C{proxy.proxy_protocol_from},
        C{timeouts.proxy_header}), read as each connection starts, so that a reload
        applies to the next connection.
    @param stats: counts the refusals, if given.
    """

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        config: Callable[[], Config],
        stats: Stats | None = None,
    ) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.config = config
        self.stats = stats

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        # The wrapped protocol is built in ProxyHeaderProtocol._serve, for the real client.
        return ProxyHeaderProtocol(self, _Unborn())
