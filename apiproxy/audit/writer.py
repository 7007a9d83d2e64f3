"""The audit log writer: a bounded queue in front of one writer task, size rotation or stdout.

Request handlers `await writer.write(event)`. The event is serialised at once (so a caller's later
mutation cannot change the record, and an unserialisable event fails in the caller) and queued.
When the queue is full, `write` waits: records are never dropped, and the time spent waiting is
observed in `apiproxy_audit_queue_wait_seconds`.

The writer task takes batches off the queue and writes them in a worker thread, so disk latency
never stalls the event loop. It lingers a few milliseconds after the first record of a batch so
that, under load, one thread handoff carries many records. A failed write (ENOSPC, EIO, a
vanished directory) is counted, logged and retried with backoff; the records stay queued,
`healthy` turns False until a write succeeds, and requests start waiting once the queue is full.
Partial writes resume at the byte where they stopped, so a retry never duplicates or tears a line.

Rotation is logrotate-like: when the next line would push `audit.log` past `max_bytes`, it becomes
`audit.log.1` (or `audit.log.1.gz` with `compress=True`), older files shift up, and at most
`backups` rotated files are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any, Final

import orjson
from prometheus_client import Counter, Gauge, Histogram

from apiproxy.log import get_logger
from apiproxy.tasks import cancel_and_wait

QUEUE_WAIT = Histogram(
    "apiproxy_audit_queue_wait_seconds",
    "Time a request waited to enqueue its audit record (non-zero only when the queue was full).",
    buckets=(0.0, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
)
QUEUE_DEPTH = Gauge(
    "apiproxy_audit_queue_depth",
    "Audit records accepted but not yet written (queued plus the batch being written).",
)
RECORDS_WRITTEN = Counter(
    "apiproxy_audit_records_written",
    "Audit records written to the audit log.",
)
WRITE_ERRORS = Counter(
    "apiproxy_audit_write_errors",
    "Failed attempts to write, rotate or open the audit log (records are kept and retried).",
)
HEALTHY = Gauge(
    "apiproxy_audit_healthy",
    "1 while the audit log is being written successfully, 0 while writes are failing.",
)

MiB: Final = 1024 * 1024
_STOP: Final = b""  # sentinel: a serialised record is never empty
_BATCH_LINES: Final = 1024

Opener = Callable[[str], IO[bytes]]

log = get_logger("apiproxy.audit")


def _default_opener(path: str) -> IO[bytes]:
    # Unbuffered: each write() is one syscall whose return value says how much reached the file,
    # so a retry after ENOSPC continues exactly where the failed attempt stopped.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return open(fd, "ab", buffering=0)


def serialize(event: dict[str, Any]) -> bytes:
    """One record as a JSON line: UTF-8, no spaces, as `json.dumps(ensure_ascii=False,
    separators=(",", ":"))` writes it (byte for byte for everything but floats, which are
    equal as JSON). orjson is ~15x cheaper per record on the request path; what it refuses
    (non-string keys, integers beyond 64 bits, lone surrogates) takes the standard library's
    path, so such a record is written, or fails, exactly as before."""
    try:
        return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class AuditWriter:
    """Bounded, never-dropping audit log writer. `target` is a file path, or "-" for stdout."""

    def __init__(
        self,
        target: str,
        *,
        max_bytes: int = 100 * MiB,
        backups: int = 5,
        queue_size: int = 10_000,
        compress: bool = False,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        opener: Opener | None = None,
        linger: float = 0.005,
    ) -> None:
        if not target:
            raise ValueError("audit target must be a path or '-'")
        if max_bytes <= 0 or backups < 0 or queue_size <= 0:
            raise ValueError("max_bytes and queue_size must be positive, backups non-negative")
        self.target = target
        self.max_bytes = max_bytes
        self.backups = backups
        self.compress = compress
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        # After the first record of a batch arrives, wait this long for more before handing the
        # batch to the worker thread: one thread handoff per few dozen records instead of per
        # record under load (records still reach the disk within milliseconds).
        self.linger = linger
        self._opener = opener or _default_opener
        self._stdout = target == "-"
        self._queue_size = queue_size
        self._queue: asyncio.Queue[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress: asyncio.Condition | None = None
        self._accepted = 0  # records accepted by write()
        self._file: IO[bytes] | None = None
        self._size = 0  # bytes in the current file
        self._partial = 0  # bytes of pending[0] already written (resumed after an error)
        self._pending: deque[bytes] = deque()
        self._failing = False
        self._closing = False
        self.records_written = 0
        self.write_errors = 0
        self.last_error: str | None = None

    # -- public API ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("AuditWriter already started")
        self._queue = asyncio.Queue(self._queue_size)
        self._progress = asyncio.Condition()
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        HEALTHY.set(1)

    async def write(self, event: dict[str, Any]) -> None:
        """Queue one event; waits while the queue is full (never drops)."""
        if self._queue is None or self._task is None or self._closing:
            raise RuntimeError("AuditWriter is not running (start() not called, or closed)")
        if self._task.done():
            raise RuntimeError("audit writer task has stopped; refusing to lose records")
        data = serialize(event)
        if self._queue.full():
            started = time.monotonic()
            await self._queue.put(data)
            QUEUE_WAIT.observe(time.monotonic() - started)
        else:
            self._queue.put_nowait(data)
            QUEUE_WAIT.observe(0.0)
        self._accepted += 1
        QUEUE_DEPTH.set(self.depth)

    async def flush(self) -> None:
        """Wait until every record accepted before this call is written (waits through errors)."""
        if self._progress is None or self._task is None:
            return
        target, task = self._accepted, self._task
        async with self._progress:
            await self._progress.wait_for(lambda: self.records_written >= target or task.done())

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Write everything queued, then close the file. With a timeout, give up loudly after it."""
        if self._queue is None or self._task is None:
            return
        queue, task = self._queue, self._task

        async def finish() -> None:
            if not self._closing:
                self._closing = True
                await queue.put(_STOP)
            await asyncio.shield(task)

        try:
            async with asyncio.timeout(timeout):  # not wait_for, which can drop a cancel on 3.11
                await finish()
        except TimeoutError:
            lost = self.depth
            await cancel_and_wait(self._task)
            log.error("audit_log_close_timed_out", records=lost)
        finally:
            await asyncio.to_thread(self._close_file)

    @property
    def healthy(self) -> bool:
        """True while the writer runs and its last write succeeded (for readiness probes)."""
        return self._task is not None and not self._task.done() and not self._failing

    @property
    def depth(self) -> int:
        """Records accepted by `write` and not yet on disk."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return queued + len(self._pending)

    # -- writer task --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        pending = self._pending
        stopping = False
        delay = self.retry_initial
        while True:
            if not pending:
                if stopping:
                    return
                item = await queue.get()
                if item == _STOP:
                    return
                pending.append(item)
                if self.linger > 0 and queue.qsize() < _BATCH_LINES - 1:
                    await asyncio.sleep(self.linger)
            while len(pending) < _BATCH_LINES and not stopping:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item == _STOP:
                    stopping = True
                else:
                    pending.append(item)
            QUEUE_DEPTH.set(self.depth)
            try:
                await asyncio.to_thread(self._drain_sync)
            except (OSError, ValueError) as exc:  # ValueError: a closed stream
                self.write_errors += 1
                WRITE_ERRORS.inc()
                strerror = getattr(exc, "strerror", None)
                self.last_error = f"{type(exc).__name__}: {strerror or exc}"
                if not self._failing:
                    HEALTHY.set(0)
                log.error(
                    "audit_log_write_failed",
                    target=self.target,
                    error=self.last_error,
                    errno=getattr(exc, "errno", None),
                    pending=self.depth,
                    retry_in=delay,
                )
                self._failing = True
                await self._notify()
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 0.01), self.retry_max)
                continue
            if self._failing:
                log.info("audit_log_write_recovered", target=self.target)
                HEALTHY.set(1)
            self._failing = False
            delay = self.retry_initial
            QUEUE_DEPTH.set(self.depth)
            await self._notify()

    async def _notify(self) -> None:
        assert self._progress is not None
        async with self._progress:
            self._progress.notify_all()

    # -- synchronous file work (runs in a worker thread) ----------------------------------------

    def _advance(self, written: int) -> None:
        """Account `written` bytes: pop the lines that are now complete."""
        pending = self._pending
        self._size += written
        done = self._partial + written
        lines = 0
        while pending and done >= len(pending[0]):
            done -= len(pending.popleft())
            lines += 1
        self._partial = done
        if lines:
            self.records_written += lines
            RECORDS_WRITTEN.inc(lines)

    def _drain_sync(self) -> None:
        pending = self._pending
        while pending:
            f = self._ensure_open()
            if (
                not self._stdout
                and self._partial == 0
                and self._size > 0
                and self._size + len(pending[0]) > self.max_bytes
            ):
                self._rotate()
                continue
            room = sys.maxsize if self._stdout else self.max_bytes - self._size
            chunk: list[bytes] = []
            size = 0
            for line in pending:
                if len(chunk) >= _BATCH_LINES or (chunk and size + len(line) > room):
                    break
                chunk.append(line)
                size += len(line)
            view = memoryview(b"".join(chunk))[self._partial :]
            while view:
                n = f.write(view)
                n = len(view) if n is None else n
                view = view[n:]
                self._advance(n)
            f.flush()

    def _ensure_open(self) -> IO[bytes]:
        if self._file is not None and not self._file.closed:
            return self._file
        if self._stdout:
            self._file = sys.stdout.buffer
            self._size = 0
            return self._file
        self._file = self._opener(self.target)
        try:
            self._size = os.path.getsize(self.target)
        except OSError:
            self._size = 0
        return self._file

    def _rotated_name(self, index: int) -> str:
        return f"{self.target}.{index}" + (".gz" if self.compress else "")

    def _rotate(self) -> None:
        self._close_file()
        if self.backups == 0:
            os.unlink(self.target)
        else:
            for stale in (self._rotated_name(self.backups), f"{self.target}.{self.backups}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            for index in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self._rotated_name(index), self._rotated_name(index + 1))
            if self.compress:
                tmp = f"{self.target}.1.gz.tmp"
                with open(self.target, "rb") as src, gzip.open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
                os.replace(tmp, self._rotated_name(1))
                os.unlink(self.target)
            else:
                os.replace(self.target, self._rotated_name(1))
        self._size = 0

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is None or self._stdout:
            if f is not None:
                with contextlib.suppress(OSError, ValueError):
                    f.flush()
            return
        with contextlib.suppress(OSError):
            f.close()
