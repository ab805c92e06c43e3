"""
IP addresses and networks as filters see them: the client's address (IPv4-mapped IPv6 made
IPv4) and membership in CIDR lists (C{deny_networks}, C{skip_networks}).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def clientIP(text: str) -> IPAddress | None:
    """The client's address as an IP address (IPv4-mapped IPv6 made IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def inNetworks(ip: IPAddress | None, networks: Sequence[Network]) -> bool:
    """Whether C{ip} is in one of C{networks} (never, for no address)."""
    return ip is not None and any(ip in network for network in networks)
