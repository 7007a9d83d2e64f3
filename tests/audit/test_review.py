"""summarize: streaming aggregates over plain, rotated, gzip and stdin logs; filters; bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from apiproxy.audit import review
from apiproxy.audit.review import Filter, TopCounter, parse_when, summarize
from apiproxy.errors import UserError

APIPROXY = str(Path(sys.executable).with_name("apiproxy"))


@pytest.fixture
def records(synth):
    """cluster-b: 2 lists, 1 watch (2 records), 3 denied; cluster-c: 1 list, 1 denied, 1 error;
    one authentication failure."""
    out = [synth.allowed_list(), synth.allowed_list(namespace="istio-system")]
    out += list(synth.watch(seconds=1800, events=10))
    out += [synth.denied(), synth.denied(), synth.denied(verb="list", name="")]
    out += [synth.allowed_list("cluster-c"), synth.denied("cluster-c", resource="secrets")]
    out.append(
        synth.request(
            "cluster-c", "get", "/api/v1/namespaces/a/pods/p", {"resource": "pods"}, code=404
        )
    )
    out.append(synth.authn_failure("token-expired"))
    return out


def check_expected(data: dict) -> None:
    b, c, anon = (
        data["peers"]["cluster-b"],
        data["peers"]["cluster-c"],
        data["peers"]["system:anonymous"],
    )
    assert (b["requests"], b["denied"], b["errors"], b["unauthenticated"]) == (6, 3, 0, 0)
    assert b["bytesSent"] == 2 * 1234 + 50_000 + 3 * 300
    assert b["watches"] == 1
    assert b["watchHours"] == 0.5
    assert b["watchEvents"] == 10
    assert b["unfinishedWatches"] == 0
    assert b["topDenied"][0] == {
        "verb": "get",
        "resource": "configmaps",
        "namespace": "istio-system",
        "count": 2,
    }
    assert b["topDenied"][1]["verb"] == "list"
    assert (c["requests"], c["denied"], c["errors"]) == (3, 1, 1)
    assert c["topDenied"] == [
        {"verb": "get", "resource": "secrets", "namespace": "istio-system", "count": 1}
    ]
    assert (anon["requests"], anon["unauthenticated"], anon["denied"]) == (1, 1, 0)
    assert anon["authnFailures"] == [{"reason": "token-expired", "count": 1}]
    assert data["totals"]["requests"] == 10


def test_summarize_plain(tmp_path, records, log_writer):
    path = log_writer(tmp_path / "audit.log", records)
    summary = summarize([str(path)])
    data = summary.to_dict()
    check_expected(data)
    assert data["records"] == 11  # the watch has two records but counts as one request
    assert data["malformed"] == 0


def test_summarize_rotated_and_gzip_files_equal_one_file(tmp_path, records, log_writer):
    log_writer(tmp_path / "audit.log.2.gz", records[:4], compress=True)
    log_writer(tmp_path / "audit.log.1", records[4:8])
    log_writer(tmp_path / "audit.log", records[8:])
    paths = [str(tmp_path / n) for n in ("audit.log.2.gz", "audit.log.1", "audit.log")]
    data = summarize(paths).to_dict()
    check_expected(data)
    assert data["files"] == paths


def test_a_watch_still_open_at_the_end_counts_as_unfinished(tmp_path, synth, log_writer):
    started, _done = synth.watch()
    data = summarize([str(log_writer(tmp_path / "a.log", [started]))]).to_dict()
    b = data["peers"]["cluster-b"]
    assert (b["requests"], b["watches"], b["unfinishedWatches"]) == (0, 0, 1)


def test_watches_that_ended_in_an_error_are_failed_never_missing_records(
    tmp_path, synth, log_writer
):
    """A log whose watches all have final records, some of them errors (a kube-apiserver's 422
    on a watch), reports no watch without a final record, in JSON, the table and the page."""
    records = []
    for code in (200, 422, 422, 200, 500):
        records += synth.watch(code=code, seconds=360)
    path = log_writer(tmp_path / "audit.log", records)
    summary = summarize([str(path)])
    b = summary.to_dict()["peers"]["cluster-b"]
    assert (b["requests"], b["watches"], b["failedWatches"], b["errors"]) == (5, 2, 3, 3)
    assert b["unfinishedWatches"] == 0
    assert b["watchHours"] == 0.2  # the failed ones are not watch time
    table = review.render_table(summary)
    assert "3 watch(es) ended in an error" in table
    assert "final record" not in table
    out = tmp_path / "report.html"
    subprocess.run(
        [APIPROXY, "audit", "report", str(path), "--html", str(out)], check=True, timeout=60
    )
    page = out.read_text()
    assert "3 ended in an error" in page
    assert "without a final record" not in page


def test_unfinished_is_a_started_watch_whose_audit_id_has_no_final_record(
    tmp_path, synth, log_writer
):
    """Matched by audit ID, not by counts: one open watch and one failed watch are one of each,
    whichever file is read first (a rotated file after the newer one)."""
    open_started, _ = synth.watch()
    failed_started, failed_done = synth.watch(code=422)
    ok_started, ok_done = synth.watch()
    newer = log_writer(tmp_path / "audit.log", [ok_done, failed_done, open_started])
    older = log_writer(tmp_path / "audit.log.1", [failed_started, ok_started])
    for order in ([older, newer], [newer, older]):
        data = summarize([str(p) for p in order]).to_dict()
        b = data["peers"]["cluster-b"]
        assert (b["watches"], b["failedWatches"], b["unfinishedWatches"]) == (1, 1, 1), order
        assert data["totals"]["unfinishedWatches"] == 1
        assert "1 watch(es) started without a final record" in review.render_table(
            summarize([str(p) for p in order])
        )


def test_a_kube_apiserver_log_counts_panic_as_final_and_skips_request_received(
    tmp_path, synth, log_writer
):
    started, done = synth.watch()
    received = dict(started, stage="RequestReceived", responseStatus={"metadata": {}})
    panicked = dict(done, stage="Panic", responseStatus={"metadata": {}, "code": 500})
    data = summarize([str(log_writer(tmp_path / "a.log", [received, started, panicked]))])
    b = data.to_dict()["peers"]["cluster-b"]
    assert data.stats.malformed == 0
    assert (b["requests"], b["failedWatches"], b["unfinishedWatches"]) == (1, 1, 0)


def test_malformed_lines_are_counted_never_fatal(tmp_path, synth, log_writer):
    good = synth.allowed_list()
    bad_type = dict(synth.allowed_list(), responseStatus={"code": "200"})
    bad_time = dict(synth.allowed_list(), requestReceivedTimestamp="yesterday")
    lines = [
        "not json {",
        json.dumps({"kind": "Pod", "apiVersion": "v1"}),
        "[1, 2]",
        json.dumps(bad_type),
        json.dumps(bad_time),
        good,
        "",
        "x" * (review.MAX_LINE + 10),
    ]
    path = log_writer(tmp_path / "audit.log", lines)
    data = summarize([str(path)]).to_dict()
    assert data["malformed"] == 6
    assert data["records"] == 1
    assert data["peers"]["cluster-b"]["requests"] == 1
    assert data["malformedExamples"][0] == f"{path}:1: not JSON"
    assert data["malformedExamples"][3].startswith(f"{path}:4: malformed Event")
    assert len(data["malformedExamples"]) == review.MAX_MALFORMED_EXAMPLES


def test_truncated_gzip_is_reported_not_fatal(tmp_path, records, log_writer):
    full = log_writer(tmp_path / "full.gz", records * 50, compress=True).read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full[: len(full) // 2])
    data = summarize([str(cut)]).to_dict()
    assert data["malformed"] >= 1
    assert "unreadable" in data["malformedExamples"][-1]
    assert data["records"] > 0


def test_filters(tmp_path, records, log_writer):
    path = str(log_writer(tmp_path / "audit.log", records))
    only_c = summarize([path], Filter(peers=frozenset({"cluster-c"}))).to_dict()
    assert list(only_c["peers"]) == ["cluster-c"]
    denied = summarize([path], Filter(denied_only=True)).to_dict()
    assert denied["peers"]["cluster-b"]["requests"] == 3
    assert denied["peers"]["cluster-c"]["requests"] == 1  # the 404 is an error, not a refusal
    assert denied["peers"]["system:anonymous"]["requests"] == 1
    # records[4] is the first denial; its received time starts the window.
    since = records[4]["requestReceivedTimestamp"]
    until = records[7]["requestReceivedTimestamp"]
    window = summarize([path], Filter(since=since, until=until)).to_dict()
    assert window["peers"]["cluster-b"]["requests"] == 3
    assert window["peers"]["cluster-b"]["denied"] == 3
    assert "cluster-c" not in window["peers"]


def test_parse_when():
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_when("2h", now) == "2026-11-26T10:00:00.000000Z"
    assert parse_when("1h30m", now) == "2026-11-26T10:30:00.000000Z"
    assert parse_when("7d", now) == "2026-11-19T12:00:00.000000Z"
    assert parse_when("2026-11-26T02:12:31+01:00") == "2026-11-26T01:12:31.000000Z"
    assert parse_when("2026-11-26") == "2026-11-26T00:00:00.000000Z"
    with pytest.raises(UserError, match="cannot read time"):
        parse_when("2 hours ago")


def test_top_counter_stays_bounded_and_keeps_heavy_hitters():
    top = TopCounter(cap=100)
    for i in range(5000):
        top.add(("get", "configmaps", "hot"))
        top.add(("get", f"r{i}", "cold"))
    assert len(top.counts) <= 100
    assert top.approximate
    assert top.top(1) == [(("get", "configmaps", "hot"), 5000)]


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [APIPROXY, "audit", *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def test_cli_table_json_and_stdin(tmp_path, records, log_writer):
    plain = log_writer(tmp_path / "audit.log", records)
    table = run_cli("summarize", str(plain))
    assert table.returncode == 0, table.stderr
    out = table.stdout.decode()
    assert out.splitlines()[0].split()[:4] == ["PEER", "REQUESTS", "DENIED", "UNAUTH"]
    row = next(line for line in out.splitlines() if line.startswith("cluster-b "))
    assert row.split()[1:4] == ["6", "3", "0"]
    assert "Top refused requests of cluster-b:" in out
    gz = log_writer(tmp_path / "audit.log.1.gz", records, compress=True)
    for stdin in (plain.read_bytes(), gz.read_bytes()):
        result = run_cli("summarize", "-", "--output", "json", stdin=stdin)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        check_expected(data)
        assert data["files"] == ["<stdin>"]


def test_cli_errors_are_one_line(tmp_path):
    missing = run_cli("summarize", str(tmp_path / "nope.log"))
    assert missing.returncode == 2
    err = missing.stderr.decode()
    assert err.count("\n") == 1
    assert err.startswith("apiproxy audit: error: cannot read ")
    bad = run_cli("summarize", "--since", "soon", str(tmp_path / "x"))
    assert bad.returncode == 2
    assert "cannot read time 'soon'" in bad.stderr.decode()


def test_gzip_detected_by_content_not_name(tmp_path, records):
    path = tmp_path / "audit.log.3"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    check_expected(summarize([str(path)]).to_dict())
