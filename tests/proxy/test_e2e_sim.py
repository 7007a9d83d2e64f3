"""End to end: real clients (kubectl, kubernetes, kubernetes_asyncio) → proxy (mTLS) → simulator."""

from __future__ import annotations

import asyncio
import base64
import os
import queue
import threading
from pathlib import Path
from typing import Any

import yaml

from apiproxy import pki
from apiproxy.server import ProxyServer
from apiproxy_dev.sim import SimAPIServer
from tests.proxy.conftest import ProxyFactory, World, audit_records, make_files, pod
from tests.tools import KUBECTL


async def proxy_for(sim: SimAPIServer, world: World, tmp: Path, make_proxy: ProxyFactory) -> Any:
    files = make_files(world, tmp)
    files.token.write_text(sim.token)
    files.upstream_ca.write_text(sim.ca_pem)
    proxy, _ = await make_proxy(sim.url, files=files)
    return proxy, files


def kubeconfig(world: World, proxy: ProxyServer, cert: pki.KeyPair, path: Path) -> Path:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "peer",
                        "cluster": {
                            "server": proxy.url,
                            "certificate-authority-data": b64(world.server_ca.cert_pem),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "istiod",
                        "user": {
                            "client-certificate-data": b64(cert.cert_pem),
                            "client-key-data": b64(cert.key_pem),
                        },
                    }
                ],
                "contexts": [{"name": "peer", "context": {"cluster": "peer", "user": "istiod"}}],
                "current-context": "peer",
            }
        )
    )
    path.chmod(0o600)
    return path


async def kubectl(kcfg: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(kcfg),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(kcfg.parent)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_kubectl_get_pods_endpoints_and_forbidden_secrets(
    world: World, sim: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(sim, world, tmp_path, make_proxy)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    code, out, err = await kubectl(kcfg, "get", "pods", "-n", "x", "-o", "name")
    assert (code, out) == (0, "pod/web-0\n"), err
    code, out, err = await kubectl(kcfg, "get", "endpoints", "-n", "x", "-o", "name")
    assert (code, out) == (0, "endpoints/web\n"), err
    code, out, err = await kubectl(kcfg, "get", "secrets", "-n", "x")
    assert code == 1
    assert out == ""
    assert (
        'Error from server (Forbidden): secrets is forbidden: User "peer:cluster-a" cannot list'
        ' resource "secrets" in API group "" in the namespace "x"'
    ) in err
    assert "private" not in err
    await proxy.audit.flush()
    users = {r["user"]["username"] for r in audit_records(files.audit)}
    assert users == {"peer:cluster-a"}


async def test_kubectl_watch_streams_each_event_as_it_happens(
    world: World, sim: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await proxy_for(sim, world, tmp_path, make_proxy)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(kcfg),
        "get",
        "pods",
        "-n",
        "x",
        "-w",
        "-o",
        "name",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first == b"pod/web-0\n"
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 1), 30)
        for i in range(3):
            # Each event must reach kubectl on its own: the next pod is created only after this
            # one's line arrived, so a proxy that buffered events (until a later one, a full
            # buffer or the end of the watch) would never deliver it. No clock is involved: the
            # bound below only turns such a hang into a failure.
            sim.store.create(pod(f"new-{i}"))
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == f"pod/new-{i}\n".encode()
    finally:
        proc.terminate()
        await proc.wait()
    # kubectl went away: the proxy closed its upstream watch and released the slot
    await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0), 30)
    # The proxy relayed (and counted) exactly those events, one by one, until the client left.
    await proxy.audit.flush()
    (done,) = [
        r
        for r in audit_records(files.audit)
        if r["stage"] == "ResponseComplete" and "apiproxy.io/watch-events" in r["annotations"]
    ]
    assert done["annotations"]["apiproxy.io/watch-events"] == "3"
    assert done["annotations"]["apiproxy.io/stream-ended-by"] == "client"


async def test_official_kubernetes_client_lists_and_watches(
    world: World, sim: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    import kubernetes

    proxy, _ = await proxy_for(sim, world, tmp_path, make_proxy)
    kcfg = kubeconfig(world, proxy, world.client_b, tmp_path / "kubeconfig")
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    listed = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            api_client = kubernetes.config.new_client_from_config(config_file=str(kcfg))
            v1 = kubernetes.client.CoreV1Api(api_client)
            pods = v1.list_namespaced_pod("x")
            seen.put(("LIST", ",".join(p.metadata.name for p in pods.items)))
            listed.set()
            w = kubernetes.watch.Watch()
            for ev in w.stream(
                v1.list_namespaced_pod,
                "x",
                resource_version=pods.metadata.resource_version,
                timeout_seconds=60,
            ):
                seen.put((ev["type"], ev["object"].metadata.name))
                if ev["object"].metadata.name == "late":
                    w.stop()
            api_client.close()
        except BaseException as exc:
            errors.append(exc)
            listed.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert await asyncio.to_thread(listed.wait, 30)
    sim.store.create(pod("late"))
    await asyncio.to_thread(thread.join, 30)
    assert not errors, errors
    got = [seen.get_nowait() for _ in range(seen.qsize())]
    assert got == [("LIST", "web-0"), ("ADDED", "late")]


async def _sim_honours_watch_True(sim: SimAPIServer) -> bool:
    """kubernetes_asyncio sends `watch=True`; kube-apiserver (Go ParseBool) treats it as a watch."""
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cadata=sim.ca_pem)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(
            sim.url + "/api/v1/namespaces/x/pods?watch=True&timeoutSeconds=1",
            headers={"Authorization": f"Bearer {sim.token}"},
        ) as resp,
    ):
        return "stream=watch" in resp.headers.get("Content-Type", "") or (
            b'"type"' in await resp.content.readline()
        )


async def test_kubernetes_asyncio_lists_and_watches_through_the_proxy(
    world: World, sim: SimAPIServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    from kubernetes_asyncio import client, config, watch

    proxy, _ = await proxy_for(sim, world, tmp_path, make_proxy)
    kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
    api_client = await config.new_client_from_config(config_file=str(kcfg))
    async with api_client:
        v1 = client.CoreV1Api(api_client)
        pods = await v1.list_namespaced_pod("x")
        assert [p.metadata.name for p in pods.items] == ["web-0"]
        endpoints = await v1.list_namespaced_endpoints("x")
        assert [e.metadata.name for e in endpoints.items] == ["web"]
        # kube-apiserver treats watch=True as a watch; a simulator that stops doing so would make
        # this test pass vacuously, so that is a failure, not a skip.
        assert await _sim_honours_watch_True(sim), "the simulator treats watch=True as a list"
        w = watch.Watch()
        events = []
        stream = w.stream(
            v1.list_namespaced_pod,
            "x",
            resource_version=pods.metadata.resource_version,
            timeout_seconds=60,
        )
        # The watch starts at the listed resourceVersion: an event created before the stream is
        # open is still delivered.
        sim.store.create(pod("async-late"))
        async for ev in stream:
            events.append((ev["type"], ev["object"].metadata.name))
            if ev["object"].metadata.name == "async-late":
                break
        w.stop()
        assert events == [("ADDED", "async-late")]


async def test_kubernetes_asyncio_watch_against_recording_upstream(
    world: World, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    import json

    from kubernetes_asyncio import client, config, watch

    from tests.proxy.conftest import start_recorder

    rec = await start_recorder(world)
    try:
        proxy, _ = await make_proxy(rec.url)
        kcfg = kubeconfig(world, proxy, world.client_a, tmp_path / "kubeconfig")
        api_client = await config.new_client_from_config(config_file=str(kcfg))
        async with api_client:
            v1 = client.CoreV1Api(api_client)
            w = watch.Watch()
            stream = w.stream(v1.list_namespaced_pod, "x", timeout_seconds=60)
            names = []
            for i in range(3):
                obj = pod(f"p{i}")
                obj["metadata"]["resourceVersion"] = str(10 + i)
                rec.events.put_nowait(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
                # one event at a time: the next is produced only after this one arrived
                ev = await asyncio.wait_for(stream.__anext__(), 10)
                names.append(ev["object"].metadata.name)
            w.stop()
        assert names == ["p0", "p1", "p2"]
        (watch_req,) = [r for r in rec.requests if "watch=" in r.raw_path]
        assert watch_req.raw_path.startswith("/api/v1/namespaces/x/pods?")
    finally:
        rec.events.put_nowait(None)
        assert rec.runner is not None
        await rec.runner.cleanup()
