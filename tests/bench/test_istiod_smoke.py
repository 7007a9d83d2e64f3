"""The istiod benchmark (bench.istiod) runs end to end in smoke mode: two real clusters, a real
istiod reading the peer through apiproxy and then directly. No performance thresholds: this keeps
the harness from rotting (both contenders synced every endpoint, readiness flips were seen, and
the proxy carried the apiproxy run's watch events and none of the direct run's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_istiod_bench_smoke_run_writes_plausible_results(tmp_path: Path) -> None:
    out = tmp_path / "istiod-smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.istiod", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert "error" not in res
    assert res["kind"] == "istiod-smoke"
    (size,) = res["runs"]
    assert size == "20"
    for contender in ("apiproxy", "direct"):
        (run,) = res["runs"][size][contender]
        sync = run["sync"]
        # 20 pods plus the churn Service's 4, every one held by istiod as a ready endpoint.
        assert sync["endpoints"] == 24
        assert 0 < sync["synced_s"] <= sync["all_endpoints_s"]
        churn = run["churn"]
        assert churn["flips"] > 0
        assert churn["seen"] > 0
        assert churn["never_seen"] == 0
        assert 0 < churn["delay_p50_ms"] <= churn["delay_p99_ms"]
        assert churn["background_patches"] > 0
    through = res["runs"][size]["apiproxy"][0]["run"]
    direct = res["runs"][size]["direct"][0]["run"]
    # The apiproxy run's watches went through the proxy (initial events of 24 pods at least),
    # the direct run's did not touch it.
    assert through["proxy_watch_events"] >= 24
    assert through["proxy_cpu_s_per_1k_events"] > 0
    assert direct["proxy_watch_events"] == 0
    summary = res["summary"][size]
    assert set(summary["ratio_apiproxy_to_direct"]) >= {"synced_s", "all_endpoints_s"}
