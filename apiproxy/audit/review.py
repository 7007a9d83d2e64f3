"""Streaming audit-log reader and `summarize`: per-peer aggregates in bounded memory.

Records are read one line at a time (plain, gzip-compressed, or stdin), never collected. A line
longer than `MAX_LINE` bytes, a line that is not JSON, or JSON that is not an audit.k8s.io/v1
Event is counted as malformed (with the first few locations kept for the report) and skipped.

Each request is counted once, from its final record (ResponseComplete, or Panic in a
kube-apiserver log); RequestReceived records are skipped. A watch is *unfinished* when its audit ID
has a ResponseStarted record and no final record anywhere in the files read (in either order: a
rotated file may be read after the newer one). A watch whose final record says it ended in an
error (code 400 or more) is finished: it counts as a failed watch, and as an error.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any, Final

from apiproxy.audit import events as ev
from apiproxy.errors import UserError

MAX_LINE: Final = 1024 * 1024
MAX_MALFORMED_EXAMPLES: Final = 5
TOP_KEYS_CAP: Final = 1000  # distinct keys tracked per top-N counter before pruning
MAX_PEERS: Final = 1000  # distinct peers tracked; the rest are folded into OTHER_PEERS
# Audit IDs of open watches tracked per peer, and of final records seen before their watch's
# ResponseStarted record (files read out of order); past these the oldest are let go.
MAX_OPEN_WATCHES: Final = 100_000
MAX_EARLY_FINALS: Final = 10_000
OTHER_PEERS: Final = "(other peers)"
_GZIP_MAGIC: Final = b"\x1f\x8b"


# -- reading ---------------------------------------------------------------------------------


@dataclass
class ReadStats:
    files: list[str] = field(default_factory=list)
    lines: int = 0
    records: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    cur_file: str = ""  # where the record being read came from
    cur_line: int = 0

    def bad(self, where: str, why: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MAX_MALFORMED_EXAMPLES:
            self.malformed_examples.append(f"{where}: {why}")


def open_input(path: str) -> IO[bytes]:
    """Open a log file, `-` for stdin; gzip is detected by its magic bytes, not the name."""
    raw: IO[bytes]
    try:
        if path == "-":
            raw = sys.stdin.buffer
            if not isinstance(raw, io.BufferedReader):
                raw = io.BufferedReader(raw)  # type: ignore[type-var]
        else:
            raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    peek = raw.peek(2) if isinstance(raw, io.BufferedReader) else b""
    if peek[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def iter_records(paths: Iterable[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Yield every well-formed Event of every file, in order; count what is malformed."""
    for path in paths:
        name = "<stdin>" if path == "-" else path
        stats.files.append(name)
        stats.cur_file = name
        f = open_input(path)
        lineno = 0
        try:
            while True:
                try:
                    line = f.readline(MAX_LINE + 1)
                except (OSError, EOFError, zlib.error) as exc:
                    stats.bad(f"{name}:{lineno + 1}", f"unreadable ({type(exc).__name__}: {exc})")
                    break
                if not line:
                    break
                lineno += 1
                stats.lines += 1
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    try:
                        while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                            pass
                    except (OSError, EOFError, zlib.error):
                        pass
                    stats.bad(f"{name}:{lineno}", f"line longer than {MAX_LINE} bytes")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    stats.bad(f"{name}:{lineno}", "not JSON")
                    continue
                if (
                    not isinstance(obj, dict)
                    or obj.get("kind") != ev.KIND
                    or obj.get("apiVersion") != ev.API_VERSION
                ):
                    stats.bad(f"{name}:{lineno}", "not an audit.k8s.io/v1 Event")
                    continue
                stats.records += 1
                stats.cur_line = lineno
                yield obj
        finally:
            if path != "-":
                f.close()


# -- interpreting one record -----------------------------------------------------------------


@dataclass(slots=True)
class Rec:
    """The fields review needs, type-checked, from one Event."""

    audit_id: str
    stage: str
    username: str
    peer: str  # peer name, or the username when not a peer (system:anonymous)
    verb: str
    path: str  # requestURI without the query
    code: int
    received: str  # normalised RFC 3339 micro UTC; compares correctly as a string
    decision: str
    authn_failure: str
    bytes_sent: int
    watch_seconds: float
    watch_events: int
    api_group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    is_resource: bool

    @property
    def unauthenticated(self) -> bool:
        return bool(self.authn_failure) or self.code == 401 or self.username == ev.ANONYMOUS

    @property
    def policy_denied(self) -> bool:
        """Refused by the access policy: decision forbid, authenticated, not a bad request."""
        return self.decision == ev.DECISION_FORBID and not self.unauthenticated and self.code != 400

    @property
    def refused(self) -> bool:
        return self.policy_denied or self.unauthenticated

    @property
    def resource_key(self) -> str:
        """`pods/exec`, `endpointslices.discovery.k8s.io`; the path for non-resource URLs."""
        if not self.is_resource:
            return self.path
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{what}.{self.api_group}" if self.api_group else what


def normalize_time(text: str) -> str:
    if len(text) == 27 and text[10] == "T" and text[19] == "." and text[26] == "Z":
        return text
    return ev.format_time(ev.parse_time(text))


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


def _num(text: str, kind: type[int] | type[float]) -> Any:
    if not text:
        return kind(0)
    value = kind(text)
    if value < 0 or value != value:  # negative or NaN
        raise ValueError("negative")
    return value


_READ_STAGES: Final = ev.STAGES | ev.FINAL_STAGES | {ev.STAGE_REQUEST_RECEIVED}


def parse_record(obj: dict[str, Any]) -> Rec:
    """Extract and type-check; raises (TypeError, ValueError, KeyError) on a malformed Event."""
    user = obj["user"]
    username = _str(user, "username")
    notes = obj.get("annotations") or {}
    ref = obj.get("objectRef") or {}
    status = obj.get("responseStatus") or {}
    if not isinstance(notes, dict) or not isinstance(ref, dict) or not isinstance(status, dict):
        raise TypeError("annotations, objectRef and responseStatus must be objects")
    code = status.get("code", 0)
    if not isinstance(code, int):
        raise TypeError("responseStatus.code is not an integer")
    stage = _str(obj, "stage")
    if stage not in _READ_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    peer = ev.peer_of(username)
    return Rec(
        audit_id=_str(obj, "auditID"),
        stage=stage,
        username=username,
        peer=peer if peer is not None else username,
        verb=_str(obj, "verb"),
        path=_str(obj, "requestURI").partition("?")[0],
        code=code,
        received=normalize_time(_str(obj, "requestReceivedTimestamp")),
        decision=_str(notes, ev.DECISION),
        authn_failure=_str(notes, ev.AUTHN_FAILURE),
        bytes_sent=_num(_str(notes, ev.BYTES_SENT), int),
        watch_seconds=_num(_str(notes, ev.WATCH_DURATION), float),
        watch_events=_num(_str(notes, ev.WATCH_EVENTS), int),
        api_group=_str(ref, "apiGroup"),
        resource=_str(ref, "resource"),
        subresource=_str(ref, "subresource"),
        namespace=_str(ref, "namespace"),
        name=_str(ref, "name"),
        is_resource=bool(ref.get("resource")),
    )


def iter_parsed(paths: Iterable[str], stats: ReadStats) -> Iterator[Rec]:
    for obj in iter_records(paths, stats):
        try:
            yield parse_record(obj)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            stats.records -= 1
            stats.bad(
                f"{stats.cur_file}:{stats.cur_line}",
                f"malformed Event ({type(exc).__name__}: {exc})",
            )


# -- filters -----------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime | None = None) -> str:
    """`--since/--until` value: RFC 3339, a date (UTC midnight), or relative like 2h, 1h30m, 7d."""
    value = text.strip()
    if value and _RELATIVE.sub("", value) == "" and _RELATIVE.match(value):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _RELATIVE.findall(value))
        return ev.format_time((now or ev.now()) - timedelta(seconds=seconds))
    if re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        value += "T00:00:00Z"
    try:
        return ev.format_time(ev.parse_time(value))
    except ValueError:
        raise UserError(
            f"cannot read time {text!r}: use RFC 3339 (2026-11-26T02:12:31Z), a date "
            "(2026-11-26) or a relative age such as 30m, 2h, 1h30m, 7d"
        ) from None


@dataclass(frozen=True)
class Filter:
    peers: frozenset[str] = frozenset()
    since: str | None = None  # normalised timestamps, compared as strings
    until: str | None = None
    denied_only: bool = False

    def time_ok(self, rec: Rec) -> bool:
        if self.since is not None and rec.received < self.since:
            return False
        return self.until is None or rec.received < self.until

    def peer_ok(self, rec: Rec) -> bool:
        return not self.peers or rec.peer in self.peers or rec.username in self.peers

    def to_dict(self) -> dict[str, Any]:
        return {
            "peers": sorted(self.peers),
            "since": self.since,
            "until": self.until,
            "deniedOnly": self.denied_only,
        }


# -- aggregation -------------------------------------------------------------------------------


class TopCounter:
    """Counts keys, holding at most `cap` of them: when full, the lower half is pruned (counts
    of keys seen after pruning may then be under-estimates, flagged by `approximate`)."""

    __slots__ = ("approximate", "cap", "counts")

    def __init__(self, cap: int = TOP_KEYS_CAP) -> None:
        self.cap = cap
        self.counts: dict[tuple[str, ...], int] = {}
        self.approximate = False

    def add(self, key: tuple[str, ...], n: int = 1) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += n
            return
        if len(counts) >= self.cap:
            keep = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[: self.cap // 2]
            self.counts = counts = dict(keep)
            self.approximate = True
        counts[key] = n

    def top(self, n: int) -> list[tuple[tuple[str, ...], int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


@dataclass
class PeerStats:
    requests: int = 0
    denied: int = 0
    unauthenticated: int = 0
    errors: int = 0
    bytes_sent: int = 0
    watches: int = 0
    failed_watches: int = 0  # a final record with code >= 400 (also counted in `errors`)
    watch_seconds: float = 0.0
    watch_events: int = 0
    first: str | None = None
    last: str | None = None
    top_denied: TopCounter = field(default_factory=TopCounter)
    top_authn_failures: TopCounter = field(default_factory=lambda: TopCounter(100))
    # Audit IDs (insertion-ordered sets): watches started and not yet seen final, and final
    # watch records not yet matched with a ResponseStarted record.
    open_watches: dict[str, None] = field(default_factory=dict)
    early_finals: dict[str, None] = field(default_factory=dict)
    open_watches_dropped: int = 0  # let go past MAX_OPEN_WATCHES: still counted as unfinished

    @property
    def unfinished_watches(self) -> int:
        return len(self.open_watches) + self.open_watches_dropped

    def _watch_started(self, audit_id: str) -> None:
        if audit_id in self.early_finals:  # its final record came first
            del self.early_finals[audit_id]
            return
        self.open_watches[audit_id] = None
        if len(self.open_watches) > MAX_OPEN_WATCHES:
            del self.open_watches[next(iter(self.open_watches))]
            self.open_watches_dropped += 1

    def _watch_ended(self, audit_id: str) -> None:
        if audit_id in self.open_watches:
            del self.open_watches[audit_id]
            return
        self.early_finals[audit_id] = None
        if len(self.early_finals) > MAX_EARLY_FINALS:
            del self.early_finals[next(iter(self.early_finals))]

    def add(self, rec: Rec) -> None:
        if rec.stage == ev.STAGE_RESPONSE_STARTED:
            if rec.verb == "watch":
                self._watch_started(rec.audit_id)
            return
        if rec.stage not in ev.FINAL_STAGES:
            return  # RequestReceived (kube-apiserver): the final record counts the request
        if rec.verb == "watch":
            self._watch_ended(rec.audit_id)
        self.requests += 1
        self.bytes_sent += rec.bytes_sent
        if self.first is None or rec.received < self.first:
            self.first = rec.received
        if self.last is None or rec.received > self.last:
            self.last = rec.received
        if rec.verb == "watch" and not rec.refused:
            if rec.code < 400:
                self.watches += 1
                self.watch_seconds += rec.watch_seconds
                self.watch_events += rec.watch_events
            else:
                self.failed_watches += 1
        if rec.unauthenticated:
            self.unauthenticated += 1
            self.top_authn_failures.add((rec.authn_failure or f"http-{rec.code}",))
        elif rec.policy_denied:
            self.denied += 1
        elif rec.code >= 400:
            self.errors += 1
        if rec.refused:
            self.top_denied.add((rec.verb, rec.resource_key, rec.namespace))

    def to_dict(self, top: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "denied": self.denied,
            "unauthenticated": self.unauthenticated,
            "errors": self.errors,
            "bytesSent": self.bytes_sent,
            "watches": self.watches,
            "failedWatches": self.failed_watches,
            "unfinishedWatches": self.unfinished_watches,
            "watchHours": round(self.watch_seconds / 3600, 6),
            "watchEvents": self.watch_events,
            "first": self.first,
            "last": self.last,
            "topDenied": [
                {"verb": v, "resource": r, "namespace": ns, "count": c}
                for (v, r, ns), c in self.top_denied.top(top)
            ],
            "topDeniedApproximate": self.top_denied.approximate,
            "authnFailures": [
                {"reason": k[0], "count": c} for k, c in self.top_authn_failures.top(top)
            ],
        }


@dataclass
class Summary:
    stats: ReadStats
    filter: Filter
    peers: dict[str, PeerStats] = field(default_factory=dict)

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        total = PeerStats()
        for p in self.peers.values():
            for name in ("requests", "denied", "unauthenticated", "errors", "bytes_sent"):
                setattr(total, name, getattr(total, name) + getattr(p, name))
            total.watches += p.watches
            total.failed_watches += p.failed_watches
            total.open_watches_dropped += p.unfinished_watches  # the totals keep no IDs
            total.watch_seconds += p.watch_seconds
            total.watch_events += p.watch_events
        totals = total.to_dict(0)
        for key in ("topDenied", "topDeniedApproximate", "authnFailures", "first", "last"):
            totals.pop(key)
        return {
            "files": self.stats.files,
            "lines": self.stats.lines,
            "records": self.stats.records,
            "malformed": self.stats.malformed,
            "malformedExamples": self.stats.malformed_examples,
            "filter": self.filter.to_dict(),
            "peers": {name: self.peers[name].to_dict(top) for name in sorted(self.peers)},
            "totals": totals,
        }


def summarize(
    paths: Iterable[str],
    flt: Filter | None = None,
    observe: Callable[[str, Rec], None] | None = None,
) -> Summary:
    """Aggregate per peer. `observe(peer_key, rec)` sees every record counted (after the
    filters; `peer_key` is the peer's row, OTHER_PEERS past MAX_PEERS), for extra aggregates
    that must stay bounded the same way (the HTML report's timelines)."""
    flt = flt or Filter()
    summary = Summary(ReadStats(), flt)
    peers = summary.peers
    for rec in iter_parsed(paths, summary.stats):
        if not flt.peer_ok(rec) or not flt.time_ok(rec):
            continue
        if flt.denied_only and not rec.refused:
            continue
        key = rec.peer
        stats = peers.get(key)
        if stats is None:
            key = rec.peer if len(peers) < MAX_PEERS else OTHER_PEERS
            stats = peers.setdefault(key, PeerStats())
        stats.add(rec)
        if observe is not None:
            observe(key, rec)
    return summary


# -- rendering ---------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def render_table(summary: Summary, top: int = 10) -> str:
    data = summary.to_dict(top)
    lines: list[str] = []
    header = ["PEER", "REQUESTS", "DENIED", "UNAUTH", "ERRORS", "BYTES", "WATCHES"]
    header += ["WATCH-HOURS", "FIRST", "LAST"]
    rows = [header]

    def row(name: str, p: dict[str, Any]) -> list[str]:
        return [
            name,
            str(p["requests"]),
            str(p["denied"]),
            str(p["unauthenticated"]),
            str(p["errors"]),
            human_bytes(p["bytesSent"]),
            str(p["watches"]),
            f"{p['watchHours']:.2f}",
            p.get("first") or "-",
            p.get("last") or "-",
        ]

    for name, p in data["peers"].items():
        rows.append(row(name, p))
    if len(data["peers"]) > 1:
        rows.append(row("TOTAL", data["totals"]))
    if data["peers"]:
        lines += _table(rows, right={1, 2, 3, 4, 5, 6, 7})
    else:
        lines.append("No requests match.")
    for name, p in data["peers"].items():
        if p["failedWatches"]:
            lines.append(f"\n{name}: {p['failedWatches']} watch(es) ended in an error")
        if p["unfinishedWatches"]:
            lines.append(
                f"\n{name}: {p['unfinishedWatches']} watch(es) started without a final record "
                "(still open at the end of the log, or the proxy stopped)"
            )
        if p["topDenied"]:
            approx = " (approximate counts)" if p["topDeniedApproximate"] else ""
            lines.append(f"\nTop refused requests of {name}{approx}:")
            trows = [["COUNT", "VERB", "RESOURCE", "NAMESPACE"]]
            trows += [
                [str(d["count"]), d["verb"], d["resource"], d["namespace"] or "(none)"]
                for d in p["topDenied"]
            ]
            lines += ["  " + t for t in _table(trows, right={0})]
        if p["authnFailures"]:
            reasons = ", ".join(f"{a['reason']} x{a['count']}" for a in p["authnFailures"])
            lines.append(f"Authentication failures of {name}: {reasons}")
    footer = (
        f"\nRead {len(data['files'])} file(s): {data['lines']} lines, {data['records']} records"
    )
    if data["malformed"]:
        footer += f"; {data['malformed']} malformed line(s) skipped, e.g.:"
        footer += "".join(f"\n  {m}" for m in data["malformedExamples"])
    lines.append(footer)
    return "\n".join(lines) + "\n"
