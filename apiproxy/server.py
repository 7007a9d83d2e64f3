"""`apiproxy serve`: authenticate the peer, classify the request, ask the policy, forward, audit.

Tests and other tools use the factory: `ProxyServer(ServeConfig(...))`, `await start()`, `.port`,
`.metrics_port`, `await reload_now()`, `await stop()`. `main` only turns flags and `APIPROXY_*`
environment variables into a `ServeConfig` and runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from apiproxy import __version__, flags, log, memory, status, tokens, upstream
from apiproxy import peers as peers_mod
from apiproxy import upgrade as upgrade_mod
from apiproxy.audit import AuditWriter
from apiproxy.audit.events import make_event, object_ref_from_info
from apiproxy.authn import AuthnFailure, Identity, authenticate
from apiproxy.errors import UserError
from apiproxy.forward import (
    CopyResult,
    EventCounter,
    PoolLimits,
    UpstreamPool,
    copy_stream,
    downstream_response_headers,
    is_upgrade,
    release_quietly,
    upstream_request_headers,
)
from apiproxy.metrics import KNOWN_RESOURCES, KNOWN_SUBRESOURCES, Metrics
from apiproxy.policy import Policy
from apiproxy.reload import FileWatcher
from apiproxy.request import METHOD_VERBS, RequestRejected, classify
from apiproxy.tasks import cancel_and_wait
from apiproxy.tls import ServerTLS, peer_certificate

_log = log.get_logger("apiproxy.server")
MiB = 1024 * 1024
PEER_GROUP = "apiproxy:peers"
ANONYMOUS = "system:anonymous"


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


@dataclass
class _Req:
    audit_id: str
    method: str
    target: str
    received: float
    started: float
    source_ip: str
    user_agent: str
    identity: Identity | None = None
    info: Any = None
    annotations: dict[str, object] = field(default_factory=dict)
    upgrade: bool = False
    revoked: str = ""  # why an open stream was ended by a reload


class ProxyServer:
    """One proxy instance: TLS listener, upstream pool, reload loop, metrics listener."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
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
            self.upstream.ssl_context(),
            PoolLimits(
                total=config.upstream_max_connections,
                connect_timeout=config.upstream_connect_timeout_seconds,
            ),
        )
        self.watcher = FileWatcher(config.reload_interval_seconds, on_result=self._reload_result)
        self.audit: Any = None
        self._runner: web.ServerRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._inflight: dict[str, int] = {}
        self._watches: dict[str, int] = {}
        # Open watches and upgraded streams, so shutdown and revocations can end them.
        self._streams: dict[asyncio.Timeout, _Req] = {}
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
        return self._watches.get(peer, 0)

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
        await self.pool.start()
        self._watch_inputs()
        self.watcher.start()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=c.shutdown_grace_seconds)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, c.listen_host, c.listen_port, ssl_context=self.tls.listening, backlog=1024
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        if c.metrics_listen is not None:
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/livez", self._healthz)
            app.router.add_get("/readyz", self._readyz)
            app.router.add_get("/metrics", self._metrics)
            self._metrics_runner = web.AppRunner(app, access_log=None)
            await self._metrics_runner.setup()
            msite = web.TCPSite(self._metrics_runner, c.metrics_listen[0], c.metrics_listen[1])
            await msite.start()
            self.metrics_port = self._metrics_runner.addresses[0][1]
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
        _log.info("stopping", open_watches=sum(self._watches.values()))
        loop = asyncio.get_running_loop()
        for t in list(self._streams):
            t.reschedule(loop.time())
        await cancel_and_wait(self._probe_task, self._trim_task)
        await self.watcher.stop()
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

    @contextlib.asynccontextmanager
    async def stream_deadline(self, r: _Req, seconds: float | None) -> AsyncIterator[None]:
        """Bound a long-lived stream by `seconds`, shutdown and revocation; raises TimeoutError
        when one of them ends it (`stream_end_reason` says which)."""
        loop = asyncio.get_running_loop()
        when = None if seconds is None else loop.time() + seconds
        async with asyncio.timeout_at(when) as tmo:
            self._streams[tmo] = r
            if self.stopping:
                tmo.reschedule(loop.time())
            try:
                yield
            finally:
                self._streams.pop(tmo, None)

    def stream_end_reason(self, r: _Req) -> str:
        if self.stopping:
            return "shutdown"
        return "revoked" if r.revoked else "deadline"

    def _revoke(self, still_allowed: Callable[[_Req], bool], why: str) -> None:
        """End open streams that the new peers or policy no longer allow: an open watch must
        not outlive the permission that opened it."""
        loop = asyncio.get_running_loop()
        for tmo, r in list(self._streams.items()):
            if not r.revoked and not still_allowed(r):
                r.revoked = why
                _log.warning("stream_revoked", audit_id=r.audit_id, why=why)
                tmo.reschedule(loop.time())

    def _policy_still_allows(self, r: _Req) -> bool:
        if r.identity is None or r.info is None:
            return False
        decision = self.policy.decide(r.identity.peer.name, r.info)
        return decision.allowed and (decision.dangerous or not r.upgrade)

    def _reload_policy(self) -> None:
        self.policy = Policy.load(self.config.policy)
        self._revoke(self._policy_still_allows, "the policy no longer allows it")

    def _reload_peers(self) -> None:
        new = peers_mod.load(self.config.peers, own_cluster_uuid=self.config.cluster_uuid)
        self.tls.rebuild(client_ca_pem=new.client_ca_pem())
        self.peers = new
        self.token_cache.clear()
        for w in new.warnings:
            _log.warning("peers_warning", warning=w)
        self._revoke(
            lambda r: (
                r.identity is not None
                and peers_mod.same_credentials(new.by_name(r.identity.peer.name), r.identity.peer)
            ),
            "the peer was removed or its credentials changed",
        )

    def _reload_tls(self) -> None:
        self.tls.rebuild()

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
        token = self.upstream.token.get() if self.upstream.token else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            resp = await self.pool.send(
                "GET",
                self.upstream.target("/version"),
                headers,
                None,
                read_timeout=5.0,
                server_hostname=self.upstream.tls_server_name,
            )
            async with resp:
                await resp.read()  # a body cut short fails the probe, not the probe loop
                return resp.status < 500
        except (aiohttp.ClientError, TimeoutError, OSError):
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

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def readiness(self) -> dict[str, bool]:
        return {
            "policy": self.policy is not None,
            "peers": self.peers is not None,
            "upstream": bool(self.upstream_ok),
            "audit": self.audit is None or bool(self.audit.healthy),
            "serving": not self.stopping,
        }

    async def _readyz(self, _request: web.Request) -> web.Response:
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

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    # -- requests -----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        r = _Req(
            audit_id=str(uuid.uuid4()),
            method=request.method,
            target=request.raw_path,
            received=time.time(),
            started=time.monotonic(),
            source_ip=request.remote or "",
            user_agent=request.headers.get("User-Agent", ""),
        )
        try:
            if len(request.headers.getall("Authorization", ())) > 1:
                # Parsers disagree on which of several credentials counts: accept none.
                raise AuthnFailure("multiple_authorization_headers")
            r.identity = authenticate(
                self.peers,
                certificate=peer_certificate(request.transport),
                authorization=request.headers.get("Authorization"),
                cluster_uuid=self.config.cluster_uuid,
                token_cache=self.token_cache,
            )
        except AuthnFailure as failure:
            return await self._refuse_authn(r, failure)
        peer = r.identity.peer.name
        try:
            r.info = classify(r.method, r.target)
        except RequestRejected as exc:
            return await self._refuse(r, 400, f"invalid request: {exc.reason}", decision=None)
        decision = self.policy.decide(peer, r.info)
        r.annotations["authorization.k8s.io/decision"] = "allow" if decision.allowed else "forbid"
        r.annotations["authorization.k8s.io/reason"] = decision.reason
        r.annotations["apiproxy.io/rule"] = decision.rule
        if not decision.allowed:
            return await self._refuse(r, 403, self._forbidden_message(r), decision="forbid")
        upgrading = r.upgrade = is_upgrade(request.headers)
        if upgrading and not decision.dangerous:
            r.annotations["authorization.k8s.io/decision"] = "forbid"
            r.annotations["authorization.k8s.io/reason"] = (
                "protocol upgrade refused: no rule marked dangerous allows it"
            )
            return await self._refuse(
                r,
                403,
                self._forbidden_message(r) + ": protocol upgrades need a dangerous rule",
                decision="forbid",
            )
        # Upgraded sessions (exec, attach, port-forward) are long-lived: limited like watches.
        is_watch = r.info.verb == "watch" or upgrading
        counts = self._watches if is_watch else self._inflight
        limit = self.config.max_watches_per_peer if is_watch else self.config.max_requests_per_peer
        if counts.get(peer, 0) >= limit:
            kind = "watches" if is_watch else "requests"
            self.metrics.limited.labels(peer, kind).inc()
            return await self._refuse(
                r,
                429,
                f"too many concurrent {kind} from peer {peer!r} (limit {limit})",
                decision="allow",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )
        counts[peer] = counts.get(peer, 0) + 1
        gauge = self.metrics.child(
            self.metrics.open_watches if is_watch else self.metrics.inflight, peer
        )
        gauge.inc()
        self._notify()
        try:
            if upgrading:
                return await upgrade_mod.relay(self, request, r)
            return await self._forward(request, r, is_watch)
        finally:
            counts[peer] -= 1
            gauge.dec()
            self._notify()

    def _forbidden_message(self, r: _Req) -> str:
        info = r.info
        user = r.identity.peer.username if r.identity else ANONYMOUS
        if not info.is_resource_request:
            return f'forbidden: User "{user}" cannot {info.verb} path "{info.path}"'
        resource = info.resource + (f"/{info.subresource}" if info.subresource else "")
        subject = f'{info.resource} "{info.name}"' if info.name else info.resource
        where = f'the namespace "{info.namespace}"' if info.namespace else "the cluster scope"
        prep = "in" if info.namespace else "at"
        return (
            f'{subject} is forbidden: User "{user}" cannot {info.verb} resource "{resource}"'
            f' in API group "{info.api_group}" {prep} {where}'
        )

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        if not request.body_exists:
            return None
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _TooLarge
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise _TooLarge
        return bytes(data)

    async def _forward(
        self, request: web.BaseRequest, r: _Req, is_watch: bool
    ) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
        except _TooLarge:
            return await self._refuse(
                r,
                413,
                f"request body larger than {self.config.max_body_bytes} bytes",
                decision="allow",
            )
        headers = upstream_request_headers(request.headers)
        token = self.upstream.token.get() if self.upstream.token else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        headers["Audit-ID"] = r.audit_id
        url = self.upstream.target(r.target)
        deadline_in: float | None = None
        if is_watch:
            deadline_in = self.config.max_watch_seconds
            asked = _timeout_seconds(r.target)
            if asked is not None:
                # The upstream ends the watch at timeoutSeconds; allow it a little slack.
                deadline_in = min(asked + 30.0, deadline_in)
        t0 = time.monotonic()
        up: aiohttp.ClientResponse | None = None
        for attempt in (1, 2):
            try:
                # Response headers must come within the timeout even for watches, whose body
                # has no read timeout: a hung upstream must not hold a watch slot forever.
                async with asyncio.timeout(self.config.upstream_timeout_seconds):
                    up = await self.pool.send(
                        r.method,
                        url,
                        headers,
                        body,
                        read_timeout=None if is_watch else self.config.upstream_timeout_seconds,
                        server_hostname=self.upstream.tls_server_name,
                        watch=is_watch,
                    )
            except aiohttp.ClientConnectorError as exc:
                self.metrics.upstream_errors.labels("connect").inc()
                _log.warning("upstream_unreachable", audit_id=r.audit_id, error=type(exc).__name__)
                return await self._refuse(
                    r, 503, "upstream API server unreachable", decision="allow"
                )
            except TimeoutError:
                self.metrics.upstream_errors.labels("timeout").inc()
                return await self._refuse(r, 504, "upstream API server timed out", decision="allow")
            except aiohttp.ClientError as exc:
                self.metrics.upstream_errors.labels("protocol").inc()
                _log.warning("upstream_failed", audit_id=r.audit_id, error=type(exc).__name__)
                return await self._refuse(r, 502, "upstream API server failed", decision="allow")
            # A rotated token may have been rejected before the watcher saw the new file.
            tok = self.upstream.token
            if (
                up.status == 401
                and attempt == 1
                and r.method in ("GET", "HEAD")
                and tok is not None
                and tok.refresh()
            ):
                release_quietly(up)
                new = tok.get()
                if new:
                    headers["Authorization"] = f"Bearer {new}"
                continue
            break
        assert up is not None
        self.metrics.child(self.metrics.upstream_latency, r.info.verb).observe(
            time.monotonic() - t0
        )
        try:
            return await self._stream(request, r, up, is_watch, deadline_in)
        finally:
            release_quietly(up)

    async def _stream(
        self,
        request: web.BaseRequest,
        r: _Req,
        up: aiohttp.ClientResponse,
        is_watch: bool,
        deadline_in: float | None,
    ) -> web.StreamResponse:
        assert r.identity is not None
        peer = r.identity.peer.name
        headers = downstream_response_headers(up.headers)
        headers["Audit-ID"] = r.audit_id
        streaming = is_watch and up.status == 200
        if streaming:
            headers.popall("Content-Length", None)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if not is_watch and up.content_length is not None:
            # A fixed-length body: send the headers together with its first bytes (or at the end
            # for an empty body), one TLS record and one socket write for a small response instead
            # of two, as aiohttp's own web.Response does. Open-ended (chunked) answers such as
            # `logs?follow=true`, and watches, still get their headers at once.
            resp._send_headers_immediately = False
        code = up.status
        result = CopyResult()
        ended = "upstream"
        try:
            await resp.prepare(request)
            if is_watch:
                self._observe_latency(r)
                await self._audit(r, "ResponseStarted", code)
            counter = (
                EventCounter(
                    up.headers.get("Content-Type", ""), up.headers.get("Content-Encoding", "")
                )
                if streaming
                else None
            )
            try:
                async with self.stream_deadline(r, deadline_in):
                    await copy_stream(up, resp.write, counter, result)
                ended = result.ended_by
            except TimeoutError:
                ended = self.stream_end_reason(r)
            if ended == "client":
                pass
            elif ended == "upstream_error" and not streaming:
                # A truncated fixed-length body must not look complete: drop the connection.
                self.metrics.upstream_errors.labels("reset").inc()
                if request.transport is not None:
                    request.transport.close()
            else:
                if ended == "upstream_error":
                    self.metrics.upstream_errors.labels("reset").inc()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            ended = "client"
            raise
        finally:
            sent = result.bytes_sent
            r.annotations["apiproxy.io/bytes-sent"] = sent
            if is_watch:
                events = result.events
                r.annotations["apiproxy.io/watch-events"] = events
                r.annotations["apiproxy.io/watch-duration-seconds"] = round(
                    time.monotonic() - r.started, 3
                )
                r.annotations["apiproxy.io/stream-ended-by"] = ended
                self.metrics.watch_events.labels(peer).inc(events)
            else:
                self._observe_latency(r)
            self.metrics.child(self.metrics.bytes_sent, peer).inc(sent)
            self._count(r, code, "allow")
            await self._audit(r, "ResponseComplete", code)

    # -- refusals, audit, metrics -------------------------------------------------------------

    def _labels(self, r: _Req) -> tuple[str, str, str]:
        """Metric labels with bounded values: label values must never come from what a caller
        can invent (a path, a method token), or anyone could grow the series without limit.
        Resources outside Kubernetes' built-ins and the policy are `(other)`; the audit log has
        the details."""
        peer = r.identity.peer.name if r.identity else ""
        info = r.info
        if info is None:
            return peer, METHOD_VERBS.get(r.method, "other"), ""
        if not info.is_resource_request:
            return peer, info.verb, "nonresource"
        if not self._known_resource(info.resource) or (
            info.subresource and info.subresource not in KNOWN_SUBRESOURCES
        ):
            return peer, info.verb, "(other)"
        res = info.resource + (f"/{info.subresource}" if info.subresource else "")
        return peer, info.verb, res

    def _known_resource(self, resource: str) -> bool:
        if resource in KNOWN_RESOURCES:
            return True
        return any(resource in rule.resources for rule in self.policy.rules)

    def _count(self, r: _Req, code: int, decision: str) -> None:
        peer, verb, res = self._labels(r)
        self.metrics.child(self.metrics.requests, peer, verb, res, str(code), decision).inc()

    def _observe_latency(self, r: _Req) -> None:
        peer, verb, res = self._labels(r)
        self.metrics.child(self.metrics.latency, peer, verb, res).observe(
            time.monotonic() - r.started
        )

    async def _refuse_authn(self, r: _Req, failure: AuthnFailure) -> web.StreamResponse:
        self.metrics.authn_failures.labels(failure.reason).inc()
        r.annotations["apiproxy.io/authn-failure"] = failure.reason

        with contextlib.suppress(RequestRejected):
            r.info = classify(r.method, r.target)
        _log.warning(
            "authentication_failed",
            audit_id=r.audit_id,
            reason=failure.reason,
            certificate_subject=failure.cert_subject,
            source_ip=r.source_ip,
        )
        return await self._refuse(r, 401, "Unauthorized", decision=None)

    async def _refuse(
        self,
        r: _Req,
        code: int,
        message: str,
        *,
        decision: str | None,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        details: dict[str, Any] | None = None
        info = r.info
        if code == 403 and info is not None and info.is_resource_request:
            details = {"kind": info.resource}
            if info.name:
                details["name"] = info.name
            if info.api_group:
                details["group"] = info.api_group
        if code == 429:
            details = {"retryAfterSeconds": self.config.retry_after_seconds}
        body = status.status_bytes(code, message, details=details)
        resp = web.Response(
            status=code,
            body=body,
            headers={"Content-Type": "application/json", "Audit-ID": r.audit_id, **(headers or {})},
        )
        if code in (401, 403, 429) or code >= 500:
            _log.info(
                "refused",
                audit_id=r.audit_id,
                code=code,
                peer=r.identity.peer.name if r.identity else None,
                verb=getattr(info, "verb", r.method.lower()),
                path=getattr(info, "path", None),
                reason=r.annotations.get("authorization.k8s.io/reason")
                or r.annotations.get("apiproxy.io/authn-failure")
                or message,
            )
        r.annotations["apiproxy.io/bytes-sent"] = len(body)
        self._observe_latency(r)
        self._count(r, code, decision or "none")
        await self._audit(r, "ResponseComplete", code)
        return resp

    async def _audit(self, r: _Req, stage: str, code: int) -> None:
        if self.audit is None:
            return

        ident = r.identity
        event = make_event(
            audit_id=r.audit_id,
            stage=stage,
            request_uri=r.target,
            verb=getattr(r.info, "verb", r.method.lower()),
            username=ident.peer.username if ident else ANONYMOUS,
            groups=[PEER_GROUP] if ident else ["system:unauthenticated"],
            extra=ident.extra() if ident else None,
            source_ips=[r.source_ip] if r.source_ip else [],
            user_agent=r.user_agent,
            object_ref=object_ref_from_info(r.info) if r.info is not None else None,
            code=code,
            received=r.received,
            stage_time=time.time(),
            annotations=dict(r.annotations),
        )
        try:
            await self.audit.write(event)
        except RuntimeError as exc:
            _log.error("audit_write_failed", audit_id=r.audit_id, error=str(exc))


class _TooLarge(Exception):
    pass


def _timeout_seconds(target: str) -> float | None:
    try:
        value = URL(target, encoded=True).query.get("timeoutSeconds")
        return float(value) if value is not None and float(value) > 0 else None
    except ValueError:
        return None


# -- command line -------------------------------------------------------------------------------


def _add(p: argparse.ArgumentParser, flag: str, help_: str, **kw: Any) -> None:
    env = flags.env_name(flag)
    default = kw.pop("default", None)
    value = flags.from_env(flag)
    if value is not None:
        default = value
    shown = f" (env {env}" + (
        f"; default {kw.pop('shown', default)})" if default is not None else ")"
    )
    kw.pop("shown", None)
    p.add_argument(flag, default=default, help=help_ + shown, **kw)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = flags.Parser(prog=prog, description="Run the api-proxy in front of kube-apiserver.")
    _add(p, "--listen", "HOST:PORT to serve HTTPS on", default="0.0.0.0:4443")
    _add(p, "--tls-cert", "serving certificate chain (PEM)")
    _add(p, "--tls-key", "serving private key (PEM)")
    _add(p, "--peers", "peers file (YAML)")
    _add(p, "--cluster-uuid", "this cluster's UUID: the audience of peer tokens")
    _add(p, "--policy", "access policy (YAML)")
    _add(p, "--upstream", "upstream API server URL (else --kubeconfig, else in-cluster)")
    _add(p, "--upstream-ca", "CA bundle for --upstream")
    _add(p, "--upstream-token-file", "bearer token file for --upstream (re-read on change)")
    _add(p, "--kubeconfig", "kubeconfig for the upstream")
    _add(p, "--context", "kubeconfig context (default: current-context)")
    _add(p, "--audit-log", "audit log path, or - for stdout (default: no audit log)")
    _add(p, "--audit-max-bytes", "rotate the audit log at this size", default=str(100 * MiB))
    _add(p, "--audit-backups", "rotated audit logs to keep", default="5")
    _add(p, "--metrics-listen", "HOST:PORT for /healthz, /readyz, /metrics (plain HTTP)")
    _add(p, "--max-watch-seconds", "longest watch stream the proxy keeps open", default="1800")
    _add(p, "--max-requests-per-peer", "concurrent non-watch requests per peer", default="200")
    _add(p, "--max-watches-per-peer", "concurrent watches per peer", default="100")
    _add(p, "--max-body-bytes", "largest request body accepted", default=str(3 * MiB))
    _add(p, "--upstream-timeout-seconds", "read timeout of non-watch requests", default="60")
    _add(
        p,
        "--upstream-max-connections",
        "upstream connections for non-watch requests (watches have their own connections)",
        default="1000",
    )
    _add(p, "--reload-interval-seconds", "how often watched files are checked", default="2")
    _add(p, "--shutdown-grace-seconds", "time for requests to finish on SIGTERM", default="25")
    _add(p, "--readiness-probe-interval-seconds", "upstream probe interval", default="10")
    _add(p, "--log-format", "auto|json|console", default="auto")
    _add(p, "--log-level", "debug|info|warning|error", default="info")
    return p


def _number(value: str, flag: str, kind: type[int] | type[float] = int, minimum: float = 1) -> Any:
    try:
        n = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: {value!r} is not a number") from None
    if n < minimum:
        raise UserError(f"{flag}: must be at least {minimum}")
    return n


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    for flag in ("tls_cert", "tls_key", "peers", "cluster_uuid", "policy"):
        if not getattr(ns, flag):
            name = flag.replace("_", "-")
            raise UserError(f"--{name} is required (or set {flags.env_name(name)})")
    try:
        if str(uuid.UUID(ns.cluster_uuid)) != ns.cluster_uuid.lower():
            raise ValueError
    except ValueError:
        raise UserError(f"--cluster-uuid: {ns.cluster_uuid!r} is not a canonical UUID") from None
    for flag in ("tls_cert", "tls_key", "peers", "policy"):
        path = getattr(ns, flag)
        if not Path(path).is_file():
            raise UserError(f"--{flag.replace('_', '-')}: {path}: no such file")
    if ns.log_format not in ("auto", "json", "console"):
        raise UserError("--log-format: must be auto, json or console")
    if ns.upstream and ns.kubeconfig:
        raise UserError("--upstream and --kubeconfig are mutually exclusive")
    if (ns.upstream_ca or ns.upstream_token_file) and not ns.upstream:
        raise UserError("--upstream-ca and --upstream-token-file need --upstream")
    if ns.context and not ns.kubeconfig:
        raise UserError("--context needs --kubeconfig")
    if ns.upstream:
        up = upstream.from_flags(ns.upstream, ns.upstream_ca, ns.upstream_token_file)
    elif ns.kubeconfig:
        up = upstream.from_kubeconfig(ns.kubeconfig, ns.context)
    else:
        up = upstream.in_cluster()
    host, port = flags.host_port(ns.listen, "--listen")
    return ServeConfig(
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        peers=ns.peers,
        cluster_uuid=ns.cluster_uuid.lower(),  # compared canonically (uuids.key)
        policy=ns.policy,
        upstream=up,
        listen_host=host,
        listen_port=port,
        audit_log=ns.audit_log or None,
        audit_max_bytes=_number(ns.audit_max_bytes, "--audit-max-bytes"),
        audit_backups=_number(ns.audit_backups, "--audit-backups", minimum=0),
        metrics_listen=flags.host_port(ns.metrics_listen, "--metrics-listen")
        if ns.metrics_listen
        else None,
        max_watch_seconds=_number(ns.max_watch_seconds, "--max-watch-seconds", float),
        max_requests_per_peer=_number(ns.max_requests_per_peer, "--max-requests-per-peer"),
        max_watches_per_peer=_number(ns.max_watches_per_peer, "--max-watches-per-peer"),
        max_body_bytes=_number(ns.max_body_bytes, "--max-body-bytes"),
        upstream_timeout_seconds=_number(
            ns.upstream_timeout_seconds, "--upstream-timeout-seconds", float
        ),
        upstream_max_connections=_number(ns.upstream_max_connections, "--upstream-max-connections"),
        reload_interval_seconds=_number(
            ns.reload_interval_seconds, "--reload-interval-seconds", float, minimum=0.05
        ),
        shutdown_grace_seconds=_number(
            ns.shutdown_grace_seconds, "--shutdown-grace-seconds", float, minimum=0
        ),
        readiness_probe_interval_seconds=_number(
            ns.readiness_probe_interval_seconds, "--readiness-probe-interval-seconds", float
        ),
    )


async def serve(config: ServeConfig, ready: asyncio.Event | None = None) -> None:
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


def main(argv: Sequence[str], prog: str = "apiproxy serve") -> int:
    ns = build_parser(prog).parse_args(list(argv))
    log.configure(ns.log_format, ns.log_level)
    config = config_from_args(ns)
    try:
        socket.getaddrinfo(config.listen_host, config.listen_port)
    except OSError:
        raise UserError(f"--listen: cannot resolve {config.listen_host!r}") from None
    _log.info("starting", version=__version__)
    memory.tune_malloc()  # before the first connection allocates its TLS buffers
    try:
        with asyncio.Runner(loop_factory=_runner_loop_factory()) as runner:
            runner.run(serve(config))
    except OSError as exc:
        raise UserError(f"cannot serve: {exc.strerror or exc}") from None
    return 0


__all__ = ["ProxyServer", "ServeConfig", "build_parser", "config_from_args", "main", "serve"]
