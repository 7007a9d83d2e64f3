"""`apiproxy serve --workers N`: N worker processes on one port, as nginx does with SO_REUSEPORT.

`apiproxy serve --workers N` (N > 1) runs this module's supervisor, which

- checks the whole configuration first, as `apiproxy serve` would (flags, the per-worker shares of
  the per-peer limits, every file), so a bad file fails before anything starts;
- reserves the listen address with a socket bound with SO_REUSEPORT but never listening: port 0
  becomes one concrete port, which every worker binds too; the kernel spreads new connections
  over the workers' listening sockets;
- starts N workers, each `python -m apiproxy serve` with the same arguments and environment plus
  `APIPROXY_INTERNAL_WORKER` (its index, the port, its metrics socket, a pipe to report that it
  serves); a worker is an ordinary `ProxyServer` with its share of the per-peer limits and its
  own audit file (`audit.log` → `audit.worker-0.log`);
- forwards SIGHUP (reload) to the workers; on SIGTERM/SIGINT sends them SIGTERM, waits for them
  (the shutdown grace, then SIGKILL) and exits 0;
- restarts a worker that exits unexpectedly, with exponential backoff; a worker that cannot start
  while the supervisor starts stops everything with its error (no restart loop);
- relays each worker's standard output in whole lines (`--audit-log -`: records never interleave);
- serves `--metrics-listen`: `/metrics` merged from every worker's (see `MERGE`), `/healthz` and
  `/livez` (at least one worker lives), `/readyz` (every worker is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import site
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from apiproxy import __version__, log
from apiproxy import server as server_mod
from apiproxy.errors import UserError
from apiproxy.httpserver import probe_server
from apiproxy.metrics import EXPOSITION_CONTENT_TYPE

_log = log.get_logger("apiproxy.workers")

INTERNAL_ENV = "APIPROXY_INTERNAL_WORKER"  # set by the supervisor for its workers only
READY = b"ready\n"
BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker, doubled each time
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0  # a worker that served this long starts again from BACKOFF_FIRST
SCRAPE_TIMEOUT = 5.0

# How each gauge a worker exports is merged across workers. Counters and histograms are summed;
# `*_created` series take the earliest. A gauge missing here would be summed: the test
# `test_every_gauge_is_classified` fails for it, so a new gauge is classified on purpose.
MERGE: dict[str, str] = {
    # things held now: the proxy holds the sum
    "apiproxy_open_watches": "sum",
    "apiproxy_inflight_requests": "sum",
    "apiproxy_open_connections": "sum",
    "apiproxy_audit_queue_depth": "sum",
    # each worker reports its share of --max-watches-per-peer; their sum is the proxy's limit
    "apiproxy_max_watches_per_peer": "sum",
    # states: the worst worker speaks for the proxy
    "apiproxy_upstream_up": "min",
    "apiproxy_audit_healthy": "min",
    "apiproxy_upstream_tls_verified": "min",
    "apiproxy_reload_failing": "max",
    "apiproxy_last_successful_reload_timestamp_seconds": "min",
    # process and platform collectors
    "process_virtual_memory_bytes": "sum",
    "process_resident_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_max_fds": "max",
    "process_start_time_seconds": "min",
    "python_info": "max",
}
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}


def how_merged(name: str, kind: str) -> str:
    if kind in ("counter", "histogram"):
        return "sum"
    if kind == "gauge" and name.endswith("_created"):
        return "min"
    return MERGE.get(name, "sum")


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge(texts: Iterable[str]) -> bytes:
    """Prometheus text expositions of several workers as one (see `MERGE`)."""
    families: dict[str, tuple[Metric, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]
    families = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                merged = Metric(fam.name, fam.documentation, fam.type)
                families[fam.name] = (merged, how_merged(fam.name, fam.type), {})
            merged, how, values = families[fam.name]
            if merged.type != fam.type:
                continue  # cannot happen between workers of one version; never mix kinds
            combine = _COMBINE[how]
            for s in fam.samples:
                key = (s.name, tuple(s.labels.items()))
                old = values.get(key)
                values[key] = s.value if old is None else combine(old, s.value)
    out: list[Metric] = []
    for merged, _, values in families.values():
        for (name, labels), value in values.items():
            merged.add_sample(name, dict(labels), value)
        out.append(merged)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return generate_latest(registry)


# -- configuration ------------------------------------------------------------------------------


def audit_path(path: str | None, index: int) -> str | None:
    """`audit.log` → `audit.worker-0.log`; stdout (`-`) and no audit log stay as they are."""
    if path is None or path == "-":
        return path
    p = PurePath(path)
    return str(p.with_name(f"{p.stem}.worker-{index}{p.suffix}"))


def worker_config(
    config: server_mod.ServeConfig,
    *,
    workers: int,
    index: int,
    port: int,
    metrics_unix: str | None,
) -> server_mod.ServeConfig:
    """Worker `index`'s configuration: the shared port (SO_REUSEPORT), its share of the per-peer
    limits, its own audit file, metrics on its Unix socket only."""
    for flag, limit in (
        ("--max-requests-per-peer", config.max_requests_per_peer),
        ("--max-watches-per-peer", config.max_watches_per_peer),
    ):
        if workers > limit:
            raise UserError(
                f"--workers {workers} exceeds {flag} {limit}: each worker needs at least one"
            )
    return replace(
        config,
        listen_port=port,
        reuse_port=True,
        metrics_listen=None,
        metrics_unix=metrics_unix,
        audit_log=audit_path(config.audit_log, index),
        max_requests_per_peer=config.max_requests_per_peer // workers,
        max_watches_per_peer=config.max_watches_per_peer // workers,
    )


def reserve(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Bind (never listen) every address of `host` with SO_REUSEPORT: holds the port for the
    workers, and port 0 becomes one concrete port for all of them."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        raise UserError(f"--listen: cannot resolve {host!r}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]  # the first bind picks it; the others take it
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UserError(f"cannot serve: {exc.strerror or exc}") from None
    return port, sockets


# -- worker side --------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies (Linux), so no orphan keeps the port."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise UserError("the supervisor went away before this worker started")


def _run_worker(
    workers: int, config: Callable[[], server_mod.ServeConfig], spec: dict[str, Any]
) -> int:
    index, fd = int(spec["index"]), int(spec["ready_fd"])
    try:
        structlog.contextvars.bind_contextvars(worker=index)
        _die_with_parent(int(spec["parent"]))
        mine = worker_config(
            config(),
            workers=workers,
            index=index,
            port=int(spec["port"]),
            metrics_unix=spec.get("metrics"),
        )

        def ready() -> None:
            os.write(fd, READY)
            os.close(fd)

        server_mod.run(mine, on_ready=ready)
    except UserError as exc:  # the supervisor reports it (one line), or logs it on a restart
        with contextlib.suppress(OSError):
            os.write(fd, f"error: {exc}\n".encode())
        return exc.exit_code
    return 0


# -- supervisor ---------------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    failures: int = 0  # consecutive short-lived runs, for the backoff


async def _read_to_end(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()


def _write_stdout(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


class Supervisor:
    def __init__(
        self, argv: Sequence[str], config: server_mod.ServeConfig, workers: int, port: int
    ) -> None:
        self.argv = list(argv)
        self.config = config
        self.port = port
        self.slots = [_Slot(i) for i in range(workers)]
        self.registry = CollectorRegistry(auto_describe=True)
        self.live = Gauge(
            "apiproxy_workers",
            "Worker processes serving (apiproxy serve --workers).",
            registry=self.registry,
        )
        self.restarts = Counter(
            "apiproxy_worker_restarts",
            "Worker processes restarted after an unexpected exit.",
            registry=self.registry,
        )
        self.dir = tempfile.mkdtemp(prefix="apiproxy-workers-")  # mode 0700: sockets are ours
        # The workers run this very apiproxy package, wherever it was imported from.
        root = os.path.dirname(os.path.dirname(os.path.abspath(server_mod.__file__)))
        self.env: dict[str, str] = {}
        if root not in site.getsitepackages():
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [root, os.environ.get("PYTHONPATH")])
            )
        self.stopping = False
        self.started = False
        self.fatal: UserError | None = None
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()
        self._all_started = asyncio.Event()
        self._out_lock = asyncio.Lock()
        self._metrics_runner: web.ServerRunner | None = None

    def socket_path(self, index: int) -> str | None:
        if self.config.metrics_listen is None:
            return None
        return os.path.join(self.dir, f"worker-{index}.sock")

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            if self.config.metrics_listen is not None:
                await self._start_metrics(*self.config.metrics_listen)
            tasks = [
                asyncio.create_task(self._keep(s), name=f"worker-{s.index}") for s in self.slots
            ]
            await self._stop.wait()
            await self._shutdown(tasks)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._metrics_runner is not None:
                await self._metrics_runner.cleanup()
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.fatal is not None:
            raise self.fatal

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        _log.info("stopping", workers=sum(s.proc is not None for s in self.slots))
        self._stop.set()
        self._signal_all(signal.SIGTERM)

    def reload(self) -> None:
        _log.info("reload_forwarded")
        self._signal_all(signal.SIGHUP, ready_only=True)

    def _signal_all(self, sig: int, *, ready_only: bool = False) -> None:
        for slot in self.slots:
            if slot.proc is not None and (slot.ready or not ready_only):
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        # A worker takes up to the grace for requests plus a few seconds for its audit log.
        _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_grace_seconds + 15)
        if pending:
            _log.warning("workers_killed", workers=len(pending))
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending, timeout=10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _log.info("stopped")

    def _update_live(self) -> None:
        self.live.set(sum(s.ready for s in self.slots))

    async def _spawn(self, slot: _Slot, ready_fd: int) -> asyncio.subprocess.Process:
        spec = {
            "index": slot.index,
            "port": self.port,
            "metrics": self.socket_path(slot.index),
            "ready_fd": ready_fd,
            "parent": os.getpid(),
        }
        env = {**os.environ, **self.env, INTERNAL_ENV: json.dumps(spec)}
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "apiproxy",
            "serve",
            *self.argv,
            env=env,
            pass_fds=(ready_fd,),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a terminal's ^C reaches the supervisor only
        )

    async def _keep(self, slot: _Slot) -> None:
        """Run worker `slot.index` until the supervisor stops, restarting it when it dies."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            read_fd, write_fd = os.pipe()
            try:
                proc = await self._spawn(slot, write_fd)
            except OSError as exc:
                os.close(read_fd)
                self.fatal = UserError(f"cannot start worker {slot.index}: {exc}")
                self.stop()
                return
            finally:
                os.close(write_fd)
            slot.proc, began = proc, loop.time()
            if self._stop.is_set():  # the stop came while it was being spawned
                proc.terminate()
            assert proc.stdout is not None
            relay = asyncio.create_task(self._relay(proc.stdout))
            status = await _read_to_end(read_fd)
            if status == READY:
                slot.ready = True
                self._update_live()
                _log.info("worker_started", worker=slot.index, pid=proc.pid)
                if not self.started and all(s.ready for s in self.slots):
                    self.started = True
                    _log.info(
                        "serving",
                        listen=f"{self.config.listen_host}:{self.port}",
                        workers=len(self.slots),
                        metrics=self.metrics_port,
                    )
            code = await proc.wait()
            await relay
            slot.proc, slot.ready = None, False
            self._update_live()
            error = status.decode(errors="replace").removeprefix("error: ").strip() or None
            if status == READY:
                error = None
            (_log.info if self.stopping else _log.error)(
                "worker_exited", worker=slot.index, pid=proc.pid, code=code, error=error
            )
            if self._stop.is_set():
                return
            if not self.started:
                self.fatal = UserError(
                    error or f"worker {slot.index} exited with code {code} before serving"
                )
                self.stop()
                return
            if loop.time() - began >= STABLE_SECONDS:
                slot.failures = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**slot.failures)
            slot.failures += 1
            self.restarts.inc()
            _log.warning("worker_restarting", worker=slot.index, delay_seconds=delay)
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that arrives in the
            # turn its awaitable finishes (see apiproxy/federation/controller.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """A worker's stdout to ours in whole lines, so workers' audit records never interleave."""
        rest = b""
        try:
            while chunk := await stream.read(1 << 16):
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                rest = data[cut:]
                if cut:
                    async with self._out_lock:
                        await asyncio.to_thread(_write_stdout, data[:cut])
            if rest:
                async with self._out_lock:
                    await asyncio.to_thread(_write_stdout, rest)
        except (OSError, ValueError) as exc:  # our stdout is gone: the worker's writes block
            _log.error("stdout_relay_failed", error=str(exc))

    # -- metrics and health ----------------------------------------------------------------------

    async def _start_metrics(self, host: str, port: int) -> None:
        probes = probe_server(healthz=self._healthz, readyz=self._readyz, metrics=self._metrics)
        self._metrics_runner = web.ServerRunner(probes)
        await self._metrics_runner.setup()
        await web.TCPSite(self._metrics_runner, host, port).start()
        self.metrics_port = self._metrics_runner.addresses[0][1]

    async def _get(self, slot: _Slot, path: str) -> tuple[int, str] | None:
        sock = self.socket_path(slot.index)
        if not slot.ready or sock is None:
            return None
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=sock),
                    timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT),
                ) as session,
                session.get(f"http://worker-{slot.index}{path}") as resp,
            ):
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            _log.warning("worker_unreachable", worker=slot.index, path=path, error=str(exc))
            return None

    async def _healthz(self, _request: web.BaseRequest) -> web.Response:
        live = sum(s.ready for s in self.slots)
        ok = live > 0 and not self.stopping
        return web.Response(status=200 if ok else 503, text=f"{'ok' if ok else 'failed'}\n")

    async def _readyz(self, _request: web.BaseRequest) -> web.Response:
        answers = await asyncio.gather(*(self._get(s, "/readyz") for s in self.slots))
        lines, ok = [], not self.stopping
        for slot, answer in zip(self.slots, answers, strict=True):
            good = answer is not None and answer[0] == 200
            ok = ok and good
            why = "ok" if good else ("not ready" if answer is not None else "not running")
            lines.append(f"[{'+' if good else '-'}]worker-{slot.index} {why}\n")
            if answer is not None and not good:
                lines += [f"    {line}\n" for line in answer[1].splitlines()]
        body = "".join(lines) + ("ok\n" if ok else "not ready\n")
        return web.Response(status=200 if ok else 503, text=body)

    async def _metrics(self, _request: web.BaseRequest) -> web.Response:
        answers = await asyncio.gather(*(self._get(s, "/metrics") for s in self.slots))
        texts = [a[1] for a in answers if a is not None and a[0] == 200]
        body = merge(texts) + generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": EXPOSITION_CONTENT_TYPE})


def _supervise(argv: Sequence[str], workers: int, config: server_mod.ServeConfig) -> int:
    # Everything a worker would refuse, refused here first, once, before anything starts.
    server_mod.ProxyServer(
        worker_config(config, workers=workers, index=0, port=0, metrics_unix=None)
    )
    port, held = reserve(config.listen_host, config.listen_port)
    _log.info("starting", version=__version__, workers=workers)
    try:
        with asyncio.Runner() as runner:
            runner.run(Supervisor(argv, config, workers, port).run())
    finally:
        for sock in held:
            sock.close()
    return 0


def main(argv: Sequence[str], *, workers: int, config: Callable[[], server_mod.ServeConfig]) -> int:
    """`apiproxy serve` with `--workers` > 1: the supervisor, or (`APIPROXY_INTERNAL_WORKER`
    set by it) one of its workers. `argv` is the command line every worker is started with;
    `config()` builds the configuration from it (apiproxy/serve_cli.py), called here so that a
    worker reports its errors to the supervisor."""
    raw = os.environ.pop(INTERNAL_ENV, None)
    if raw is None:
        return _supervise(argv, workers, config())
    try:
        spec = json.loads(raw)
    except ValueError:
        spec = None
    if not isinstance(spec, dict):  # not an assert: python -O must refuse it too
        raise UserError(f"{INTERNAL_ENV}: not set by an apiproxy supervisor")
    return _run_worker(workers, config, spec)


__all__ = ["MERGE", "Supervisor", "audit_path", "main", "merge", "reserve", "worker_config"]
