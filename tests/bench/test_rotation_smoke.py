"""bench/rotation.py runs end to end on a small cluster: every informer synced through the proxy,
nothing refused, and the bytes it reports are the pods it listed (no performance thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rotation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "rotation.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rotation", "--pods", "300", "--runs", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["watchList"] for r in res["runs"]] == [False, True]
    for run in res["runs"]:
        assert run["refused"] == 0
        # 300 listed pods + the bench's 10 small and 100 churn pods; ~5.5 kB of JSON each.
        assert run["pods"] == 410
        assert run["pods_bytes"] > 410 * 1000
        assert run["bytes"] > run["pods_bytes"]
        assert run["sync_seconds"] > 0
