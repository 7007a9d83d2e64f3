"""bench/filtering.py runs end to end on small lists: every contender answered each LIST, the
filtered ones sent fewer bytes than they read, and a baseline checkout is served from there (no
performance thresholds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bench.conftest import ROOT, BenchRunner


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_filtering_smoke(run_bench: BenchRunner, tmp_path: Path) -> None:
    # A copy of this package as the baseline: the option's plumbing, not a comparison.
    shutil.copytree(ROOT / "apiproxy", tmp_path / "base" / "apiproxy")
    base = str(tmp_path / "base")
    run = run_bench("bench.filtering", "--smoke", "--baseline-checkout", base, timeout=280)
    res = run.result
    assert res["served_from"] == {
        "pass-through": str(ROOT),
        "filtered": str(ROOT),
        "filtered-baseline": base,
    }
    names = {"direct", "pass-through", "filtered", "filtered-baseline"}
    for pods in ("100", "600"):
        by = res["lists"][pods]
        assert set(by) == names
        upstream = by["pass-through"]["bytes_read_upstream"]
        assert by["pass-through"]["bytes_sent"] == upstream
        # istiod-pod drops most of each pod; every pod is visible, so both filtered hops agree.
        assert 0 < by["filtered"]["bytes_sent"] < upstream / 2
        assert by["filtered-baseline"]["bytes_sent"] == by["filtered"]["bytes_sent"]
        assert by["filtered"]["peak_mib"]["median"] > 0
        assert res["ratios"][f"list_{pods}_baseline_mb_per_second_ratio"] > 0
    assert set(res["watches"]) == names
    assert all(w["events"] > 0 for w in res["watches"].values())
