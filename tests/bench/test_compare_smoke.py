"""bench.compare runs end to end in smoke form: every contender in every scenario, real figures.

No performance thresholds (figures belong in bench/results/); this keeps the harness honest in
shape: each contender answered every scenario, the LIST bodies are byte-identical in size, the
JWT-checking hops refuse a wrong token, and the table and goals are written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bench import compare, harness
from tests.bench.conftest import BenchRunner

NAMES = ["direct", "nginx", "go", "go+jwt", "apiproxy"]


def _have_go() -> bool:
    return Path(sys.executable).with_name("go").exists() or shutil.which("go") is not None


needs_tools = pytest.mark.skipif(
    not (_have_go() and harness.nginx_exe() and shutil.which("wrk")),
    reason="needs go (pip install -e '.[bench]'), nginx and wrk (scripts/ensure-tools)",
)


@pytest.mark.slow
@pytest.mark.timeout(400)
@needs_tools
def test_compare_smoke_writes_the_issue_table(run_bench: BenchRunner) -> None:
    run = run_bench("bench.compare", "--smoke")
    res, out = run.result, run.out
    assert res["kind"] == "smoke"
    assert res["contenders"] == NAMES
    assert res["loadavg_start"]
    assert res["loadavg_end"]
    rows = res["rows"]
    for name in NAMES:
        row = rows[name]
        assert row["small_get_rps"]["median"] > 0, name
        assert row["small_get_errors"] == 0, name
        assert row["watch_events_per_second"]["median"] > 0, name
        assert row["paced_p99_ms"]["median"] > 0, name
        assert row["paced_delivered_fraction"]["median"] == pytest.approx(1.0), name
        assert row["list_mb_per_second"]["median"] > 0, name
    for name in NAMES[1:]:
        assert rows[name]["idle_kib_per_watch_rss"]["samples"], name
        held = res["raw"]["idle"][name][0]["upstream_watchers"]
        assert held == res["sizes"]["idle_watches"], name
    for r in res["raw"]["list"].values():
        assert r[0]["bytes"] == res["fixtures"]["list_bytes"] > 1e6
    assert rows["nginx"]["small_get_ratio_to_nginx"] == 1.0
    assert rows["direct"]["watch_ratio_to_direct"] == 1.0
    assert {g["goal"] for g in res["goals"]} >= {"LIST /nginx >= 0.9"}
    table = out.with_suffix(".md").read_text()
    assert "| **apiproxy** |" in table
    assert "Load average" in table


@pytest.mark.timeout(120)
@needs_tools
def test_go_jwt_hop_refuses_a_token_it_cannot_verify(tmp_path: Path) -> None:
    """The go+jwt contender really checks: a token signed by another key is refused."""
    import http.client
    import ssl

    bench = compare.Compare(compare.SMOKE, tmp_path)
    try:
        bench.start_upstreams()
        bench.start_go_hop("go+jwt", jwt=True)
        hop = bench.hops[-1].contender
        ctx = ssl.create_default_context(cafile=str(bench.ca_file))

        host, _, port = hop.url.removeprefix("https://").partition(":")

        def get(token: str) -> int:
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
            try:
                conn.request(
                    "GET", harness.SMALL_PATH, headers={"Authorization": f"Bearer {token}"}
                )
                resp = conn.getresponse()
                resp.read()
                return resp.status
            finally:
                conn.close()

        assert get(bench.jwt) == 200
        head, payload, sig = bench.jwt.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}AAAA"
        assert get(forged) == 401
        assert get(bench.upstream_token) == 401
    finally:
        bench.close()
