"""
The configuration file (TOML), loaded into frozen objects and validated before anything
listens. Every error names the file and the key at fault.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime


class ConfigError(Exception):
    """The configuration is wrong; C{str()} is one line naming the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(path, key, message)
        self.path = path
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.message}"


class OnError(enum.Enum):
    """What a filter failure (error or timeout) does to the message."""

    TEMPFAIL = "tempfail"
    ACCEPT = "accept"


class BareLineEndings(enum.Enum):
    """What to do with a bare CR or LF inside DATA."""

    REJECT = "reject"
    NORMALISE = "normalise"


@attrs.frozen
class Limits:
    messageSize: int = 50 * 1024 * 1024
    recipients: int = 100
    lineLength: int = 2048
    connections: int = 500
    connectionsPerClient: int = 20


@attrs.frozen
class Timeouts:
    """Seconds."""

    clientIdle: float = 300.0
    mtaConnect: float = 30.0
    mtaReply: float = 300.0
    filters: float = 120.0


@attrs.frozen
class FilterSpec:
    """One C{[filters.NAME]} section: the common keys, and the rest for the filter."""

    name: str
    timeout: float = 30.0
    onError: OnError = OnError.TEMPFAIL
    dryRun: bool = False
    options: Mapping[str, object] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    path: str
    listen: tuple[str, ...]
    upstream: str
    hostname: str
    spoolDir: str
    bareLineEndings: BareLineEndings = BareLineEndings.REJECT
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    filters: tuple[FilterSpec, ...] = ()


def load(path: str, reactor: IReactorTime) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @param reactor: only used to parse endpoint strings; nothing listens or connects.
    @raise ConfigError: the file is unreadable, not TOML, or any key is wrong.
    """
    raise NotImplementedError
