"""
Tests for the rspamd filter: its answers parsed without I/O, the verdicts they make, the
request headers made of the session, its options, then the HTTP exchange with an in-process
fake rspamd on twisted.web over loopback TCP (the request it got, byte for byte; broken,
huge and missing answers), and the filter in the running proxy.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailproxy import session as core
from mailproxy.config import Config, OnError
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    Action,
    FilterError,
    HeaderEdit,
    IFilter,
    OptionError,
    Verdict,
)
from mailproxy.filters.pipeline import ConfiguredFilter, Pipeline
from mailproxy.filters.rspamd import (
    CHUNK_SIZE,
    DEFAULT_MAX_SIZE,
    MAX_ANSWER,
    MAX_REASON,
    RspamdAnswer,
    RspamdClient,
    RspamdFilter,
    RspamdFilterFactory,
    headerValue,
    parseAnswer,
    requestHeaders,
)
from tests.fakes import ProxyTestCase

#: What Debian 12's rspamd 3.4 answered to /checkv2 for a GTUBE message, byte for byte.
GTUBE_ANSWER = (
    b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject","symbols":'
    b'{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},"messages":'
    b'{"smtp_message":"Gtube pattern"},"message-id":"1@example.org","time_real":0.057183}'
)
#: ... and for a short ham with local.d/milter_headers.conf's use = ["x-spamd-result",
#: "x-rspamd-server", "authentication-results"] (trimmed to three symbols).
HAM_ANSWER = (
    b'{"is_skipped":false,"score":2.800000,"required_score":15.0,"action":"no action",'
    b'"symbols":{"ARC_NA":{"name":"ARC_NA","score":0.0,"metric_score":0.0,"description":'
    b'"ARC signature absent"},"HFILTER_HELO_IP_A":{"name":"HFILTER_HELO_IP_A","score":1.0,'
    b'"metric_score":1.0,"description":"Helo A IP != hostname IP","options":'
    b'["mail.example.org"]},"HFILTER_FROMHOST_NORES_A_OR_MX":{"name":'
    b'"HFILTER_FROMHOST_NORES_A_OR_MX","score":1.500000,"metric_score":1.500000,'
    b'"description":"FROM host no resolve to A or MX","options":["example.org"]}},'
    b'"messages":{},"message-id":"2@example.org","time_real":1.004341,"milter":'
    b'{"add_headers":{"X-Rspamd-Server":{"value":"vm","order":-1},"X-Spamd-Result":'
    b'{"value":"default: False [2.80 / 15.00];\\r\\n\\tHFILTER_FROMHOST_NORES_A_OR_MX(1.50)'
    b'[example.org];\\r\\n\\tHFILTER_HELO_IP_A(1.00)[mail.example.org];\\r\\n\\tARC_NA(0.00)[]",'
    b'"order":-1},"Authentication-Results":{"value":"vm;\\r\\n\\tdkim=none","order":1}},'
    b'"remove_headers":{"X-Spam":0,"X-Rspamd-Server":0,"X-Spamd-Result":0,'
    b'"Authentication-Results":0}}}'
)

#: A message with dot lines: the client dot-stuffs them, rspamd must get them unstuffed.
MESSAGE = (
    b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: lunch\r\n\r\n"
    b"Shall we meet at noon?\r\n.\r\n..two dots\r\n.one dot\r\n"
)


CONFIG = Config(
    path="test.toml",
    listen=("tcp:0",),
    upstream="tcp:host=127.0.0.1:port=1",
    hostname="proxy.test",
    spoolDir="/nonexistent",
)


def answer(action: str, **more: Any) -> bytes:
    """A /checkv2 answer with C{action} and the score rspamd would give it."""
    scores = {"no action": 1.5, "greylist": 4.5, "add header": 7.25, "rewrite subject": 8.0}
    return json.dumps(
        {"action": action, "score": scores.get(action, 16.0), "required_score": 15.0, **more}
    ).encode()


def session(**changes: Any) -> Session:
    return attrs.evolve(
        Session(id="S1234", clientAddress="192.0.2.7", clientPort=40000, helo="mail.example.org"),
        **changes,
    )


def envelope(**changes: Any) -> Envelope:
    return attrs.evolve(Envelope("a@example.org", recipients=["b@example.net"]), **changes)


class ParseAnswerTests(SynchronousTestCase):
    """rspamd's answers, parsed without I/O."""

    def test_gtube(self) -> None:
        """rspamd's real answer for GTUBE: reject, 15 of 15, its reason, no milter block."""
        self.assertEqual(
            parseAnswer(GTUBE_ANSWER),
            RspamdAnswer(
                action="reject",
                score=15.0,
                required=15.0,
                symbols=("GTUBE",),
                reason="Gtube pattern",
            ),
        )

    def test_ham(self) -> None:
        """
        rspamd's real answer for a ham: no action; the headers its milter block adds,
        unfolded (rspamd folds with CRLF TAB), sorted by their order; those it removes.
        """
        parsed = parseAnswer(HAM_ANSWER)
        self.assertEqual((parsed.action, parsed.score, parsed.reason), ("no action", 2.8, None))
        self.assertEqual(
            parsed.symbols, ("ARC_NA", "HFILTER_FROMHOST_NORES_A_OR_MX", "HFILTER_HELO_IP_A")
        )
        self.assertEqual(
            parsed.addHeaders,
            (
                ("X-Rspamd-Server", "vm"),
                (
                    "X-Spamd-Result",
                    "default: False [2.80 / 15.00]; HFILTER_FROMHOST_NORES_A_OR_MX(1.50)"
                    "[example.org]; HFILTER_HELO_IP_A(1.00)[mail.example.org]; ARC_NA(0.00)[]",
                ),
            ),
        )
        self.assertEqual(
            parsed.removeHeaders,
            (
                ("X-Spam", 0),
                ("X-Rspamd-Server", 0),
                ("X-Spamd-Result", 0),
            ),
        )

    def test_addHeadersForms(self) -> None:
        """
        An added header is a string, a {value, order} object, or a list of them; names that
        are not field names and values that are not strings are dropped, and so is
        Authentication-Results (the headers filter's), added or removed; an order too large
        for a float counts as 0.
        """
        parsed = parseAnswer(
            answer(
                "no action",
                milter={
                    "add_headers": {
                        "X-A": "plain",
                        "X-B": [{"value": "two", "order": 2}, {"value": "one", "order": 1}],
                        "X-C": {"value": 3},
                        "Bad Name": "x",
                        "X-D": ["str", None, {"order": "x", "value": "v"}],
                        "X-I": {"value": "huge", "order": 10**400},
                        "authentication-results": "rspamd; dkim=pass",
                    },
                    "remove_headers": {
                        "X-E": 2,
                        "X-F": -1,
                        "X-G": "1",
                        "X-H": True,
                        "a b": 0,
                        "Authentication-Results": 0,
                    },
                },
            )
        )
        self.assertEqual(
            parsed.addHeaders,
            (
                ("X-A", "plain"),
                ("X-D", "str"),
                ("X-D", "v"),
                ("X-I", "huge"),
                ("X-B", "one"),
                ("X-B", "two"),
            ),
        )
        self.assertEqual(parsed.removeHeaders, (("X-E", 2), ("X-F", -1)))

    def test_reasonSanitised(self) -> None:
        """rspamd's reason goes into an SMTP reply: one line, printable ASCII, bounded."""
        parsed = parseAnswer(
            answer("reject", messages={"smtp_message": "bad\r\n250 ok\x00\x1b[1m caf\u00e9 "})
        )
        self.assertEqual(parsed.reason, "bad 250 ok??[1m caf?")
        long = parseAnswer(answer("reject", messages={"smtp_message": "x" * 5000}))
        assert long.reason is not None
        self.assertEqual(len(long.reason), MAX_REASON)
        self.assertTrue(long.reason.endswith("..."))
        self.assertIsNone(parseAnswer(answer("reject", messages={"smtp_message": " \r\n"})).reason)
        self.assertIsNone(parseAnswer(answer("reject", messages={"smtp_message": 3})).reason)

    def test_headerValue(self) -> None:
        """Values from rspamd lose their folding, CR, LF, NUL and controls; are bounded."""
        self.assertEqual(headerValue("a;\r\n\tb;\n c\x00d\x7f"), "a; b; c?d?")
        self.assertEqual(len(headerValue("y" * 5000)), 900)

    def test_malformed(self) -> None:
        """Anything but an object with a known action and numeric scores is a FilterError."""
        for data in (
            b"",
            b"<html>502 Bad Gateway</html>",
            b'{"action": "reject"',
            b"[]",
            b'"reject"',
            b"{}",
            b'{"action": "discard", "score": 1}',
            b'{"action": 7}',
            b'{"action": "reject", "score": "high"}',
            b'{"action": "reject", "score": true}',
            b'{"action": "no action", "required_score": NaN}',
            b'{"action": "no action", "score": 1e999}',
            b'{"action": "no action", "score": ' + b"9" * 400 + b"}",
            b'{"error": "Message has no body"}',
            b"[" * 100_000,
            b"\xff\xfe{",
        ):
            self.assertRaises(FilterError, parseAnswer, data)

    def test_oddFieldsIgnored(self) -> None:
        """A milter block or messages that are not objects, symbols not an object: ignored."""
        parsed = parseAnswer(
            answer("no action", milter=[1], messages="x", symbols=["A"], subject=None)
        )
        self.assertEqual(parsed, RspamdAnswer("no action", 1.5, 15.0))


@attrs.frozen
class _Answering:
    """A stand-in RspamdClient: answers every check with C{answer} (or fails with it)."""

    answer: RspamdAnswer | Exception
    seen: list[Headers] = attrs.Factory(list)

    def check(self, message: Message, headers: Headers) -> Deferred[RspamdAnswer]:
        self.seen.append(headers)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class VerdictTests(SynchronousTestCase):
    """Each rspamd action as the verdict it makes."""

    def verdict(self, data: bytes, **options: Any) -> Verdict:
        fake = _Answering(parseAnswer(data))
        built = RspamdFilter(client=fake, **options)  # type: ignore[arg-type]
        return self.successResultOf(
            built.checkMessage(session(), envelope(), Message("/nonexistent", 10))
        )

    def test_reject(self) -> None:
        """reject: 550 5.7.1 with rspamd's reason, or a fixed text naming rspamd."""
        self.assertEqual(self.verdict(GTUBE_ANSWER), Verdict.reject("Gtube pattern"))
        self.assertEqual(
            self.verdict(answer("reject")), Verdict.reject("Message refused as spam by rspamd")
        )

    def test_softReject(self) -> None:
        """soft reject: 451 4.7.1, rspamd's reason or ours."""
        self.assertEqual(
            self.verdict(answer("soft reject")),
            Verdict.tempfail("Message deferred by rspamd, try again later"),
        )
        self.assertEqual(
            self.verdict(answer("soft reject", messages={"smtp_message": "Try again"})),
            Verdict.tempfail("Try again", 451, "4.7.1"),
        )

    def test_greylist(self) -> None:
        """greylist: 451 4.7.1 greylisted."""
        self.assertEqual(
            self.verdict(answer("greylist")),
            Verdict.tempfail("Greylisted, please try again later", 451, "4.7.1"),
        )

    def test_noAction(self) -> None:
        """no action: accepted, with the score headers."""
        self.assertEqual(
            self.verdict(answer("no action")),
            Verdict.accept((("X-Rspamd-Score", "1.50 / 15.00"), ("X-Rspamd-Action", "no action"))),
        )
        self.assertEqual(self.verdict(answer("no action"), scoreHeaders=False), Verdict.accept())

    def test_addHeader(self) -> None:
        """add header: accepted with the spam header (X-Spam: Yes, configurable)."""
        self.assertEqual(
            self.verdict(answer("add header")).headers,
            (
                ("X-Rspamd-Score", "7.25 / 15.00"),
                ("X-Rspamd-Action", "add header"),
                ("X-Spam", "Yes"),
            ),
        )
        self.assertEqual(
            self.verdict(answer("add header"), spamHeader=("X-Spam-Flag", "YES")).headers[-1],
            ("X-Spam-Flag", "YES"),
        )

    def test_rewriteSubject(self) -> None:
        """rewrite subject: the Subject replaced (in place) by rspamd's."""
        verdict = self.verdict(answer("rewrite subject", subject="*** SPAM *** lunch"))
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(verdict.edits, (HeaderEdit.replace("Subject", "*** SPAM *** lunch"),))
        self.assertEqual(verdict.headers[1], ("X-Rspamd-Action", "rewrite subject"))

    def test_rewriteSubjectWithoutOne(self) -> None:
        """rewrite subject without a subject is a broken answer: a FilterError."""
        fake = _Answering(parseAnswer(answer("rewrite subject")))
        built = RspamdFilter(client=fake)  # type: ignore[arg-type]
        d = built.checkMessage(session(), envelope(), Message("/nonexistent", 10))
        self.failureResultOf(d, FilterError)

    def test_milterHeaders(self) -> None:
        """
        milter.add_headers are added after the score headers; milter.remove_headers are
        removals with rspamd's occurrence (0 every one); milter_headers = false: neither.
        """
        verdict = self.verdict(HAM_ANSWER)
        self.assertEqual(
            verdict.headers[2:],
            (
                ("X-Rspamd-Server", "vm"),
                ("X-Spamd-Result", parseAnswer(HAM_ANSWER).addHeaders[1][1]),
            ),
        )
        self.assertEqual(
            verdict.edits,
            (
                HeaderEdit.remove("X-Spam", 0),
                HeaderEdit.remove("X-Rspamd-Server", 0),
                HeaderEdit.remove("X-Spamd-Result", 0),
            ),
        )
        plain = self.verdict(HAM_ANSWER, milterHeaders=False)
        self.assertEqual((len(plain.headers), plain.edits), (2, ()))
        nth = self.verdict(answer("no action", milter={"remove_headers": {"Received": -1}}))
        self.assertEqual(nth.edits, (HeaderEdit.remove("Received", -1),))

    def test_tooLargeSkipped(self) -> None:
        """A message over max_size is not sent to rspamd, and accepted without headers."""
        fake = _Answering(parseAnswer(GTUBE_ANSWER))
        built = RspamdFilter(client=fake, maxSize=100)  # type: ignore[arg-type]
        verdict = built.checkMessage(session(), envelope(), Message("/nonexistent", 101))
        self.assertEqual(self.successResultOf(verdict), Verdict.accept())
        self.assertEqual(fake.seen, [])


class RequestHeadersTests(SynchronousTestCase):
    """The session's facts, as rspamd's request headers."""

    def test_all(self) -> None:
        """Every fact known: one header each, one Rcpt per recipient."""
        headers = requestHeaders(
            session(
                clientName="mail.example.org",
                login="alice",
                tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
            ),
            envelope(recipients=["b@example.net", "c@example.net"]),
            mtaName="mx.example.net",
            settingsId="inbound",
            password="q1",
        )
        self.assertEqual(
            {name: values for name, values in headers.getAllRawHeaders()},
            {
                b"Ip": [b"192.0.2.7"],
                b"Helo": [b"mail.example.org"],
                b"Hostname": [b"mail.example.org"],
                b"From": [b"a@example.org"],
                b"Rcpt": [b"b@example.net", b"c@example.net"],
                b"User": [b"alice"],
                b"Queue-Id": [b"S1234"],
                b"Tls-Version": [b"TLSv1.3"],
                b"Tls-Cipher": [b"TLS_AES_256_GCM_SHA384"],
                b"Mta-Name": [b"mx.example.net"],
                b"Settings-Id": [b"inbound"],
                b"Password": [b"q1"],
            },
        )

    def test_least(self) -> None:
        """
        Before HELO, no name, no login, no TLS, the null sender: only what is known is
        sent, the null sender as <>; no IP for a client that has none (a UNIX socket).
        """
        headers = requestHeaders(session(helo=None), envelope(mailFrom=""))
        self.assertEqual(
            sorted(name for name, _ in headers.getAllRawHeaders()),
            [b"From", b"Ip", b"Queue-Id", b"Rcpt"],
        )
        unix = requestHeaders(session(clientAddress="unknown"), envelope())
        self.assertFalse(unix.hasHeader(b"IP"))
        v6 = requestHeaders(session(clientAddress="2001:db8::7"), envelope())
        self.assertEqual(v6.getRawHeaders(b"IP"), [b"2001:db8::7"])
        self.assertEqual(headers.getRawHeaders(b"From"), [b"<>"])

    def test_noLineBreaks(self) -> None:
        """A HELO with odd whitespace cannot split a header."""
        headers = requestHeaders(session(helo="a\r\nX-Injected: 1"), envelope())
        self.assertEqual(headers.getRawHeaders(b"Helo"), [b"a X-Injected: 1"])
        self.assertFalse(headers.hasHeader(b"X-Injected"))

    def test_clientNameFromSession(self) -> None:
        """The session core notes the forward-confirmed name for filters, not a placeholder."""
        for name, noted in (("mail.example.org", "mail.example.org"), ("[UNAVAILABLE]", None)):
            info = session()
            core.Session(CONFIG, info).clientNamed(name, "ptr.example.org")
            self.assertEqual(info.clientName, noted)


class OptionsTests(SynchronousTestCase):
    """[filters.rspamd]'s keys."""

    def build(self, **options: object) -> RspamdFilter:
        built = RspamdFilterFactory().build(options, Clock())
        assert isinstance(built, RspamdFilter)
        return built

    def test_defaults(self) -> None:
        built = self.build()
        verifyObject(IFilter, built)
        self.assertEqual(built.client.address, "tcp:host=127.0.0.1:port=11333")
        self.assertEqual(
            (built.maxSize, built.scoreHeaders, built.milterHeaders, built.spamHeader),
            (DEFAULT_MAX_SIZE, True, True, ("X-Spam", "Yes")),
        )
        self.assertEqual((built.mtaName, built.settingsId, built.password), (None, None, None))

    def test_options(self) -> None:
        built = self.build(
            rspamd="unix:/run/rspamd/normal.sock",
            max_size=1000,
            score_headers=False,
            milter_headers=False,
            spam_header="X-Spam-Flag",
            spam_header_value="YES",
            mta_name="mx.example.net",
            settings_id="inbound",
            password="secret",
        )
        self.assertEqual(built.client.address, "unix:/run/rspamd/normal.sock")
        self.assertEqual((built.maxSize, built.spamHeader), (1000, ("X-Spam-Flag", "YES")))
        self.assertEqual(
            (built.mtaName, built.settingsId, built.password),
            ("mx.example.net", "inbound", "secret"),
        )
        self.assertNotIn("secret", repr(built))

    def test_bad(self) -> None:
        for key, value in (
            ("rspamd", "nonsense:x"),
            ("max_size", -1),
            ("score_headers", "yes"),
            ("spam_header", "X Spam"),
            ("spam_header_value", "a\nb"),
            ("mta_name", "a\r\nb"),
            ("password", ""),
            ("url", "http://127.0.0.1:11333"),
        ):
            e = self.assertRaises(OptionError, RspamdFilterFactory().build, {key: value}, Clock())
            self.assertEqual(e.key, key)

    def test_sampleSection(self) -> None:
        """
        conf/mailproxy.toml's commented [filters.rspamd], uncommented, documents every key
        the filter reads, and builds.
        """
        path = os.path.join(os.path.dirname(__file__), "..", "conf", "mailproxy.toml")
        with open(path, encoding="utf-8") as f:
            section = f.read().split("# [filters.rspamd]\n", 1)[1].split("\n\n", 1)[0]
        setting = re.compile(r"# ([a-z_]+ = .*)$")
        lines = [m.group(1) for m in map(setting.match, section.splitlines()) if m]
        options = tomllib.loads("\n".join(lines))
        self.assertEqual(
            sorted(options),
            sorted(
                [
                    "rspamd",
                    "max_size",
                    "score_headers",
                    "spam_header",
                    "spam_header_value",
                    "milter_headers",
                    "mta_name",
                    "settings_id",
                    "password",
                ]
            ),
        )
        self.assertEqual(self.build(**options).maxSize, DEFAULT_MAX_SIZE)


@attrs.define
class Received:
    """What the fake rspamd got: the request line's parts, headers, and body."""

    method: bytes
    path: bytes
    headers: Headers
    body: bytes


@implementer(IPullProducer)
class _Flood:
    """Writes C{total} bytes of answer in 64 KiB pieces, as the client takes them."""

    def __init__(self, request: server.Request, total: int, fake: FakeRspamd) -> None:
        self._request = request
        self._left = total
        self._fake = fake

    def resumeProducing(self) -> None:
        piece = min(self._left, 64 * 1024)
        self._left -= piece
        self._fake.sent += piece
        self._request.write(b"x" * piece)
        if not self._left:
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        self._left = 0


class FakeRspamd(resource.Resource):
    """
    rspamd's /checkv2 on twisted.web: records each request and answers C{answer} with
    C{status}; C{behaviour} "silent" never answers, "flood" streams C{flood} bytes
    (chunked, no length), "lying" declares a Content-Length over the cap.
    """

    isLeaf = True

    def __init__(
        self,
        answer: bytes = GTUBE_ANSWER,
        status: int = 200,
        behaviour: str = "answer",
        flood: int = 50 * 1024 * 1024,
    ) -> None:
        super().__init__()
        self.answer = answer
        self.status = status
        self.behaviour = behaviour
        self.flood = flood
        self.requests: list[Received] = []
        self.sent = 0
        self.lost: Deferred[None] = Deferred()

    def render(self, request: server.Request) -> bytes | int:
        assert request.content is not None
        self.requests.append(
            Received(
                request.method,
                request.uri,
                Headers(dict(request.requestHeaders.getAllRawHeaders())),
                request.content.read(),
            )
        )
        request.notifyFinish().addBoth(lambda _: self.lost.callback(None))
        request.setResponseCode(self.status)
        if self.behaviour == "silent":
            return server.NOT_DONE_YET
        if self.behaviour == "flood":
            request.registerProducer(_Flood(request, self.flood, self), False)
            return server.NOT_DONE_YET
        if self.behaviour == "lying":
            request.setHeader(b"content-length", b"%d" % (MAX_ANSWER + 1))
            request.write(b"{")
            return server.NOT_DONE_YET
        return self.answer


class _Recording:
    """A spooled message (as L{Message}) whose file records the size of each read."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.reads: list[int] = []

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        with open(self.path, "rb") as f:
            original = f.read

            def read(size: int | None = -1) -> bytes:
                data = original(size)
                self.reads.append(-1 if size is None else size)
                return data

            f.read = read  # type: ignore[method-assign]
            yield f


class _OldHTTP(Protocol):
    """An HTTP/1.0 server: reads the whole request, answers GTUBE's verdict, closes."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, blank, body = self.data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if blank and length and len(body) >= int(length.group(1)):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.0 200 OK\r\n\r\n" + GTUBE_ANSWER)
            self.transport.loseConnection()


class ExchangeTests(ProxyTestCase):
    """The filter asking a fake rspamd over loopback HTTP."""

    def fake(self, **kw: Any) -> tuple[FakeRspamd, RspamdFilter]:
        fake = FakeRspamd(**kw)
        port = self.listenTCP(server.Site(fake))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = RspamdClient.connecting(reactor, endpoint, f"tcp:host=127.0.0.1:port={port}")
        return fake, RspamdFilter(client=client)

    def spooled(self, content: bytes = MESSAGE) -> Message:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return Message(path, len(content))

    async def test_request(self) -> None:
        """
        POST /checkv2 with the session's facts as headers and the message as the body, byte
        for byte (dot-unstuffed), with its Content-Length (not chunked).
        """
        fake, built = self.fake()
        info = session(login="alice", tls=("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
        verdict = await built.checkMessage(info, envelope(), self.spooled())
        self.assertEqual(verdict, Verdict.reject("Gtube pattern"))
        [req] = fake.requests
        self.assertEqual((req.method, req.path, req.body), (b"POST", b"/checkv2", MESSAGE))
        self.assertEqual(req.headers.getRawHeaders(b"Content-Length"), [b"%d" % len(MESSAGE)])
        self.assertFalse(req.headers.hasHeader(b"Transfer-Encoding"))
        for name, value in (
            (b"IP", b"192.0.2.7"),
            (b"Helo", b"mail.example.org"),
            (b"From", b"a@example.org"),
            (b"Rcpt", b"b@example.net"),
            (b"User", b"alice"),
            (b"Queue-Id", b"S1234"),
            (b"TLS-Version", b"TLSv1.3"),
            (b"TLS-Cipher", b"TLS_AES_128_GCM_SHA256"),
        ):
            self.assertEqual(req.headers.getRawHeaders(name), [value], name)

    async def test_streamedInChunks(self) -> None:
        """
        A 1 MiB message reaches rspamd whole, read from the spool CHUNK_SIZE bytes at a
        time: never whole into memory.
        """
        fake, built = self.fake(answer=answer("no action"))
        content = b"Subject: big\r\n\r\n" + b"0123456789abcde\r\n" * (1024 * 1024 // 17)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        message = _Recording(path, len(content))
        verdict = await built.checkMessage(session(), envelope(), message)  # type: ignore[arg-type]
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(fake.requests[0].body, content)
        self.assertGreater(len(message.reads), len(content) // CHUNK_SIZE)
        self.assertEqual(set(message.reads), {CHUNK_SIZE})

    async def test_answers(self) -> None:
        """Each action, as rspamd's HTTP answer, is its verdict."""
        for data, expected in (
            (answer("soft reject"), 451),
            (answer("greylist"), 451),
            (answer("reject"), 550),
        ):
            _, built = self.fake(answer=data)
            verdict = await built.checkMessage(session(), envelope(), self.spooled())
            self.assertEqual(verdict.code, expected)
        _, built = self.fake(answer=HAM_ANSWER)
        verdict = await built.checkMessage(session(), envelope(), self.spooled())
        self.assertEqual(verdict.headers[1], ("X-Rspamd-Action", "no action"))

    async def assertFails(self, built: RspamdFilter, text: str) -> FilterError:
        try:
            await built.checkMessage(session(), envelope(), self.spooled())
        except FilterError as e:
            self.assertIn(text, str(e))
            return e
        self.fail("no FilterError")

    async def test_httpError(self) -> None:
        """
        An HTTP error status is a FilterError, whatever the body says; rspamd's error text
        is in it, on one line.
        """
        _, built = self.fake(answer=GTUBE_ANSWER, status=500)
        await self.assertFails(built, "answered HTTP 500")
        _, built = self.fake(answer=b'{"error": "Message has\\nno body"}', status=400)
        await self.assertFails(built, "answered HTTP 400: Message has no body")
        _, built = self.fake(answer=b"x" * 5000, status=503)
        e = await self.assertFails(built, "answered HTTP 503")
        self.assertTrue(str(e).endswith("503"), str(e))

    async def test_malformed(self) -> None:
        """A 200 with something else than rspamd's JSON is a FilterError."""
        _, built = self.fake(answer=b"<html>ok</html>")
        await self.assertFails(built, "not JSON")
        _, built = self.fake(answer=b'{"action": "quarantine", "score": 3}')
        await self.assertFails(built, "unknown action")

    async def test_closeDelimited(self) -> None:
        """An answer without a length, ended by closing the connection (HTTP/1.0), is read."""
        port = self.listenTCP(Factory.forProtocol(_OldHTTP))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        built = RspamdFilter(client=RspamdClient.connecting(reactor, endpoint, "old"))
        verdict = await built.checkMessage(session(), envelope(), self.spooled())
        self.assertEqual(verdict, Verdict.reject("Gtube pattern"))

    async def test_floodCapped(self) -> None:
        """
        A 50 MB answer (chunked, no length) is a FilterError once past MAX_ANSWER: the
        connection is dropped, the rest never read.
        """
        fake, built = self.fake(behaviour="flood")
        await self.assertFails(built, f"over {MAX_ANSWER} bytes")
        await fake.lost
        self.assertLess(fake.sent, 10 * MAX_ANSWER)

    async def test_lyingLength(self) -> None:
        """An answer whose Content-Length is over the cap is refused before it is read."""
        fake, built = self.fake(behaviour="lying")
        await self.assertFails(built, f"over {MAX_ANSWER} bytes")
        await fake.lost

    async def test_connectionRefused(self) -> None:
        """Nothing listening: a FilterError saying rspamd is unreachable."""
        dead = self.deadPort()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", dead)
        built = RspamdFilter(client=RspamdClient.connecting(reactor, endpoint, "there"))
        await self.assertFails(built, "rspamd at there unreachable")

    async def test_cancelled(self) -> None:
        """
        Cancelling the check (the pipeline's timeout) while rspamd is silent is a
        CancelledError, and the connection to rspamd is dropped.
        """
        fake, built = self.fake(behaviour="silent")
        d = built.checkMessage(session(), envelope(), self.spooled())
        while not fake.requests:
            await deferLater()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        await fake.lost

    async def test_timeoutIsOnError(self) -> None:
        """
        Through the pipeline, with its clock: a silent rspamd is cut at the filter's
        timeout and on_error applies (tempfail; accept lets the message through).
        """
        for policy, action in (
            (OnError.TEMPFAIL, Action.TEMPFAIL),
            (OnError.ACCEPT, Action.ACCEPT),
        ):
            fake, built = self.fake(behaviour="silent")
            clock = Clock()
            pipeline = Pipeline([ConfiguredFilter(built, 5.0, policy)], clock, 120.0)
            d = pipeline.checkMessage(session(), envelope(), self.spooled())
            while not fake.requests:
                await deferLater()
            clock.advance(5)
            verdict = await d
            self.assertEqual(verdict.action, action)
            await fake.lost


def deferLater() -> Deferred[None]:
    """Let the reactor run once (the fake's loopback I/O)."""
    from twisted.internet import task

    return task.deferLater(reactor, 0, lambda: None)


class ThroughProxyTests(ProxyTestCase):
    """The proxy with [filters.rspamd], a fake rspamd and the stand-in MTA."""

    def rspamd(self, fake: FakeRspamd, options: str = "") -> int:
        where = self.serve(server.Site(fake))
        return self.startProxy(f'[filters.rspamd]\nrspamd = "{where}"\n{options}')

    async def test_gtubeRefused(self) -> None:
        """rspamd's reject: 550 5.7.1 with its reason; the MTA gets nothing."""
        fake = FakeRspamd(GTUBE_ANSWER)
        client = await self.sendMessage(self.rspamd(fake), MESSAGE)
        last = client.replies[-1]
        self.assertEqual((last.code, last.lines), (550, (b"5.7.1 Gtube pattern",)))
        self.assertEqual(self.mta.messages, [])
        [req] = fake.requests
        self.assertEqual(req.body, MESSAGE)
        self.assertEqual(req.headers.getRawHeaders(b"Helo"), [b"client.example"])
        self.assertEqual(req.headers.getRawHeaders(b"Rcpt"), [b"b@example.net"])

    async def test_hamTagged(self) -> None:
        """
        no action: relayed with the score headers and rspamd's milter headers on top, the
        message otherwise byte-identical (rspamd's folding undone, the release's own aside).
        """
        client = await self.sendMessage(self.rspamd(FakeRspamd(HAM_ANSWER)), MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        [message] = self.mta.messages
        # Unfolded: a long value may be folded on release (RFC 5322's 78 columns).
        self.assertEqual(
            re.sub(rb"\r\n(?=[ \t])", b"", message.content),
            b"X-Rspamd-Score: 2.80 / 15.00\r\n"
            b"X-Rspamd-Action: no action\r\n"
            b"X-Rspamd-Server: vm\r\n"
            b"X-Spamd-Result: default: False [2.80 / 15.00];"
            b" HFILTER_FROMHOST_NORES_A_OR_MX(1.50)[example.org];"
            b" HFILTER_HELO_IP_A(1.00)[mail.example.org]; ARC_NA(0.00)[]\r\n" + MESSAGE,
        )

    async def test_addHeader(self) -> None:
        """add header: relayed with X-Spam: Yes."""
        client = await self.sendMessage(self.rspamd(FakeRspamd(answer("add header"))), MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertIn(b"\r\nX-Spam: Yes\r\nFrom: <a@example.org>\r\n", self.mta.messages[0].content)

    async def test_milterRemovesApplied(self) -> None:
        """
        milter.remove_headers and rewrite subject reach the MTA: the client's X-Spam is
        gone, its Subject replaced in place, the body untouched.
        """
        data = answer(
            "rewrite subject",
            subject="*** SPAM *** lunch",
            milter={"remove_headers": {"X-Spam": 0}},
        )
        forged = b"X-Spam: No\r\n" + MESSAGE
        client = await self.sendMessage(self.rspamd(FakeRspamd(data)), forged)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(
            self.mta.messages[0].content,
            b"X-Rspamd-Score: 8.00 / 15.00\r\nX-Rspamd-Action: rewrite subject\r\n"
            + MESSAGE.replace(b"Subject: lunch", b"Subject: *** SPAM *** lunch"),
        )

    async def test_tooLargeSkipped(self) -> None:
        """Over max_size: not sent to rspamd, relayed untouched, logged."""
        fake = FakeRspamd(GTUBE_ANSWER)
        port = self.rspamd(fake, f"max_size = {len(MESSAGE) - 1}\n")
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, MESSAGE)
        self.assertEqual(fake.requests, [])
        self.assertTrue(self.logged(f"rspamd: not scanned: {len(MESSAGE)} bytes"))

    async def test_down(self) -> None:
        """rspamd unreachable: 451 4.7.1 (on_error tempfail), nothing relayed, logged."""
        dead = self.deadPort()
        port = self.startProxy(f'[filters.rspamd]\nrspamd = "tcp:host=127.0.0.1:port={dead}"\n')
        client = await self.sendMessage(port, MESSAGE)
        last = client.replies[-1]
        self.assertEqual((last.code, last.lines[0][:5]), (451, b"4.7.1"))
        self.assertEqual(self.mta.messages, [])
        self.assertTrue(self.logged(f"rspamd at tcp:host=127.0.0.1:port={dead} unreachable"))

    async def test_downAccepted(self) -> None:
        """rspamd unreachable, on_error = "accept": relayed as it came."""
        dead = self.deadPort()
        port = self.startProxy(
            f'[filters.rspamd]\non_error = "accept"\nrspamd = "tcp:host=127.0.0.1:port={dead}"\n'
        )
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, MESSAGE)
