"""Fixtures for the simulator's tests: a running sim over HTTPS and a raw HTTP client for it."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from apiproxy_dev.sim import SimAPIServer

TOKEN = "sim-test-token"


class Raw:
    """A thin aiohttp client that returns (status, headers, parsed body)."""

    def __init__(self, sim: SimAPIServer, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session
        self.ssl = ssl.create_default_context(cadata=sim.ca_pem)

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.sim.token}"}
        h.update(extra or {})
        return h

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        h = self.headers(headers)
        if data is not None:
            h.setdefault("Content-Type", content_type)
        async with self.session.request(
            method, self.sim.url + path, data=data, headers=h, ssl=self.ssl
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode()
            return resp.status, resp.headers, parsed

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        return await self.call("GET", path, **kw)

    async def watch_lines(
        self, path: str, *, headers: dict[str, str] | None = None, count: int | None = None
    ) -> list[dict[str, Any]]:
        """Read a watch stream; stop after `count` events or when the server ends it."""
        out: list[dict[str, Any]] = []
        async with self.session.get(
            self.sim.url + path, headers=self.headers(headers), ssl=self.ssl
        ) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.strip():
                    out.append(json.loads(line))
                    if count is not None and len(out) >= count:
                        break
        return out


@pytest.fixture
async def sim() -> AsyncIterator[SimAPIServer]:
    async with SimAPIServer(token=TOKEN, bookmark_interval=0.2, history_size=200) as s:
        yield s


@pytest.fixture
async def raw(sim: SimAPIServer) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession() as session:
        yield Raw(sim, session)


def pod(
    name: str,
    ns: str = "default",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    node: str = "node-1",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": phase},
    }


@pytest.fixture
def make_pod() -> Any:
    return pod
