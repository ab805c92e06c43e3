"""
Write the seed corpus, C{fuzz/corpus/TARGET/}, from the sessions and messages of the
tests (and a few replies of real MTAs): C{python -m fuzz.seed}. Run it again when the
tests gain interesting inputs; the fuzzer's own finds (C{fuzz.run --grow}) sit beside them.

Each seed is encoded as the targets read their input (L{fuzz.targets._Input}): a flags
byte, a count of cuts and their places, then the payload; each payload is written with a
few flag values and cuts, so that both modes and split feeds start covered.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

from fuzz.run import CORPUS

#: Flags tried for each payload, per target (see each target's docstring).
FLAGS = {"commands": (0, 2, 0x16), "replies": (0x3F, 0x12, 0x7F), "data": (0, 1),
         "chunks": (0, 1, 2), "mime": (0, 6, 9), "headers": (0, 4, 10)}  # fmt: skip

#: Replies of real MTAs: banners, EHLO, queue ids, multi-line refusals.
REPLIES = [
    b"220 mta.test ESMTP Postfix\r\n",
    b"250-mta.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
    b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME "
    b"PORT LOGIN DESTADDR DESTPORT\r\n250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n",
    b"250-exim.test Hello x [127.0.0.1]\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
    b"250-PIPELINING\r\n250-PIPECONNECT\r\n250-CHUNKING\r\n250-PRDR\r\n250 HELP\r\n",
    b"250-opensmtpd.test Hello x [127.0.0.1], pleased to meet you\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SIZE 36700160\r\n250-DSN\r\n250 HELP\r\n",
    b"250 2.0.0 Ok: queued as 4XyZ1b2C3dz\r\n",
    b"250 OK id=1rABCd-000123-4X\r\n",
    b"250 2.0.0 0f9f4ae5 Message accepted for delivery\r\n",
    b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n",
    b"421 4.3.2 Service shutting down\r\n221 2.0.0 Bye\r\n",
    b"250\r\n250-\r\n250 x\n334 VXNlcm5hbWU6\r\n235 2.7.0 ok\r\n",
    b"250-a\r\n251 b\r\n",
    b"2500 x\r\n",
]

#: Single commands, every verb mailproxy handles or relays, with the parameters it reads.
COMMANDS = [
    b"EHLO client.example", b"HELO client.example", b"MAIL FROM:<a@b.example> SIZE=100",
    b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x+2By", b"MAIL FROM:<@r.example:a@b.>",
    b"MAIL FROM: <a@b>  BODY=BINARYMIME", b"MAIL FROM:a@b", b"RCPT TO:<c@d> NOTIFY=SUCCESS,DELAY "
    b"ORCPT=rfc822;c@d", b"RCPT TO:<postmaster>", b"DATA", b"BDAT 10", b"BDAT 0 LAST",
    b"BDAT 99999999999999999999 last", b"BDAT 5 LASTX", b"RSET", b"QUIT", b"NOOP", b"HELP MAIL",
    b"VRFY a", b"EXPN list", b"ETRN #x", b"STARTTLS", b"AUTH PLAIN AGEAYg==", b"AUTH LOGIN",
    b"XCLIENT ADDR=192.0.2.66 NAME=forged.example", b"XFORWARD ADDR=192.0.2.66 HELO=x",
    b"mail\tfrom:<a@b>", b"MAIL FROM :<a@b>", b" RCPT TO:<a@b>", b"DATA\x00", b"QUIT\r",
]  # fmt: skip


def _fromTests() -> dict[str, list[bytes]]:
    """Sessions and messages the tests use."""
    from tests import (
        test_chunking,
        test_contract,
        test_headers,
        test_mime,
        test_relay,
        test_session,
        test_wire,
    )

    sessions = [test_session.STREAM, test_chunking.STREAM, test_wire.COMMANDS]
    try:
        from tests.system import test_peers

        for mail, rcpt, data, eol in test_peers._variants().values():
            sessions.append(
                b"EHLO client.example" + eol + mail.replace(b"{s}", b"x@denied.example")
                + eol + rcpt.replace(b"{r}", b"alice@test.example") + eol + data + eol
            )  # fmt: skip
    except ImportError:
        pass
    messages: list[bytes] = [test_relay.MESSAGE]
    for module in (test_mime, test_headers, test_contract, test_wire):
        for _, value in inspect.getmembers(module):
            if isinstance(value, bytes) and len(value) > 20:
                messages.append(value)
            elif isinstance(value, tuple) and all(isinstance(v, bytes) for v in value):
                messages.extend(value)
    smuggled = [
        b"Subject: s\r\n\r\nbody" + seq + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n"
        b"smuggled\r\n.\r\nreal\r\n.\r\nQUIT\r\n"
        for seq in test_wire.SMUGGLING
    ]
    data = [m if m.endswith(b"\r\n.\r\n") else m + b"\r\n.\r\n" for m in messages] + smuggled
    return {
        "commands": sessions + [c + b"\r\n" for c in COMMANDS] + [b"\r\n".join(COMMANDS)],
        "replies": REPLIES,
        "data": [*data, b".\r\n", b"..\r\n.\r\n", b"a\r.\r\n.\r\n", b"a\n.\n.\r\n"],
        "chunks": [*messages, *smuggled, b"a\r", b"\r\n..\r\n.\r\n", b"\n\r"],
        "mime": messages,
        "headers": messages,
    }


def encode(flags: int, cuts: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([flags, len(cuts)]) + bytes(cuts) + payload


def main() -> int:
    written = 0
    for name, payloads in _fromTests().items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for payload in dict.fromkeys(payloads):
            for index, flags in enumerate(FLAGS[name]):
                cuts = ((), (128,), (3, 77, 200))[index % 3]
                seed = encode(flags, cuts, payload)
                path = folder / ("seed-" + hashlib.sha1(seed).hexdigest()[:16])  # noqa: S324
                if not path.exists():
                    path.write_bytes(seed)
                    written += 1
    print(f"wrote {written} new seeds under {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
