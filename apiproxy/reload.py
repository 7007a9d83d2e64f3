"""Notice changes to mounted files, the way Kubernetes updates them, and reload.

ConfigMap and Secret volumes are updated by an atomic swap of the `..data` symlink to a new
timestamped directory; the visible file (`policy.yaml` → `..data/policy.yaml`) never changes in
place. A poll that resolves symlinks (`realpath`) and stats the target (inode, size, mtime) catches
that swap, in-place edits and `mv` replacements alike; a content hash filters touches that changed
nothing. Polling is portable and cheap for a handful of files; the interval is configurable and
tests call `check()` directly or await `changed` events.

A file that vanishes keeps the last good state: nothing is called until it comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from apiproxy import log
from apiproxy.tasks import cancel_and_wait

_log = log.get_logger("apiproxy.reload")


@dataclass(frozen=True, slots=True)
class Stamp:
    realpath: str
    inode: int
    size: int
    mtime_ns: int
    digest: str


def stamp(path: str) -> Stamp | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        with open(real, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    return Stamp(real, st.st_ino, st.st_size, st.st_mtime_ns, digest)


@dataclass
class Watched:
    name: str  # what the metrics and logs call it: "policy", "peers", "tls", "upstream-token"
    paths: tuple[str, ...]
    on_change: Callable[[], Awaitable[None] | None]  # raises → reload failed, old state kept
    stamps: dict[str, Stamp | None] = field(default_factory=dict)
    quick: dict[str, tuple[str, int, int, int] | None] = field(default_factory=dict)


ResultHook = Callable[[str, bool, BaseException | None], None]


class FileWatcher:
    def __init__(self, interval: float = 2.0, on_result: ResultHook | None = None) -> None:
        self.interval = interval
        self.on_result = on_result
        self._items: list[Watched] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.generation = 0
        self._changed = asyncio.Event()

    def add(
        self, name: str, paths: list[str], on_change: Callable[[], Awaitable[None] | None]
    ) -> None:
        item = Watched(name, tuple(paths), on_change)
        for p in item.paths:
            item.stamps[p] = stamp(p)
            item.quick[p] = _quick(p)
        self._items.append(item)

    async def check(self) -> list[tuple[str, bool]]:
        """Look at every file once; reload what changed. Returns (name, ok) per reload attempted."""
        results: list[tuple[str, bool]] = []
        async with self._lock:
            for item in self._items:
                changed = False
                missing = False
                for p in item.paths:
                    q = _quick(p)
                    if q is None:
                        missing = True
                        continue
                    if q == item.quick.get(p):
                        continue
                    s = stamp(p)
                    if s is None:
                        missing = True
                        continue
                    item.quick[p] = q
                    old = item.stamps.get(p)
                    if old is None or old.digest != s.digest:
                        changed = True
                    item.stamps[p] = s
                if missing or not changed:
                    continue
                err: BaseException | None = None
                try:
                    res = item.on_change()
                    if isinstance(res, Awaitable):
                        await res
                except Exception as exc:
                    # The stamps already record the bad content: it is not retried (nor
                    # re-logged) every interval, while any later change to it is.
                    err = exc
                ok = err is None
                results.append((item.name, ok))
                if self.on_result is not None:
                    self.on_result(item.name, ok, err)
            self.generation += 1
            self._changed.set()
            self._changed = asyncio.Event()
        return results

    async def wait_checked(self) -> None:
        """Wait for the next completed check (tests use this instead of sleeping)."""
        await self._changed.wait()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception as exc:  # never let the loop die
                _log.error("reload_check_failed", error=type(exc).__name__)

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="apiproxy-reload")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def _quick(path: str) -> tuple[str, int, int, int] | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_ino, st.st_size, st.st_mtime_ns)


def describe(exc: BaseException | None) -> dict[str, Any]:
    return {} if exc is None else {"error": str(exc)}
