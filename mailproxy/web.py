"""
The status page, C{/stats.json} and C{/metrics}, served by C{twisted.web}.

C{/} is one self-contained HTML page (inline style and an inline SVG chart drawn here:
no script, no external asset) that refreshes itself. It is built with
C{twisted.web.template}, which escapes every text and attribute value, so a hostile HELO
or address shows as text; a Content-Security-Policy without any script source backs that
up. C{/stats.json} is the stats socket's snapshot. C{/metrics} is the Prometheus text
format, written by the official C{prometheus_client} from a registry of this process's
own, whose collector reads the L{Stats} at each scrape, in the reactor thread.

(C{prometheus_client.twisted.MetricsResource} is not used: it serves its WSGI app from
the reactor's thread pool, where reading the counters would race the reactor thread
that changes them, and would queue behind blocking filter work; and its module imports
the global reactor.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.template import Tag, flatten, tags

from mailproxy.stats import LIMITS, MTA_ERRORS, PROXY_REFUSALS, Stats

# -- Prometheus -----------------------------------------------------------------------------


class StatsCollector:
    """A Prometheus collector that reads the monotonic totals of a L{Stats} on each scrape."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats, total = self._stats, self._stats.total
        connections = CounterMetricFamily(
            "mailproxy_connections",
            "Client connections by how their start was decided (accepted: the MTA greeted).",
            labels=["outcome", "reason"],
        )
        connections.add_metric(["accepted", ""], total.connections["accepted"])
        for reason, n in sorted(total.connectionsRefused.items()):
            connections.add_metric(["refused", reason], n)
        yield connections
        yield CounterMetricFamily(
            "mailproxy_connections_opened",
            "Client connections opened.",
            value=total.connections["opened"],
        )
        messages = CounterMetricFamily(
            "mailproxy_messages",
            "Mail transactions by outcome; filter: the refusing filter or the proxy's reason.",
            labels=["outcome", "filter"],
        )
        messages.add_metric(["accepted", ""], total.messages["accepted"])
        for outcome, counts in (("rejected", total.rejected), ("tempfailed", total.tempfailed)):
            for name, n in sorted(counts.items()):
                messages.add_metric([outcome, name], n)
        yield messages
        for name, documentation, key in (
            ("mailproxy_messages_attempted", "Mail transactions begun (MAIL FROM).", "attempted"),
            ("mailproxy_accepted_bytes", "Bytes of the messages the MTA accepted.", "bytes"),
            (
                "mailproxy_ambiguous_deliveries",
                "Final dots sent to the MTA whose reply never reached the client.",
                "ambiguous",
            ),
        ):
            yield CounterMetricFamily(name, documentation, value=total.messages[key])
        recipients = CounterMetricFamily(
            "mailproxy_recipients", "Recipients by outcome.", labels=["outcome", "reason"]
        )
        recipients.add_metric(["accepted", ""], total.recipients["accepted"])
        for reason, n in sorted(total.recipientsRefused.items()):
            recipients.add_metric(["refused", reason], n)
        yield recipients
        helo = CounterMetricFamily(
            "mailproxy_helo_refused", "HELO/EHLO refused.", labels=["reason"]
        )
        for reason, n in sorted(total.heloRefused.items()):
            helo.add_metric([reason], n)
        yield helo
        mta = CounterMetricFamily(
            "mailproxy_mta_errors", "MTA failures, the first of each session.", labels=["kind"]
        )
        for kind in MTA_ERRORS:
            mta.add_metric([kind], total.mtaErrors[kind])
        yield mta
        tls = CounterMetricFamily(
            "mailproxy_tls_handshakes", "TLS handshakes completed.", labels=["side", "version"]
        )
        for key, n in sorted(total.tls.items()):
            side, _, version = key.partition(" ")
            tls.add_metric([side, version], n)
        yield tls
        auth = CounterMetricFamily(
            "mailproxy_auth", "Client AUTH exchanges by outcome.", labels=["outcome"]
        )
        for outcome in ("succeeded", "failed"):
            auth.add_metric([outcome], total.auth[outcome])
        yield auth
        proxy = CounterMetricFamily(
            "mailproxy_proxy_refused",
            "Connections on haproxy: listeners closed before their PROXY header was served.",
            labels=["reason"],
        )
        for why in PROXY_REFUSALS:
            proxy.add_metric([why], total.proxyRefused[why])
        yield proxy
        limits = CounterMetricFamily(
            "mailproxy_limits_reached",
            "Sessions closed with 421 because they met one of their limits.",
            labels=["limit"],
        )
        for what in LIMITS:
            limits.add_metric([what], total.limitsReached[what])
        yield limits
        checks = CounterMetricFamily(
            "mailproxy_filter_checks", "Filter answers by verdict.", labels=["filter", "verdict"]
        )
        latency = HistogramMetricFamily(
            "mailproxy_filter_latency_seconds", "How long each filter took.", labels=["filter"]
        )
        for name, lat in sorted(stats.latency.items()):
            for verdict, n in sorted(lat.verdicts.items()):
                checks.add_metric([name, verdict], n)
            buckets = [("+Inf" if math.isinf(le) else repr(le), n) for le, n in lat.cumulative()]
            latency.add_metric([name], buckets, lat.sum)
        yield checks
        yield latency
        yield GaugeMetricFamily(
            "mailproxy_active_sessions", "Client sessions in progress.", value=stats.activeSessions
        )
        if stats.workers:
            yield from self._workers(stats)
        yield GaugeMetricFamily(
            "mailproxy_start_time_seconds", "When the process started (Unix time).", stats.started
        )


    def _workers(self, stats: Stats) -> Iterator[Metric]:
        """A master's series per worker process, labelled with its index."""
        rows = stats.workerRows()
        up = GaugeMetricFamily(
            "mailproxy_worker_up", "Whether the worker process runs now.", labels=["worker"]
        )
        active = GaugeMetricFamily(
            "mailproxy_worker_active_sessions",
            "Client sessions in progress in the worker, as it last reported them.",
            labels=["worker"],
        )
        started = GaugeMetricFamily(
            "mailproxy_worker_start_time_seconds",
            "When the worker's running process started (Unix time).",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "mailproxy_worker_restarts", "Times the worker was started again.", labels=["worker"]
        )
        accepted = CounterMetricFamily(
            "mailproxy_worker_messages_accepted",
            "Messages the MTA accepted through the worker (all its processes).",
            labels=["worker"],
        )
        for row in rows:
            label = [str(row["worker"])]
            up.add_metric(label, 0 if row["pid"] is None else 1)
            active.add_metric(label, row["active"])
            if row["started"] is not None:
                started.add_metric(label, row["started"])
            restarts.add_metric(label, row["restarts"])
            accepted.add_metric(label, row["accepted"])
        yield from (up, active, started, restarts, accepted)


def registryFor(stats: Stats) -> CollectorRegistry:
    """A registry of our own (never the global one) holding only C{stats}' collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


# -- formatting -----------------------------------------------------------------------------


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _latency(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _sum(counts: Mapping[str, int]) -> int:
    return sum(counts.values())


# -- the page -------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; --ok: #2e7d32; --bad: #c62828; --warn: #ef8f00; --ink: #1d2330;
  --muted: #5f6b7a; --line: #e3e7ee; --card: #fff; --bg: #f4f6f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { background: #1d2330; color: #fff; padding: 14px 24px; display: flex;
  align-items: baseline; gap: 16px; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
header h1 span { font-weight: 400; color: #b8c2d0; }
header .meta { color: #b8c2d0; font-size: 13px; }
main { padding: 18px 24px 32px; max-width: 1200px; margin: 0 auto; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 28px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.ok .value { color: var(--ok); } .card.bad .value { color: var(--bad); }
.grid { display: grid; grid-template-columns: minmax(280px, 1fr) minmax(320px, 2fr); gap: 16px;
  margin-top: 16px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; margin-top: 16px; overflow-x: auto; }
.grid section { margin-top: 0; }
h2 { font-size: 15px; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.n, th.n { text-align: right; white-space: nowrap; }
td.code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px;
  word-break: break-all; }
tr.group td { background: #f8f9fb; color: var(--muted); font-size: 12px; font-weight: 600; }
.empty { color: var(--muted); font-style: italic; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font-size: 10px; fill: var(--muted); }
.legend { display: flex; gap: 14px; font-size: 12px; color: var(--muted); margin-top: 4px; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
.sw.ok { background: var(--ok); } .sw.bad { background: var(--bad); }
.sw.warn { background: var(--warn); }
footer { color: var(--muted); font-size: 12px; margin-top: 16px; }
"""

#: No script may run on the page, whatever it shows; the one inline style is allowed by hash.
CSP = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _number(id: str, value: int) -> Tag:
    return tags.td(f"{value:,}", id=id, class_="n")


def _head(*columns: str, numeric: tuple[str, ...] = ()) -> Tag:
    """A table header; the C{numeric} columns are right-aligned, as their numbers."""
    cells = (tags.th(c, class_="n") if c in numeric else tags.th(c) for c in columns)
    return tags.thead(tags.tr(*cells))


def _card(label: str, value: int, id: str, kind: str = "") -> Tag:
    return tags.div(
        tags.div(label, class_="label"),
        tags.div(f"{value:,}", class_="value", id=id),
        class_=f"card {kind}".strip(),
    )


def _counters(snapshot: Mapping[str, Any]) -> Tag:
    today, total = snapshot["today"], snapshot["total"]
    rows: list[tuple[str, str, Callable[[Mapping[str, Any]], int]]] = [
        ("Connections opened", "connections-opened", lambda c: c["connections"]["opened"]),
        ("Connections accepted", "connections-accepted", lambda c: c["connections"]["accepted"]),
        ("Connections refused", "connections-refused", lambda c: _sum(c["connections"]["refused"])),
        ("Messages attempted", "messages-attempted", lambda c: c["messages"]["attempted"]),
        ("Messages accepted", "messages-accepted", lambda c: c["messages"]["accepted"]),
        ("Messages rejected", "messages-rejected", lambda c: _sum(c["messages"]["rejected"])),
        ("Messages tempfailed", "messages-tempfailed", lambda c: _sum(c["messages"]["tempfailed"])),
        ("Ambiguous deliveries", "messages-ambiguous", lambda c: c["messages"]["ambiguous"]),
        ("Recipients accepted", "recipients-accepted", lambda c: c["recipients"]["accepted"]),
        ("Recipients refused", "recipients-refused", lambda c: _sum(c["recipients"]["refused"])),
        ("HELO refused", "helo-refused", lambda c: _sum(c["helo_refused"])),
        ("MTA errors", "mta-errors", lambda c: _sum(c["mta_errors"])),
        ("PROXY headers refused", "proxy-refused", lambda c: _sum(c["proxy_refused"])),
        ("Sessions over a limit", "limits-reached", lambda c: _sum(c["limits_reached"])),
        ("TLS handshakes", "tls", lambda c: _sum(c["tls"])),
        ("AUTH failed", "auth-failed", lambda c: c["auth"]["failed"]),
    ]
    body = [
        tags.tr(
            tags.td(label), _number(f"today-{id}", get(today)), _number(f"total-{id}", get(total))
        )
        for label, id, get in rows
    ]
    body.append(
        tags.tr(
            tags.td("Bytes accepted"),
            tags.td(_bytes(today["messages"]["bytes"]), class_="n", id="today-bytes"),
            tags.td(_bytes(total["messages"]["bytes"]), class_="n", id="total-bytes"),
        )
    )
    return tags.section(
        tags.h2("Counters"),
        tags.table(
            _head("", "Today", "Since start", numeric=("Today", "Since start")),
            tags.tbody(*body),
        ),
    )


def _reasons(snapshot: Mapping[str, Any]) -> Tag:
    """Refusals by kind and reason (the filter's name or the proxy's own reason)."""
    today, total = snapshot["today"], snapshot["total"]
    groups: list[tuple[str, Callable[[Mapping[str, Any]], Mapping[str, int]]]] = [
        ("Connections", lambda c: c["connections"]["refused"]),
        ("HELO", lambda c: c["helo_refused"]),
        ("Messages rejected", lambda c: c["messages"]["rejected"]),
        ("Messages tempfailed", lambda c: c["messages"]["tempfailed"]),
        ("Recipients", lambda c: c["recipients"]["refused"]),
        ("MTA errors", lambda c: {k: v for k, v in c["mta_errors"].items() if v}),
        ("PROXY headers", lambda c: {k: v for k, v in c["proxy_refused"].items() if v}),
        ("Session limits", lambda c: {k: v for k, v in c["limits_reached"].items() if v}),
        ("TLS", lambda c: c["tls"]),
    ]
    body: list[Tag] = []
    for title, get in groups:
        t, a = get(today), get(total)
        if not a:
            continue
        body.append(tags.tr(tags.td(title, colspan="3"), class_="group"))
        for reason in sorted(a, key=lambda r: -a[r]):
            body.append(
                tags.tr(
                    tags.td(reason),
                    tags.td(f"{t.get(reason, 0):,}", class_="n"),
                    tags.td(f"{a[reason]:,}", class_="n"),
                )
            )
    content: Tag = (
        tags.table(
            _head("Reason", "Today", "Since start", numeric=("Today", "Since start")),
            tags.tbody(*body),
            id="reasons",
        )
        if body
        else tags.p("Nothing refused yet.", class_="empty")
    )
    return tags.section(tags.h2("Refusals by reason"), content)


def _chart(hours: list[Mapping[str, Any]]) -> Tag:
    """Messages per hour over the last 24 hours, stacked: accepted, tempfailed, rejected."""
    width, height, left, bottom, top = 720, 190, 36, 22, 10
    plot = height - bottom - top
    peak = max((h["accepted"] + h["rejected"] + h["tempfailed"] for h in hours), default=0)
    scale = max(1, _niceCeiling(peak))
    slot = (width - left) / max(len(hours), 1)
    parts: list[Tag] = []
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot - plot * fraction
        parts.append(
            Tag("line")(x1=str(left), x2=str(width), y1=f"{y:.1f}", y2=f"{y:.1f}", stroke="#e3e7ee")
        )
        value = scale * fraction
        parts.append(
            Tag("text")(f"{value:g}", x=str(left - 6), y=f"{y + 4:.1f}", **{"text-anchor": "end"})
        )
    for i, h in enumerate(hours):
        x = left + i * slot + slot * 0.15
        y = top + plot
        bars: list[Tag] = []
        for key, colour in (
            ("accepted", "#2e7d32"),
            ("tempfailed", "#ef8f00"),
            ("rejected", "#c62828"),
        ):
            size = plot * h[key] / scale
            if size > 0:
                y -= size
                bars.append(
                    Tag("rect")(
                        x=f"{x:.1f}", y=f"{y:.1f}", width=f"{slot * 0.7:.1f}", height=f"{size:.1f}",
                        fill=colour,
                    )
                )  # fmt: skip
        summary = (
            f"{h['hour']}: {h['accepted']} accepted, {h['rejected']} rejected, "
            f"{h['tempfailed']} tempfailed, {h['connections']} connections"
        )
        hit = Tag("rect")(
            x=f"{left + i * slot:.1f}",
            y=str(top),
            width=f"{slot:.1f}",
            height=str(plot),
            fill="transparent",
        )
        parts.append(Tag("g")(Tag("title")(summary), hit, *bars))
        if i % 3 == 0 or i == len(hours) - 1:
            parts.append(
                Tag("text")(
                    h["hour"][:2],
                    x=f"{x + slot * 0.35:.1f}",
                    y=str(height - 6),
                    **{"text-anchor": "middle"},
                )
            )
    total = sum(h["accepted"] + h["rejected"] + h["tempfailed"] for h in hours)
    svg = Tag("svg")(
        *parts,
        viewBox=f"0 0 {width} {height}",
        class_="chart",
        role="img",
        **{"aria-label": f"Messages per hour over the last 24 hours: {total} in all"},
    )
    legend = tags.div(
        tags.span(tags.span(class_="sw ok"), "accepted"),
        tags.span(tags.span(class_="sw warn"), "tempfailed"),
        tags.span(tags.span(class_="sw bad"), "rejected"),
        class_="legend",
    )
    return tags.section(tags.h2("Messages per hour, last 24 hours"), svg, legend, id="chart")


def _niceCeiling(n: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above C{n}."""
    if n <= 0:
        return 1
    magnitude = 10.0 ** math.floor(math.log10(n))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= n)


def _sessions(active: list[Mapping[str, Any]]) -> Tag:
    if not active:
        return tags.section(
            tags.h2("Active sessions (0)"), tags.p("No client connected.", class_="empty")
        )
    byWorker = any("worker" in s for s in active)
    rows = [
        tags.tr(
            *([tags.td(str(s.get("worker", "")), class_="n")] if byWorker else []),
            tags.td(s["id"], class_="code"),
            tags.td(s["client"]),
            tags.td(s["helo"] or "", class_="code"),
            tags.td(s["sender"] if s["sender"] is not None else "", class_="code"),
            tags.td(str(s["recipients"]), class_="n"),
            tags.td(s["phase"]),
            tags.td(_age(s["age"]), class_="n"),
        )
        for s in active
    ]
    columns = ("Session", "Client", "HELO", "Sender", "Rcpts", "Phase", "Age")
    header = _head(
        *(("Worker", *columns) if byWorker else columns), numeric=("Worker", "Rcpts", "Age")
    )
    return tags.section(
        tags.h2(f"Active sessions ({len(active)})"),
        tags.table(header, tags.tbody(*rows), id="sessions"),
    )


def _workers(workers: list[Mapping[str, Any]]) -> Tag:
    """A master's worker processes, a row each."""
    rows = [
        tags.tr(
            tags.td(str(w["worker"]), class_="n"),
            tags.td("down" if w["pid"] is None else str(w["pid"]), class_="n"),
            tags.td("" if w["started"] is None else _when(w["started"]), class_="n"),
            tags.td(f"{w['restarts']:,}", class_="n"),
            tags.td(f"{w['active']:,}", class_="n"),
            tags.td(f"{w['accepted']:,}", class_="n"),
        )
        for w in workers
    ]
    numeric = ("Worker", "PID", "Up since", "Restarts", "Active", "Accepted")
    return tags.section(
        tags.h2(f"Workers ({len(workers)})"),
        tags.table(_head(*numeric, numeric=numeric), tags.tbody(*rows), id="workers"),
    )


def _filters(filters: Mapping[str, Mapping[str, Any]]) -> Tag:
    if not filters:
        return tags.section(tags.h2("Filters"), tags.p("No filter has run yet.", class_="empty"))
    rows = []
    for name, f in filters.items():
        verdicts = f["verdicts"]
        refused = sum(n for v, n in verdicts.items() if v in ("reject", "tempfail"))
        seconds = f["seconds"]
        rows.append(
            tags.tr(
                tags.td(name),
                tags.td(f"{f['checks']:,}", class_="n"),
                tags.td(f"{refused:,}", class_="n"),
                tags.td(_latency(seconds["mean"]), class_="n"),
                tags.td("≤ " + _latency(seconds["p95_at_most"]), class_="n"),
                tags.td(_latency(seconds["max"]), class_="n"),
                tags.td(", ".join(f"{v} {n}" for v, n in sorted(verdicts.items()))),
            )
        )
    header = _head(
        "Filter", "Checks", "Refused", "Mean", "p95", "Max", "Verdicts",
        numeric=("Checks", "Refused", "Mean", "p95", "Max"),
    )  # fmt: skip
    return tags.section(
        tags.h2("Filters (since start)"),
        tags.table(header, tags.tbody(*rows), id="filters"),
    )


def _refusals(refusals: list[Mapping[str, Any]]) -> Tag:
    if not refusals:
        return tags.section(tags.h2("Last refusals"), tags.p("None yet.", class_="empty"))
    rows = [
        tags.tr(
            tags.td(_when(r["time"]), class_="n"),
            tags.td(r["client"]),
            tags.td(r["sender"] if r["sender"] is not None else "", class_="code"),
            tags.td(r["stage"]),
            tags.td(r["filter"]),
            tags.td(r["reply"], class_="code"),
        )
        for r in reversed(refusals)
    ]
    header = _head("Time", "Client", "Sender", "Stage", "By", "Reply")
    return tags.section(
        tags.h2(f"Last refusals ({len(refusals)}, newest first)"),
        tags.table(header, tags.tbody(*rows), id="refusals"),
    )


def page(snapshot: Mapping[str, Any], hostname: str, refresh: float) -> Tag:
    """The status page for one snapshot."""
    today = snapshot["today"]
    refused = _sum(today["messages"]["rejected"]) + _sum(today["messages"]["tempfailed"])
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.meta(content=f"{refresh:g}", **{"http-equiv": "refresh"}),
            tags.title(f"mailproxy — {hostname}"),
            tags.link(rel="icon", href="data:,"),  # no /favicon.ico request
            tags.style(STYLE),
        ),
        tags.body(
            tags.header(
                tags.h1("mailproxy ", tags.span(hostname)),
                tags.span(
                    f"today {today['date']} · up {_age(snapshot['uptime'])} · "
                    f"as of {_when(snapshot['now'])} · refreshes every {refresh:g} s",
                    class_="meta",
                ),
            ),
            Tag("main")(
                tags.div(
                    _card("Accepted today", today["messages"]["accepted"], "card-accepted", "ok"),
                    _card("Refused today", refused, "card-refused", "bad"),
                    _card("Connections today", today["connections"]["opened"], "card-connections"),
                    _card("Active sessions", len(snapshot["active"]), "card-active"),
                    class_="cards",
                ),
                _chart(snapshot["hours"]),
                tags.div(_counters(snapshot), _reasons(snapshot), class_="grid"),
                *([_workers(snapshot["workers"])] if snapshot.get("workers") else []),
                _sessions(snapshot["active"]),
                _filters(snapshot["filters"]),
                _refusals(snapshot["refusals"]),
                tags.footer(
                    "Also: ",
                    tags.a("/stats.json", href="stats.json"),
                    " · ",
                    tags.a("/metrics", href="metrics"),
                    " (Prometheus)",
                ),
            ),
        ),
        lang="en",
    )


def render(tag: Tag) -> bytes:
    """Flatten a page made only of tags and strings (no Deferreds): synchronous."""
    out: list[bytes] = []
    failures: list[Failure] = []
    flatten(None, tag, out.append).addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + b"".join(out)


# -- resources ------------------------------------------------------------------------------


def _commonHeaders(request: IRequest) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")


#: The counters now; or, from a master, once its workers have reported (a Deferred).
Snapshot = Callable[[], "dict[str, Any] | Deferred[dict[str, Any]]"]


def _answer(
    request: Request, snapshot: Snapshot, body: Callable[[dict[str, Any]], bytes]
) -> bytes | int:
    """C{body} of the snapshot: at once, or when a master's is ready."""
    answer = snapshot()
    if not isinstance(answer, Deferred):
        return body(answer)

    def write(fresh: dict[str, Any]) -> None:
        if not request.finished and not request._disconnected:
            request.write(body(fresh))
            request.finish()

    def failed(failure: Failure) -> None:
        if not request.finished and not request._disconnected:
            request.setResponseCode(500)
            request.finish()

    answer.addCallbacks(write, failed)
    return NOT_DONE_YET


class StatusPage(Resource):
    isLeaf = True

    def __init__(
        self, stats: Stats, hostname: str, refresh: float, snapshot: Snapshot | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._snapshot = snapshot or stats.snapshot
        self._hostname = hostname
        self._refresh = refresh

    def render_GET(self, request: Request) -> bytes | int:
        _commonHeaders(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CSP.encode())
        return _answer(
            request, self._snapshot, lambda s: render(page(s, self._hostname, self._refresh))
        )


class StatsJSON(Resource):
    isLeaf = True

    def __init__(self, stats: Stats, snapshot: Snapshot | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._snapshot = snapshot or stats.snapshot

    def render_GET(self, request: Request) -> bytes | int:
        _commonHeaders(request)
        request.setHeader(b"content-type", b"application/json")
        return _answer(
            request, self._snapshot, lambda s: json.dumps(s, ensure_ascii=False).encode()
        )


class MetricsPage(Resource):
    """The Prometheus exposition, in the format the scraper's C{Accept} asks for."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        encoder, contentType = choose_encoder(request.getHeader("accept") or "")
        _commonHeaders(request)
        request.setHeader(b"content-type", contentType.encode())
        return encoder(self._registry)


class StatusSite(Site):
    """The site; requests are not logged (the page refreshes itself all day)."""

    def log(self, request: HTTPRequest) -> None:
        pass


def statusSite(
    stats: Stats, hostname: str, refresh: float, reactor: Any, snapshot: Snapshot | None = None
) -> StatusSite:
    """
    C{/}, C{/stats.json} and C{/metrics} for C{stats}.

    @param snapshot: what the page and C{/stats.json} show (a master's waits for its
        workers' reports); by default C{stats.snapshot}. C{/metrics} reads C{stats} as it
        is (a scrape may miss the last L{mailproxy.workers.REPORT_INTERVAL} seconds).
    """
    root = Resource()
    root.putChild(b"", StatusPage(stats, hostname, refresh, snapshot))
    root.putChild(b"stats.json", StatsJSON(stats, snapshot))
    root.putChild(b"metrics", MetricsPage(registryFor(stats)))
    site = StatusSite(root, reactor=reactor)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    site.noisy = False
    return site
