"""Fault injection: delays, failures with Retry-After, cut watches, dropped connections,
refusing to start."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from apiproxy_dev.sim import SimAPIServer, StartRefused


async def test_fail_with_retry_after_then_recover(raw: Any, sim: SimAPIServer) -> None:
    rule = sim.faults.fail(429, times=1, path="/api/v1/pods")
    code, headers, body = await raw.get("/api/v1/pods")
    assert code == 429
    assert headers["Retry-After"] == "1"
    assert body["reason"] == "TooManyRequests"
    code, _, _ = await raw.get("/api/v1/pods")
    assert code == 200
    assert rule.fired == 1
    sim.faults.fail(500, method="POST")
    code, _, body = await raw.call(
        "POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "x"}}
    )
    assert code == 500
    assert body["kind"] == "Status"
    assert (await raw.get("/api/v1/configmaps"))[0] == 200


async def test_delay(raw: Any, sim: SimAPIServer) -> None:
    sim.faults.delay(0.3, path="/version", times=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await raw.get("/version")
    assert loop.time() - t0 >= 0.3


async def test_cut_watch_after_n_events(raw: Any, sim: SimAPIServer, make_pod: Any) -> None:
    for i in range(5):
        sim.store.create(make_pod(f"p{i}"))
    sim.faults.cut_watch_after(2)
    events = await raw.watch_lines("/api/v1/pods?watch=true")
    assert len(events) == 2


async def test_cut_watch_abruptly(raw: Any, sim: SimAPIServer, make_pod: Any) -> None:
    for i in range(5):
        sim.store.create(make_pod(f"p{i}"))
    sim.faults.cut_watch_after(1, abrupt=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw.watch_lines("/api/v1/pods?watch=true")


async def test_drop_connection(raw: Any, sim: SimAPIServer) -> None:
    # Unlimited: aiohttp silently retries an idempotent request once after a disconnect.
    rule = sim.faults.drop_connections(path="/api/v1/nodes")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await raw.get("/api/v1/nodes")
    assert rule.fired >= 1
    sim.faults.clear()
    assert (await raw.get("/api/v1/nodes"))[0] == 200


async def test_refuse_start() -> None:
    sim = SimAPIServer()
    sim.faults.refuse_start = True
    with pytest.raises(StartRefused):
        await sim.start()
