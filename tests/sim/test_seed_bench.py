"""The seeding helpers the benchmark's upstream uses: add_pods and a namespaced, stamped Churn."""

from __future__ import annotations

import time
from typing import Any

from apiproxy_dev.sim import SimAPIServer, Store
from apiproxy_dev.sim.seed import Churn, add_pods


def test_add_pods_labels_names_and_no_managed_fields() -> None:
    store = Store()
    assert add_pods(store, "a", 3, prefix="x", labels={"l": "yes"}, managed_fields=False) == 3
    assert add_pods(store, "a", 2, start=3, prefix="x") == 2  # namespace exists already
    pods = store.list("pods", "a")
    assert sorted(p["metadata"]["name"] for p in pods) == [f"x-{i}" for i in range(5)]
    lean = store.get("pods", "x-0", "a")
    assert lean["metadata"]["labels"]["l"] == "yes"
    assert lean["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    assert "managedFields" not in lean["metadata"]
    assert store.get("pods", "x-3", "a")["metadata"]["managedFields"]
    assert len(store.list("pods", "a", label_selector="l=yes")) == 3


async def test_churn_run_for_changes_only_its_namespace_and_stamps(
    raw: Any, sim: SimAPIServer
) -> None:
    add_pods(sim.store, "quiet", 5)
    add_pods(sim.store, "busy", 5)
    before = {
        p["metadata"]["name"]: p["metadata"]["resourceVersion"]
        for p in sim.store.list("pods", "quiet")
    }
    t0 = time.time_ns()
    churn = Churn(sim.store, 0, namespace="busy", stamp="example.com/sent-ns")
    out = await churn.run_for(0.05)
    assert out["updates"] == churn.changes > 0
    after = {
        p["metadata"]["name"]: p["metadata"]["resourceVersion"]
        for p in sim.store.list("pods", "quiet")
    }
    assert after == before
    stamps = [
        int(p["metadata"]["annotations"]["example.com/sent-ns"])
        for p in sim.store.list("pods", "busy")
        if "example.com/sent-ns" in p["metadata"].get("annotations", {})
    ]
    assert stamps
    assert all(t0 <= s <= time.time_ns() for s in stamps)


async def test_churn_run_for_paces_its_rate(sim: SimAPIServer) -> None:
    add_pods(sim.store, "busy", 5)
    out = await Churn(sim.store, 100, namespace="busy").run_for(0.2)
    # Pacing, not speed: the n-th change is never due before n/rate seconds, however slow the
    # machine; the first is due at once.
    assert 1 <= out["updates"] <= out["seconds"] * 100 + 1
