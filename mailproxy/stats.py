"""
Counters: what the proxy did, since start and today, for the stats socket, the status
page, C{/metrics} and the manhole.

The relay tells one L{Stats} what happens (a connection opened, a refusal, a release, an
MTA error) and the filter pipeline tells it how each filter answered and how long it took
(L{Stats.filterChecked} is the pipeline's observer). Nothing here does I/O.

"Today" starts at local midnight. A timer on the injected clock fires at the next local
midnight (or within the hour, whichever is first), and every event and every read checks
the date too, so a clock set forward or back, or a DST change, neither drifts the reset
nor repeats it: "today" is reset only when the local date moves past the day it counts.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailproxy.envelope import Session
from mailproxy.filters import Stage
from mailproxy.filters.pipeline import Checked
from mailproxy.wire import Reply

#: Upper bounds (seconds) of the filter latency histogram's buckets, C{+Inf} implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: How many refusals L{Stats.refusals} keeps, newest last.
REFUSALS_KEPT = 50
#: How many hourly buckets the chart shows, the current hour last.
HOURS_KEPT = 24
#: The midnight timer is re-armed at least this often (seconds), so that a clock set back
#: delays the reset by at most this much even when nothing reads the counters.
RESCHEDULE_AT_MOST = 3600.0

# Why the proxy itself refused, besides a filter's name (reasons in counters and refusals).
CONNECTION_LIMIT = "connection limit"
CLIENT_LIMIT = "client limit"
MTA_DOWN = "mta down"
#: The MTA's own refusal (a 4xx/5xx the proxy relayed).
MTA = "mta"
RECIPIENT_LIMIT = "recipient limit"
#: A filter refusal whose filter is unknown (all filters of a stage timed out together).
FILTERS = "filters"

#: Kinds of MTA errors, counted once per session (the first one).
MTA_ERRORS = ("unreachable", "lost", "timeout", "protocol", "tls", "banner")
#: Why a connection on a C{haproxy:} listener was closed before its PROXY header was
#: served (L{mailproxy.proxyprotocol.Refusal}): its peer is not in
#: C{proxy.proxy_protocol_from}, the header is not valid, or it came too late.
PROXY_REFUSALS = ("untrusted", "invalid", "timeout")
#: The session's limits that close it with 421 (L{mailproxy.replies.Reason} values):
#: C{limits.errors}, C{limits.commands}, C{timeouts.command}, C{timeouts.session},
#: C{limits.min_data_rate}.
LIMITS = ("error limit", "command limit", "command timeout", "session timeout", "data rate")


@attrs.frozen
class SessionInfo:
    """What the status shows of one active session."""

    id: str
    client: str
    helo: str | None
    sender: str | None
    recipients: int
    phase: str
    #: The worker process serving it (L{mailproxy.workers}); L{None} in one process.
    worker: int | None = None

    def toJSON(self) -> dict[str, Any]:
        """Its fields but the worker, as the snapshot and the workers' reports carry them."""
        return {
            "id": self.id,
            "client": self.client,
            "helo": self.helo,
            "sender": self.sender,
            "recipients": self.recipients,
            "phase": self.phase,
        }


class SessionView(Protocol):
    """A live session (the relay's inbound protocol) that can describe itself."""

    def describe(self) -> SessionInfo: ...


@attrs.define
class Counts:
    """One set of counters: since start, or today."""

    connections: Counter[str] = attrs.Factory(Counter)  # opened, accepted
    connectionsRefused: Counter[str] = attrs.Factory(Counter)  # by reason or filter
    heloRefused: Counter[str] = attrs.Factory(Counter)
    messages: Counter[str] = attrs.Factory(Counter)  # attempted, accepted, bytes, ambiguous
    rejected: Counter[str] = attrs.Factory(Counter)  # 5xx, by filter or reason
    tempfailed: Counter[str] = attrs.Factory(Counter)  # 4xx, by filter or reason
    recipients: Counter[str] = attrs.Factory(Counter)  # accepted
    recipientsRefused: Counter[str] = attrs.Factory(Counter)
    mtaErrors: Counter[str] = attrs.Factory(Counter)
    #: TLS handshakes done, by C{"client TLSv1.3"} / C{"mta TLSv1.2"} (side and version).
    tls: Counter[str] = attrs.Factory(Counter)
    auth: Counter[str] = attrs.Factory(Counter)  # succeeded, failed
    proxyRefused: Counter[str] = attrs.Factory(Counter)  # by PROXY_REFUSALS reason
    limitsReached: Counter[str] = attrs.Factory(Counter)  # sessions closed, by LIMITS

    def toJSON(self) -> dict[str, Any]:
        return {
            "connections": {
                "opened": self.connections["opened"],
                "accepted": self.connections["accepted"],
                "refused": dict(self.connectionsRefused),
            },
            "helo_refused": dict(self.heloRefused),
            "messages": {
                "attempted": self.messages["attempted"],
                "accepted": self.messages["accepted"],
                "bytes": self.messages["bytes"],
                "rejected": dict(self.rejected),
                "tempfailed": dict(self.tempfailed),
                "ambiguous": self.messages["ambiguous"],
            },
            "recipients": {
                "accepted": self.recipients["accepted"],
                "refused": dict(self.recipientsRefused),
            },
            "mta_errors": {kind: self.mtaErrors[kind] for kind in MTA_ERRORS},
            "tls": dict(self.tls),
            "auth": {"succeeded": self.auth["succeeded"], "failed": self.auth["failed"]},
            "proxy_refused": {why: self.proxyRefused[why] for why in PROXY_REFUSALS},
            "limits_reached": {what: self.limitsReached[what] for what in LIMITS},
        }


@attrs.define
class Latency:
    """One filter's answers: a histogram of how long it took, and its verdicts."""

    buckets: list[int] = attrs.Factory(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    count: int = 0
    sum: float = 0.0
    max: float = 0.0
    verdicts: Counter[str] = attrs.Factory(Counter)

    def observe(self, seconds: float) -> None:
        index = next((i for i, le in enumerate(LATENCY_BUCKETS) if seconds <= le), -1)
        self.buckets[index] += 1
        self.count += 1
        self.sum += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: Latency) -> None:
        """Add C{other}'s answers (a worker's, since its last report) to these."""
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)
        self.verdicts.update(other.verdicts)

    def toWire(self) -> dict[str, Any]:
        """Everything, for L{fromWire} in another process."""
        return {
            "buckets": self.buckets,
            "count": self.count,
            "sum": self.sum,
            "max": self.max,
            "verdicts": dict(self.verdicts),
        }

    @classmethod
    def fromWire(cls, data: dict[str, Any]) -> Latency:
        buckets = [int(n) for n in data["buckets"]]
        if len(buckets) != len(LATENCY_BUCKETS) + 1:
            raise ValueError("another number of latency buckets")
        return cls(
            buckets, int(data["count"]), float(data["sum"]), float(data["max"]),
            Counter({str(k): int(v) for k, v in data["verdicts"].items()}),
        )  # fmt: skip

    def cumulative(self) -> list[tuple[float, int]]:
        """C{(upper bound, count at or below it)} pairs, C{+Inf} last, as Prometheus has them."""
        pairs, running = [], 0
        for le, n in zip((*LATENCY_BUCKETS, math.inf), self.buckets, strict=True):
            running += n
            pairs.append((le, running))
        return pairs

    def quantileBound(self, q: float) -> float:
        """The upper bound of the bucket holding the C{q} quantile (C{max} for the last)."""
        wanted = q * self.count
        for le, n in self.cumulative():
            if n >= wanted and n > 0:
                return min(le, self.max)
        return self.max

    def toJSON(self) -> dict[str, Any]:
        return {
            "checks": self.count,
            "verdicts": dict(self.verdicts),
            "seconds": {
                "mean": self.sum / self.count if self.count else 0.0,
                "p50_at_most": self.quantileBound(0.5),
                "p95_at_most": self.quantileBound(0.95),
                "max": self.max,
                "sum": self.sum,
            },
            "buckets": [["+Inf" if math.isinf(le) else le, n] for le, n in self.cumulative()],
        }


@attrs.frozen
class Refusal:
    """One refusal a client saw."""

    time: float
    session: str
    client: str
    sender: str | None
    stage: str
    by: str
    reply: str

    def toJSON(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "session": self.session,
            "client": self.client,
            "sender": self.sender,
            "stage": self.stage,
            "filter": self.by,
            "reply": self.reply,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Refusal:
        return cls(
            time=float(data["time"]),
            session=str(data["session"]),
            client=str(data["client"]),
            sender=None if data["sender"] is None else str(data["sender"]),
            stage=str(data["stage"]),
            by=str(data["filter"]),
            reply=str(data["reply"]),
        )


@attrs.define
class Delta:
    """
    What a worker counted since its last report (L{Stats.takeDelta}), for its master's
    L{Stats.merge}: each count with the local day it was counted in (so that the master
    adds to "today" only what is of its today, however late the report comes), the hourly
    buckets by hour, the filters' answers, and the refusals.
    """

    #: Local date (ISO) -> group -> key -> n.
    days: dict[str, dict[str, Counter[str]]] = attrs.Factory(dict)
    #: Hour start -> counters of that hour.
    hours: dict[int, Counter[str]] = attrs.Factory(dict)
    latency: dict[str, Latency] = attrs.Factory(dict)
    refusals: list[Refusal] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(self.days or self.hours or self.latency or self.refusals)

    def toWire(self) -> dict[str, Any]:
        return {
            "days": {
                day: {group: dict(counts) for group, counts in groups.items()}
                for day, groups in self.days.items()
            },
            "hours": {str(hour): dict(counts) for hour, counts in self.hours.items()},
            "latency": {name: lat.toWire() for name, lat in self.latency.items()},
            "refusals": [r.toJSON() for r in self.refusals],
        }

    @classmethod
    def fromWire(cls, data: dict[str, Any]) -> Delta:
        """@raise ValueError, KeyError, TypeError: not what L{toWire} makes."""
        groups = {a.name for a in attrs.fields(Counts)}
        days: dict[str, dict[str, Counter[str]]] = {}
        for day, counted in data["days"].items():
            datetime.date.fromisoformat(day)
            for group, counts in counted.items():
                if group not in groups:
                    raise ValueError(f"no counter group {group!r}")
                days.setdefault(day, {})[group] = Counter(
                    {str(k): int(v) for k, v in counts.items()}
                )
        return cls(
            days=days,
            hours={
                int(hour): Counter({str(k): int(v) for k, v in counts.items()})
                for hour, counts in data["hours"].items()
            },
            latency={str(n): Latency.fromWire(lat) for n, lat in data["latency"].items()},
            refusals=[Refusal.fromJSON(r) for r in data["refusals"][-REFUSALS_KEPT:]],
        )


@attrs.define
class Worker:
    """A worker process, as its master's counters show it (L{Stats.workers})."""

    index: int
    pid: int | None = None
    #: When the running process started (Unix time); L{None} while none runs.
    started: float | None = None
    #: How many times it was started again after it died.
    restarts: int = 0
    #: Messages the MTA accepted through it since the master started (all its processes).
    accepted: int = 0
    #: Its active sessions, each with when it started, as it last reported them.
    sessions: list[tuple[SessionInfo, float]] = attrs.Factory(list)


def _localDate(now: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(now).date()


def _midnight(day: datetime.date) -> float:
    """The instant local time reaches C{day}, 00:00 (as C{mktime} resolves a DST gap)."""
    return datetime.datetime.combine(day, datetime.time()).timestamp()


def _hourStart(now: float) -> int:
    """The instant the local hour holding C{now} began (whole seconds)."""
    local = time.localtime(now)
    return math.floor(now) - local.tm_min * 60 - min(local.tm_sec, 59)


class Stats:
    """
    The counters of one proxy process: monotonic totals since start (for Prometheus),
    the same counters for today (reset at local midnight), hourly buckets for the last
    24 hours, per-filter latency, the active sessions and the last refusals.

    The midnight timer runs between L{start} and L{stop} (the service's); without it
    "today" is still right whenever it is read, as every read checks the date.

    @param clock: the time source and the timer for the midnight reset.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, refusalsKept: int = REFUSALS_KEPT) -> None:
        self._clock = clock
        now = clock.seconds()
        self.started = now
        self.total = Counts()
        self.today = Counts()
        self.day = _localDate(now)
        self._dayStart = _midnight(self.day)
        self._dayEnd = _midnight(self.day + datetime.timedelta(days=1))
        #: Hour start -> counters of that hour (connections, accepted, rejected, tempfailed).
        self._hours: dict[int, Counter[str]] = {}
        self.latency: dict[str, Latency] = {}
        self.refusals: deque[Refusal] = deque(maxlen=refusalsKept)
        self._active: dict[SessionView, float] = {}
        #: Session id -> the filter whose refusal the relay is about to report.
        #: Sessions whose final dot went to the MTA, which has not answered yet.
        self._releasing: set[str] = set()
        #: Sessions whose MTA error is counted already (one per session: the first cause).
        self._mtaFailed: set[str] = set()
        self._timer: IDelayedCall | None = None
        #: What was counted since the last L{takeDelta}, if this is a worker's.
        self._delta: Delta | None = None
        #: A master's workers by index (L{workerStarted}); empty in one process.
        self.workers: dict[int, Worker] = {}
        #: Called (once) when the first count after a L{takeDelta} is made: a worker's
        #: reporter schedules its next report.
        self.onCount: Callable[[], None] | None = None
        #: Called when a session starts or ends (a worker's reporter sends the list).
        self.onSessions: Callable[[], None] | None = None

    # -- the day ------------------------------------------------------------------------

    def _now(self) -> float:
        """The time; first start a new day if the local date has moved on."""
        now = self._clock.seconds()
        if not self._dayStart <= now < self._dayEnd:
            self._turn(now)
        return now

    def _turn(self, now: float) -> None:
        day = _localDate(now)
        if day > self.day:
            self._log.info("new day {day}: today's counters start again", day=day.isoformat())
            self.today = Counts()
            self.day = day
            self._dayStart = _midnight(day)
            self._dayEnd = _midnight(day + datetime.timedelta(days=1))
        else:
            # The clock was set back: go on counting into the day we have, until the
            # date passes it.
            self._dayStart = min(self._dayStart, _midnight(day))

    def _schedule(self) -> None:
        delay = self._dayEnd - self._clock.seconds()
        self._timer = self._clock.callLater(min(max(delay, 1.0), RESCHEDULE_AT_MOST), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._now()
        self._schedule()

    def start(self) -> None:
        """Arm the midnight timer."""
        if self._timer is None:
            self._now()
            self._schedule()

    def stop(self) -> None:
        """Cancel the midnight timer (the counters stay readable)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- counting -----------------------------------------------------------------------

    def _add(self, group: str, key: str, n: int = 1, hourly: str | None = None) -> None:
        now = self._now()
        getattr(self.total, group)[key] += n
        getattr(self.today, group)[key] += n
        if hourly is not None:
            hour = _hourStart(now)
            self._addHour(hour, hourly, n)
        delta = self._delta
        if delta is not None:
            self._counted(delta)
            day = delta.days.setdefault(self.day.isoformat(), {})
            day.setdefault(group, Counter())[key] += n
            if hourly is not None:
                delta.hours.setdefault(hour, Counter())[hourly] += n

    def _addHour(self, hour: int, key: str, n: int) -> None:
        counts = self._hours.get(hour)
        if counts is None:
            # Hours out of the window are dropped as a new one starts, not at every
            # count: L{hours} reads only the window, so a late drop shows nothing.
            oldest = _hourStart(self._clock.seconds()) - (HOURS_KEPT - 1) * 3600
            for old in [h for h in self._hours if h < oldest]:
                del self._hours[old]
            if hour < oldest:
                return  # a worker's late report of an hour the chart no longer shows
            counts = self._hours[hour] = Counter()
        counts[key] += n

    def _counted(self, delta: Delta) -> None:
        """A count went into C{delta}: tell the reporter if it is the first."""
        if not delta and self.onCount is not None:
            self.onCount()

    def connectionOpened(self) -> None:
        """A client connected (before the limits are checked)."""
        self._add("connections", "opened", hourly="connections")

    def sessionStarted(self, view: SessionView) -> None:
        """A session passed the connection limits: it is active until L{sessionEnded}."""
        self._active[view] = self._now()
        if self.onSessions is not None:
            self.onSessions()

    def connectionAccepted(self) -> None:
        """The MTA greeted a client with 220: the session goes on."""
        self._add("connections", "accepted")

    def sessionEnded(self, view: SessionView) -> None:
        """
        The client's connection is closed. If the final dot had gone to the MTA and its
        answer had not come back to the client, the delivery is ambiguous: the MTA may
        have queued a message the client will send again.
        """
        self._active.pop(view, None)
        if self.onSessions is not None:
            self.onSessions()
        sessionId = view.describe().id
        if sessionId in self._releasing:
            self._releasing.discard(sessionId)
            self._add("messages", "ambiguous")
        self._mtaFailed.discard(sessionId)

    def messageAttempted(self) -> None:
        """A client began a transaction (MAIL FROM)."""
        self._add("messages", "attempted")

    def recipientAccepted(self) -> None:
        self._add("recipients", "accepted")

    def refused(
        self,
        session: Session,
        stage: Stage,
        reply: Reply,
        sender: str | None = None,
        reason: str | None = None,
    ) -> None:
        """
        The client got C{reply}, a refusal at C{stage}.

        @param reason: who refused: the filter's name, or a
            L{mailproxy.replies.Reason} value (C{"mta"}, C{"size limit"}, ...); C{None}
            counts as L{FILTERS}.
        """
        by = reason if reason is not None else FILTERS
        tempfail = 400 <= reply.code < 500
        if stage is Stage.CONNECT:
            self._add("connectionsRefused", by)
        elif stage is Stage.HELO:
            self._add("heloRefused", by)
        elif stage is Stage.RCPT:
            self._add("recipientsRefused", by)
        elif tempfail:
            self._add("tempfailed", by, hourly="tempfailed")
        else:
            self._add("rejected", by, hourly="rejected")
        self._refusal(
            Refusal(
                time=self._now(),
                session=session.id,
                client=session.clientAddress,
                sender=sender,
                stage=stage.value,
                by=by,
                reply=f"{reply.code} {reply.text}",
            )
        )

    def _refusal(self, refusal: Refusal) -> None:
        self.refusals.append(refusal)
        if self._delta is not None:
            self._counted(self._delta)
            self._delta.refusals.append(refusal)
            # The master keeps the last REFUSALS_KEPT: a report carries no more.
            del self._delta.refusals[: -(self.refusals.maxlen or REFUSALS_KEPT)]

    def released(self, session: Session) -> None:
        """The message's final dot went to the MTA; its reply is awaited."""
        self._releasing.add(session.id)

    def delivered(self, session: Session, reply: Reply, sender: str, size: int) -> None:
        """The MTA answered the message's final dot with C{reply}, relayed to the client."""
        self._releasing.discard(session.id)
        if 200 <= reply.code < 300:
            self._add("messages", "accepted", hourly="accepted")
            self._add("messages", "bytes", size)
        else:
            self.refused(session, Stage.MESSAGE, reply, sender, MTA)

    def tlsEstablished(self, side: str, version: str) -> None:
        """A TLS handshake with the client or the MTA (C{side}) completed."""
        self._add("tls", f"{side} {version}")

    def authenticated(self, succeeded: bool) -> None:
        """A client's AUTH ended: the MTA accepted it, or refused it."""
        self._add("auth", "succeeded" if succeeded else "failed")

    def mtaError(self, session: Session, kind: str) -> None:
        """
        The MTA failed this session: C{"unreachable"}, C{"lost"}, C{"timeout"},
        C{"protocol"}, C{"tls"} (no TLS where upstream_tls requires it) or C{"banner"} (no
        banner within C{timeouts.mta_banner}). Only the first error of a session counts (a protocol error is
        followed by the loss of the connection it caused).
        """
        if session.id not in self._mtaFailed:
            self._mtaFailed.add(session.id)
            self._add("mtaErrors", kind)

    def proxyRefused(self, why: str) -> None:
        """
        A connection on a C{haproxy:} listener was closed before its PROXY header was
        served; C{why} is one of L{PROXY_REFUSALS}. Such a connection is no session: it
        counts in no other connection counter.
        """
        self._add("proxyRefused", why)

    def limitReached(self, session: Session, what: str, reply: Reply) -> None:
        """
        A session met one of its L{LIMITS} and was closed with C{reply}: counted, and
        kept among the refusals (stage C{"session"}).
        """
        self._add("limitsReached", what)
        self._refusal(
            Refusal(
                time=self._now(),
                session=session.id,
                client=session.clientAddress,
                sender=None,
                stage="session",
                by=what,
                reply=f"{reply.code} {reply.text}",
            )
        )

    def filterChecked(self, checked: Checked) -> None:
        """The pipeline's observer: one filter's answer and how long it took."""
        seconds = max(checked.seconds, 0.0)
        verdict = checked.verdict.action.value
        if checked.dryRun:
            verdict = f"dry run: {verdict}"
        latency = self.latency.setdefault(checked.filter, Latency())
        latency.observe(seconds)
        latency.verdicts[verdict] += 1
        if self._delta is not None:
            self._counted(self._delta)
            pending = self._delta.latency.setdefault(checked.filter, Latency())
            pending.observe(seconds)
            pending.verdicts[verdict] += 1

    # -- across processes ---------------------------------------------------------------

    def recordDeltas(self) -> None:
        """From now on, keep what is counted for L{takeDelta} too (a worker's counters)."""
        if self._delta is None:
            self._delta = Delta()

    def takeDelta(self) -> Delta:
        """What was counted since the last call (or L{recordDeltas}); starts a new one."""
        delta, self._delta = self._delta or Delta(), Delta()
        return delta

    def merge(self, index: int, delta: Delta) -> None:
        """
        Add a worker's L{Delta} (a master's counters): everything to the totals; to
        "today" what was counted on today's date (a count from before midnight that
        arrives after it stays out of the new day; one from a later date than ours starts
        that day first); the hourly buckets still shown; the filters' answers; the
        refusals, in time order among the kept ones.
        """
        self._now()
        for isoDay, groups in sorted(delta.days.items()):
            day = datetime.date.fromisoformat(isoDay)
            if day > self.day:
                self._turn(_midnight(day))
            for group, counts in groups.items():
                getattr(self.total, group).update(counts)
                if day == self.day:
                    getattr(self.today, group).update(counts)
            worker = self.workers.get(index)
            if worker is not None:
                worker.accepted += groups.get("messages", Counter())["accepted"]
        for hour, counts in delta.hours.items():
            for key, n in counts.items():
                self._addHour(hour, key, n)
        for name, latency in delta.latency.items():
            self.latency.setdefault(name, Latency()).merge(latency)
        if delta.refusals:
            merged = sorted([*self.refusals, *delta.refusals], key=lambda r: r.time)
            self.refusals.clear()
            self.refusals.extend(merged)

    def workerStarted(self, index: int, pid: int) -> None:
        """The master started worker C{index} (again, if it ran before) as process C{pid}."""
        worker = self.workers.get(index)
        if worker is None:
            worker = self.workers[index] = Worker(index)
        else:
            worker.restarts += 1
        worker.pid, worker.started, worker.sessions = pid, self._now(), []

    def workerEnded(self, index: int) -> None:
        """Worker C{index}'s process is gone, and its sessions with it."""
        worker = self.workers.get(index)
        if worker is not None:
            worker.pid, worker.started, worker.sessions = None, None, []

    def workerSessions(self, index: int, sessions: list[tuple[SessionInfo, float]]) -> None:
        """Worker C{index}'s active sessions now, each with when it started."""
        worker = self.workers.get(index)
        if worker is not None:
            worker.sessions = [
                (attrs.evolve(info, worker=index), started) for info, started in sessions
            ]

    def localSessions(self) -> list[tuple[SessionInfo, float]]:
        """This process's active sessions, oldest first, each with when it started."""
        ordered = sorted(self._active.items(), key=lambda item: item[1])
        return [(view.describe(), started) for view, started in ordered]

    # -- reading ------------------------------------------------------------------------

    @property
    def activeSessions(self) -> int:
        """The sessions in progress: this process's, and its workers' as they reported them."""
        return len(self._active) + sum(len(w.sessions) for w in self.workers.values())

    def sessions(self) -> list[tuple[SessionInfo, float]]:
        """
        The active sessions (a master's: its workers', each with the worker's index),
        oldest first, each with its age in seconds.
        """
        now = self._now()
        ordered = self.localSessions()
        for worker in self.workers.values():
            ordered.extend(worker.sessions)
        ordered.sort(key=lambda item: item[1])
        return [(info, max(now - started, 0.0)) for info, started in ordered]

    def hours(self) -> list[tuple[int, Counter[str]]]:
        """The last L{HOURS_KEPT} local hours, oldest first: C{(hour start, counters)}."""
        current = _hourStart(self._now())
        starts = [current - k * 3600 for k in range(HOURS_KEPT - 1, -1, -1)]
        return [(start, self._hours.get(start, Counter())) for start in starts]

    def snapshot(self) -> dict[str, Any]:
        """Everything, as JSON-ready data: the stats socket's and C{/stats.json}'s answer."""
        now = self._now()
        return {
            "now": now,
            "started": self.started,
            "uptime": max(now - self.started, 0.0),
            "today": {"date": self.day.isoformat(), **self.today.toJSON()},
            "total": self.total.toJSON(),
            "active": [
                {
                    **info.toJSON(),
                    "age": round(age, 3),
                    **({} if info.worker is None else {"worker": info.worker}),
                }
                for info, age in self.sessions()
            ],
            **({"workers": self.workerRows(now)} if self.workers else {}),
            "filters": {name: lat.toJSON() for name, lat in sorted(self.latency.items())},
            "refusals": [r.toJSON() for r in self.refusals],
            "hours": [
                {
                    "start": start,
                    "hour": time.strftime("%H:00", time.localtime(start)),
                    "connections": counts["connections"],
                    "accepted": counts["accepted"],
                    "rejected": counts["rejected"],
                    "tempfailed": counts["tempfailed"],
                }
                for start, counts in self.hours()
            ],
        }


    def workerRows(self, now: float | None = None) -> list[dict[str, Any]]:
        """A master's workers, one JSON-ready row each, by index."""
        now = self._clock.seconds() if now is None else now
        return [
            {
                "worker": w.index,
                "pid": w.pid,
                "started": w.started,
                "uptime": None if w.started is None else max(now - w.started, 0.0),
                "restarts": w.restarts,
                "active": len(w.sessions),
                "accepted": w.accepted,
            }
            for w in sorted(self.workers.values(), key=lambda w: w.index)
        ]


class StatsService(Service):
    """Runs the midnight timer of a L{Stats} while the service runs."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.stats.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.stats.stop()
