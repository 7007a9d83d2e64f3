"""istiod's remote-cluster informer set, opened by the real client-go (tools/clientgo/main.go).

`binary()` finds the program (CLIENTGO_INFORMERS, which scripts/test exports, else it builds and
caches it through scripts/clientgo-informers); `run()` runs it against a kubeconfig with WatchList
on or off and returns its JSON report: per-informer counts, which informers synced, and every
request client-go made (client-go falls back from WatchList to LIST+WATCH silently, so only those
tell which path was used).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.tools import built_tool

INFORMERS = (
    "configmaps",
    "customresourcedefinitions",
    "endpointslices",
    "gateways",
    "namespaces",
    "nodes",
    "pods",
    "secrets",
    "services",
    "workloadentries",
)
SECRETS_SELECTOR = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token"


def binary() -> Path:
    path = built_tool("CLIENTGO_INFORMERS", "clientgo-informers")
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is not an executable (CLIENTGO_INFORMERS)")
    return path


async def run(
    program: Path, kubeconfig: Path, *, watchlist: bool, args: tuple[str, ...] = ()
) -> dict[str, Any]:
    env = _env(kubeconfig, watchlist)
    proc = await asyncio.create_subprocess_exec(
        str(program),
        "-kubeconfig",
        str(kubeconfig),
        "-timeout",
        "60s",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if not out.strip():
        raise AssertionError(
            f"clientgo-informers printed nothing (exit {proc.returncode}):\n"
            f"{err.decode(errors='replace')[-4000:]}"
        )
    report: dict[str, Any] = json.loads(out)
    report["exit"] = proc.returncode
    report["stderr"] = err.decode(errors="replace")[-4000:]
    return report


class Following:
    """The program run with -follow: its report, then what its pods informer holds, line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, report: dict[str, Any]) -> None:
        self.proc = proc
        self.report = report
        self.pods: set[str] = set()

    async def until(self, ok: Callable[[set[str]], bool]) -> float:
        """Read pods lines until `ok(pods)`; the seconds it took (client-go's own events, no
        polling). Callers bound it with `asyncio.timeout`."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not ok(self.pods):
            line = await self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"clientgo-informers exited; its pods: {self.pods}")
            self.pods = set(json.loads(line)["pods"])
        return loop.time() - start


@contextlib.asynccontextmanager
async def follow(
    program: Path, kubeconfig: Path, *, watchlist: bool, args: tuple[str, ...] = ()
) -> AsyncIterator[Following]:
    """Run the informer set with -follow; yields once it reported, stops it on the way out."""
    proc = await asyncio.create_subprocess_exec(
        str(program),
        "-kubeconfig",
        str(kubeconfig),
        "-timeout",
        "60s",
        "-follow",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_env(kubeconfig, watchlist),
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not first.strip():
            raise AssertionError(f"clientgo-informers printed nothing (exit {proc.returncode})")
        yield Following(proc, json.loads(first))
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _env(kubeconfig: Path, watchlist: bool) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(kubeconfig.parent),
        "KUBE_FEATURE_WatchListClient": "true" if watchlist else "false",
    }


def resource_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def requests_for(report: dict[str, Any], resource: str) -> list[dict[str, Any]]:
    return [r for r in report["requests"] if resource_of(r["path"]) == resource]


def query(request: dict[str, Any]) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(request["query"], keep_blank_values=True).items()}


def is_watch(request: dict[str, Any]) -> bool:
    return query(request).get("watch") in ("true", "1")


def used_watch_list(report: dict[str, Any], resource: str) -> bool:
    """The informer's first sync was a WatchList stream the server accepted, and no LIST."""
    reqs = requests_for(report, resource)
    streams = [
        r
        for r in reqs
        if is_watch(r) and query(r).get("sendInitialEvents") == "true" and r["status"] == 200
    ]
    lists = [r for r in reqs if not is_watch(r)]
    return bool(streams) and not lists


def used_list_then_watch(report: dict[str, Any], resource: str) -> bool:
    reqs = requests_for(report, resource)
    kinds = ["watch" if is_watch(r) else "list" for r in reqs]
    return (
        kinds[:1] == ["list"]
        and "watch" in kinds
        and all("sendInitialEvents" not in query(r) for r in reqs)
    )


def _crd(group: str, version: str, plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{group}",
            # *.k8s.io groups are protected: the real Gateway API CRDs carry this approval.
            "annotations": {
                "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"
            },
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


CRDS = (
    _crd("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
    _crd("networking.istio.io", "v1", "workloadentries", "WorkloadEntry"),
)


EXPORT_LABEL = "apiproxy.io/export"
# The informers whose resources the shipped policy filters to exported namespaces.
SHIPPED_FILTERED = frozenset(
    {"namespaces", "services", "endpointslices", "pods", "gateways", "workloadentries"}
)


def shipped_visible(
    name: str, items: list[dict[str, Any]], namespaces: list[dict[str, Any]]
) -> int:
    """How many of `items` (an upstream list for informer `name`) a peer sees through the shipped
    policy: those of istio-system and of namespaces labelled apiproxy.io/export=true."""
    if name not in SHIPPED_FILTERED:
        return len(items)
    exported = {"istio-system"} | {
        n["metadata"]["name"]
        for n in namespaces
        if (n["metadata"].get("labels") or {}).get(EXPORT_LABEL) == "true"
    }

    def where(o: dict[str, Any]) -> str:
        meta = o["metadata"]
        return str(meta["name"] if name == "namespaces" else meta.get("namespace", ""))

    return sum(1 for o in items if where(o) in exported)


def objects() -> list[dict[str, Any]]:
    """A small remote cluster: something for every informer, and things the selectors drop."""

    def meta(name: str, ns: str | None = "x", **extra: Any) -> dict[str, Any]:
        m: dict[str, Any] = {"name": name, **extra}
        if ns:
            m["namespace"] = ns
        return m

    pod_spec = {"containers": [{"name": "c", "image": "busybox"}]}
    return [
        # Exported, so the shipped policy shows it (and istio-system) to peers.
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": meta("x", None, labels={EXPORT_LABEL: "true"}),
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": meta("istio-system", None)},
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": meta("node-1", None, labels={"topology.kubernetes.io/zone": "z1"}),
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("web"),
            "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta("web-0", labels={"app": "web"}),
            "spec": pod_spec,
            "status": {"phase": "Running", "podIP": "10.0.0.7"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta("web-failed", labels={"app": "web"}),
            "spec": pod_spec,
            "status": {"phase": "Failed"},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": meta("web-abc", labels={"kubernetes.io/service-name": "web"}),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"]}],
            "ports": [{"port": 80}],
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("cacerts"),
            "type": "Opaque",
            "stringData": {"ca-key.pem": "PRIVATE-KEY-MATERIAL"},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("istio", "istio-system"),
            "data": {"mesh": "trustDomain: remote.local\n"},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("unrelated", "istio-system"),
            "data": {"x": "y"},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": meta("eastwest", labels={"topology.istio.io/network": "n1"}),
            "spec": {"gatewayClassName": "istio", "listeners": []},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": meta("vm-1"),
            "spec": {"address": "10.0.0.9"},
        },
    ]
