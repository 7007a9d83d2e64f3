"""WATCH semantics: resourceVersion replay, 410 in both forms, bookmarks, watch-list, selectors,
timeouts, the legacy /watch/ paths."""

from __future__ import annotations

import asyncio
from typing import Any

from apiproxy_dev.sim import SimAPIServer


def _names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


async def test_watch_replays_after_resource_version_then_streams(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    a = sim.store.create(make_pod("a"))
    sim.store.create(make_pod("b"))
    rv = a["metadata"]["resourceVersion"]
    task = asyncio.create_task(
        raw.watch_lines(f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}", count=3)
    )
    await asyncio.to_thread(sim.store.wait_for_watchers, "pods")
    sim.store.delete("pods", "a", "default")
    sim.store.create(make_pod("c"))
    events = await asyncio.wait_for(task, 10)
    assert _names(events) == [("ADDED", "b"), ("DELETED", "a"), ("ADDED", "c")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs)
    assert rvs[0] > int(rv)


async def test_watch_without_rv_starts_with_synthetic_added(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    sim.store.create(make_pod("a"))
    events = await raw.watch_lines("/api/v1/pods?watch=1&timeoutSeconds=1")
    assert _names(events) == [("ADDED", "a")]


async def test_legacy_watch_path_and_single_object_watch(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    sim.store.create(make_pod("a"))
    sim.store.create(make_pod("b"))
    events = await raw.watch_lines("/api/v1/watch/namespaces/default/pods/b?timeoutSeconds=1")
    assert _names(events) == [("ADDED", "b")]


async def test_timeout_seconds_ends_stream_cleanly(raw: Any) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = await raw.watch_lines(
        "/api/v1/configmaps?watch=true&resourceVersion=101&timeoutSeconds=1"
    )
    assert 0.9 <= loop.time() - start < 5
    assert all(e["type"] != "ERROR" for e in events)


async def test_too_old_resource_version_is_error_event_in_200_stream(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    first = sim.store.create(make_pod("a"))
    sim.store.create(make_pod("b"))
    sim.store.compact()
    rv = first["metadata"]["resourceVersion"]
    events = await raw.watch_lines(f"/api/v1/pods?watch=true&resourceVersion={rv}")
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status"
    assert status["code"] == 410
    assert status["reason"] == "Expired"
    assert status["message"].startswith(f"too old resource version: {rv} (")


async def test_expired_list_is_http_410(raw: Any, sim: SimAPIServer, make_pod: Any) -> None:
    first = sim.store.create(make_pod("a"))
    sim.store.create(make_pod("b"))
    sim.store.compact()
    rv = first["metadata"]["resourceVersion"]
    code, _, body = await raw.get(f"/api/v1/pods?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert code == 410
    assert body["reason"] == "Expired"


async def test_history_window_is_bounded(raw: Any, sim: SimAPIServer) -> None:
    start = sim.store.resource_version
    for i in range(sim.store.history_size + 5):
        sim.store.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"c{i}", "namespace": "default"},
            }
        )
    assert sim.store.oldest_watchable > start
    events = await raw.watch_lines(f"/api/v1/configmaps?watch=true&resourceVersion={start}")
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410


async def test_periodic_bookmarks(raw: Any, sim: SimAPIServer) -> None:
    rv = sim.store.resource_version
    events = await raw.watch_lines(
        f"/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true", count=2
    )
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    obj = events[0]["object"]
    assert obj["kind"] == "Pod"
    assert int(obj["metadata"]["resourceVersion"]) >= rv
    # Without allowWatchBookmarks none arrive.
    quiet = await raw.watch_lines(f"/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1")
    assert quiet == []


async def test_send_initial_events_ends_with_annotated_bookmark(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    sim.store.create(make_pod("a"))
    sim.store.create(make_pod("b"))
    events = await raw.watch_lines(
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        "&allowWatchBookmarks=true",
        count=3,
    )
    assert _names(events)[:2] == [("ADDED", "a"), ("ADDED", "b")]
    end = events[2]
    assert end["type"] == "BOOKMARK"
    assert end["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(end["object"]["metadata"]["resourceVersion"]) == sim.store.resource_version


async def test_send_initial_events_validation(raw: Any) -> None:
    code, _, body = await raw.get("/api/v1/pods?watch=true&sendInitialEvents=true")
    assert code == 422
    assert body["reason"] == "Invalid"
    assert body["details"]["kind"] == "ListOptions"
    code, _, _ = await raw.get("/api/v1/pods?sendInitialEvents=true")
    assert code == 422


async def test_watch_honours_selectors_and_turns_mismatch_into_deleted(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    rv = sim.store.resource_version
    task = asyncio.create_task(
        raw.watch_lines(
            f"/api/v1/pods?watch=true&resourceVersion={rv}&labelSelector=app%3Dweb"
            "&fieldSelector=status.phase!%3DFailed",
            count=3,
        )
    )
    await asyncio.to_thread(sim.store.wait_for_watchers, "pods")
    sim.store.create(make_pod("other", labels={"app": "db"}))
    p = sim.store.create(make_pod("w", labels={"app": "web"}))
    p["status"] = {"phase": "Failed"}
    sim.store.update(p)
    sim.store.create(make_pod("w2", labels={"app": "web"}))
    events = await asyncio.wait_for(task, 10)
    assert _names(events) == [("ADDED", "w"), ("DELETED", "w"), ("ADDED", "w2")]
    # The DELETED carries the last matching state, stamped with the change's resourceVersion.
    assert events[1]["object"]["status"]["phase"] == "Running"
    assert int(events[1]["object"]["metadata"]["resourceVersion"]) > int(
        events[0]["object"]["metadata"]["resourceVersion"]
    )


async def test_future_resource_version_is_error_event(raw: Any, sim: SimAPIServer) -> None:
    rv = sim.store.resource_version + 100
    events = await raw.watch_lines(f"/api/v1/pods?watch=true&resourceVersion={rv}")
    assert [e["type"] for e in events] == ["ERROR"]
    assert events[0]["object"]["code"] == 504
    assert events[0]["object"]["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
