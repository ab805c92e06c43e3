"""
The MTA side of the milter protocol (Sendmail's libmilter, version 6), just enough to
have a real signing milter (Debian's opendkim) sign a message: negotiate, send the
envelope, the headers and the body, and collect the header fields it inserts.

It is blocking (a socket with a timeout on every read): run it in a thread.
"""

from __future__ import annotations

import socket
import struct

# Commands (MTA → filter) and replies (filter → MTA), from libmilter's mfdef.h.
OPTNEG, MACRO, CONNECT, HELO, MAIL, RCPT, DATA = b"O", b"D", b"C", b"H", b"M", b"R", b"T"
HEADER, EOH, BODY, BODYEOB, QUIT = b"L", b"N", b"B", b"E", b"Q"
CONTINUE, ACCEPT, ADDHEADER, INSHEADER, PROGRESS = b"c", b"a", b"h", b"i", b"p"
#: The actions offered: add headers (all opendkim needs) and every other modification.
ACTIONS = 0x1FF
#: The milter protocol version spoken.
VERSION = 6


class MilterError(Exception):
    """The filter answered something this client does not expect."""


class MilterClient:
    """One connection to a milter; L{sign} runs one message through it."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self._send(QUIT)
        finally:
            self._sock.close()

    def _send(self, command: bytes, data: bytes = b"") -> None:
        self._sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

    def _read(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            chunk = self._sock.recv(count - len(out))
            if not chunk:
                raise MilterError("the milter closed the connection")
            out += chunk
        return out

    def _packet(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", self._read(4))
        data = self._read(length)
        return data[:1], data[1:]

    def _reply(self, inserted: list[tuple[str, str]] | None = None) -> None:
        """Read until the verdict for the last command; header insertions go to C{inserted}."""
        while True:
            command, data = self._packet()
            if command in (CONTINUE, ACCEPT):
                return
            if command == PROGRESS:
                continue
            if command in (ADDHEADER, INSHEADER) and inserted is not None:
                if command == INSHEADER:
                    data = data[4:]
                name, value, _ = data.split(b"\0", 2)
                inserted.append((name.decode(), value.decode()))
                continue
            raise MilterError(f"unexpected milter reply {command!r} {data[:200]!r}")

    def sign(
        self, sender: str, recipient: str, headers: list[tuple[str, str]], body: bytes
    ) -> list[tuple[str, str]]:
        """
        Run one message through the milter as an MTA would, from client 127.0.0.1.

        @param headers: the message's header fields, names and (unfolded) values.
        @param body: the body, CRLF lines.
        @return: the header fields the milter added, as it gave them.
        """
        self._send(OPTNEG, struct.pack("!III", VERSION, ACTIONS, 0))
        command, data = self._packet()
        if command != OPTNEG:
            raise MilterError(f"no option negotiation: {command!r}")
        _, _, protocol = struct.unpack("!III", data[:12])
        if protocol & 0x1FF000:  # SMFIP_NR_*: it asked not to reply to some steps
            raise MilterError(f"the milter wants no-reply steps ({protocol:#x}), not offered")
        self._send(MACRO, CONNECT + b"j\0mx.client.example\0")
        self._send(CONNECT, b"client.example\0" + b"4" + struct.pack("!H", 25) + b"127.0.0.1\0")
        self._reply()
        self._send(HELO, b"client.example\0")
        self._reply()
        self._send(MACRO, MAIL + b"i\0MILTERTEST\0")
        self._send(MAIL, f"<{sender}>\0".encode())
        self._reply()
        self._send(RCPT, f"<{recipient}>\0".encode())
        self._reply()
        self._send(DATA)
        self._reply()
        for name, value in headers:
            self._send(HEADER, name.encode() + b"\0" + value.encode() + b"\0")
            self._reply()
        self._send(EOH)
        self._reply()
        for at in range(0, len(body), 65535):
            self._send(BODY, body[at : at + 65535])
            self._reply()
        inserted: list[tuple[str, str]] = []
        self._send(BODYEOB)
        self._reply(inserted)
        return inserted
