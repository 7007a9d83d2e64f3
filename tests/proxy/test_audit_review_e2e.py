"""`apiproxy audit summarize` and `suggest` on a log the real proxy wrote, not on synthetic records:
peers read through the proxy with real TLS, some requests are refused, then the operator tools run
as subprocesses on that file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from apiproxy.policy import Policy
from apiproxy.request import classify
from tests.proxy.conftest import ProxyFactory, World
from tests.proxy.test_e2e_sim import proxy_for

DENIED = [
    ("GET", "/api/v1/namespaces/x/secrets"),
    ("GET", "/api/v1/namespaces/x/configmaps?watch=true"),
    ("GET", "/apis/apps/v1/namespaces/x/deployments"),
]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apiproxy", "audit", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


async def test_summarize_and_suggest_on_the_proxys_own_log(
    sim, world: World, tmp_path: Path, make_proxy: ProxyFactory
):
    proxy, files = await proxy_for(sim, world, tmp_path, make_proxy)
    ssl_a = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession() as http:
        for target in ("/api/v1/namespaces/x/pods", "/api/v1/namespaces/x/endpoints/web"):
            async with http.get(proxy.url + target, ssl=ssl_a) as resp:
                assert resp.status == 200
                await resp.read()
        async with http.get(
            proxy.url + "/api/v1/namespaces/x/pods?watch=true&timeoutSeconds=1", ssl=ssl_a
        ) as resp:
            assert resp.status == 200
            await resp.read()  # the simulator ends the watch after timeoutSeconds
        for method, target in DENIED:
            async with http.request(method, proxy.url + target, ssl=ssl_a) as resp:
                assert resp.status == 403
        # A JWT-authenticated peer B, and an anonymous caller.
        headers = {"Authorization": f"Bearer {world.token_b()}"}
        ssl_none = world.client_ssl(None, tmp_path)
        async with http.get(proxy.url + "/version", ssl=ssl_none, headers=headers) as resp:
            assert resp.status == 200
        async with http.get(proxy.url + "/version", ssl=ssl_none) as resp:
            assert resp.status == 401
    await proxy.audit.flush()

    summary = run("summarize", "--output", "json", str(files.audit))
    assert summary.returncode == 0, summary.stderr
    report = json.loads(summary.stdout)
    peers = report["peers"]
    a = peers["cluster-a"]
    assert a["requests"] == 3 + len(DENIED)
    assert a["denied"] == len(DENIED)
    assert a["watches"] == 1
    assert a["bytesSent"] > 0
    assert peers["cluster-b"]["requests"] == 1
    assert peers["cluster-b"]["denied"] == 0
    assert peers["system:anonymous"]["unauthenticated"] == 1

    table = run("summarize", str(files.audit))
    assert table.returncode == 0
    assert "cluster-a" in table.stdout
    assert "secrets" in table.stdout

    suggested = run("suggest", "--peer", "cluster-a", str(files.audit))
    assert suggested.returncode == 0, suggested.stderr
    policy = Policy.from_text(suggested.stdout, source="suggested.yaml")
    # Reads of configmaps and deployments are suggested as active rules; the read of secrets only
    # as an empty view (the proxy answers it, nothing is read).
    assert policy.decide("cluster-a", classify(*DENIED[1])).view == ""
    assert policy.decide("cluster-a", classify(*DENIED[2])).allowed
    secrets = policy.decide("cluster-a", classify(*DENIED[0]))
    assert (secrets.allowed, secrets.view) == (True, "empty")
    assert "view: empty" in suggested.stdout
    # Suggestions are per peer: nothing here grants cluster-b anything.
    assert not policy.decide("cluster-b", classify(*DENIED[1])).allowed
