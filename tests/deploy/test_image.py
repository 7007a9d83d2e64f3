"""The Dockerfile, checked without a container engine: hadolint, the build context, the pins."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO, tool

DOCKERFILE = REPO / "Dockerfile"
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
BUILD_LOCK = REPO / "requirements" / "build.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


INSTR = instructions(DOCKERFILE.read_text())


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in INSTR:
        if op == "FROM":
            result.append([])
        result[-1].append((op, args))
    return result


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_hadolint_is_clean() -> None:
    proc = run_hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    proc = run_hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # :latest


def test_base_image_is_an_exact_release_and_the_same_in_every_stage() -> None:
    froms = [args for op, args in INSTR if op == "FROM"]
    assert len(froms) == 2, "multi-stage: build and runtime"
    images = {f.split()[0] for f in froms}
    assert len(images) == 1, f"stages use different base images: {images}"
    (image,) = images
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image


def test_runtime_stage_is_non_root_read_only_ready_and_runs_apiproxy() -> None:
    runtime = stages()[-1]
    users = [args for op, args in runtime if op == "USER"]
    assert users == ["65532:65532"], "numeric non-root user, so runAsNonRoot can verify it"
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert [args for op, args in runtime if op == "ENTRYPOINT"] == ['["apiproxy"]']
    runs = " ".join(args for op, args in INSTR if op == "RUN")
    assert runs.count("compileall") == 2, "bytecode compiled at build time (app and stdlib)"
    # Nothing in the runtime stage installs packages: no pip, no apt.
    assert not [a for op, a in runtime if op == "RUN" and re.search(r"\b(pip|apt|apk)\b", a)]


def test_dependencies_are_installed_hash_checked_from_the_locks() -> None:
    runs = [args for op, args in INSTR if op == "RUN"]
    installs = [r for r in runs if " install " in f" {r} " and " -r " in r]
    assert len(installs) == 2
    for cmd in installs:
        words = shlex.split(cmd)
        assert "--require-hashes" in words, cmd
        assert "--only-binary=:all:" in words, cmd
    assert "--no-build-isolation" in " ".join(runs), "no unpinned build backend download"


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        ):
            excluded = not negate
    return excluded


def copy_sources() -> list[str]:
    out: list[str] = []
    for op, args in INSTR:
        if op != "COPY" or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        out += words[:-1]
    return out


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    sources = copy_sources()
    assert {"pyproject.toml", "apiproxy", "requirements/runtime.txt"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not dockerignore_excludes(src), f"COPY {src}: excluded by .dockerignore"
    assert (REPO / "apiproxy" / "cli.py").exists()
    assert not dockerignore_excludes("apiproxy/cli.py")


def test_dockerignore_keeps_the_rest_out() -> None:
    for path in (
        ".venv/bin/python",
        "tests/conftest.py",
        ".git/config",
        "deploy/base/x.yaml",
        "dev/apiproxy_dev/sim/server.py",  # development tools never reach the image
        "dev/pyproject.toml",
    ):
        assert dockerignore_excludes(path), path
    assert dockerignore_excludes("apiproxy/__pycache__/cli.cpython-311.pyc")


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from a pip-compile --generate-hashes file."""
    text = path.read_text().replace("\\\n", " ")
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"{path.name}: not an exact pin: {line[:80]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        out[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return out


@pytest.mark.parametrize("path", [RUNTIME_LOCK, BUILD_LOCK], ids=["runtime", "build"])
def test_locks_pin_every_package_with_hashes(path: Path) -> None:
    pins = locked(path)
    assert pins
    for name, (_, hashes) in pins.items():
        assert hashes, f"{path.name}: {name} has no hash"


def test_runtime_lock_satisfies_pyproject_and_holds_runtime_deps_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked(RUNTIME_LOCK)
    for spec in project["dependencies"]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in requirements/runtime.txt"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{req.name}=={pins[name][0]} does not satisfy {req.specifier}: regenerate the lock "
            "(docs/deploy.md)"
        )
    test_only = {
        canonicalize_name(Requirement(s).name) for s in project["optional-dependencies"]["test"]
    }
    assert not test_only & pins.keys(), "test dependencies leaked into the runtime lock"


def test_build_lock_provides_the_build_backend() -> None:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = locked(BUILD_LOCK)
    for spec in requires:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, name
        assert req.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} vs {req.specifier}"
