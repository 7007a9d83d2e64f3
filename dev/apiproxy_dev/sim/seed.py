"""Realistic cluster contents for benchmarks and the demo, and a churn generator.

Object bodies follow what a real cluster returns (managedFields, sidecar containers, status
conditions): a seeded pod is ~5 KB of JSON, like the 4-8 KB of a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import random
import time
from dataclasses import dataclass
from typing import Any

from apiproxy.log import get_logger
from apiproxy.tasks import cancel_and_wait
from apiproxy_dev.sim.errors import ApiError
from apiproxy_dev.sim.store import Obj, Store, now_rfc3339

log = get_logger("apiproxy_dev.sim.seed")

_POD_NET = ipaddress.IPv4Network("10.64.0.0/10")
_NODE_NET = ipaddress.IPv4Network("192.168.0.0/16")
_SVC_NET = ipaddress.IPv4Network("10.96.0.0/12")


_rand = random.Random()  # noqa: S311 - identifiers for fake objects, not secrets


def _uid() -> str:
    h = f"{_rand.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def _hex64() -> str:
    return f"{_rand.getrandbits(256):064x}"


def _ip(net: ipaddress.IPv4Network, i: int) -> str:
    return str(net.network_address + 10 + i)


def _managed(manager: str, operation: str, ts: str, fields: dict[str, Any], sub: str = "") -> Obj:
    out: Obj = {
        "manager": manager,
        "operation": operation,
        "apiVersion": "v1",
        "time": ts,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    if sub:
        out["subresource"] = sub
    return out


def pod(
    namespace: str,
    name: str,
    app: str,
    node: str,
    i: int,
    ts: str = "",
    *,
    labels: dict[str, str] | None = None,
    managed_fields: bool = True,
) -> Obj:
    """A pod as a real cluster stores it: app container + istio-proxy sidecar, full status.

    `labels` are added to the pod's own; `managed_fields=False` leaves out metadata.managedFields
    (~2.8 KB of the ~7 KB), as clients that strip them (informers with a transform) see pods."""
    ts = ts or now_rfc3339()
    ip = _ip(_POD_NET, i)
    owner_uid = _uid()
    labels = {
        "app": app,
        "pod-template-hash": "7d4b9c8f6d",
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": app,
        "service.istio.io/canonical-revision": "v1",
        "version": "v1",
        **(labels or {}),
    }
    cond_types = (
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    )
    out: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": namespace,
            "uid": _uid(),
            "creationTimestamp": ts,
            "labels": labels,
            "annotations": {
                "istio.io/rev": "default",
                "kubectl.kubernetes.io/default-container": app,
                "prometheus.io/path": "/stats/prometheus",
                "prometheus.io/port": "15020",
                "prometheus.io/scrape": "true",
                "sidecar.istio.io/status": '{"initContainers":["istio-init"],"containers":'
                '["istio-proxy"],"volumes":["workload-socket","credential-socket",'
                '"workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token",'
                '"istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}',
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": name.rsplit("-", 1)[0],
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                _managed(
                    "kube-controller-manager",
                    "Update",
                    ts,
                    {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": {"f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                            "f:ownerReferences": {f'k:{{"uid":"{owner_uid}"}}': {}},
                        },
                        "f:spec": {
                            "f:containers": {
                                f'k:{{"name":"{app}"}}': {
                                    "f:image": {},
                                    "f:imagePullPolicy": {},
                                    "f:name": {},
                                    "f:ports": {},
                                    "f:resources": {},
                                    "f:terminationMessagePath": {},
                                    "f:terminationMessagePolicy": {},
                                }
                            },
                            "f:dnsPolicy": {},
                            "f:enableServiceLinks": {},
                            "f:restartPolicy": {},
                            "f:schedulerName": {},
                            "f:securityContext": {},
                            "f:terminationGracePeriodSeconds": {},
                        },
                    },
                ),
                _managed(
                    "kubelet",
                    "Update",
                    ts,
                    {
                        "f:status": {
                            "f:conditions": {
                                f'k:{{"type":"{t}"}}': {
                                    ".": {},
                                    "f:lastProbeTime": {},
                                    "f:lastTransitionTime": {},
                                    "f:status": {},
                                    "f:type": {},
                                }
                                for t in cond_types
                            },
                            "f:containerStatuses": {},
                            "f:hostIP": {},
                            "f:hostIPs": {},
                            "f:initContainerStatuses": {},
                            "f:phase": {},
                            "f:podIP": {},
                            "f:podIPs": {".": {}, f'k:{{"ip":"{ip}"}}': {".": {}, "f:ip": {}}},
                            "f:startTime": {},
                        }
                    },
                    sub="status",
                ),
            ],
        },
        "spec": {
            "volumes": [
                {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
                {"name": "istio-data", "emptyDir": {}},
                {
                    "name": "istio-podinfo",
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "labels",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels"},
                            },
                            {
                                "path": "annotations",
                                "fieldRef": {
                                    "apiVersion": "v1",
                                    "fieldPath": "metadata.annotations",
                                },
                            },
                        ],
                        "defaultMode": 420,
                    },
                },
                {
                    "name": "istio-token",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "istio-ca",
                                    "expirationSeconds": 43200,
                                    "path": "istio-token",
                                }
                            }
                        ],
                        "defaultMode": 420,
                    },
                },
                {
                    "name": "istiod-ca-cert",
                    "configMap": {"name": "istio-ca-root-cert", "defaultMode": 420},
                },
                {
                    "name": "kube-api-access",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                },
            ],
            "containers": [
                {
                    "name": app,
                    "image": f"registry.example.com/{app}:1.4.2",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}
                            },
                        }
                    ],
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "256Mi"},
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                    },
                    "volumeMounts": [
                        {
                            "name": "kube-api-access",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                },
                {
                    "name": "istio-proxy",
                    "image": "docker.io/istio/proxyv2:1.24.2",
                    "args": [
                        "proxy",
                        "sidecar",
                        "--domain",
                        "$(POD_NAMESPACE).svc.cluster.local",
                        "--proxyLogLevel=warning",
                        "--log_output_level=default:info",
                    ],
                    "ports": [
                        {"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}
                    ],
                    "env": [
                        {"name": k, "value": v}
                        for k, v in (
                            ("PILOT_CERT_PROVIDER", "istiod"),
                            ("CA_ADDR", "istiod.istio-system.svc:15012"),
                            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
                            ("ISTIO_META_WORKLOAD_NAME", app),
                            ("ISTIO_META_MESH_ID", "cluster.local"),
                            ("TRUST_DOMAIN", "cluster.local"),
                        )
                    ],
                    "resources": {
                        "limits": {"cpu": "2", "memory": "1Gi"},
                        "requests": {"cpu": "10m", "memory": "40Mi"},
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"},
                        "periodSeconds": 15,
                        "timeoutSeconds": 3,
                        "successThreshold": 1,
                        "failureThreshold": 4,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                    "securityContext": {
                        "runAsUser": 1337,
                        "runAsGroup": 1337,
                        "runAsNonRoot": True,
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                },
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app,
            "serviceAccount": app,
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
                for t in cond_types
            ],
            "hostIP": _ip(_NODE_NET, hash(node) % 60000),
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": ts,
            "containerStatuses": [
                {
                    "name": c,
                    "state": {"running": {"startedAt": ts}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": img,
                    "imageID": img + "@sha256:" + _hex64(),
                    "containerID": "containerd://" + _hex64(),
                    "started": True,
                }
                for c, img in (
                    (app, f"registry.example.com/{app}:1.4.2"),
                    ("istio-proxy", "docker.io/istio/proxyv2:1.24.2"),
                )
            ],
            "qosClass": "Burstable",
        },
    }
    if not managed_fields:
        del out["metadata"]["managedFields"]
    return out


def node(name: str, i: int) -> Obj:
    ts = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/region": "region-1",
                "topology.kubernetes.io/zone": f"zone-{i % 3}",
            },
        },
        "spec": {"podCIDR": f"10.{64 + i // 256}.{i % 256}.0/24"},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": _ip(_NODE_NET, i)},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": ts,
                    "lastTransitionTime": ts,
                }
            ],
            "capacity": {"cpu": "16", "memory": "65843292Ki", "pods": "110"},
            "allocatable": {"cpu": "15800m", "memory": "64000000Ki", "pods": "110"},
            "nodeInfo": {
                "kubeletVersion": "v1.32.0",
                "containerRuntimeVersion": "containerd://1.7.24",
                "osImage": "Ubuntu 24.04 LTS",
                "architecture": "amd64",
                "operatingSystem": "linux",
            },
        },
    }


@dataclass(slots=True)
class Seeded:
    namespaces: int = 0
    services: int = 0
    pods: int = 0
    nodes: int = 0


def seed(
    store: Store,
    *,
    pods: int = 0,
    namespaces: int = 10,
    services_per_namespace: int = 5,
    nodes: int = 0,
) -> Seeded:
    """Fill the store: namespaces, nodes, services with Endpoints and EndpointSlices, pods."""
    out = Seeded()
    ts = now_rfc3339()
    nodes = nodes or max(1, pods // 100)
    r = store.registry.types
    store.bulk_create(r["nodes"], (node(f"node-{i}", i) for i in range(nodes)))
    out.nodes = nodes
    ns_names = [f"ns-{i}" for i in range(namespaces)]
    store.bulk_create(
        r["namespaces"],
        (
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": n,
                    "labels": {"kubernetes.io/metadata.name": n, "istio-injection": "enabled"},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            for n in ns_names
        ),
    )
    out.namespaces = namespaces
    apps = [(ns, f"app-{j}") for ns in ns_names for j in range(services_per_namespace)]
    pods_by_app: dict[tuple[str, str], list[tuple[str, str]]] = {a: [] for a in apps}

    def gen_pods() -> Any:
        for i in range(pods):
            ns, app = apps[i % len(apps)]
            name = f"{app}-7d4b9c8f6d-{i:05d}"
            p = pod(ns, name, app, f"node-{i % nodes}", i, ts)
            pods_by_app[(ns, app)].append((name, p["status"]["podIP"]))
            yield p

    out.pods = store.bulk_create(r["pods"], gen_pods())
    store.bulk_create(
        r["services"],
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": _ip(_SVC_NET, k),
                    "clusterIPs": [_ip(_SVC_NET, k)],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                    "selector": {"app": app},
                    "sessionAffinity": "None",
                    "ipFamilies": ["IPv4"],
                    "ipFamilyPolicy": "SingleStack",
                },
                "status": {"loadBalancer": {}},
            }
            for k, (ns, app) in enumerate(apps)
        ),
    )
    out.services = len(apps)
    store.bulk_create(
        r["endpoints"],
        (
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
                "subsets": [
                    {
                        "addresses": [
                            {"ip": ip, "targetRef": {"kind": "Pod", "name": n, "namespace": ns}}
                            for n, ip in pods_by_app[(ns, app)]
                        ],
                        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    }
                ],
            }
            for ns, app in apps
        ),
    )
    store.bulk_create(
        r["endpointslices.discovery.k8s.io"],
        (
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{app}-abcde",
                    "namespace": ns,
                    "labels": {
                        "kubernetes.io/service-name": app,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": [ip],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "targetRef": {"kind": "Pod", "name": n, "namespace": ns},
                    }
                    for n, ip in pods_by_app[(ns, app)]
                ],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
            for ns, app in apps
        ),
    )
    return out


def add_pods(
    store: Store,
    namespace: str,
    count: int,
    *,
    start: int = 0,
    prefix: str = "pod",
    labels: dict[str, str] | None = None,
    managed_fields: bool = True,
) -> int:
    """Create `count` pods `<prefix>-<start>`... in `namespace` (created if missing), spread over
    `app-0`..`app-96` and `node-0`..`node-49`; returns how many were created."""
    r = store.registry.types
    with contextlib.suppress(ApiError):  # already there
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    ts = now_rfc3339()
    return store.bulk_create(
        r["pods"],
        (
            pod(
                namespace,
                f"{prefix}-{i}",
                f"app-{i % 97}",
                f"node-{i % 50}",
                i,
                ts,
                labels=labels,
                managed_fields=managed_fields,
            )
            for i in range(start, start + count)
        ),
    )


class Churn:
    """Modify seeded pods at `rate` changes per second (status flips, label bumps) until stopped.

    `async with Churn(store, 100):` or `churn.start()` / `await churn.stop()`; or
    `await churn.run_for(seconds)` for a timed burst (`rate` 0: as fast as the loop allows).
    `namespace` limits the changes to that namespace's pods; `stamp` names an annotation set to
    `time.time_ns()` on every change (benchmarks measure delivery latency with it).
    """

    def __init__(
        self,
        store: Store,
        rate: float,
        *,
        seed_: int | None = None,
        namespace: str | None = None,
        stamp: str | None = None,
    ) -> None:
        self.store = store
        self.rate = rate
        self.changes = 0
        self.namespace = namespace
        self.stamp = stamp
        self._rng = random.Random(seed_)  # noqa: S311 - load generation, not security
        self._task: asyncio.Task[None] | None = None
        self._keys: tuple[list[str], list[str]] | None = None  # (all keys, those in namespace)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def __aenter__(self) -> Churn:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def step(self) -> None:
        """One change: touch a random pod's status (and sometimes a label)."""
        rt = self.store.registry.types["pods"]
        with self.store._lock:
            objects = self.store._t(rt).objects
            if not objects:
                return
            key = self._pick()
            obj = objects[key].obj()
            ts = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for c in (obj.get("status") or {}).get("conditions") or []:
                if c.get("type") == "Ready":
                    c["status"] = "False" if c["status"] == "True" else "True"
                    c["lastTransitionTime"] = ts
            if self._rng.random() < 0.1:
                obj["metadata"].setdefault("labels", {})["churn"] = str(self.changes)
            if self.stamp:
                obj["metadata"].setdefault("annotations", {})[self.stamp] = str(time.time_ns())
            obj["metadata"].pop("resourceVersion", None)
            self.store.update(obj)
        self.changes += 1

    def _pick(self) -> str:
        keys = self.store._t(self.store.registry.types["pods"]).keys()
        if self.namespace is not None:
            if self._keys is None or self._keys[0] is not keys:
                prefix = f"{self.namespace}/"
                self._keys = (keys, [k for k in keys if k.startswith(prefix)])
            keys = self._keys[1] or keys
        return keys[self._rng.randrange(len(keys))]

    async def run_for(self, seconds: float) -> dict[str, float]:
        """Change pods at `rate` per second (0: as fast as possible, yielding to the loop after
        each change so watch pumps can write) for `seconds`; returns updates and seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        n = 0
        while (now := loop.time()) < end:
            if self.rate > 0:
                due = start + n / self.rate
                if due > now:
                    await asyncio.sleep(due - now)
            self.step()
            n += 1
            if self.rate <= 0:
                await asyncio.sleep(0)
        return {"updates": n, "seconds": loop.time() - start}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate if self.rate > 0 else 1.0
        # Batch changes per tick so high rates do not mean thousands of timers per second.
        tick = max(interval, 0.01)
        per_tick = max(1, round(self.rate * tick))
        next_at = loop.time()
        while True:
            for _ in range(per_tick):
                self.step()
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - loop.time()))
