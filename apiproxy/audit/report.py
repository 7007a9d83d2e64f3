"""`apiproxy audit report`: the figures of `summarize` as one self-contained HTML page.

Per peer: requests and refusals over time, the top refused (verb, resource, namespace), watch-hours
and authentication failures by reason. The page is built from the same streaming reader and filters
as `summarize`; the timelines add at most `MAX_BUCKETS` buckets per peer (the bucket width grows
when the log spans more), so memory stays bounded whatever the log size.

Everything is inline: SVG drawn here, one small script and one style sheet, both pinned by a
Content-Security-Policy hash, so the page fetches nothing and runs nothing else. Every text taken
from the log (peer names, resources, namespaces come from requests, even unauthenticated ones) is
HTML-escaped. The script only counts the chart marks the browser laid out and writes the count
into the document (`data-drawn-marks`), for tests and as a visible check.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from apiproxy.audit import events as ev
from apiproxy.audit.review import Filter, Rec, Summary, human_bytes, summarize
from apiproxy.errors import UserError

MAX_BUCKETS: Final = 240  # bars per timeline; the bucket width grows beyond that span
# Bucket widths in milliseconds, each a multiple of the one before, so growing merges whole
# buckets: counts never move between neighbours. Past the last, the width doubles.
WIDTHS_MS: Final = (
    100, 500, 1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 1_800_000,
    3_600_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
)  # fmt: skip


@dataclass
class Timeline:
    """Requests and refusals per time bucket, for every peer, on one shared time axis."""

    width_ms: int = WIDTHS_MS[0]
    lo: int | None = None  # first and last bucket index (time // width) seen
    hi: int | None = None
    peers: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def add(self, peer: str, rec: Rec) -> None:
        if rec.stage != ev.STAGE_RESPONSE_COMPLETE:  # each request once, like summarize
            return
        when_ms = int(datetime.fromisoformat(rec.received).timestamp() * 1000)
        idx = when_ms // self.width_ms
        lo = idx if self.lo is None else min(self.lo, idx)
        hi = idx if self.hi is None else max(self.hi, idx)
        self.lo, self.hi = lo, hi
        while self.hi - self.lo + 1 > MAX_BUCKETS:
            factor = self._grow()
            idx //= factor
        cell = self.peers.setdefault(peer, {}).setdefault(idx, [0, 0])
        cell[0] += 1
        if rec.refused:
            cell[1] += 1

    def _grow(self) -> int:
        bigger = [w for w in WIDTHS_MS if w > self.width_ms]
        new = bigger[0] if bigger else self.width_ms * 2
        factor = new // self.width_ms
        self.width_ms = new
        assert self.lo is not None
        assert self.hi is not None
        self.lo //= factor
        self.hi //= factor
        for name, buckets in self.peers.items():
            merged: dict[int, list[int]] = {}
            for idx, (n, refused) in buckets.items():
                cell = merged.setdefault(idx // factor, [0, 0])
                cell[0] += n
                cell[1] += refused
            self.peers[name] = merged
        return factor


@dataclass
class Report:
    summary: Summary
    timeline: Timeline


def build(paths: Iterable[str], flt: Filter | None = None) -> Report:
    timeline = Timeline()
    summary = summarize(paths, flt, observe=timeline.add)
    return Report(summary, timeline)


# -- drawing ---------------------------------------------------------------------------------

BLUE: Final = "#4878a8"
RED: Final = "#c8443a"
GREY: Final = "#6b7280"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clock(epoch_ms: int, width_ms: int) -> str:
    """A bucket boundary, as precise as the buckets are fine."""
    t = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    if width_ms < 1000:
        return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return t.strftime("%Y-%m-%d %H:%M:%SZ" if width_ms < 60_000 else "%Y-%m-%d %H:%MZ")


def _span(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms / 1000:g} s"


def timeline_svg(t: Timeline, peer: str) -> str:
    """Bars per bucket: requests (blue) with the refused part (red) drawn over them."""
    w, h, left, bottom, top = 760, 170, 48, 24, 10
    buckets = t.peers.get(peer, {})
    if t.lo is None or t.hi is None or not buckets:
        return '<p class="none">No requests in range.</p>'
    n = t.hi - t.lo + 1
    peak = max(c[0] for c in buckets.values())
    step = (w - left - 8) / n
    bar = max(step * 0.8, 1.0)
    plot = h - bottom - top
    out = [
        f'<svg class="chart timeline" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        f'role="img" aria-label="requests and refusals of {_e(peer)} over time">',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - 4}" y2="{h - bottom}" stroke="{GREY}"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="{GREY}"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{h - bottom}" text-anchor="end">0</text>',
    ]
    for idx in sorted(buckets):
        total, refused = buckets[idx]
        x = left + (idx - t.lo) * step + (step - bar) / 2
        for value, colour, kind in ((total, BLUE, "requests"), (refused, RED, "refused")):
            if value == 0:
                continue
            bh = max(plot * value / peak, 1.0)
            when = _clock(idx * t.width_ms, t.width_ms)
            out.append(
                f'<rect class="mark {kind}" x="{x:.2f}" y="{h - bottom - bh:.2f}" '
                f'width="{bar:.2f}" height="{bh:.2f}" fill="{colour}">'
                f"<title>{when}: {value} {kind}</title></rect>"
            )
    start, end = t.lo * t.width_ms, (t.hi + 1) * t.width_ms
    out += [
        f'<text x="{left}" y="{h - 6}">{_clock(start, t.width_ms)}</text>',
        f'<text x="{w - 4}" y="{h - 6}" text-anchor="end">{_clock(end, t.width_ms)}</text>',
        f'<text x="{(w + left) / 2:.0f}" y="{h - 6}" text-anchor="middle">'
        f"one bar per {_span(t.width_ms)}</text>",
        "</svg>",
    ]
    return "".join(out)


def _count(value: float) -> str:
    return f"{value:g}"


def _hours(value: float) -> str:
    """Watch-hours, still readable for the seconds-long watches of a short log."""
    if value >= 0.1:
        return f"{value:.2f} h"
    seconds = value * 3600
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _stamp(text: str | None) -> str:
    """`2026-11-26T02:12:31.123456Z` -> `2026-11-26 02:12:31Z` for the table."""
    return f"{text[:10]} {text[11:19]}Z" if text else "-"


def hbars_svg(
    rows: list[tuple[str, float, str]], label: str, fmt: Callable[[float], str] = _count
) -> str:
    """Horizontal bars: (label, value, colour) per row, longest first as given."""
    if not rows:
        return '<p class="none">None.</p>'
    w, row_h, text_w = 760, 22, 300
    peak = max(v for _l, v, _c in rows) or 1.0
    h = row_h * len(rows) + 4
    out = [
        f'<svg class="chart bars" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="{_e(label)}">'
    ]
    for i, (text, value, colour) in enumerate(rows):
        y = i * row_h + 2
        shown = text if len(text) <= 44 else text[:43] + "…"
        bw = max((w - text_w - 70) * value / peak, 1.0) if value > 0 else 0.0
        out.append(
            f'<text x="{text_w - 8}" y="{y + 15}" text-anchor="end">{_e(shown)}'
            f"<title>{_e(text)}</title></text>"
        )
        if bw:
            out.append(
                f'<rect class="mark" x="{text_w}" y="{y + 3}" width="{bw:.2f}" height="{row_h - 6}"'
                f' fill="{colour}"><title>{_e(text)}: {_e(fmt(value))}</title></rect>'
            )
        out.append(f'<text x="{text_w + bw + 6:.2f}" y="{y + 15}">{_e(fmt(value))}</text>')
    out.append("</svg>")
    return "".join(out)


STYLE: Final = """
body { font: 14px/1.45 "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: #1f2933;
       margin: 24px auto; max-width: 1000px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #d0d5dd; padding-bottom: 4px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 8px; text-align: left; font-size: 13px; border-bottom: 1px solid #e5e7eb; }
td.n, th.n { text-align: right; white-space: nowrap;
     font-variant-numeric: tabular-nums; }
.meta { color: #52606d; } .none { color: #7b8794; font-style: italic; }
svg text { font-size: 11px; fill: #3e4c59; } .legend .requests { color: #4878a8; }
.refused { color: #c8443a; } .check { color: #52606d; font-size: 12px; }
"""

SCRIPT: Final = """
(function () {
  var total = 0;
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var drawn = 0;
    svg.querySelectorAll(".mark").forEach(function (m) {
      var b = m.getBoundingClientRect();
      if (b.width > 0 && b.height > 0) { drawn += 1; }
    });
    svg.setAttribute("data-drawn-marks", String(drawn));
    total += drawn;
  });
  document.documentElement.setAttribute("data-drawn-marks", String(total));
  var out = document.getElementById("drawn-marks");
  if (out) { out.textContent = total + " chart marks drawn"; }
})();
"""


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


CSP: Final = (
    f"default-src 'none'; script-src '{_csp_hash(SCRIPT)}'; style-src '{_csp_hash(STYLE)}'; "
    "img-src 'none'; base-uri 'none'; form-action 'none'"
)


def _peer_table(data: dict[str, Any]) -> str:
    head = ["peer", "requests", "denied", "unauth", "errors", "bytes", "watches", "watch-hours"]
    head += ["first", "last"]
    rows = [
        "<tr>"
        + "".join(f'<th class="{"n" if 0 < i < 8 else ""}">{h}</th>' for i, h in enumerate(head))
        + "</tr>"
    ]
    for name, p in data["peers"].items():
        cells = [
            p["requests"],
            p["denied"],
            p["unauthenticated"],
            p["errors"],
            human_bytes(p["bytesSent"]),
            p["watches"],
            _hours(p["watchHours"]) if p["watches"] else "-",
        ]
        rows.append(
            f"<tr><td>{_e(name)}</td>"
            + "".join(f'<td class="n">{_e(c)}</td>' for c in cells)
            + f"<td>{_stamp(p['first'])}</td><td>{_stamp(p['last'])}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def render_html(report: Report, top: int = 10, *, generated: datetime | None = None) -> str:
    summary, timeline = report.summary, report.timeline
    data = summary.to_dict(top)
    when = (generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%SZ")
    flt = data["filter"]
    filters = [f"peer {', '.join(flt['peers'])}" if flt["peers"] else "all peers"]
    if flt["since"]:
        filters.append(f"since {flt['since']}")
    if flt["until"]:
        filters.append(f"until {flt['until']}")
    if flt["deniedOnly"]:
        filters.append("refused requests only")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>apiproxy audit report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>apiproxy audit report</h1>",
        f'<p class="meta">{_e(", ".join(data["files"]))}: {data["lines"]} lines, '
        f"{data['records']} records; {_e('; '.join(filters))}. Generated {when}.</p>",
    ]
    if data["malformed"]:
        examples = "".join(f"<li>{_e(m)}</li>" for m in data["malformedExamples"])
        parts.append(
            f"<p>{data['malformed']} malformed line(s) skipped, e.g.:</p><ul>{examples}</ul>"
        )
    if not data["peers"]:
        parts.append('<p class="none">No requests match.</p>')
    else:
        parts.append("<h2>Peers</h2>" + _peer_table(data))
        watch_rows = [
            (name, p["watchHours"], BLUE) for name, p in data["peers"].items() if p["watches"]
        ]
        watch_rows.sort(key=lambda r: -r[1])
        parts.append("<h3>Watch-hours per peer</h3>")
        parts.append(hbars_svg(watch_rows, "watch-hours per peer", _hours))
        reasons: dict[str, int] = {}
        for p in data["peers"].values():
            for a in p["authnFailures"]:
                reasons[a["reason"]] = reasons.get(a["reason"], 0) + a["count"]
        parts.append("<h3>Authentication failures by reason</h3>")
        parts.append(
            hbars_svg(
                [(r, float(c), RED) for r, c in sorted(reasons.items(), key=lambda kv: -kv[1])],
                "authentication failures by reason",
            )
        )
    for name, p in data["peers"].items():
        parts.append(f"<h2>{_e(name)}</h2>")
        line = (
            f'<p>{p["requests"]} requests, <span class="refused">'
            f"{p['denied'] + p['unauthenticated']} refused</span>, {p['watches']} watches"
        )
        if p["watches"]:
            line += f" ({_hours(p['watchHours'])} of watching, {p['watchEvents']} events)"
        if p["failedWatches"]:
            line += f", {p['failedWatches']} ended in an error"
        if p["unfinishedWatches"]:
            line += f", {p['unfinishedWatches']} without a final record"
        parts.append(line + ".</p>")
        parts.append(
            '<h3 class="legend">Requests over time: <span class="requests">all</span>, '
            '<span class="refused">refused</span> (denied by the policy or not authenticated)'
            "</h3>"
        )
        parts.append(timeline_svg(timeline, name))
        approx = " (approximate counts)" if p["topDeniedApproximate"] else ""
        parts.append(f"<h3>Top refused (verb, resource, namespace){approx}</h3>")
        parts.append(
            hbars_svg(
                [
                    (f"{d['verb']} {d['resource']} {d['namespace'] or '(none)'}", d["count"], RED)
                    for d in p["topDenied"]
                ],
                f"top refused requests of {name}",
            )
        )
        if p["authnFailures"]:
            reasons_text = ", ".join(f"{a['reason']} x{a['count']}" for a in p["authnFailures"])
            parts.append(f"<p>Authentication failures: {_e(reasons_text)}</p>")
    parts += [
        '<p class="check" id="drawn-marks">charts not checked (scripts disabled)</p>',
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(paths: list[str], out: str, flt: Filter, top: int = 10) -> Report:
    """Build the report and write it to `out` atomically (mode 0600, like the audit log)."""
    report = build(paths, flt)
    page = render_html(report, top)
    target = Path(out)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"--html {out}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".report-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"--html {out}: {exc.strerror or exc}") from None
    return report
