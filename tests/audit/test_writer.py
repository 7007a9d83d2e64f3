"""AuditWriter: back-pressure without loss, rotation, stdout, and surviving disk errors."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from apiproxy.audit.writer import AuditWriter

WAIT = 5.0  # upper bound for awaiting a thread-side signal; never slept


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def record(i: int) -> dict[str, Any]:
    return {"kind": "Event", "auditID": f"id-{i:04d}", "stage": "ResponseComplete", "pad": "x" * 40}


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT), "thread-side signal never came"


Action = str | Callable[[], str]


class ScriptedFile:
    """A file object whose successive write() calls follow a script: ok, enospc, partial, gates."""

    def __init__(self, script: list[Action] | None = None) -> None:
        self.script: deque[Action] = deque(script or [])
        self.data = bytearray()
        self.closed = False
        self.calls = 0

    def write(self, b: Any) -> int:
        self.calls += 1
        action = self.script.popleft() if self.script else "ok"
        if callable(action):
            action = action()
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        chunk = bytes(b)
        if action == "partial":
            chunk = chunk[: len(chunk) // 2 + 1]
        self.data += chunk
        return len(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def lines(self) -> list[dict[str, Any]]:
        text = self.data.decode()
        assert text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]


def gate(signal: threading.Event, release: threading.Event, then: str) -> Callable[[], str]:
    def action() -> str:
        signal.set()
        release.wait(WAIT)
        return then

    return action


async def test_full_queue_makes_write_wait_and_nothing_is_dropped():
    entered, release = threading.Event(), threading.Event()
    sink = ScriptedFile([gate(entered, release, "ok")])
    writer = AuditWriter("unused.log", queue_size=2, opener=lambda _path: sink)
    waits_before = metric("apiproxy_audit_queue_wait_seconds_count")
    waited_before = metric("apiproxy_audit_queue_wait_seconds_sum")
    await writer.start()
    try:
        await writer.write(record(0))
        await wait_thread_event(entered)  # the writer holds record 0 in a blocked write
        await writer.write(record(1))
        await writer.write(record(2))  # the queue (size 2) is now full
        assert writer.depth == 3
        assert metric("apiproxy_audit_queue_depth") == 3
        blocked = asyncio.create_task(writer.write(record(3)))
        for _ in range(5):
            await asyncio.sleep(0)  # let the task run as far as it can
        assert not blocked.done(), "write() returned although the queue was full"
        assert writer.healthy
    finally:
        release.set()
    await asyncio.wait_for(blocked, WAIT)
    await writer.close()
    assert [r["auditID"] for r in sink.lines()] == [f"id-{i:04d}" for i in range(4)]
    assert writer.records_written == 4
    assert metric("apiproxy_audit_queue_wait_seconds_count") - waits_before == 4
    assert metric("apiproxy_audit_queue_wait_seconds_sum") > waited_before
    assert sink.closed


async def test_disk_full_is_counted_retried_and_recovers():
    retrying, recover = threading.Event(), threading.Event()
    sink = ScriptedFile(["enospc", gate(retrying, recover, "enospc"), "partial", "ok"])
    writer = AuditWriter("unused.log", opener=lambda _path: sink, retry_initial=0.0, retry_max=0.0)
    errors_before = metric("apiproxy_audit_write_errors_total")
    written_before = metric("apiproxy_audit_records_written_total")
    with capture_logs() as logs:
        await writer.start()
        await writer.write(record(0))
        await wait_thread_event(retrying)  # second attempt: the first failure has been handled
    try:
        assert not writer.healthy
        assert writer.write_errors == 1
        assert writer.depth == 1  # kept, not dropped
        assert metric("apiproxy_audit_healthy") == 0
        await writer.write(record(1))  # requests keep being accepted while the queue has room
    finally:
        recover.set()
    await asyncio.wait_for(writer.flush(), WAIT)
    assert writer.healthy
    assert metric("apiproxy_audit_healthy") == 1
    assert writer.write_errors == 2
    assert metric("apiproxy_audit_write_errors_total") - errors_before == 2
    assert metric("apiproxy_audit_records_written_total") - written_before == 2
    assert "No space left on device" in (writer.last_error or "")
    await writer.close()
    # The partial write was resumed at the right byte: each record exactly once, no torn line.
    assert [r["auditID"] for r in sink.lines()] == ["id-0000", "id-0001"]
    failure = next(e for e in logs if e["event"] == "audit_log_write_failed")
    assert failure["log_level"] == "error"
    assert failure["errno"] == errno.ENOSPC


def read_lines(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("compress", [False, True])
async def test_rotation_keeps_the_configured_number_of_files(tmp_path, compress):
    target = tmp_path / "audit.log"
    line_len = len(json.dumps(record(0), separators=(",", ":"))) + 1
    writer = AuditWriter(
        str(target), max_bytes=3 * line_len, backups=2, compress=compress, queue_size=4
    )
    await writer.start()
    for i in range(20):
        await writer.write(record(i))
    await writer.close()
    suffix = ".gz" if compress else ""
    rotated = [tmp_path / f"audit.log.{n}{suffix}" for n in (1, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["audit.log", *(p.name for p in rotated)]
    )
    assert target.stat().st_size <= 3 * line_len
    oldest_first = [rotated[1], rotated[0], target]
    ids = [r["auditID"] for p in oldest_first for r in read_lines(p)]
    # 3 records per file; the newest 20 - 18 = 2 sit in audit.log, older files hold 3 each.
    assert ids == [f"id-{i:04d}" for i in range(12, 20)]
    assert os.stat(target).st_mode & 0o777 == 0o600


async def test_rotation_counts_an_existing_file(tmp_path):
    target = tmp_path / "audit.log"
    target.write_text("x" * 100 + "\n")
    writer = AuditWriter(str(target), max_bytes=120, backups=1)
    await writer.start()
    await writer.write(record(1))  # does not fit after the existing 101 bytes
    await writer.close()
    assert (tmp_path / "audit.log.1").read_text() == "x" * 100 + "\n"
    assert [r["auditID"] for r in read_lines(target)] == ["id-0001"]


async def test_stdout_mode(capsysbinary):
    writer = AuditWriter("-")
    await writer.start()
    for i in range(3):
        await writer.write(record(i))
    await writer.close()
    out = capsysbinary.readouterr().out.decode()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["auditID"] for r in lines] == ["id-0000", "id-0001", "id-0002"]


async def test_write_requires_start_and_refuses_after_close(tmp_path):
    writer = AuditWriter(str(tmp_path / "a.log"))
    with pytest.raises(RuntimeError, match="not running"):
        await writer.write(record(0))
    await writer.start()
    await writer.close()
    with pytest.raises(RuntimeError, match="not running"):
        await writer.write(record(1))


async def test_close_with_timeout_gives_up_when_the_disk_never_recovers():
    sink = ScriptedFile(["enospc"] * 10_000)
    writer = AuditWriter("unused.log", opener=lambda _p: sink, retry_initial=0.001, retry_max=0.001)
    await writer.start()
    await writer.write(record(0))
    with capture_logs() as logs:
        await writer.close(timeout=0.05)
    assert sink.data == b""
    assert any(e["event"] == "audit_log_close_timed_out" and e["records"] == 1 for e in logs)


async def test_records_arriving_together_share_one_write():
    sink = ScriptedFile()
    writer = AuditWriter("unused.log", opener=lambda _p: sink, linger=0.5)
    await writer.start()
    for i in range(20):
        await writer.write(record(i))
        for _ in range(10):
            await asyncio.sleep(0)  # the writer task runs in between
    await writer.flush()
    await writer.close()
    assert [r["auditID"] for r in sink.lines()] == [f"id-{i:04d}" for i in range(20)]
    # The writer lingers after the first record, so the later ones join its batch.
    assert sink.calls == 1


async def test_without_linger_every_record_is_still_written():
    sink = ScriptedFile()
    writer = AuditWriter("unused.log", opener=lambda _p: sink, linger=0)
    await writer.start()
    for i in range(20):
        await writer.write(record(i))
        await asyncio.sleep(0)
    await writer.close()
    assert [r["auditID"] for r in sink.lines()] == [f"id-{i:04d}" for i in range(20)]
