"""Typed reading of a filter's options, so every filter reports bad keys the same way."""

from __future__ import annotations

import difflib
import ipaddress
import math
from collections.abc import Mapping

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint

from mailproxy.filters import OptionError
from mailproxy.net import Network


class Options:
    """
    Reads a filter's options by type; L{finish} refuses any key that was not read.
    """

    def __init__(self, options: Mapping[str, object]) -> None:
        self._options = options
        self._read: set[str] = set()

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        self._read.add(key)
        value = self._options.get(key, default)
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise OptionError(key, f"must be a list of strings, not {value!r}")
        if not all(isinstance(item, str) for item in value):
            raise OptionError(key, f"must be a list of strings, not {list(value)!r}")
        return tuple(str(item) for item in value)

    def networks(self, key: str) -> tuple[Network, ...]:
        """A list of CIDR networks, IPv4 or IPv6 (C{"192.0.2.0/24"}, C{"2001:db8::/32"});
        host bits are allowed, and a lone address is a network of one."""
        networks = []
        for text in self.strings(key):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise OptionError(key, f"not a CIDR network: {text!r}") from None
        return tuple(networks)

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        self._read.add(key)
        value = self._options.get(key, default)
        if value is None:
            close = difflib.get_close_matches(key, [k for k in self._options if k != key], n=1)
            hint = f' (is "{close[0]}" a misspelling of it?)' if close else ""
            raise OptionError(key, f"is required{hint}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(key, f"must be an integer, not {value!r}")
        if value < minimum:
            raise OptionError(key, f"must be at least {minimum}, not {value}")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        """A finite integer or decimal, at least C{minimum} (seconds, weights)."""
        self._read.add(key)
        value = self._options.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise OptionError(key, f"must be a number, not {value!r}")
        if value < minimum:
            raise OptionError(key, f"must be at least {minimum:g}, not {value:g}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        self._read.add(key)
        value = self._options.get(key, default)
        if not isinstance(value, bool):
            raise OptionError(key, f"must be true or false, not {value!r}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        """A non-empty string; required when C{default} is L{None}."""
        self._read.add(key)
        value = self._options.get(key, default)
        if value is None:
            raise OptionError(key, "is required")
        if not isinstance(value, str) or not value:
            raise OptionError(key, f"must be a non-empty string, not {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise OptionError(key, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    def tables(self, key: str) -> tuple[Mapping[str, object], ...]:
        """
        An array of tables (C{[{ a = 1 }, { a = 2 }]}); read each with its own
        L{Options} and report its errors as C{KEY[INDEX].NAME} (see L{reKeyed}).
        """
        self._read.add(key)
        value = self._options.get(key, ())
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise OptionError(key, f"must be an array of tables, not {value!r}")
        for item in value:
            if not isinstance(item, Mapping):
                raise OptionError(key, f"must be an array of tables, not {list(value)!r}")
        return tuple(value)

    def endpoint(self, key: str, default: str, reactor: object) -> IStreamClientEndpoint:
        """A Twisted client endpoint string (C{tcp:host=127.0.0.1:port=783},
        C{unix:/run/spamd.sock}), parsed now so that a bad one fails at start-up."""
        description = self.string(key, default)
        try:
            endpoint: IStreamClientEndpoint = clientFromString(reactor, description)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise OptionError(key, f"{description!r} is not a valid client endpoint: {e}") from None
        path = getattr(endpoint, "_path", None)  # a UNIXClientEndpoint's socket
        if isinstance(path, str):
            checkSocketPath(key, path)
        return endpoint

    def finish(self) -> None:
        """@raise OptionError: for the first key no reader asked for."""
        for key in self._options:
            if key not in self._read:
                close = difflib.get_close_matches(key, sorted(self._read), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise OptionError(key, f"unknown option{hint}")


#: The longest UNIX socket path connect() takes (sun_path, less its NUL).
MAX_SOCKET_PATH = 107


def checkSocketPath(key: str, path: str) -> None:
    """@raise OptionError: C{path} is too long to be a UNIX socket's (107 bytes)."""
    if len(path.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
        raise OptionError(key, f"UNIX socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes")


def reKeyed(error: OptionError, prefix: str) -> OptionError:
    """C{error} about a key inside C{prefix} (e.g. C{reject[2]}): C{reject[2].pattern}."""
    return OptionError(f"{prefix}.{error.key}", error.message)
