"""scripts/ensure-tools installs exactly the missing Debian packages, waiting for the dpkg lock,
and does nothing on a prepared machine. dpkg-query, apt-get and sudo are replaced by recording
stand-ins on PATH: what is tested is the script's decisions, not apt."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import REPO

SCRIPT = REPO / "scripts" / "ensure-tools"


def stand_ins(tmp_path: Path, installed: set[str]) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    listed = " ".join(sorted(installed))
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\n"
        'for p in "$@"; do last="$p"; done\n'
        f'case " {listed} " in *" $last "*) printf "install ok installed";; *) exit 1;; esac\n'
    )
    for tool in ("apt-get", "sudo"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, calls


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_prepared_machine_installs_nothing(tmp_path: Path) -> None:
    env, calls = stand_ins(
        tmp_path,
        {
            "prometheus",
            "chromium",
            "fonts-dejavu-core",
            "nginx",
            "wrk",
            "podman",
            "runc",
            "mmdebstrap",
        },
    )
    proc = run(env)
    assert proc.returncode == 0, proc.stderr
    assert not calls.exists()


def test_only_missing_packages_are_installed_waiting_for_the_lock(tmp_path: Path) -> None:
    env, calls = stand_ins(
        tmp_path,
        {"chromium", "fonts-dejavu-core", "nginx", "wrk", "podman", "runc", "mmdebstrap"},
    )
    proc = run(env)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    apt = [line for line in lines if "apt-get " in line]  # directly, or through sudo (non-root)
    assert len(apt) == 2
    assert all("-o DPkg::Lock::Timeout=600" in line for line in apt)
    assert apt[0].endswith(" update")
    assert apt[1].endswith("install -y --no-install-recommends prometheus")
    assert "installing prometheus" in proc.stderr


def test_named_packages_only(tmp_path: Path) -> None:
    """scripts/image asks for its own tools by name, not for the test suite's whole list."""
    env, calls = stand_ins(tmp_path, {"runc"})
    proc = subprocess.run(
        [str(SCRIPT), "podman", "runc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    apt = [line for line in calls.read_text().splitlines() if "apt-get " in line]
    assert apt[-1].endswith("install -y --no-install-recommends podman")
