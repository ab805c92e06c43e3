"""
The dkim filter: body hashes streamed as dkimpy computes them whole, signatures and ARC
chains verified against keys served by the in-process DNS server (keys the tests make,
and a corpus of real signed messages), through the proxy to the MTA.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from dkim import canonicalization
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import IFilter, OptionError
from mailproxy.filters.dkim import BodyHasher, DKIMFilter, DKIMFilterFactory, _signature
from tests.dnsserver import DNSServer, freePort, txt
from tests.fakes import ProxyTestCase

CORPUS = Path(__file__).parent / "dkimcorpus"

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: a signed message\r\n"
    b"Date: Tue, 1 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"  this  line has   runs of white space \t \r\n"
    b"\r\n"
    b"and trailing empty lines.\r\n"
    b"\r\n"
    b"\r\n"
)


@functools.cache
def rsaKey(bits: int = 2048) -> tuple[bytes, str]:
    """A private key (PEM, for dkimpy's signer) and its DNS key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


@functools.cache
def ed25519Key() -> tuple[bytes, str]:
    """A private key (base64 seed, as dkimpy takes it) and its DNS key record (RFC 8463)."""
    key = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(key.verify_key)).decode()
    return base64.b64encode(bytes(key)), f"v=DKIM1; k=ed25519; p={public}"


def sign(
    message: bytes,
    domain: str = "example.org",
    selector: str = "sel",
    algorithm: bytes = b"rsa-sha256",
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    length: bool = False,
) -> bytes:
    """C{message} with a DKIM-Signature on top, made by dkimpy."""
    private = ed25519Key()[0] if algorithm == b"ed25519-sha256" else rsaKey()[0]
    field: bytes = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        private,
        canonicalize=canonicalize,
        signature_algorithm=algorithm,
        length=length,
    )
    return field + message


def arcSeal(message: bytes, domain: str, selector: str = "arc", results: str = "") -> bytes:
    """C{message} with one more ARC set on top, sealed by C{domain} (dkimpy's signer)."""
    header = (
        f"Authentication-Results: {domain}; {results or 'spf=pass smtp.mailfrom=x.example'}\r\n"
    )
    fields = dkim.arc_sign(
        header.encode() + message, selector.encode(), domain.encode(), rsaKey()[0], domain.encode()
    )
    return b"".join(fields) + message


def signatureB(message: bytes, index: int = 0) -> str:
    """The first 8 characters of the b= tag of a message's C{index}th DKIM-Signature."""
    fields = re.findall(rb"(?ims)^DKIM-Signature:(.*?)(?=^\S)", message)
    value = re.sub(rb"\s+", b"", fields[index])
    return re.search(rb"(?:^|;)b=([^;]*)", value).group(1)[:8].decode()  # type: ignore[union-attr]


def keyRecords(**keys: str) -> dict[str, list[Any]]:
    """DNS records: C{selector__domain_with_underscores=record} → the key name's TXT."""
    return {name: [txt(record)] for name, record in keys.items()}


def spooled(case: SynchronousTestCase, content: bytes) -> Message:
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(content)
    return Message(path, len(content))


def canonicalBody(body: bytes, relaxed: bool) -> bytes:
    """What dkimpy hashes: the body as its parser gives it, then its canonicalisation."""
    body = b"\r\n".join(re.split(b"\r?\n", body))
    algorithm = canonicalization.Relaxed if relaxed else canonicalization.Simple
    result: bytes = algorithm.canonicalize_body(body)
    return result


class BodyHashTests(SynchronousTestCase):
    """L{BodyHasher} gives dkimpy's body hash however the body is cut into chunks."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from([b"a", b"b ", b" ", b"\t", b"\r\n", b"\r", b"\n", b"  x"]), max_size=40
        ),
        st.lists(st.integers(1, 7), min_size=1, max_size=10),
        st.none() | st.integers(0, 30),
    )
    def test_likeDkimpy(self, pieces: list[bytes], cuts: list[int], length: int | None) -> None:
        """Simple and relaxed, with and without l=, in chunks of any size."""
        body = b"".join(pieces)
        keys = [(b"simple", b"rsa-sha256", length), (b"relaxed", b"rsa-sha256", length)]
        hasher = BodyHasher(keys)
        at, i = 0, 0
        while at < len(body):
            size = cuts[i % len(cuts)]
            hasher.feed(body[at : at + size])
            at, i = at + size, i + 1
        digests = hasher.digests()
        for key in keys:
            canonical = canonicalBody(body, key[0] == b"relaxed")
            if length is not None:
                canonical = canonical[:length]
            self.assertEqual(digests[key], hashlib.sha256(canonical).digest(), (key, body))

    def test_longLines(self) -> None:
        """
        Lines far longer than a chunk (white space runs and all) hash as dkimpy's; the
        canonicaliser keeps a bounded tail, not the line.
        """
        # (runs of a few thousand: dkimpy's own relaxed canonicalisation, the reference
        # here, is quadratic in the length of a run)
        body = b"x" * 300_000 + b" \t " * 1000 + b"y" + b" " * 3000 + b"\r\n\r\n" + b"z" * 70_000
        body += b" " * 3000 + b"\r\n"
        keys = [(b"simple", b"rsa-sha256", None), (b"relaxed", b"ed25519-sha256", None)]
        hasher = BodyHasher(keys)
        for at in range(0, len(body), 4096):
            hasher.feed(body[at : at + 4096])
            for c in hasher._canonicalisers:
                self.assertLessEqual(len(c._pending), 64 * 1024 + 4096)
        digests = hasher.digests()
        self.assertEqual(digests[keys[0]], hashlib.sha256(canonicalBody(body, False)).digest())
        self.assertEqual(digests[keys[1]], hashlib.sha256(canonicalBody(body, True)).digest())

    def test_emptyBody(self) -> None:
        """An empty body is one CRLF in simple, nothing in relaxed (RFC 6376 3.4.3, 3.4.4)."""
        keys = [(b"simple", b"rsa-sha256", None), (b"relaxed", b"rsa-sha256", None)]
        digests = BodyHasher(keys).digests()
        self.assertEqual(digests[keys[0]], hashlib.sha256(b"\r\n").digest())
        self.assertEqual(digests[keys[1]], hashlib.sha256(b"").digest())


class DKIMCase(TestCase):
    """A dkim filter built from options, asking an in-process DNS server, with threads."""

    def serve(self, records: dict[str, list[Any]]) -> DNSServer:
        server = DNSServer(records)
        server.start(self)
        return server

    def build(self, server: DNSServer | None, **options: object) -> IFilter:
        resolver = server.resolver if server is not None else f"127.0.0.1:{freePort()}"
        return DKIMFilterFactory().build(
            {"resolver": resolver, "dns_timeout": 0.5, **options}, reactor
        )

    async def check(self, f: IFilter, content: bytes) -> Envelope:
        envelope = Envelope("a@example.org")
        verdict = await f.checkMessage(
            Session("s1", "127.0.0.1", 1), envelope, spooled(self, content)
        )
        self.assertFalse(verdict.refuses)
        return envelope

    @staticmethod
    def results(envelope: Envelope) -> list[str]:
        return list(envelope.notes.get("authentication-results", []))


class SignatureTests(DKIMCase):
    """Signatures made by the tests with their own keys, their keys served over DNS."""

    def keys(self) -> DNSServer:
        return self.serve(
            keyRecords(
                **{
                    "sel._domainkey.example.org": rsaKey()[1],
                    "ed._domainkey.example.org": ed25519Key()[1],
                }
            )
        )

    async def test_rsaPass(self) -> None:
        """
        rsa-sha256 signatures pass in all four canonicalisations: one AR entry each, the
        result noted for DMARC, and one TXT question for the key.
        """
        server = self.keys()
        f = self.build(server)
        for c in [
            (b"relaxed", b"relaxed"),
            (b"simple", b"simple"),
            (b"relaxed", b"simple"),
            (b"simple", b"relaxed"),
        ]:
            signed = sign(MESSAGE, canonicalize=c)
            envelope = await self.check(f, signed)
            self.assertEqual(
                self.results(envelope),
                [f"dkim=pass header.d=example.org header.s=sel header.b={signatureB(signed)}"],
                c,
            )
            self.assertEqual(envelope.notes["dkim"][0]["result"], "pass")
            self.assertEqual(envelope.notes["dkim"][0]["domain"], "example.org")
        self.assertEqual(set(server.queries), {("sel._domainkey.example.org", "TXT")})

    async def test_ed25519Pass(self) -> None:
        """An ed25519-sha256 signature (RFC 8463) passes."""
        f = self.build(self.keys())
        signed = sign(MESSAGE, selector="ed", algorithm=b"ed25519-sha256")
        envelope = await self.check(f, signed)
        self.assertEqual(
            self.results(envelope),
            [f"dkim=pass header.d=example.org header.s=ed header.b={signatureB(signed)}"],
        )

    async def test_bodyChanged(self) -> None:
        """A body changed after signing fails, saying so; the other signature still passes."""
        f = self.build(self.keys())
        signed = sign(sign(MESSAGE), selector="ed", algorithm=b"ed25519-sha256")
        changed = signed.replace(b"Hello Bob", b"Hello Eve")
        envelope = await self.check(f, changed)
        self.assertEqual(
            [r["result"] + " " + r["reason"] for r in envelope.notes["dkim"]],
            ["fail body hash mismatch", "fail body hash mismatch"],
        )
        self.assertTrue(
            self.results(envelope)[0].startswith(
                'dkim=fail reason="body hash mismatch" header.d=example.org header.s=ed'
            )
        )

    async def test_headerChanged(self) -> None:
        """A signed header changed after signing fails: the signature does not verify."""
        f = self.build(self.keys())
        changed = sign(MESSAGE).replace(b"Subject: a signed", b"Subject: a forged")
        envelope = await self.check(f, changed)
        self.assertEqual(envelope.notes["dkim"][0]["result"], "fail")
        self.assertEqual(envelope.notes["dkim"][0]["reason"], "signature did not verify")

    async def test_bodyLength(self) -> None:
        """With l=, text appended to the body (a list footer) still passes."""
        f = self.build(self.keys())
        signed = sign(MESSAGE, length=True) + b"--\r\nunsubscribe: ...\r\n"
        envelope = await self.check(f, signed)
        self.assertEqual(envelope.notes["dkim"][0]["result"], "pass")

    async def test_noKey(self) -> None:
        """No key record (NXDOMAIN): permerror, as RFC 6376 6.1.2 says."""
        f = self.build(self.keys())
        envelope = await self.check(f, sign(MESSAGE, selector="gone"))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "permerror")
        self.assertIn("no key record at gone._domainkey.example.org", self.results(envelope)[0])

    async def test_badKey(self) -> None:
        """A key record that is not a key: permerror."""
        server = self.serve(
            keyRecords(**{"sel._domainkey.example.org": "v=DKIM1; k=rsa; p=bm90IGEga2V5"})
        )
        envelope = await self.check(self.build(server), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "permerror")

    async def test_revokedKey(self) -> None:
        """An empty p= (a revoked key, RFC 6376 3.6.1): permerror."""
        server = self.serve(keyRecords(**{"sel._domainkey.example.org": "v=DKIM1; k=rsa; p="}))
        envelope = await self.check(self.build(server), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "permerror")

    async def test_servfail(self) -> None:
        """SERVFAIL for the key: temperror, the message accepted."""
        server = self.keys()
        server.servfail.add("sel._domainkey.example.org")
        envelope = await self.check(self.build(server), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "temperror")

    async def test_timeout(self) -> None:
        """A DNS server that does not answer: temperror within dns_timeout."""
        server = self.keys()
        server.silent = True
        envelope = await self.check(self.build(server, dns_timeout=0.3), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "temperror")
        self.assertIn("timed out", envelope.notes["dkim"][0]["reason"])

    async def test_smallKey(self) -> None:
        """A key shorter than min_key_bits: policy (RFC 8601 2.7.1)."""
        f = self.build(self.keys(), min_key_bits=4096)
        envelope = await self.check(f, sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "policy")

    async def test_costlyKey(self) -> None:
        """
        A key over max_key_bits, or with a public exponent over 32 bits (its owner sets the
        cost of the check): policy, the signature not checked.
        """
        f = self.build(self.keys(), max_key_bits=1024)
        envelope = await self.check(f, sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "policy")
        self.assertIn("over the limit of 1024", envelope.notes["dkim"][0]["reason"])
        modulus = rsaKey()[1]
        # An RSA public key DER with a 33-bit exponent, the modulus of the test key.
        public = serialization.load_der_public_key(base64.b64decode(modulus.split("p=")[1]))
        numbers = public.public_numbers()  # type: ignore[union-attr]
        big = RSAPublicNumbers(2**32 + 15, numbers.n).public_key()
        der = big.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        server = self.serve(
            keyRecords(
                **{"sel._domainkey.example.org": "v=DKIM1; p=" + base64.b64encode(der).decode()}
            )
        )
        envelope = await self.check(self.build(server), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "policy")
        self.assertIn("exponent", envelope.notes["dkim"][0]["reason"])

    async def test_maxSignatures(self) -> None:
        """Only the first max_signatures signatures are checked (and asked for)."""
        server = self.keys()
        signed = MESSAGE
        for selector in ("a", "b", "c", "sel"):
            signed = sign(signed, selector=selector)
        envelope = await self.check(self.build(server, max_signatures=2), signed)
        self.assertEqual([r["selector"] for r in envelope.notes["dkim"]], ["sel", "c"])
        self.assertEqual(len(server.queries), 2)

    async def test_maxSize(self) -> None:
        """A message over max_size is not verified: neutral, no DNS question."""
        server = self.keys()
        envelope = await self.check(self.build(server, max_size=100), sign(MESSAGE))
        self.assertEqual(envelope.notes["dkim"][0]["result"], "neutral")
        self.assertEqual(server.queries, [])

    async def test_unsigned(self) -> None:
        """No signature: dkim=none, no DNS question."""
        server = self.keys()
        envelope = await self.check(self.build(server), MESSAGE)
        self.assertEqual(self.results(envelope), ["dkim=none"])
        self.assertEqual(envelope.notes["dkim"], [])
        self.assertEqual(server.queries, [])

    def test_headerBOnlyBase64(self) -> None:
        """
        header.b, the sender's bytes in our Authentication-Results, keeps only base64: a
        "(" or a quote there would open a comment or a string swallowing the rest of it.
        """
        signature = _signature(1, 'v=1; a=rsa-sha256; d=example.org; s=sel; bh=YQ==; b=((((x"y+/z9')
        self.assertEqual(signature.b, "xy+/z9")

    async def test_malformed(self) -> None:
        """A signature that is not a tag list: permerror, nothing asked."""
        server = self.keys()
        envelope = await self.check(self.build(server), b"DKIM-Signature: nonsense\r\n" + MESSAGE)
        self.assertEqual(envelope.notes["dkim"][0]["result"], "permerror")
        self.assertEqual(server.queries, [])

    def test_options(self) -> None:
        """Wrong options are refused by name; a reactor without threads is refused."""
        for key, value in [
            ("max_signatures", 0),
            ("max_arc_sets", 51),
            ("arc", "yes"),
            ("max_key_bits", 512),
            ("nope", 1),
        ]:
            e = self.assertRaises(
                OptionError,
                DKIMFilterFactory().build,
                {"resolver": "127.0.0.1:53", key: value},
                reactor,
            )
            self.assertEqual(e.key, key)
        f = DKIMFilterFactory().build({}, reactor)
        self.assertIsInstance(f, DKIMFilter)


class ARCTests(DKIMCase):
    """ARC chains sealed by the tests (dkimpy's sealer), verified."""

    def keys(self) -> DNSServer:
        return self.serve(
            keyRecords(
                **{
                    "sel._domainkey.example.org": rsaKey()[1],
                    "arc._domainkey.forwarder.example": rsaKey()[1],
                    "arc._domainkey.list.example": rsaKey()[1],
                }
            )
        )

    async def test_pass(self) -> None:
        """A chain of two sets passes; its sealers are noted, newest first."""
        sealed = arcSeal(
            arcSeal(sign(MESSAGE), "forwarder.example"), "list.example", results="arc=pass"
        )
        envelope = await self.check(self.build(self.keys()), sealed)
        self.assertIn("arc=pass", self.results(envelope))
        self.assertEqual(envelope.notes["arc"]["result"], "pass")
        self.assertEqual(envelope.notes["arc"]["sealers"], ("list.example", "forwarder.example"))

    async def test_bodyChanged(self) -> None:
        """A body changed after sealing: arc=fail."""
        sealed = arcSeal(sign(MESSAGE), "forwarder.example").replace(b"Hello Bob", b"Hello Eve")
        envelope = await self.check(self.build(self.keys()), sealed)
        self.assertEqual(envelope.notes["arc"]["result"], "fail")
        self.assertTrue(any(r.startswith("arc=fail") for r in self.results(envelope)))

    async def test_none(self) -> None:
        """No ARC set: nothing in the AR, arc none noted."""
        envelope = await self.check(self.build(self.keys()), sign(MESSAGE))
        self.assertEqual(envelope.notes["arc"]["result"], "none")
        self.assertFalse(any(r.startswith("arc=") for r in self.results(envelope)))

    async def test_tooMany(self) -> None:
        """More sets than max_arc_sets: fail, unchecked."""
        sealed = arcSeal(arcSeal(MESSAGE, "forwarder.example"), "list.example", results="arc=pass")
        envelope = await self.check(self.build(self.keys(), max_arc_sets=1), sealed)
        self.assertEqual(envelope.notes["arc"]["result"], "fail")

    async def test_manySetsOfOneInstance(self) -> None:
        """
        50 ARC sets that all say i=1, each naming its own key: fail, unchecked: no key is
        looked up, however low the highest i= is.
        """
        arc = arcSeal(MESSAGE, "forwarder.example").removesuffix(MESSAGE)
        sets = b"".join(
            arc.replace(b"forwarder.example", f"f{n}.example".encode()) for n in range(50)
        )
        server = self.keys()
        envelope = await self.check(self.build(server), sets + MESSAGE)
        self.assertEqual(envelope.notes["arc"]["result"], "fail")
        self.assertEqual(server.queries, [])

    async def test_off(self) -> None:
        """arc = false: the chain is not looked at."""
        server = self.keys()
        envelope = await self.check(
            self.build(server, arc=False), arcSeal(MESSAGE, "forwarder.example")
        )
        self.assertNotIn("arc", envelope.notes)
        self.assertEqual(server.queries, [])


# The keys dkimpy's tests answer for the corpus (dkim/tests/test_dkim.py, test_dkim_ed25519.py).
GMAIL_2012 = (
    "k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1Kd87/UeJjenpabgbFwh+eBCsSTrqmwIYYvyw"
    "lbhbqoo2DymndFkbjOVIPIldNs/m40KF+yzMn1skyoxcTUGCQs8g3FgD2Ap3ZB5DekAo5wMmk4wimDO+U8QzI3SD0"
    "7y2+07wlNWwIt8svnxgdxGkVbbhzY8i+RQ9DpSVpPbF7ykQxtKXkv/ahW3KjViiAH+ghvvIhkx4xYSIc9oSwVmAl5"
    "OctMEeWUwg8Istjqz8BZeTWbf41fbNhte7Y+YqZOwq1Sd0DbvYAD9NOZK9vlfuac0598HY+vtSBczUiKERHv1yRbc"
    "aQtZFh5wtiRrN04BLUTD21MycBX5jYchHjPY/wIDAQAB"
)
BRISBANE = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
DEFECTIVE = (
    "k=rsa; p=MFwwDQYJKoZIhvNAQEBBQADSwAwSAJBANmBe10IgY+u7h3enWTukkqtUD5PR52T"
    "b/mPfjC0QJTocVBq6Za/PlzfV+Py92VaCak19F4WrbVTK5Gg5tW220MCAwEAAQ=="
)


def corpusText(name: str) -> str:
    return (CORPUS / name).read_text().strip()


class CorpusTests(DKIMCase):
    """dkimpy's real signed messages (tests/dkimcorpus) verify as dkimpy's tests say."""

    async def verify(self, name: str, keys: dict[str, str]) -> list[str]:
        server = self.serve(keyRecords(**keys))
        raw = (CORPUS / name).read_bytes()
        # As SMTP carries it, and as the session spools it: CRLF lines.
        content = re.sub(rb"\r?\n", b"\r\n", raw)
        envelope = await self.check(self.build(server, min_key_bits=1024), content)
        return [r["result"] for r in envelope.notes["dkim"]]

    async def test_rfc8463(self) -> None:
        """RFC 8463's example: its ed25519 and its rsa signature both pass."""
        results = await self.verify(
            "rfc6376.signed.msg",
            {
                "brisbane._domainkey.football.example.com": BRISBANE,
                "test._domainkey.football.example.com": corpusText("test.txt"),
            },
        )
        self.assertEqual(results, ["pass", "pass"])

    async def test_noTimestamp(self) -> None:
        """The altered copy without t= fails (dkimpy's test_no_t)."""
        results = await self.verify(
            "rfc6376.signed.no_t.msg",
            {
                "brisbane._domainkey.football.example.com": BRISBANE,
                "test._domainkey.football.example.com": corpusText("test.txt"),
            },
        )
        self.assertEqual(results, ["fail"])

    async def test_defectiveKey(self) -> None:
        """A defective key record is a permerror (dkimpy's test_catch_bad_key: not verified)."""
        results = await self.verify(
            "rfc6376.signed.rsa.msg", {"test._domainkey.football.example.com": DEFECTIVE}
        )
        self.assertEqual(results, ["permerror"])

    async def test_exim(self) -> None:
        """A message signed by Exim's ed25519 prototype passes (test_verify_third_party)."""
        results = await self.verify(
            "ed25519test2.msg", {"sed._domainkey.test.ex": corpusText("eximtest.dns")}
        )
        self.assertEqual(results, ["pass"])

    async def test_gmail(self) -> None:
        """gmail.com's 2012 signature, degenerately folded, passes (test_degenerate_folding)."""
        results = await self.verify("test2.message", {"20120113._domainkey.gmail.com": GMAIL_2012})
        self.assertEqual(results, ["pass"])

    async def test_badDomain(self) -> None:
        """d=legitimate.com(.attacker.com does not verify (test_invalid_domain_verify): permerror."""
        results = await self.verify("test.message.baddomain", {})
        self.assertEqual(results, ["permerror"])


class LoopbackTests(ProxyTestCase):
    """Through the proxy, over real sockets, to the MTA."""

    async def test_passDelivered(self) -> None:
        """
        A signed message is relayed byte for byte under one Authentication-Results that
        carries the dkim pass.
        """
        server = DNSServer(keyRecords(**{"sel._domainkey.example.org": rsaKey()[1]}))
        server.start(self)
        port = self.startProxy(
            f'[filters.dkim]\nresolver = "{server.resolver}"\ndns_timeout = 0.5\n'
            '[filters.headers]\nauthserv_id = "proxy.test"\n'
        )
        signed = sign(MESSAGE)
        await self.sendMessage(port, signed)
        [message] = self.mta.messages
        self.assertTrue(message.content.endswith(signed), message.content[:400])
        header = message.content[: len(message.content) - len(signed)].decode()
        self.assertEqual(header.count("Authentication-Results:"), 1)
        unfolded = re.sub(r"\r\n[ \t]+", " ", header)
        self.assertIn(
            f"proxy.test; dkim=pass header.d=example.org header.s=sel header.b={signatureB(signed)}",
            unfolded,
        )
