"""The istiod benchmark (bench.istiod) runs end to end in smoke mode: two real clusters, a real
istiod reading the peer through apiproxy and then directly. No performance thresholds: this keeps
the harness from rotting (both contenders synced every endpoint, readiness flips were seen, and
the proxy carried the apiproxy run's requests and none of the direct run's)."""

from __future__ import annotations

import pytest

from tests.bench.conftest import BenchRunner


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_istiod_bench_smoke_run_writes_plausible_results(run_bench: BenchRunner) -> None:
    res = run_bench("bench.istiod", "--smoke", timeout=280).result
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
    # The apiproxy run's requests went through the proxy, the direct run's did not touch it.
    assert through["proxy_requests"] > 0
    assert direct["proxy_requests"] == 0
    # Every pod, Service, EndpointSlice, namespace, node and CRD was one initial event at least.
    assert through["events_delivered"] >= 24 + 4 + 4
    assert through["proxy_cpu_s_per_1k_events"] > 0
    summary = res["summary"][size]
    assert set(summary["ratio_apiproxy_to_direct"]) >= {"synced_s", "all_endpoints_s"}
