"""Soak: many open watches plus a steady request rate through a real `apiproxy serve`, for minutes.

Three processes on loopback: the simulated kube-apiserver (`apiproxy sim`, with pod churn), the
proxy (`apiproxy serve`, the command operators run) and this driver (the peer's clients, mTLS as
peer `bench-peer`), set up by `bench.harness`. Every `--interval` seconds it prints one line: open
watches, watch events received, requests and errors, p50/p99 latency of that window, the proxy's
RSS and open fds.
At the end it prints a JSON summary (also to `--json`), and exits 1 if any request or watch failed.

    .venv/bin/python bench/soak.py                                   # 2,000 watches, 4 minutes
    .venv/bin/python bench/soak.py --watches 200 --rate 20 --duration 10   # the CI smoke run

Everything is bounded: the run stops after --duration (+ ramp-up), and all three processes end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import BenchFiles, Child, open_fds, serve_argv, serving_url  # noqa: E402

WATCHED = ("pods", "services", "endpoints", "namespaces", "nodes")


@dataclass
class Stats:
    watches_open: int = 0
    watch_opens: int = 0
    watch_errors: int = 0
    watch_ends: int = 0  # clean ends by the server (re-opened)
    events: int = 0
    requests: int = 0
    request_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    target: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)

    def error(self, what: str) -> None:
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


def proc_stats(pid: int) -> tuple[float, int]:
    rss = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, open_fds(pid)


async def watch_loop(
    s: aiohttp.ClientSession, base: str, i: int, stats: Stats, stop: asyncio.Event
) -> None:
    resource = WATCHED[i % len(WATCHED)]
    url = f"{base}/api/v1/{resource}?watch=1&timeoutSeconds=3600&allowWatchBookmarks=true"
    while not stop.is_set():
        try:
            async with s.get(url) as resp:
                if resp.status != 200:
                    stats.watch_errors += 1
                    stats.error(f"watch {resource}: {resp.status} {(await resp.text())[:200]}")
                    await asyncio.sleep(1)
                    continue
                stats.watch_opens += 1
                stats.watches_open += 1
                if stats.watches_open >= stats.target:
                    stats.all_open.set()
                try:
                    async for _line in resp.content:
                        stats.events += 1
                        if stop.is_set():
                            break
                finally:
                    stats.watches_open -= 1
                if not stop.is_set():
                    stats.watch_ends += 1
        except (aiohttp.ClientError, OSError) as exc:
            if stop.is_set():
                return
            stats.watch_errors += 1
            stats.error(f"watch {resource}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(1)


async def one_request(s: aiohttp.ClientSession, url: str, stats: Stats) -> None:
    t0 = time.perf_counter()
    try:
        async with s.get(url) as resp:
            await resp.read()
            ok = resp.status == 200
            if not ok:
                stats.error(f"GET {url}: {resp.status}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        ok = False
        stats.error(f"GET {url}: {type(exc).__name__}: {exc}")
    stats.requests += 1
    if ok:
        stats.latencies.append(time.perf_counter() - t0)
    else:
        stats.request_errors += 1


async def drive(args: argparse.Namespace, tmp: Path, proxy_pid: int, port: int) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    ctx.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    base = f"https://127.0.0.1:{port}"
    stats = Stats(target=args.watches)
    stop = asyncio.Event()
    watch_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=0), timeout=aiohttp.ClientTimeout(None)
    )
    req_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=64),
        timeout=aiohttp.ClientTimeout(total=30),
    )
    tasks: list[asyncio.Task[None]] = []
    samples: list[dict[str, Any]] = []
    try:
        # ramp the watches up at --ramp per second
        t_ramp = time.monotonic()
        for i in range(args.watches):
            tasks.append(asyncio.create_task(watch_loop(watch_session, base, i, stats, stop)))
            if i % 50 == 49:
                await asyncio.sleep(50 / args.ramp)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stats.all_open.wait(), 120)
        print(
            f"ramp: {stats.watches_open} watches open in {time.monotonic() - t_ramp:.1f}s",
            flush=True,
        )
        targets = ["/api/v1/namespaces/default/pods?limit=50", "/api/v1/services", "/version"]
        start = time.monotonic()
        next_report = start + args.interval
        n = 0
        inflight: set[asyncio.Task[None]] = set()
        window_from = 0
        while (now := time.monotonic()) < start + args.duration:
            due = int((now - start) * args.rate)
            while n < due:
                t = asyncio.create_task(
                    one_request(req_session, base + targets[n % len(targets)], stats)
                )
                inflight.add(t)
                t.add_done_callback(inflight.discard)
                n += 1
            if now >= next_report or now + 0.011 >= start + args.duration:
                window = stats.latencies[window_from:]
                window_from = len(stats.latencies)
                rss, fds = proc_stats(proxy_pid)
                sample = {
                    "t": round(now - start, 1),
                    "watches_open": stats.watches_open,
                    "events": stats.events,
                    "requests": stats.requests,
                    "errors": stats.request_errors + stats.watch_errors,
                    "p50_ms": round(statistics.median(window) * 1000, 2) if window else None,
                    "p99_ms": round(_p99(window) * 1000, 2) if window else None,
                    "proxy_rss_mib": round(rss, 1),
                    "proxy_fds": fds,
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_report = max(next_report + args.interval, now + 0.02)
            await asyncio.sleep(0.01)
        if inflight:
            await asyncio.wait(inflight, timeout=30)
        open_at_end = stats.watches_open
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await watch_session.close()
        await req_session.close()
    rss_values = [s["proxy_rss_mib"] for s in samples]
    all_lat = stats.latencies
    return {
        "watches_requested": args.watches,
        "watches_open_at_end": open_at_end,
        "watch_opens": stats.watch_opens,
        "watch_server_ends": stats.watch_ends,
        "watch_errors": stats.watch_errors,
        "watch_events": stats.events,
        "requests": stats.requests,
        "request_errors": stats.request_errors,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "p50_ms": round(statistics.median(all_lat) * 1000, 2) if all_lat else None,
        "p99_ms": round(_p99(all_lat) * 1000, 2) if all_lat else None,
        "p99_ms_by_window": [s["p99_ms"] for s in samples],
        "proxy_rss_mib_first": rss_values[0] if rss_values else None,
        "proxy_rss_mib_last": rss_values[-1] if rss_values else None,
        "proxy_rss_mib_max": max(rss_values) if rss_values else None,
        "proxy_fds_last": samples[-1]["proxy_fds"] if samples else None,
        "error_samples": stats.error_samples,
        "samples": samples,
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="apiproxy-soak-") as d:
        tmp = Path(d)
        files = BenchFiles.write(tmp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        sim = Child(
            "sim",
            [sys.executable, "-m", "apiproxy", "sim", "--listen", "127.0.0.1:0",
             "--token", "soak-token", "--pods", str(args.pods), "--namespaces", "10",
             "--churn", str(args.churn), "--kubeconfig", str(tmp / "kubeconfig"),
             "--log-level", "warning"],
            None, tmp / "sim.log", env=env,
        )  # fmt: skip
        proxy: Child | None = None
        try:
            # It binds port 0 and writes the kubeconfig before it says so.
            while not sim.line(60).startswith("apiproxy sim: serving"):
                pass
            extra = [
                f"--max-watches-per-peer={args.watches + 100}",
                "--max-requests-per-peer=1000",
                f"--upstream-max-connections={args.watches + 500}",
                # One address stands for every peer here, ramping up faster than real ones.
                f"--max-unauthenticated-per-source={args.watches + 500}",
                f"--max-unauthenticated-connections={args.watches + 500}",
            ]
            argv = serve_argv(
                files, kubeconfig=tmp / "kubeconfig", audit_log=tmp / "audit.log", extra=extra
            )
            proxy = Child("apiproxy", argv, None, tmp / "apiproxy.log", env=env)
            port = int(serving_url(proxy).rsplit(":", 1)[1])
            summary = asyncio.run(drive(args, tmp, proxy.pid, port))
            summary["audit_log_mib"] = round((tmp / "audit.log").stat().st_size / 2**20, 1)
        finally:
            code = proxy.stop(signal.SIGTERM) if proxy is not None else None
            sim.stop(signal.SIGTERM)
        summary["proxy_exit_code"] = code
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        failed = summary["request_errors"] or summary["watch_errors"]
        if failed:
            for log in ("sim.log", "apiproxy.log"):
                print((tmp / log).read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--watches", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100.0, help="steady requests per second")
    p.add_argument("--duration", type=float, default=240.0, help="seconds after the ramp-up")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between report lines")
    p.add_argument("--ramp", type=float, default=250.0, help="watches opened per second")
    p.add_argument("--pods", type=int, default=500, help="pods the simulator seeds")
    p.add_argument("--churn", type=float, default=5.0, help="pod changes per second")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
