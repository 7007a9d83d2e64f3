"""Command-line tools the test extra installs into the venv (e.g. `kubectl`).

Tests run them by their path beside the interpreter, never from PATH: the test command does not put
`.venv/bin` on PATH, and a system copy of another version must not be what a test exercises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def venv_tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} missing: install the test extra (`pip install -e '.[test]'`)"
    return str(path)


KUBECTL = venv_tool("kubectl")


def built_tool(env: str, script: str) -> Path:
    """What the variable `env` names, else what `scripts/<script>` prints: the project's scripts
    build a tool once (kube-apiserver and etcd, the client-go program) and print its cached path.
    A failed build fails the test loudly, never skips it."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    done = subprocess.run(
        [str(ROOT / "scripts" / script)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"scripts/{script} failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip())
