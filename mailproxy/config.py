"""
The configuration file (TOML), loaded into frozen objects and validated before anything
listens. Every error names the file and the key at fault.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IReactorTime

#: The configuration file twistd's plugin and the quarantine tool read without C{--config}.
DEFAULT_CONFIG = "/etc/mailproxy/mailproxy.toml"


class ConfigError(Exception):
    """The configuration is wrong; C{str()} is one line naming the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(path, key, message)
        self.path = path
        self.key = key
        self.message = message

    def __str__(self) -> str:
        if not self.key:  # the file as a whole: unreadable, or not TOML
            return f"{self.path}: {self.message}"
        return f"{self.path}: {self.key}: {self.message}"


class OnError(enum.Enum):
    """What a filter failure (error or timeout) does to the message."""

    TEMPFAIL = "tempfail"
    ACCEPT = "accept"


class BareLineEndings(enum.Enum):
    """What to do with a bare CR or LF inside DATA."""

    REJECT = "reject"
    NORMALISE = "normalise"


class HeaderSyntax(enum.Enum):
    """C{proxy.header_syntax}: what to do with an ambiguous header block (L{mailproxy.headergrammar})."""

    REJECT = "reject"
    NORMALISE = "normalise"


class NulBytes(enum.Enum):
    """C{proxy.nul_bytes}: what to do with a NUL in a message's content."""

    REJECT = "reject"
    STRIP = "strip"


class Greeting(enum.Enum):
    """C{proxy.greeting}: whose banner the client gets first."""

    #: The MTA's, relayed: every session holds an MTA connection from its first moment.
    MTA = "mta"
    #: mailproxy's own C{220 <hostname> ESMTP}; the MTA is connected only once the client's
    #: EHLO or HELO passed the HELO filters (postscreen's model), so idle and abusive
    #: clients hold no MTA process.
    OWN = "own"


class AuthPolicy(enum.Enum):
    """C{proxy.auth}: when AUTH is offered to clients and relayed to the MTA."""

    #: Only over TLS (STARTTLS or implicit TLS); before it, AUTH gets 538 5.7.11.
    TLS = "tls"
    #: With or without TLS.
    ALWAYS = "always"
    #: Never offered; AUTH gets 503 5.5.1.
    NEVER = "never"


class UpstreamTLSMode(enum.Enum):
    """C{upstream_tls.mode}: STARTTLS towards the MTA."""

    NONE = "none"
    #: STARTTLS when the MTA offers it, its certificate not verified.
    OPPORTUNISTIC = "opportunistic"
    #: STARTTLS or a 4xx to the client; the certificate verified against C{name}.
    REQUIRED = "required"


#: The values of C{tls.min_version}.
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
#: Refused values of C{tls.min_version}: RFC 8996 deprecates them, and OpenSSL 3 at the
#: security level Twisted leaves it at would not negotiate them anyway.
OBSOLETE_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "SSLv3")


@attrs.frozen
class Limits:
    """C{[limits]}: what one client may send, and how many clients at once."""

    messageSize: int = 50 * 1024 * 1024
    recipients: int = 100
    lineLength: int = 2048
    #: Below Postfix's default_process_limit (100), which limits its smtpd processes: with
    #: C{greeting = "mta"} every session holds one, and the 101st client would get no banner.
    connections: int = 90
    connectionsPerClient: int = 20
    #: Commands other than MAIL, RCPT, DATA and QUIT one MTA connection may hear (our RSET
    #: and NOOP keepalives, the client's NOOP, RSET, HELP, VRFY, a second EHLO) before
    #: mailproxy reconnects to the MTA instead of another RSET, and stops its keepalives:
    #: MTAs count them (Exim's smtp_accept_max_nonmail, 10; Postfix's
    #: smtpd_junk_command_limit, 100).
    mtaJunkCommands: int = 8
    #: Failed AUTH attempts one session may make; then 421 4.7.0 and it is closed.
    authFailures: int = 3
    #: Commands one session may have refused (4xx/5xx: syntax, sequence, filters, the
    #: MTA) since its last delivered message, as Postfix's smtpd_hard_error_limit; the
    #: last refusal is followed by 421 4.7.0 and the close.
    errors: int = 20
    #: Command lines one session may send; the next one gets 421 4.7.0 and the close.
    commands: int = 10000
    #: Bytes of replies written to a client and not yet read by it; past them mailproxy
    #: stops reading from it (and handling what it sent) until it reads (back-pressure).
    replyBuffer: int = 262144
    #: Command lines one session handles per reactor turn; the rest wait for a later
    #: turn, so that one flooding client cannot starve the others.
    commandsPerTurn: int = 100
    #: Bytes per second a client must average while it sends a message (DATA or BDAT),
    #: checked after the first 30 seconds; below it 421 4.4.2. 0: no minimum.
    minDataRate: int = 0


@attrs.frozen
class Timeouts:
    """Seconds."""

    clientIdle: float = 300.0
    mtaConnect: float = 30.0
    mtaReply: float = 300.0
    filters: float = 120.0
    #: On stop: how long sessions in flight may take to finish before they get 421.
    shutdownGrace: float = 30.0
    #: While a message is received or filtered the MTA hears nothing; a NOOP this often
    #: keeps its own idle timeout (Postfix's smtpd_timeout, 300 s) from dropping us.
    mtaKeepalive: float = 120.0
    #: On C{haproxy:} listeners: the PROXY header must be complete this soon, else closed.
    proxyHeader: float = 10.0
    #: The client's name (reverse lookup, forward confirmation) for XCLIENT: then
    #: C{[TEMPUNAVAIL]}.
    clientName: float = 10.0
    #: A command line must be complete this long after its first byte came (a client
    #: that sends a byte now and then does not keep a session), else 421 4.4.2.
    command: float = 300.0
    #: A whole session, from connect to close; then 421 4.4.2 (a message being received
    #: is cut short, never acknowledged).
    session: float = 3600.0
    #: The MTA's banner, once connected (an MTA whose processes are all busy accepts the
    #: connection and says nothing): then 421 4.3.2.
    mtaBanner: float = 30.0
    #: The banner waits this long (0: not at all) while the client must stay silent: any
    #: byte it sends before the banner, whatever the delay, gets 554 5.5.0 (early talker).
    greetingDelay: float = 0.0


@attrs.frozen
class FilterSpec:
    """One C{[filters.NAME]} section: the common keys, and the rest for the filter."""

    name: str
    timeout: float = 30.0
    onError: OnError = OnError.TEMPFAIL
    dryRun: bool = False
    options: Mapping[str, object] = attrs.field(factory=dict)
    #: Keep the messages this filter refuses in the quarantine (C{[quarantine] dir}).
    quarantine: bool = False


class SyslogFormat(enum.Enum):
    RFC3164 = "rfc3164"
    RFC5424 = "rfc5424"


@attrs.frozen
class Logging:
    """C{[logging]}: where the log goes besides twistd's own log."""

    #: C{"udp:HOST:PORT"} (HOST an IP address) or C{"unix:PATH"}; None: no syslog of ours.
    syslog: str | None = None
    syslogFormat: SyslogFormat = SyslogFormat.RFC3164
    syslogFacility: str = "mail"
    syslogTag: str = "mailproxy"
    #: A file to append one JSON object per event to.
    json: str | None = None


@attrs.frozen
class Manhole:
    """C{[manhole]}: the SSH Python console into the running process; off without C{listen}."""

    listen: str | None = None
    authorizedKeys: str = "/etc/mailproxy/manhole_keys"
    hostKey: str = "/var/lib/mailproxy/manhole_host_key"


@attrs.frozen
class QuarantineSettings:
    """C{[quarantine]}: where refused messages of C{quarantine = true} filters are kept."""

    dir: str | None = None
    retentionDays: int = 30


@attrs.frozen
class StatsSocket:
    """C{[stats]}: the UNIX socket answering a JSON snapshot of the counters; off without C{socket}."""

    socket: str | None = None
    mode: int = 0o660


@attrs.frozen
class Web:
    """C{[web]}: the status page, C{/stats.json} and C{/metrics}; off without C{listen}."""

    listen: str | None = None
    refresh: float = 10.0


@attrs.frozen
class TLSSettings:
    """C{[tls]}: TLS towards clients (STARTTLS, C{listen_tls}); off without a certificate."""

    #: PEM: the certificate, then the intermediate CAs (C{fullchain.pem}).
    certificate: str | None = None
    #: PEM: its private key, without a passphrase.
    key: str | None = None
    #: One of L{TLS_VERSIONS}.
    minVersion: str = "TLSv1.2"
    #: An OpenSSL cipher string for TLS 1.2 and below; C{""}: Twisted's defaults.
    ciphers: str = ""
    #: MAIL before STARTTLS gets 530 5.7.0.
    require: bool = False


@attrs.frozen
class UpstreamTLS:
    """C{[upstream_tls]}: STARTTLS towards the MTA."""

    mode: UpstreamTLSMode = UpstreamTLSMode.NONE
    #: The name the MTA's certificate must carry (needed by C{mode = "required"}).
    name: str | None = None
    #: A PEM bundle of the CAs to trust; L{None}: the system's trust store.
    caFile: str | None = None


@attrs.frozen
class Config:
    """The whole validated file; C{path} is the path it was loaded from, as given."""

    path: str
    listen: tuple[str, ...]
    upstream: str
    hostname: str
    spoolDir: str
    bareLineEndings: BareLineEndings = BareLineEndings.REJECT
    #: An ambiguous header block: refused (554 5.6.0) or rewritten before the filters.
    headerSyntax: HeaderSyntax = HeaderSyntax.REJECT
    #: A NUL in the content (DATA, BDAT; in a BINARYMIME message only its header block):
    #: refused (554 5.6.0) or removed before spooling.
    nulBytes: NulBytes = NulBytes.REJECT
    greeting: Greeting = Greeting.MTA
    #: Commands relayed to the MTA besides those mailproxy handles (EHLO, HELO, MAIL, RCPT,
    #: DATA, RSET, QUIT); any other gets 502 from mailproxy.
    relayCommands: tuple[str, ...] = ("NOOP", "HELP", "VRFY")
    #: The peers that may send a PROXY header on C{haproxy:} listeners; others are closed.
    proxyProtocolFrom: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    )
    #: Where the client's name is looked up: C{"system"}, C{"IP:PORT"} or C{"off"}
    #: (L{mailproxy.clientname.ClientNames.fromConfig}).
    clientNames: str = "system"
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    filters: tuple[FilterSpec, ...] = ()
    logging: Logging = Logging()
    manhole: Manhole = Manhole()
    quarantine: QuarantineSettings = QuarantineSettings()
    stats: StatsSocket = StatsSocket()
    web: Web = Web()
    #: Implicit-TLS listeners (RFC 8314, port 465): endpoint strings like C{listen}.
    listenTls: tuple[str, ...] = ()
    auth: AuthPolicy = AuthPolicy.TLS
    tls: TLSSettings = TLSSettings()
    upstreamTls: UpstreamTLS = UpstreamTLS()
    #: Processes that serve clients (L{mailproxy.workers}); 1: this process serves them
    #: itself. A file without the key gets the number of cores (L{load}).
    workers: int = 1
    #: The file's bytes as read and validated: the master hands them to its workers, which
    #: run what it checked, not the file as it may be by then (L{mailproxy.workers}).
    source: bytes = attrs.field(default=b"", eq=False, repr=False)


class _InvalidValueError(Exception):
    """A value is wrong; the caller adds the file and the key."""


#: Turns a TOML value into the attribute value, or raises L{_InvalidValueError}.
_Check = Callable[[object], Any]

_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (dict, "a table"),
    (list, "an array"),
    (datetime.datetime, "a date-time"),
    (datetime.date, "a date"),
    (datetime.time, "a time"),
)


def _show(value: object) -> str:
    """A TOML value as a short, one-line phrase for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    for kind, phrase in _TOML_TYPES:
        if isinstance(value, kind):
            return phrase
    return repr(value)


def _dotted(*parts: str) -> str:
    """A dotted TOML key, quoting the parts that are not bare keys."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in parts)


def _oneLine(text: str) -> str:
    return " ".join(text.split())


def _integer(minimum: int) -> _Check:
    wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _InvalidValueError(f"must be {wanted}, not {_show(value)}")
        return value

    return check


def _seconds(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise _InvalidValueError(f"must be a positive number of seconds, not {_show(value)}")
    return float(value)


def _delay(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 and math.isfinite(value))
    ):
        raise _InvalidValueError(f"must be a number of seconds >= 0, not {_show(value)}")
    return float(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _InvalidValueError(f"must be true or false, not {_show(value)}")
    return value


def _choice(kind: type[enum.Enum]) -> _Check:
    allowed = ", ".join(json.dumps(member.value) for member in kind)

    def check(value: object) -> enum.Enum:
        for member in kind:
            if member.value == value:
                return member
        raise _InvalidValueError(f"must be one of {allowed}, not {_show(value)}")

    return check


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _InvalidValueError(f"must be a non-empty string, not {_show(value)}")
    return value


def _hostname(value: object) -> str:
    name = _string(value)
    if not re.fullmatch(r"[\x21-\x7e]{1,255}", name):
        raise _InvalidValueError(
            f"must be a host name without spaces or control characters, not {_show(name)}"
        )
    return name


def _endpoint(parse: Callable[[Any, str], object], what: str, reactor: IReactorTime) -> _Check:
    """Check an endpoint string by parsing it: the endpoint is built, never used."""

    def check(value: object) -> str:
        description = _string(value)
        try:
            parse(reactor, description)
        except (ValueError, KeyError, TypeError, OSError) as e:
            # OSError: ssl: and similar read their certificate files while parsing.
            raise _InvalidValueError(
                f"{_show(description)} is not a valid {what} endpoint: {_oneLine(str(e))}"
            ) from None
        return description

    return check


def _listen(reactor: IReactorTime, allowEmpty: bool = False) -> _Check:
    single = _endpoint(serverFromString, "server", reactor)

    def check(value: object) -> tuple[str, ...]:
        if isinstance(value, list):
            if not value and not allowEmpty:
                raise _InvalidValueError(
                    "must list at least one server endpoint, not an empty array"
                )
            listen = tuple(single(item) for item in value)
            if len(set(listen)) != len(listen):
                raise _InvalidValueError("lists the same endpoint twice")
            return listen
        if isinstance(value, str):
            return (single(value),)
        raise _InvalidValueError(
            f"must be an endpoint string or an array of them, not {_show(value)}"
        )

    return check


def _spoolDir(value: object) -> str:
    """An absolute path; the directory itself is checked by L{_checkDirectory}, last."""
    return os.path.abspath(_string(value))


def _checkDirectory(path: str, willExist: Collection[str] = ()) -> None:
    """
    Check, without touching anything, that a directory mailproxy writes in is usable:
    an existing, writable directory; or a missing one that can be created at start-up
    (L{mailproxy.directories.prepare}), in an existing, writable directory or in one of
    C{willExist}.

    @raise _InvalidValueError: it cannot be.
    """
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise _InvalidValueError(f"{_show(path)} is not writable")
        return
    if os.path.lexists(path):
        raise _InvalidValueError(f"{_show(path)} exists and is not a directory")
    parent = os.path.dirname(path)
    if parent in willExist:
        return
    if not os.path.lexists(parent):
        raise _InvalidValueError(f"cannot create {_show(path)}: no such directory {_show(parent)}")
    if not os.path.isdir(parent):
        raise _InvalidValueError(f"cannot create {_show(path)}: {_show(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _InvalidValueError(f"cannot create {_show(path)}: {_show(parent)} is not writable")


def _proxyKeys(reactor: IReactorTime) -> dict[str, _Check]:
    return {
        "listen": _listen(reactor),
        "upstream": _endpoint(clientFromString, "client", reactor),
        "hostname": _hostname,
        "spool_dir": _spoolDir,
        "bare_line_endings": _choice(BareLineEndings),
        "greeting": _choice(Greeting),
        "relay_commands": _relayCommands,
        "listen_tls": _listen(reactor, allowEmpty=True),
        "auth": _choice(AuthPolicy),
        "proxy_protocol_from": _networks,
        "client_names": _clientNames,
        "header_syntax": _choice(HeaderSyntax),
        "nul_bytes": _choice(NulBytes),
        "workers": _integer(1),
    }


def _relayCommands(value: object) -> tuple[str, ...]:
    from mailproxy.wire import RELAYABLE

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _InvalidValueError(f"must be an array of command names, not {_show(value)}")
    commands = tuple(v.upper() for v in value)
    unknown = sorted(set(commands) - RELAYABLE)
    if unknown:
        raise _InvalidValueError(
            f"{', '.join(unknown)} cannot be relayed (possible: {', '.join(sorted(RELAYABLE))})"
        )
    return commands


def _networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR networks, IPv4 or IPv6; as in the access filter, a lone address is a network of
    one and host bits are allowed (C{"192.0.2.1/24"} is 192.0.2.0/24)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _InvalidValueError(f"must be an array of CIDR networks, not {_show(value)}")
    networks = []
    for text in value:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise _InvalidValueError(
                f'{_show(text)} is not a CIDR network (such as "10.0.0.0/8" or "::1/128")'
            ) from None
    return tuple(networks)


def _clientNames(value: object) -> str:
    from mailproxy.dns import parseServer

    text = _string(value)
    if text in ("system", "off"):
        return text
    try:
        parseServer(text)
    except ValueError as e:
        raise _InvalidValueError(
            f'must be "system", "off" or a DNS server ("127.0.0.1:53", "[::1]:53"): {e}'
        ) from None
    return text


_LIMITS_KEYS: dict[str, _Check] = {
    "message_size": _integer(1),
    "recipients": _integer(1),
    "line_length": _integer(512),
    "connections": _integer(1),
    "connections_per_client": _integer(1),
    "mta_junk_commands": _integer(2),
    "auth_failures": _integer(1),
    "errors": _integer(1),
    "commands": _integer(1),
    "reply_buffer": _integer(4096),
    "commands_per_turn": _integer(1),
    "min_data_rate": _integer(0),
}
_TIMEOUTS_KEYS: dict[str, _Check] = dict.fromkeys(
    (
        "client_idle",
        "mta_connect",
        "mta_reply",
        "mta_keepalive",
        "filters",
        "shutdown_grace",
        "proxy_header",
        "client_name",
        "command",
        "session",
    ),
    _seconds,
)
#: The greeting's (issue 9): the MTA's banner, and the delay before ours (0 allowed).
_TIMEOUTS_KEYS.update({"mta_banner": _seconds, "greeting_delay": _delay})
_FILTER_KEYS: dict[str, _Check] = {
    "timeout": _seconds,
    "on_error": _choice(OnError),
    "dry_run": _boolean,
    "quarantine": _boolean,
}
_SECTIONS = (
    "proxy", "limits", "timeouts", "tls", "upstream_tls", "filters", "logging", "manhole",
    "quarantine", "stats", "web",
)  # fmt: skip
_REQUIRED = {"listen": "a server endpoint string", "upstream": "a client endpoint string"}


def _camel(key: str) -> str:
    """C{connections_per_client} -> C{connectionsPerClient}."""
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


def _unknown(
    path: str, key: str, name: str, candidates: list[str], what: str, known: list[str] | None = None
) -> ConfigError:
    """An unknown C{name}: the closest of C{candidates} suggested, else C{known} listed
    (by default the candidates)."""
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return ConfigError(path, key, f'unknown {what}, did you mean "{close[0]}"?')
    listed = candidates if known is None else known
    return ConfigError(path, key, f"unknown {what}; known: {', '.join(listed)}")


def _table(path: str, document: Mapping[str, object], *names: str) -> dict[str, object]:
    """The table at C{names}, or an empty one if it is missing."""
    value = document.get(names[-1], {})
    if not isinstance(value, dict):
        key = _dotted(*names)
        raise ConfigError(path, key, f"must be a table ([{key}]), not {_show(value)}")
    return value


def _convert(
    path: str, section: tuple[str, ...], table: Mapping[str, object], keys: Mapping[str, _Check]
) -> dict[str, Any]:
    """Check the known keys of C{table}; return them as attribute names and values."""
    result = {}
    for name, value in table.items():
        if name in keys:
            try:
                result[_camel(name)] = keys[name](value)
            except _InvalidValueError as e:
                raise ConfigError(path, _dotted(*section, name), str(e)) from None
    return result


def _section(
    path: str, document: Mapping[str, object], name: str, keys: Mapping[str, _Check]
) -> dict[str, Any]:
    """A section whose keys are all known: an unknown one is a typo."""
    table = _table(path, document, name)
    for key in table:
        if key not in keys:
            raise _unknown(path, _dotted(name, key), key, list(keys), "key")
    return _convert(path, (name,), table, keys)


def _freeze(value: object) -> object:
    """A read-only copy of a TOML value: tables become mapping proxies, arrays tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _filters(path: str, document: Mapping[str, object]) -> tuple[FilterSpec, ...]:
    """The C{[filters.NAME]} sections, in file order."""
    specs = []
    filters = _table(path, document, "filters")
    for name in filters:
        table = _table(path, filters, "filters", name)
        common = _convert(path, ("filters", name), table, _FILTER_KEYS)
        options = {k: _freeze(v) for k, v in table.items() if k not in _FILTER_KEYS}
        specs.append(FilterSpec(name=name, options=types.MappingProxyType(options), **common))
    return tuple(specs)


def _read(path: str, text: bytes | None) -> tuple[dict[str, Any], bytes]:
    """The TOML document of C{text}, or of the file at C{path} if L{None}; and its bytes."""
    try:
        if text is None:
            with open(path, "rb") as f:
                text = f.read()
        return tomllib.loads(text.decode("utf-8")), text
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {_oneLine(str(e))}") from None


#: Syslog facility names and their numbers (RFC 5424, section 6.2.1).
SYSLOG_FACILITIES: Mapping[str, int] = types.MappingProxyType(
    {
        "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
        "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
        **{f"local{n}": 16 + n for n in range(8)},
    }
)  # fmt: skip


def syslogAddress(description: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """
    C{"udp:127.0.0.1:514"}, C{"udp:[::1]:514"} or C{"unix:/dev/log"} as a socket family
    and address. Only IP addresses: a host name would need the resolver.

    @raise ValueError: the description is none of these.
    """
    kind, _, rest = description.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return socket.AF_UNIX, rest
    if kind == "udp":
        host, _, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{port!r} is not a port number")
        return family, (host, int(port))
    raise ValueError('use "udp:ADDRESS:PORT" or "unix:/PATH"')


def _syslog(value: object) -> str:
    description = _string(value)
    try:
        syslogAddress(description)
    except ValueError as e:
        raise _InvalidValueError(f"{_show(description)}: {e}") from None
    return description


def _facility(value: object) -> str:
    if value not in SYSLOG_FACILITIES:
        raise _InvalidValueError(
            f"must be a syslog facility ({', '.join(SYSLOG_FACILITIES)}), not {_show(value)}"
        )
    return str(value)


def _tag(value: object) -> str:
    tag = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9._/-]{1,32}", tag):
        raise _InvalidValueError(f"must be up to 32 letters, digits or ._/-, not {_show(tag)}")
    return tag


def _path(value: object) -> str:
    return os.path.abspath(_string(value))


_LOGGING_KEYS: dict[str, _Check] = {
    "syslog": _syslog,
    "syslog_format": _choice(SyslogFormat),
    "syslog_facility": _facility,
    "syslog_tag": _tag,
    "json": _path,
}
_QUARANTINE_KEYS: dict[str, _Check] = {"dir": _path, "retention_days": _integer(1)}


#: The longest path a UNIX socket may have (sun_path holds 108 bytes, the NUL included).
UNIX_PATH_MAX = 107


def _socketPath(value: object) -> str:
    """A socket's path, made absolute (relative to the working directory at start-up)."""
    path = os.path.abspath(_string(value))
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise _InvalidValueError(
            f"{_show(path)} is too long for a UNIX socket ({len(os.fsencode(path))} bytes,"
            f" at most {UNIX_PATH_MAX})"
        )
    return path


def _mode(value: object) -> int:
    """File permissions: an octal string (C{"0660"}) or a TOML octal integer (C{0o660})."""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise _InvalidValueError(f'must be an octal mode such as "0660", not {_show(value)}')


_STATS_KEYS: dict[str, _Check] = {"socket": _socketPath, "mode": _mode}


def _webKeys(reactor: IReactorTime) -> dict[str, _Check]:
    return {"listen": _endpoint(serverFromString, "server", reactor), "refresh": _seconds}


def _manholeKeys(reactor: IReactorTime) -> dict[str, _Check]:
    return {
        "listen": _endpoint(serverFromString, "server", reactor),
        "authorized_keys": _path,
        "host_key": _path,
    }


def _checkManhole(path: str, manhole: Manhole) -> None:
    """The key files, when the manhole is on: at least one public key; a usable host key."""
    from twisted.conch.checkers import readAuthorizedKeyFile
    from twisted.conch.ssh.keys import BadKeyError, Key

    keys, hostKey = "manhole.authorized_keys", "manhole.host_key"
    try:
        with open(manhole.authorizedKeys, "rb") as f:
            if not any(readAuthorizedKeyFile(f)):
                raise ConfigError(
                    path, keys, f"{_show(manhole.authorizedKeys)} holds no public key"
                )
    except OSError as e:
        why = f"cannot read {_show(manhole.authorizedKeys)}: {e.strerror}"
        raise ConfigError(path, keys, why) from None
    if os.path.exists(manhole.hostKey):
        try:
            key = Key.fromFile(manhole.hostKey)
        except (OSError, BadKeyError, ValueError) as e:
            why = _oneLine(str(e)) or type(e).__name__
            raise ConfigError(
                path, hostKey, f"cannot read {_show(manhole.hostKey)}: {why}"
            ) from None
        if key.isPublic():
            raise ConfigError(path, hostKey, f"{_show(manhole.hostKey)} is a public key")
    elif not os.access(os.path.dirname(manhole.hostKey), os.W_OK | os.X_OK):
        raise ConfigError(
            path, hostKey, f"{_show(manhole.hostKey)} is missing and its directory is not writable"
        )


def _optionalPath(value: object) -> str | None:
    """A path made absolute; C{""}: none."""
    return None if value == "" else _path(value)


def _optionalName(value: object) -> str | None:
    """A host name; C{""}: none."""
    return None if value == "" else _hostname(value)


def _tlsVersion(value: object) -> str:
    if value in OBSOLETE_TLS_VERSIONS:
        raise _InvalidValueError(
            f"{_show(value)} is obsolete (RFC 8996) and OpenSSL would not negotiate it;"
            ' use "TLSv1.2" or "TLSv1.3"'
        )
    if value not in TLS_VERSIONS:
        allowed = ", ".join(json.dumps(v) for v in TLS_VERSIONS)
        raise _InvalidValueError(f"must be one of {allowed}, not {_show(value)}")
    return str(value)


def _ciphers(value: object) -> str:
    """An OpenSSL cipher string (checked by L{_checkTls}); C{""}: Twisted's defaults."""
    if not isinstance(value, str) or not re.fullmatch(r"[\x21-\x7e]*", value):
        raise _InvalidValueError(
            f"must be an OpenSSL cipher string without spaces, not {_show(value)}"
        )
    return value


_TLS_KEYS: dict[str, _Check] = {
    "certificate": _optionalPath,
    "key": _optionalPath,
    "min_version": _tlsVersion,
    "ciphers": _ciphers,
    "require": _boolean,
}
_UPSTREAM_TLS_KEYS: dict[str, _Check] = {
    "mode": _choice(UpstreamTLSMode),
    "name": _optionalName,
    "ca_file": _optionalPath,
}


def _readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {_show(path)}: {e.strerror or e}") from None


def readCertificates(path: str) -> list[x509.Certificate]:
    """
    The certificates of the PEM file at C{path}, in file order (a server's own first,
    then its chain). Other PEM blocks (a private key) are skipped.

    @raise ValueError: the file cannot be read or holds no certificate; C{str()} is
        one line naming the file.
    """
    data = _readFile(path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError(f"{_show(path)} holds no PEM certificate")
    return certificates


#: The kinds of private key a TLS server can use (pyOpenSSL's).
ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


def readPrivateKey(path: str) -> ServerKey:
    """
    The private key of the PEM file at C{path} (PKCS #8, or the traditional RSA and EC
    forms), which must have no passphrase: nobody is there to type it at start-up.

    @raise ValueError: the file cannot be read, holds no private key, or only an
        encrypted one; C{str()} is one line naming the file.
    """
    data = _readFile(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(
            f"the key in {_show(path)} is encrypted: mailproxy needs it without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{_show(path)} holds no PEM private key") from None
    if not isinstance(key, ServerKey):
        raise ValueError(f"the key in {_show(path)} is of a kind TLS cannot use")
    return key


def keyMatches(certificate: x509.Certificate, key: ServerKey) -> bool:
    """Whether C{key} is the private half of C{certificate}'s public key."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def readKeyPair(config: Config) -> tuple[list[x509.Certificate], ServerKey] | None:
    """
    C{[tls]}'s certificate chain and key, read from their files and matched (for the
    configuration's check, and for L{mailproxy.tls.serverOptions}, which reads them again
    at each reload); L{None} when neither is set.

    @raise ConfigError: naming C{tls.certificate} or C{tls.key}.
    """
    path, tls = config.path, config.tls
    if (tls.certificate is None) != (tls.key is None):
        missing, given = ("key", "certificate") if tls.key is None else ("certificate", "key")
        raise ConfigError(path, f"tls.{missing}", f"missing: it is needed with tls.{given}")
    if tls.certificate is None or tls.key is None:
        return None
    try:
        chain = readCertificates(tls.certificate)
    except ValueError as e:
        raise ConfigError(path, "tls.certificate", str(e)) from None
    try:
        key = readPrivateKey(tls.key)
    except ValueError as e:
        raise ConfigError(path, "tls.key", str(e)) from None
    if not keyMatches(chain[0], key):
        raise ConfigError(
            path,
            "tls.key",
            f"{_show(tls.key)} is not the key of the certificate in {_show(tls.certificate)}"
            " (the first one of the file)",
        )
    return chain, key


def _checkTls(config: Config) -> None:
    """
    C{[tls]}, C{[upstream_tls]} and C{proxy.listen_tls}: the files are read and the key
    checked against the certificate; the cipher string is tried on an OpenSSL context.
    """
    path, tls, upstream = config.path, config.tls, config.upstreamTls
    readKeyPair(config)
    if tls.ciphers:
        try:
            SSL.Context(SSL.TLS_METHOD).set_cipher_list(tls.ciphers.encode("ascii"))
        except SSL.Error:
            raise ConfigError(
                path,
                "tls.ciphers",
                f"{_show(tls.ciphers)} matches no cipher of this OpenSSL for TLS 1.2 and below",
            ) from None
    if tls.certificate is None:
        if tls.require:
            raise ConfigError(path, "tls.require", "needs a certificate: set certificate and key")
        if config.listenTls:
            raise ConfigError(
                path, "proxy.listen_tls", "needs a certificate: set certificate and key in [tls]"
            )
    for description in config.listenTls:
        if description in config.listen:
            raise ConfigError(
                path, "proxy.listen_tls", f"{_show(description)} is in proxy.listen too"
            )
    if upstream.mode is UpstreamTLSMode.REQUIRED and upstream.name is None:
        raise ConfigError(
            path,
            "upstream_tls.name",
            'missing: mode = "required" verifies the MTA\'s certificate against this name',
        )
    if upstream.caFile is not None:
        try:
            readCertificates(upstream.caFile)
        except ValueError as e:
            raise ConfigError(path, "upstream_tls.ca_file", str(e)) from None


def _checkService(config: Config) -> None:
    """Checks across sections, and of the files and directories they name."""
    path = config.path
    for spec in config.filters:
        if spec.quarantine and config.quarantine.dir is None:
            raise ConfigError(
                path,
                _dotted("filters", spec.name, "quarantine"),
                "needs a quarantine directory: set dir in [quarantine]",
            )
    if config.quarantine.dir is not None:
        try:
            _checkDirectory(config.quarantine.dir, willExist={config.spoolDir})
        except _InvalidValueError as e:
            raise ConfigError(path, "quarantine.dir", str(e)) from None
    if config.logging.json is not None:
        directory = os.path.dirname(config.logging.json)
        if not os.path.isdir(directory):
            raise ConfigError(path, "logging.json", f"no such directory: {_show(directory)}")
    if config.manhole.listen is not None:
        _checkManhole(path, config.manhole)
    _checkTls(config)


def load(path: str, reactor: IReactorTime, text: bytes | None = None) -> Config:
    """
    Read and validate the configuration file at C{path}. Nothing is created or changed:
    the spool and quarantine directories are only checked (an existing writable one, or
    a missing one whose parent is), and are created when the service starts
    (L{mailproxy.directories.prepare}).

    @param reactor: only used to parse endpoint strings; nothing listens or connects.
    @param text: the file's content as read before (by a worker's master), validated
        instead of the file; C{path} then only names it.
    @raise ConfigError: the file is unreadable, not TOML, or any key is wrong.
    """
    document, source = _read(path, text)
    for name, value in document.items():
        if name not in _SECTIONS:
            # Only a table is a section to suggest another for: a key outside any section
            # ("upstream = ...") is no misspelt [upstream_tls].
            candidates = list(_SECTIONS) if isinstance(value, dict) else []
            raise _unknown(path, _dotted(name), name, candidates, "section", known=list(_SECTIONS))
    proxy = _section(path, document, "proxy", _proxyKeys(reactor))
    for key, what in _REQUIRED.items():
        if key not in proxy:
            raise ConfigError(path, f"proxy.{key}", f"missing: {what} is required")
    proxy.setdefault("hostname", socket.gethostname())
    proxy.setdefault("spoolDir", os.path.abspath("spool"))
    limits = Limits(**_section(path, document, "limits", _LIMITS_KEYS))
    # One worker a core this process may run on, but no more than connections to share.
    proxy.setdefault("workers", min(len(os.sched_getaffinity(0)), limits.connections))
    if proxy["workers"] > limits.connections:
        raise ConfigError(
            path,
            "proxy.workers",
            f"{proxy['workers']} is more than limits.connections ({limits.connections}),"
            " which the workers share: each needs one at least",
        )
    config = Config(
        path=path,
        limits=limits,
        timeouts=Timeouts(**_section(path, document, "timeouts", _TIMEOUTS_KEYS)),
        filters=_filters(path, document),
        logging=Logging(**_section(path, document, "logging", _LOGGING_KEYS)),
        manhole=Manhole(**_section(path, document, "manhole", _manholeKeys(reactor))),
        quarantine=QuarantineSettings(**_section(path, document, "quarantine", _QUARANTINE_KEYS)),
        stats=StatsSocket(**_section(path, document, "stats", _STATS_KEYS)),
        web=Web(**_section(path, document, "web", _webKeys(reactor))),
        tls=TLSSettings(**_section(path, document, "tls", _TLS_KEYS)),
        upstreamTls=UpstreamTLS(**_section(path, document, "upstream_tls", _UPSTREAM_TLS_KEYS)),
        source=source,
        **proxy,
    )
    _checkService(config)
    try:
        _checkDirectory(config.spoolDir)
    except _InvalidValueError as e:
        raise ConfigError(path, "proxy.spool_dir", str(e)) from None
    return config
