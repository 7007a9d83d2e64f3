"""`apiproxy demo`: the whole two-cluster story runs, narrates every step, and fails loudly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apiproxy.errors import UserError
from apiproxy_dev import demo

STEPS = demo.TOTAL_STEPS
POLICY = Path(__file__).resolve().parents[2] / "policies" / "istio-remote.yaml"


def log_lines(text: str) -> list[str]:
    """Lines that are a component's log record (JSON with an event name), wherever they are."""
    found = []
    for line in text.splitlines():
        try:
            obj = json.loads(line.strip())
        except ValueError:
            continue
        if isinstance(obj, dict) and "event" in obj:
            found.append(line)
    return found


def _audit_row(stdout: str, peer: str) -> dict[str, str]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["PEER", "REQUESTS"])
    columns = lines[header].split()
    for line in lines[header + 1 :]:
        cells = line.split()
        if cells and cells[0] == peer:
            # BYTES is two words ("101.2 KiB"): rejoin it.
            cells = [*cells[:5], " ".join(cells[5:7]), *cells[7:]]
            return dict(zip(columns, cells, strict=True))
    raise AssertionError(f"no audit summary row for {peer}:\n{stdout}")


@pytest.mark.slow
def test_demo_plays_the_whole_story() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apiproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "FAILED" not in out
    # The story alone: the components' logs (the refused anonymous request and the first
    # metadata fetches are expected warnings) went to components.log, not to the terminal.
    assert err == ""
    assert log_lines(out) == []
    assert "log lines" not in out
    for n in range(1, STEPS + 1):
        assert f"\n[{n}/{STEPS}] " in out, f"step {n} missing:\n{out}"
    assert out.count("\n      ok (") == STEPS
    assert f"All {STEPS} steps did what they said" in out

    # Concrete facts, not just headings.
    uuids = re.findall(r"cluster UUID \(kube-system uid\) ([0-9a-f-]{36})", out)
    assert len(set(uuids)) == 2
    assert "label istio/multiCluster=true" in out
    assert re.search(r"annotation networking\.istio\.io/cluster=cluster-local-\d+", out)
    assert "peers: cluster-b" in out
    assert "peers: cluster-a" in out
    assert "- pem: |" in out
    assert "-----BEGIN CERTIFICATE-----" in out
    assert re.search(r"endpoints discovered: 12 ready", out)
    live = re.search(r"got ADDED (ns-0/app-0-7d4b9c8f6d-\w{5}) ([\d.]+) ms after creation", out)
    assert live, out
    assert "13 in total" in out
    # Secrets: the shipped policy's empty view, although cluster-b holds some; writes refused.
    held = re.search(
        r"GET /api/v1/secrets -> 200, an empty SecretList \(cluster-b holds (\d+)", out
    )
    assert held, out
    assert int(held.group(1)) >= 1
    assert re.search(
        r"GET /api/v1/namespaces/apiproxy-system/secrets/apiproxy-identity -> 404 NotFound: "
        r'secrets "apiproxy-identity" not found',
        out,
    )
    assert re.search(
        r"DELETE /api/v1/namespaces/apiproxy-system/secrets/apiproxy-identity -> 403 Forbidden: "
        r'secrets "apiproxy-identity" is forbidden: User "peer:cluster-a" cannot delete',
        out,
    )

    # The audit summary lists the peer with its refusals and finished watches.
    row = _audit_row(out, "cluster-a")
    assert int(row["DENIED"]) >= 1
    assert int(row["WATCHES"]) >= 3
    assert "Top refused requests of cluster-a:" in out

    # Nothing secret reached the terminal; the temporary directory is gone.
    for text in (out, err):
        assert "PRIVATE KEY" not in text
        assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.", text)
    files = re.search(r"files in (\S+)\)", out)
    assert files
    assert not Path(files.group(1)).exists()


@pytest.mark.slow
def test_a_policy_granting_secrets_fails_the_refusal_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    permissive = tmp_path / "permissive.yaml"
    permissive.write_text(
        POLICY.read_text()
        + """
  - name: oops-secrets
    peers: ["*"]
    apiGroups: [""]
    resources: [secrets]
    verbs: [get, list]
    dangerous: true
"""
    )
    code = demo.main(["--policy", str(permissive), "--keep"], prog="apiproxy demo")
    out = capsys.readouterr().out
    kept = re.search(r"Files kept in (\S+)", out)
    assert kept, out
    try:
        assert code == 1
        assert "FAILED: step 11: GET /api/v1/secrets was not hidden" in out
        assert "lets peers read secrets" in out
        assert f"[{STEPS}/{STEPS}]" not in out
        assert "All 12 steps" not in out
        assert (Path(kept.group(1)) / "cluster-b" / "audit.log").is_file()
        # The failure shows the components' last log lines, after the story, and their file.
        story, _, tail = out.partition("FAILED: step 11")
        assert log_lines(story) == []
        pointer = re.search(r"The components' last (\d+) log lines \(all: (\S+)\):", tail)
        assert pointer, tail
        assert pointer.group(2) == str(Path(kept.group(1)) / demo.COMPONENTS_LOG)
        assert Path(pointer.group(2)).is_file()
        assert len(log_lines(tail)) == int(pointer.group(1)) > 0
    finally:
        shutil.rmtree(kept.group(1), ignore_errors=True)


def test_the_overall_timeout_names_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    code = demo.main(["--timeout", "0.01"], prog="apiproxy demo")
    captured = capsys.readouterr()
    out = captured.out
    files = re.search(r"files in (\S+)\)", out)
    assert files
    try:
        assert code == 1
        assert re.search(r"FAILED: step \d+: not finished within --timeout 0.01 s", out), out
        # A failed run keeps its files, for the components' log it points at.
        assert f"Files kept in {files.group(1)}" in out
        assert (Path(files.group(1)) / demo.COMPONENTS_LOG).is_file()
        assert captured.err == ""
    finally:
        shutil.rmtree(files.group(1), ignore_errors=True)


def test_bad_flags_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--timeout: must be at least"):
        demo.main(["--timeout", "0"], prog="apiproxy demo")
    with pytest.raises(UserError, match=r"--policy: .* no such file"):
        demo.main(["--policy", str(tmp_path / "missing.yaml")], prog="apiproxy demo")
