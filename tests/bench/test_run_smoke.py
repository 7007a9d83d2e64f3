"""The benchmark harness runs end to end in smoke mode and writes the JSON the README describes.

No performance thresholds here: figures belong in bench/results/, this only keeps the harness
from rotting (every part ran, produced plausible non-zero numbers, and the table was printed).
"""

from __future__ import annotations

import shutil

import pytest

from tests.bench.conftest import CONTENDERS, HAS_NGINX, BenchRunner


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smoke_run_writes_plausible_results(run_bench: BenchRunner) -> None:
    run = run_bench("bench.run", "--smoke")
    assert "targets (medians):" in run.stdout
    res = run.result

    assert res["kind"] == "smoke"
    m = res["machine"]
    for key in ("cpu_model", "cores", "kernel", "python", "aiohttp", "commit"):
        assert m[key], key
    expected = CONTENDERS
    assert res["contenders"] == expected
    if not HAS_NGINX:
        assert any("nginx" in n for n in res["notes"])

    if shutil.which("wrk"):
        for conns in ("1", "4"):
            for name in expected:
                row = res["small_requests"][conns][name]
                assert row["rps"]["median"] > 0
                assert 0 < row["p50_ms"]["median"] <= row["p99_ms"]["median"]
                assert row["requests"] > 0
                assert row["errors"] == 0
    else:
        assert res["small_requests"] == {}

    for key in ("1/max", "1/paced", "5/max", "5/paced"):
        for name in expected:
            row = res["watch"][key][name]
            assert row["events"] > 0, (key, name)
            assert row["events_per_second"]["median"] > 0
            assert 0 < row["latency_p50_ms"]["median"] <= row["latency_p99_ms"]["median"]
            assert 0 < row["delivered_fraction"]["median"] <= 1.0

    for pods in ("300", "600"):
        rows = res["lists"][pods]
        sizes = {rows[name]["bytes"] for name in expected}
        assert len(sizes) == 1, "every contender must return the same LIST body size"
        assert sizes.pop() > 1000 * int(pods)
        assert rows["apiproxy"]["peak_mib"]["median"] > 10

    for n in ("20", "50"):
        row = res["idle_watches"][n]["apiproxy"]
        assert row["per_watch_rss_kib"]["samples"]
        assert row["rss_after_mib"]["median"] > 10

    for rules in ("10", "1000"):
        assert res["policy"][rules]["decisions_per_second"]["median"] > 0

    assert res["targets"], "the targets are evaluated"
    assert {"target", "value", "limit", "met"} <= set(res["targets"][0])
