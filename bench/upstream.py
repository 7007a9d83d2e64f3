"""The benchmark's upstream: the simulated kube-apiserver in its own process, seeded with realistic
(Istio-injected) pods, with a churn generator driven over stdin.

    python -m bench.upstream --list-pods 50000 --list-split 10000

Plain HTTP on 127.0.0.1 (the simulator's benchmark mode). On start it prints one JSON line
`{"url", "token", "pid", "pods", "list_bytes_per_pod"}`; then it reads commands, one per line, and
answers each with one JSON line:

    churn RATE SECONDS   update pods of namespace `churn` (RATE per second, 0 = as fast as it can),
                         each stamped with annotation bench.apiproxy.io/sent-ns = time.time_ns()
    watchers             how many watches are open on pods
    poke                 update one pod of namespace `small`: watch handlers whose client has
                         gone notice it on that write and end (the simulator only learns of a
                         closed watch connection when it next writes to it)
    quit                 stop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from apiproxy.sim import SimAPIServer, Store

STAMP = "bench.apiproxy.io/sent-ns"
SMALL_NS = "small"
CHURN_NS = "churn"
LIST_NS = ("list-small", "list-rest")  # list-small holds the small LIST, both the large one
LIST_LABEL = "bench.apiproxy.io/list"


def pod(name: str, namespace: str, i: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """An Istio-injected Deployment pod as kube-apiserver returns it (about 3 KB of JSON)."""
    app = f"svc-{i % 97}"
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generateName": f"{app}-7d9c5b6f4-",
            "labels": {
                "app": app,
                "version": "v1",
                "pod-template-hash": "7d9c5b6f4",
                "security.istio.io/tlsMode": "istio",
                "service.istio.io/canonical-name": app,
                "service.istio.io/canonical-revision": "v1",
                **(labels or {}),
            },
            "annotations": {
                "istio.io/rev": "default",
                "kubectl.kubernetes.io/default-container": app,
                "kubectl.kubernetes.io/default-logs-container": app,
                "prometheus.io/path": "/stats/prometheus",
                "prometheus.io/port": "15020",
                "prometheus.io/scrape": "true",
                "sidecar.istio.io/status": json.dumps(
                    {
                        "initContainers": ["istio-init"],
                        "containers": ["istio-proxy"],
                        "volumes": [
                            "workload-socket",
                            "credential-socket",
                            "workload-certs",
                            "istio-envoy",
                            "istio-data",
                            "istio-podinfo",
                            "istio-token",
                            "istiod-ca-cert",
                        ],
                        "imagePullSecrets": None,
                        "revision": "default",
                    }
                ),
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7d9c5b6f4",
                    "uid": "5f0c6a9e-3b1d-4c1e-9a55-0d9a3c7e2b10",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": app,
                    "image": f"registry.example.com/team/{app}:1.4.2",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "256Mi"},
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/app-health/app/readyz", "port": 15020},
                        "periodSeconds": 10,
                    },
                },
                {
                    "name": "istio-proxy",
                    "image": "docker.io/istio/proxyv2:1.24.2",
                    "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                    "env": [
                        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
                        {"name": "CA_ADDR", "value": "istiod.istio-system.svc:15012"},
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "ISTIO_META_CLUSTER_ID", "value": "cluster-b"},
                        {"name": "ISTIO_META_NETWORK", "value": "network-b"},
                    ],
                    "ports": [
                        {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}
                    ],
                    "resources": {
                        "limits": {"cpu": "2", "memory": "1Gi"},
                        "requests": {"cpu": "10m", "memory": "40Mi"},
                    },
                    "volumeMounts": [
                        {"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"},
                        {"mountPath": "/var/lib/istio/data", "name": "istio-data"},
                        {"mountPath": "/etc/istio/proxy", "name": "istio-envoy"},
                        {"mountPath": "/var/run/secrets/tokens", "name": "istio-token"},
                    ],
                },
            ],
            "nodeName": f"node-{i % 50}",
            "serviceAccountName": app,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "phase": "Running",
            "hostIP": f"192.168.0.{i % 50}",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable",
            "startTime": "2025-01-01T00:00:00Z",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2025-01-01T00:00:05Z"}
                for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": c,
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "image": img,
                    "imageID": img + "@sha256:" + "ab" * 32,
                    "containerID": "containerd://" + f"{i:064x}",
                    "state": {"running": {"startedAt": "2025-01-01T00:00:04Z"}},
                }
                for c, img in ((app, f"registry.example.com/team/{app}:1.4.2"),)
            ],
        },
    }


def seed(store: Store, *, list_pods: int, list_split: int, churn_pods: int) -> int:
    rt = store.resolve("pods")
    for ns in (SMALL_NS, CHURN_NS, *LIST_NS):
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    n = store.bulk_create(rt, [pod(f"small-{i}", SMALL_NS, i) for i in range(10)])
    n += store.bulk_create(rt, [pod(f"churn-{i}", CHURN_NS, i) for i in range(churn_pods)])
    label = {LIST_LABEL: "yes"}
    small = min(list_split, list_pods)
    n += store.bulk_create(rt, (pod(f"pod-{i}", LIST_NS[0], i, label) for i in range(small)))
    n += store.bulk_create(
        rt, (pod(f"pod-{i}", LIST_NS[1], i, label) for i in range(small, list_pods))
    )
    store.compact()  # no seeding history: watches start from now
    return n


class Churn:
    def __init__(self, store: Store, count: int) -> None:
        self.store = store
        self.pods = [store.get("pods", f"churn-{i}", CHURN_NS) for i in range(count)]
        for p in self.pods:
            p["metadata"].pop("resourceVersion", None)

    async def run(self, rate: float, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        n = 0
        while True:
            now = loop.time()
            if now >= end:
                break
            if rate > 0:
                due = start + n / rate
                if due > now:
                    await asyncio.sleep(due - now)
            p = self.pods[n % len(self.pods)]
            p["metadata"]["annotations"][STAMP] = str(time.time_ns())
            self.store.update(p, resource="pods")
            n += 1
            if rate <= 0:
                await asyncio.sleep(0)  # let the watch pumps write
        return {"updates": n, "seconds": loop.time() - start}


async def serve(args: argparse.Namespace) -> None:
    store = Store(history_size=100_000, watch_buffer=1_000_000)
    t0 = time.monotonic()
    pods = seed(store, list_pods=args.list_pods, list_split=args.list_split, churn_pods=100)
    churn = Churn(store, 100)
    sim = SimAPIServer(tls=False, store=store, bookmark_interval=3600.0, watch_timeout=3600.0)
    await sim.start()
    one = len(json.dumps(pod("pod-0", LIST_NS[0], 0, {LIST_LABEL: "yes"}), separators=(",", ":")))
    print(
        json.dumps(
            {
                "url": sim.url,
                "token": sim.token,
                "pid": os.getpid(),
                "pods": pods,
                "list_bytes_per_pod": one,
                "seed_seconds": round(time.monotonic() - t0, 2),
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().split():
            cmd, rest = line[0], line[1:]
            if cmd == "churn":
                out: dict[str, Any] = await churn.run(float(rest[0]), float(rest[1]))
            elif cmd == "watchers":
                out = {"watchers": store.watcher_count("pods")}
            elif cmd == "poke":
                p = store.get("pods", "small-0", SMALL_NS)
                p["metadata"].pop("resourceVersion", None)
                p["metadata"].setdefault("annotations", {})[STAMP] = str(time.time_ns())
                store.update(p, resource="pods")
                await asyncio.sleep(0.5)
                out = {"watchers": store.watcher_count("pods")}
            elif cmd == "quit":
                break
            else:
                out = {"error": f"unknown command {cmd!r}"}
            print(json.dumps(out), flush=True)
    finally:
        await sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list-pods", type=int, default=50_000, help="pods in the large LIST")
    parser.add_argument("--list-split", type=int, default=10_000, help="pods in the small LIST")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
