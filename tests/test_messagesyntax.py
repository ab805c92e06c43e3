"""
Contract 12 through the whole proxy, in memory: an ambiguous header block or a NUL is
refused before any filter runs and never reaches the MTA, or rewritten so that the
filters and the MTA read the same bytes; and the bypasses of the mime and headers
filters (a blocked attachment, a Subject rule, a forged Authentication-Results, hidden by
an invalid field name or whitespace before the colon) are closed.

Each test asserts what a postmaster checks: the client's replies, the bytes the MTA
received, the spool directory afterwards.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import HeaderSyntax, NulBytes
from mailproxy.filters import IFilter, Stage, Verdict
from mailproxy.testing import FakeFilter, RawClient, ScriptedMTA
from tests.test_headers import build as headersFilter
from tests.test_mime import build as mimeFilter
from tests.test_mime import crlf, stuffed
from tests.test_relay import Harness, envelope

CHUNKING = (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING")
NORMALISE = {"headerSyntax": HeaderSyntax.NORMALISE}
STRIP = {"nulBytes": NulBytes.STRIP}


def recording() -> FakeFilter:
    """A filter that accepts everything and records what it was asked."""
    return FakeFilter(name="recorder", verdicts={Stage.MESSAGE: Verdict.accept()})


def attachment(hide: str) -> bytes:
    """A message with an .exe attachment; C{hide} is written before its Content-Type."""
    return crlf(
        f"From: a@example.org\nSubject: invoice\n{hide}MIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nPlease pay.\n"
        "--b\nContent-Type: application/octet-stream; name=invoice.exe\n\nMZ\n--b--\n"
    )


class Sent:
    """One DATA transaction through a L{Harness}: what the client got."""

    def __init__(self, case: SynchronousTestCase, *filters: IFilter, **config: object) -> None:
        self.h = Harness(case, *filters, **config)
        self.client: RawClient = self.h.greeted()

    def data(self, message: bytes, *pieces: bytes) -> tuple[int, bytes]:
        """Send C{message} (dot-stuffed) after DATA, in C{pieces} if given; the last reply."""
        self.h.send(self.client, envelope() + b"DATA\r\n")
        for piece in pieces or (stuffed(message),):
            self.h.send(self.client, piece)
        reply = self.client.replies[-1]
        return reply.code, reply.lines[0]

    def mtaGotNothing(self, case: SynchronousTestCase) -> None:
        case.assertEqual(self.h.mta.messages, [])
        case.assertNotIn(b"DATA", bytes(self.h.mta.transcripts[0]))
        case.assertEqual(self.h.spooled(), [])
        self.h.send(self.client, b"NOOP\r\n")
        case.assertEqual(self.client.codes[-1], 250)  # the session goes on


class HeaderSyntaxTests(SynchronousTestCase):
    def test_refusedBeforeAnyFilter(self) -> None:
        """
        An ambiguous header block: 554 5.6.0 naming the problem and the line; no filter
        is asked about the message; the MTA never sees it; no spool file is left.
        """
        for message, text in [
            (b"From: a\r\nX\x01Y: b\r\n\r\nhi\r\n", b"5.6.0 Error: ambiguous header field name in line 2"),
            (b"From: a\r\nTo : b\r\n\r\nhi\r\n", b"5.6.0 Error: whitespace before the colon of a header field in line 2"),
            (b" x\r\nFrom: a\r\n\r\nhi\r\n", b"5.6.0 Error: continuation line before any header field in line 1"),
            (b"From: a\r\nnot a field\r\n\r\nhi\r\n", b"5.6.0 Error: header line without a colon in line 2"),
            (b"From: a\r\n \r\n\r\nhi\r\n", b"5.6.0 Error: header line of only whitespace in line 2"),
        ]:  # fmt: skip
            recorder = recording()
            sent = Sent(self, recorder)
            self.assertEqual(sent.data(message), (554, text), message)
            self.assertEqual(recorder.calls, [])  # no MESSAGE check ran
            sent.mtaGotNothing(self)

    def test_tooLarge(self) -> None:
        """A header block over 128 KiB: 554 5.6.0, never at the MTA."""
        message = b"".join(b"X-%d: %s\r\n" % (i, b"x" * 100) for i in range(1400)) + b"\r\nhi\r\n"
        sent = Sent(self, recording(), limits={"messageSize": 10**6})
        code, text = sent.data(message)
        self.assertEqual(
            (code, text), (554, b"5.6.0 Error: message header block too large (limit 131072 bytes)")
        )
        sent.mtaGotNothing(self)

    def test_normalisedReadAndReleasedAlike(self) -> None:
        """
        With header_syntax = normalise the filters read, and the MTA receives, the same
        rewritten message: whitespace before the colon gone, an empty line before the
        first line that is no field (it is body for everyone).
        """
        message = b"Subject : hi\r\nX\xffY: z\r\nTo: b\r\n\r\nbody\r\n"
        normalised = b"Subject: hi\r\n\r\nX\xffY: z\r\nTo: b\r\n\r\nbody\r\n"
        recorder = recording()
        sent = Sent(self, recorder, **NORMALISE)
        self.assertEqual(sent.data(message)[0], 250)
        self.assertEqual(recorder.calls[-1], (Stage.MESSAGE, normalised))
        [received] = sent.h.mta.messages
        self.assertEqual(received.content, normalised)
        self.assertEqual(sent.h.spooled(), [])

    def test_normalisedReleasedWithBdat(self) -> None:
        """
        Released with BDAT, the size is that of the rewritten message, which is what
        the MTA receives, header block split across chunks and all.
        """
        h = Harness(self, recording(), mta=ScriptedMTA(CHUNKING), **NORMALISE)
        client = h.greeted()
        h.send(client, envelope() + b"BDAT 5\r\nSubje" + b"BDAT 17 LAST\r\nct  : x\r\n\r\nbody\r\n")
        self.assertEqual(client.codes[-1], 250)
        transcript = bytes(h.mta.received)
        match = re.search(rb"BDAT ([0-9]+) LAST\r\n", transcript)
        assert match is not None
        self.assertEqual(h.mta.messages, [b"Subject: x\r\n\r\nbody\r\n"])
        self.assertEqual(int(match.group(1)), len(b"Subject: x\r\n\r\nbody\r\n"))
        self.assertEqual(h.spooled(), [])

    def test_bdatRefused(self) -> None:
        """In chunks as in DATA: refused at BDAT LAST, the MTA gets RSET, never the content."""
        h = Harness(self, recording(), mta=ScriptedMTA(CHUNKING))
        client = h.greeted()
        h.send(client, envelope() + b"BDAT 9 LAST\r\nA : b\r\n\r\n")
        self.assertEqual(client.codes[-1], 554)
        self.assertTrue(bytes(h.mta.received).endswith(b"RSET\r\n"))
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])


class BypassTests(SynchronousTestCase):
    """The bypasses of issue 9, through the real filters."""

    def test_attachmentHidden(self) -> None:
        """
        A blocked attachment whose multipart Content-Type hides behind an invalid field
        name or whitespace before the colon: refused 554 5.6.0 by default; normalised,
        the mime filter finds it (550) where the colon was spaced, and where a bad name
        hid it, the normalised message has no attachment for any reader.
        """
        cases = [
            ("X\x01: y\n", b"5.6.0 Error: ambiguous header field name in line 3"),
            ("X-Ok-Ish\xff: y\n", b"5.6.0 Error: ambiguous header field name in line 3"),
            ("Odd line\n", b"5.6.0 Error: header line without a colon in line 3"),
        ]
        for hide, text in cases:
            message = attachment(hide).replace("\xff".encode(), b"\xff")  # a raw 8-bit byte
            sent = Sent(self, mimeFilter(block_filenames=["*.exe"]))
            self.assertEqual(sent.data(message), (554, text), hide)
            sent.mtaGotNothing(self)
            sent = Sent(self, mimeFilter(block_filenames=["*.exe"]), **NORMALISE)
            self.assertEqual(sent.data(message)[0], 250, hide)
            [received] = sent.h.mta.messages
            head = received.content.split(b"\r\n\r\n", 1)[0]
            self.assertNotIn(b"Content-Type", head)  # no reader sees a multipart
        spaced = crlf(
            "From: a@example.org\nMIME-Version: 1.0\n"
            "Content-Type : multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\nPlease pay.\n"
            "--b\nContent-Type: application/octet-stream; name=invoice.exe\n\nMZ\n--b--\n"
        )
        sent = Sent(self, mimeFilter(block_filenames=["*.exe"]))
        self.assertEqual(
            sent.data(spaced),
            (554, b"5.6.0 Error: whitespace before the colon of a header field in line 3"),
        )
        sent.mtaGotNothing(self)
        sent = Sent(self, mimeFilter(block_filenames=["*.exe"]), **NORMALISE)
        self.assertEqual(
            sent.data(spaced),
            (550, b'5.7.1 Attachment "invoice.exe" refused: file type not accepted here'),
        )
        sent.mtaGotNothing(self)

    def test_attachmentHiddenInAPart(self) -> None:
        """
        The same tricks in a MIME part's header, which the session does not rewrite:
        the mime filter refuses the message, 554 5.6.0, in either mode.
        """
        for hide in ["Content-Disposition : attachment; filename=a.exe\n", "X\x01: y\nContent-Disposition: attachment; filename=a.exe\n"]:
            message = crlf(
                "From: a@example.org\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
                f"--b\nContent-Type: application/octet-stream\n{hide}\nMZ\n--b--\n"
            )
            for config in ({}, NORMALISE):
                sent = Sent(self, mimeFilter(block_filenames=["*.exe"]), **config)
                code, text = sent.data(message)
                self.assertEqual(code, 554, hide)
                self.assertRegex(text, rb"^5\.6\.0 Error: .* in line 2 of a MIME part's header$")
                sent.mtaGotNothing(self)

    def test_subjectRuleBypass(self) -> None:
        """
        A Subject rule dodged with "Subject : ..." or by an invalid line before it:
        554 5.6.0; normalised, the rule refuses the spaced one (550), and the other's
        Subject is body for every reader.
        """
        rule = {"header": "Subject", "pattern": "(?i)viagra", "text": "Spam subject refused"}
        spaced = crlf("From: a@example.org\nSubject : cheap viagra\n\nbuy\n")
        hidden = b"From: a@example.org\r\nX\x02: y\r\nSubject: cheap viagra\r\n\r\nbuy\r\n"
        for message, line in [(spaced, 2), (hidden, 2)]:
            sent = Sent(self, headersFilter(reject=[rule]))
            code, text = sent.data(message)
            self.assertEqual(code, 554)
            self.assertIn(b"in line %d" % line, text)
            sent.mtaGotNothing(self)
        sent = Sent(self, headersFilter(reject=[rule]), **NORMALISE)
        self.assertEqual(sent.data(spaced), (550, b"5.7.1 Spam subject refused"))
        sent.mtaGotNothing(self)
        sent = Sent(self, headersFilter(reject=[rule]), **NORMALISE)
        self.assertEqual(sent.data(hidden)[0], 250)
        [received] = sent.h.mta.messages
        self.assertNotIn(b"viagra", received.content.split(b"\r\n\r\n", 1)[0])

    def test_forgedResultsHidden(self) -> None:
        """
        A forged Authentication-Results with our authserv-id, spaced or behind an
        invalid name: 554 5.6.0; normalised, the headers filter sees the spaced one: it
        is removed on release (or, with forged_results = "reject", refused).
        """
        forged = "Authentication-Results : mx.example.org; spf=pass\n"
        spaced = crlf(f"From: a@example.org\n{forged}Subject: hi\n\nbody\n")
        hidden = crlf("From: a@example.org\nX\x7f: y\nAuthentication-Results: mx.example.org; dkim=pass\n\nbody\n")
        for message in (spaced, hidden):
            sent = Sent(self, headersFilter())
            self.assertEqual(sent.data(message)[0], 554)
            sent.mtaGotNothing(self)
        sent = Sent(self, headersFilter(forged_results="reject"), **NORMALISE)
        self.assertEqual(
            sent.data(spaced),
            (550, b"5.7.1 Message carries a forged Authentication-Results header (mx.example.org)"),
        )
        sent.mtaGotNothing(self)
        sent = Sent(self, headersFilter(), **NORMALISE)
        self.assertEqual(sent.data(spaced)[0], 250)
        [received] = sent.h.mta.messages
        self.assertEqual(
            received.content,
            crlf("Authentication-Results: mx.example.org; none\nFrom: a@example.org\nSubject: hi\n\nbody\n"),
        )


class NulTests(SynchronousTestCase):
    def test_dataRefused(self) -> None:
        """A NUL anywhere in DATA, even split across reads: 554 5.6.0, before any filter."""
        for pieces in [
            (b"Subject: a\x00b\r\n\r\nhi\r\n.\r\n",),
            (b"Subject: a\r\n\r\nhi\r\n", b"\x00", b"\r\n.\r\n"),
            (b"Subject: a\r\n\r\nhi\r\n\x00.\r\n.\r\n",),
        ]:
            recorder = recording()
            sent = Sent(self, recorder)
            self.assertEqual(
                sent.data(b"", *pieces), (554, b"5.6.0 Error: NUL character in message content")
            )
            self.assertEqual(recorder.calls, [])  # no MESSAGE check ran
            sent.mtaGotNothing(self)

    def test_dataStripped(self) -> None:
        """
        With nul_bytes = strip the filters and the MTA read the content without its
        NULs; a dot line that a NUL kept from ending the message stays a line (the
        release stuffs it), wherever the reads are cut.
        """
        raw = b"Subj\x00ect: a\r\n\r\nhi\x00\r\n\x00.\r\nafter\r\n.\r\n"
        stripped = b"Subject: a\r\n\r\nhi\r\n.\r\nafter\r\n"
        for cut in range(1, len(raw)):
            recorder = recording()
            sent = Sent(self, recorder, **STRIP)
            self.assertEqual(sent.data(b"", raw[:cut], raw[cut:])[0], 250, cut)
            self.assertEqual(recorder.calls[-1], (Stage.MESSAGE, stripped))
            [received] = sent.h.mta.messages
            self.assertEqual(received.content, stripped)
            self.assertIn(b"\r\n..\r\nafter", bytes(sent.h.mta.transcripts[0]))

    def test_bdat(self) -> None:
        """
        In BDAT chunks: refused 554 5.6.0, or stripped (the MTA's BDAT size counts the
        stripped bytes it receives), a NUL ending one chunk and starting the next.
        """
        chunks = b"BDAT 7\r\nA: b\x00\r\n" + b"BDAT 8 LAST\r\n\x00\r\nhi\x00\r\n"
        h = Harness(self, recording(), mta=ScriptedMTA(CHUNKING))
        client = h.greeted()
        h.send(client, envelope() + chunks)
        self.assertEqual(client.replies[-1].lines[0], b"5.6.0 Error: NUL character in message content")
        self.assertEqual(h.mta.messages, [])
        self.assertEqual(h.spooled(), [])
        h = Harness(self, recording(), mta=ScriptedMTA(CHUNKING), **STRIP)
        client = h.greeted()
        h.send(client, envelope() + chunks)
        self.assertEqual(client.codes[-1], 250)
        self.assertEqual(h.mta.messages, [b"A: b\r\n\r\nhi\r\n"])
        self.assertIn(b"BDAT 12 LAST\r\n", bytes(h.mta.received))

    def test_binaryMime(self) -> None:
        """
        BODY=BINARYMIME: NULs in the body are octets like any (RFC 3030) and reach the
        MTA; one in the header block is refused, or stripped from it only.
        """
        mta = (*CHUNKING, b"BINARYMIME", b"8BITMIME")
        mail = b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@example.net>\r\n"
        body = b"\x00\xff\x00\n\r"
        for config, header, code, expected in [
            ({}, b"A: b\r\n\r\n", 250, b"A: b\r\n\r\n" + body),
            ({}, b"A: \x00b\r\n\r\n", 554, None),
            (STRIP, b"A: \x00b\r\n\r\n", 250, b"A: b\r\n\r\n" + body),
        ]:
            h = Harness(self, recording(), mta=ScriptedMTA(mta), **config)
            client = h.greeted()
            content = header + body
            h.send(client, mail + b"BDAT %d LAST\r\n%s" % (len(content), content))
            self.assertEqual(client.codes[-1], code, (config, header))
            self.assertEqual(h.mta.messages, [expected] if expected else [])
            self.assertEqual(h.spooled(), [])


class ScannerTests(SynchronousTestCase):
    """The scanners' NUL flag and stripping, a buffer at a time."""

    def test_dataScanner(self) -> None:
        """DATA: a NUL is noted wherever it falls, or stripped after the unstuffing."""
        from mailproxy.wire import DataScanner

        for strip, content, nul in [(False, b"a\r\n\x00\r\n", True), (True, b"a\r\n\r\n", False)]:
            scanner = DataScanner(False, stripNul=strip)
            out = b""
            for piece in (b"a\r", b"\n\x00", b"\r\n.\r\n"):
                out += scanner.feed(piece)[0]
            self.assertEqual((out, scanner.nul), (content, nul))
        scanner = DataScanner(False, stripNul=True)
        self.assertEqual(scanner.feed(b"x\r\n\x00..\r\n.\r\n")[0], b"x\r\n..\r\n")

    def test_chunkScanner(self) -> None:
        """BDAT: noted or stripped; a BINARYMIME scanner leaves NULs alone."""
        from mailproxy.wire import ChunkScanner

        scanner = ChunkScanner(False)
        scanner.feed(b"a\x00\r")
        self.assertTrue(scanner.nul)
        scanner = ChunkScanner(False, stripNul=True)
        self.assertEqual(scanner.feed(b"a\x00\r") + scanner.feed(b"\n\x00") + scanner.end(), b"a\r\n")
        self.assertFalse(scanner.nul)
        raw = ChunkScanner(False, raw=True, stripNul=True)
        self.assertEqual(raw.feed(b"\x00\n"), b"\x00\n")
        self.assertFalse(raw.nul)
