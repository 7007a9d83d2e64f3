"""The federation controller: one reconcile pass keeps every artifact in step with the
IstioMulticluster objects and their peers' metadata.

A pass (leader only):
1. lists IstioMulticluster objects, adds the finalizer to new ones;
2. for each peer due for a fetch (backoff with jitter after failures): public.json, then
   multicluster.json with a one-minute JWT; validated documents replace the status cache, failures
   only flip conditions (the last good cache stays in use);
3. from the caches writes, only when the bytes change: the remote secrets, the api-proxy's peers
   Secret, `caCertificates` and `meshNetworks` in the `istio` ConfigMap;
4. removes what belonged to deleted objects, then their finalizer;
5. probes each peer's api-proxy (`GET /api` → `kind: APIVersions`) with the credentials written;
6. writes status (conditions with stable lastTransitionTime, foreign conditions kept) and emits
   Events on transitions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import json
import os
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apiproxy import tokens, uuids
from apiproxy.federation import artifacts, mesh, planning
from apiproxy.federation.exporter import PeerRegistry
from apiproxy.federation.identity import LocalIdentity
from apiproxy.federation.kube import (
    IMC_PATH,
    Kube,
    KubeError,
    Obj,
    configmap_path,
    secret_path,
)
from apiproxy.federation.metadata import (
    PRIVATE_SCOPE,
    MetadataError,
    PrivateMetadata,
    PublicMetadata,
    fetch_json,
    parse_private,
    parse_public,
    read_capped,
    ssl_context,
)
from apiproxy.federation.planning import (
    CONFLICT_REASONS,
    UUID_CONFLICT,
    Existing,
    Plan,
)
from apiproxy.log import get_logger, redact_text

log = get_logger("apiproxy.federation.controller")

FINALIZER = "apiproxy.io/federation"
PUBLIC = "PublicMetadataExchangeReady"
PRIVATE = "PrivateMetadataExchangeReady"
REMOTE_API = "RemoteAPIServerReady"
CONDITION_TYPES = (PUBLIC, PRIVATE, REMOTE_API)
# Refusals of a peer whose identity collides with ours or another peer's: istiod ignores a remote
# secret whose cluster ID is the local one or already registered, one meshNetworks name holds one
# network, and the api-proxy refuses a peers file with a duplicate clusterUUID.
RECONCILE_FAILED = "ReconcileFailed"
PEERS_SECRET = "apiproxy-peers"  # noqa: S105 - a name
PEERS_KEY = "peers.yaml"
MESH_CONFIGMAP = "istio"
EVENT_SOURCE = "apiproxy-federation"


class NotLeader(Exception):
    """Raised before a write when this replica may no longer write."""


def rfc3339(now: float | None = None) -> str:
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ControllerSettings:
    namespace: str
    istio_namespace: str
    cluster_domain: str
    credential_ttl: float = 24 * 3600.0
    rotate_fraction: float = 2 / 3
    resync_interval: float = 60.0
    backoff_base: float = 5.0
    backoff_max: float = 300.0
    fetch_timeout: float = 10.0
    probe_timeout: float = 10.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.fetch_errors = Counter(
            "apiproxy_federation_metadata_fetch_errors_total",
            "Failed metadata fetches by peer, document and reason.",
            ["peer", "document", "reason"],
            registry=registry,
        )
        self.api_check_errors = Counter(
            "apiproxy_federation_remote_api_check_errors_total",
            "Failed probes of a peer's api-proxy.",
            ["peer"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "apiproxy_federation_reconcile_duration_seconds",
            "Duration of a reconcile pass.",
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.condition = Gauge(
            "apiproxy_federation_condition",
            "Condition status by peer and type (1 True, 0 False or Unknown).",
            ["peer", "type"],
            registry=registry,
        )
        self.credential_expiry = Gauge(
            "apiproxy_federation_credentials_expiry_timestamp_seconds",
            "Expiry of the credentials in a peer's remote secret.",
            ["peer"],
            registry=registry,
        )
        # With the expiry, lets an alert tell "rotation overdue" from "expires in 8h as planned".
        self.credential_rotation_due = Gauge(
            "apiproxy_federation_credentials_rotation_due_timestamp_seconds",
            "When the controller means to rotate the credentials in a peer's remote secret.",
            ["peer"],
            registry=registry,
        )
        self.writes = Counter(
            "apiproxy_federation_artifact_writes_total",
            "Writes of artifacts (only on change).",
            ["kind"],
            registry=registry,
        )
        self.refusals = Counter(
            "apiproxy_federation_peer_refusals_total",
            "Passes that refused a peer's new artifacts (identity conflicts), by peer and reason.",
            ["peer", "reason"],
            registry=registry,
        )
        self.gateway_errors = Counter(
            "apiproxy_federation_gateway_discovery_errors_total",
            "Failed east-west gateway lookups; outcome: served_last_good or unavailable (503).",
            ["outcome"],
            registry=registry,
        )
        self.leader = Gauge(
            "apiproxy_federation_leader", "1 while this replica holds the Lease.", registry=registry
        )

    def forget_peer(self, peer: str) -> None:
        """Drop a removed peer's state series, so no alert fires on a peer that is gone."""
        series: list[tuple[Gauge, tuple[str, ...]]] = [
            (self.credential_expiry, (peer,)),
            (self.credential_rotation_due, (peer,)),
        ]
        series += [(self.condition, (peer, ctype)) for ctype in CONDITION_TYPES]
        for gauge, labels in series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)


@dataclass
class PeerState:
    failures: int = 0
    next_fetch: float = 0.0  # monotonic
    next_rotation: float = float("inf")  # wall clock
    # A failed check of the peer's api-proxy is retried on its own backoff: the peer may load our
    # credentials seconds after the exchange, and waiting a full resync would leave it False.
    probe_failures: int = 0
    next_probe: float = float("inf")  # monotonic


@dataclass
class PassReport:
    """What one pass did; returned by `Controller.reconcile`."""

    conditions: dict[str, dict[str, Obj]] = field(default_factory=dict)
    writes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Work:
    obj: Obj
    status: Obj
    conditions: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    kubeconfig: Obj | None = None

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def deleting(self) -> bool:
        return bool(self.obj["metadata"].get("deletionTimestamp"))

    @property
    def spec(self) -> Obj:
        return dict(self.obj.get("spec") or {})

    def public(self) -> PublicMetadata | None:
        doc = (self.status.get("metadataCache") or {}).get("public")
        try:
            return parse_public(doc) if doc else None
        except Exception:  # unusable, however it fails: held, never a reason to remove
            return None

    def private(self) -> PrivateMetadata | None:
        doc = (self.status.get("metadataCache") or {}).get("private")
        try:
            return parse_private(doc, require_gateways=False) if doc else None
        except Exception:  # unusable, however it fails: held, never a reason to remove
            return None

    def cache_invalid(self) -> bool:
        """A cached document that no longer validates (edited status): refetch at once."""
        cache = self.status.get("metadataCache") or {}
        return bool(
            (cache.get("public") and self.public() is None)
            or (cache.get("private") and self.private() is None)
        )

    def old_condition(self, ctype: str) -> Obj | None:
        for cond in (self.obj.get("status") or {}).get("conditions") or []:
            if isinstance(cond, dict) and cond.get("type") == ctype:
                return cond
        return None

    def set(self, ctype: str, ok: bool, reason: str, message: str) -> None:
        self.conditions[ctype] = ("True" if ok else "False", reason, redact_text(message)[:1000])


def merge_conditions(
    existing: list[Obj], updates: dict[str, tuple[str, str, str]], generation: int, now: str
) -> list[Obj]:
    """metav1.Condition semantics: lastTransitionTime changes only with status; conditions of
    other types (written by others) are kept as they are."""
    out: list[Obj] = []
    seen: set[str] = set()
    for cond in existing:
        ctype = cond.get("type")
        if ctype in updates:
            status, reason, message = updates[str(ctype)]
            new = {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": cond.get("lastTransitionTime") or now,
            }
            if cond.get("status") != status:
                new["lastTransitionTime"] = now
            out.append(new)
            seen.add(str(ctype))
        else:
            out.append(cond)
    for ctype in CONDITION_TYPES:
        if ctype in updates and ctype not in seen:
            status, reason, message = updates[ctype]
            out.append(
                {
                    "type": ctype,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "observedGeneration": generation,
                    "lastTransitionTime": now,
                }
            )
    return out


async def read_peer_entries(kube: Kube, namespace: str) -> dict[str, artifacts.PeerEntry]:
    """The peers the api-proxy trusts, from the peers Secret the leader writes (first entry per
    name wins; unreadable content reads as no peers)."""
    peers = await kube.get(secret_path(namespace, PEERS_SECRET))
    text = _b64d(((peers or {}).get("data") or {}).get(PEERS_KEY))
    try:
        doc = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        doc = None
    entries: dict[str, artifacts.PeerEntry] = {}
    for item in (doc.get("peers") if isinstance(doc, dict) else None) or []:
        entry = artifacts.PeerEntry.from_dict(item)
        if entry is not None:
            entries.setdefault(entry.name, entry)
    return entries


def _b64d(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value).decode()
    except ValueError:
        return None


def _b64e(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Controller:
    def __init__(
        self,
        *,
        kube: Kube,
        identity: LocalIdentity,
        settings: ControllerSettings,
        registry: PeerRegistry,
        metrics: Metrics,
        can_write: Callable[[], bool],
    ) -> None:
        self.kube = kube
        self.identity = identity
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.can_write = can_write
        self.peers: dict[str, PeerState] = {}
        self._wake = asyncio.Event()
        self._force = False
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.passes = 0
        self.last_report: PassReport | None = None
        self._pass_done = asyncio.Condition()

    # ------------------------------------------------------------------ loop

    def trigger(self, *, force: bool = False, name: str | None = None) -> None:
        if name is not None:
            self.peers.setdefault(name, PeerState()).next_fetch = 0.0
        self._force = self._force or force
        self._wake.set()

    async def run(self) -> None:
        while True:
            # Cleared on every turn, leader or not: a standby that left a trigger set used to
            # spin here without ever sleeping (100% CPU, starving the exporter and election).
            # Triggers seen while standing by are not lost: gaining the Lease forces a pass.
            self._wake.clear()
            if self.can_write():
                force, self._force = self._force, False
                try:
                    await self.reconcile(force=force)
                except NotLeader:
                    log.info("leadership_lost_mid_pass")
                except Exception as exc:  # a pass must never kill the loop
                    log.error("reconcile_failed", error=redact_text(str(exc)))
            await self._sleep(self._sleep_for())

    async def _sleep(self, seconds: float) -> None:
        """Until a trigger or `seconds`. Not asyncio.wait_for: on Python 3.11 it returns the
        inner result when a trigger and a cancellation land in the same loop turn, dropping the
        cancellation; this loop then ran on and Federation.stop() waited for it forever."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _sleep_for(self) -> float:
        if not self.can_write():
            return 0.5
        now_m, now_w = time.monotonic(), time.time()
        delay = self.settings.resync_interval
        for st in self.peers.values():
            delay = min(
                delay, st.next_fetch - now_m, st.next_probe - now_m, st.next_rotation - now_w
            )
        return max(0.05, delay)

    async def wait_for_pass(self, after: int, timeout: float = 30.0) -> PassReport:  # noqa: ASYNC109
        async def _wait() -> PassReport:
            async with self._pass_done:
                await self._pass_done.wait_for(lambda: self.passes > after)
            assert self.last_report is not None
            return self.last_report

        async with asyncio.timeout(timeout):  # not wait_for: see _sleep
            return await _wait()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    def _check_writer(self) -> None:
        if not self.can_write():
            raise NotLeader()

    # ------------------------------------------------------------------ pass

    async def reconcile(self, *, force: bool = False) -> PassReport:
        async with self._lock:
            started = time.monotonic()
            report = PassReport()
            try:
                await self._reconcile(report, force)
            finally:
                self.metrics.reconcile_duration.observe(time.monotonic() - started)
                self.passes += 1
                self.last_report = report
                async with self._pass_done:
                    self._pass_done.notify_all()
            return report

    async def _reconcile(self, report: PassReport, force: bool) -> None:
        listing = await self.kube.list(IMC_PATH)
        works = [
            Work(obj, copy.deepcopy(obj.get("status") or {}))
            for obj in sorted(listing.get("items") or [], key=lambda o: o["metadata"]["name"])
        ]
        names = {w.name for w in works}
        for gone in set(self.peers) - names:
            self.peers.pop(gone, None)
            self.registry.remove(gone)
            self.metrics.forget_peer(gone)

        # 1-2: finalizers and metadata exchange, peers concurrently.
        active = [w for w in works if not w.deleting]
        await asyncio.gather(*(self._exchange(w, force, report) for w in active))

        # What the artifacts hold now decides who keeps a contested identity. Without it no
        # artifact is written this pass (fail closed); probes and status still run.
        try:
            existing: Existing | None = await self._existing()
        except KubeError as exc:
            existing = None
            report.errors.append(f"reading the current artifacts: {exc}")
            log.warning("artifacts_unreadable", error=str(exc))

        if existing is not None:
            plans = self._plan(active, existing, report)
            # Known peers for the exporter: the public document each peer's artifacts use.
            known: dict[str, tuple[str, str]] = {}
            for w in active:
                pub, entry = plans[w.name].pub, existing.peer_entries.get(w.name)
                if pub is not None:
                    known[w.name] = (pub.cluster_uuid, pub.authn_key_pub)
                elif entry is not None:
                    known[w.name] = (entry.cluster_uuid, entry.jwt_public_key)
            self.registry.replace_all(known)

            # 3-4: artifacts.
            # One failing write (a 409 race, a webhook) or one peer's unexpected error must not
            # stop the others; it is retried on the next pass. A deleted peer keeps its
            # finalizer until every cleanup succeeded.
            clean = True
            for w in active:
                clean &= await self._guard(
                    report,
                    f"remote secret of {w.name}",
                    self._remote_secret(w, plans[w.name], report),
                    peer=w,
                )
            clean &= await self._guard(
                report,
                "remote secret sweep",
                self._sweep_remote_secrets({w.name for w in active}, report),
            )
            clean &= await self._guard(
                report, "peers file", self._peers_secret(active, plans, report)
            )
            clean &= await self._guard(
                report, "mesh config", self._mesh_config(active, plans, report)
            )
            for w in works:
                if w.deleting and clean:
                    await self._guard(
                        report, f"finalizer of {w.name}", self._drop_finalizer(w, report)
                    )

        # 5: probes, 6: status.
        await asyncio.gather(*(self._probe(w) for w in active))
        for w in active:
            await self._guard(report, f"status of {w.name}", self._write_status(w, report))

    async def _guard(
        self, report: PassReport, what: str, coro: Any, *, peer: Work | None = None
    ) -> bool:
        try:
            await coro
        except NotLeader:
            raise
        except KubeError as exc:
            report.errors.append(f"{what}: {exc}")
            log.warning("write_failed", what=what, error=str(exc))
            return False
        except Exception as exc:
            # A surprise (a bug, a document nobody anticipated) costs this step this pass, never
            # the other peers'. Only the error's type is reported: its text may hold data.
            report.errors.append(f"{what}: unexpected {type(exc).__name__}")
            log.error("unexpected_error", what=what, error=type(exc).__name__)
            if peer is not None:
                self._failed(peer, what, exc)
            return False
        return True

    def _failed(self, w: Work, what: str, exc: BaseException) -> None:
        w.set(
            PRIVATE,
            False,
            RECONCILE_FAILED,
            f"{what}: unexpected {type(exc).__name__}; the existing artifacts are kept, "
            "retried next pass",
        )

    async def _existing(self) -> Existing:
        ex = Existing()
        ns = self.settings.istio_namespace
        listing = await self.kube.list(
            secret_path(ns), label_selector=f"{artifacts.MULTICLUSTER_LABEL}=true"
        )
        for item in listing.get("items") or []:
            meta = item.get("metadata") or {}
            labels = meta.get("labels") or {}
            ids = {str(k) for k in (item.get("data") or {})}
            owner = labels.get(artifacts.OWNER_LABEL)
            if labels.get(artifacts.MANAGED_BY_LABEL) == artifacts.MANAGED_BY and owner:
                ex.secret_ids.setdefault(str(owner), set()).update(ids)
            else:
                for cid in ids:
                    ex.foreign_ids.setdefault(cid, str(meta.get("name")))
        ex.peer_entries = await read_peer_entries(self.kube, self.settings.namespace)
        _ca, ex.net_owners = mesh.owners(await self.kube.get(configmap_path(ns, MESH_CONFIGMAP)))
        return ex

    # ------------------------------------------------------------------ plan

    def _plan(self, active: list[Work], ex: Existing, report: PassReport) -> dict[str, Plan]:
        """Each peer's documents for this pass (`planning.plan`); refusals set conditions."""
        assert self.identity is not None
        peers = [
            planning.Peer(
                name=w.name,
                created=str(w.obj["metadata"].get("creationTimestamp") or ""),
                pub=w.public(),
                priv=w.private(),
                gateways=bool(w.spec.get("enableIngressGateway", True)),
            )
            for w in active
        ]
        plans, refusals = planning.plan(peers, ex, self.identity)
        by_name = {w.name: w for w in active}
        for r in refusals:
            w = by_name[r.peer]
            if r.kind == UUID_CONFLICT:
                w.set(PUBLIC, False, r.kind, r.message)
            w.set(PRIVATE, False, r.kind, r.message)
            self.metrics.refusals.labels(r.peer, r.kind).inc()
            report.errors.append(f"{r.peer}: {r.kind}: {r.what} {r.value} is {r.other}")
            log.warning("peer_refused", peer=r.peer, reason=r.kind, value=r.value, other=r.other)

        # A refusal or failed build left a condition behind: it recovers as soon as the peer's
        # cached documents are usable again, without waiting for the next fetch.
        for w in active:
            p = plans[w.name]
            for ctype, usable in ((PUBLIC, p.pub), (PRIVATE, p.priv)):
                old = w.old_condition(ctype) or {}
                if (
                    usable is not None
                    and ctype not in w.conditions
                    and old.get("reason") in CONFLICT_REASONS | {RECONCILE_FAILED}
                ):
                    w.set(ctype, True, "Fetched", "cached metadata valid; the conflict is resolved")
        return plans

    # ------------------------------------------------------------------ exchange

    async def _exchange(self, w: Work, force: bool, report: PassReport) -> None:
        if FINALIZER not in (w.obj["metadata"].get("finalizers") or []):
            self._check_writer()
            finalizers = [*(w.obj["metadata"].get("finalizers") or []), FINALIZER]
            try:
                updated = await self.kube.merge_patch(
                    f"{IMC_PATH}/{w.name}",
                    {
                        "metadata": {
                            "finalizers": finalizers,
                            "resourceVersion": w.obj["metadata"]["resourceVersion"],
                        }
                    },
                )
            except KubeError as exc:
                report.errors.append(f"finalizer of {w.name}: {exc}")
                return
            w.obj["metadata"] = updated.get("metadata", w.obj["metadata"])
        state = self.peers.setdefault(w.name, PeerState())
        invalid = w.cache_invalid()
        if invalid:
            # Someone edited the cache: it is ignored (nothing new is derived from it, nothing
            # is removed because of it) and the next good fetch repairs it; that is now.
            log.warning("cached_metadata_invalid", peer=w.name)
        if not force and not invalid and time.monotonic() < state.next_fetch:
            return
        try:
            ok = await self._fetch(w, report)
        except Exception as exc:
            # One peer's surprise must not abort the pass for every other peer (their rotation
            # and status would stop): report it on this peer and keep its last good cache.
            log.error("metadata_exchange_failed", peer=w.name, error=type(exc).__name__)
            w.set(PUBLIC, False, "FetchFailed", f"unexpected error: {type(exc).__name__}")
            ok = False
        if ok:
            state.failures = 0
            state.next_fetch = time.monotonic() + self.settings.resync_interval
        else:
            state.failures += 1
            state.next_fetch = time.monotonic() + self._backoff(state.failures)

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter, so peers that failed together do not retry together."""
        base = min(
            self.settings.backoff_max, self.settings.backoff_base * 2 ** min(failures - 1, 16)
        )
        return float(base) * random.uniform(0.5, 1.0)  # noqa: S311

    async def _fetch(self, w: Work, report: PassReport) -> bool:
        spec = w.spec
        endpoint = str(spec.get("metadataEndpoint") or "").rstrip("/")
        meta = spec.get("metadata") or {}
        cache = w.status.setdefault("metadataCache", {})
        pinned = w.status.get("pinnedClusterUUID") or (cache.get("public") or {}).get("clusterUUID")
        if isinstance(pinned, str):
            pinned = uuids.key(pinned)  # pinned by an older version, perhaps in another case
        if not endpoint.startswith("https://"):
            w.set(PUBLIC, False, "FetchFailed", "only https:// metadata endpoints are supported")
            w.set(PRIVATE, False, "AwaitingPublic", "public metadata is not available")
            return False
        try:
            ctx = ssl_context(meta.get("ca"), bool(meta.get("insecureSkipVerify")))
        except MetadataError as exc:
            w.set(PUBLIC, False, exc.reason, exc.message)
            return False
        session = self._http()
        timeout = self.settings.fetch_timeout
        ok = True
        mismatch = False
        try:
            pub = parse_public(
                await fetch_json(
                    session, f"{endpoint}/public/public.json", ctx=ctx, timeout=timeout
                )
            )
        except MetadataError as exc:
            ok = False
            self.metrics.fetch_errors.labels(w.name, "public", exc.reason).inc()
            w.set(PUBLIC, False, exc.reason, exc.message)
            log.warning("metadata_fetch_failed", peer=w.name, document="public", reason=exc.reason)
        else:
            if pinned and pub.cluster_uuid != pinned:
                ok, mismatch = False, True
                msg = (
                    f"the peer now reports cluster UUID {pub.cluster_uuid}, pinned {pinned}; "
                    "refused (recreate the IstioMulticluster to trust the new cluster)"
                )
                self.metrics.fetch_errors.labels(w.name, "public", "ClusterUUIDMismatch").inc()
                w.set(PUBLIC, False, "ClusterUUIDMismatch", msg)
                log.warning("peer_uuid_changed", peer=w.name)
            elif pub.cluster_uuid == self.identity.cluster_uuid:
                ok = False
                w.set(PUBLIC, False, "InvalidPublicMetadata", "the peer is this cluster itself")
            else:
                cache["public"] = pub.to_dict()
                cache["publicLastFetchTimestamp"] = rfc3339()
                w.status["pinnedClusterUUID"] = pub.cluster_uuid
                w.set(PUBLIC, True, "Fetched", "public metadata fetched and valid")
                # The exporter learns the peer after the pass checked it for conflicts.
        cached = w.public()
        if mismatch:
            w.set(PRIVATE, False, "ClusterUUIDMismatch", "exchange stopped: peer identity changed")
            return False
        if cached is None:
            w.set(PRIVATE, False, "AwaitingPublic", "public metadata is not available")
            return False
        try:
            token = tokens.mint(
                self.identity.signing_key,
                subject=self.identity.cluster_uuid,
                audience=cached.cluster_uuid,
                scope=PRIVATE_SCOPE,
                ttl_seconds=60,
            )
        except tokens.TokenError as exc:
            w.set(PRIVATE, False, "TokenGenerationFailed", exc.reason)
            return False
        try:
            priv = parse_private(
                await fetch_json(
                    session,
                    f"{endpoint}/private/multicluster.json",
                    ctx=ctx,
                    token=token,
                    timeout=timeout,
                ),
                require_gateways=bool(spec.get("enableIngressGateway", True)),
            )
            if priv.cluster_uuid and priv.cluster_uuid != cached.cluster_uuid:
                raise MetadataError(
                    "InvalidPrivateMetadata", "private metadata names another cluster UUID"
                )
        except MetadataError as exc:
            self.metrics.fetch_errors.labels(w.name, "private", exc.reason).inc()
            w.set(PRIVATE, False, exc.reason, exc.message)
            log.warning("metadata_fetch_failed", peer=w.name, document="private", reason=exc.reason)
            return False
        cache["private"] = priv.to_dict()
        cache["privateLastFetchTimestamp"] = rfc3339()
        w.set(PRIVATE, True, "Fetched", "private metadata fetched and valid")
        return ok

    # ------------------------------------------------------------------ artifacts

    def _peer_cluster_id(self, pub: PublicMetadata, priv: PrivateMetadata) -> str:
        return planning.peer_cluster_id(pub, priv, self.settings.cluster_domain)

    async def _remote_secret(self, w: Work, plan: Plan, report: PassReport) -> None:
        pub, priv = plan.pub, plan.priv
        if pub is None or priv is None:
            return  # on hold: whatever secret exists stays as it is
        peer_id = self._peer_cluster_id(pub, priv)
        ns = self.settings.istio_namespace
        name = artifacts.REMOTE_SECRET_PREFIX + w.name
        existing = await self.kube.get(secret_path(ns, name))
        meta = w.spec.get("metadata") or {}
        now = time.time()
        creds: artifacts.Credentials | None = None
        old_text = _b64d(((existing or {}).get("data") or {}).get(peer_id))
        if old_text:
            try:
                old_kc = yaml.safe_load(old_text)
            except yaml.YAMLError:
                old_kc = None
            if isinstance(old_kc, dict):
                creds = artifacts.credentials_from_kubeconfig(
                    old_kc,
                    client_ca=self.identity.client_ca,
                    signing_key=self.identity.signing_key,
                    local_uuid=self.identity.cluster_uuid,
                    peer_uuid=pub.cluster_uuid,
                    now=now,
                )
        ttl = self.settings.credential_ttl
        if (
            creds is None
            or creds.due(now, self.settings.rotate_fraction)
            or creds.expires_at - creds.issued_at > ttl + 1
        ):
            creds = artifacts.issue_credentials(
                client_ca=self.identity.client_ca,
                signing_key=self.identity.signing_key,
                local_uuid=self.identity.cluster_uuid,
                peer_uuid=pub.cluster_uuid,
                ttl_seconds=ttl,
                now=now,
            )
        kubeconfig = artifacts.build_kubeconfig(
            name=peer_id,
            server=f"https://{priv.api_host}",
            ca_pem=meta.get("ca"),
            credentials=creds,
            insecure_skip_verify=bool(meta.get("insecureSkipVerify")),
        )
        w.kubeconfig = kubeconfig
        desired = artifacts.remote_secret(
            imc_name=w.name,
            imc_uid=str(w.obj["metadata"].get("uid", "")),
            namespace=ns,
            peer_cluster_id=peer_id,
            kubeconfig_text=artifacts.dump_yaml(kubeconfig),
        )
        state = self.peers.setdefault(w.name, PeerState())
        state.next_rotation = (
            creds.issued_at + (creds.expires_at - creds.issued_at) * self.settings.rotate_fraction
        )
        if existing is None or not _same_secret(existing, desired):
            self._check_writer()
            if existing is None:
                await self.kube.create(secret_path(ns), desired)
            else:
                desired["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                await self.kube.replace(secret_path(ns, name), desired)
            self.metrics.writes.labels("remote-secret").inc()
            report.writes.append(f"secret/{ns}/{name}")
            log.info("remote_secret_written", peer=w.name, cluster_id=peer_id)
        # Only what istiod can read now: a rotation whose write failed must not look done.
        self.metrics.credential_expiry.labels(w.name).set(creds.expires_at)
        self.metrics.credential_rotation_due.labels(w.name).set(state.next_rotation)

    async def _sweep_remote_secrets(self, active: set[str], report: PassReport) -> None:
        ns = self.settings.istio_namespace
        selector = f"{artifacts.MANAGED_BY_LABEL}={artifacts.MANAGED_BY},{artifacts.OWNER_LABEL}"
        listing = await self.kube.list(secret_path(ns), label_selector=selector)
        for item in listing.get("items") or []:
            owner = (item["metadata"].get("labels") or {}).get(artifacts.OWNER_LABEL)
            if owner in active:
                continue
            self._check_writer()
            await self.kube.delete(secret_path(ns, item["metadata"]["name"]))
            self.metrics.writes.labels("remote-secret-delete").inc()
            report.writes.append(f"delete secret/{ns}/{item['metadata']['name']}")
            log.info("remote_secret_removed", peer=owner)

    async def _peers_secret(
        self, active: list[Work], plans: dict[str, Plan], report: PassReport
    ) -> None:
        ns = self.settings.namespace
        existing = await self.kube.get(secret_path(ns, PEERS_SECRET))
        held: dict[str, artifacts.PeerEntry] = {}
        try:
            doc = yaml.safe_load(_b64d(((existing or {}).get("data") or {}).get(PEERS_KEY)) or "")
        except yaml.YAMLError:
            doc = None
        for item in (doc.get("peers") if isinstance(doc, dict) else None) or []:
            entry = artifacts.PeerEntry.from_dict(item)
            if entry is not None:
                held.setdefault(entry.name, entry)
        entries = []
        for w in active:
            pub = plans[w.name].pub
            if pub is not None:
                entries.append(
                    artifacts.PeerEntry(w.name, pub.cluster_uuid, pub.authn_key_pub, pub.client_ca)
                )
            elif w.name in held:
                entries.append(held[w.name])  # on hold: its entry stays as it is
        text = artifacts.render_peers(entries)
        if existing is not None and _b64d((existing.get("data") or {}).get(PEERS_KEY)) == text:
            return
        self._check_writer()
        if existing is None:
            body: Obj = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": PEERS_SECRET,
                    "namespace": ns,
                    "labels": {artifacts.MANAGED_BY_LABEL: artifacts.MANAGED_BY},
                },
                "data": {PEERS_KEY: _b64e(text)},
            }
            await self.kube.create(secret_path(ns), body)
        else:
            body = copy.deepcopy(existing)
            body.setdefault("data", {})[PEERS_KEY] = _b64e(text)
            body.pop("stringData", None)
            await self.kube.replace(secret_path(ns, PEERS_SECRET), body)
        self.metrics.writes.labels("peers").inc()
        report.writes.append(f"secret/{ns}/{PEERS_SECRET}")
        log.info("peers_file_written", peers=[e.name for e in entries])

    async def _mesh_config(
        self, active: list[Work], plans: dict[str, Plan], report: PassReport
    ) -> None:
        ns = self.settings.istio_namespace
        cm = await self.kube.get(configmap_path(ns, MESH_CONFIGMAP))
        if cm is None:
            report.errors.append(f"configmap {ns}/{MESH_CONFIGMAP} not found; mesh trust not set")
            log.warning("mesh_configmap_missing", namespace=ns, name=MESH_CONFIGMAP)
            return
        try:
            update = mesh.update(
                cm,
                [self._mesh_peer(w, plans[w.name], report) for w in active],
                self.settings.cluster_domain,
            )
        except mesh.MeshConfigError as exc:
            report.errors.append(f"configmap {ns}/{MESH_CONFIGMAP}: {exc}")
            return
        if update is None:
            return
        self._check_writer()
        body = copy.deepcopy(cm)
        body["data"] = update.data
        body["metadata"]["annotations"] = update.annotations
        await self.kube.replace(configmap_path(ns, MESH_CONFIGMAP), body)
        self.metrics.writes.labels("mesh-config").inc()
        report.writes.append(f"configmap/{ns}/{MESH_CONFIGMAP}")
        log.info("mesh_config_written", peers=update.peers, networks=update.networks)

    def _mesh_peer(self, w: Work, plan: Plan, report: PassReport) -> mesh.MeshPeer:
        pub, priv = plan.pub, plan.priv
        ca: tuple[str, str] | None = None
        if pub is not None:
            try:
                ca = (pub.root_ca, artifacts.pem_digest(pub.root_ca))
            except Exception as exc:  # this peer's root is held, the others go on
                self._failed(w, "mesh trust", exc)
                report.errors.append(f"mesh trust of {w.name}: {type(exc).__name__}")
        network = None
        if pub is not None and priv is not None:
            network = artifacts.NetworkSpec(
                network=priv.network_name,
                registries=(self._peer_cluster_id(pub, priv), w.name),
                gateways=priv.ingress_gateways,
            )
        return mesh.MeshPeer(
            w.name, ca, network, gateways=bool(w.spec.get("enableIngressGateway", True))
        )

    async def _drop_finalizer(self, w: Work, report: PassReport) -> None:
        finalizers = list(w.obj["metadata"].get("finalizers") or [])
        if FINALIZER not in finalizers:
            return
        self._check_writer()
        finalizers.remove(FINALIZER)
        await self.kube.merge_patch(
            f"{IMC_PATH}/{w.name}",
            {
                "metadata": {
                    "finalizers": finalizers or None,
                    "resourceVersion": w.obj["metadata"]["resourceVersion"],
                }
            },
        )
        self.peers.pop(w.name, None)
        self.registry.remove(w.name)
        self.metrics.forget_peer(w.name)
        report.writes.append(f"finalizer removed from {w.name}")
        log.info("peer_removed", peer=w.name)

    # ------------------------------------------------------------------ probe

    async def _probe(self, w: Work) -> None:
        if w.kubeconfig is None:
            if w.private() is None:
                w.set(REMOTE_API, False, "AwaitingPrivate", "private metadata is not available")
            return
        state = self.peers.setdefault(w.name, PeerState())
        try:
            await probe_api(w.kubeconfig, timeout=self.settings.probe_timeout)
        except Exception as exc:  # one peer's surprise must not abort the others' status
            message = exc.message if isinstance(exc, ProbeError) else type(exc).__name__
            self.metrics.api_check_errors.labels(w.name).inc()
            w.set(REMOTE_API, False, "RemoteAPIUnreachable", message)
            state.probe_failures += 1
            state.next_probe = time.monotonic() + self._backoff(state.probe_failures)
            return
        state.probe_failures, state.next_probe = 0, float("inf")
        w.set(REMOTE_API, True, "APIVersionsServed", "the peer's api-proxy answered GET /api")

    # ------------------------------------------------------------------ status

    async def _write_status(self, w: Work, report: PassReport) -> None:
        old_conditions = list((w.obj.get("status") or {}).get("conditions") or [])
        generation = int(w.obj["metadata"].get("generation") or 0)
        merged = merge_conditions(old_conditions, w.conditions, generation, rfc3339())
        w.status["conditions"] = merged
        w.status["observedGeneration"] = generation
        by_type = {c.get("type"): c for c in merged}
        report.conditions[w.name] = {t: by_type[t] for t in CONDITION_TYPES if t in by_type}
        for ctype in CONDITION_TYPES:
            if ctype in by_type:
                self.metrics.condition.labels(w.name, ctype).set(
                    1 if by_type[ctype]["status"] == "True" else 0
                )
        if w.status == (w.obj.get("status") or {}):
            return
        self._check_writer()
        try:
            await self.kube.merge_patch(f"{IMC_PATH}/{w.name}/status", {"status": w.status})
        except KubeError as exc:
            report.errors.append(f"status of {w.name}: {exc}")
            log.warning("status_write_failed", peer=w.name, error=str(exc))
            return
        old_by_type = {c.get("type"): c for c in old_conditions}
        for ctype in CONDITION_TYPES:
            new = by_type.get(ctype)
            old = old_by_type.get(ctype) or {}
            if new is None:
                continue
            if new["reason"] in CONFLICT_REASONS and old.get("reason") != new["reason"]:
                # A refusal is news even when the condition was already False for another reason.
                await self._event(w, new, reason=str(new["reason"]))
            elif old.get("status") != new["status"]:
                await self._event(w, new)

    async def _event(self, w: Work, cond: Obj, *, reason: str | None = None) -> None:
        if not self.can_write():  # events are writes too
            return
        ok = cond["status"] == "True"
        now = rfc3339()
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{w.name}.", "namespace": "default"},
            "involvedObject": {
                "apiVersion": "deckhouse.io/v1alpha1",
                "kind": "IstioMulticluster",
                "name": w.name,
                "uid": w.obj["metadata"].get("uid", ""),
                "resourceVersion": w.obj["metadata"].get("resourceVersion", ""),
            },
            "type": "Normal" if ok else "Warning",
            "reason": reason or f"{cond['type']}{'True' if ok else 'False'}",
            "message": f"{cond['reason']}: {cond['message']}"[:1024],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "reportingInstance": EVENT_SOURCE,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.create("/api/v1/namespaces/default/events", body)
        except KubeError as exc:
            log.warning("event_write_failed", peer=w.name, error=str(exc))


def _same_secret(existing: Obj, desired: Obj) -> bool:
    if (existing.get("data") or {}) != desired["data"]:
        return False
    meta, want = existing.get("metadata") or {}, desired["metadata"]
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    return all(labels.get(k) == v for k, v in want["labels"].items()) and all(
        annotations.get(k) == v for k, v in want["annotations"].items()
    )


class ProbeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def probe_api(kubeconfig: Obj, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """GET <server>/api with the kubeconfig's credentials; expect `kind: APIVersions`."""
    cluster = kubeconfig["clusters"][0]["cluster"]
    user = kubeconfig["users"][0]["user"]
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca = _b64d(cluster.get("certificate-authority-data"))
    if ca:
        ctx.load_verify_locations(cadata=ca)
    if cluster.get("insecure-skip-tls-verify"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = _b64d(user.get("client-certificate-data")), _b64d(user.get("client-key-data"))
    if cert and key:
        # ssl only loads client keys from files: a private 0600 file, removed at once.
        fd, path = tempfile.mkstemp(prefix="apiproxy-probe-", suffix=".pem")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(cert + key)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
    headers = {"Accept": "application/json"}
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    url = str(cluster["server"]).rstrip("/") + "/api"
    try:
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.get(
                url, headers=headers, ssl=ctx, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp,
        ):
            body = await read_capped(resp, 1 << 16)
            if resp.status != 200:
                raise ProbeError(f"GET {url} answered {resp.status}")
    except ProbeError:
        raise
    except TimeoutError:
        raise ProbeError(f"GET {url} timed out") from None
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        raise ProbeError(f"GET {url} failed: {type(exc).__name__}") from None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ProbeError(f"GET {url}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != "APIVersions":
        raise ProbeError(f"GET {url}: expected kind APIVersions")
