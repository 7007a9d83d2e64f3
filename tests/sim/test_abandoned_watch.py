"""A watch whose client goes away ends at once in the simulator, even when nothing is written."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from apiproxy_dev.sim import SimAPIServer


async def test_quiet_watch_ends_when_its_client_disconnects() -> None:
    async with SimAPIServer(watch_timeout=3600.0, bookmark_interval=3600.0) as sim:
        ctx = ssl.create_default_context(cadata=sim.ca_pem)
        async with aiohttp.ClientSession() as s:
            resp = await s.get(
                sim.url + "/api/v1/pods?watch=1&resourceVersion=0&timeoutSeconds=3000",
                headers={"Authorization": f"Bearer {sim.token}"},
                ssl=ctx,
            )
            assert resp.status == 200
            assert sim.store.watcher_count("pods") == 1
            tasks = set(sim._watch_tasks)
            assert len(tasks) == 1
            resp.close()  # the client goes away; no event will ever be written to it
            done, _ = await asyncio.wait(tasks, timeout=10)
        assert done == tasks, "the watch handler outlived its client"
        assert sim.store.watcher_count("pods") == 0
