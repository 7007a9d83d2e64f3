"""Faults: the upstream dies, stalls, lies or resets; clients vanish mid-stream; the audit disk
fills up; watched files break or vanish. The proxy keeps serving what it can, reports the fault in
logs, metrics and readiness, and recovers when the fault ends."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from apiproxy.audit import writer as audit_writer
from tests.hardening.conftest import (
    HWorld,
    Stack,
    StackFactory,
    get,
    open_tls,
    parse_responses,
)
from tests.proxy.conftest import audit_records

CLIENT_VANISH_TIMES = int(os.environ.get("HARDENING_VANISH_TIMES", "1000"))


async def readyz(stack: Stack) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{stack.proxy.metrics_port}/readyz") as r,
    ):
        return r.status, await r.text()


async def status_of(stack: Stack, target: str = "/api/v1/pods") -> int:
    raw = await stack.raw(get(target, close=True))
    return parse_responses(raw)[0].status


async def probe(stack: Stack) -> None:
    """Run one readiness probe now (the loop's interval is long in tests)."""
    await stack.proxy.probe_upstream()


async def test_upstream_killed_mid_watch_ends_the_stream_and_recovers(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await make_stack(readiness_probe_interval_seconds=3600)
    reader, writer = await open_tls(stack)
    writer.write(get("/api/v1/pods?watch=1", close=True))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(stack.up.wait_until(lambda: stack.up.open_watches == 1), 10)
    stack.up.broadcast(b'{"type":"ADDED"}\n')
    stack.up.abort_all()  # the apiserver process dies: RST on every connection
    rest = await asyncio.wait_for(reader.read(), 10)  # the client's stream ends, no hang
    writer.close()
    assert stack.metric("apiproxy_upstream_errors_total", kind="reset") == 1
    await stack.proxy.audit.flush()
    ended = [r for r in audit_records(stack.files.audit) if r["stage"] == "ResponseComplete"]
    assert ended[-1]["annotations"]["apiproxy.io/stream-ended-by"] == "upstream_error"
    # Watches end cleanly on an upstream error (clients re-watch from their last resourceVersion);
    # what was cut is in the audit record.
    assert rest.endswith(b"0\r\n\r\n")
    # the upstream stops listening altogether: 503, readiness says so, then recovery
    port = stack.up.port
    await stack.up.stop()
    assert await status_of(stack) == 503
    await probe(stack)
    code, text = await readyz(stack)
    assert code == 503
    assert "[-]upstream failed" in text
    stack.up._server = None
    stack.up.port = 0
    stack.up.__init__(stack.up.server_cert, stack.up.server_key, stack.up.tmpdir)  # type: ignore[misc]
    await _restart_on(stack, port)
    assert await status_of(stack) == 200
    await probe(stack)
    assert (await readyz(stack))[0] == 200
    logs = "".join(capsys.readouterr())
    assert "upstream_unreachable" in logs
    assert "upstream_probe" in logs


async def _restart_on(stack: Stack, port: int) -> None:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    d = Path(stack.up.tmpdir)
    ctx.load_cert_chain(d / "up.crt", d / "up.key")
    stack.up._server = await asyncio.start_server(
        stack.up._conn, "127.0.0.1", port, ssl=ctx, reuse_address=True
    )
    stack.up.port = port


@pytest.mark.parametrize(
    ("mode", "code", "kind"),
    [("slow", 504, "timeout"), ("garbage", 502, "protocol"), ("reset", 502, "protocol")],
)
async def test_upstream_faults_map_to_statuses_and_recover(
    make_stack: StackFactory, mode: str, code: int, kind: str
) -> None:
    stack = await make_stack(upstream_timeout_seconds=0.5)
    stack.up.mode, stack.up.delay = mode, 2.0
    for _ in range(3):
        assert await status_of(stack) == code
    assert stack.metric("apiproxy_upstream_errors_total", kind=kind) == 3
    stack.up.mode = "normal"
    assert await status_of(stack) == 200
    assert await status_of(stack) == 200


async def test_upstream_garbage_on_a_watch_is_502(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.up.mode = "garbage"
    assert await status_of(stack, "/api/v1/pods?watch=1") == 502
    stack.up.mode = "kill_watch"
    raw = await stack.raw(get("/api/v1/pods?watch=1", close=True))  # ends, no hang
    assert raw.startswith(b"HTTP/1.1 200")
    assert stack.metric("apiproxy_upstream_errors_total", kind="reset") == 1
    stack.up.mode = "normal"
    stack.up.watch_script = ()
    raw = await stack.raw(get("/api/v1/pods?watch=1", close=True))
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.endswith(b"0\r\n\r\n")


async def test_watch_to_an_upstream_that_never_answers_times_out(make_stack: StackFactory) -> None:
    stack = await make_stack(
        upstream_timeout_seconds=0.5, shutdown_grace_seconds=0.5, max_watches_per_peer=2
    )
    stack.up.mode = "hang"
    try:
        raw = await stack.raw(get("/api/v1/pods?watch=1", close=True), limit=5)
    except TimeoutError:
        raw = b""
    assert parse_responses(raw)[0].status == 504 if raw else False, "watch hung for 5 s"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_clients_vanishing_mid_stream_leak_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack()
    proxy = stack.proxy
    # warm up: one watch opened and closed, so lazily created pools and caches exist
    for _ in range(2):
        reader, writer = await open_tls(stack)
        writer.write(get("/api/v1/pods?watch=1"))
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()
    await asyncio.wait_for(stack.up.wait_until(lambda: stack.up.open_watches == 0), 10)
    await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0), 10)
    fds, tasks, conns = _fds(), len(asyncio.all_tasks()), stack.up.open_connections

    async def one(i: int) -> None:
        reader, writer = await open_tls(stack)
        target = "/api/v1/pods?watch=1" if i % 4 else "/api/v1/namespaces/x/pods?watch=true"
        writer.write(get(target))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        if i % 2:
            stack.up.broadcast(b'{"type":"ADDED"}\n')
        writer.transport.abort()  # vanish: RST-like close without a TLS close_notify

    sem = asyncio.Semaphore(50)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(CLIENT_VANISH_TIMES))), 240)
    await asyncio.wait_for(stack.up.wait_until(lambda: stack.up.open_watches == 0), 30)
    await asyncio.wait_for(proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0), 30)
    await asyncio.wait_for(stack.up.wait_until(lambda: stack.up.open_connections <= conns), 30)
    assert stack.metric("apiproxy_open_watches", peer="cluster-a") == 0
    assert stack.up.total_connections >= CLIENT_VANISH_TIMES
    # the proxy's own upstream keep-alive pool may hold a couple of idle connections
    assert _fds() <= fds + 4, (fds, _fds())
    assert len(asyncio.all_tasks()) <= tasks + 2, [t.get_name() for t in asyncio.all_tasks()]
    await proxy.audit.flush()
    records = audit_records(stack.files.audit)
    ended = [r for r in records if r["stage"] == "ResponseComplete" and r["verb"] == "watch"]
    assert len(ended) == CLIENT_VANISH_TIMES + 2
    assert {r["annotations"]["apiproxy.io/stream-ended-by"] for r in ended} == {"client"}
    assert await status_of(stack) == 200


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[bool]:
    """Mount a 256 KiB tmpfs at `path` (we are root in CI); False if mounting is not possible."""
    path.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


async def test_audit_disk_full_is_reported_and_recovers_without_losing_records(
    make_stack: StackFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = {"on": False}
    with tiny_tmpfs(tmp_path / "audit") as mounted:
        if not mounted:  # simulate ENOSPC at the writer's file layer instead

            class _Full:
                def __init__(self, f: object) -> None:
                    self.f = f

                def write(self, data: bytes) -> int:
                    if full["on"]:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return self.f.write(data)  # type: ignore[attr-defined,no-any-return]

                def __getattr__(self, name: str) -> object:
                    return getattr(self.f, name)

            real = audit_writer._default_opener
            monkeypatch.setattr(audit_writer, "_default_opener", lambda p: _Full(real(p)))
        stack = await make_stack(audit_log=str(tmp_path / "audit" / "audit.log"))
        assert await status_of(stack) == 200
        await stack.proxy.audit.flush()
        filler = tmp_path / "audit" / "filler"
        if mounted:
            await asyncio.to_thread(_fill, filler)
        else:
            full["on"] = True
        # requests are still served while the audit log cannot be written (records queue up)
        for _ in range(20):
            assert await status_of(stack) == 200
        audit = stack.proxy.audit
        async with audit._progress:  # notified by the writer after each failed attempt
            await asyncio.wait_for(audit._progress.wait_for(lambda: not audit.healthy), 10)
        code, text = await readyz(stack)
        assert code == 503
        assert "[-]audit failed" in text
        assert stack.proxy.audit.write_errors >= 1
        assert '"event": "audit_log_write_failed"' in "".join(capsys.readouterr())
        # the disk gets space again: every queued record is written, readiness recovers
        if mounted:
            filler.unlink()
        full["on"] = False
        await asyncio.wait_for(stack.proxy.audit.flush(), 30)
        assert stack.proxy.audit.healthy
        assert (await readyz(stack))[0] == 200
        records = audit_records(tmp_path / "audit" / "audit.log")
        assert len(records) == 21
        assert len({r["auditID"] for r in records}) == 21
        await stack.proxy.stop()


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@pytest.mark.parametrize("what", ["policy", "peers", "tls-cert", "tls-key"])
@pytest.mark.parametrize("how", ["garbage", "empty", "deleted"])
async def test_broken_or_deleted_inputs_keep_the_last_good_state(
    stack: Stack, hworld: HWorld, what: str, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {
        "policy": stack.files.policy,
        "peers": stack.files.peers,
        "tls-cert": stack.files.tls_cert,
        "tls-key": stack.files.tls_key,
    }[what]
    good = path.read_text()
    name = "tls" if what.startswith("tls") else what
    assert stack.metric("apiproxy_reload_failing", what=name) == 0  # exported from the start
    if how == "deleted":
        path.unlink()
        assert await stack.proxy.reload_now() == []
    else:
        path.write_text("" if how == "empty" else "-----BEGIN GARBAGE-----\n\x01\x02: [\n")
        assert await stack.proxy.reload_now() == [(name, False)]
        assert stack.metric("apiproxy_reloads_total", what=name, result="failure") == 1
        assert stack.metric("apiproxy_reload_failing", what=name) == 1  # what alerts watch
        assert "reload_refused" in "".join(capsys.readouterr())
    # still serving with the last good state: allowed stays allowed, denied stays denied,
    # peers still authenticate, new TLS handshakes still work
    assert await status_of(stack) == 200
    assert await status_of(stack, "/api/v1/namespaces/x/secrets") == 403
    raw = await stack.raw(get("/api/v1/pods", close=True), who="b")
    assert parse_responses(raw)[0].status == 200
    # the fault ends: the good file comes back and is taken
    path.write_text(good + "\n")
    results = await stack.proxy.reload_now()
    assert results == [(name, True)]
    assert stack.metric("apiproxy_reloads_total", what=name, result="success") == 1
    assert stack.metric("apiproxy_reload_failing", what=name) == 0
    assert await status_of(stack) == 200


async def test_readiness_reports_a_refused_reload(stack: Stack) -> None:
    stack.files.policy.write_text("rules: [\n")
    assert await stack.proxy.reload_now() == [("policy", False)]
    await probe(stack)
    code, text = await readyz(stack)
    assert code == 200  # still serving the last good policy: stays in the Service
    assert "policy" in text
    assert "failed" in text or "stale" in text
