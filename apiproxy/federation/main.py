"""`apiproxy federate`: CLI, configuration and the `Federation` factory wiring everything.

```python
fed = Federation(FederationConfig(cluster_domain="cluster.local", api_host="b.example:4443",
                                  exporter_listen="127.0.0.1:0", leader_elect=False), api_client)
await fed.start()            # identity, exporter (fed.exporter_port), watch, election, controller
report = await fed.reconcile()   # run one pass now (leader only) and get its PassReport
await fed.stop()             # bounded by config.shutdown_timeout; returns what it abandoned
```
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from aiohttp import web
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from apiproxy import flags, tasks
from apiproxy import log as applog
from apiproxy.errors import UserError
from apiproxy.federation.controller import (
    Controller,
    ControllerSettings,
    Metrics,
    PassReport,
    read_peer_entries,
)
from apiproxy.federation.exporter import Exporter, PeerRegistry
from apiproxy.federation.gateways import GatewaySource
from apiproxy.federation.identity import LocalIdentity, RootCASource, ensure_identity
from apiproxy.federation.kube import IMC_PATH, Kube, KubeError
from apiproxy.federation.leader import LeaderElector
from apiproxy.federation.metadata import Gateway, valid_address, valid_api_host

log = applog.get_logger("apiproxy.federation")

LEASE_NAME = "apiproxy-federation"
DEFAULT_GATEWAY_SERVICE = "istio-eastwestgateway"


def load_crd() -> dict[str, Any]:
    """The IstioMulticluster CRD shipped as package data."""
    text = resources.files("apiproxy.federation").joinpath("crd.yaml").read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def parse_listen(text: str, flag: str) -> tuple[str, int]:
    return flags.host_port(text, flag, default_host="0.0.0.0")  # noqa: S104 - a listener


def parse_gateway(text: str) -> Gateway:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not valid_address(host):
        raise UserError(f"--ingress-gateway: expected ADDR:PORT, got {text!r}")
    return Gateway(host, int(port))


@dataclass
class FederationConfig:
    cluster_domain: str
    api_host: str
    namespace: str = "apiproxy-system"
    istio_namespace: str = "istio-system"
    network_name: str = ""
    exporter_listen: str = "0.0.0.0:8443"
    exporter_tls_cert: str | None = None
    exporter_tls_key: str | None = None
    ingress_gateway_service: str | None = None  # NS/NAME
    ingress_gateways: list[str] = field(default_factory=list)  # ADDR:PORT
    credential_ttl: float = 24 * 3600.0
    resync_interval: float = 60.0
    metrics_listen: str | None = None
    leader_elect: bool = True
    identity: str = field(default_factory=socket.gethostname)
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    backoff_base: float = 5.0
    backoff_max: float = 300.0
    fetch_timeout: float = 10.0
    # /readyz: the kube-apiserver counts as reachable when it answered within this many seconds
    # (otherwise /readyz asks it once itself, GET /version).
    api_ready_window: float = 30.0
    # stop(): what is not done this many seconds after it began (a Lease release against a hung
    # kube-apiserver, a stuck request handler) is abandoned with a warning.
    shutdown_timeout: float = 5.0

    def validate(self) -> None:
        if not self.cluster_domain or not valid_address(self.cluster_domain):
            raise UserError("--cluster-domain must be a DNS name such as cluster.local")
        if not valid_api_host(self.api_host):
            raise UserError(f"--api-host: expected HOST[:PORT], got {self.api_host!r}")
        if bool(self.exporter_tls_cert) != bool(self.exporter_tls_key):
            raise UserError("--exporter-tls-cert and --exporter-tls-key go together")
        if self.ingress_gateway_service and self.ingress_gateways:
            raise UserError("use --ingress-gateway-service or --ingress-gateway, not both")
        if self.ingress_gateway_service and self.ingress_gateway_service.count("/") != 1:
            raise UserError("--ingress-gateway-service: expected NS/NAME")
        if self.credential_ttl < 2:
            raise UserError("--credential-ttl must be at least 2s")
        if self.api_ready_window <= 0:
            raise UserError("the kube-apiserver readiness window must be positive")
        if self.resync_interval <= 0:
            raise UserError("--resync-interval must be positive")
        if self.shutdown_timeout <= 0:
            raise UserError("--shutdown-timeout must be positive")
        parse_listen(self.exporter_listen, "--exporter-listen")
        if self.metrics_listen:
            parse_listen(self.metrics_listen, "--metrics-listen")
        for g in self.ingress_gateways:
            parse_gateway(g)


class Federation:
    """Exporter + controller + election for one cluster. Two can run in one process."""

    def __init__(self, config: FederationConfig, api_client: ApiClient) -> None:
        config.validate()
        self.config = config
        self.kube = Kube(api_client)
        self.metrics_registry = CollectorRegistry()
        self.metrics = Metrics(self.metrics_registry)
        self.registry = PeerRegistry()
        self.identity: LocalIdentity | None = None
        self.exporter: Exporter | None = None
        self.controller: Controller | None = None
        self.elector: LeaderElector | None = None
        self.exporter_port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_runner: web.AppRunner | None = None
        self._imc_generations: dict[str, tuple[int, bool]] = {}
        self.watch_synced = asyncio.Event()
        self._ping_lock = asyncio.Lock()
        self._was_ready = False
        self._watch_task: asyncio.Task[None] | None = None
        self._elector_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        if cfg.metrics_listen:
            # First, so /healthz answers and /readyz says what is missing while we start.
            await self._start_metrics(*parse_listen(cfg.metrics_listen, "--metrics-listen"))
        self.identity = await ensure_identity(
            self.kube,
            namespace=cfg.namespace,
            cluster_domain=cfg.cluster_domain,
            network=cfg.network_name,
        )
        roots = RootCASource(self.kube, cfg.istio_namespace)
        if cfg.ingress_gateways:
            gateways = GatewaySource(
                self.kube,
                service=None,
                static=tuple(parse_gateway(g) for g in cfg.ingress_gateways),
            )
        else:
            ns, _, name = (
                cfg.ingress_gateway_service or f"{cfg.istio_namespace}/{DEFAULT_GATEWAY_SERVICE}"
            ).partition("/")
            gateways = GatewaySource(
                self.kube,
                service=(ns, name),
                on_error=lambda outcome: self.metrics.gateway_errors.labels(outcome).inc(),
            )
        self.exporter = Exporter(
            identity=self.identity,
            roots=roots,
            gateways=gateways,
            registry=self.registry,
            api_host=cfg.api_host,
        )
        host, port = parse_listen(cfg.exporter_listen, "--exporter-listen")
        self.exporter_port = await self.exporter.start(host, port, self._exporter_ssl())
        if cfg.leader_elect:
            self.elector = LeaderElector(
                self.kube,
                namespace=cfg.namespace,
                name=LEASE_NAME,
                identity=cfg.identity,
                lease_duration=cfg.lease_duration,
                renew_deadline=cfg.renew_deadline,
                retry_period=cfg.retry_period,
                on_change=self._leadership_changed,
            )
        self.controller = Controller(
            kube=self.kube,
            identity=self.identity,
            settings=ControllerSettings(
                namespace=cfg.namespace,
                istio_namespace=cfg.istio_namespace,
                cluster_domain=cfg.cluster_domain,
                credential_ttl=cfg.credential_ttl,
                resync_interval=cfg.resync_interval,
                backoff_base=cfg.backoff_base,
                backoff_max=cfg.backoff_max,
                fetch_timeout=cfg.fetch_timeout,
            ),
            registry=self.registry,
            metrics=self.metrics,
            can_write=self.can_write,
        )
        if not cfg.leader_elect:
            self.metrics.leader.set(1)
        self._watch_task = self._spawn(self._watch_imcs())
        if self.elector is not None:
            self._elector_task = self._spawn(self.elector.run())
        self._spawn(self.controller.run())
        log.info(
            "federation_started",
            cluster_uuid=self.identity.cluster_uuid,
            cluster_id=self.identity.cluster_id,
            network=self.identity.network,
            exporter_port=self.exporter_port,
            metrics_port=self.metrics_port,  # the real ports, also when asked for port 0
        )

    async def stop(self, timeout: float | None = None) -> list[str]:  # noqa: ASYNC109
        """Cancel the loops, give the Lease back, close the listeners: each step within what is
        left of `timeout` (default `config.shutdown_timeout`) after stop() began. A step still
        running at that deadline is abandoned with a `shutdown_step_abandoned` warning; the
        names of the abandoned steps are returned (empty: everything finished)."""
        budget = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        # Closing our own listeners is local and quick: the steps that wait on others (loops
        # unwinding, the kube-apiserver for the Lease) leave it this share of the budget.
        local = min(1.0, budget / 4)
        abandoned: list[str] = []

        async def step(name: str, work: Awaitable[Any], *, reserve: float = 0.0) -> None:
            bound = asyncio.timeout(max(0.0, deadline - reserve - time.monotonic()))
            try:
                async with bound:
                    await work
            except TimeoutError:
                if not bound.expired():
                    raise  # the step's own TimeoutError, not the deadline
                abandoned.append(name)
                log.warning("shutdown_step_abandoned", step=name, shutdown_timeout=budget)

        running, self._tasks = self._tasks, []
        try:
            # A background loop that died with an error is a bug: it surfaces here, after the
            # rest is shut down.
            await step("background loops", tasks.cancel_and_wait(*running), reserve=local)
        finally:
            if self.elector is not None:
                await step("lease release", self.elector.release(), reserve=local)
            if self.controller is not None:
                await step("peer connections", self.controller.close())
            if self.exporter is not None:
                await step("exporter", self.exporter.stop())
            if self._metrics_runner is not None:
                runner, self._metrics_runner = self._metrics_runner, None
                await step("metrics listener", runner.cleanup())
        return abandoned

    async def __aenter__(self) -> Federation:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ API for tests/demo

    @property
    def exporter_url(self) -> str:
        """Base URL for a peer's `spec.metadataEndpoint` (loopback, for tests and the demo)."""
        scheme = "https" if self.config.exporter_tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.exporter_port}/metadata"

    def can_write(self) -> bool:
        return self.elector is None or self.elector.can_write

    @property
    def is_leader(self) -> bool:
        return self.can_write()

    async def wait_leader(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        async def _wait() -> None:
            while not self.can_write():
                assert self.elector is not None
                self.elector.changed.clear()
                if self.can_write():
                    return
                await self.elector.changed.wait()

        async with asyncio.timeout(timeout):  # not wait_for: see Controller._sleep
            await _wait()

    async def reconcile(self, *, force: bool = True) -> PassReport:
        """Run one pass now (fetching every peer when `force`), return what it did."""
        assert self.controller is not None, "start() first"
        if not self.can_write():
            raise RuntimeError("this replica is not the leader")
        return await self.controller.reconcile(force=force)

    def trigger(self) -> None:
        assert self.controller is not None
        self.controller.trigger(force=True)

    # ------------------------------------------------------------------ internals

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    async def readiness(self) -> tuple[bool, list[str]]:
        """The /readyz checks: identity loaded, exporter serving, kube-apiserver answering,
        and leading or a healthy standby (standbys serve the exporter, so they are ready)."""
        checks: list[tuple[str, bool, str]] = []
        checks.append(
            ("identity", self.identity is not None, "loaded" if self.identity else "not loaded")
        )
        serving = self.exporter is not None and self.exporter.serving
        checks.append(("exporter", serving, f"port {self.exporter_port}" if serving else "down"))
        checks.append(("kube-api", *(await self._kube_reachable())))
        checks.append(("leader-election", *self._election_state()))
        lines = [
            f"[{'+' if ok else '-'}]{name} {'ok' if ok else 'failed'}: {why}"
            for name, ok, why in checks
        ]
        return all(ok for _n, ok, _w in checks), lines

    def _fresh(self) -> float | None:
        last = self.kube.last_answer
        if last is None:
            return None
        age = time.monotonic() - last
        return age if age < self.config.api_ready_window else None

    async def _kube_reachable(self) -> tuple[bool, str]:
        age = self._fresh()
        if age is None:
            async with self._ping_lock:  # one probe at a time, however many /readyz callers
                age = self._fresh()
                if age is None:
                    try:
                        await self.kube.ping(timeout=min(3.0, self.config.api_ready_window))
                    except KubeError as exc:
                        return False, applog.redact_text(str(exc))[:200]
                    age = 0.0
        if self._watch_task is not None and self._watch_task.done():
            return False, "the IstioMulticluster watch stopped"
        return True, f"answered {age:.0f}s ago"

    def _election_state(self) -> tuple[bool, str]:
        if self.elector is None:
            return True, "disabled (this replica writes)"
        if self._elector_task is None or self._elector_task.done():
            return False, "the election loop is not running"
        if self.elector.can_write:
            return True, "leader"
        if self.elector.healthy:
            holder = self.elector.observed_holder or "nobody"
            return True, f"standby (Lease held by {holder})"
        return False, "the Lease could not be read recently"

    def _leadership_changed(self, leading: bool) -> None:
        self.metrics.leader.set(1 if leading else 0)
        if leading and self.controller is not None:
            self.controller.trigger(force=True)

    def _exporter_ssl(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.exporter_tls_cert or not cfg.exporter_tls_key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(cfg.exporter_tls_cert, cfg.exporter_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(
                f"--exporter-tls-cert/--exporter-tls-key: {exc.strerror or exc}"
            ) from None
        return ctx

    async def _start_metrics(self, host: str, port: int) -> None:
        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.metrics_registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def healthz(_request: web.Request) -> web.Response:
            return web.Response(text="Ok.")

        async def readyz(_request: web.Request) -> web.Response:
            ready, lines = await self.readiness()
            if ready != self._was_ready:
                self._was_ready = ready
                failed = [line for line in lines if line.startswith("[-]")]
                log.info("readiness_changed", ready=ready, failed=failed)
            lines.append("readyz check passed" if ready else "readyz check failed")
            return web.Response(status=200 if ready else 503, text="\n".join(lines) + "\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        # A probe in flight at shutdown gets a second, not aiohttp's default minute.
        self._metrics_runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else port

    def _note(self, obj: dict[str, Any]) -> bool:
        """Remember an object's generation/deletion; True when that changed (a spec change)."""
        meta = obj.get("metadata") or {}
        key = (int(meta.get("generation") or 0), bool(meta.get("deletionTimestamp")))
        name = str(meta.get("name"))
        changed = self._imc_generations.get(name) != key
        self._imc_generations[name] = key
        return changed

    async def _learn_accepted_peers(self) -> None:
        """A standby's exporter answers the peers the leader accepted: those in the peers
        Secret. Status caches are not enough: they also hold peers the leader refused."""
        if self.can_write():
            return  # the leader's controller keeps the registry itself
        try:
            entries = await read_peer_entries(self.kube, self.config.namespace)
        except KubeError as exc:
            log.warning("peers_secret_unreadable", error=str(exc))
            return
        self.registry.replace_all(
            {n: (e.cluster_uuid, e.jwt_public_key) for n, e in entries.items()}
        )

    async def _watch_imcs(self) -> None:
        """List+watch IstioMulticlusters on every replica: known peers for the exporter, and
        a pass trigger on spec changes, creation and deletion (not on our own status writes)."""
        delay = 0.5
        while True:
            try:
                listing = await self.kube.list(IMC_PATH)
                rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                present = set()
                for obj in listing.get("items") or []:
                    present.add(obj["metadata"]["name"])
                    if self._note(obj) and self.controller is not None:
                        self.controller.trigger(name=obj["metadata"]["name"])
                for gone in set(self._imc_generations) - present:
                    self._imc_generations.pop(gone, None)
                    self.registry.remove(gone)
                await self._learn_accepted_peers()
                self.watch_synced.set()
                delay = 0.5
                while True:
                    async for event in self.kube.watch(IMC_PATH, rv, timeout_seconds=300):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                raise KubeError(410, "watch expired")
                            continue
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        if kind == "BOOKMARK":
                            continue
                        name = str((obj.get("metadata") or {}).get("name"))
                        if kind == "DELETED":
                            self._imc_generations.pop(name, None)
                            self.registry.remove(name)
                            changed = True
                        else:
                            changed = self._note(obj)
                        if changed and self.controller is not None:
                            self.controller.trigger(name=name)
                        # The leader writes status after each pass: a standby re-reads the
                        # peers it accepted.
                        await self._learn_accepted_peers()
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status != 410:
                    log.warning("imc_watch_failed", error=str(exc))
            except Exception as exc:
                log.warning("imc_watch_failed", error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


# ---------------------------------------------------------------------- CLI


def _parser(prog: str) -> flags.Parser:
    p = flags.Parser(
        prog=prog,
        description="Run the IstioMulticluster federation controller and metadata exporter.",
        env=True,
    )
    p.option("--cluster-domain", "the cluster domain, e.g. cluster.local", required=True)
    p.option("--namespace", "namespace of apiproxy's Secrets and Lease", default="apiproxy-system")
    p.option("--istio-namespace", "istiod's namespace", default="istio-system")
    p.option("--api-host", "HOST[:PORT] where peers reach our api-proxy", required=True)
    p.option("--network-name", "our network (default network-<clusterID>)", default="")
    p.option("--exporter-listen", "metadata exporter HOST:PORT", default="0.0.0.0:8443")
    p.option("--exporter-tls-cert", "serve the exporter over HTTPS with this cert")
    p.option("--exporter-tls-key", "... and this key")
    p.option("--ingress-gateway-service", "east-west gateway Service NS/NAME")
    p.option("--ingress-gateway", "advertise ADDR:PORT (comma-separated in env)", repeatable=True)
    p.option(
        "--kubeconfig",
        "kubeconfig file (default: in-cluster, then ~/.kube)",
        type=flags.path(),
    )
    p.option("--context", "kubeconfig context")
    p.option(
        "--credential-ttl",
        "lifetime of peer credentials (rotated at 2/3)",
        default="24h",
        type=flags.duration(minimum=2),
    )
    p.option(
        "--resync-interval",
        "how often peers are re-fetched",
        default="60s",
        type=flags.duration(minimum=0.001),
    )
    p.option("--metrics-listen", "Prometheus metrics HOST:PORT")
    p.option(
        "--shutdown-timeout",
        "after SIGTERM, abandon what is not done by then (keep it under the pod's grace period)",
        default="5s",
        type=flags.duration(minimum=0.001),
    )
    p.switch(
        "--leader-elect",
        "elect a leader through the apiproxy-federation Lease",
        default=True,
    )
    p.option(
        "--identity",
        "this replica's name in the Lease",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
    )
    p.log_options()
    return p


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    return FederationConfig(
        cluster_domain=args.cluster_domain,
        api_host=args.api_host,
        namespace=args.namespace,
        istio_namespace=args.istio_namespace,
        network_name=args.network_name or "",
        exporter_listen=args.exporter_listen,
        exporter_tls_cert=args.exporter_tls_cert,
        exporter_tls_key=args.exporter_tls_key,
        ingress_gateway_service=args.ingress_gateway_service,
        ingress_gateways=list(args.ingress_gateway),
        credential_ttl=args.credential_ttl,
        resync_interval=args.resync_interval,
        metrics_listen=args.metrics_listen,
        shutdown_timeout=args.shutdown_timeout,
        leader_elect=bool(args.leader_elect),
        identity=args.identity,
    )


async def _api_client(kubeconfig: str | None, context: str | None) -> ApiClient:
    if kubeconfig:
        return await kconfig.new_client_from_config(config_file=kubeconfig, context=context)
    try:
        kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
        return ApiClient()
    except kconfig.ConfigException:
        try:
            return await kconfig.new_client_from_config(context=context)
        except (kconfig.ConfigException, OSError) as exc:
            raise UserError(f"no Kubernetes credentials: {exc}") from None


async def _start_unless_stopped(fed: Federation, stop: asyncio.Event) -> bool:
    """fed.start(), unless SIGTERM comes first: then start-up is cancelled (it may be waiting
    on a hung kube-apiserver for a request's full 30 s) and False is returned."""
    starting = asyncio.create_task(fed.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not starting.done():
            log.info("stopping", during="start-up")
            # Within the shutdown budget; a start-up that will not unwind is left behind.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fed.config.shutdown_timeout):
                    await tasks.cancel_and_wait(starting)
    if not starting.done() or starting.cancelled():  # not done: left behind at the deadline
        return False
    try:
        starting.result()
    except KubeError as exc:
        raise UserError(f"cannot start: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot listen: {exc.strerror or exc}") from None
    return True


async def _run(cfg: FederationConfig, kubeconfig: str | None, context: str | None) -> int:
    stop = asyncio.Event()
    asked: list[float] = []  # monotonic time of the first SIGTERM/SIGINT

    def request_stop() -> None:
        if not asked:
            asked.append(time.monotonic())
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, request_stop)
    api_client = await _api_client(kubeconfig, context)
    fed = Federation(cfg, api_client)
    abandoned: list[str] = []
    try:
        if await _start_unless_stopped(fed, stop):
            await stop.wait()
            log.info("stopping")
    finally:
        since = asked[0] if asked else time.monotonic()
        # One budget from the signal on, start-up's cancellation included; the local
        # listeners always get their second.
        left = max(1.0, cfg.shutdown_timeout - (time.monotonic() - since))
        try:
            abandoned = await fed.stop(timeout=left)
        finally:
            await api_client.close()
    log.info(
        "federation_stopped",
        seconds=round(time.monotonic() - since, 3),
        abandoned=abandoned,
    )
    return 0


def _run_bounded(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run(main) without its final wait for leftover tasks: a step Federation.stop()
    abandoned at its deadline must not hold the process after all (asyncio.run would cancel
    it and wait without limit)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            leftover = asyncio.all_tasks(loop)
            for task in leftover:
                task.cancel()
            if leftover:  # one more short chance to unwind, then they are left behind
                loop.run_until_complete(asyncio.wait(leftover, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def main(argv: Sequence[str], prog: str = "apiproxy federate") -> int:
    args = _parser(prog).parse_args(list(argv))
    cfg = config_from_args(args)
    cfg.validate()
    applog.configure(args.log_format, args.log_level)
    kubeconfig = str(args.kubeconfig) if args.kubeconfig else None
    return _run_bounded(_run(cfg, kubeconfig, args.context))
