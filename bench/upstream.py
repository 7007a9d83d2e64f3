"""The benchmark's upstream: the simulated kube-apiserver in its own process, seeded with realistic
(Istio-injected) pods by the simulator's own `apiproxy_dev.sim.seed`, with its churn generator
driven over stdin.

    python -m bench.upstream --list-pods 50000 --list-split 10000

Plain HTTP on 127.0.0.1 (the simulator's benchmark mode). On start it prints one JSON line
`{"url", "token", "pid", "pods", "list_bytes_per_pod"}`; then it reads commands, one per line, and
answers each with one JSON line:

    churn RATE SECONDS   update pods of namespace `churn` (RATE per second, 0 = as fast as it can),
                         each stamped with annotation bench.apiproxy.io/sent-ns = time.time_ns()
                         (`apiproxy_dev.sim.seed.Churn`)
    watchers             how many watches are open on pods (a watch whose client went away ends
                         at once: the simulator cancels its handler)
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

from apiproxy_dev.sim import SimAPIServer, Store
from apiproxy_dev.sim.seed import Churn, add_pods
from apiproxy_dev.sim.seed import pod as sim_pod

STAMP = "bench.apiproxy.io/sent-ns"
SMALL_NS = "small"
CHURN_NS = "churn"
LIST_NS = ("list-small", "list-rest")  # list-small holds the small LIST, both the large one
LIST_LABEL = "bench.apiproxy.io/list"


def seed(store: Store, *, list_pods: int, list_split: int, churn_pods: int) -> int:
    """The bench's namespaces, filled by the simulator's own seeding (`apiproxy_dev.sim.seed`):
    Istio-injected pods without managedFields (~5.5 KB of JSON each)."""
    n = add_pods(store, SMALL_NS, 10, prefix="small", managed_fields=False)
    n += add_pods(store, CHURN_NS, churn_pods, prefix="churn", managed_fields=False)
    label = {LIST_LABEL: "yes"}
    small = min(list_split, list_pods)
    n += add_pods(store, LIST_NS[0], small, labels=label, managed_fields=False)
    n += add_pods(
        store, LIST_NS[1], list_pods - small, start=small, labels=label, managed_fields=False
    )
    # Exported, as the shipped policy requires for a peer to see them (bench.rotation runs it);
    # other policies ignore namespace labels.
    for ns in {SMALL_NS, CHURN_NS, *LIST_NS}:
        obj = store.get("namespaces", ns)
        obj["metadata"].setdefault("labels", {})["apiproxy.io/export"] = "true"
        store.update(obj)
    store.compact()  # no seeding history: watches start from now
    return n


async def serve(args: argparse.Namespace) -> None:
    store = Store(history_size=100_000, watch_buffer=1_000_000)
    t0 = time.monotonic()
    pods = seed(store, list_pods=args.list_pods, list_split=args.list_split, churn_pods=100)
    sim = SimAPIServer(tls=False, store=store, bookmark_interval=3600.0, watch_timeout=3600.0)
    await sim.start()
    one = len(
        json.dumps(
            sim_pod(
                LIST_NS[0],
                "pod-0",
                "app-0",
                "node-0",
                0,
                labels={LIST_LABEL: "yes"},
                managed_fields=False,
            ),
            separators=(",", ":"),
        )
    )
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
                churn = Churn(store, float(rest[0]), namespace=CHURN_NS, stamp=STAMP)
                out: dict[str, Any] = await churn.run_for(float(rest[1]))
            elif cmd == "watchers":
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
