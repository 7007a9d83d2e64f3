"""What one remote-secret rotation costs through the proxy: istiod's full re-list of a peer.

Any change to a remote secret (our credentials rotate at 2/3 of `--credential-ttl`) makes istiod
tear down that peer's informers and build them again: every informer lists (or WatchList-streams)
its whole resource anew. This opens exactly istiod's informer set with the real client-go
(`scripts/clientgo-informers`) through `apiproxy serve` with the shipped policy, against the bench
upstream (`bench.upstream`, 50,000 seeded Istio-injected pods), once per run, and reports the
seconds until every informer synced and the bytes client-go read.

    .venv/bin/python -m bench.rotation              3 runs each with WatchList off and on
    .venv/bin/python -m bench.rotation --pods 600 --runs 1      seconds-long smoke run
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.harness import ROOT, say
from bench.run import FULL, Bench

SHIPPED = ROOT / "policies" / "istio-remote.yaml"
CRDS = (
    ("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
    ("networking.istio.io", "v1", "workloadentries", "WorkloadEntry"),
)


def _crd(group: str, version: str, plural: str, kind: str) -> dict[str, Any]:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
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
            "versions": [{"name": version, "served": True, "storage": True, "schema": schema}],
        },
    }


def _post(url: str, token: str, path: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(  # noqa: S310 - loopback bench upstream
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        resp.read()


def _kubeconfig(bench: Bench, url: str, path: Path) -> Path:
    ca = base64.b64encode(bench.ca_file.read_bytes()).decode()
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "p", "cluster": {"server": url, "certificate-authority-data": ca}}
                ],
                "users": [{"name": "istiod", "user": {"token": bench.jwt}}],
                "contexts": [{"name": "p", "context": {"cluster": "p", "user": "istiod"}}],
                "current-context": "p",
            }
        )
    )
    path.chmod(0o600)
    return path


def _program() -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "clientgo-informers")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"rotation: scripts/clientgo-informers failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def one_rotation(program: str, kubeconfig: Path, *, watchlist: bool) -> dict[str, Any]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(kubeconfig.parent)}
    env["KUBE_FEATURE_WatchListClient"] = "true" if watchlist else "false"
    t0 = time.monotonic()
    done = subprocess.run(
        [program, "-kubeconfig", str(kubeconfig), "-timeout", "300s"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        check=False,
    )
    wall = time.monotonic() - t0
    if not done.stdout.strip():
        raise SystemExit(f"rotation: the informer program failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    if not report["synced"]:
        raise SystemExit(f"rotation: not synced: {report['unsynced']} {report['watchErrors']}")
    pods = sum(r["bytes"] for r in report["requests"] if r["path"].endswith("/pods"))
    return {
        "watchList": watchlist,
        "sync_seconds": round(report["syncSeconds"], 3),
        "wall_seconds": round(wall, 3),
        "bytes": sum(r["bytes"] for r in report["requests"]),
        "pods_bytes": pods,
        "requests": len(report["requests"]),
        "pods": report["counts"]["pods"],
        "refused": sum(1 for r in report["requests"] if r["status"] >= 400),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=FULL.list_pods, help="seeded pods")
    parser.add_argument("--runs", type=int, default=3, help="rotations per WatchList setting")
    parser.add_argument("--out", type=Path, help="write the JSON result here as well")
    args = parser.parse_args(argv)
    program = _program()
    sizes = replace(FULL, list_pods=args.pods, list_split=min(FULL.list_split, args.pods))
    with tempfile.TemporaryDirectory(prefix="apiproxy-rotation-") as tmp:
        work = Path(tmp)
        bench = Bench(sizes, work, want_nginx=False)
        (work / "policy.yaml").write_text(SHIPPED.read_text())
        try:
            say(f"upstream: seeding {args.pods} pods")
            bench.start_upstream()
            info = bench.upstream_info
            for crd in CRDS:
                _post(
                    info["url"],
                    info["token"],
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                    _crd(*crd),
                )
            proxy = bench.start_proxy()
            kcfg = _kubeconfig(bench, proxy.url, work / "kubeconfig")
            runs = []
            for watchlist in (False, True):
                for i in range(args.runs):
                    run = one_rotation(program, kcfg, watchlist=watchlist)
                    say(f"rotation {i + 1} watchList={watchlist}: {run}")
                    runs.append(run)
        finally:
            for child in reversed(bench.children):
                child.stop()
    summary = {}
    for watchlist in (False, True):
        mine = [r for r in runs if r["watchList"] is watchlist]
        summary["watch-list" if watchlist else "list-watch"] = {
            "sync_seconds_median": round(statistics.median(r["sync_seconds"] for r in mine), 2),
            "bytes_median": int(statistics.median(r["bytes"] for r in mine)),
            "pods": mine[0]["pods"],
        }
    result = {"pods_seeded": args.pods, "runs": runs, "summary": summary}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
