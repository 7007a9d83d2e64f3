"""The acceptance test of faithfulness: real clients, unmodified, over HTTPS against the sim."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from kubernetes_asyncio import watch as awatch
from kubernetes_asyncio.client.exceptions import ApiException

from apiproxy_dev.sim import SimAPIServer
from tests.tools import KUBECTL

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: istiomulticlusters.deckhouse.io
spec:
  group: deckhouse.io
  scope: Cluster
  names:
    plural: istiomulticlusters
    singular: istiomulticluster
    kind: IstioMulticluster
    listKind: IstioMulticlusterList
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""

CR = """
apiVersion: deckhouse.io/v1alpha1
kind: IstioMulticluster
metadata:
  name: peer-a
spec:
  metadataEndpoint: https://peer-a.example/metadata
"""


@pytest.fixture
def threaded_sim(tmp_path: Path) -> Iterator[tuple[SimAPIServer, Path]]:
    sim = SimAPIServer(token="kubectl-test-token")
    with sim.run_in_thread():
        yield sim, sim.write_kubeconfig(tmp_path / "kubeconfig")


def _kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    return subprocess.run(
        [KUBECTL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_kubectl_get_apply_delete(threaded_sim: tuple[SimAPIServer, Path]) -> None:
    sim, kc = threaded_sim
    out = _kubectl(kc, "get", "namespaces", "-o", "name")
    assert out.returncode == 0, out.stderr
    assert {"namespace/default", "namespace/kube-system"} <= set(out.stdout.split())
    out = _kubectl(kc, "apply", "-f", "-", stdin=CRD)
    assert out.returncode == 0, out.stderr
    assert "istiomulticlusters.deckhouse.io created" in out.stdout
    out = _kubectl(kc, "apply", "-f", "-", stdin=CR)
    assert out.returncode == 0, out.stderr
    assert "istiomulticluster.deckhouse.io/peer-a created" in out.stdout
    stored = sim.store.get("istiomulticlusters.deckhouse.io", "peer-a")
    assert stored["spec"]["metadataEndpoint"] == "https://peer-a.example/metadata"
    out = _kubectl(kc, "apply", "-f", "-", stdin=CR.replace("peer-a.example", "peer-b.example"))
    assert out.returncode == 0, out.stderr
    assert "configured" in out.stdout
    assert sim.store.get("istiomulticlusters.deckhouse.io", "peer-a")["metadata"]["generation"] == 2
    out = _kubectl(
        kc, "get", "istiomulticlusters", "-o", "jsonpath={.items[*].spec.metadataEndpoint}"
    )
    assert out.stdout == "https://peer-b.example/metadata", out.stderr
    out = _kubectl(kc, "delete", "istiomulticluster", "peer-a")
    assert out.returncode == 0, out.stderr
    assert "deleted" in out.stdout
    out = _kubectl(kc, "get", "istiomulticluster", "peer-a")
    assert out.returncode == 1
    assert "NotFound" in out.stderr


def test_kubectl_sees_bad_token_as_unauthorized(threaded_sim: tuple[SimAPIServer, Path]) -> None:
    sim, kc = threaded_sim
    kc.write_text(kc.read_text().replace(sim.token, "not-the-token"))
    out = _kubectl(kc, "get", "pods")
    assert out.returncode == 1
    assert "must be logged in" in out.stderr or "Unauthorized" in out.stderr
    assert "not-the-token" not in out.stderr


def test_kubectl_get_watch(threaded_sim: tuple[SimAPIServer, Path], make_pod: Any) -> None:
    sim, kc = threaded_sim
    sim.store.create(make_pod("first"))
    env = {**os.environ, "KUBECONFIG": str(kc), "HOME": str(kc.parent)}
    proc = subprocess.Popen(
        [KUBECTL, "get", "pods", "-w", "-o", "name", "--request-timeout=30s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "pod/first"
        sim.store.wait_for_watchers("pods")
        sim.store.create(make_pod("second"))
        assert proc.stdout.readline().strip() == "pod/second"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_official_client_watch_stream(
    threaded_sim: tuple[SimAPIServer, Path], make_pod: Any
) -> None:
    sim, kc = threaded_sim
    sim.store.create(make_pod("a"))
    api_client = kubernetes.config.new_client_from_config(config_file=str(kc))
    try:
        v1 = kubernetes.client.CoreV1Api(api_client)
        pods = v1.list_namespaced_pod("default")
        assert [p.metadata.name for p in pods.items] == ["a"]

        # Changes made while the stream is open (from another thread, once it is registered).
        def change() -> None:
            sim.store.wait_for_watchers("pods")
            sim.store.create(make_pod("b"))
            sim.store.delete("pods", "b", "default")

        changer = threading.Thread(target=change)
        changer.start()
        seen = []
        w = kubernetes.watch.Watch()
        for event in w.stream(
            v1.list_namespaced_pod,
            "default",
            resource_version=pods.metadata.resource_version,
            timeout_seconds=20,
        ):
            seen.append((event["type"], event["object"].metadata.name))
            assert event["object"].status.phase == "Running"
            if len(seen) == 2:
                w.stop()
        changer.join()
        assert seen == [("ADDED", "b"), ("DELETED", "b")]
    finally:
        api_client.close()


async def test_asyncio_informer_list_watch_with_410_relist(tmp_path: Path, make_pod: Any) -> None:
    async with SimAPIServer(token="aio-token", history_size=5) as sim:
        kc = sim.write_kubeconfig(tmp_path / "kubeconfig")
        api_client = await aconfig.new_client_from_config(config_file=str(kc))
        try:
            v1 = aclient.CoreV1Api(api_client)
            sim.store.create(make_pod("a"))
            listed = await v1.list_pod_for_all_namespaces()
            cache = {p.metadata.name for p in listed.items}
            rv = listed.metadata.resource_version
            assert cache == {"a"}
            # While the informer is away, more changes than the history window holds.
            for i in range(10):
                sim.store.create(make_pod(f"p{i}"))
            w = awatch.Watch()
            with pytest.raises(ApiException) as gone:
                async for _ in w.stream(
                    v1.list_pod_for_all_namespaces,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=20,
                ):
                    pass
            assert gone.value.status == 410
            # Re-list, then watch from the new list's resourceVersion.
            listed = await v1.list_pod_for_all_namespaces()
            cache = {p.metadata.name for p in listed.items}
            assert cache == {"a", *(f"p{i}" for i in range(10))}
            rv = listed.metadata.resource_version

            async def change_when_watched() -> None:
                await asyncio.to_thread(sim.store.wait_for_watchers, "pods")
                sim.store.delete("pods", "a", "default")

            changer = asyncio.create_task(change_when_watched())
            w = awatch.Watch()
            async for event in w.stream(
                v1.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=20
            ):
                assert event["type"] == "DELETED"
                cache.discard(event["object"].metadata.name)
                w.stop()
            await changer
            assert "a" not in cache
            assert len(cache) == 10
        finally:
            await api_client.close()
