"""The benchmark with a real kube-apiserver (and etcd) as the upstream: LIST and watch throughput
through apiproxy, direct and through nginx, in one run.

    .venv/bin/python -m bench.real          10,000 pods; bench/results/real-latest.json
    .venv/bin/python -m bench.real --smoke  a few hundred pods (tests/bench runs it)

kube-apiserver and etcd come from KUBEBUILDER_ASSETS or `scripts/kube-assets` (as in tests/real).
The pods are Istio-injected pods as `apiproxy_dev.sim.seed` writes them for the simulator's
benchmark, created through the API by concurrent POSTs (so they carry the server's
managedFields, as in a real cluster); 10,000 of them are ~70 MB in etcd, far below its default
2 GiB quota. Layout and measurements are bench.run's: `list-small`/`list-rest` for the LISTs,
`churn` for the watches, whose events are PATCHes stamped with the send time (annotation
bench.apiproxy.io/sent-ns): as fast as the apiserver takes them ("max") or 20 per second
("paced").
LISTs run twice: uncompressed (`lists`, comparable with bench.run's simulator figures) and with
gzip as client-go asks for it (`lists_gzip`: kube-apiserver compresses large responses, so bytes
and MB/s there are compressed bytes on the wire; compare seconds).

Contenders: direct (the apiserver's own TLS, admin bearer token), nginx (TLS in front, HTTPS with
keep-alive to the apiserver, adds the token), apiproxy (`apiproxy serve`, peer JWT, policy, audit,
the same token). The hop under test is pinned to CPU 0, everything else (apiserver, etcd, clients,
the churn writer) to the other CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp

from apiproxy_dev.sim.seed import pod as seed_pod
from bench import run
from bench.harness import (
    CPUS,
    RESULTS,
    Child,
    new_result,
    raise_nofile_limit,
    say,
    write_result,
)
from bench.run import Bench, Contender, Sizes

STAMP = "bench.apiproxy.io/sent-ns"
LIST_LABEL = {"bench.apiproxy.io/list": "yes"}

FULL = replace(
    run.FULL,
    repeats=3,
    watch_counts=(1, 100),
    watch_seconds=5,
    list_pods=10_000,
    list_split=1_000,
    list_repeats=3,
)
SMOKE = replace(
    run.SMOKE,
    watch_counts=(1, 5),
    watch_seconds=1,
    list_pods=300,
    list_split=100,
)
CHURN_PODS = {True: 20, False: 100}
PACED_UPDATES = 20.0  # per second, in the "paced" watch runs


def _body(namespace: str, name: str, i: int, labels: dict[str, str] | None) -> dict[str, Any]:
    obj = seed_pod(namespace, name, f"app-{i % 97}", f"node-{i % 50}", i, labels=labels)
    meta = obj["metadata"]
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation"):
        meta.pop(key, None)
    obj.pop("status", None)
    return obj


async def _seed(url: str, token: str, ca: str, layout: list[tuple[str, int, int, bool]]) -> int:
    """Create namespaces and pods with concurrent POSTs; returns the number of pods."""
    import ssl

    ctx = ssl.create_default_context(cadata=ca)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=32), headers=headers
    ) as s:
        for ns, *_ in layout:
            body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            async with s.post(f"{url}/api/v1/namespaces", json=body) as r:
                assert r.status in (201, 409), await r.text()
        queue: asyncio.Queue[tuple[str, str, int, bool]] = asyncio.Queue()
        for ns, start, count, labelled in layout:
            prefix = "pod" if ns.startswith("list") else ns
            for i in range(start, start + count):
                queue.put_nowait((ns, f"{prefix}-{i}", i, labelled))
        total = queue.qsize()

        async def worker() -> None:
            while not queue.empty():
                ns, name, i, labelled = queue.get_nowait()
                body = _body(ns, name, i, LIST_LABEL if labelled else None)
                async with s.post(f"{url}/api/v1/namespaces/{ns}/pods", json=body) as r:
                    if r.status != 201:
                        raise RuntimeError(f"seeding {ns}/{name}: {r.status} {await r.text()}")

        await asyncio.gather(*(worker() for _ in range(32)))
    return total


class Churn:
    """PATCHes pods of namespace `churn` with the send time, from a thread of this process."""

    def __init__(self, url: str, token: str, ca: str, pods: int) -> None:
        self.url, self.token, self.ca, self.pods = url, token, ca, pods

    def run(self, rate: float, seconds: float) -> int:
        return asyncio.run(self._run(rate, seconds))

    async def _run(self, rate: float, seconds: float) -> int:
        import ssl

        ctx = ssl.create_default_context(cadata=self.ca)
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/merge-patch+json",
        }
        done = 0
        start = time.monotonic()
        end = start + seconds
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=16), headers=headers
        ) as s:

            async def writer(k: int, workers: int) -> None:
                nonlocal done
                i = k
                while (now := time.monotonic()) < end:
                    if rate > 0:  # paced: the i-th update is due at start + i / rate
                        due = start + i / rate
                        if due > now:
                            await asyncio.sleep(due - now)
                            if time.monotonic() >= end:
                                return
                    patch = {"metadata": {"annotations": {STAMP: str(time.time_ns())}}}
                    name = f"churn-{i % self.pods}"
                    async with s.patch(
                        f"{self.url}/api/v1/namespaces/churn/pods/{name}",
                        data=json.dumps(patch),
                    ) as r:
                        if r.status != 200:
                            raise RuntimeError(f"churn patch: {r.status} {await r.text()}")
                    done += 1
                    i += workers

            workers = 1 if 0 < rate <= 50 else 8
            await asyncio.gather(*(writer(k, workers) for k in range(workers)))
        return done


class RealBench(Bench):
    """bench.run's harness with a real etcd + kube-apiserver as the upstream."""

    def __init__(self, sizes: Sizes, work: Path, *, smoke: bool, want_nginx: bool) -> None:
        super().__init__(sizes, work, want_nginx=want_nginx)
        self.smoke = smoke
        self.cluster: Any = None

    def start_upstream(self) -> None:
        from tests.real.cluster import KubeCluster, assets_dir, server_version

        assets = assets_dir()
        self.cluster = KubeCluster(assets, name="bench").start()
        for pid in (self.cluster._etcd.pid, self.cluster._apiserver.pid):
            if CPUS.rest:
                os.sched_setaffinity(pid, CPUS.rest)
        k = self.cluster
        ca = k.ca.cert_pem
        # One bundle for the clients: the hops' serving CA and the apiserver's (direct).
        with self.ca_file.open("a") as f:
            f.write(ca)
        s = self.sizes
        small = min(s.list_split, s.list_pods)
        layout = [
            ("small", 0, 10, False),
            ("churn", 0, CHURN_PODS[self.smoke], False),
            ("list-small", 0, small, True),
            ("list-rest", small, s.list_pods - small, True),
        ]
        t0 = time.monotonic()
        pods = asyncio.run(_seed(k.url, k.admin_token, ca, layout))
        seed_seconds = time.monotonic() - t0
        say(f"  seeded {pods} pods through the API in {seed_seconds:.1f} s")
        version = ".".join(map(str, server_version(assets)))
        (self.work / "upstream-token").write_text(k.admin_token + "\n")
        self.upstream_info = {
            "url": k.url,
            "token": k.admin_token,
            "ca_file": str(k.ca_file),
            "pods": pods,
            "seed_seconds": round(seed_seconds, 1),
            "kube_apiserver": version,
            "list_bytes_per_pod": None,
        }
        self.churn = Churn(k.url, k.admin_token, ca, CHURN_PODS[self.smoke])
        self.contenders.append(Contender("direct", k.url, k.admin_token, None))

    list_encoding = "identity"

    def client(self, c: Contender, mode: str, *extra: str) -> Child:
        if mode == "list":
            extra = (*extra, "--accept-encoding", self.list_encoding)
        return super().client(c, mode, *extra)

    def lists_gzip(self) -> dict[str, Any]:
        """The same LISTs as client-go asks for them (gzip): kube-apiserver compresses them."""
        self.list_encoding = "gzip"
        try:
            return self.lists()
        finally:
            self.list_encoding = "identity"

    def watch_once(self, c: Contender, watchers: int, rate: float) -> dict[str, Any]:
        # Paced runs write PACED_UPDATES per second whatever the number of watchers: a real
        # apiserver on a small machine takes only ~100 writes/s, so bench.run's fixed event rate
        # (events / watchers updates per second) would saturate it with one watcher.
        if rate > 0:
            rate = PACED_UPDATES
        child = self.client(c, "watch", "--watchers", str(watchers))
        child.json_line(timeout=120)
        updates = self.churn.run(rate, self.sizes.watch_seconds)
        time.sleep(1.0)  # drain: late events still count, at their late arrival
        child.send("stop")
        out = child.json_line(timeout=60)
        child.wait(30)
        out["updates"] = updates
        out["offered_events"] = updates * watchers
        return out

    def close(self) -> None:
        super().close()  # the hops and clients, and the ports held for nginx
        if self.cluster is not None:
            self.cluster.check_alive()  # a crash during the run is an error, not a footnote
            self.cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds per part")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/real-*.json)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--only", default="watch,list", help="parts: watch, list")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.no_pin:
        CPUS.off()
    elif CPUS.rest:
        os.sched_setaffinity(0, CPUS.rest)  # the churn writer runs in this process
    out = args.out or RESULTS / ("real-smoke.json" if args.smoke else "real-latest.json")
    raise_nofile_limit()
    started = time.monotonic()
    result = new_result("real-smoke" if args.smoke else "real-full", "bench.real", argv)
    result["load_average_at_start"] = os.getloadavg()
    result["sizes"] = asdict(sizes)
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="apiproxy-bench-real-") as tmp:
        bench = RealBench(sizes, Path(tmp), smoke=args.smoke, want_nginx=not args.no_nginx)
        try:
            bench.start()
            result["upstream"] = {
                k: bench.upstream_info[k] for k in ("pods", "seed_seconds", "kube_apiserver")
            }
            result["contenders"] = [c.name for c in bench.contenders]
            for part, key, fn in (
                ("watch", "watch", bench.watches),
                ("list", "lists", bench.lists),
                ("list", "lists_gzip", bench.lists_gzip),
            ):
                if part in parts:
                    say(f"== {key}")
                    result[key] = fn()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            say(f"FAILED: {result['error']}")
        finally:
            try:
                bench.close()
            except AssertionError as exc:  # the apiserver or etcd died during the run
                result["error"] = f"upstream died: {exc}"[:4000]
                say(f"FAILED: {result['error']}")
        result["notes"] = bench.notes
    result["load_average_at_end"] = os.getloadavg()
    result["targets"] = run.targets(result)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(run.table(result))
    if "lists_gzip" in result:
        print("gzip (as client-go asks; bytes and MB/s are compressed):")
        print(run.table({"lists": result["lists_gzip"]}).split("\n\ntargets")[0])
    write_result(out, result)
    say(f"wrote {out} ({result['wall_seconds']} s)")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
