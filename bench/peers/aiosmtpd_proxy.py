"""
aiosmtpd's own SMTP proxy, C{aiosmtpd.handlers.Proxy}, as C{python -m aiosmtpd} would serve
it, for bench/peers.py: aiosmtpd 1.4's command line cannot pass the Proxy handler its
upstream (the class has no C{from_cli}), so this does what its C{main} does, with it.

    python aiosmtpd_proxy.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT SIZE_LIMIT
"""

import asyncio
import signal
import sys

from aiosmtpd.handlers import Proxy
from aiosmtpd.smtp import SMTP


def main(host: str, port: str, upstreamHost: str, upstreamPort: str, size: str) -> None:
    loop = asyncio.new_event_loop()
    handler = Proxy(upstreamHost, int(upstreamPort))
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, data_size_limit=int(size)), host, int(port), backlog=1024
        )
    )
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
