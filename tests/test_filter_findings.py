"""
What the fuzz targets found in the filters (issue 9), each a regression test named for
what it protects: a header or MIME parameter in a charset the standard library cannot
decode with (idna and punycode refuse "replace"; a NUL cannot even name a codec) made the
mime and headers filters raise, so that C{on_error} decided the message, which with
C{"accept"} let a blocked attachment or subject through.
"""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Verdict
from mailproxy.filters.mime import walk
from mailproxy.filters.support import decodeText
from tests.test_headers import SPAM_RULE
from tests.test_headers import build as buildHeaders
from tests.test_mime import build as buildMime
from tests.test_mime import crlf

#: Charsets Python cannot decode with "replace" (idna), or cannot look up (a NUL). (The
#: header grammar now refuses a NUL in any header block before the filters read it: the
#: walk and the filters are tried with idna only.)
CHARSETS = ("idna", "V\x00")


def attachment(disposition: str) -> bytes:
    return crlf(
        'From: a@example.org\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
        f"--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: application/octet-stream\n"
        f"Content-Disposition: {disposition}\n\nTVqQ\n--b--\n"
    )


class _FilterCase(SynchronousTestCase):
    def scan(self, f: object, message: bytes) -> Verdict:
        path = self.mktemp()
        with open(path, "wb") as out:
            out.write(message)
        d = f.checkMessage(  # type: ignore[attr-defined]
            Session("s", "127.0.0.1", 1), Envelope("a@x"), Message(path, len(message))
        )
        return self.successResultOf(d)  # type: ignore[no-any-return]


class UndecodableCharsetTests(_FilterCase):
    def test_encodedWordsNeverRaise(self) -> None:
        """An encoded word in such a charset reads as its bytes in UTF-8, replaced."""
        for charset in CHARSETS:
            self.assertEqual(decodeText(f"=?{charset}?q?invoice=2Eexe?="), "invoice.exe")
        # punycode decodes ASCII, but not 8-bit bytes (UnicodeDecodeError).
        self.assertEqual(decodeText("=?punycode?q?x=FF?="), "x\ufffd")

    def test_rfc2231ParameterNeverRaises(self) -> None:
        """An RFC 2231 parameter in such a charset reads as its text, undecoded."""
        for charset in CHARSETS[:1]:
            parts = list(walk(io.BytesIO(attachment(f"attachment; filename*={charset}''x.exe"))))
            self.assertEqual(parts[-1].filenames, ("x.exe",), charset)

    def test_blockedAttachmentStillRefused(self) -> None:
        """The mime filter refuses a blocked attachment named in such a charset, both ways."""
        f = buildMime(block_filenames=["*.exe"])
        for disposition in ("attachment; filename*=idna''x.exe",
                            'attachment; filename="=?idna?q?x.exe?="'):  # fmt: skip
            verdict = self.scan(f, attachment(disposition))
            self.assertTrue(verdict.refuses, disposition)
            self.assertEqual(verdict.code, 550)

    def test_subjectRuleStillApplies(self) -> None:
        """The headers filter's Subject rule matches a subject encoded in such a charset."""
        f = buildHeaders(reject=[SPAM_RULE])
        for charset in CHARSETS[:1]:
            message = crlf(f"From: a@example.org\nSubject: =?{charset}?q?viagra?=\n\nHi.\n")
            verdict = self.scan(f, message)
            self.assertTrue(verdict.refuses, charset)
            self.assertEqual(verdict.text, "Spam subject refused")


class MixedContinuationTests(SynchronousTestCase):
    def test_everyNameFound(self) -> None:
        """
        A numbered and an unnumbered RFC 2231 section of one parameter (C{filename*0=}
        and C{filename*=}), which the stdlib cannot join (TypeError), never makes the walk
        raise: each parameter is read alone, and every name is found.
        """
        message = attachment("attachment; filename*0=x; filename*=utf-8''y.exe; name=\"z.exe\"")
        self.assertEqual(list(walk(io.BytesIO(message)))[-1].filenames, ("x", "y.exe", "z.exe"))


class LiteralEscapeTests(_FilterCase):
    def test_backslashUBesideEncodedWords(self) -> None:
        """
        Text with a literal C{\\u} beside an encoded word (which the stdlib hands back so
        that it does not decode) reads as written, and the Subject rule still applies.
        """
        self.assertEqual(decodeText("=?utf-8?q?viagra?= \\u12"), "viagra \\u12")
        self.assertEqual(decodeText("=?utf-8?q?viagra?= \\udef1"), "viagra \ufffd")
        f = buildHeaders(reject=[SPAM_RULE])
        message = crlf("From: a@example.org\nSubject: =?utf-8?q?viagra?= \\u12\n\nHi.\n")
        verdict = self.scan(f, message)
        self.assertEqual(verdict.text, "Spam subject refused")


class ForeignCodecTests(_FilterCase):
    """
    Python decodes with codecs no mail client applies to a header: =?punycode?q?...?= is
    CJK text to Python and plain ASCII to a mail client. A filter reading it Python's way
    would miss a name the recipient sees (found by fuzz/, issue 9): only the charsets mail
    clients know are decoded as such; the others read as UTF-8.
    """

    def test_encodedWord(self) -> None:
        for charset in ("punycode", "utf-7", "unicode_escape", "rot13", "hz"):
            self.assertEqual(decodeText(f"=?{charset}?q?invoice.exe?="), "invoice.exe", charset)
        self.assertEqual(decodeText("=?iso-8859-1?q?caf=E9?="), "café")
        self.assertEqual(decodeText("=?windows-1251?b?z/Do4uXy?="), "Привет")

    def test_blockedAttachment(self) -> None:
        f = buildMime(block_filenames=["*.exe"])
        for disposition in ("attachment; filename*=punycode''invoice.exe",
                            'attachment; filename="=?punycode?q?invoice.exe?="'):  # fmt: skip
            verdict = self.scan(f, attachment(disposition))
            self.assertTrue(verdict.refuses, disposition)

    def test_subjectRule(self) -> None:
        f = buildHeaders(reject=[SPAM_RULE])
        message = crlf("From: a@example.org\nSubject: =?punycode?q?viagra?=\n\nHi.\n")
        self.assertTrue(self.scan(f, message).refuses)
