"""
Twisted's own TCP relay, C{twisted.protocols.portforward}, on the epoll reactor, for
bench/peers.py: bytes moved as they come, no SMTP read, nothing held. What a proxy built
on Twisted's reactor and transports costs before it does any work of its own.

    python twisted_portforward.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.protocols.portforward import ProxyFactory  # noqa: E402


def main(host: str, port: str, upstreamHost: str, upstreamPort: str) -> None:
    factory = ProxyFactory(upstreamHost, int(upstreamPort))
    factory.noisy = False
    reactor.listenTCP(int(port), factory, backlog=1024, interface=host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(*sys.argv[1:])
