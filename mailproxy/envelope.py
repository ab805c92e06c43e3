"""
The SMTP domain model shared by the relay and the filters.

A L{Session} lives as long as one client connection; an L{Envelope} as long as one
mail transaction (MAIL to end of data or RSET); a L{Message} is the spooled content
of one transaction, handed to message-stage filters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import attrs


@attrs.define
class Session:
    """One client connection, as filters see it."""

    id: str
    clientAddress: str
    clientPort: int
    helo: str | None = None
    esmtp: bool = False
    #: The client's TLS, once established: its protocol version and cipher
    #: (C{("TLSv1.3", "TLS_AES_256_GCM_SHA384")}); None in cleartext.
    tls: tuple[str, str] | None = None
    #: The client's forward-confirmed host name, once looked up (for the MTA's XCLIENT or
    #: XFORWARD); None while unknown, and when the lookup found none.
    clientName: str | None = None
    #: The login name the client authenticated as (SMTP AUTH, accepted by the MTA).
    login: str | None = None
    #: The filter that allowed (allow-listed) this session; later filters are skipped.
    allowedBy: str | None = None
    #: Facts that filters attach for each other: C{notes["p0f"]}, the OS guess; ...
    notes: dict[str, Any] = attrs.Factory(dict)


@attrs.define
class Envelope:
    """One mail transaction: the sender, its parameters, and the accepted recipients."""

    mailFrom: str
    mailParameters: str = ""
    recipients: list[str] = attrs.Factory(list)
    #: Facts that filters attach for each other about this message:
    #: C{notes["authentication-results"]}, a list of RFC 8601 method results
    #: (C{"spf=pass smtp.mailfrom=example.org"}) that the headers filter gathers.
    notes: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class Message:
    """The spooled content of one message: CRLF lines, not dot-stuffed."""

    path: str
    size: int

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """Open the spooled content for reading; stream it, never read it whole."""
        with open(self.path, "rb") as f:
            yield f
