"""Command-line tools the test extra installs into the venv (e.g. `kubectl`).

Tests run them by their path beside the interpreter, never from PATH: the test command does not put
`.venv/bin` on PATH, and a system copy of another version must not be what a test exercises.
"""

from __future__ import annotations

import sys
from pathlib import Path


def venv_tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} missing: install the test extra (`pip install -e '.[test]'`)"
    return str(path)


KUBECTL = venv_tool("kubectl")
