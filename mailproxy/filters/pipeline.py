"""
The filter pipeline: runs the configured filters of a stage in configuration order,
each under its own timeout, the first refusal winning; applies each filter's
C{on_error} policy and C{dry_run} switch; gathers the headers accepting filters add,
and at the message stage their header edits (L{HeaderEdit}), in filter order, for the
release to apply. Header edits are a message-stage answer: those of a filter of an earlier
stage (which has not read the message) are logged and ignored; its C{headers} are added.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.failure import Failure

from mailproxy import plugins
from mailproxy.config import Config, ConfigError, OnError
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import (
    Action,
    FilterError,
    HeaderEdit,
    IFilter,
    IFilterFactory,
    OptionError,
    Stage,
    Verdict,
)

#: Failures a filter is expected to meet; they follow its C{on_error} policy. Anything
#: else is a bug: logged with its traceback and tempfailed, never accepted.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    FilterError,
    defer.TimeoutError,
    error.TimeoutError,
    error.ConnectError,
    error.ConnectionClosed,
    OSError,
)


#: What a filter's bug (an exception it did not expect, an invalid or missing verdict)
#: answers: never an acceptance.
BUG: Verdict = Verdict.tempfail("Error: internal error, try again later", 451, "4.3.0")
UNAVAILABLE: Verdict = Verdict.tempfail("Message checks temporarily unavailable, try again later")


@attrs.frozen
class ConfiguredFilter:
    filter: IFilter
    timeout: float
    onError: OnError = OnError.TEMPFAIL
    dryRun: bool = False


@attrs.frozen
class Checked:
    """What a pipeline observer hears after each filter answered: who, what, how long."""

    session: Session
    stage: Stage
    filter: str
    seconds: float
    verdict: Verdict
    dryRun: bool


#: Called after every filter's answer (the counters' hook, L{mailproxy.stats.Stats.filterChecked}).
Observer = Callable[[Checked], None]


def _call(
    stage: Stage, f: IFilter, session: Session, args: tuple[object, ...]
) -> Deferred[Verdict]:
    """Ask C{f} its check for C{stage} (C{checkConnect}, ..., C{checkMessage})."""
    check = getattr(f, "check" + stage.name.title())
    result: Deferred[Verdict] = defer.maybeDeferred(check, session, *args)
    return result


#: The verdict of a stage no filter checks (L{Pipeline.wants} says which: the relay gives
#: it at once, without a Deferred).
NO_FILTER = Verdict.accept()


class Pipeline:
    """
    The filters of one configuration, by stage.

    @param totalTimeout: seconds for all the filters of one stage together.
    @param observer: told of each filter's answer and latency, if given.
    """

    _log = Logger()

    def __init__(
        self,
        filters: Sequence[ConfiguredFilter],
        clock: IReactorTime,
        totalTimeout: float,
        observer: Observer | None = None,
    ) -> None:
        self._clock = clock
        self._totalTimeout = totalTimeout
        self._observer = observer
        self._byStage: Mapping[Stage, tuple[ConfiguredFilter, ...]] = {
            stage: tuple(cf for cf in filters if stage in cf.filter.stages) for stage in Stage
        }

    def wants(self, stage: Stage) -> bool:
        return bool(self._byStage[stage])

    @property
    def sizeLimit(self) -> int | None:
        """The smallest C{maxMessageSize} a configured filter declares (the size filter's)."""
        limits = [
            limit
            for cf in self._byStage[Stage.MESSAGE]
            if isinstance(limit := getattr(cf.filter, "maxMessageSize", None), int)
            and not cf.dryRun
        ]
        return min(limits, default=None)

    def checkConnect(self, session: Session) -> Deferred[Verdict]:
        return self._check(Stage.CONNECT, session, ())

    def checkHelo(self, session: Session) -> Deferred[Verdict]:
        return self._check(Stage.HELO, session, ())

    def checkMail(self, session: Session, envelope: Envelope) -> Deferred[Verdict]:
        return self._check(Stage.MAIL, session, (envelope,))

    def checkRcpt(self, session: Session, envelope: Envelope, recipient: str) -> Deferred[Verdict]:
        return self._check(Stage.RCPT, session, (envelope, recipient))

    def checkMessage(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        return self._check(Stage.MESSAGE, session, (envelope, message))

    def _check(self, stage: Stage, session: Session, args: tuple[object, ...]) -> Deferred[Verdict]:
        configured = self._byStage[stage]
        if not configured:
            return defer.succeed(NO_FILTER)
        d = Deferred.fromCoroutine(self._run(stage, configured, session, args))
        if not d.called or d.paused:
            d.addTimeout(self._totalTimeout, self._clock)  # as in _one: only if it can be late

        def overran(failure: Failure) -> Verdict:
            failure.trap(defer.TimeoutError)
            self._log.warn(
                "{session} {stage}: filters took over {timeout}s together",
                session=session.id,
                stage=stage.value,
                timeout=self._totalTimeout,
            )
            return Verdict.tempfail("Message checks timed out, try again later")

        return d.addErrback(overran)

    async def _run(
        self,
        stage: Stage,
        configured: Iterable[ConfiguredFilter],
        session: Session,
        args: tuple[object, ...],
    ) -> Verdict:
        headers: list[tuple[str, str]] = []
        edits: list[HeaderEdit] = []
        for cf in configured:
            name = cf.filter.name
            if session.allowedBy is not None and not getattr(cf.filter, "always", False):
                continue
            started = self._clock.seconds()
            verdict = await self._one(stage, cf, session, args)
            self._observe(
                Checked(session, stage, name, self._clock.seconds() - started, verdict, cf.dryRun)
            )
            if verdict.action is Action.ALLOW:
                self._log.info(
                    "{session} {stage}: {how} by {filter}",
                    session=session.id,
                    stage=stage.value,
                    how="dry run: would be allowed" if cf.dryRun else "allowed",
                    filter=name,
                )
                if not cf.dryRun:
                    session.allowedBy = name
            if verdict.refuses:
                fields = dict(
                    session=session.id,
                    stage=stage.value,
                    filter=name,
                    code=verdict.code,
                    enhanced=verdict.enhanced,
                    text=verdict.text,
                )
                if cf.dryRun:
                    self._log.info(
                        "{session} {stage}: dry run: {filter} would refuse: {code} {enhanced} {text}",
                        **fields,
                    )
                    continue
                self._log.info(
                    "{session} {stage}: refused by {filter}: {code} {enhanced} {text}", **fields
                )
                return attrs.evolve(verdict, filter=name)
            headers.extend(verdict.headers)
            if stage is Stage.MESSAGE:
                edits.extend(verdict.edits)
            elif verdict.edits:
                self._log.warn(
                    "{session} {stage}: header edits of {filter} ignored: only message "
                    "filters edit the header block",
                    session=session.id,
                    stage=stage.value,
                    filter=name,
                )
        return Verdict.accept(tuple(headers), tuple(edits))

    def _observe(self, checked: Checked) -> None:
        if self._observer is None:
            return
        try:
            self._observer(checked)
        except Exception:
            self._log.failure("{session} filter observer failed", session=checked.session.id)

    async def _one(
        self, stage: Stage, cf: ConfiguredFilter, session: Session, args: tuple[object, ...]
    ) -> Verdict:
        name = cf.filter.name
        d = _call(stage, cf.filter, session, args)
        if not d.called or d.paused:
            # An answer already there cannot be late: no timer made and cancelled for it
            # (most filters answer at once, every message).
            d.addTimeout(cf.timeout, self._clock)
        try:
            verdict = await d
        except EXPECTED_FAILURES as e:
            self._log.warn(
                "{session} {stage}: filter {filter} failed ({why}); on_error={policy}",
                session=session.id,
                stage=stage.value,
                filter=name,
                why=_why(e, cf.timeout),
                policy=cf.onError.value,
            )
            if cf.onError is OnError.ACCEPT:
                return Verdict.accept()
            return UNAVAILABLE
        except defer.CancelledError:
            raise
        except Exception:
            self._log.failure(
                "{session} {stage}: filter {filter} raised",
                session=session.id,
                stage=stage.value,
                filter=name,
            )
            return BUG
        if not isinstance(verdict, Verdict):
            self._log.error(
                "{session} {stage}: filter {filter} answered {answer!r}, not a Verdict",
                session=session.id,
                stage=stage.value,
                filter=name,
                answer=verdict,
            )
            return BUG
        return verdict


def filterFactories() -> Mapping[str, IFilterFactory]:
    """
    Find the installed filter kinds, built-in and third-party, by name (a read-only
    mapping). Discovery imports every module of L{mailproxy.plugins}: do it once, at
    start-up, while the code is sure to be readable, and hand the result to
    L{buildPipeline} for every configuration after.
    """
    found = {factory.name: factory for factory in getPlugins(IFilterFactory, plugins)}
    return types.MappingProxyType(found)


def buildPipeline(
    config: Config,
    reactor: IReactorTime,
    observer: Observer | None,
    factories: Mapping[str, IFilterFactory],
) -> Pipeline:
    """
    Build the filters a configuration names, from the filter kinds found at start-up.

    @param observer: told of each filter's answer (see L{Pipeline}), if not L{None}.
    @param factories: the installed filter kinds by name (L{filterFactories}); nothing
        is discovered here.
    @raise ConfigError: a filter is not installed, or its options are wrong.
    """
    configured: list[ConfiguredFilter] = []
    for spec in config.filters:
        factory = factories.get(spec.name)
        if factory is None:
            known = ", ".join(sorted(factories)) or "none"
            raise ConfigError(
                config.path, f"filters.{spec.name}", f"no such filter is installed (known: {known})"
            )
        try:
            built = factory.build(spec.options, reactor)
        except OptionError as e:
            raise ConfigError(config.path, f"filters.{spec.name}.{e.key}", e.message) from e
        _checkOrder(config, spec.name, built, configured)
        configured.append(ConfiguredFilter(built, spec.timeout, spec.onError, spec.dryRun))
    return Pipeline(configured, reactor, config.timeouts.filters, observer)


def _checkOrder(
    config: Config, name: str, built: IFilter, before: Sequence[ConfiguredFilter]
) -> None:
    """
    A filter that reads other filters' results (its optional C{after} attribute names
    them: dmarc reads spf's and dkim's) must come after them in the configuration.

    @raise ConfigError: one of them is missing or comes later.
    """
    earlier = {cf.filter.name for cf in before}
    for needed in getattr(built, "after", ()):
        if needed not in earlier:
            raise ConfigError(
                config.path,
                f"filters.{name}",
                f"reads the results of the {needed} filter: put a [filters.{needed}] "
                "section before it",
            )


def _why(failure: BaseException, timeout: float) -> str:
    """A filter's failure in a few words: Twisted's TimeoutError shows as a tuple."""
    if isinstance(failure, defer.TimeoutError):
        return f"no answer within its timeout of {timeout:g} s"
    return str(failure) or type(failure).__name__
