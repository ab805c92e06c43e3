"""
The counters: what the relay and the pipeline report, the daily reset at local midnight
(across clock jumps and DST changes), the hourly buckets and the filter latency histogram.

Relay tests run client, proxy and the stand-in MTA in memory with a Clock, and check the
counters against what the client saw.
"""

from __future__ import annotations

import datetime
import itertools
import os
import time
from collections import Counter

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import stats as counters
from mailproxy.config import Config, Limits, Timeouts
from mailproxy.envelope import Session
from mailproxy.filters import IFilter, Stage, Verdict
from mailproxy.filters.pipeline import Checked, ConfiguredFilter, Pipeline
from mailproxy.localmta import LocalMTA
from mailproxy.stats import HOURS_KEPT, Delta, Stats
from mailproxy.testing import FakeFilter, MemoryProxy, RawClient
from mailproxy.wire import Reply

MESSAGE = b"Subject: hello\r\n\r\nHello, world.\r\n.\r\n"


def useTimezone(case: SynchronousTestCase, zone: str) -> None:
    """Run the rest of the test in local time zone C{zone}; restore the old one after."""
    old = os.environ.get("TZ")

    def restore() -> None:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()

    case.addCleanup(restore)
    os.environ["TZ"] = zone
    time.tzset()


def local(*fields: int) -> float:
    """The instant of a local wall-clock time (in the zone set by L{useTimezone})."""
    return datetime.datetime(*fields).timestamp()  # type: ignore[misc]


def clockAt(when: float) -> Clock:
    clock = Clock()
    clock.rightNow = when
    return clock


def refusal(code: int = 550) -> Reply:
    return Reply.make(code, "5.7.1" if code >= 500 else "4.7.1", "No")


SESSION = Session("S1", "192.0.2.7", 40000)


class DailyResetTests(SynchronousTestCase):
    """'Today' starts again at local midnight, once, whatever the clock does."""

    def setUp(self) -> None:
        useTimezone(self, "UTC")

    def attempt(self, stats: Stats, n: int = 1) -> None:
        for _ in range(n):
            stats.messageAttempted()

    def test_midnight(self) -> None:
        """
        At local midnight the timer resets today's counters, without anything reading
        them; the totals go on, and the timer is armed for the next midnight.
        """
        clock = clockAt(local(2024, 5, 1, 23, 0))
        stats = Stats(clock)
        stats.start()
        self.attempt(stats, 3)
        clock.advance(3599)
        self.assertEqual(stats.today.messages["attempted"], 3)
        self.assertEqual(stats.day, datetime.date(2024, 5, 1))
        clock.advance(1)
        self.assertEqual(stats.today.messages["attempted"], 0)
        self.assertEqual(stats.total.messages["attempted"], 3)
        self.assertEqual(stats.day, datetime.date(2024, 5, 2))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        stats.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_jumpForwardDays(self) -> None:
        """
        A clock set three days forward resets today once (to the new date); the next
        reset is at the following midnight, not before.
        """
        clock = clockAt(local(2024, 5, 1, 12, 0))
        stats = Stats(clock)
        stats.start()
        self.attempt(stats, 2)
        clock.advance(3 * 86400)
        self.assertEqual(stats.day, datetime.date(2024, 5, 4))
        self.assertEqual(stats.today.messages["attempted"], 0)
        self.attempt(stats)
        clock.advance(local(2024, 5, 5, 0, 0) - clock.seconds() - 1)
        self.assertEqual(stats.today.messages["attempted"], 1)
        clock.advance(1)
        self.assertEqual(stats.today.messages["attempted"], 0)
        self.assertEqual(stats.total.messages["attempted"], 3)

    def test_jumpBackward(self) -> None:
        """
        A clock set back across midnight keeps today's counters (no reset for going
        back, none when midnight comes round again); the reset comes when the date
        passes the day being counted.
        """
        clock = clockAt(local(2024, 5, 2, 0, 5))
        stats = Stats(clock)
        stats.start()
        self.attempt(stats, 2)
        clock.rightNow = local(2024, 5, 1, 23, 55)
        self.attempt(stats)
        self.assertEqual(stats.today.messages["attempted"], 3)
        self.assertEqual(stats.day, datetime.date(2024, 5, 2))
        clock.advance(600)  # May 2nd, 00:05 again
        self.attempt(stats)
        self.assertEqual(stats.snapshot()["today"]["messages"]["attempted"], 4)
        clock.advance(local(2024, 5, 3, 0, 0) - clock.seconds())
        self.assertEqual(stats.today.messages["attempted"], 0)
        self.assertEqual(stats.day, datetime.date(2024, 5, 3))
        self.assertEqual(stats.total.messages["attempted"], 4)

    def test_lazyOnRead(self) -> None:
        """Without the timer (not started), a read after midnight shows a fresh day."""
        clock = clockAt(local(2024, 5, 1, 23, 0))
        stats = Stats(clock)
        self.attempt(stats, 2)
        clock.advance(7200)
        snapshot = stats.snapshot()
        self.assertEqual(snapshot["today"]["date"], "2024-05-02")
        self.assertEqual(snapshot["today"]["messages"]["attempted"], 0)
        self.assertEqual(snapshot["total"]["messages"]["attempted"], 2)
        self.assertEqual(clock.getDelayedCalls(), [])


class DaylightSavingTests(SynchronousTestCase):
    """In a zone with DST the reset stays at local midnight on 23- and 25-hour days."""

    def setUp(self) -> None:
        useTimezone(self, "Europe/Berlin")

    def resetsAt(self, start: float, midnights: list[float]) -> None:
        """Driven only by the timer, today resets exactly at each of C{midnights}."""
        clock = clockAt(start)
        stats = Stats(clock)
        stats.start()
        self.addCleanup(stats.stop)
        for midnight in midnights:
            stats.messageAttempted()
            clock.advance(midnight - clock.seconds() - 1)
            self.assertEqual(stats.today.messages["attempted"], 1)
            clock.advance(1)
            self.assertEqual(stats.today.messages["attempted"], 0)
            self.assertEqual(stats.day, datetime.date.fromtimestamp(midnight))

    def test_springForward(self) -> None:
        """
        Around 31 March 2024 (02:00 -> 03:00): resets at midnight before and after the
        23-hour day, 23 hours apart.
        """
        midnights = [local(2024, 3, 31, 0, 0), local(2024, 4, 1, 0, 0)]
        self.assertEqual(midnights[1] - midnights[0], 23 * 3600)
        self.resetsAt(local(2024, 3, 30, 12, 0), midnights)

    def test_fallBack(self) -> None:
        """
        Around 27 October 2024 (03:00 -> 02:00): resets at midnight before and after the
        25-hour day, 25 hours apart.
        """
        midnights = [local(2024, 10, 27, 0, 0), local(2024, 10, 28, 0, 0)]
        self.assertEqual(midnights[1] - midnights[0], 25 * 3600)
        self.resetsAt(local(2024, 10, 26, 12, 0), midnights)

    def test_hoursAcrossChange(self) -> None:
        """The chart's 24 slots are an hour apart even across the change of time."""
        clock = clockAt(local(2024, 10, 27, 4, 30))
        stats = Stats(clock)
        hours = stats.snapshot()["hours"]
        self.assertEqual(len(hours), 24)
        self.assertEqual({b["start"] - a["start"] for a, b in itertools.pairwise(hours)}, {3600})
        labels = [h["hour"] for h in hours]
        self.assertEqual(labels[-1], "04:00")
        self.assertEqual(labels.count("02:00"), 2)  # the hour that happened twice


class CountersTests(SynchronousTestCase):
    """The counters' own bookkeeping, fed directly."""

    def setUp(self) -> None:
        useTimezone(self, "UTC")
        self.clock = clockAt(local(2024, 5, 1, 10, 30))
        self.stats = Stats(self.clock)

    def test_hourlyBuckets(self) -> None:
        """
        Accepted and refused messages land in the hour they happened; the chart keeps
        the last 24 hours, the current one last, and forgets older ones.
        """
        session = SESSION
        self.stats.delivered(session, Reply.make(250, "2.0.0", "Ok"), "a@x", 100)
        self.clock.advance(3600)
        self.stats.refused(session, Stage.MESSAGE, refusal(), "a@x", "size limit")
        self.stats.refused(session, Stage.MAIL, refusal(451), "a@x")
        hours = self.stats.snapshot()["hours"]
        self.assertEqual(len(hours), 24)
        self.assertEqual(hours[-1]["hour"], "11:00")
        self.assertEqual(
            (hours[-1]["accepted"], hours[-1]["rejected"], hours[-1]["tempfailed"]), (0, 1, 1)
        )
        self.assertEqual((hours[-2]["hour"], hours[-2]["accepted"]), ("10:00", 1))
        self.clock.advance(23 * 3600)
        hours = self.stats.snapshot()["hours"]
        self.assertEqual([h["accepted"] for h in hours], [0] * 24)
        self.assertEqual(hours[0]["rejected"], 1)

    def test_hoursForgotten(self) -> None:
        """
        Counting for days keeps at most the chart's hours: an hour out of the window is
        dropped when a new one starts, and the chart's figures stay those of its hours.
        """
        for _ in range(3 * HOURS_KEPT):
            self.stats.delivered(SESSION, Reply.make(250, "2.0.0", "Ok"), "a@x", 100)
            self.stats.delivered(SESSION, Reply.make(250, "2.0.0", "Ok"), "a@x", 100)
            self.clock.advance(3600)
        self.stats.delivered(SESSION, Reply.make(250, "2.0.0", "Ok"), "a@x", 100)
        # A worker's report of an hour the chart no longer shows is not kept either.
        late = self.stats.hours()[0][0] - 3600
        self.stats.merge(1, Delta(hours={late: Counter(accepted=5)}))
        self.assertLessEqual(len(self.stats._hours), HOURS_KEPT)
        self.assertEqual([h["accepted"] for h in self.stats.snapshot()["hours"]], [2] * 23 + [1])

    def test_proxyRefused(self) -> None:
        """
        Refused PROXY headers are counted by reason, today and since start, every reason
        shown (zero until it happens); today's start again at midnight.
        """
        self.assertEqual(
            self.stats.snapshot()["total"]["proxy_refused"],
            {"untrusted": 0, "invalid": 0, "timeout": 0},
        )
        self.stats.proxyRefused("untrusted")
        self.stats.proxyRefused("timeout")
        self.stats.proxyRefused("timeout")
        snapshot = self.stats.snapshot()
        for when in ("today", "total"):
            self.assertEqual(
                snapshot[when]["proxy_refused"], {"untrusted": 1, "invalid": 0, "timeout": 2}
            )
        self.assertEqual(snapshot["today"]["connections"]["opened"], 0)
        self.clock.advance(24 * 3600)
        snapshot = self.stats.snapshot()
        self.assertEqual(sum(snapshot["today"]["proxy_refused"].values()), 0)
        self.assertEqual(sum(snapshot["total"]["proxy_refused"].values()), 3)

    def test_latencyHistogram(self) -> None:
        """
        Each filter's answers fill fixed latency buckets (cumulative, +Inf last), with
        count, sum, max and verdicts; dry-run refusals are counted apart.
        """
        for seconds, verdict, dry in [
            (0.004, Verdict.accept(), False),
            (0.2, Verdict.reject("no"), False),
            (3.0, Verdict.tempfail("later"), True),
            (120.0, Verdict.accept(), False),
        ]:
            self.stats.filterChecked(
                Checked(SESSION, Stage.MESSAGE, "spamd", seconds, verdict, dry)
            )
        summary = self.stats.snapshot()["filters"]["spamd"]
        self.assertEqual(summary["checks"], 4)
        self.assertEqual(summary["verdicts"], {"accept": 2, "reject": 1, "dry run: tempfail": 1})
        buckets = dict((str(le), n) for le, n in summary["buckets"])
        self.assertEqual(
            (buckets["0.005"], buckets["0.25"], buckets["5.0"], buckets["60.0"], buckets["+Inf"]),
            (1, 2, 3, 3, 4),
        )
        self.assertAlmostEqual(summary["seconds"]["sum"], 123.204)
        self.assertEqual(summary["seconds"]["max"], 120.0)
        self.assertEqual(summary["seconds"]["p50_at_most"], 0.25)

    def test_refusalRingIsBounded(self) -> None:
        """The last refusals are kept, newest last, at most 50 of them."""
        for n in range(60):
            self.stats.refused(SESSION, Stage.RCPT, refusal(), f"s{n}@x", counters.MTA)
        kept = self.stats.snapshot()["refusals"]
        self.assertEqual(len(kept), 50)
        self.assertEqual((kept[0]["sender"], kept[-1]["sender"]), ("s10@x", "s59@x"))
        self.assertEqual(self.stats.total.recipientsRefused["mta"], 60)

    def test_refusalAttributedToFilter(self) -> None:
        """
        A refusal is counted under the filter the session names (the verdict's own
        C{filter}, set by the pipeline): no side channel from the filters' latency.
        """
        self.stats.refused(SESSION, Stage.MAIL, refusal(), "spam@x", "access")
        [entry] = self.stats.snapshot()["refusals"]
        self.assertEqual(
            (entry["filter"], entry["client"], entry["sender"], entry["stage"], entry["reply"]),
            ("access", "192.0.2.7", "spam@x", "mail", "550 5.7.1 No"),
        )
        self.assertEqual(self.stats.today.rejected, {"access": 1})


@attrs.define
class Proxy:
    """Client, proxy and stand-in MTA in memory, the pipeline reporting to the counters."""

    memory: MemoryProxy
    mta: LocalMTA
    stats: Stats
    clock: Clock

    @classmethod
    def build(
        cls, case: SynchronousTestCase, *filters: IFilter, dryRun: bool = False, **limits: int
    ) -> Proxy:
        spool = case.mktemp()
        os.makedirs(spool)
        config = Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream="tcp:host=127.0.0.1:port=1",
            hostname="proxy.test",
            spoolDir=spool,
            limits=attrs.evolve(Limits(), **limits),
            timeouts=Timeouts(mtaReply=60.0),
        )
        clock = clockAt(1_700_000_000.0)
        stats = Stats(clock)
        pipeline = Pipeline(
            [ConfiguredFilter(f, 30.0, dryRun=dryRun) for f in filters],
            clock,
            120.0,
            observer=stats.filterChecked,
        )
        mta = LocalMTA()
        memory = MemoryProxy(config, pipeline, mta.buildFactory(), clock)
        memory.factory.stats = stats
        return cls(memory, mta, stats, clock)

    def greeted(self, address: str = "127.0.0.1") -> RawClient:
        client, _ = self.memory.connect(address)
        self.memory.send(client, b"EHLO client.example\r\n")
        return client

    def send(self, client: RawClient, data: bytes) -> None:
        self.memory.send(client, data)


class RelayCountsTests(SynchronousTestCase):
    """What the relay reports, checked against what the client saw."""

    def setUp(self) -> None:
        useTimezone(self, "UTC")

    def test_cleanAndRefused(self) -> None:
        """
        Three clean messages and two refused by a sender filter: 5 attempted, 3
        accepted with their bytes, 2 rejected by that filter, each refusal listed with
        the client, sender and reply; the filter's latency counted once per check.
        """
        access = FakeFilter(
            name="access",
            verdicts={Stage.MAIL: lambda: Verdict.reject("Sender refused")},
        )
        proxy = Proxy.build(self, access)
        client = proxy.greeted()
        for n in range(2):
            proxy.send(client, b"MAIL FROM:<bad%d@spam.example>\r\n" % n)
        access.verdicts.clear()
        for _ in range(3):
            proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + MESSAGE)
        self.assertEqual(client.codes.count(550), 2)
        self.assertEqual(len(proxy.mta.messages), 3)
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["messages"]["attempted"], 5)
        self.assertEqual(today["messages"]["accepted"], 3)
        self.assertEqual(today["messages"]["bytes"], 3 * len(MESSAGE) - 3 * len(b".\r\n"))
        self.assertEqual(today["messages"]["rejected"], {"access": 2})
        self.assertEqual(today["recipients"], {"accepted": 3, "refused": {}})
        self.assertEqual(today["connections"]["opened"], 1)
        self.assertEqual(today["connections"]["accepted"], 1)
        refusals = proxy.stats.snapshot()["refusals"]
        self.assertEqual(
            [(r["filter"], r["sender"], r["client"], r["reply"]) for r in refusals],
            [
                ("access", f"bad{n}@spam.example", "127.0.0.1", "550 5.7.1 Sender refused")
                for n in range(2)
            ],
        )
        checked = proxy.stats.snapshot()["filters"]["access"]
        self.assertEqual((checked["checks"], checked["verdicts"]), (5, {"reject": 2, "accept": 3}))

    def test_proxyReasons(self) -> None:
        """
        The proxy's own refusals are counted by reason: a SIZE= over the limit, a
        message over it, a recipient over the limit; a message filter's tempfail is
        'tempfailed' under the filter's name.
        """
        later = FakeFilter(name="spamd", verdicts={Stage.MESSAGE: Verdict.tempfail("later")})
        proxy = Proxy.build(self, later, messageSize=1000, recipients=1)
        client = proxy.greeted()
        proxy.send(client, b"MAIL FROM:<a@x> SIZE=5000\r\n")
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
        proxy.send(client, b"x" * 2000 + b"\r\n.\r\n")
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + MESSAGE)
        self.assertEqual(client.codes[2:], [552, 250, 250, 452, 354, 552, 250, 250, 354, 451])
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["messages"]["rejected"], {"size limit": 2})
        self.assertEqual(today["messages"]["tempfailed"], {"spamd": 1})
        self.assertEqual(today["recipients"]["refused"], {"recipient limit": 1})
        self.assertEqual(today["messages"]["accepted"], 0)

    def test_connectionRefusals(self) -> None:
        """
        Connections refused over the per-client limit and by a connect filter are
        counted by reason; active sessions are those let in and still connected.
        """
        proxy = Proxy.build(self, connectionsPerClient=1)
        first = proxy.greeted()
        second, _ = proxy.memory.connect()
        self.assertEqual(second.codes, [421])
        self.assertEqual(proxy.stats.activeSessions, 1)
        [(info, _)] = proxy.stats.sessions()
        self.assertEqual(
            (info.client, info.helo, info.phase), ("127.0.0.1", "client.example", "command")
        )
        proxy.send(first, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nQUIT\r\n")
        self.assertEqual(proxy.stats.activeSessions, 0)
        today = proxy.stats.snapshot()["today"]["connections"]
        self.assertEqual(today, {"opened": 2, "accepted": 1, "refused": {"client limit": 1}})

        gate = FakeFilter(name="rbl", verdicts={Stage.CONNECT: Verdict.reject("Listed")})
        proxy = Proxy.build(self, gate)
        client, _ = proxy.memory.connect("192.0.2.1")
        self.assertEqual(client.codes, [550])
        self.assertEqual(proxy.stats.today.connectionsRefused, {"rbl": 1})
        self.assertEqual(proxy.stats.refusals[-1].stage, "connect")

    def test_activeSessionDescribed(self) -> None:
        """
        A session waiting on a message filter is listed with its HELO, sender,
        recipient count, phase and age.
        """
        slow = FakeFilter(name="slow", verdicts={Stage.MESSAGE: lambda: Deferred()})
        proxy = Proxy.build(self, slow)
        client = proxy.greeted()
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
        proxy.send(client, MESSAGE)
        proxy.clock.advance(5)
        [active] = proxy.stats.snapshot()["active"]
        self.assertEqual(
            {k: active[k] for k in ("client", "helo", "sender", "recipients", "phase", "age")},
            {
                "client": "127.0.0.1",
                "helo": "client.example",
                "sender": "a@x",
                "recipients": 2,
                "phase": "filtering",
                "age": 5.0,
            },
        )

    def test_mtaDown(self) -> None:
        """An unreachable MTA: the connection refused ('mta down'), one MTA error."""
        proxy = Proxy.build(self)
        proxy.memory.endpoint.refuse = True
        client, _ = proxy.memory.connect()
        self.assertEqual(client.codes, [421])
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["connections"]["refused"], {"mta down": 1})
        self.assertEqual(today["mta_errors"]["unreachable"], 1)
        self.assertEqual(proxy.stats.activeSessions, 0)

    def test_ambiguousDelivery(self) -> None:
        """
        An MTA that goes silent after the final dot: the client gets 421, and the
        delivery is counted ambiguous (the MTA may have queued it) with one MTA timeout.
        """
        proxy = Proxy.build(self)
        proxy.mta.silentAfterData = True
        client = proxy.greeted()
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + MESSAGE)
        proxy.clock.advance(61)
        proxy.memory.flush()
        self.assertEqual(client.codes[-1], 421)
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["messages"]["ambiguous"], 1)
        self.assertEqual(
            today["mta_errors"],
            {"unreachable": 0, "lost": 0, "timeout": 1, "protocol": 0, "tls": 0, "banner": 0},
        )
        self.assertEqual(today["messages"]["accepted"], 0)

    def test_mtaLostWhileFiltering(self) -> None:
        """
        The MTA connection lost while a filter decides, before anything of the message
        went out, is an MTA loss (the client gets 421), not an ambiguous delivery.
        """
        slow = FakeFilter(name="slow", verdicts={Stage.MESSAGE: lambda: Deferred()})
        proxy = Proxy.build(self, slow)
        client = proxy.greeted()
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + MESSAGE)
        [pump] = proxy.memory.endpoint.pumps
        pump.server.transport.loseConnection()
        proxy.memory.flush()
        self.assertEqual(client.codes[-1], 421)
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["messages"]["ambiguous"], 0)
        self.assertEqual(today["mta_errors"]["lost"], 1)

    def test_mtaRefusals(self) -> None:
        """Refusals by the MTA itself (here a recipient) are counted under 'mta'."""
        proxy = Proxy.build(self)
        proxy.mta.refuseRecipients = lambda rcpt: rcpt.startswith("nobody")
        client = proxy.greeted()
        proxy.send(client, b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@y>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(client.codes[-2] // 100, 5)
        today = proxy.stats.snapshot()["today"]
        self.assertEqual(today["recipients"], {"accepted": 1, "refused": {"mta": 1}})
