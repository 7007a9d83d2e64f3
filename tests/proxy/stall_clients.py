"""Strangers that stall: run as `python -m tests.proxy.stall_clients HOST PORT ...` by the admission
tests, in a process of its own so the proxy's process counts only its own descriptors.

`--tls N` connections finish TLS without a client certificate, send a request line and one header
(no blank line) and wait; `--tcp M` connections never start TLS. Sources are bound round-robin to
`--sources` (loopback addresses). Events go to stdout as JSON lines:

- `{"event": "ready", "tls": n, "tcp": m}` once every connection is open and stalled;
- `{"event": "done", "tls": [[a, b], ...], "tcp": [...], "early": k}` once the other side has
  closed every one: how long each stood until EOF, counted (a) from before its connect began and
  (b) from when it was open here (TLS done, or TCP connected), and how many closed before `ready`.
  Under load this process notices an open connection late, so (a) bounds the proxy's deadline
  from below and (b) from above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

HEAD = b"GET /api/v1/namespaces/x/pods HTTP/1.1\r\nHost: proxy\r\n"


async def _wait_closed(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--tls", type=int, default=0)
    p.add_argument("--tcp", type=int, default=0)
    p.add_argument("--sources", default="127.0.0.1")
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    sources = a.sources.split(",")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(a.concurrency)
    ready = asyncio.Event()
    early = 0
    writers: list[asyncio.StreamWriter] = []
    goal = 0
    reached = asyncio.Event()

    async def one(i: int, tls: bool) -> tuple[float, float]:
        nonlocal early
        async with gate:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(
                a.host,
                a.port,
                ssl=ctx if tls else None,
                local_addr=(sources[i % len(sources)], 0),
            )
            since = time.monotonic()
            if tls:
                writer.write(HEAD)
                await writer.drain()
            writers.append(writer)
            if len(writers) == goal:
                reached.set()
        await _wait_closed(reader)
        if not ready.is_set():
            early += 1
        now = time.monotonic()
        return now - started, now - since

    async def phase(n: int, tls: bool) -> list[asyncio.Task[tuple[float, float]]]:
        nonlocal goal
        goal += n
        reached.clear()
        tasks = [asyncio.create_task(one(i, tls)) for i in range(n)]
        waiter = asyncio.create_task(reached.wait())
        watched = {waiter, *tasks}
        while n and not reached.is_set():
            done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # a connection that failed to open ends the run with its error
        waiter.cancel()
        return tasks

    # TLS first (the slow part), then the raw connections: then all of them stand at once.
    tls_tasks = await phase(a.tls, True)
    tcp_tasks = await phase(a.tcp, False)
    ready.set()
    print(json.dumps({"event": "ready", "tls": a.tls, "tcp": a.tcp}), flush=True)
    tls_times = await asyncio.gather(*tls_tasks)
    tcp_times = await asyncio.gather(*tcp_tasks)
    for w in writers:
        w.transport.abort()
    print(
        json.dumps({"event": "done", "tls": tls_times, "tcp": tcp_times, "early": early}),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
