"""Typed reading of a filter's options, so every filter reports bad keys the same way."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from mailproxy.filters import OptionError


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

    def finish(self) -> None:
        """@raise OptionError: for the first key no reader asked for."""
        for key in self._options:
            if key not in self._read:
                close = difflib.get_close_matches(key, sorted(self._read), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                raise OptionError(key, f"unknown option{hint}")
