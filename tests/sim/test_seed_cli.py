"""Seeding, churn, and the standalone `apiproxy sim` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from apiproxy_dev.sim import SimAPIServer, Store
from apiproxy_dev.sim.seed import Churn, seed
from tests.tools import KUBECTL


def test_seeded_objects_are_realistic() -> None:
    store = Store()
    out = seed(store, pods=300, namespaces=3, services_per_namespace=2)
    assert out.pods == 300
    assert out.services == 6
    assert out.nodes == 3
    pods = store.list("pods")
    assert len(pods) == 300
    sizes = [len(json.dumps(p)) for p in pods[:20]]
    assert all(4000 <= s <= 9000 for s in sizes), sizes
    p = pods[0]
    assert p["status"]["phase"] == "Running"
    assert p["metadata"]["managedFields"]
    slices = store.list(
        "endpointslices.discovery.k8s.io", "ns-0", label_selector="kubernetes.io/service-name=app-0"
    )
    assert len(slices) == 1
    assert len(slices[0]["endpoints"]) == 50
    ep = store.get("endpoints", "app-0", "ns-0")
    assert {a["ip"] for a in ep["subsets"][0]["addresses"]} == {
        e["addresses"][0] for e in slices[0]["endpoints"]
    }


async def test_churn_emits_watch_events(raw: Any, sim: SimAPIServer) -> None:
    seed(sim.store, pods=50, namespaces=1)
    rv = sim.store.resource_version
    async with Churn(sim.store, 200) as churn:
        events = await raw.watch_lines(f"/api/v1/pods?watch=true&resourceVersion={rv}", count=20)
    assert churn.changes >= 20
    assert {e["type"] for e in events} == {"MODIFIED"}


def test_sim_command_serves_kubectl_and_stops_on_sigterm(tmp_path: Path) -> None:
    kc = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apiproxy",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--pods",
            "120",
            "--namespaces",
            "2",
            "--churn",
            "20",
            "--kubeconfig",
            str(kc),
            "--token",
            "cli-secret",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"apiproxy sim: serving (https://127\.0\.0\.1:\d+); kubeconfig (\S+) ", line)
        assert m, line
        assert m.group(2) == str(kc)
        env = {**os.environ, "KUBECONFIG": str(kc), "HOME": str(tmp_path)}
        out = subprocess.run(
            [KUBECTL, "get", "pods", "-A", "-o", "name"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.split()) == 120
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "cli-secret" not in err + line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sim_command_user_errors(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "apiproxy", "sim", "--tls-cert", str(tmp_path / "cert.pem")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "apiproxy sim: error: --tls-cert and --tls-key go together"
