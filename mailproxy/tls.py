"""
TLS, on Twisted's: the server side towards clients (STARTTLS, and the implicit-TLS
listeners of C{proxy.listen_tls}), the client side towards the MTA (C{[upstream_tls]}),
and what is logged of an established TLS connection.

The options are built from the configuration by L{serverOptions} and L{clientOptions},
which read the files again each time: the service calls them whenever it builds the
settings new sessions run under, at start-up and on every reload (SIGHUP), so that a
renewed certificate applies to the sessions that start after the reload.
L{ReloadableServerOptions} does the same for the listeners, whose TLS wrapper is made once.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ISystemHandle,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from mailproxy.config import (
    Config,
    ConfigError,
    UpstreamTLSMode,
    readCertificates,
    readKeyPair,
)

_log = Logger()

#: C{tls.min_version} as Twisted's constants.
_VERSIONS = {
    "TLSv1.2": TLSVersion.TLSv1_2,
    "TLSv1.3": TLSVersion.TLSv1_3,
}


def _reasons(error: SSL.Error) -> str:
    """OpenSSL's reasons in an L{SSL.Error}, as one line."""
    queue = error.args[0] if error.args else []
    if isinstance(queue, list):
        reasons = [entry[2] for entry in queue if isinstance(entry, tuple) and len(entry) == 3]
        if reasons:
            return "; ".join(reasons)
    return " ".join(str(error).split()) or "OpenSSL refused it"


def serverOptions(config: Config) -> IOpenSSLServerConnectionCreator | None:
    """
    The TLS server side of C{[tls]}: the certificate and its chain (one PEM file, the
    server's certificate first), the key, the minimum version, the ciphers; no client
    certificate is asked for. Read from the files now, and the OpenSSL context built now,
    so that anything wrong is a configuration error, not a failed handshake later.

    Logs a warning for a certificate that has expired (it is still served: a sender's
    opportunistic STARTTLS does not verify it).

    @return: L{None} when no certificate is configured (no STARTTLS, no C{listen_tls}).
    @raise ConfigError: naming C{tls.certificate}, C{tls.key} or C{tls.ciphers}.
    """
    tls, path = config.tls, config.path
    pair = readKeyPair(config)
    if pair is None:
        return None
    chain, key = pair
    expiry = chain[0].not_valid_after_utc
    if expiry < datetime.datetime.now(datetime.UTC):
        _log.warn(
            "tls.certificate {path}: the certificate expired on {expiry}",
            path=tls.certificate,
            expiry=expiry.isoformat(),
        )
    try:
        ciphers = AcceptableCiphers.fromOpenSSLCipherString(tls.ciphers) if tls.ciphers else None
        options = CertificateOptions(
            privateKey=PKey.from_cryptography_key(key),
            certificate=X509.from_cryptography(chain[0]),
            extraCertChain=[X509.from_cryptography(c) for c in chain[1:]],
            acceptableCiphers=ciphers,
            raiseMinimumTo=_VERSIONS[tls.minVersion],
        )
    except ValueError as e:  # the ciphers: none usable
        raise ConfigError(path, "tls.ciphers", f'"{tls.ciphers}": {e}') from None
    try:
        options.getContext()
    except SSL.Error as e:  # e.g. a key too small for OpenSSL's security level
        raise ConfigError(
            path, "tls.certificate", f'OpenSSL refuses "{tls.certificate}": {_reasons(e)}'
        ) from None
    return options


def clientOptions(config: Config) -> IOpenSSLClientConnectionCreator | None:
    """
    The TLS client side of C{[upstream_tls]}, towards the MTA.

      - C{"none"}: L{None}, no STARTTLS.
      - C{"opportunistic"}: encrypts, and verifies nothing: any certificate, any name.
        That protects against passive listeners only; an active attacker on the path
        can pose as the MTA.
      - C{"required"}: the MTA's certificate must chain up to C{ca_file}'s certificates
        (or the system's trust store) and carry C{name} (a DNS name, or an IP address),
        checked by C{service_identity}; else the handshake fails.

    Both accept TLS 1.2 or later (Twisted's default).

    @raise ConfigError: naming C{upstream_tls.ca_file}, when it cannot be read.
    """
    upstream = config.upstreamTls
    if upstream.mode is UpstreamTLSMode.NONE:
        return None
    if upstream.mode is UpstreamTLSMode.OPPORTUNISTIC:
        return CertificateOptions()
    if upstream.name is None:  # config.load refuses this
        raise ConfigError(config.path, "upstream_tls.name", 'missing: needed by mode = "required"')
    if upstream.caFile is None:
        trust = platformTrust()
    else:
        try:
            authorities = readCertificates(upstream.caFile)
        except ValueError as e:
            raise ConfigError(config.path, "upstream_tls.ca_file", str(e)) from None
        trust = trustRootFromCertificates(
            [Certificate(X509.from_cryptography(c)) for c in authorities]
        )
    return optionsForClientTLS(upstream.name, trustRoot=trust)


def describe(transport: object) -> tuple[str, str] | None:
    """
    The protocol version (C{"TLSv1.3"}) and the cipher (C{"TLS_AES_256_GCM_SHA384"}) of
    an established TLS connection, from its transport (that of a protocol behind
    L{TLSMemoryBIOFactory}, or a TCP transport after C{startTLS}).

    @return: L{None} for a connection without TLS, or whose handshake is not done.
    """
    if not ISystemHandle.providedBy(transport):
        return None
    handle = transport.getHandle()
    if not isinstance(handle, SSL.Connection):
        return None
    cipher = handle.get_cipher_name()
    if cipher is None:
        return None
    return handle.get_protocol_version_name(), cipher


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    The TLS server side of a listener that outlives reloads: each new connection gets
    the server options that C{current} returns then (the relay factory's current
    C{Settings.serverTls}), so a certificate renewed and reloaded applies to the
    connections accepted after the reload.
    """

    def __init__(self, current: Callable[[], IOpenSSLServerConnectionCreator | None]) -> None:
        self._current = current

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        options = self._current()
        if options is None:
            # The service refuses a reload that would take the certificate away from
            # running listen_tls listeners; this is a bug, and the connection is lost.
            raise RuntimeError("no TLS server options: [tls] has no certificate")
        connection: SSL.Connection = options.serverConnectionForTLS(tlsProtocol)
        return connection


def implicitTLS(
    factory: IProtocolFactory, options: IOpenSSLServerConnectionCreator, clock: IReactorTime
) -> TLSMemoryBIOFactory:
    """
    C{factory} behind TLS from the first byte (RFC 8314's implicit TLS, port 465): its
    protocols get a TLS transport, and what they write before the handshake is done is
    sent, encrypted, once it is.
    """
    return TLSMemoryBIOFactory(options, False, factory, clock)
