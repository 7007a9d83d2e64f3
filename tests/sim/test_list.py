"""LIST pagination and resourceVersion semantics."""

from __future__ import annotations

from typing import Any

from apiproxy_dev.sim import SimAPIServer


def _cm(name: str, ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}}


async def test_pagination_is_a_consistent_snapshot(raw: Any, sim: SimAPIServer) -> None:
    for i in range(7):
        sim.store.create(_cm(f"c{i}"))
    code, _, page = await raw.get("/api/v1/namespaces/default/configmaps?limit=3")
    assert code == 200
    assert len(page["items"]) == 3
    meta = page["metadata"]
    assert meta["continue"]
    assert meta["remainingItemCount"] == 4
    snapshot_rv = meta["resourceVersion"]
    # Changes after the first page are invisible to the rest of the list.
    sim.store.delete("configmaps", "c5", "default")
    sim.store.create(_cm("c9"))
    names = [i["metadata"]["name"] for i in page["items"]]
    token = meta["continue"]
    while token:
        _, _, page = await raw.get(
            f"/api/v1/namespaces/default/configmaps?limit=3&continue={token}"
        )
        assert page["metadata"]["resourceVersion"] == snapshot_rv
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"c{i}" for i in range(7)]


async def test_continue_too_old_is_410(raw: Any, sim: SimAPIServer) -> None:
    for i in range(4):
        sim.store.create(_cm(f"c{i}"))
    _, _, page = await raw.get("/api/v1/configmaps?limit=2")
    sim.store.create(_cm("late"))
    sim.store.compact()
    code, _, body = await raw.get(
        f"/api/v1/configmaps?limit=2&continue={page['metadata']['continue']}"
    )
    assert code == 410
    assert body["reason"] == "Expired"
    code, _, body = await raw.get("/api/v1/configmaps?limit=2&continue=garbage")
    assert code == 400


async def test_resource_version_semantics(raw: Any, sim: SimAPIServer) -> None:
    for i in range(5):
        sim.store.create(_cm(f"c{i}"))
    # RV "0" is served from the watch cache, which ignores limit.
    _, _, body = await raw.get("/api/v1/namespaces/default/configmaps?resourceVersion=0&limit=2")
    assert len(body["items"]) == 5
    assert "continue" not in body["metadata"]
    # Exact lists the state at that resourceVersion.
    rv = sim.store.resource_version
    sim.store.create(_cm("c5"))
    sim.store.delete("configmaps", "c0", "default")
    _, _, body = await raw.get(
        f"/api/v1/namespaces/default/configmaps?resourceVersion={rv}&resourceVersionMatch=Exact"
    )
    assert [i["metadata"]["name"] for i in body["items"]] == [f"c{i}" for i in range(5)]
    assert body["metadata"]["resourceVersion"] == str(rv)
    # NotOlderThan (and "") give the newest state.
    _, _, body = await raw.get(
        f"/api/v1/namespaces/default/configmaps?resourceVersion={rv}&resourceVersionMatch=NotOlderThan"
    )
    assert [i["metadata"]["name"] for i in body["items"]] == [f"c{i}" for i in range(1, 6)]
    # Future resourceVersions time out, as the cacher does after waiting.
    code, _, body = await raw.get(f"/api/v1/configmaps?resourceVersion={rv + 1000}")
    assert code == 504
    assert body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    # Invalid combinations are 422 on ListOptions.
    code, _, body = await raw.get("/api/v1/configmaps?resourceVersionMatch=Exact")
    assert code == 422
    assert body["details"]["kind"] == "ListOptions"
    code, _, _ = await raw.get("/api/v1/configmaps?resourceVersion=0&resourceVersionMatch=Exact")
    assert code == 422


async def test_label_filtered_pages_skip_non_matching(raw: Any, sim: SimAPIServer) -> None:
    for i in range(6):
        obj = _cm(f"c{i}")
        obj["metadata"]["labels"] = {"keep": "yes" if i % 2 == 0 else "no"}
        sim.store.create(obj)
    names, token = [], ""
    while True:
        q = "labelSelector=keep%3Dyes&limit=2" + (f"&continue={token}" if token else "")
        _, _, page = await raw.get("/api/v1/namespaces/default/configmaps?" + q)
        assert "remainingItemCount" not in page["metadata"]
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue", "")
        if not token:
            break
    assert names == ["c0", "c2", "c4"]


async def test_list_in_missing_namespace_is_empty(raw: Any) -> None:
    code, _, body = await raw.get("/api/v1/namespaces/nope/pods")
    assert code == 200
    assert body["items"] == []
