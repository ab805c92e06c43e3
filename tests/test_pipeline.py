"""
Tests for L{mailproxy.filters.pipeline}: order, the first refusal, headers, timeouts,
the error policy, dry runs, and building a pipeline from the configuration.

Everything runs on a L{Clock}: a timeout is a call to C{advance}, never a wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailproxy.config import Config, ConfigError, FilterSpec, OnError, Timeouts
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    Action,
    FilterError,
    IFilter,
    IFilterFactory,
    Stage,
    Verdict,
    VerdictResult,
)
from mailproxy.filters import pipeline as pipelineModule
from mailproxy.filters.pipeline import ConfiguredFilter, Pipeline, buildPipeline, filterFactories

Answer = Callable[[], Any]
TEMPFAIL = (Action.TEMPFAIL, 451, "4.7.1")
#: What a filter's bug answers: an internal error, never an acceptance.
BUG = (Action.TEMPFAIL, 451, "4.3.0")
#: The installed filter kinds, found once (as the service does at start-up).
FACTORIES = filterFactories()


@implementer(IFilter)
class FakeFilter:
    """
    A filter that answers every check with C{answer()} and records each call as
    C{(name, stage)} in C{calls}, a list it may share with other fakes.

    @ivar deferreds: the Deferreds it answered with, when C{answer} makes them.
    """

    def __init__(
        self,
        name: str,
        answer: Answer = Verdict.accept,
        stages: frozenset[Stage] = frozenset(Stage),
        calls: list[tuple[str, Stage]] | None = None,
        always: bool = False,
    ) -> None:
        self.name = name
        self.always = always
        self.stages = stages
        self.calls = [] if calls is None else calls
        self.deferreds: list[Deferred[Verdict]] = []
        self._answer = answer

    def _check(self, stage: Stage) -> VerdictResult:
        self.calls.append((self.name, stage))
        result: VerdictResult = self._answer()  # not always: some fakes answer nonsense
        if isinstance(result, Deferred):
            self.deferreds.append(result)
        return result

    def checkConnect(self, session: Session) -> VerdictResult:
        return self._check(Stage.CONNECT)

    def checkHelo(self, session: Session) -> VerdictResult:
        return self._check(Stage.HELO)

    def checkMail(self, session: Session, envelope: Envelope) -> VerdictResult:
        return self._check(Stage.MAIL)

    def checkRcpt(self, session: Session, envelope: Envelope, recipient: str) -> VerdictResult:
        return self._check(Stage.RCPT)

    def checkMessage(self, session: Session, envelope: Envelope, message: Message) -> VerdictResult:
        return self._check(Stage.MESSAGE)


class Never:
    """An answer that never comes; it counts how often it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    def __call__(self) -> Deferred[Verdict]:
        return Deferred(canceller=self._cancel)

    def _cancel(self, d: Deferred[Verdict]) -> None:
        self.cancelled += 1


def never() -> Deferred[Verdict]:
    """A filter that never answers."""
    return Deferred()


def bug() -> Verdict:
    raise KeyError("a bug in the filter")


def unavailable() -> Verdict:
    raise FilterError("spamd is not answering")


def rejecting(text: str) -> Answer:
    return lambda: Verdict.reject(text)


def adding(name: str, value: str) -> Answer:
    return lambda: Verdict.accept(((name, value),))


SESSION = Session("s1", "192.0.2.1", 40000, helo="client.example")
ENVELOPE = Envelope("a@example.org", recipients=["b@example.net"])
MESSAGE = Message("/nonexistent", 10)


def summary(verdict: Verdict) -> tuple[Action, int, str]:
    return verdict.action, verdict.code, verdict.enhanced


class PipelineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def pipeline(self, *filters: ConfiguredFilter, total: float = 120.0) -> Pipeline:
        return Pipeline(filters, self.clock, total)

    def message(self, pipeline: Pipeline) -> Verdict:
        """Check the message stage, which must answer at once."""
        return self.successResultOf(pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE))

    def logged(self, text: str) -> list[LogEvent]:
        """The events whose formatted text contains C{text}."""
        return [e for e in self.events if text in formatEvent(e)]


class OrderTests(PipelineTestCase):
    def test_fakeProvidesIFilter(self) -> None:
        """The fake used here is a complete IFilter."""
        self.assertTrue(verifyObject(IFilter, FakeFilter("fake")))

    def test_configurationOrder(self) -> None:
        """Filters run in configuration order at every stage, each once."""
        calls: list[tuple[str, Stage]] = []
        names = ["c", "a", "b"]
        pipeline = self.pipeline(*(ConfiguredFilter(FakeFilter(n, calls=calls), 30) for n in names))
        self.successResultOf(pipeline.checkConnect(SESSION))
        self.successResultOf(pipeline.checkHelo(SESSION))
        self.successResultOf(pipeline.checkMail(SESSION, ENVELOPE))
        self.successResultOf(pipeline.checkRcpt(SESSION, ENVELOPE, "b@example.net"))
        self.message(pipeline)
        stages = [Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.MESSAGE]
        self.assertEqual(calls, [(n, s) for s in stages for n in names])

    def test_onlyDeclaredStages(self) -> None:
        """A filter is asked only at the stages it declares; a stage with none accepts."""
        calls: list[tuple[str, Stage]] = []
        mail = FakeFilter("mail", rejecting("no"), frozenset({Stage.MAIL}), calls)
        pipeline = self.pipeline(ConfiguredFilter(mail, 30))
        self.assertFalse(pipeline.wants(Stage.CONNECT))
        self.assertTrue(pipeline.wants(Stage.MAIL))
        self.assertEqual(self.successResultOf(pipeline.checkConnect(SESSION)), Verdict.accept())
        self.assertEqual(self.message(pipeline), Verdict.accept())
        self.assertEqual(calls, [])
        self.assertTrue(self.successResultOf(pipeline.checkMail(SESSION, ENVELOPE)).refuses)

    def test_firstRefusalWins(self) -> None:
        """The first refusal is the answer; the filters after it are not asked."""
        calls: list[tuple[str, Stage]] = []
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("a", adding("X-A", "1"), calls=calls), 30),
            ConfiguredFilter(FakeFilter("b", rejecting("b says no"), calls=calls), 30),
            ConfiguredFilter(FakeFilter("c", rejecting("c says no"), calls=calls), 30),
        )
        verdict = self.message(pipeline)
        self.assertEqual(verdict, Verdict.reject("b says no"))
        self.assertEqual([name for name, _ in calls], ["a", "b"])
        [event] = self.logged("refused by b")
        self.assertEqual(event["filter"], "b")

    def test_headersInOrder(self) -> None:
        """The headers of accepting filters are gathered in configuration order."""
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("spf", adding("Received-SPF", "pass")), 30),
            ConfiguredFilter(FakeFilter("plain"), 30),
            ConfiguredFilter(FakeFilter("spam", adding("X-Spam-Status", "No")), 30),
        )
        self.assertEqual(
            self.message(pipeline).headers,
            (("Received-SPF", "pass"), ("X-Spam-Status", "No")),
        )

    def test_allowSkipsLaterFilters(self) -> None:
        """
        A filter that allows a session (a DNSWL hit) skips every later filter for the
        rest of the session, but those that always run; a dry run only logs it.
        """
        calls: list[tuple[str, Stage]] = []
        session = Session("S2", "192.0.2.1", 25)
        pipeline = self.pipeline(
            ConfiguredFilter(
                FakeFilter("dnswl", Verdict.allow, frozenset({Stage.CONNECT}), calls), 30
            ),
            ConfiguredFilter(FakeFilter("dnsbl", rejecting("listed"), calls=calls), 30),
            ConfiguredFilter(FakeFilter("clamd", calls=calls, always=True), 30),
        )
        self.assertFalse(self.successResultOf(pipeline.checkConnect(session)).refuses)
        self.assertEqual(session.allowedBy, "dnswl")
        self.assertFalse(
            self.successResultOf(pipeline.checkMessage(session, ENVELOPE, MESSAGE)).refuses
        )
        self.assertEqual(
            calls, [("dnswl", Stage.CONNECT), ("clamd", Stage.CONNECT), ("clamd", Stage.MESSAGE)]
        )
        dry = Session("S3", "192.0.2.1", 25)
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("dnswl", Verdict.allow), 30, dryRun=True),
            ConfiguredFilter(FakeFilter("dnsbl", rejecting("listed")), 30),
        )
        self.assertTrue(self.successResultOf(pipeline.checkConnect(dry)).refuses)
        self.assertIsNone(dry.allowedBy)
        self.assertTrue(self.logged("dry run: would be allowed by dnswl"))

    def test_deferredAnswers(self) -> None:
        """A filter answering later holds the pipeline until it does."""
        calls: list[tuple[str, Stage]] = []
        slow = FakeFilter("slow", never, calls=calls)
        pipeline = self.pipeline(
            ConfiguredFilter(slow, 30), ConfiguredFilter(FakeFilter("next", calls=calls), 30)
        )
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        self.assertNoResult(d)
        self.assertEqual(len(calls), 1)
        slow.deferreds[0].callback(Verdict.accept((("X-Slow", "yes"),)))
        self.assertEqual(self.successResultOf(d).headers, (("X-Slow", "yes"),))
        self.assertEqual([name for name, _ in calls], ["slow", "next"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


    def test_answerAtOnceNoTimer(self) -> None:
        """
        Filters that answer at once are never given a timer (none made, none cancelled):
        their answer cannot be late.
        """
        made: list[object] = []
        callLater = self.clock.callLater

        def counting(delay: float, f: Any, *a: object, **kw: object) -> Any:
            made.append(f)
            return callLater(delay, f, *a, **kw)

        self.clock.callLater = counting  # type: ignore[method-assign]
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("one"), 30), ConfiguredFilter(FakeFilter("two"), 30)
        )
        self.successResultOf(pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE))
        self.assertEqual(made, [])

    def test_chainedAnswerTimesOut(self) -> None:
        """
        An answer that has fired but waits on another Deferred is not there yet: its
        timeout still applies.
        """
        inner: Deferred[Verdict] = Deferred()
        outer: Deferred[object] = defer.succeed(None)
        outer.addCallback(lambda _: inner)
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("chained", lambda *a: outer), 5, OnError.TEMPFAIL)
        )
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(summary(self.successResultOf(d)), TEMPFAIL)


class FailureTests(PipelineTestCase):
    def test_timeoutTempfails(self) -> None:
        """A filter over its timeout is cancelled and the stage tempfails with 451 4.7.1."""
        answer = Never()
        pipeline = self.pipeline(ConfiguredFilter(FakeFilter("slow", answer), 5, OnError.TEMPFAIL))
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(summary(self.successResultOf(d)), TEMPFAIL)
        self.assertEqual(answer.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [event] = self.logged("filter slow failed")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["why"], "no answer within its timeout of 5 s")

    def test_timeoutAccepts(self) -> None:
        """With on_error accept, a filter over its timeout is skipped and the rest run."""
        calls: list[tuple[str, Stage]] = []
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("slow", never, calls=calls), 5, OnError.ACCEPT),
            ConfiguredFilter(FakeFilter("next", adding("X-Next", "1"), calls=calls), 5),
        )
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), Verdict.accept((("X-Next", "1"),)))
        self.assertEqual([name for name, _ in calls], ["slow", "next"])

    def test_filterErrorFollowsPolicy(self) -> None:
        """An expected failure (FilterError, a refused connection) follows on_error."""
        for answer in (unavailable, lambda: defer.fail(ConnectionRefusedError())):
            tempfail = self.pipeline(ConfiguredFilter(FakeFilter("f", answer), 5, OnError.TEMPFAIL))
            self.assertEqual(summary(self.message(tempfail)), TEMPFAIL)
            accept = self.pipeline(ConfiguredFilter(FakeFilter("f", answer), 5, OnError.ACCEPT))
            self.assertEqual(self.message(accept), Verdict.accept())
        [warning, *_] = self.logged("spamd is not answering")
        self.assertEqual(warning["filter"], "f")
        self.assertEqual(warning["policy"], "tempfail")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bugTempfailsEvenIfAccepting(self) -> None:
        """
        An unexpected exception is a bug: tempfailed (451 4.3.0) even with on_error
        accept, and logged with its traceback.
        """
        for answer in (bug, lambda: defer.fail(KeyError("a bug in the filter"))):
            pipeline = self.pipeline(
                ConfiguredFilter(FakeFilter("buggy", answer), 5, OnError.ACCEPT)
            )
            self.assertEqual(summary(self.message(pipeline)), BUG)
        events = self.logged("filter buggy raised")
        self.assertEqual(len(events), 2)
        for event in events:
            self.assertEqual(event["log_level"], LogLevel.critical)
            failure = event["log_failure"]
            self.assertIsInstance(failure.value, KeyError)
            self.assertIn("a bug in the filter", failure.getTraceback())
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 2)

    def test_notAVerdict(self) -> None:
        """A filter answering something other than a Verdict tempfails (451 4.3.0), whatever on_error."""
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("odd", lambda: "OK"), 5, OnError.ACCEPT)
        )
        self.assertEqual(summary(self.message(pipeline)), BUG)
        [event] = self.logged("not a Verdict")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["answer"], "OK")

    def test_dryRun(self) -> None:
        """A dry-run filter's refusal is only logged as "would refuse"; the rest run."""
        calls: list[tuple[str, Stage]] = []
        pipeline = self.pipeline(
            ConfiguredFilter(FakeFilter("trial", rejecting("spam"), calls=calls), 5, dryRun=True),
            ConfiguredFilter(FakeFilter("next", adding("X-Next", "1"), calls=calls), 5),
        )
        self.assertEqual(self.message(pipeline), Verdict.accept((("X-Next", "1"),)))
        self.assertEqual([name for name, _ in calls], ["trial", "next"])
        [event] = self.logged("would refuse")
        self.assertEqual((event["filter"], event["text"]), ("trial", "spam"))
        self.assertEqual(self.logged("refused by"), [])

    def test_totalTimeout(self) -> None:
        """
        The filters of a stage together get the stage's timeout: past it the stage
        tempfails, the running filter is cancelled and no timer is left behind.
        """
        first = FakeFilter("first", Never())
        answer = Never()
        second = FakeFilter("second", answer)
        pipeline = self.pipeline(
            ConfiguredFilter(first, 8, OnError.ACCEPT),
            ConfiguredFilter(second, 8, OnError.ACCEPT),
            total=10,
        )
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        self.clock.advance(8)
        self.assertNoResult(d)
        self.assertEqual(len(second.deferreds), 1)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        verdict = self.successResultOf(d)
        self.assertEqual(summary(verdict), TEMPFAIL)
        self.assertIn("timed out", verdict.text)
        self.assertEqual(answer.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.logged("took over 10s together")), 1)

    def test_cancel(self) -> None:
        """Cancelling a check (the client left) cancels the running filter and its timer."""
        answer = Never()
        pipeline = self.pipeline(ConfiguredFilter(FakeFilter("slow", answer), 5))
        d = pipeline.checkMessage(SESSION, ENVELOPE, MESSAGE)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(answer.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BuildTests(PipelineTestCase):
    def config(self, *filters: FilterSpec) -> Config:
        return Config(
            path="/etc/mailproxy.toml",
            listen=("tcp:25",),
            upstream="tcp:host=127.0.0.1:port=10025",
            hostname="mx.example",
            spoolDir="/var/spool/mailproxy",
            timeouts=Timeouts(filters=60.0),
            filters=filters,
        )

    def test_build(self) -> None:
        """The configured built-in filters are built with their options and run."""
        pipeline = buildPipeline(
            self.config(
                FilterSpec("size", options={"max_bytes": 100}),
                FilterSpec("access", options={"deny_senders": ["*@spam.example"]}),
            ),
            self.clock,
            None,
            FACTORIES,
        )
        self.assertTrue(pipeline.wants(Stage.MAIL))
        self.assertFalse(pipeline.wants(Stage.CONNECT))
        spam = Envelope("Boss@SPAM.example")
        self.assertEqual(
            summary(self.successResultOf(pipeline.checkMail(SESSION, spam))),
            (Action.REJECT, 550, "5.7.1"),
        )
        big = pipeline.checkMessage(SESSION, ENVELOPE, Message("/nonexistent", 101))
        self.assertEqual(summary(self.successResultOf(big)), (Action.REJECT, 552, "5.3.4"))

    def test_buildDryRun(self) -> None:
        """A section's dry_run reaches the pipeline: its refusals are only logged."""
        pipeline = buildPipeline(
            self.config(FilterSpec("access", dryRun=True, options={"deny_senders": ["*"]})),
            self.clock,
            None,
            FACTORIES,
        )
        self.assertEqual(
            self.successResultOf(pipeline.checkMail(SESSION, ENVELOPE)), Verdict.accept()
        )
        self.assertEqual(len(self.logged("would refuse")), 1)

    def test_registryOnly(self) -> None:
        """
        buildPipeline looks for no plugins: it builds from the registry it is given, and
        a name that registry lacks is not installed, whatever is on disk.
        """

        def noDiscovery(*args: object) -> None:
            raise AssertionError("plugins looked for again")

        self.patch(pipelineModule, "getPlugins", noDiscovery)

        @implementer(IFilterFactory)
        class Factory:
            name = "only"

            def build(self, options: object, reactor: object) -> IFilter:
                return FakeFilter("only", lambda: Verdict.reject("Only"), frozenset({Stage.MAIL}))

        pipeline = buildPipeline(
            self.config(FilterSpec("only")), self.clock, None, {"only": Factory()}
        )
        self.assertEqual(
            summary(self.successResultOf(pipeline.checkMail(SESSION, ENVELOPE))),
            (Action.REJECT, 550, "5.7.1"),
        )
        error = self.assertRaises(
            ConfigError, buildPipeline, self.config(FilterSpec("access")), self.clock, None, {}
        )
        self.assertEqual(
            str(error),
            "/etc/mailproxy.toml: filters.access: no such filter is installed (known: none)",
        )

    def test_registryReadOnly(self) -> None:
        """The registry filterFactories() finds cannot be changed by who holds it."""
        with self.assertRaises(TypeError):
            FACTORIES["access"] = FACTORIES["size"]  # type: ignore[index]

    def test_unknownFilter(self) -> None:
        """An uninstalled filter name is a ConfigError naming the file and filters.NAME."""
        error = self.assertRaises(
            ConfigError,
            buildPipeline,
            self.config(FilterSpec("spamassassin")),
            self.clock,
            None,
            FACTORIES,
        )
        self.assertEqual(error.key, "filters.spamassassin")
        self.assertIn("/etc/mailproxy.toml: filters.spamassassin: no such filter", str(error))
        self.assertIn("access", str(error))
        self.assertIn("size", str(error))

    def test_badOption(self) -> None:
        """A wrong option is a ConfigError naming filters.NAME.KEY."""
        spec = FilterSpec("access", options={"deny_networks": ["192.0.2.0/33"]})
        error = self.assertRaises(
            ConfigError, buildPipeline, self.config(spec), self.clock, None, FACTORIES
        )
        self.assertEqual(error.key, "filters.access.deny_networks")
        self.assertIn("192.0.2.0/33", str(error))

    def test_unknownOption(self) -> None:
        """A misspelt option is a ConfigError with a did-you-mean hint."""
        spec = FilterSpec("access", options={"deny_sender": ["*@spam.example"]})
        error = self.assertRaises(
            ConfigError, buildPipeline, self.config(spec), self.clock, None, FACTORIES
        )
        self.assertEqual(error.key, "filters.access.deny_sender")
        self.assertIn('unknown option (did you mean "deny_senders"?)', str(error))

    def test_missingOption(self) -> None:
        """A required option left out is a ConfigError naming it."""
        error = self.assertRaises(
            ConfigError, buildPipeline, self.config(FilterSpec("size")), self.clock, None, FACTORIES
        )
        self.assertEqual(error.key, "filters.size.max_bytes")
        self.assertIn("is required", str(error))
