"""The production wheel (`pip wheel .`, as the Dockerfile builds it) carries the product only: no
simulated kube-apiserver, no demo. Installed alone, `apiproxy sim` and `apiproxy demo` say in one
line that they are development tools, and the product commands still work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` on a copy of the whole checkout (dev/, tests/, bench/ included), so that
    packaging must leave them out; the copy keeps build/ and egg-info out of the checkout."""
    src = tmp_path_factory.mktemp("checkout") / "apiproxy"
    junk = (".venv", ".git", "*_cache", "__pycache__", "*.egg-info", "build", "dist", ".hypothesis")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*junk))
    assert (src / "dev" / "apiproxy_dev" / "sim" / "server.py").is_file()
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(out),
            src,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("apiproxy-*.whl")
    return built


def test_the_wheel_holds_the_product_and_no_development_tool(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert {"apiproxy/cli.py", "apiproxy/server.py", "apiproxy/federation/controller.py"} <= modules
    assert "apiproxy/federation/crd.yaml" in names
    dev = [n for n in names if "sim" in n.split("/") or "demo" in n or n.startswith("apiproxy_dev")]
    assert dev == []
    assert all(n.startswith(("apiproxy/", "apiproxy-")) for n in names), names


@pytest.fixture(scope="module")
def production(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked on its own (a pure-Python wheel installs by unpacking)."""
    target = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(target)
    return target


def _run(production: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -S: no site processing, so the checkout's editable installs (apiproxy, apiproxy-dev) are
    # invisible; the dependencies come from this venv's site-packages, apiproxy from the wheel.
    path = f"{production}:{sysconfig.get_paths()['purelib']}"
    return subprocess.run(
        [sys.executable, "-S", "-m", "apiproxy", *args],
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
        cwd=production.parent,  # neither the checkout nor the unpacked wheel
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["sim", "demo"])
def test_development_commands_say_so_in_a_production_install(
    production: Path, command: str
) -> None:
    out = _run(production, command)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"apiproxy {command}: error: a development tool, not part of this installation "
        "(from a checkout: pip install -e ./dev)"
    ]
    assert out.stdout == ""


def test_product_commands_work_from_the_production_install(production: Path) -> None:
    where = _run(production, "policy", "--help")
    assert where.returncode == 0, where.stderr
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import apiproxy; print(apiproxy.__file__)"],
        env={"PYTHONPATH": f"{production}:{sysconfig.get_paths()['purelib']}"},
        cwd=production.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.startswith(f"{production}/apiproxy/")
    assert _run(production, "federate", "--bogus").returncode == 2
