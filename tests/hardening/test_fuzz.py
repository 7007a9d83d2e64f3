"""The coverage-guided fuzzer (atheris) runs the classifier for a fixed number of inputs in the
suite (a count, not a time: how fast it goes is no test's business).

Long run: `.venv/bin/python fuzz/classify_fuzz.py -dict=fuzz/classify.dict -max_total_time=600
/tmp/corpus fuzz/seeds` (see docs/security-testing.md).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apiproxy.request
from apiproxy.request import RequestRejected

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz" / "classify_fuzz.py"
RUNS = int(os.environ.get("HARDENING_FUZZ_RUNS", "20000"))


def _load_harness_check():  # type: ignore[no-untyped-def]
    """The harness's property function, importable without atheris (for the fallback)."""
    sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("atheris") is None:
        return None
    spec = importlib.util.spec_from_file_location("classify_fuzz", FUZZ)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_fuzzes_the_classifier_without_findings(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "seeds", corpus)
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ),
            f"-dict={ROOT / 'fuzz' / 'classify.dict'}",
            f"-runs={RUNS}",
            "-max_total_time=600",  # a hang guard only
            "-print_final_stats=1",
            "-timeout=5",
            "-rss_limit_mb=1024",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=660,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    print(f"atheris: {runs} runs")
    assert runs >= RUNS, out[-2000:]  # it really ran them all
    assert not list(tmp_path.glob("crash-*"))


def test_the_harness_catches_a_planted_classifier_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is not vacuous: a classifier that decodes %2F like a lax proxy is caught."""
    check = _load_harness_check()
    if check is None:
        pytest.skip("atheris not installed")
    real = apiproxy.request.classify

    def lax(method: str, target: str) -> apiproxy.request.RequestInfo:
        return real(method, target.replace("%2F", "/"))

    check("GET", "/api/v1/namespaces/x/pods%2Fp")  # the real classifier refuses it
    module_globals = check.__globals__
    monkeypatch.setitem(module_globals, "classify", lax)
    with pytest.raises(AssertionError):
        check("GET", "/api/v1/namespaces/x/pods%2Fp")
    with pytest.raises(RequestRejected):
        real("GET", "/api/v1/namespaces/x/pods%2Fp")
