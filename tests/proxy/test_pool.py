"""Open watches do not use up the upstream request pool (--upstream-max-connections)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.proxy.conftest import ProxyFactory, Recorder, World


async def test_watches_do_not_count_against_the_request_pool(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _files = await make_proxy(recorder.url, upstream_max_connections=1)
    ctx = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0)) as s:
        watches = [
            await asyncio.wait_for(
                s.get(proxy.url + "/api/v1/pods?watch=true&timeoutSeconds=300"), 10
            )
            for _ in range(3)
        ]
        try:
            assert [w.status for w in watches] == [200, 200, 200]
            assert proxy.open_watches("cluster-a") == 3
            # The one pooled request connection is still free for ordinary requests.
            for _ in range(2):
                async with s.get(proxy.url + "/api/v1/pods") as resp:
                    assert resp.status == 200
        finally:
            for w in watches:
                w.close()
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0), 10)
