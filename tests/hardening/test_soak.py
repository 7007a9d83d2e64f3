"""A short soak through the real `apiproxy serve` (bench/soak.py): open watches plus a steady
request rate, no errors, a clean exit. Throughput and memory growth are figures of the long run, a
documented command (docs/security-testing.md), never thresholds here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_has_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--watches=200",
            "--rate=20",
            "--duration=10",
            "--interval=5",
            "--pods=100",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads(out.read_text())
    assert summary["watches_open_at_end"] == 200
    assert summary["watch_errors"] == 0
    assert summary["request_errors"] == 0
    assert summary["requests"] > 0
    assert summary["watch_events"] > 0
    assert summary["proxy_exit_code"] == 0  # SIGTERM ends it cleanly with 200 watches open
    assert summary["proxy_rss_mib_last"] > 0  # measured (judged by the long run, not here)
