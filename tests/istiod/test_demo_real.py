"""`scripts/demo --real` (tests/istiod/demo.py) plays its whole story on the real binaries, so the
newcomer's first real run cannot rot unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.istiod import demo
from tests.istiod.mesh import istiod_binary
from tests.real.cluster import assets_dir

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_the_real_demo_plays_every_step_and_cleans_up() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "KUBEBUILDER_ASSETS": str(assets_dir()),
        "ISTIOD": str(istiod_binary()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.istiod.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-3000:]}"
    steps = demo.TOTAL_STEPS
    for n in range(1, steps + 1):
        assert f"\n[{n}/{steps}] " in out, f"step {n} missing:\n{out}"
    assert out.count("\n      ok (") == steps
    assert f"All {steps} steps did what they said" in out
    # Each istiod's view of the other, as its debug endpoints gave it.
    assert len(re.findall(r"/debug/clusterz .*synced, .*synced", out)) == 2
    assert "from cluster-local-" in out
    assert "10.20.0.1:8080, 10.20.0.2:8080" in out
    assert "10.10.0.1:8080, 10.10.0.2:8080" in out
    assert out.count("via gateway 192.0.2.") == 2
    assert out.count("all answered by the empty view") == 2
    # Quiet on success: no component log on the terminal, the work folder removed.
    assert "FAILED" not in out
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
    (work,) = re.findall(r"\(component logs: (\S+)\)", out)
    assert not Path(work).exists()
