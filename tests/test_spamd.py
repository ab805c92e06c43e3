"""
Tests for the spamd filter: the SPAMC/SPAMD exchange in pure code and over a StringTransport,
its options, and the filter in the running proxy against an in-process spamd over loopback
TCP and a UNIX socket.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailproxy.envelope import Message
from mailproxy.filters import FilterError, IFilter, OptionError
from mailproxy.filters.spamd import (
    DEFAULT_MAX_SIZE,
    SpamdAnswer,
    SpamdFilter,
    SpamdFilterFactory,
    _SpamdProtocol,
    parseAnswer,
    request,
    spamHeaders,
)
from tests.fakes import FakeSpamd, ProxyTestCase

#: What spamd 4.0.1 answered, byte for byte, to SYMBOLS with GTUBE and with a short ham.
GTUBE_ANSWER = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 55\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
    b"GTUBE,MSGID_SHORT,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO"
)
HAM_ANSWER = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 33\r\nSpam: False ; -0.0 / 5.0\r\n\r\n"
    b"MSGID_SHORT,NO_RECEIVED,NO_RELAYS"
)
EMPTY_ANSWER = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; 0.1 / 5.0\r\n\r\n"

#: A message with dot lines: the client dot-stuffs them, spamd must get them unstuffed.
MESSAGE = (
    b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: lunch\r\n\r\n"
    b"Shall we meet at noon?\r\n.\r\n..two dots\r\n.one dot\r\n"
)


class ParseAnswerTests(SynchronousTestCase):
    """spamd's answers, parsed without I/O."""

    def test_gtube(self) -> None:
        """spamd's real answer for GTUBE: spam, score 1000.0 of 5.0, five rules."""
        answer = parseAnswer(GTUBE_ANSWER, closed=False)
        self.assertEqual(
            answer,
            SpamdAnswer(
                isSpam=True,
                score=1000.0,
                required=5.0,
                scoreText="1000.0",
                requiredText="5.0",
                tests=("GTUBE", "MSGID_SHORT", "NO_RECEIVED", "NO_RELAYS", "TVD_SPACE_RATIO"),
            ),
        )

    def test_ham(self) -> None:
        """spamd's real answer for a ham: not spam, its score kept as written (-0.0)."""
        answer = parseAnswer(HAM_ANSWER, closed=True)
        assert answer is not None
        self.assertFalse(answer.isSpam)
        self.assertEqual((answer.scoreText, answer.score), ("-0.0", 0.0))
        self.assertEqual(answer.tests, ("MSGID_SHORT", "NO_RECEIVED", "NO_RELAYS"))

    def test_noRules(self) -> None:
        """An answer with an empty body (no rule hit) is complete at its blank line."""
        answer = parseAnswer(EMPTY_ANSWER, closed=False)
        assert answer is not None
        self.assertEqual((answer.score, answer.tests), (0.1, ()))

    def test_incomplete(self) -> None:
        """Every proper prefix of an answer is incomplete, and an error once spamd closed."""
        for cut in range(len(GTUBE_ANSWER)):
            self.assertIsNone(parseAnswer(GTUBE_ANSWER[:cut], closed=False), cut)
            self.assertRaises(FilterError, parseAnswer, GTUBE_ANSWER[:cut], closed=True)

    def test_errors(self) -> None:
        """spamd's error answers and non-answers are FilterErrors that quote them."""
        for data, quoted in [
            (
                b"SPAMD/1.0 76 Bad header line: (Content-Length contains non-numeric bytes)\r\n",
                "SPAMD/1.0 76 Bad header line",
            ),
            (b"SPAMD/1.0 79 Timeout: (30 second timeout while trying to SYMBOLS)\r\n", "79"),
            (b"HTTP/1.1 400 Bad Request\r\n\r\n", "HTTP/1.1 400"),
            (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "no valid Spam header"),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\nContent-length: 0\r\n\r\n", "Spam header"),
            (b"SPAMD/1.1 0 EX_OK\r\nContent-length: x\r\n\r\n", "Content-length"),
            (b"SPAMD/1.1 0 EX_OK\r\nno colon\r\n\r\n", "malformed header"),
            (
                b"SPAMD/1.1 0 EX_OK\r\nContent-length: 8\r\nSpam: True ; 9.0 / 5.0\r\n\r\nA B\r\nC,D",
                "rule names",
            ),
        ]:
            with self.assertRaises(FilterError) as caught:
                parseAnswer(data, closed=True)
            self.assertIn(quoted, str(caught.exception), data)

    def test_request(self) -> None:
        """The request is SYMBOLS SPAMC/1.5 with the message's length, and User if given."""
        self.assertEqual(request(1234), b"SYMBOLS SPAMC/1.5\r\nContent-length: 1234\r\n\r\n")
        self.assertEqual(
            request(5, "mail"), b"SYMBOLS SPAMC/1.5\r\nContent-length: 5\r\nUser: mail\r\n\r\n"
        )

    def test_headers(self) -> None:
        """The headers say what SpamAssassin's would; X-Spam-Flag only for spam."""
        ham = parseAnswer(HAM_ANSWER, closed=True)
        assert ham is not None
        self.assertEqual(
            spamHeaders(ham),
            (
                (
                    "X-Spam-Status",
                    "No, score=-0.0 required=5.0 tests=MSGID_SHORT,NO_RECEIVED,NO_RELAYS",
                ),
                ("X-Spam-Score", "-0.0"),
            ),
        )
        spam = parseAnswer(GTUBE_ANSWER, closed=True)
        assert spam is not None
        self.assertEqual(spamHeaders(spam)[0], ("X-Spam-Flag", "YES"))
        empty = parseAnswer(EMPTY_ANSWER, closed=True)
        assert empty is not None
        self.assertEqual(spamHeaders(empty)[0][1], "No, score=0.1 required=5.0 tests=none")

    def test_longRuleListShortened(self) -> None:
        """A rule list that would make X-Spam-Status over 900 characters is cut at a comma."""
        names = ",".join(f"RULE_NUMBER_{i:03d}" for i in range(100)).encode()
        data = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 30.0 / 5.0\r\n\r\n" + names
        answer = parseAnswer(data, closed=True)
        assert answer is not None
        status = spamHeaders(answer)[1][1]
        self.assertLessEqual(len(status), 900)
        self.assertTrue(status.endswith(",..."), status[-40:])


class StreamingTests(SynchronousTestCase):
    """The exchange over a StringTransport: the message is streamed, not read whole."""

    def test_streamedFromSpool(self) -> None:
        """
        The request goes first, then the spooled message in 16 KiB chunks as the transport
        asks for them (a pull producer); the answer fires once complete and the connection
        is closed.
        """
        path = self.mktemp()
        content = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 1000
        with open(path, "wb") as f:
            f.write(content)
        answer: defer.Deferred[SpamdAnswer] = defer.Deferred()
        protocol = _SpamdProtocol(request(len(content)), Message(path, len(content)), answer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), request(len(content)))
        self.assertIsNotNone(transport.producer)
        self.assertFalse(transport.streaming)
        for _ in range(20):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.assertIsNone(transport.producer)
        self.assertEqual(transport.value(), request(len(content)) + content)
        self.assertNoResult(answer)
        protocol.dataReceived(GTUBE_ANSWER[:30])
        self.assertNoResult(answer)
        protocol.dataReceived(GTUBE_ANSWER[30:])
        self.assertEqual(self.successResultOf(answer).score, 1000.0)
        self.assertTrue(transport.disconnecting)

    def test_answerBeforeEndOfMessage(self) -> None:
        """An error answer while the message is still being sent: FilterError, connection
        aborted, no more reading of the spool."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x" * 100000)
        answer: defer.Deferred[SpamdAnswer] = defer.Deferred()
        protocol = _SpamdProtocol(request(100000), Message(path, 100000), answer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.producer.resumeProducing()
        protocol.dataReceived(b"SPAMD/1.0 76 Bad header line: (too many headers)\r\n")
        self.failureResultOf(answer, FilterError)
        self.assertTrue(transport.disconnected)


class OptionsTests(SynchronousTestCase):
    """The [filters.spamd] options."""

    def build(self, **options: object) -> SpamdFilter:
        built = SpamdFilterFactory().build(options, Clock())
        self.assertTrue(verifyObject(IFilter, built))
        assert isinstance(built, SpamdFilter)
        return built

    def test_defaults(self) -> None:
        """By default: spamd on 127.0.0.1:783, refuse at 10.0, add headers, 500 KiB limit."""
        built = self.build()
        self.assertEqual(built.client.address, "tcp:host=127.0.0.1:port=783")
        self.assertIsNone(built.client.user)
        self.assertEqual(
            (built.rejectScore, built.addHeaders, built.maxSize), (10.0, True, DEFAULT_MAX_SIZE)
        )
        self.assertEqual(DEFAULT_MAX_SIZE, 512000)
        self.assertFalse(built.always)

    def test_options(self) -> None:
        """Every option is read."""
        built = self.build(
            spamd="unix:/run/spamd.sock",
            reject_score=7,
            add_headers=False,
            max_size=1000,
            user="mail",
        )
        self.assertEqual(built.client.address, "unix:/run/spamd.sock")
        self.assertEqual(
            (built.rejectScore, built.addHeaders, built.maxSize, built.client.user),
            (7.0, False, 1000, "mail"),
        )

    def test_bad(self) -> None:
        """Bad values name their key."""
        for options, key in [
            ({"spamd": "nonsense:x"}, "spamd"),
            ({"spamd": 783}, "spamd"),
            ({"spamd": "unix:/run/" + "s" * 103}, "spamd"),
            ({"reject_score": "high"}, "reject_score"),
            ({"max_size": 0}, "max_size"),
            ({"add_headers": "yes"}, "add_headers"),
            ({"user": "a\r\nSpam: True"}, "user"),
            ({"rejectscore": 5}, "rejectscore"),
        ]:
            with self.assertRaises(OptionError) as caught:
                SpamdFilterFactory().build(options, Clock())
            self.assertEqual(caught.exception.key, key, options)


class SpamdThroughProxyTests(ProxyTestCase):
    """The proxy with [filters.spamd], an in-process spamd, and the stand-in MTA."""

    def spamd(self, fake: FakeSpamd, options: str = "", unix: bool = False) -> int:
        """Start the fake and a proxy using it; return the proxy's port."""
        where = self.serve(fake.buildFactory(), unix)
        return self.startProxy(f'[filters.spamd]\nspamd = "{where}"\n{options}')

    async def test_spamRefused(self) -> None:
        """
        A message spamd scores at or above reject_score is refused with 550 5.7.1 naming the
        score; the MTA never receives it; spamd got the message exactly as the client meant
        it (dot-unstuffed), with SYMBOLS and its length.
        """
        fake = FakeSpamd(score=12.3, tests=("GTUBE", "NO_RELAYS"))
        port = self.spamd(fake)
        client = await self.sendMessage(port, MESSAGE)
        last = client.replies[-1]
        self.assertEqual(last.code, 550)
        self.assertEqual(last.lines, (b"5.7.1 Message refused as spam (score 12.3)",))
        self.assertEqual(self.mta.messages, [])
        [req] = fake.requests
        self.assertEqual(req.command, b"SYMBOLS SPAMC/1.5")
        self.assertEqual(req.header(b"Content-length"), str(len(MESSAGE)).encode())
        self.assertEqual(req.body, MESSAGE)
        self.assertEqual(
            bytes(fake.received),
            b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE,
        )
        self.assertTrue(self.logged("spamd: score 12.3 required 5.0 (spam) tests=GTUBE,NO_RELAYS"))

    async def test_hamTaggedOverUnixSocket(self) -> None:
        """
        Below reject_score, over a UNIX socket and with a User: the message is relayed with
        X-Spam-Status and X-Spam-Score prepended, and is otherwise byte-identical.
        """
        fake = FakeSpamd(score=4.2, tests=("HTML_MESSAGE", "MISSING_DATE"))
        port = self.spamd(fake, 'user = "mail"\n', unix=True)
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        [message] = self.mta.messages
        self.assertEqual(
            message.content,
            b"X-Spam-Status: No, score=4.2 required=5.0 tests=HTML_MESSAGE,MISSING_DATE\r\n"
            b"X-Spam-Score: 4.2\r\n" + MESSAGE,
        )
        [req] = fake.requests
        self.assertEqual((req.body, req.header(b"User")), (MESSAGE, b"mail"))

    async def test_spamBelowRejectScoreFlagged(self) -> None:
        """Spam by spamd's threshold but under reject_score is delivered with X-Spam-Flag: YES."""
        port = self.spamd(FakeSpamd(score=7.5, tests=("BAYES_99",)))
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertTrue(
            self.mta.messages[0].content.startswith(
                b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=7.5 required=5.0 tests=BAYES_99\r\n"
            )
        )

    async def test_rejectScoreOption(self) -> None:
        """reject_score = 5.0 refuses what the default (10.0) lets through."""
        port = self.spamd(FakeSpamd(score=7.5), "reject_score = 5.0\n")
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 550)

    async def test_noHeaders(self) -> None:
        """With add_headers = false a ham is relayed unchanged."""
        port = self.spamd(FakeSpamd(score=1.0), "add_headers = false\n")
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, MESSAGE)

    async def test_tooLargeSkipped(self) -> None:
        """A message over max_size is not sent to spamd and is relayed untouched."""
        fake = FakeSpamd(score=50.0)
        port = self.spamd(fake, f"max_size = {len(MESSAGE) - 1}\n")
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, MESSAGE)
        self.assertEqual(bytes(fake.received), b"")
        self.assertTrue(self.logged(f"spamd: not scanned: {len(MESSAGE)} bytes, over max_size"))

    async def test_spamdDown(self) -> None:
        """spamd unreachable: 451 4.7.1, nothing relayed, the reason logged."""
        dead = self.deadPort()
        port = self.startProxy(f'[filters.spamd]\nspamd = "tcp:host=127.0.0.1:port={dead}"\n')
        client = await self.sendMessage(port, MESSAGE)
        last = client.replies[-1]
        self.assertEqual((last.code, last.lines[0][:5]), (451, b"4.7.1"))
        self.assertEqual(self.mta.messages, [])
        self.assertTrue(self.logged(f"spamd at tcp:host=127.0.0.1:port={dead} unreachable"))

    async def test_spamdDownAccepted(self) -> None:
        """spamd unreachable with on_error = "accept": relayed as is, without spam headers."""
        dead = self.deadPort()
        port = self.startProxy(
            f'[filters.spamd]\non_error = "accept"\nspamd = "tcp:host=127.0.0.1:port={dead}"\n'
        )
        client = await self.sendMessage(port, MESSAGE)
        self.assertEqual(client.replies[-1].code, 250)
        self.assertEqual(self.mta.messages[0].content, MESSAGE)

    async def test_badAnswers(self) -> None:
        """spamd hanging up, answering nonsense, or never answering (timeout): 451 4.7.1."""
        for behaviour in ("hangup", "garbage", "silent"):
            fake = FakeSpamd(score=50.0, behaviour=behaviour)
            port = self.spamd(fake, "timeout = 0.5\n")
            client = await self.sendMessage(port, MESSAGE)
            self.assertEqual(client.replies[-1].code, 451, behaviour)
            self.assertEqual(fake.requests[0].body, MESSAGE)
        self.assertEqual(self.mta.messages, [])
