"""Where the policies shipped in `policies/` are: the checkout (editable installs) or the
`share/apiproxy/policies` data directory a wheel installs them into."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def shipped_policy_dirs() -> list[Path]:
    return [
        Path(__file__).resolve().parents[2] / "policies",
        Path(sysconfig.get_path("data")) / "share" / "apiproxy" / "policies",
        Path(sys.prefix) / "share" / "apiproxy" / "policies",
    ]


def shipped_policy(name: str) -> Path:
    """The first existing `policies/<name>`; the checkout's path when none exists, so an error
    message names a path the operator recognises."""
    candidates = [d / name for d in shipped_policy_dirs()]
    return next((c for c in candidates if c.is_file()), candidates[0])
