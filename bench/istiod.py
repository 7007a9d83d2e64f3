"""The benchmark on the real consumer: istiod reading a peer cluster through apiproxy, against
istiod reading the same peer directly, in one run.

    .venv/bin/python -m bench.istiod          1,000 and 10,000 pods (results/istiod-latest.json)
    .venv/bin/python -m bench.istiod --smoke  20 pods, one run each (tests/bench runs it)

Two clusters come up on loopback as in the istiod tier (tests/istiod/mesh.py, whose harness this
reuses): etcd + kube-apiserver each, kube-controller-manager's EndpointSlice controller in the
peer (beta), `apiproxy serve` and `apiproxy federate` on both sides under the shipped policy and
RBAC, joined by IstioMulticluster objects both ways. No istiod runs in istio-system: the measured
istiod runs in its own namespace (`istio-bench`) of cluster alpha, so that the moment it learns of
the peer is the moment this benchmark writes one remote secret there:

- `apiproxy`: the remote secret alpha's federation wrote (peer JWT, beta's api-proxy), copied;
- `direct`: a kubeconfig for beta's kube-apiserver with the token of a reader ServiceAccount bound
  to Istio's `istio-reader` ClusterRole (rules transcribed from Istio's chart).

Contenders alternate, a fresh istiod for every run. Each run measures:

- time to sync: from writing the remote secret to istiod's /debug/clusterz saying `synced` and its
  /debug/endpointShardz holding every expected ready endpoint of the peer;
- at the first size only, under churn: readiness flips of a small `churn` Service's pods at a
  fixed rate, each timed from its status PATCH to the poll of /debug/endpointShardz that first
  shows it (the poll's own duration is the resolution, reported), while other pods get annotation
  PATCHes in the background (pod watch events that change no endpoint);
- CPU seconds of the proxy (/proc/<pid>/stat), of beta's kube-apiserver and of istiod, per 1,000
  watch events delivered. The events are counted from the objects, not read from the proxy:
  kube-apiserver 1.37 gzips WatchList streams (`sendInitialEvents=true`) for clients that accept
  gzip, as client-go does, and apiproxy's event counter read such a stream as 0 events before it
  learnt to inflate a copy; counting from the objects keeps both ways measured alike. A run's
  events are the initial ADDED events
  (every object of the collections istiod watches, counted with `limit=1` LISTs and
  `remainingItemCount`) plus, under churn, two per readiness flip (the pod, its EndpointSlice)
  and one per background PATCH; bookmarks are left out.

Pods are Istio-injected pods as `apiproxy_dev.sim.seed` writes them (~7 KB with managedFields),
created through the API, then reported Running and Ready with a pod IP through the status
subresource (no kubelet runs); EndpointSlices come from kube-controller-manager.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import re
import shutil
import ssl
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from apiproxy import pki
from apiproxy_dev.sim.seed import pod as seed_pod
from bench.harness import RESULTS, new_result, say, write_result
from bench.run import spread
from tests.istiod.mesh import (
    Istiod,
    Side,
    export_namespace,
    istiod_binary,
    pod_status,
    start_clusters,
    wait_until,
)
from tests.real.cluster import KubeCluster, assets_dir, server_version

NS = "bench"  # the peer's workload namespace
ISTIOD_NS = "istio-bench"  # the measured istiod's own namespace in alpha
CHURN_SVC = "churn"
READER_SA = ("istio-system", "istio-reader-service-account")
STAMP = "bench.apiproxy.io/touched-ns"
CONTENDERS = ("apiproxy", "direct")
SYNC_BOUND = 900.0

# Istio's reader ClusterRole (manifests/charts/istio-control/istio-discovery/templates/
# reader-clusterrole.yaml), as docs/../shared/reference/istiod-remote-access.md §4 lists it.
READER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [
            "config.istio.io",
            "security.istio.io",
            "networking.istio.io",
            "authentication.istio.io",
            "rbac.istio.io",
            "telemetry.istio.io",
            "extensions.istio.io",
        ],
        "resources": ["*"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": [""],
        "resources": [
            "endpoints",
            "pods",
            "services",
            "nodes",
            "replicationcontrollers",
            "namespaces",
            "secrets",
            "configmaps",
        ],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["networking.x-k8s.io", "gateway.networking.k8s.io"],
        "resources": ["gateways"],
        "verbs": ["get", "watch", "list"],
    },
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["multicluster.x-k8s.io"],
        "resources": ["serviceexports"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {
        "apiGroups": ["multicluster.x-k8s.io"],
        "resources": ["serviceimports"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["subjectaccessreviews"],
        "verbs": ["create"],
    },
]


@dataclass(frozen=True)
class Sizes:
    pods: tuple[int, ...]  # pods in the peer, in the order measured (churn at the first)
    repeats: tuple[int, ...]  # istiod runs per contender at each size
    services: int  # the pods spread over this many Services
    churn_pods: int  # pods of the churn Service, whose readiness flips
    churn_seconds: float
    flips_per_second: float  # readiness flips (each one measured)
    background_per_second: float  # annotation PATCHes on the other pods


FULL = Sizes(
    pods=(1_000, 10_000),
    repeats=(3, 2),
    services=100,
    churn_pods=50,
    churn_seconds=30.0,
    flips_per_second=5.0,
    background_per_second=20.0,
)
SMOKE = Sizes(
    pods=(20,),
    repeats=(1,),
    services=4,
    churn_pods=4,
    churn_seconds=4.0,
    flips_per_second=2.0,
    background_per_second=4.0,
)


def pod_ip(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def churn_ip(k: int) -> str:
    return f"10.99.{k // 256}.{k % 256 + 1}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (proc(5)), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples over all labels on the proxy's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------- the peer


class Workloads:
    """The peer's Services and pods, written through its API as a controller and kubelet would."""

    def __init__(self, kube: KubeCluster, sizes: Sizes) -> None:
        self.kube, self.sizes = kube, sizes
        self.pods = 0  # bench pods created so far (pod-0 .. pod-<pods-1>)

    def _session(self) -> aiohttp.ClientSession:
        ctx = ssl.create_default_context(cadata=self.kube.ca.cert_pem)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=32),
            headers={"Authorization": f"Bearer {self.kube.admin_token}"},
        )

    def services(self) -> None:
        # Exported: the shipped policy shows a peer only labelled namespaces (and istio-system).
        export_namespace(self.kube, NS)
        names = [f"svc-{k}" for k in range(self.sizes.services)] + [CHURN_SVC]
        for name in names:
            self.kube.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {
                        "selector": {"app": name},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                    },
                }
            )
        asyncio.run(self._pods([(f"churn-{k}", CHURN_SVC, churn_ip(k), k) for k in self._churn()]))

    def _churn(self) -> range:
        return range(self.sizes.churn_pods)

    def grow(self, total: int) -> float:
        """Create bench pods up to `total`, each Running and Ready; seconds it took."""
        t0 = time.monotonic()
        todo = [
            (f"pod-{i}", f"svc-{i % self.sizes.services}", pod_ip(i), i)
            for i in range(self.pods, total)
        ]
        asyncio.run(self._pods(todo))
        self.pods = total
        return time.monotonic() - t0

    async def _pods(self, todo: list[tuple[str, str, str, int]]) -> None:
        base = f"{self.kube.url}/api/v1/namespaces/{NS}/pods"
        queue: asyncio.Queue[tuple[str, str, str, int]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        async with self._session() as s:

            async def worker() -> None:
                while not queue.empty():
                    name, app, ip, i = queue.get_nowait()
                    body = seed_pod(NS, name, app, "node-1", i)
                    meta = body["metadata"]
                    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
                        meta.pop(key, None)
                    body.pop("status", None)
                    body["spec"]["nodeName"] = "node-1"
                    async with s.post(base, json=body) as r:
                        if r.status != 201:
                            raise RuntimeError(f"create {name}: {r.status} {await r.text()}")
                    async with s.patch(
                        f"{base}/{name}/status",
                        data=json.dumps(pod_status(ip, True)),
                        headers={"Content-Type": "application/merge-patch+json"},
                    ) as r:
                        if r.status != 200:
                            raise RuntimeError(f"status {name}: {r.status} {await r.text()}")

            await asyncio.gather(*(worker() for _ in range(24)))

    def expected(self) -> int:
        return self.pods + self.sizes.churn_pods

    def ready_in_slices(self) -> int:
        slices = self.kube.ok("GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices")
        return sum(
            1
            for s in slices["items"]
            for ep in s.get("endpoints") or []
            if (ep.get("conditions") or {}).get("ready")
        )

    def wait_slices(self, timeout: float = 600) -> float:
        """Until kube-controller-manager's EndpointSlices list every pod as ready."""
        want = self.expected()
        _, took = wait_until(
            lambda: self.ready_in_slices() == want or None,
            timeout,
            f"EndpointSlices in {NS} list {want} ready endpoints",
            interval=1.0,
        )
        return took

    def set_ready(self, name: str, ip: str, ready: bool) -> None:
        self.kube.ok(
            "PATCH",
            f"/api/v1/namespaces/{NS}/pods/{name}/status",
            pod_status(ip, ready),
            content_type="application/merge-patch+json",
        )

    def touch(self, i: int) -> None:
        """An annotation PATCH: one pod watch event, no endpoint change."""
        self.kube.ok(
            "PATCH",
            f"/api/v1/namespaces/{NS}/pods/pod-{i % max(self.pods, 1)}",
            {"metadata": {"annotations": {STAMP: str(time.time_ns())}}},
            content_type="application/merge-patch+json",
        )


# ------------------------------------------------------------------------------- what istiod holds


def ready_counts(istiod: Istiod, cluster_id: str) -> tuple[int, set[str], float]:
    """(ready endpoints of the peer in NS, ready IPs of the churn Service, poll seconds)."""
    t0 = time.monotonic()
    shards = istiod.debug("endpointShardz") or {}
    took = time.monotonic() - t0
    key = f"Kubernetes/{cluster_id}"
    total, churn = 0, set()
    for host, by_ns in shards.items():
        eps = ((by_ns.get(NS) or {}).get("Shards") or {}).get(key) or []
        for ep in eps:
            if ep.get("HealthStatus", 1) != 1:
                continue
            total += 1
            if host.startswith(f"{CHURN_SVC}.{NS}."):
                churn.update(ep.get("Addresses") or [])
    return total, churn, took


# ------------------------------------------------------------------------------------- the bench


class IstiodBench:
    def __init__(self, sizes: Sizes, work: Path) -> None:
        self.sizes, self.work = sizes, work
        self.kubes: list[KubeCluster] = []
        self.sides: list[Side] = []
        self.istiod_bin = istiod_binary()
        self.assets = assets_dir()
        self.secrets: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        ca = pki.make_ca("bench CA")
        tls = pki.server_cert_for_loopback(ca)
        self.kubes = [KubeCluster(self.assets, name=n) for n in ("bench-a", "bench-b")]
        t0 = time.monotonic()
        # Only the peer needs EndpointSlices from kube-controller-manager.
        start_clusters(self.kubes, controller_manager=False)
        self.kubes[1].start_controller_manager()
        for kube, name, gw in zip(
            self.kubes, ("alpha", "beta"), ("192.0.2.10", "192.0.2.20"), strict=True
        ):
            workdir = self.work / name
            side = Side(name, kube, workdir, tls, pki.make_ca(f"istio root {name}"))
            self.sides.append(side)
            side.prepare(gw)
            side.start_proxy()
            side.start_federate()
        a, b = self.sides
        a.join(b, "beta", ca.cert_pem)
        b.join(a, "alpha", ca.cert_pem)
        self.secrets["apiproxy"] = self._federated_secret()
        self.secrets["direct"] = self._direct_secret()
        a.kube.ensure_namespace(ISTIOD_NS)
        self.info["setup_seconds"] = round(time.monotonic() - t0, 1)
        self.info["kube_apiserver"] = ".".join(map(str, server_version(self.assets)))
        self.info["istiod"] = istiod_version()
        say(f"  two clusters joined in {self.info['setup_seconds']} s")

    def _federated_secret(self) -> dict[str, Any]:
        """The remote secret alpha's federation wrote for beta, once beta's proxy accepts it."""
        a, b = self.sides
        path = "/api/v1/namespaces/istio-system/secrets/istio-remote-secret-beta"

        def written() -> dict[str, Any] | None:
            status, body = a.kube.request("GET", path)
            return body if status == 200 else None

        secret, _ = wait_until(written, 120, "alpha's federation writes beta's remote secret")
        ((cid, value),) = secret["data"].items()
        assert cid == b.cluster_id, (cid, b.cluster_id)
        kc = yaml.safe_load(base64.b64decode(value))
        token = kc["users"][0]["user"]["token"]
        ca = base64.b64decode(kc["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        server = kc["clusters"][0]["cluster"]["server"]
        assert server == f"https://127.0.0.1:{b.proxy_port}", server

        def accepted() -> bool:
            req = urllib.request.Request(f"{server}/api/v1/namespaces/{NS}/pods?limit=1")  # noqa: S310
            req.add_header("Authorization", f"Bearer {token}")
            try:
                ctx = ssl.create_default_context(cadata=ca)
                with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310
                    return bool(resp.status == 200)
            except OSError:
                return False

        # beta's federation puts alpha in its peers Secret; the projection and reload follow.
        wait_until(accepted, 120, "beta's api-proxy accepts alpha's credential")
        return {cid: value}

    def _direct_secret(self) -> dict[str, Any]:
        """A kubeconfig for beta's kube-apiserver with an istio-reader ServiceAccount's token."""
        b = self.sides[1]
        b.kube.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "istio-reader-clusterrole-istio-system"},
                "rules": READER_RULES,
            }
        )
        b.kube.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "istio-reader-clusterrole-istio-system"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "istio-reader-clusterrole-istio-system",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": READER_SA[1], "namespace": READER_SA[0]}
                ],
            }
        )
        token = b.kube.service_account_token(*READER_SA, seconds=24 * 3600)
        kc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": b.cluster_id,
                    "cluster": {
                        "server": b.kube.url,
                        "certificate-authority-data": base64.b64encode(
                            b.kube.ca.cert_pem.encode()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": b.cluster_id, "user": {"token": token}}],
            "contexts": [
                {"name": b.cluster_id, "context": {"cluster": b.cluster_id, "user": b.cluster_id}}
            ],
            "current-context": b.cluster_id,
        }
        return {b.cluster_id: base64.b64encode(yaml.safe_dump(kc).encode()).decode()}

    # -- one istiod run -------------------------------------------------------------------------

    def run_once(
        self, contender: str, workloads: Workloads, tag: str, churn: bool
    ) -> dict[str, Any]:
        a, b = self.sides
        assert b.proxy is not None
        assert b.proxy.proc is not None
        proxy_pid = b.proxy.proc.pid
        api_pid = b.kube._apiserver.pid if b.kube._apiserver else 0
        istiod = Istiod(
            self.istiod_bin,
            self.work / "istiod" / f"{contender}-{tag}",
            a.workdir / "admin.kubeconfig",
            a.cluster_id,
            a.root,
            namespace=ISTIOD_NS,
            # Past its 30 s default istiod reports a slow first sync as `timeout` for good, even
            # once it completes: the bound here is the benchmark's own.
            extra_env={"PILOT_REMOTE_CLUSTER_TIMEOUT": f"{SYNC_BOUND:.0f}s"},
        ).start()
        assert istiod.child is not None
        assert istiod.child.proc is not None
        istiod_pid = istiod.child.proc.pid
        secret = "istio-remote-secret-bench"  # noqa: S105 - a name
        out: dict[str, Any] = {}
        try:
            cpu0 = (cpu_seconds(proxy_pid), cpu_seconds(api_pid), cpu_seconds(istiod_pid))
            events0 = metric(b.metrics_port, "apiproxy_watch_events_total")
            requests0 = self.istiod_requests()
            initial = self.initial_events()
            want = workloads.expected()
            t0 = time.monotonic()
            a.kube.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": secret,
                        "namespace": ISTIOD_NS,
                        "labels": {"istio/multiCluster": "true"},
                    },
                    "data": self.secrets[contender],
                }
            )
            _, synced = wait_until(
                lambda: istiod.clusters().get(b.cluster_id) == "synced" or None,
                SYNC_BOUND,
                f"{contender}: istiod lists beta as synced",
                interval=0.05,
            )
            polls: list[float] = []

            def full() -> bool:
                n, _, took = ready_counts(istiod, b.cluster_id)
                polls.append(took)
                return n == want

            wait_until(
                lambda: full() or None,
                SYNC_BOUND,
                f"{contender}: istiod holds {want} ready endpoints of beta",
                interval=0.05 if want < 2_000 else 0.2,
            )
            all_in = time.monotonic() - t0
            cpu1 = (cpu_seconds(proxy_pid), cpu_seconds(api_pid), cpu_seconds(istiod_pid))
            out["sync"] = {
                "synced_s": round(synced, 3),
                "all_endpoints_s": round(all_in, 3),
                "endpoints": want,
                "poll_ms_median": round(statistics.median(polls) * 1000, 1),
                "proxy_cpu_s": round(cpu1[0] - cpu0[0], 2),
                "apiserver_cpu_s": round(cpu1[1] - cpu0[1], 2),
                "istiod_cpu_s": round(cpu1[2] - cpu0[2], 2),
                "initial_events": initial,
            }
            if initial:
                out["sync"]["proxy_cpu_s_per_1k_events"] = round(
                    (cpu1[0] - cpu0[0]) / initial * 1000, 3
                )
            if churn:
                out["churn"] = ch = self.churn(istiod, workloads, proxy_pid)
                # Each flip is one pod and one EndpointSlice event, each background PATCH one pod
                # event.
                events = 2 * ch["flips"] + ch["background_patches"]
                ch["events_estimate"] = events
                if contender == "apiproxy" and events:
                    ch["proxy_cpu_s_per_1k_events"] = round(ch["proxy_cpu_s"] / events * 1000, 3)
            istiod.check_alive()
        finally:
            istiod.stop()
            a.kube.request("DELETE", f"/api/v1/namespaces/{ISTIOD_NS}/secrets/{secret}")
        # The proxy counts a watch's events when it ends: wait until istiod's have all ended.
        wait_until(
            lambda: metric(b.metrics_port, "apiproxy_open_watches") == 0 or None,
            60,
            "every watch through the proxy ended",
        )
        counted = metric(b.metrics_port, "apiproxy_watch_events_total") - events0
        events = initial + (out["churn"]["events_estimate"] if "churn" in out else 0)
        proxy_cpu = cpu_seconds(proxy_pid) - cpu0[0]
        out["run"] = {
            "proxy_cpu_s": round(proxy_cpu, 2),
            "apiserver_cpu_s": round(cpu_seconds(api_pid) - cpu0[1], 2),
            "proxy_requests": self.istiod_requests() - requests0,
            "events_delivered": events,
            # What apiproxy itself counted (through gzip since the counter inflates a copy).
            "proxy_watch_events_metric": int(counted),
        }
        if contender == "apiproxy":
            out["run"]["proxy_cpu_s_per_1k_events"] = round(proxy_cpu / events * 1000, 3)
        return out

    def istiod_requests(self) -> int:
        """Requests from istiod (its User-Agent) that beta's proxy audited; alpha's federation
        probes the proxy too."""
        return sum(
            1
            for r in self.sides[1].proxy_audit()
            if r.get("stage") == "ResponseComplete"
            and str(r.get("userAgent", "")).startswith("pilot-discovery")
        )

    def initial_events(self) -> int:
        """Objects in the collections istiod watches in the peer (its initial ADDED events)."""
        kube = self.sides[1].kube
        total = 0
        for path in (
            "/api/v1/pods",
            "/api/v1/services",
            "/api/v1/namespaces",
            "/api/v1/nodes",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        ):
            page = kube.ok("GET", f"{path}?limit=1")
            total += len(page["items"]) + int(page["metadata"].get("remainingItemCount") or 0)
        return total

    def churn(self, istiod: Istiod, workloads: Workloads, proxy_pid: int) -> dict[str, Any]:
        """Readiness flips of the churn pods, each timed to the poll that first shows it."""
        b = self.sides[1]
        s = self.sizes
        state = dict.fromkeys(range(s.churn_pods), True)
        pending: dict[int, tuple[bool, float]] = {}  # pod -> (wants ready, sent at)
        lock = threading.Lock()
        delays: list[float] = []
        missed = 0
        stop = threading.Event()
        errors: list[BaseException] = []
        flips = touches = 0

        def paced(rate: float, action: Any) -> Any:
            """action(i) for i = 0, 1, ... at `rate` per second, until `stop`."""

            def run() -> None:
                start = time.monotonic()
                i = 0
                while not stop.is_set():
                    due = start + i / rate
                    if stop.wait(max(due - time.monotonic(), 0)):
                        return
                    action(i)
                    i += 1

            return run

        def flip(i: int) -> None:
            nonlocal missed, flips
            k = i % s.churn_pods
            want = not state[k]
            with lock:
                if k in pending:
                    missed += 1  # not seen before its next flip
                pending[k] = (want, time.monotonic())
            state[k] = want
            workloads.set_ready(f"churn-{k}", churn_ip(k), want)
            flips += 1

        def touch(i: int) -> None:
            nonlocal touches
            workloads.touch(i)
            touches += 1

        flipper = paced(s.flips_per_second, flip)
        toucher = paced(s.background_per_second, touch)

        def guarded(fn: Any) -> Any:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()

            return run

        threads = [threading.Thread(target=guarded(f), daemon=True) for f in (flipper, toucher)]
        polls: list[float] = []
        cpu0 = cpu_seconds(proxy_pid)
        end = time.monotonic() + s.churn_seconds
        for t in threads:
            t.start()
        try:
            while not errors:
                now = time.monotonic()
                if now > end:
                    stop.set()
                    with lock:
                        if not pending or now > end + 30:
                            break
                _, ips, took = ready_counts(istiod, b.cluster_id)
                seen_at = time.monotonic()
                polls.append(took)
                with lock:
                    for k, (want, sent) in list(pending.items()):
                        # Only flips sent before this poll started can show in it.
                        if sent <= seen_at - took and (churn_ip(k) in ips) == want:
                            delays.append(seen_at - sent)
                            del pending[k]
                time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        if errors:
            raise errors[0]
        proxy_cpu = cpu_seconds(proxy_pid) - cpu0
        lost = len(pending)
        # Every churn pod ready again before the next run counts its endpoints.
        for k in range(s.churn_pods):
            if not state[k]:
                workloads.set_ready(f"churn-{k}", churn_ip(k), True)
        workloads.wait_slices()
        ms = [d * 1000 for d in delays]
        return {
            "flips": flips,
            "background_patches": touches,
            "seen": len(delays),
            "superseded": missed,
            "never_seen": lost,
            "delay_p50_ms": round(percentile(ms, 50), 1),
            "delay_p99_ms": round(percentile(ms, 99), 1),
            "delay_max_ms": round(max(ms), 1) if ms else None,
            "poll_ms_median": round(statistics.median(polls) * 1000, 1) if polls else None,
            "proxy_cpu_s": round(proxy_cpu, 2),
            "delays_ms": [round(m, 1) for m in ms],
        }

    def close(self) -> None:
        for side in self.sides:
            with contextlib.suppress(Exception):
                side.stop()
        died: AssertionError | None = None
        for kube in self.kubes:
            if hasattr(kube, "workdir"):
                try:
                    kube.check_alive()  # a crash during the run is an error, not a footnote
                except AssertionError as exc:
                    died = died or exc
                kube.stop()
        if died is not None:
            raise died


def istiod_version() -> str | None:
    """The istio.io/istio module version tools/istiod pins (pilot-discovery reports none)."""
    gomod = Path(__file__).resolve().parents[1] / "tools" / "istiod" / "go.mod"
    with contextlib.suppress(OSError):
        for line in gomod.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "istio.io/istio":
                return parts[1]
    return None


# ------------------------------------------------------------------------------------- summary


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians per size and contender, ratios against direct."""
    out: dict[str, Any] = {}
    for size, by_c in runs.items():
        row: dict[str, Any] = {}
        for c, rs in by_c.items():
            sync = [r["sync"] for r in rs]
            row[c] = {
                key: spread([x[key] for x in sync])
                for key in (
                    "synced_s",
                    "all_endpoints_s",
                    "proxy_cpu_s",
                    "apiserver_cpu_s",
                    "istiod_cpu_s",
                )
            }
            if c == "apiproxy":
                row[c]["proxy_cpu_s_per_1k_events"] = spread(
                    [r["run"]["proxy_cpu_s_per_1k_events"] for r in rs]
                )
                row[c]["sync_proxy_cpu_s_per_1k_events"] = spread(
                    [r["sync"]["proxy_cpu_s_per_1k_events"] for r in rs]
                )
                row[c]["events_delivered"] = spread([r["run"]["events_delivered"] for r in rs])
            churns = [r["churn"] for r in rs if "churn" in r]
            if churns:
                pooled = [d for ch in churns for d in ch["delays_ms"]]
                row[c]["churn"] = {
                    "delay_p50_ms": round(percentile(pooled, 50), 1),
                    "delay_p99_ms": round(percentile(pooled, 99), 1),
                    "samples": len(pooled),
                    "per_run_p50_ms": spread([ch["delay_p50_ms"] for ch in churns]),
                    "per_run_p99_ms": spread([ch["delay_p99_ms"] for ch in churns]),
                    "superseded": sum(ch["superseded"] for ch in churns),
                    "never_seen": sum(ch["never_seen"] for ch in churns),
                    "proxy_cpu_s_per_1k_events": spread(
                        [ch.get("proxy_cpu_s_per_1k_events") or 0.0 for ch in churns]
                    ),
                    "poll_ms_median": statistics.median(
                        ch["poll_ms_median"] for ch in churns if ch["poll_ms_median"] is not None
                    ),
                }
        if "apiproxy" in row and "direct" in row:
            d, p = row["direct"], row["apiproxy"]
            ratios = {}
            for key in ("synced_s", "all_endpoints_s"):
                if d[key]["median"]:
                    ratios[key] = round(p[key]["median"] / d[key]["median"], 2)
            if "churn" in p and "churn" in d:
                for key in ("delay_p50_ms", "delay_p99_ms"):
                    if d["churn"][key]:
                        ratios[key] = round(p["churn"][key] / d["churn"][key], 2)
            row["ratio_apiproxy_to_direct"] = ratios
        out[size] = row
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [
        "pods    contender  sync (s)  all endpoints (s)  proxy CPU (s)  apiserver CPU (s)  "
        "readiness p50/p99 (ms)  proxy CPU s/1k events"
    ]
    for size, row in summary.items():
        for c in CONTENDERS:
            r = row.get(c)
            if not r:
                continue
            ch = r.get("churn")
            lat = f"{ch['delay_p50_ms']:.0f}/{ch['delay_p99_ms']:.0f}" if ch else "-"
            per = r.get("proxy_cpu_s_per_1k_events")
            lines.append(
                f"{size:>6}  {c:<9}  {r['synced_s']['median']:8.2f}  "
                f"{r['all_endpoints_s']['median']:17.2f}  {r['proxy_cpu_s']['median']:13.2f}  "
                f"{r['apiserver_cpu_s']['median']:17.2f}  {lat:>22}  "
                f"{per['median'] if per else '-':>21}"
            )
        if "ratio_apiproxy_to_direct" in row:
            lines.append(f"{'':>6}  ratio apiproxy/direct: {row['ratio_apiproxy_to_direct']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="20 pods, one run per contender")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/istiod-*.json)")
    parser.add_argument("--pods", help="comma-separated sizes, e.g. 1000,10000")
    parser.add_argument("--repeats", help="comma-separated runs per contender, one per size")
    parser.add_argument("--churn-seconds", type=float, help="length of the churn phase")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.pods:
        pods = tuple(int(x) for x in args.pods.split(","))
        reps = tuple(int(x) for x in args.repeats.split(",")) if args.repeats else (1,) * len(pods)
        sizes = Sizes(**{**asdict(sizes), "pods": pods, "repeats": reps})
    if args.churn_seconds is not None:
        sizes = Sizes(**{**asdict(sizes), "churn_seconds": args.churn_seconds})
    assert len(sizes.repeats) == len(sizes.pods), "--repeats needs one figure per size"
    out = args.out or RESULTS / ("istiod-smoke.json" if args.smoke else "istiod-latest.json")
    started = time.monotonic()
    result = new_result("istiod-smoke" if args.smoke else "istiod-full", "bench.istiod", argv)
    result["load_average_at_start"] = os.getloadavg()
    result["sizes"] = asdict(sizes)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    work = Path(tempfile.mkdtemp(prefix="apiproxy-bench-istiod-"))
    bench = IstiodBench(sizes, work)
    try:
        say("== setup: two clusters, apiproxy serve + federate on each, joined both ways")
        bench.start()
        workloads = Workloads(bench.sides[1].kube, sizes)
        workloads.services()
        seeding: dict[str, float] = {}
        for n, (size, repeats) in enumerate(zip(sizes.pods, sizes.repeats, strict=True)):
            took = workloads.grow(size)
            slices = workloads.wait_slices()
            seeding[str(size)] = round(took + slices, 1)
            say(f"== {size} pods: created and ready in {took:.1f} s, slices +{slices:.1f} s")
            runs[str(size)] = {c: [] for c in CONTENDERS}
            for rep in range(repeats):
                order = CONTENDERS if rep % 2 == 0 else tuple(reversed(CONTENDERS))
                for c in order:
                    r = bench.run_once(c, workloads, f"{size}-{rep}", churn=n == 0)
                    runs[str(size)][c].append(r)
                    ch = r.get("churn")
                    say(
                        f"  {c:<8} run {rep + 1}/{repeats}: synced {r['sync']['synced_s']:.2f} s, "
                        f"all {r['sync']['endpoints']} endpoints {r['sync']['all_endpoints_s']:.2f}"
                        f" s; proxy CPU {r['run']['proxy_cpu_s']:.2f} s for "
                        f"{r['run']['events_delivered']} events"
                        + (
                            f"; readiness p50/p99 {ch['delay_p50_ms']:.0f}/"
                            f"{ch['delay_p99_ms']:.0f} ms ({ch['seen']} flips)"
                            if ch
                            else ""
                        )
                    )
        result["seed_seconds"] = seeding
        result["setup"] = bench.info
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        say(f"FAILED: {result['error']} (logs in {work})")
        args.keep = True
    finally:
        try:
            bench.close()
        except AssertionError as exc:  # a kube-apiserver or etcd died during the run
            first = result.get("error", "")
            result["error"] = (first + "\n" if first else "") + f"cluster died: {exc}"[:4000]
            say(f"FAILED: {result['error']}")
            args.keep = True
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["runs"] = runs
    result["summary"] = summarize({k: v for k, v in runs.items() if all(v.values())})
    result["load_average_at_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(table(result["summary"]))
    write_result(out, result)
    say(f"wrote {out} ({result['wall_seconds']} s)")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
