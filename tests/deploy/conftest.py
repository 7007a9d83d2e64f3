"""Fixtures for the deploy tests: rendered kustomizations and one checkov run per session.

These need no cluster and no container engine: `kubectl kustomize` renders offline, the
Kubernetes schemas ship with kubernetes-validate, and checkov scans files locally. The exception is
test_image_run.py, which runs the built image with podman against a real kube-apiserver
(container.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
CHECKOV_VERSION = "3.3.30"  # keep equal to the pin in scripts/test

Doc = dict[str, Any]


def kustomizations() -> list[Path]:
    """The base and every overlay: each directory under deploy/ with a kustomization.yaml."""
    found = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
    # Components are only rendered through the overlays that use them.
    return [
        p
        for p in found
        if yaml.safe_load((p / "kustomization.yaml").read_text())["kind"] == "Kustomization"
    ]


def overlay_ids() -> list[str]:
    return [str(p.relative_to(DEPLOY)) for p in kustomizations()]


def overlays() -> list[str]:
    """Installable overlays (the base alone lacks the per-cluster ConfigMap by design)."""
    return [i for i in overlay_ids() if i.startswith("overlays/")]


def tool(name: str) -> str:
    """A tool from the test venv (installed by the `test` extra), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} not found: install the test extra (`pip install -e '.[test]'`)"
    return found


def render(kustomization: Path) -> str:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Rendered:
    name: str
    text: str
    docs: list[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Doc:
        hits = [
            d
            for d in self.of_kind(kind)
            if d["metadata"]["name"] == name
            and (namespace is None or d["metadata"].get("namespace") == namespace)
        ]
        assert len(hits) == 1, f"{self.name}: expected one {kind} {name!r}, found {len(hits)}"
        return hits[0]


@pytest.fixture(scope="session")
def rendered_all() -> dict[str, Rendered]:
    out: dict[str, Rendered] = {}
    for path in kustomizations():
        name = str(path.relative_to(DEPLOY))
        text = render(path)
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f"{name} rendered nothing"
        out[name] = Rendered(name, text, docs)
    return out


@pytest.fixture(params=overlay_ids())
def rendered(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    return rendered_all[request.param]


@pytest.fixture(params=overlays())
def installable(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    return rendered_all[request.param]


def pod_templates(r: Rendered) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod spec) for every workload kind that carries a pod template."""
    for d in r.docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield d, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d, d["spec"]


@dataclass(frozen=True)
class CheckovReport:
    reports: list[Doc]
    files: dict[str, str]  # scanned file -> what it is (overlay name or "Dockerfile")

    def __repr__(self) -> str:  # keep failure output readable
        return f"CheckovReport({[r['summary'] for r in self.reports]})"

    def results(self, kind: str) -> list[Doc]:
        return [c for r in self.reports for c in r["results"].get(kind, [])]


def checkov_binary() -> Path:
    path = REPO / ".venv" / "checkov" / "bin" / "checkov"
    override = os.environ.get("APIPROXY_CHECKOV")
    if override:
        path = Path(override)
    assert path.exists(), (
        f"checkov not found at {path}: ./scripts/test installs it (python3 -m venv "
        f".venv/checkov && .venv/checkov/bin/pip install checkov=={CHECKOV_VERSION})"
    )
    return path


@pytest.fixture(scope="session")
def checkov(
    rendered_all: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory
) -> CheckovReport:
    """One checkov run over every rendered kustomization and the Dockerfile."""
    workdir = tmp_path_factory.mktemp("checkov")
    files: dict[str, str] = {}
    args = [str(checkov_binary())]
    for name, r in rendered_all.items():
        path = workdir / (name.replace("/", "__") + ".yaml")
        path.write_text(r.text)
        files[str(path)] = name
        args += ["--file", str(path)]
    args += ["--file", str(REPO / "Dockerfile")]
    files[str(REPO / "Dockerfile")] = "Dockerfile"
    # --skip-download: no guideline/policy fetch, so the scan runs offline.
    args += ["--framework", "kubernetes", "dockerfile", "--skip-download", "--output", "json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_"))}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        args, capture_output=True, text=True, check=False, timeout=240, cwd=workdir, env=env
    )
    # checkov exits 1 when a check failed; the tests below say which. Anything else is a crash.
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(proc.stdout)
    reports = data if isinstance(data, list) else [data]
    return CheckovReport(reports=reports, files=files)
