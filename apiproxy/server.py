"""`apiproxy serve`: authenticate the peer, classify the request, ask the policy, forward, audit.

Tests and other tools use the factory: `ProxyServer(ServeConfig(...))`, `await start()`, `.port`,
`.metrics_port`, `await reload_now()`, `await stop()`; `run(config)` serves one until
SIGTERM/SIGINT. The command line (flags and `APIPROXY_*` variables → `ServeConfig`) is
`apiproxy/serve_cli.py`; `--workers N` is `apiproxy/workers.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from apiproxy import (
    __version__,
    filtering,
    forward,
    log,
    memory,
    tokens,
    upgrade,
    upstream,
    view,
)
from apiproxy import admission as admission_mod
from apiproxy import peers as peers_mod
from apiproxy.audit import AuditWriter
from apiproxy.authn import AuthnFailure, authenticate
from apiproxy.errors import UserError
from apiproxy.exchange import EndReason, Exchange, Recorder
from apiproxy.forward import ForwardContext, ForwardLimits, PoolLimits, UpstreamPool, is_upgrade
from apiproxy.httpserver import probe_server
from apiproxy.limits import PeerLimits
from apiproxy.metrics import EXPOSITION_CONTENT_TYPE, Metrics
from apiproxy.nsview import NamespaceView
from apiproxy.policy import Policy
from apiproxy.reload import FileWatcher
from apiproxy.request import RequestRejected, classify
from apiproxy.streams import OpenStreams
from apiproxy.tasks import cancel_and_wait
from apiproxy.tls import ServerTLS, peer_certificate
from apiproxy.upstream_client import UpstreamClientError

_log = log.get_logger("apiproxy.server")
MiB = 1024 * 1024
PROBE_READ_SECONDS = 5.0  # the readiness probe's wait for each read of the upstream's answer


@dataclass
class ServeConfig:
    tls_cert: str
    tls_key: str
    peers: str
    cluster_uuid: str
    policy: str
    upstream: upstream.UpstreamConfig
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    audit_log: str | None = None  # path, "-" for stdout, None for no audit log
    audit_max_bytes: int = 100 * MiB
    audit_backups: int = 5
    metrics_listen: tuple[str, int] | None = None
    max_watch_seconds: float = 1800.0
    max_requests_per_peer: int = 200
    max_watches_per_peer: int = 100
    max_body_bytes: int = 3 * MiB
    upstream_timeout_seconds: float = 60.0
    upstream_connect_timeout_seconds: float = 10.0
    upstream_max_connections: int = 1000
    reload_interval_seconds: float = 2.0
    shutdown_grace_seconds: float = 25.0
    readiness_probe_interval_seconds: float = 10.0
    retry_after_seconds: int = 1
    # How often freed heap memory is handed back to the OS (glibc malloc_trim); 0: never.
    memory_trim_interval_seconds: float = 30.0
    # Before a request authenticates (apiproxy/admission.py): deadlines, caps, head bounds.
    tls_handshake_timeout_seconds: float = 10.0
    request_head_timeout_seconds: float = 20.0
    idle_timeout_seconds: float = 90.0
    max_unauthenticated_connections: int = 1000
    max_unauthenticated_per_source: int = 250
    max_request_line_bytes: int = 16 * 1024
    max_header_bytes: int = 16 * 1024
    max_headers: int = 64
    # Several worker processes (apiproxy/workers.py): every worker binds the listening socket
    # with SO_REUSEPORT and serves its metrics on a Unix socket for the supervisor to merge.
    reuse_port: bool = False
    metrics_unix: str | None = None


class ProxyServer:
    """One proxy instance: TLS listener, upstream pool, reload loop, metrics listener."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics.max_watches.set(config.max_watches_per_peer)
        # Load everything now: a bad file fails construction, before any port is bound.

        self.policy = Policy.load(config.policy)
        self.peers = peers_mod.load(config.peers, own_cluster_uuid=config.cluster_uuid)
        for w in self.peers.warnings:
            _log.warning("peers_warning", warning=w)
        self.tls = ServerTLS(config.tls_cert, config.tls_key, self.peers.client_ca_pem())
        # Successful peer-token verifications; a hit still needs the peer's current key object
        # and a valid time window (tokens.VerifyCache). Emptied on every peers reload as well.
        self.token_cache = tokens.VerifyCache()
        self.upstream = config.upstream
        self.metrics.upstream_tls_verified.set(1 if self.upstream.verifies_tls else 0)
        self.pool = UpstreamPool(
            self.upstream,
            PoolLimits(
                total=config.upstream_max_connections,
                connect_timeout=config.upstream_connect_timeout_seconds,
            ),
        )
        self.watcher = FileWatcher(config.reload_interval_seconds, on_result=self._reload_result)
        self.audit: AuditWriter | None = None
        self.recorder = Recorder(self.metrics, retry_after_seconds=config.retry_after_seconds)
        self.recorder.policy_changed(_named_resources(self.policy))
        self.limits = PeerLimits(
            self.metrics,
            max_requests=config.max_requests_per_peer,
            max_watches=config.max_watches_per_peer,
            on_change=self._notify,
        )
        # Answers being streamed (watches and upgraded sessions above all), so that shutdown
        # and revocations can end them.
        self.streams = OpenStreams()
        self.forwarding = ForwardContext(
            upstream=self.upstream,
            pool=self.pool,
            recorder=self.recorder,
            streams=self.streams,
            limits=ForwardLimits(
                upstream_timeout=config.upstream_timeout_seconds,
                connect_timeout=config.upstream_connect_timeout_seconds,
                max_stream_seconds=config.max_watch_seconds,
                max_body_bytes=config.max_body_bytes,
            ),
        )
        # Rules with a namespaces mapping or a projection: answers rewritten (filtering.py), with
        # the proxy's own view of namespace labels for selectors (nsview.py).
        self.nsview = NamespaceView(self.upstream, self.pool)
        self.filtering = filtering.FilterContext(
            nsview=self.nsview,
            sealer=filtering.ContinueSealer(_sealing_secret(config.tls_key)),
            count_hidden=self._count_hidden,
        )
        self._runner: web.ServerRunner | None = None
        self._metrics_runner: web.ServerRunner | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._trim_task: asyncio.Task[None] | None = None
        self.upstream_ok: bool | None = None
        # Files whose last reload was refused: still serving the last good version.
        self.stale: set[str] = set()
        self._changed: asyncio.Event | None = None
        self.stopping = False
        self.port = 0
        self.metrics_port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.config.listen_host}:{self.port}"

    def open_watches(self, peer: str) -> int:
        """Watches and upgraded sessions of `peer` being served."""
        return self.limits.open_watches(peer)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked whenever watches open or close or an
        upstream probe completes (tests await this instead of polling)."""
        while not predicate():
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def start(self) -> None:
        c = self.config
        if self._changed is None:
            self._changed = asyncio.Event()
        if c.audit_log:
            self.audit = AuditWriter(
                c.audit_log, max_bytes=c.audit_max_bytes, backups=c.audit_backups
            )
            await self.audit.start()
            self.recorder.audit = self.audit
        await self.pool.start()
        self._start_nsview()
        self._watch_inputs()
        self.watcher.start()
        # Our own accept loop: deadlines, caps and head bounds before authentication.
        self.admission = admission_mod.Admission(
            admission_mod.Limits(
                handshake_timeout=c.tls_handshake_timeout_seconds,
                head_timeout=c.request_head_timeout_seconds,
                idle_timeout=c.idle_timeout_seconds,
                max_unauthenticated=c.max_unauthenticated_connections,
                max_unauthenticated_per_source=c.max_unauthenticated_per_source,
                max_request_line=c.max_request_line_bytes,
                max_header_field=c.max_header_bytes,
                max_headers=c.max_headers,
            ),
            self.metrics.registry,
            self.tls.listening,
        )
        admission_mod.raise_fd_limit(
            admission_mod.fd_budget(
                self.admission.limits,
                peers=len(self.peers.peers),
                watches_per_peer=c.max_watches_per_peer,
                requests_per_peer=c.max_requests_per_peer,
                upstream_connections=c.upstream_max_connections,
            )
        )
        server = self.admission.server(self._handle)
        self._runner = web.ServerRunner(server, shutdown_timeout=c.shutdown_grace_seconds)
        await self._runner.setup()
        site = self.admission.site(
            self._runner, c.listen_host, c.listen_port, reuse_port=c.reuse_port
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        if c.metrics_listen is not None or c.metrics_unix is not None:
            probes = probe_server(healthz=self._healthz, readyz=self._readyz, metrics=self._metrics)
            self._metrics_runner = web.ServerRunner(probes)
            await self._metrics_runner.setup()
            if c.metrics_listen is not None:
                host, port = c.metrics_listen
                await web.TCPSite(self._metrics_runner, host, port).start()
                self.metrics_port = self._metrics_runner.addresses[0][1]
            if c.metrics_unix is not None:
                await web.UnixSite(self._metrics_runner, c.metrics_unix).start()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="apiproxy-upstream-probe")
        if c.memory_trim_interval_seconds > 0 and memory.CAN_TRIM:
            self._trim_task = asyncio.create_task(self._trim_loop(), name="apiproxy-memory-trim")
        _log.info(
            "serving",
            listen=f"{c.listen_host}:{self.port}",
            metrics=self.metrics_port,
            upstream=str(self.upstream.url),
            upstream_source=self.upstream.source,
            peers=[p.name for p in self.peers.peers],
            policy_rules=len(self.policy.rules),
        )

    async def stop(self) -> None:
        """Stop accepting, end watches cleanly at once, give other requests the grace period."""
        if self.stopping:
            return
        self.stopping = True
        _log.info("stopping", open_streams=len(self.streams))
        self.streams.end_all()
        await cancel_and_wait(self._probe_task, self._trim_task)
        await self.watcher.stop()
        await self.nsview.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.pool.close()
        if self.audit is not None:
            await self.audit.close(timeout=10)
        _log.info("stopped")

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- reload -------------------------------------------------------------------------------

    def _watch_inputs(self) -> None:
        c = self.config
        self.watcher.add("policy", [c.policy], self._reload_policy)
        self.watcher.add("peers", [c.peers], self._reload_peers)
        self.watcher.add("tls", [c.tls_cert, c.tls_key], self._reload_tls)
        tok = self.upstream.token
        if tok is not None and tok.path is not None:
            self.watcher.add("upstream-token", [str(tok.path)], self._reload_token)
        for what in ("policy", "peers", "tls"):  # the series exist from the start, for alerts
            self.metrics.reload_failing.labels(what).set(0)

    def _policy_still_allows(self, ex: Exchange) -> bool:
        if ex.identity is None or ex.info is None:
            return False
        decision = self.policy.decide(ex.identity.peer.name, ex.info)
        # A stream opened as a view must end when it would now be forwarded, and the reverse.
        same_view = decision.view == ex.annotations.get(view.ANNOTATION, "")
        # A filtered stream must end when its namespaces or projection change, and the reverse.
        before = ex.decision
        same_filter = before is not None and (
            decision.visibility == before.visibility and decision.projection == before.projection
        )
        return (
            decision.allowed
            and (decision.dangerous or not ex.upgrade)
            and same_view
            and same_filter
        )

    def _needs_nsview(self) -> bool:
        return any(
            r.visibility is not None and r.visibility.needs_labels for r in self.policy.rules
        )

    def _start_nsview(self) -> None:
        if self._needs_nsview():
            self.nsview.start()

    def _count_hidden(self, peer: str, hidden: int) -> None:
        self.metrics.child(self.metrics.filtered_items, peer).inc(hidden)

    def _reload_policy(self) -> None:
        self.policy = Policy.load(self.config.policy)
        self._start_nsview()
        self.recorder.policy_changed(_named_resources(self.policy))
        self.streams.revoke(self._policy_still_allows, "the policy no longer allows it")

    def _reload_peers(self) -> None:
        new = peers_mod.load(self.config.peers, own_cluster_uuid=self.config.cluster_uuid)
        self.tls.rebuild(client_ca_pem=new.client_ca_pem())
        self.peers = new
        self.token_cache.clear()
        for w in new.warnings:
            _log.warning("peers_warning", warning=w)
        self.streams.revoke(
            lambda ex: (
                ex.identity is not None
                and peers_mod.same_credentials(new.by_name(ex.identity.peer.name), ex.identity.peer)
            ),
            "the peer was removed or its credentials changed",
        )

    def _reload_tls(self) -> None:
        self.tls.rebuild()
        self.filtering.sealer.rotate(_sealing_secret(self.config.tls_key))

    def _reload_token(self) -> None:
        tok = self.upstream.token
        if tok is not None and tok.path is not None:
            # Refresh is lenient (an empty or missing file keeps the old token); say so.
            before = tok.get()
            tok.refresh()
            if tok.get() == before and not tok.path.exists():
                raise upstream.UpstreamError(f"{tok.path}: token file vanished; keeping old token")

    def _reload_result(self, what: str, ok: bool, err: BaseException | None) -> None:
        self.metrics.reloads.labels(what, "success" if ok else "failure").inc()
        (self.stale.discard if ok else self.stale.add)(what)
        self.metrics.reload_failing.labels(what).set(0 if ok else 1)
        if ok:
            self.metrics.last_reload.labels(what).set(time.time())
            _log.info("reloaded", what=what)
        else:
            # UserError texts name the file and the problem, never secret content.
            _log.error("reload_refused", what=what, error=str(err), kept="previous")
        self._notify()  # lets `wait_until` callers await a reload instead of forcing one

    async def reload_now(self) -> list[tuple[str, bool]]:
        """Check every watched file now (tests, SIGHUP)."""
        return await self.watcher.check()

    # -- health -------------------------------------------------------------------------------

    async def _probe_once(self) -> bool:
        headers: CIMultiDict[str] = CIMultiDict()
        self.upstream.authorize(headers)
        try:
            # Connecting gets its own timeout; the answer must then come within the probe's.
            deadline = self.config.upstream_connect_timeout_seconds + PROBE_READ_SECONDS
            async with asyncio.timeout(deadline):
                resp = await self.pool.send(
                    "GET", "/version", headers, None, read_timeout=PROBE_READ_SECONDS
                )
                try:
                    await resp.read(MiB)  # a body cut short fails the probe, not the probe loop
                finally:
                    resp.release()
            return resp.status < 500
        except (UpstreamClientError, TimeoutError, OSError):
            return False

    async def probe_upstream(self) -> bool:
        """Probe the upstream now; readiness, the metric and the log follow the result."""
        ok = await self._probe_once()
        if ok != self.upstream_ok:
            (_log.info if ok else _log.warning)("upstream_probe", reachable=ok)
        self.upstream_ok = ok
        self.metrics.upstream_up.set(1 if ok else 0)
        self._notify()
        return ok

    async def _probe_loop(self) -> None:
        while True:
            await self.probe_upstream()
            await asyncio.sleep(self.config.readiness_probe_interval_seconds)

    async def _trim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.memory_trim_interval_seconds)
            memory.release_free_memory()

    async def _healthz(self, _request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    def readiness(self) -> dict[str, bool]:
        checks = {
            "policy": self.policy is not None,
            "peers": self.peers is not None,
            "upstream": bool(self.upstream_ok),
            "audit": self.audit is None or bool(self.audit.healthy),
            "serving": not self.stopping,
        }
        if self._needs_nsview():
            # Filtered requests are refused (503) until the namespace labels have been read.
            checks["namespaces"] = self.nsview.synced
        return checks

    async def _readyz(self, _request: web.BaseRequest) -> web.Response:
        checks = self.readiness()
        ok = all(checks.values())
        body = "".join(
            f"[{'+' if v else '-'}]{k} {'ok' if v else 'failed'}\n" for k, v in checks.items()
        )
        # A refused reload does not make the proxy unready: a bad ConfigMap would otherwise take
        # every replica out of the Service at once. It is reported here, in logs and in metrics.
        body += "".join(
            f"[!]{what}-reload failed: serving the last good version\n"
            for what in sorted(self.stale)
        )
        return web.Response(
            status=200 if ok else 503, text=body + ("ok\n" if ok else "not ready\n")
        )

    async def _metrics(self, _request: web.BaseRequest) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": EXPOSITION_CONTENT_TYPE},
        )

    # -- requests: the pipeline ----------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One exchange per request. However the pipeline ends (an answer, a refusal, the client
        going away, which cancels this handler, or a bug), the `finally` writes its one final
        audit record and metrics sample before its per-peer slot is given back."""
        ex = Exchange.begin(request)
        try:
            return await self._pipeline(request, ex)
        except asyncio.CancelledError:
            ex.end(EndReason.SHUTDOWN if self.stopping else EndReason.CLIENT)
            raise
        except Exception as exc:
            answer = self.recorder.internal_error(ex, exc)
            if answer is None:  # the client already has a head: aiohttp drops the connection
                raise
            return answer
        finally:
            try:
                await self.recorder.complete(ex)
            finally:
                self.limits.release(ex)

    async def _pipeline(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        """authenticate → classify → decide → limits → view, forward or upgrade; each stage either
        fills in the exchange or answers with a refusal."""
        if (refused := self._authenticate(request, ex)) is not None:
            return refused
        if (refused := self._classify(ex)) is not None:
            return refused
        if (refused := self._decide(request, ex)) is not None:
            return refused
        if (too_many := self.limits.admit(ex)) is not None:
            retry = {"Retry-After": str(self.config.retry_after_seconds)}
            return self.recorder.refuse(ex, 429, too_many, headers=retry)
        if ex.decision is not None and ex.decision.view:  # `view: empty`: nothing goes upstream
            return await view.serve(self.forwarding, request, ex, ex.decision.view)
        if ex.decision is not None and ex.decision.filters:  # answers rewritten (filtering.py)
            if ex.upgrade:
                return self.recorder.refuse(
                    ex, 400, "protocol upgrades are not possible for filtered resources"
                )
            return await filtering.serve(self.forwarding, self.filtering, request, ex, ex.decision)
        if ex.upgrade:
            return await upgrade.relay(self.forwarding, request, ex)
        return await forward.forward(self.forwarding, request, ex)

    def _authenticate(self, request: web.BaseRequest, ex: Exchange) -> web.Response | None:
        try:
            if len(request.headers.getall("Authorization", ())) > 1:
                # Parsers disagree on which of several credentials counts: accept none.
                raise AuthnFailure("multiple_authorization_headers")
            identity = authenticate(
                self.peers,
                certificate=peer_certificate(request.transport),
                authorization=request.headers.get("Authorization"),
                cluster_uuid=self.config.cluster_uuid,
                token_cache=self.token_cache,
            )
        except AuthnFailure as failure:
            return self.recorder.refuse_authn(ex, failure)
        ex.identify(identity)
        self.admission.authenticated(request)  # no longer a stranger's connection (admission.py)
        return None

    def _classify(self, ex: Exchange) -> web.Response | None:
        try:
            ex.info = classify(ex.method, ex.target)
        except RequestRejected as exc:
            return self.recorder.refuse(ex, 400, f"invalid request: {exc.reason}")
        return None

    def _decide(self, request: web.BaseRequest, ex: Exchange) -> web.Response | None:
        assert ex.info is not None
        decision = self.policy.decide(ex.peer, ex.info)
        ex.decide(decision)
        if not decision.allowed:
            return self.recorder.forbidden(ex)
        ex.upgrade = is_upgrade(request.headers)
        if ex.upgrade and not decision.dangerous:
            ex.forbid("protocol upgrade refused: no rule marked dangerous allows it")
            return self.recorder.forbidden(ex, ": protocol upgrades need a dangerous rule")
        return None


def _sealing_secret(tls_key: str) -> bytes:
    """Key material for sealing continue tokens: the serving key, which replicas share."""
    try:
        with open(tls_key, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _named_resources(policy: Policy) -> frozenset[str]:
    return frozenset(r for rule in policy.rules for r in rule.resources)


async def serve(
    config: ServeConfig,
    ready: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    server = ProxyServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload_now()))
    await server.start()
    if ready is not None:
        ready.set()
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        await server.stop()


def _runner_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


def run(config: ServeConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Serve `config` in this process until SIGTERM/SIGINT; OS errors are UserErrors."""
    try:
        socket.getaddrinfo(config.listen_host, config.listen_port)
    except OSError:
        raise UserError(f"--listen: cannot resolve {config.listen_host!r}") from None
    _log.info("starting", version=__version__)
    memory.tune_malloc()  # before the first connection allocates its TLS buffers
    try:
        with asyncio.Runner(loop_factory=_runner_loop_factory()) as runner:
            runner.run(serve(config, on_ready=on_ready))
    except OSError as exc:
        raise UserError(f"cannot serve: {exc.strerror or exc}") from None


__all__ = ["ProxyServer", "ServeConfig", "run", "serve"]
