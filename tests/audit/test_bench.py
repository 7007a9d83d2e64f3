"""The summarize benchmark runs end to end in smoke mode (figures belong in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "audit_summarize.py"


def test_bench_quick_mode_reports_throughput():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"], capture_output=True, timeout=120, check=True
    )
    report = json.loads(result.stdout)
    assert report["records"] == 2000
    assert report["summarizeRecordsPerSecond"] > 0
    assert report["suggestRecordsPerSecond"] > 0
    assert 0 < report["requests"] < report["records"]  # watches have two records, one request
