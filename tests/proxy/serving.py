"""`apiproxy serve` as a child process, for the tests that need the real command: one process or
`--workers N`, its JSON log read as it comes, and every process it started gone afterwards.

    async with serve_process(world, upstream.url, tmp_path) as served:        # one process
    async with serve_process(world, upstream.url, tmp_path, workers=2) as s:  # a supervisor
        s.port, s.metrics_port; await s.wait(lambda: s.find("reloaded")); s.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.proxy.conftest import OWN_UUID, Files, World, make_files


@dataclass
class Served:
    """A running `apiproxy serve`; its stderr (JSON logs: the process's, or the supervisor's and
    its workers') is read into `events` and `lines` as it comes, its stdout into `stdout`."""

    proc: asyncio.subprocess.Process
    files: Files
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    stdout: list[bytes] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0
    metrics_port: int = 0

    async def _read(self, stream: asyncio.StreamReader, into: Callable[[bytes], None]) -> None:
        while line := await stream.readline():
            into(line)
            async with self.changed:
                self.changed.notify_all()

    def _event(self, line: bytes) -> None:
        self.lines.append(line)
        try:
            self.events.append(json.loads(line))
        except ValueError:
            self.events.append({"event": "unparsed", "line": line.decode(errors="replace")})

    def start_reading(self) -> list[asyncio.Task[None]]:
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        return [
            asyncio.create_task(self._read(self.proc.stderr, self._event)),
            asyncio.create_task(self._read(self.proc.stdout, self.stdout.append)),
        ]

    async def wait(self, test: Callable[[], Any], within: float = 30) -> Any:
        """Wait until `test()` is truthy, re-checked on every new log or output line."""

        async def until() -> Any:
            async with self.changed:
                while not (result := test()):
                    await self.changed.wait()
                return result

        return await asyncio.wait_for(until(), within)

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def worker_pids(self) -> set[int]:
        return {int(e["pid"]) for e in self.find("worker_started")}


@contextlib.asynccontextmanager
async def serve_process(
    world: World,
    upstream_url: str,
    tmp_path: Path,
    *extra: str,
    workers: int = 1,
    audit: str | None = None,
) -> AsyncIterator[Served]:
    """`apiproxy serve` (files from `make_files`, some of them through `APIPROXY_*`) in front of
    the upstream at `upstream_url` (its CA: `world.server_ca`), on loopback ports the kernel
    picks, read back from its `serving` event. On exit it is SIGKILLed if still running, with
    its workers."""
    files = make_files(world, tmp_path)
    env = {
        **os.environ,
        "APIPROXY_CLUSTER_UUID": OWN_UUID,
        "APIPROXY_PEERS": str(files.peers),
        "APIPROXY_POLICY": str(files.policy),
        "APIPROXY_WORKERS": str(workers),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apiproxy",
        "serve",
        "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0",
        f"--tls-cert={files.tls_cert}",
        f"--tls-key={files.tls_key}",
        f"--upstream={upstream_url}",
        f"--upstream-ca={files.upstream_ca}",
        f"--upstream-token-file={files.token}",
        f"--audit-log={audit or files.audit}",
        "--reload-interval-seconds=3600",  # reloads come from SIGHUP only
        "--log-format=json",
        *extra,
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    served = Served(proc, files)
    readers = served.start_reading()
    # The supervisor's `serving` names its worker count; a single process's has none.
    which = {"workers": workers} if workers > 1 else {}
    try:
        serving = await served.wait(lambda: served.find("serving", **which), 60)
        served.port = int(serving[0]["listen"].rsplit(":", 1)[1])
        served.metrics_port = int(serving[0]["metrics"])
        yield served
    finally:
        if proc.returncode is None:
            kill(proc.pid)  # first, or a supervisor would restart its workers
        for pid in served.worker_pids():
            kill(pid)
        await proc.wait()  # and the workers' end of the pipes closed
        await asyncio.gather(*readers, return_exceptions=True)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


__all__ = ["Served", "alive", "kill", "serve_process"]
