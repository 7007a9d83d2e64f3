"""What the bench smoke tests share: running one bench entry point as the README says, and
reading back the results it wrote. No performance thresholds: figures belong in bench/results/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import harness

ROOT = Path(__file__).resolve().parents[2]
HAS_NGINX = harness.nginx_exe() is not None
# The contenders bench.run and bench.real start: nginx only where it is installed.
CONTENDERS = ["direct", "nginx", "apiproxy"] if HAS_NGINX else ["direct", "apiproxy"]


@dataclass
class BenchRun:
    stdout: str
    stderr: str
    result: dict[str, Any]  # the JSON it wrote to --out
    out: Path


BenchRunner = Callable[..., BenchRun]


@pytest.fixture
def run_bench(tmp_path: Path) -> BenchRunner:
    """`run_bench("bench.run", "--smoke")`: `python -m MODULE ARGS --out <tmp>/<module>.json`
    from the checkout; asserts it exited 0 (else shows the end of its stderr)."""

    def run(module: str, *args: str, timeout: float = 380) -> BenchRun:
        out = tmp_path / f"{module.rpartition('.')[2]}.json"
        # Its own session: a bench that overruns is stopped with everything it started
        # (servers, clusters, istiod), not just its own process.
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--out", str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        return BenchRun(stdout, stderr, json.loads(out.read_text()), out)

    return run
