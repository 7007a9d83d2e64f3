# ruff: noqa: SIM117  (nested client/response contexts read more clearly in these tests)
"""Connections before authentication (apiproxy/admission.py): deadlines, caps, head bounds.

Each scenario runs on asyncio's loop and on uvloop (what `apiproxy serve` uses) against a real
proxy on 127.0.0.1 with a recording upstream. Strangers are real sockets bound to other loopback
addresses (127.0.0.2, ...) so per-source limits see distinct sources. Deadlines are short and
every wait is for an event: a closed socket, a counter, the proxy's own connection accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from structlog.testing import capture_logs

from apiproxy import upstream
from apiproxy.admission import WHY, source_key
from apiproxy.errors import UserError
from apiproxy.serve_cli import build_parser, config_from_args
from apiproxy.server import ProxyServer, ServeConfig
from tests.proxy.conftest import (
    OWN_UUID,
    Files,
    Recorder,
    World,
    audit_records,
    make_files,
    start_recorder,
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
ROOT = Path(__file__).resolve().parents[2]
LIST = "/api/v1/namespaces/x/pods"
EVENT = b'{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"a"}}}\n'
STRANGER_HEAD = b"GET /api/v1/namespaces/x/pods HTTP/1.1\r\nHost: proxy\r\n"


def run(
    loop: str, scenario: Callable[..., Awaitable[None]], *args: Any, limit: float = 120
) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario(*args), limit))


class Stack:
    def __init__(self, proxy: ProxyServer, rec: Recorder, files: Files, world: World, tmp: Path):
        self.proxy = proxy
        self.rec = rec
        self.files = files
        self.world = world
        self.tmp = tmp

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxy.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def closed(self, reason: str) -> float:
        return self.metric("apiproxy_connections_closed_total", reason=reason)

    def peer(self, source: str = "127.0.0.1") -> aiohttp.ClientSession:
        ctx = self.world.client_ssl(self.world.client_a, self.tmp)
        conn = aiohttp.TCPConnector(ssl=ctx, local_addr=(source, 0))
        return aiohttp.ClientSession(connector=conn, auto_decompress=False)

    async def tcp(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.proxy.port, local_addr=(source, 0))

    async def stranger(
        self, source: str, head: bytes = STRANGER_HEAD
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """TLS without a client certificate, then a partial request head."""
        ctx = ssl.create_default_context(cadata=self.world.server_ca.cert_pem)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.proxy.port, ssl=ctx, local_addr=(source, 0)
        )
        writer.write(head)
        await writer.drain()
        return reader, writer

    async def until(self, predicate: Callable[[], bool]) -> None:
        await self.proxy.admission.wait_until(predicate)


@contextlib.asynccontextmanager
async def stack(world: World, tmp: Path, **overrides: Any) -> AsyncIterator[Stack]:
    rec = await start_recorder(world)
    files = make_files(world, tmp)
    cfg = ServeConfig(
        tls_cert=str(files.tls_cert),
        tls_key=str(files.tls_key),
        peers=str(files.peers),
        cluster_uuid=OWN_UUID,
        policy=str(files.policy),
        upstream=upstream.from_flags(rec.url, str(files.upstream_ca), str(files.token)),
        audit_log=str(files.audit),
        reload_interval_seconds=0,
        shutdown_grace_seconds=1,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    proxy = ProxyServer(cfg)
    await proxy.start()
    try:
        yield Stack(proxy, rec, files, world, tmp)
    finally:
        await proxy.stop()
        rec.events.put_nowait(None)
        assert rec.runner is not None
        await rec.runner.cleanup()


async def refused(st: Stack, source: str) -> bool:
    """A raw connection from `source` that the proxy resets right after accepting it (the reset
    may even beat the client's own view of the connect)."""
    try:
        reader, writer = await st.tcp(source)
    except ConnectionResetError:
        return True
    data = await eof(reader)
    writer.close()
    return data == b""


async def eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the other side closes (a reset counts as closed)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    return data


async def list_ok(s: aiohttp.ClientSession, url: str) -> None:
    async with s.get(url + LIST) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sockets_on_port(port: int) -> int:
    """Descriptors of this process that are accepted connections on `port` (not the listener)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] != "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                held += 1
    return held


def ensure_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        try:  # root (CI) may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            pytest.skip(f"needs {need} file descriptors, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


# -- the acceptance test ------------------------------------------------------------------

STALL_TLS, STALL_TCP = 1000, 500
STALL_SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]  # 150 strangers per source
HANDSHAKE_S, HEAD_S = 8.0, 20.0  # long enough for all 1,500 to stand at once on a slow CI box
SLACK_S = 10.0  # how late a close may be observed on a loaded machine
# How early: timers have millisecond resolution and uvloop's clock is read once per loop turn.
CLOCK_S = 0.05


async def _stalled_strangers(world: World, tmp: Path) -> None:
    async with stack(
        world,
        tmp,
        tls_handshake_timeout_seconds=HANDSHAKE_S,
        request_head_timeout_seconds=HEAD_S,
        max_unauthenticated_connections=2000,
        max_unauthenticated_per_source=200,
    ) as st:
        proxy, adm = st.proxy, st.proxy.admission
        # Warm up the paths the checks below use (upstream pools, a watch), then take the baseline.
        async with st.peer() as s:
            await list_ok(s, proxy.url)
            async with s.get(proxy.url + LIST + "?watch=1") as resp:
                st.rec.events.put_nowait(EVENT)
                assert await resp.content.readline() == EVENT
        await st.until(lambda: adm.open_connections == 0)
        await proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0)
        await proxy.audit.flush()  # the writer opens its file lazily: open before the baseline
        baseline = fds()

        clients = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.proxy.stall_clients",
            "127.0.0.1",
            str(proxy.port),
            f"--tls={STALL_TLS}",
            f"--tcp={STALL_TCP}",
            f"--sources={','.join(STALL_SOURCES)}",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert clients.stdout is not None
        try:
            ready = json.loads(await clients.stdout.readline() or b"null")
            assert ready == {"event": "ready", "tls": STALL_TLS, "tcp": STALL_TCP}
            # They all stand: a peer's LIST and a new watch get through regardless.
            assert adm.unauthenticated == STALL_TLS + STALL_TCP
            assert sockets_on_port(proxy.port) == STALL_TLS + STALL_TCP
            async with st.peer() as s:
                await list_ok(s, proxy.url)
                async with s.get(proxy.url + LIST + "?watch=1") as resp:
                    assert resp.status == 200
                    st.rec.events.put_nowait(EVENT)
                    assert await resp.content.readline() == EVENT
            assert adm.unauthenticated == STALL_TLS + STALL_TCP, "strangers closed too early"
            done = json.loads(await clients.stdout.readline() or b"null")
        finally:
            with contextlib.suppress(ProcessLookupError):
                clients.kill()
            await clients.wait()
        assert done["early"] == 0
        assert len(done["tls"]) == STALL_TLS
        assert len(done["tcp"]) == STALL_TCP
        # Closed by the proxy's deadlines: never before, and not much after.
        assert min(a for a, _ in done["tls"]) >= HEAD_S - CLOCK_S
        assert max(b for _, b in done["tls"]) <= HEAD_S + SLACK_S
        assert min(a for a, _ in done["tcp"]) >= HANDSHAKE_S - CLOCK_S
        assert max(b for _, b in done["tcp"]) <= HANDSHAKE_S + SLACK_S
        assert st.closed("head_timeout") == STALL_TLS
        assert st.closed("handshake_timeout") == STALL_TCP
        assert st.closed("unauthenticated_limit") == st.closed("source_limit") == 0
        await st.until(lambda: adm.open_connections == 0)
        await proxy.wait_until(lambda: proxy.open_watches("cluster-a") == 0)
        assert adm.unauthenticated == 0
        assert st.metric("apiproxy_open_connections", state="unauthenticated") == 0
        # Every descriptor is back: none on the proxy's port, and no more in all than before (an
        # idle upstream keep-alive connection may have expired meanwhile).
        assert sockets_on_port(proxy.port) == 0
        assert fds() <= baseline
        # Nothing of this reached the audit log: no request was ever known.
        await proxy.audit.flush()
        assert all(r["user"]["username"] == "peer:cluster-a" for r in audit_records(st.files.audit))


@pytest.mark.slow
def test_stalled_strangers_are_closed_at_their_deadlines_while_peers_are_served(
    world: World, tmp_path: Path
) -> None:
    ensure_fd_limit(2 * (STALL_TLS + STALL_TCP) + 1024)
    run("uvloop", _stalled_strangers, world, tmp_path, limit=240)


# -- caps -----------------------------------------------------------------------------------------


async def _per_source_cap(world: World, tmp: Path) -> None:
    async with stack(world, tmp, max_unauthenticated_per_source=5) as st:
        adm = st.proxy.admission
        standing = [await st.tcp("127.0.0.2") for _ in range(5)]
        await st.until(lambda: adm.unauthenticated_from("127.0.0.2") == 5)
        # The excess from that source is reset at once, before any TLS: not a byte comes back.
        for _ in range(3):
            assert await refused(st, "127.0.0.2")
        assert st.closed("source_limit") == 3
        # Another source's peer is served meanwhile, and so is a stranger from a third source.
        async with st.peer("127.0.0.3") as s:
            await list_ok(s, st.proxy.url)
        third = await st.tcp("127.0.0.4")
        await st.until(lambda: adm.unauthenticated_from("127.0.0.4") == 1)
        assert adm.unauthenticated_from("127.0.0.2") == 5  # the first five still stand
        assert st.closed("source_limit") == 3
        # The peer's source is not held to the strangers' count once authenticated.
        assert adm.unauthenticated_from("127.0.0.3") == 0
        for _, w in [*standing, third]:
            w.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_per_source_cap_refuses_the_excess_while_another_source_is_served(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _per_source_cap, world, tmp_path)


async def _total_cap(world: World, tmp: Path) -> None:
    async with stack(
        world, tmp, max_unauthenticated_connections=20, max_unauthenticated_per_source=15
    ) as st:
        adm = st.proxy.admission
        # A peer's watch is open: authenticated connections do not count and are never cut.
        async with st.peer() as watcher:
            async with watcher.get(st.proxy.url + LIST + "?watch=1") as watch:
                assert watch.status == 200
                small = [await st.tcp("127.0.0.3") for _ in range(8)]  # the oldest ones
                big = [await st.tcp("127.0.0.2") for _ in range(12)]
                await st.until(lambda: adm.unauthenticated == 20)
                # The cap is full: a peer's new connection still gets in, and the stranger cut
                # for it is the oldest one of the source holding the most.
                async with st.peer() as s:
                    await list_ok(s, st.proxy.url)
                assert await eof(big[0][0]) == b""
                assert st.closed("unauthenticated_limit") == 1
                assert adm.unauthenticated_from("127.0.0.2") == 11
                assert adm.unauthenticated_from("127.0.0.3") == 8
                # The peer authenticated (19 left). More strangers only replace strangers, always
                # from the source holding the most; the cap holds.
                # (At once: several accepts in one loop turn must each cut a different stranger.)
                more = await asyncio.gather(*(st.tcp("127.0.0.4") for _ in range(5)))
                await st.until(lambda: adm.unauthenticated_from("127.0.0.4") == 5)
                assert adm.unauthenticated == 20
                assert st.closed("unauthenticated_limit") == 5
                # 127.0.0.2 paid until it held no more than 127.0.0.3, whose oldest went next.
                assert adm.unauthenticated_from("127.0.0.2") == 8
                assert adm.unauthenticated_from("127.0.0.3") == 7
                assert await eof(small[0][0]) == b""
                st.rec.events.put_nowait(EVENT)
                assert await watch.content.readline() == EVENT
                assert st.proxy.open_watches("cluster-a") == 1
                for _, w in big + small + more:
                    w.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_total_cap_cuts_a_stranger_so_a_peer_still_gets_in(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _total_cap, world, tmp_path)


# -- time -----------------------------------------------------------------------------------------


async def _watch_outlives_head_deadline(world: World, tmp: Path) -> None:
    async with stack(
        world, tmp, tls_handshake_timeout_seconds=0.5, request_head_timeout_seconds=0.5
    ) as st:
        loop = asyncio.get_running_loop()
        async with st.peer() as s:
            async with s.get(st.proxy.url + LIST + "?watch=1") as watch:
                assert watch.status == 200
                started = loop.time()
                # A stranger opened after the watch is cut at its head deadline ...
                reader, writer = await st.stranger("127.0.0.2")
                assert await eof(reader) == b""
                writer.close()
                # ... and a raw one at its handshake deadline; both are past by now.
                reader, writer = await st.tcp("127.0.0.2")
                assert await eof(reader) == b""
                writer.close()
                assert loop.time() - started >= 0.5
                assert st.closed("head_timeout") == 1
                assert st.closed("handshake_timeout") == 1
                # The watch is still open and streaming: its request was known and authorised.
                st.rec.events.put_nowait(EVENT)
                assert await watch.content.readline() == EVENT
                assert st.proxy.open_watches("cluster-a") == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_an_authorised_watch_outlives_the_head_deadline(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _watch_outlives_head_deadline, world, tmp_path)


async def _peer_requests(st: Stack, n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A peer's keep-alive connection after `n` answered requests."""
    ctx = st.world.client_ssl(st.world.client_a, st.tmp)
    reader, writer = await asyncio.open_connection("127.0.0.1", st.proxy.port, ssl=ctx)
    for _ in range(n):  # keep-alive: the same connection carries every request
        writer.write(_head())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return reader, writer


async def _idle_keepalive(world: World, tmp: Path) -> None:
    async with stack(world, tmp, idle_timeout_seconds=0.5) as st:
        loop = asyncio.get_running_loop()
        # The proxy's idle timer starts after its last answer, so no earlier than this; timing
        # from when the client read that answer would undercount on a loaded machine.
        idle_from = loop.time()
        reader, writer = await _peer_requests(st, 2)
        assert st.proxy.admission.unauthenticated == 0  # it authenticated
        assert await eof(reader) == b""  # closed by the proxy, cleanly
        assert loop.time() - idle_from >= 0.5
        assert st.closed("idle_timeout") == 1
        writer.close()


async def _later_head_deadline(world: World, tmp: Path) -> None:
    async with stack(world, tmp, idle_timeout_seconds=60, request_head_timeout_seconds=0.5) as st:
        reader, writer = await _peer_requests(st, 1)
        # The next request's first bytes end the idle wait; its head then has the head timeout.
        writer.write(STRANGER_HEAD)
        assert await eof(reader) == b""
        assert st.closed("head_timeout") == 1
        assert st.closed("idle_timeout") == 0
        writer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_later_request_head_on_a_peer_connection_has_the_head_deadline(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _later_head_deadline, world, tmp_path)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _idle_keepalive, world, tmp_path)


# -- one request per unauthenticated connection, head bounds --------------------------------------


async def _unauthenticated_one_request(world: World, tmp: Path) -> None:
    async with stack(world, tmp) as st:
        adm = st.proxy.admission
        # The pipelined second request is never answered: the connection closes after the 401.
        reader, writer = await st.stranger("127.0.0.2", _head() * 2)
        data = await eof(reader)
        assert data.startswith(b"HTTP/1.1 401")
        assert data.count(b"HTTP/1.1") == 1
        assert b"connection: close" in data.lower()
        writer.close()
        await st.until(lambda: adm.unauthenticated == 0)
        assert st.closed("unauthenticated") == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_an_unauthenticated_connection_carries_one_request(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _unauthenticated_one_request, world, tmp_path)


def _head(target: str = LIST, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: proxy"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


OVERSIZED = {
    "long-target": _head(LIST + "?labelSelector=" + "a" * (16 * 1024)),
    "long-header": _head(headers=[("X-Filler", "v" * (17 * 1024))]),
    "many-headers": _head(headers=[(f"X-H{i}", "v") for i in range(64)]),
}


async def _head_bounds(world: World, tmp: Path) -> None:
    async with stack(world, tmp) as st:
        # What client-go and kubectl send fits with room to spare: a long label selector, a
        # 12 KiB header (a large bearer token would be this size) and 40 headers.
        big_but_fine = _head(
            LIST + "?labelSelector=" + "app%20in%20(" + ",".join(["x" * 60] * 100) + ")",
            [("X-Large", "t" * (12 * 1024))] + [(f"X-Kubectl-{i}", "v") for i in range(38)],
        )
        assert len(big_but_fine) > 18 * 1024
        ctx = st.world.client_ssl(st.world.client_a, st.tmp)
        reader, writer = await asyncio.open_connection("127.0.0.1", st.proxy.port, ssl=ctx)
        writer.write(big_but_fine)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
        # Larger than the bounds: 431 with a Status, before any authentication work.
        for name, head in OVERSIZED.items():
            reader, writer = await st.stranger("127.0.0.2", head)
            data = await eof(reader)
            writer.close()
            assert data.split(b" ", 2)[1] == b"431", (name, data[:200])
            body = json.loads(data.split(b"\r\n\r\n", 1)[1])
            assert body["kind"] == "Status"
            assert body["code"] == 431
            assert body["reason"] == "RequestHeaderFieldsTooLarge"
        reader, writer = await st.stranger("127.0.0.2", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        data = await eof(reader)
        writer.close()
        assert data.split(b" ", 2)[1] == b"400", data[:200]
        assert st.closed("head_too_large") == len(OVERSIZED)
        assert st.closed("bad_request") == 1
        assert st.metric("apiproxy_authentication_failures_total", reason="no_credentials") == 0
        await st.proxy.audit.flush()
        assert [r["user"]["username"] for r in audit_records(st.files.audit)] == ["peer:cluster-a"]


@pytest.mark.parametrize("loop", LOOPS)
def test_oversized_heads_get_431_before_authentication(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _head_bounds, world, tmp_path)


# -- visible --------------------------------------------------------------------------------------


async def _cut_log(world: World, tmp: Path) -> None:
    with capture_logs() as logs:
        async with stack(world, tmp, max_unauthenticated_per_source=1) as st:
            st.proxy.admission._cuts.interval = 3600  # the summary comes at stop, not by timer
            first = await st.tcp("127.0.0.2")
            await st.until(lambda: st.proxy.admission.unauthenticated == 1)
            for _ in range(30):
                assert await refused(st, "127.0.0.2")
            cut = [e for e in logs if e["event"] == "connections_cut"]
            assert len(cut) == 1, cut  # one line, however many cuts
            assert cut[0]["reason"] == "source_limit"
            assert cut[0]["source"] == "127.0.0.2"
            assert cut[0]["why"] == WHY["source_limit"]
            first[1].close()
    cut = [e for e in logs if e["event"] == "connections_cut"]
    assert len(cut) == 2, cut
    assert cut[1]["count"] == 29
    assert cut[1]["sources"] == {"127.0.0.2": 29}


def test_cut_connections_are_logged_at_a_bounded_rate(world: World, tmp_path: Path) -> None:
    run("asyncio", _cut_log, world, tmp_path)


# -- units ----------------------------------------------------------------------------------------


def test_source_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert source_key("127.0.0.2") == "127.0.0.2"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_key("fe80::1%eth0") == "fe80::/64"


def test_flags_set_the_limits_and_refuse_nonsense(tmp_path: Path) -> None:
    for name in ("c", "k", "p", "pol"):
        (tmp_path / name).write_text("x")
    base = [
        "--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k"),
        "--peers", str(tmp_path / "p"), "--policy", str(tmp_path / "pol"),
        "--cluster-uuid", OWN_UUID, "--upstream", "https://127.0.0.1:6443",
    ]  # fmt: skip
    parser = build_parser("apiproxy serve")
    cfg = config_from_args(parser.parse_args(base))
    assert (cfg.tls_handshake_timeout_seconds, cfg.request_head_timeout_seconds) == (10.0, 20.0)
    assert cfg.tls_handshake_timeout_seconds + cfg.request_head_timeout_seconds <= 30
    assert cfg.idle_timeout_seconds == 90.0
    assert (cfg.max_unauthenticated_connections, cfg.max_unauthenticated_per_source) == (1000, 250)
    assert (cfg.max_request_line_bytes, cfg.max_header_bytes, cfg.max_headers) == (
        16384,
        16384,
        64,
    )
    cfg = config_from_args(
        parser.parse_args(
            [
                *base,
                "--tls-handshake-timeout-seconds=2.5",
                "--request-head-timeout-seconds=5",
                "--idle-timeout-seconds=30",
                "--max-unauthenticated-connections=50",
                "--max-unauthenticated-per-source=7",
                "--max-request-line-bytes=4096",
                "--max-header-bytes=8192",
                "--max-headers=32",
            ]
        )
    )
    assert cfg.tls_handshake_timeout_seconds == 2.5
    assert cfg.request_head_timeout_seconds == 5
    assert cfg.idle_timeout_seconds == 30
    assert cfg.max_unauthenticated_connections == 50
    assert cfg.max_unauthenticated_per_source == 7
    assert cfg.max_request_line_bytes == 4096
    assert cfg.max_header_bytes == 8192
    assert cfg.max_headers == 32
    for bad in (
        "--max-unauthenticated-per-source=0",
        "--request-head-timeout-seconds=0",
        "--max-headers=3",
        "--max-header-bytes=lots",
    ):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            config_from_args(parser.parse_args([*base, bad]))


def test_fd_budget_counts_strangers_watches_requests_and_the_pool() -> None:
    from apiproxy.admission import FD_BASE, Limits, fd_budget

    need = fd_budget(
        Limits(max_unauthenticated=500),
        peers=3,
        watches_per_peer=40,
        requests_per_peer=20,
        upstream_connections=100,
    )
    assert need == FD_BASE + 500 + 3 * (2 * 40 + 20) + 100


def test_serve_raises_its_soft_fd_limit_and_warns_when_short() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise")
    code = (
        "import resource, sys\n"
        "from apiproxy.admission import raise_fd_limit\n"
        "raise_fd_limit(int(sys.argv[1]))\n"
        "print('soft', resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    for needed, event in ((1000, "fd_limit"), (hard + 1, "fd_limit_low")):
        out = subprocess.run(
            [sys.executable, "-c", code, str(needed)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            preexec_fn=lowered,
            check=True,
        ).stdout
        assert f"soft {hard}" in out, out  # raised from 256 to the hard limit
        assert event in out
        assert ("fd_limit_low" in out) == (needed > hard), out


async def _handshake_failures(world: World, tmp: Path) -> None:
    async with stack(world, tmp) as st:
        adm = st.proxy.admission
        with capture_logs() as logs:
            # A TCP probe that hangs up is no cut of ours: neither counted nor logged.
            reader, writer = await st.tcp("127.0.0.2")
            writer.close()
            await eof(reader)
            await st.until(lambda: adm.open_connections == 0)
            assert st.closed("handshake_failed") == 0
            # Plain HTTP on the TLS port, and a certificate no peer anchor issued, are refused.
            reader, writer = await st.tcp("127.0.0.2")
            writer.write(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
            await eof(reader)
            writer.close()
            ctx = st.world.client_ssl(st.world.client_unknown, st.tmp)
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", st.proxy.port, ssl=ctx, local_addr=("127.0.0.3", 0)
                )
                await eof(reader)
                writer.close()
            await st.until(lambda: adm.open_connections == 0)
        assert st.closed("handshake_failed") == 2
        cut = [e for e in logs if e["event"] == "connections_cut"]
        assert [(e["reason"], e["source"]) for e in cut] == [("handshake_failed", "127.0.0.2")]


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_handshakes_are_counted_and_probes_are_not(
    loop: str, world: World, tmp_path: Path
) -> None:
    run(loop, _handshake_failures, world, tmp_path)
