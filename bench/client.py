"""The benchmark's Python load generator (aiohttp on uvloop), one process, the same for every
contender. Small-request load uses wrk instead (see bench/run.py).

    python -m bench.client watch --url U --token T [--ca F] --watchers N
        opens N watches on namespace `churn` (after a LIST for the resourceVersion, as informers
        do), prints {"ready": ...}, then counts events and their latency (receipt time minus the
        bench.apiproxy.io/sent-ns stamp) until it reads `stop` on stdin; prints the result.
    python -m bench.client idle --url U --token T [--ca F] --watchers N
        opens N watches on the quiet namespace `small`, prints {"ready": ...}, holds them until
        `stop` on stdin.
    python -m bench.client list --url U --token T [--ca F] --path P
        one GET of P, body read as it arrives and discarded; prints bytes and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from typing import Any

import aiohttp

STAMP = b'"bench.apiproxy.io/sent-ns":"'
RETRIES: dict[str, int] = {}  # watch opens answered 5xx and retried, by status (reported)


def _session(args: argparse.Namespace) -> aiohttp.ClientSession:
    ctx: ssl.SSLContext | bool = False
    if args.url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=args.ca)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=0, force_close=False),
        headers={
            "Authorization": f"Bearer {args.token}",
            "Accept": "application/json",
            # aiohttp asks for gzip by default, as client-go does; `identity` measures raw bytes
            **({"Accept-Encoding": args.accept_encoding} if args.accept_encoding else {}),
        },
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
        auto_decompress=False,
    )


async def _stdin_line() -> str:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return (await reader.readline()).decode().strip()


def _pct(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[min(len(s) - 1, int(q * len(s)))])


async def _open_watches(
    session: aiohttp.ClientSession, url: str, namespace: str, n: int
) -> list[aiohttp.ClientResponse]:
    async with session.get(f"{url}/api/v1/namespaces/{namespace}/pods?limit=1") as r:
        r.raise_for_status()
        rv = (await r.json())["metadata"]["resourceVersion"]
    path = f"{url}/api/v1/namespaces/{namespace}/pods?watch=1&resourceVersion={rv}"
    path += "&timeoutSeconds=3000"
    gate = asyncio.Semaphore(64)  # bounded connection storm: no SYN-backlog drops

    async def one() -> aiohttp.ClientResponse:
        async with gate:
            for attempt in range(4):
                resp = await session.get(path)
                if resp.status == 200:
                    return resp
                text = await resp.text()
                if resp.status < 500 or attempt == 3:
                    raise RuntimeError(f"watch refused: {resp.status} {text[:200]}")
                RETRIES[str(resp.status)] = RETRIES.get(str(resp.status), 0) + 1
                await asyncio.sleep(0.5)
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def watch(args: argparse.Namespace) -> dict[str, Any]:
    latencies: list[int] = []
    state = {"events": 0, "first_sent": 0, "last_recv": 0, "bytes": 0}

    async def consume(resp: aiohttp.ClientResponse) -> None:
        tail = b""
        async for chunk in resp.content.iter_any():
            now = time.time_ns()
            state["bytes"] += len(chunk)
            data = tail + chunk if tail else chunk
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                i = data.find(STAMP, start, end)
                if i >= 0:
                    i += len(STAMP)
                    sent = int(data[i : data.index(b'"', i)])
                    latencies.append(now - sent)
                    if not state["first_sent"] or sent < state["first_sent"]:
                        state["first_sent"] = sent
                    state["events"] += 1
                    state["last_recv"] = now
                start = end + 1
            tail = data[start:]

    async with _session(args) as session:
        resps = await _open_watches(session, args.url, "churn", args.watchers)
        tasks = [asyncio.create_task(consume(r)) for r in resps]
        print(json.dumps({"ready": len(resps)}), flush=True)
        await _stdin_line()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in resps:
            r.close()
    span = (state["last_recv"] - state["first_sent"]) / 1e9
    return {
        "watchers": args.watchers,
        "events": state["events"],
        "bytes": state["bytes"],
        "seconds": span,
        "events_per_second": state["events"] / span if span > 0 else 0.0,
        "latency_p50_us": _pct(latencies, 0.50) / 1e3,
        "latency_p99_us": _pct(latencies, 0.99) / 1e3,
        "retries": RETRIES,
    }


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    async with _session(args) as session:
        t0 = time.monotonic()
        resps = await _open_watches(session, args.url, "small", args.watchers)
        print(json.dumps({"ready": len(resps), "open_seconds": time.monotonic() - t0}), flush=True)
        await _stdin_line()
        for r in resps:
            r.close()
    return {"watchers": len(resps)}


async def list_(args: argparse.Namespace) -> dict[str, Any]:
    async with _session(args) as session:
        t0 = time.perf_counter()
        n = 0
        async with session.get(args.url + args.path) as resp:
            ttfb = time.perf_counter() - t0
            async for chunk in resp.content.iter_any():
                n += len(chunk)
            status = resp.status
        seconds = time.perf_counter() - t0
    return {"status": status, "bytes": n, "seconds": seconds, "ttfb_seconds": ttfb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["watch", "idle", "list"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--watchers", type=int, default=1)
    parser.add_argument("--path", default="/api/v1/pods")
    parser.add_argument("--accept-encoding", help="Accept-Encoding header (default: aiohttp's)")
    args = parser.parse_args()
    fn = {"watch": watch, "idle": idle, "list": list_}[args.mode]
    try:
        import uvloop

        result = uvloop.run(fn(args))
    except ImportError:  # pragma: no cover
        result = asyncio.run(fn(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
