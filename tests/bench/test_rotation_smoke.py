"""bench/rotation.py runs end to end on a small cluster: every informer synced through the proxy,
nothing refused, and the bytes it reports are the pods it listed (no performance thresholds)."""

from __future__ import annotations

import pytest

from tests.bench.conftest import BenchRunner


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rotation_smoke(run_bench: BenchRunner) -> None:
    res = run_bench("bench.rotation", "--pods", "300", "--runs", "1", timeout=280).result
    assert [r["watchList"] for r in res["runs"]] == [False, True]
    for run in res["runs"]:
        assert run["refused"] == 0
        # 300 listed pods + the bench's 10 small and 100 churn pods; ~5.5 kB of JSON each.
        assert run["pods"] == 410
        assert run["pods_bytes"] > 410 * 1000
        assert run["bytes"] > run["pods_bytes"]
        assert run["sync_seconds"] > 0
