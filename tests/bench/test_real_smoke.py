"""The real-upstream benchmark (bench.real) runs end to end in smoke mode against a real etcd +
kube-apiserver. No performance thresholds: this keeps the harness from rotting (every contender
ran every part, the numbers are plausible, both LIST encodings were really used)."""

from __future__ import annotations

import pytest

from tests.bench.conftest import CONTENDERS, BenchRunner


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_real_upstream_smoke_run_writes_plausible_results(run_bench: BenchRunner) -> None:
    res = run_bench("bench.real", "--smoke").result
    assert "error" not in res
    assert res["kind"] == "real-smoke"
    assert res["upstream"]["pods"] == 10 + 20 + 300  # small + churn + the LIST namespaces
    expected = CONTENDERS
    assert res["contenders"] == expected

    for key in ("1/max", "1/paced", "5/max", "5/paced"):
        for name in expected:
            row = res["watch"][key][name]
            assert row["events"] > 0, (key, name)
            assert 0 < row["latency_p50_ms"]["median"] <= row["latency_p99_ms"]["median"]
            assert 0 < row["delivered_fraction"]["median"] <= 1.0

    for pods in ("100", "300"):
        raw = {name: res["lists"][pods][name]["bytes"] for name in expected}
        gz = {name: res["lists_gzip"][pods][name]["bytes"] for name in expected}
        # Every contender got the same list (a resourceVersion's digits may differ by a few bytes).
        assert max(raw.values()) - min(raw.values()) < 64, raw
        assert min(raw.values()) > 2000 * int(pods)  # Istio-injected pods with managedFields
        # gzip was asked for and kube-apiserver compressed: the hops passed it through as is.
        assert all(gz[name] < raw[name] / 3 for name in expected), (gz, raw)
        assert res["lists"][pods]["apiproxy"]["peak_mib"]["median"] > 10
