"""`apiproxy audit report`: the HTML page's content, its filters, bounded timelines, escaping of
what requests put in the log, and the CLI. The page in a real browser: test_report_browser.py."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from apiproxy.audit import events as ev
from apiproxy.audit import report as rep
from apiproxy.audit import review
from apiproxy.audit.review import Filter, parse_when

APIPROXY = str(Path(sys.executable).with_name("apiproxy"))


def traffic(synth):
    """cluster-b: 2 lists, a 30-minute watch, 3 denials; cluster-c: 1 list, 1 denial; two
    authentication failures, spread over a few minutes."""
    out = [synth.allowed_list(), synth.allowed_list(namespace="istio-system")]
    out += list(synth.watch(seconds=1800, events=10))
    synth.tick(120)
    out += [synth.denied(), synth.denied(), synth.denied(verb="list", name="")]
    out += [synth.allowed_list("cluster-c"), synth.denied("cluster-c", resource="secrets")]
    synth.tick(300)
    out += [synth.authn_failure("token_expired"), synth.authn_failure("no_credentials")]
    return out


def marks(page: str) -> list[str]:
    return re.findall(r'<rect class="mark[^"]*"', page)


def section(page: str, peer: str) -> str:
    start = page.index(f"<h2>{peer}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end > 0 else None]


def test_page_shows_every_peer_with_its_figures(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    page = rep.render_html(rep.build([str(log)]))
    assert re.findall(r"<h2>([^<]+)</h2>", page) == [
        "Peers",
        "cluster-b",
        "cluster-c",
        "system:anonymous",
    ]
    b = section(page, "cluster-b")
    assert "6 requests" in b
    assert "3 refused" in b
    assert "0.50 h of watching" in b
    # the timeline: all requests (blue) and refused (red); top refused rows with their counts
    assert b.count('class="mark requests"') >= 2
    assert b.count('class="mark refused"') >= 1
    assert ">get configmaps istio-system<title>" in b
    assert re.search(r"<title>get configmaps istio-system: 2</title>", b)
    # authentication failures by reason, over all peers
    assert "<title>token_expired: 1</title>" in page
    assert "<title>no_credentials: 1</title>" in page
    assert "cluster-b: 0.50 h" in page  # watch-hours chart
    assert len(marks(page)) > 10


def test_timeline_counts_each_request_once_in_its_bucket(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    report = rep.build([str(log)])
    t = report.timeline
    totals = {
        peer: [sum(c[0] for c in b.values()), sum(c[1] for c in b.values())]
        for peer, b in t.peers.items()
    }
    # the watch's ResponseStarted record is not a second request
    assert totals == {"cluster-b": [6, 3], "cluster-c": [2, 1], "system:anonymous": [2, 2]}
    assert t.lo is not None
    assert t.hi is not None
    assert t.hi - t.lo + 1 <= rep.MAX_BUCKETS


def test_timeline_stays_bounded_over_a_long_log(synth):
    """30 days at one request a minute: the buckets grow, the totals stay exact."""
    t = rep.Timeline()
    n = 30 * 24 * 60
    for i in range(n):
        rec = review.parse_record(synth.allowed_list() if i % 10 else synth.denied())
        t.add("cluster-b", rec)
        synth.tick(59)
    assert t.lo is not None
    assert t.hi is not None
    assert t.hi - t.lo + 1 <= rep.MAX_BUCKETS
    assert len(t.peers["cluster-b"]) <= rep.MAX_BUCKETS
    assert t.width_ms >= 30 * 86_400_000 // rep.MAX_BUCKETS
    cells = t.peers["cluster-b"].values()
    assert sum(c[0] for c in cells) == n
    assert sum(c[1] for c in cells) == n // 10


def test_timeline_rows_are_bounded_like_summarize(tmp_path, synth, log_writer, monkeypatch):
    monkeypatch.setattr(review, "MAX_PEERS", 5)
    log = log_writer(tmp_path / "audit.log", [synth.allowed_list(f"peer-{i}") for i in range(12)])
    report = rep.build([str(log)])
    assert set(report.timeline.peers) == set(report.summary.peers)
    assert len(report.timeline.peers) == 6  # five peers, then "(other peers)"
    other = report.timeline.peers[review.OTHER_PEERS]
    assert sum(c[0] for c in other.values()) == 7


def test_filters_are_those_of_summarize(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    only_c = rep.render_html(rep.build([str(log)], Filter(peers=frozenset({"cluster-c"}))))
    assert re.findall(r"<h2>([^<]+)</h2>", only_c) == ["Peers", "cluster-c"]
    assert "peer cluster-c" in only_c
    denied = rep.build([str(log)], Filter(denied_only=True))
    assert denied.summary.peers["cluster-b"].requests == 3
    assert sum(c[0] for c in denied.timeline.peers["cluster-b"].values()) == 3
    since = (review.ev.parse_time(review.normalize_time(synth.clock.isoformat()))) - timedelta(
        seconds=30
    )
    late = rep.build([str(log)], Filter(since=parse_when(ev.format_time(since))))
    assert set(late.summary.peers) == {"system:anonymous"}
    assert set(late.timeline.peers) == {"system:anonymous"}
    empty = rep.render_html(rep.build([str(log)], Filter(peers=frozenset({"nobody"}))))
    assert "No requests match." in empty
    assert not marks(empty)


HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def hostile_records(synth):
    """What a peer (or anyone, unauthenticated) can put into the log through a request."""
    denied = synth.denied(namespace=HOSTILE, resource="configmaps")
    anon = synth.authn_failure(HOSTILE)
    return [synth.allowed_list(), denied, anon]


def test_text_from_the_log_is_escaped(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", hostile_records(synth))
    page = rep.render_html(rep.build([str(log)]))
    assert "<img" not in page
    assert page.count("<script>") == 1  # the page's own
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;" in page


def test_page_is_self_contained_and_pins_its_script_and_style(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    page = rep.render_html(rep.build([str(log)]))
    assert not re.search(r"https?://|src=|href=|@import|url\(", page)
    (csp,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert "default-src 'none'" in csp
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    for body in (script, style):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "'unsafe-inline'" not in csp


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APIPROXY, "audit", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_writes_the_page(tmp_path, synth, log_writer):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    gz = log_writer(tmp_path / "audit.log.1.gz", traffic(synth), compress=True)
    out = tmp_path / "report.html"
    result = run_cli("report", str(gz), str(log), "--peer", "cluster-b", "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "wrote" in result.stderr
    page = out.read_text()
    assert re.findall(r"<h2>([^<]+)</h2>", page) == ["Peers", "cluster-b"]
    assert "12 requests" in section(page, "cluster-b")  # both files
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # like the audit log it comes from
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report-")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "LOG"], "--html is required"),
        (["report", "LOG", "--html", "NODIR/r.html"], "does not exist"),
        (["report", "LOG", "--html", "OUT", "--top", "-1"], "--top: must be at least 0"),
        (["report", "LOG", "--html", "OUT", "--since", "soon"], "cannot read time 'soon'"),
        (["report", "MISSING", "--html", "OUT"], "cannot read "),
    ],
)
def test_cli_errors_are_one_line(tmp_path, synth, log_writer, args, message):
    log = log_writer(tmp_path / "audit.log", traffic(synth))
    subst = {
        "LOG": str(log),
        "OUT": str(tmp_path / "r.html"),
        "NODIR/r.html": str(tmp_path / "nodir" / "r.html"),
        "MISSING": str(tmp_path / "missing.log"),
    }
    result = run_cli(*[subst.get(a, a) for a in args])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "r.html").exists()
