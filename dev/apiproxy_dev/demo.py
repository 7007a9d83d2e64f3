"""`apiproxy demo`: the two-cluster story end to end, on simulated clusters, narrated.

Two clusters share the cluster domain `cluster.local` but have separate Istio roots. On each,
`apiproxy federate` (metadata exporter + federation controller) and `apiproxy serve` (the api-proxy)
come up; IstioMulticluster objects are created on both sides; the controllers exchange metadata and
write the remote secrets, the proxies' peers Secrets, mesh trust and meshNetworks. Then a stand-in
for cluster A's istiod, built only from the remote secret's kubeconfig, discovers cluster B's
endpoints through B's api-proxy, sees a new pod arrive live, sees none of B's secrets (the policy's
empty view) and is refused writes. B's audit log is summarized at the end.

Every step checks what it claims; the first that does not hold prints `FAILED: step N: why` and the
command exits 1. Everything runs in this process on 127.0.0.1; files live in a temporary directory
(removed at the end unless --keep, or a step failed). The components' logs (JSON, level info) go to
`components.log` there, never into the story: some of them are expected events of it (the
refused anonymous request, the first metadata fetch before the other side knows us) that would
look like errors to someone watching. When a step fails, the last lines of that log are shown
with the file's path. `--verbose` sends the logs to stderr instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import shutil
import ssl
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.client import (
    ApiClient,
    CoreV1Api,
    CustomObjectsApi,
    DiscoveryV1Api,
    V1ConfigMap,
    V1ObjectMeta,
)
from kubernetes_asyncio.client.exceptions import ApiException

from apiproxy import flags, pki, tokens, upstream
from apiproxy import log as applog
from apiproxy.audit.review import render_table, summarize
from apiproxy.errors import UserError
from apiproxy.federation import artifacts
from apiproxy.federation.controller import CONDITION_TYPES, FINALIZER
from apiproxy.federation.main import LEASE_NAME, Federation, FederationConfig
from apiproxy.policy import Policy
from apiproxy.policy.shipped import shipped_policy
from apiproxy.server import ProxyServer, ServeConfig
from apiproxy_dev.demo_kit import (
    APIPROXY_NAMESPACE,
    CLUSTER_DOMAIN,
    INDENT,
    ISTIO_NAMESPACE,
    PRIVATE_NAMESPACE,
    DeadlineExceeded,
    Informer,
    Narrator,
    SecretVolume,
    SimCluster,
    reserve_loopback_port,
)
from apiproxy_dev.sim.seed import pod as seed_pod

TOTAL_STEPS = 12
IMC = ("deckhouse.io", "v1alpha1", "istiomulticlusters")
PEERS_SECRET = "apiproxy-peers"  # noqa: S105 - a name
DEFAULT_POLICY = shipped_policy("istio-remote.yaml")
WAIT = 20.0  # seconds: the longest any single step waits for an event
COMPONENTS_LOG = "components.log"
LOG_TAIL = 20  # lines of the components' log shown when a step fails


class StepFailed(Exception):
    """A step did not do what it says."""


def check(condition: object, why: str) -> None:
    if not condition:
        raise StepFailed(why)


def fingerprint(pem: str) -> str:
    der = pki.load_certs(pem)[0].public_bytes(encoding=_DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 16, 2)) + "..."


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


_DER = _der()


def b64d(value: str) -> str:
    return base64.b64decode(value).decode()


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PEM) as `|` blocks, as a person would write them in a ConfigMap."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_presenter)


def literal_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=True)


# ---------------------------------------------------------------------- the two sides


@dataclass
class Side:
    """One cluster with its apiproxy components."""

    label: str  # "cluster-a"
    cluster: SimCluster
    peer_name: str = ""  # the IstioMulticluster name this side gives the other one
    proxy_port: int = 0
    fed: Federation | None = None
    proxy: ProxyServer | None = None
    volume: SecretVolume | None = None
    tls: tuple[Path, Path, Path] | None = None  # tls.crt, tls.key, ca.crt (this side's ingress CA)
    reloads: list[list[tuple[str, bool]]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.cluster.directory

    @property
    def store(self) -> Any:
        return self.cluster.sim.store

    def need_fed(self) -> Federation:
        assert self.fed is not None
        assert self.fed.identity is not None
        return self.fed

    def need_proxy(self) -> ProxyServer:
        assert self.proxy is not None
        return self.proxy

    def imc(self) -> dict[str, Any]:
        obj = self.cluster.get("istiomulticlusters.deckhouse.io", self.peer_name)
        return obj or {}

    def conditions(self) -> dict[str, dict[str, Any]]:
        status = self.imc().get("status") or {}
        return {str(c.get("type")): c for c in status.get("conditions") or []}

    def converged(self, other: Side) -> bool:
        conds = self.conditions()
        if not all(conds.get(t, {}).get("status") == "True" for t in CONDITION_TYPES):
            return False
        proxy = self.proxy
        peer = proxy.peers.by_name(self.peer_name) if proxy is not None else None
        return peer is not None and peer.cluster_uuid == other.cluster.uuid

    async def reload_proxy(self, _files: dict[str, bytes]) -> None:
        """The kubelet updated the peers volume: have the proxy check its files now (SIGHUP)."""
        if self.proxy is not None:
            self.reloads.append(await self.proxy.reload_now())

    def fetch_errors(self) -> int:
        fed = self.need_fed()
        total = 0.0
        for metric in fed.metrics_registry.collect():
            for sample in metric.samples:
                if sample.name == "apiproxy_federation_metadata_fetch_errors_total":
                    total += sample.value
        return int(total)


def ssl_for(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def https_get(url: str, ca_file: Path) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(url, ssl=ssl_for(ca_file), timeout=aiohttp.ClientTimeout(total=5)) as response,
    ):
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")


def api_error(exc: ApiException) -> tuple[int, str, str]:
    try:
        body = json.loads(exc.body or b"{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    return int(exc.status), str(body.get("reason", "")), str(body.get("message", exc.reason))


# ---------------------------------------------------------------------- the demo


@dataclass
class Options:
    verbose: bool = False
    keep: bool = False
    timeout: float = 60.0
    policy: Path = DEFAULT_POLICY


class Demo:
    def __init__(self, options: Options, out: TextIO) -> None:
        self.opts = options
        self.say = Narrator(out, TOTAL_STEPS)
        self.tmp = Path(tempfile.mkdtemp(prefix="apiproxy-demo-"))
        self.a: Side | None = None
        self.b: Side | None = None
        self.informers: list[Informer] = []
        self.remote: ApiClient | None = None
        self.log_path = self.tmp / COMPONENTS_LOG
        self.failed = False

    def sides(self) -> tuple[Side, Side]:
        assert self.a is not None
        assert self.b is not None
        return self.a, self.b

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        started = time.perf_counter()
        n = self.say
        n.line(
            "apiproxy demo: two Istio clusters, one cluster domain, separate roots, joined "
            "through a narrow, audited door"
        )
        n.line(f"(simulated clusters on 127.0.0.1; files in {self.tmp})")
        with contextlib.ExitStack() as logs:
            if not self.opts.verbose:
                stream = logs.enter_context(self.log_path.open("w", encoding="utf-8"))
                applog.configure("json", "info", stream=stream)
                logs.callback(applog.configure, "auto", "warning")  # back to stderr, then close
            return await self._run(started)

    async def _run(self, started: float) -> int:
        n = self.say
        steps: list[Callable[[], Awaitable[None]]] = [
            self.step_clusters,
            self.step_federate,
            self.step_serve,
            self.step_imcs,
            self.step_exchange,
            self.step_remote_secrets,
            self.step_peers,
            self.step_mesh,
            self.step_istiod,
            self.step_new_pod,
            self.step_secrets_refused,
            self.step_audit,
        ]
        assert len(steps) == TOTAL_STEPS
        code = 0
        deadline = asyncio.timeout(self.opts.timeout)
        try:
            async with deadline:
                for step in steps:
                    await step()
                    n.done()
        except StepFailed as exc:
            code = self._failed(str(exc))
        except DeadlineExceeded as exc:
            code = self._failed(f"an awaited change did not happen: {exc}")
        except TimeoutError as exc:
            if deadline.expired():
                code = self._failed(f"not finished within --timeout {self.opts.timeout:g} s")
            else:
                code = self._failed(f"timed out: {exc or 'a wait ran past its deadline'}")
        except Exception as exc:
            if self.opts.verbose:
                traceback.print_exc(file=sys.stderr)
            code = self._failed(applog.redact_text(f"{type(exc).__name__}: {exc}"))
        finally:
            await self.close()
        elapsed = time.perf_counter() - started
        if code == 0:
            n.line()
            n.line(f"All {TOTAL_STEPS} steps did what they said, in {elapsed:.1f} s.")
        if self.opts.keep or self.failed:
            n.line(f"Files kept in {self.tmp}")
        return code

    def _failed(self, why: str) -> int:
        self.failed = True
        self.say.line(f"FAILED: step {max(self.say.step, 1)}: {why}")
        if self.opts.verbose:
            return 1  # the logs went to stderr
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        if lines:
            shown = lines[-LOG_TAIL:]
            self.say.line(f"The components' last {len(shown)} log lines (all: {self.log_path}):")
            for line in shown:
                self.say.line(INDENT + line)
        return 1

    async def close(self) -> None:
        """Stop everything that was started, newest first; bounded."""
        try:
            async with asyncio.timeout(20):
                for informer in self.informers:
                    await informer.stop()
                if self.remote is not None:
                    await self.remote.close()
                for side in (s for s in (self.b, self.a) if s is not None):
                    if side.volume is not None:
                        await side.volume.stop()
                    if side.proxy is not None:
                        await side.proxy.stop()
                    if side.fed is not None:
                        await side.fed.stop()
                    await side.cluster.close()
        except Exception as exc:
            print(f"apiproxy demo: clean-up: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not self.opts.keep and not self.failed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ 1

    async def step_clusters(self) -> None:
        n = self.say
        n.begin("Two clusters: one cluster domain, separate Istio roots")
        self.a = Side("cluster-a", await SimCluster.start("cluster-a", self.tmp / "cluster-a"))
        self.b = Side("cluster-b", await SimCluster.start("cluster-b", self.tmp / "cluster-b"))
        a, b = self.sides()
        a.peer_name, b.peer_name = b.label, a.label
        seeded = b.cluster.seed_workloads(pods=12, namespaces=2, services_per_namespace=2)
        for side in (a, b):
            c = side.cluster
            assert c.admin is not None
            ns = await CoreV1Api(c.admin).read_namespace("kube-system")
            check(ns.metadata.uid == c.uuid, f"{side.label}: kube-system uid is not the UUID")
            mesh = yaml.safe_load(c.get("configmaps", "istio", ISTIO_NAMESPACE)["data"]["mesh"])  # type: ignore[index]
            check(mesh.get("trustDomain") == CLUSTER_DOMAIN, f"{side.label}: wrong trust domain")
            n.say(f"{side.label}: kube-apiserver {c.sim.url} (simulated)")
            n.say(f"  cluster UUID (kube-system uid) {c.uuid}")
            n.say(
                f"  Istio root {pki.load_certs(c.istio_root.cert_pem)[0].subject.rfc4514_string()}"
                f", SHA-256 {fingerprint(c.istio_root.cert_pem)}"
            )
        check(
            fingerprint(a.cluster.istio_root.cert_pem)
            != fingerprint(b.cluster.istio_root.cert_pem),
            "the two Istio roots are the same",
        )
        n.say(
            f"cluster-b runs workloads: {seeded.pods} pods behind {seeded.services} Services in "
            f"{seeded.namespaces} namespaces (ns-0, ns-1), with EndpointSlices"
        )
        n.say(
            f"both: cluster domain {CLUSTER_DOMAIN}, trustDomain {CLUSTER_DOMAIN}; "
            "the roots differ, so neither mesh trusts the other yet"
        )

    # ------------------------------------------------------------------ 2

    async def step_federate(self) -> None:
        n = self.say
        n.begin("apiproxy federate (metadata exporter + federation controller) starts on both")
        for i, side in enumerate(self.sides()):
            c = side.cluster
            side.proxy_port = reserve_loopback_port()
            side.tls = c.write_serving_files()
            crt, key, ca = side.tls
            cfg = FederationConfig(
                cluster_domain=CLUSTER_DOMAIN,
                api_host=f"127.0.0.1:{side.proxy_port}",
                exporter_listen="127.0.0.1:0",
                exporter_tls_cert=str(crt),
                exporter_tls_key=str(key),
                # An east-west gateway address to advertise: documentation range, data only.
                ingress_gateways=[f"192.0.2.{10 * (i + 1)}:15443"],
                leader_elect=True,
                identity=f"apiproxy-federation-{side.label[-1]}-0",
                # Demo tempo: re-fetch peers every second instead of every minute.
                resync_interval=1.0,
                backoff_base=0.2,
                backoff_max=1.0,
                fetch_timeout=3.0,
            )
            fed = Federation(cfg, await c.client())
            side.fed = fed
            await fed.start()
            try:
                await fed.wait_leader(timeout=WAIT)
            except TimeoutError:
                raise StepFailed(f"{side.label}: federate did not win its Lease") from None
            ident = side.need_fed().identity
            assert ident is not None
            check(ident.cluster_uuid == c.uuid, f"{side.label}: federate found another UUID")
            for name in ("apiproxy-identity", "apiproxy-client-ca"):
                check(
                    c.get("secrets", name, APIPROXY_NAMESPACE),
                    f"{side.label}: Secret {name} not created",
                )
            lease = c.get("leases.coordination.k8s.io", LEASE_NAME, APIPROXY_NAMESPACE) or {}
            holder = (lease.get("spec") or {}).get("holderIdentity")
            check(holder == cfg.identity, f"{side.label}: Lease holder is {holder!r}")
            status, public = await https_get(fed.exporter_url + "/public/public.json", ca)
            check(status == 200, f"{side.label}: exporter answered {status} for public.json")
            check(
                public.get("clusterUUID") == c.uuid
                and public.get("rootCA") == c.istio_root.cert_pem,
                f"{side.label}: public.json does not carry the cluster's UUID and Istio root",
            )
            n.say(f"{side.label}: clusterID {ident.cluster_id}, network {ident.network}")
            n.say(
                f"  Lease {APIPROXY_NAMESPACE}/{LEASE_NAME} held by {holder}; created Secrets "
                "apiproxy-identity (Ed25519 signing key), apiproxy-client-ca"
            )
            n.say(
                f"  exporter {fed.exporter_url} serves public.json: clusterUUID {c.uuid[:8]}..., "
                "rootCA = its Istio root"
            )

    # ------------------------------------------------------------------ 3

    async def step_serve(self) -> None:
        n = self.say
        n.begin("apiproxy serve (the api-proxy) starts on both, in front of its kube-apiserver")
        policy = Policy.load(self.opts.policy)
        for side in self.sides():
            c = side.cluster
            assert side.tls is not None
            crt, key, ca = side.tls
            sa_ca, sa_token = c.write_service_account()
            peers_dir = side.dir / "peers"
            side.volume = SecretVolume(
                await c.client(),
                APIPROXY_NAMESPACE,
                PEERS_SECRET,
                peers_dir,
                on_update=side.reload_proxy,
            )
            side.volume.start()
            volume = side.volume
            # The pod waits in ContainerCreating until the controller's first pass wrote the Secret.
            await volume.wait_until(lambda v=volume: v.files is not None, timeout=WAIT)  # type: ignore[misc]
            text = (peers_dir / "peers.yaml").read_text()
            check(yaml.safe_load(text) == {"peers": []}, f"{side.label}: peers not empty: {text}")
            side.proxy = ProxyServer(
                ServeConfig(
                    tls_cert=str(crt),
                    tls_key=str(key),
                    peers=str(peers_dir / "peers.yaml"),
                    cluster_uuid=c.uuid,
                    policy=str(self.opts.policy),
                    upstream=upstream.from_flags(c.sim.url, str(sa_ca), str(sa_token)),
                    listen_port=side.proxy_port,
                    audit_log=str(side.dir / "audit.log"),
                    reload_interval_seconds=0,  # the kubelet stand-in asks for a check (SIGHUP)
                    shutdown_grace_seconds=2,
                )
            )
            await side.proxy.start()
            status, body = await https_get(f"{side.proxy.url}/version", ca)
            check(status == 401, f"{side.label}: anonymous GET /version answered {status}")
            n.say(
                f"{side.label}: api-proxy {side.proxy.url} -> {c.sim.url} "
                f"(policy {self.opts.policy.name}: {len(policy.rules)} rules, read-only)"
            )
            n.say(
                f"  kubelet mounted Secret {APIPROXY_NAMESPACE}/{PEERS_SECRET} (written by the "
                f"controller's first pass) at {peers_dir.relative_to(self.tmp)}/peers.yaml: "
                f"{text.strip()!r}"
            )
            message = body.get("message") if isinstance(body, dict) else body
            n.say(f"  anonymous GET /version -> {status} {message}: fails closed")

    # ------------------------------------------------------------------ 4

    async def step_imcs(self) -> None:
        n = self.say
        n.begin("IstioMulticluster objects are created on both sides")
        a, b = self.sides()
        for side, other in ((a, b), (b, a)):
            assert other.tls is not None
            assert side.cluster.admin is not None
            body: dict[str, Any] = {
                "apiVersion": f"{IMC[0]}/{IMC[1]}",
                "kind": "IstioMulticluster",
                "metadata": {"name": side.peer_name},
                "spec": {
                    "metadataEndpoint": other.need_fed().exporter_url,
                    "metadata": {"ca": other.tls[2].read_text()},
                    "enableIngressGateway": True,
                },
            }
            api = CustomObjectsApi(side.cluster.admin)
            created = await api.create_cluster_custom_object(*IMC, body)
            check(created["metadata"].get("uid"), f"{side.label}: IstioMulticluster not created")
            if side is a:
                shown = json.loads(json.dumps(body))
                shown["spec"]["metadata"]["ca"] = "<PEM of cluster-b's ingress CA>"
                n.say(f"{side.label} (kubectl apply -f):")
                n.say(textwrap.indent(yaml.safe_dump(shown, sort_keys=False).rstrip(), "  "))
            else:
                n.say(
                    f"{side.label}: IstioMulticluster {side.peer_name} -> "
                    f"{body['spec']['metadataEndpoint']}"
                )

    # ------------------------------------------------------------------ 5

    async def step_exchange(self) -> None:
        n = self.say
        n.begin("The controllers exchange metadata (public, then private with a JWT)")
        a, b = self.sides()

        def converged() -> bool:
            return a.converged(b) and b.converged(a)

        try:
            async with asyncio.timeout(WAIT):
                while not converged():
                    await self._any_change()
        except TimeoutError:
            raise StepFailed(
                "the exchange did not converge within "
                f"{WAIT:g} s: {a.label} {self._condition_text(a)}; "
                f"{b.label} {self._condition_text(b)}"
            ) from None
        for side, other in ((a, b), (b, a)):
            imc = side.imc()
            status = imc.get("status") or {}
            cache = status.get("metadataCache") or {}
            private = cache.get("private") or {}
            other_id = other.need_fed().identity
            assert other_id is not None
            check(
                status.get("pinnedClusterUUID") == other.cluster.uuid,
                f"{side.label}: pinned {status.get('pinnedClusterUUID')}, not {other.label}'s UUID",
            )
            check(
                private.get("apiHost") == f"127.0.0.1:{other.proxy_port}",
                f"{side.label}: private metadata names api host {private.get('apiHost')}",
            )
            check(
                FINALIZER in (imc["metadata"].get("finalizers") or []),
                f"{side.label}: finalizer {FINALIZER} missing",
            )
            n.say(
                f"{side.label} <- {other.label}: pinned clusterUUID {other.cluster.uuid}, "
                f"network {private.get('networkName')}, api-proxy {private.get('apiHost')}"
            )
            n.say(f"  {self._condition_text(side)}")
            ctl = side.need_fed().controller
            assert ctl is not None
            retried = side.fetch_errors()
            n.say(
                f"  converged in {ctl.passes} controller passes"
                + (
                    f"; {retried} fetch(es) refused first and retried (a peer serves private "
                    "metadata only once it has our public key)"
                    if retried
                    else ""
                )
            )

    async def _any_change(self) -> None:
        """Wait for the next controller pass on either side or a peers volume update."""
        waits: list[asyncio.Task[Any]] = []
        for side in self.sides():
            ctl = side.need_fed().controller
            assert ctl is not None
            assert side.volume is not None
            waits.append(asyncio.create_task(ctl.wait_for_pass(ctl.passes, timeout=WAIT)))
            waits.append(asyncio.create_task(side.volume.changed.event().wait()))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    @staticmethod
    def _condition_text(side: Side) -> str:
        conds = side.conditions()
        return ", ".join(
            f"{t}={conds.get(t, {}).get('status', '?')} ({conds.get(t, {}).get('reason', '-')})"
            for t in CONDITION_TYPES
        )

    # ------------------------------------------------------------------ 6

    async def step_remote_secrets(self) -> None:
        n = self.say
        n.begin("Remote secrets written: istiod's kubeconfig for the peer's api-proxy")
        a, b = self.sides()
        for side, other in ((a, b), (b, a)):
            own = side.need_fed().identity
            peer = other.need_fed().identity
            assert own is not None
            assert peer is not None
            assert other.tls is not None
            name = artifacts.REMOTE_SECRET_PREFIX + side.peer_name
            secret = side.cluster.get("secrets", name, ISTIO_NAMESPACE)
            check(secret, f"{side.label}: Secret {ISTIO_NAMESPACE}/{name} not found")
            assert secret is not None
            meta = secret["metadata"]
            labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
            check(
                labels.get(artifacts.MULTICLUSTER_LABEL) == "true",
                f"{side.label}: {name} lacks label {artifacts.MULTICLUSTER_LABEL}=true",
            )
            check(
                annotations.get(artifacts.CLUSTER_ANNOTATION) == peer.cluster_id,
                f"{side.label}: {name} annotation {artifacts.CLUSTER_ANNOTATION} is "
                f"{annotations.get(artifacts.CLUSTER_ANNOTATION)!r}, not {peer.cluster_id}",
            )
            data = secret.get("data") or {}
            check(list(data) == [peer.cluster_id], f"{side.label}: {name} keys {list(data)}")
            kc = yaml.safe_load(b64d(data[peer.cluster_id]))
            cluster = kc["clusters"][0]["cluster"]
            user = kc["users"][0]["user"]
            server = f"https://127.0.0.1:{other.proxy_port}"
            check(cluster.get("server") == server, f"{side.label}: server {cluster.get('server')}")
            check(
                b64d(cluster.get("certificate-authority-data", "")) == other.tls[2].read_text(),
                f"{side.label}: the kubeconfig does not pin {other.label}'s ingress CA",
            )
            check(
                set(user) == {"client-certificate-data", "client-key-data", "token"}
                and not artifacts.inline_only_violations(kc),
                f"{side.label}: the kubeconfig has other than inline credentials: {sorted(user)}",
            )
            cert = pki.load_certs(b64d(user["client-certificate-data"]))[0]
            cert.verify_directly_issued_by(own.client_ca.cert)
            cn = cert.subject.rfc4514_string()
            claims = tokens.verify(
                user["token"],
                audience=other.cluster.uuid,
                scope=artifacts.API_SCOPE,
                key_for_subject=lambda s, o=own: o.public_key if s == o.cluster_uuid else None,  # type: ignore[misc]
            )
            hours = (claims.expires_at - time.time()) / 3600
            n.say(
                f"{side.label}: Secret {ISTIO_NAMESPACE}/{name}  label "
                f"{artifacts.MULTICLUSTER_LABEL}=true  annotation "
                f"{artifacts.CLUSTER_ANNOTATION}={peer.cluster_id}"
            )
            n.say(f"  kubeconfig: server {server}, CA = {other.label}'s ingress CA")
            n.say(
                f"  user: client certificate {cn} (from {side.label}'s apiproxy-client-ca) + "
                f"JWT sub={claims.subject[:8]}... aud={claims.audience[:8]}... scope={claims.scope}"
                f", {hours:.0f} h left; inline only, nothing istiod would refuse"
            )

    # ------------------------------------------------------------------ 7

    async def step_peers(self) -> None:
        n = self.say
        n.begin("Peers Secrets written; the kubelet mounts them and each api-proxy reloads")
        a, b = self.sides()
        for side, other in ((a, b), (b, a)):
            peer = other.need_fed().identity
            assert peer is not None
            assert side.volume is not None
            secret = side.cluster.get("secrets", PEERS_SECRET, APIPROXY_NAMESPACE) or {}
            text = b64d((secret.get("data") or {}).get("peers.yaml", ""))
            doc = yaml.safe_load(text) or {}
            entries = doc.get("peers") or []
            names = [e.get("name") for e in entries]
            check(names == [side.peer_name], f"{side.label}: peers Secret names {names}")
            entry = entries[0]
            check(entry.get("clusterUUID") == other.cluster.uuid, f"{side.label}: wrong UUID")
            check(
                entry.get("clientCA") == peer.client_ca.cert_pem
                and entry.get("jwtPublicKey") == peer.public_key_pem,
                f"{side.label}: the peer entry does not carry {other.label}'s client CA and key",
            )
            mounted = (side.volume.directory / "peers.yaml").read_text()
            check(mounted == text, f"{side.label}: the mounted peers file is not the Secret's")
            reloaded = [r for rs in side.reloads for r in rs if r[0] == "peers"]
            check(reloaded and all(ok for _, ok in reloaded), f"{side.label}: reloads {reloaded}")
            loaded = [p.name for p in side.need_proxy().peers.peers]
            check(loaded == [side.peer_name], f"{side.label}: the proxy serves peers {loaded}")
            data_link = (side.volume.directory / "..data").readlink()
            n.say(
                f"{side.label}: Secret {APIPROXY_NAMESPACE}/{PEERS_SECRET} peers: "
                f"{', '.join(names)} (clusterUUID {entry['clusterUUID'][:8]}..., clientCA + "
                "jwtPublicKey)"
            )
            n.say(
                f"  kubelet: {side.volume.updates} volume update(s), ..data -> {data_link}; "
                f"api-proxy reloaded peers {len(reloaded)}x, now serves: {', '.join(loaded)}"
            )

    # ------------------------------------------------------------------ 8

    async def step_mesh(self) -> None:
        n = self.say
        n.begin("Mesh trust (caCertificates) and meshNetworks written to ConfigMap istio")
        a, b = self.sides()
        for side, other in ((a, b), (b, a)):
            peer = other.need_fed().identity
            assert peer is not None
            cm = side.cluster.get("configmaps", "istio", ISTIO_NAMESPACE) or {}
            data = cm.get("data") or {}
            mesh = yaml.safe_load(data.get("mesh") or "") or {}
            networks = (yaml.safe_load(data.get("meshNetworks") or "") or {}).get("networks") or {}
            want = artifacts.pem_digest(other.cluster.istio_root.cert_pem)
            entries = [
                e
                for e in mesh.get("caCertificates") or []
                if isinstance(e, dict) and artifacts.pem_digest(e.get("pem", "")) == want
            ]
            check(entries, f"{side.label}: caCertificates lacks {other.label}'s Istio root")
            check(
                entries[0].get("trustDomains") == [CLUSTER_DOMAIN],
                f"{side.label}: trustDomains {entries[0].get('trustDomains')}",
            )
            check(
                mesh.get("trustDomain") == CLUSTER_DOMAIN,
                f"{side.label}: trustDomain changed to {mesh.get('trustDomain')}",
            )
            net = networks.get(peer.network) or {}
            check(net, f"{side.label}: meshNetworks lacks network {peer.network}")
            registries = [e.get("fromRegistry") for e in net.get("endpoints") or []]
            check(
                peer.cluster_id in registries,
                f"{side.label}: {peer.network} endpoints {registries} lack {peer.cluster_id}",
            )
            gateways = [f"{g['address']}:{g['port']}" for g in net.get("gateways") or []]
            check(gateways, f"{side.label}: {peer.network} has no gateways")
            n.say(
                f"{side.label}: mesh caCertificates += {other.label}'s root "
                f"(SHA-256 {fingerprint(other.cluster.istio_root.cert_pem)}):"
            )
            shown = literal_yaml([entries[0]]).splitlines()
            pem_end = next(i for i, line in enumerate(shown) if "END CERTIFICATE" in line)
            for line in [*shown[:3], "    ...", *shown[pem_end:]]:
                n.say(f"    {line}")
            n.say(
                f"  meshNetworks.networks.{peer.network}: fromRegistry "
                f"{', '.join(registries)}; gateways {', '.join(gateways)}"
            )

    # ------------------------------------------------------------------ 9

    async def step_istiod(self) -> None:
        n = self.say
        n.begin("A remote-istiod stand-in in cluster-a discovers cluster-b through its api-proxy")
        a, b = self.sides()
        assert a.cluster.admin is not None
        # istiod's secret controller: Secrets labelled istio/multiCluster=true in its namespace.
        found = await CoreV1Api(a.cluster.admin).list_namespaced_secret(
            ISTIO_NAMESPACE, label_selector=f"{artifacts.MULTICLUSTER_LABEL}=true"
        )
        names = [s.metadata.name for s in found.items]
        want = artifacts.REMOTE_SECRET_PREFIX + a.peer_name
        check(names == [want], f"cluster-a's remote secrets are {names}, expected [{want}]")
        ((cluster_id, value),) = found.items[0].data.items()
        kubeconfig = yaml.safe_load(b64d(value))
        # Built from the remote secret's kubeconfig alone: nothing else is passed.
        self.remote = await kconfig.new_client_from_config_dict(kubeconfig)
        core, discovery = CoreV1Api(self.remote), DiscoveryV1Api(self.remote)
        pods = Informer("pods", core.list_pod_for_all_namespaces)
        services = Informer("services", core.list_service_for_all_namespaces)
        slices = Informer("endpointslices", discovery.list_endpoint_slice_for_all_namespaces)
        self.informers = [pods, services, slices]
        for informer in self.informers:
            informer.start()
        for informer in self.informers:
            await informer.wait_until(informer.synced.is_set, timeout=WAIT)
        proxy = b.need_proxy()
        try:
            async with asyncio.timeout(WAIT):
                await proxy.wait_until(lambda: proxy.open_watches(a.label) >= len(self.informers))
        except TimeoutError:
            raise StepFailed(
                f"only {proxy.open_watches(a.label)} watches of {a.label} open at "
                f"{b.label}'s api-proxy"
            ) from None
        for resource in ("pods", "services", "endpointslices.discovery.k8s.io"):
            try:
                await asyncio.to_thread(b.store.wait_for_watchers, resource, 1, 5.0)
            except TimeoutError:
                raise StepFailed(
                    f"no watch of {resource} reached {b.label}'s kube-apiserver"
                ) from None
        exported = b.cluster.exported_namespaces()  # what the shipped policy lets a peer see
        b_pods = {
            f"{p['metadata']['namespace']}/{p['metadata']['name']}"
            for p in b.store.list("pods")
            if p["metadata"]["namespace"] in exported
        }
        check(set(pods.cache) == b_pods, "the stand-in's pods differ from cluster-b's")
        check(
            not any(k.startswith(f"{PRIVATE_NAMESPACE}/") for k in pods.cache),
            f"the unexported namespace {PRIVATE_NAMESPACE} is visible to the peer",
        )
        b_services = sum(
            1 for x in b.store.list("services") if x["metadata"]["namespace"] in exported
        )
        check(len(services.cache) == b_services, "the stand-in's services differ from cluster-b's")
        ready = ready_endpoints(slices)
        b_ready = sum(
            1
            for s in b.store.list("endpointslices.discovery.k8s.io")
            if s["metadata"]["namespace"] in exported
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
        )
        check(sum(ready.values()) == b_ready, f"{sum(ready.values())} endpoints, B has {b_ready}")
        server = kubeconfig["clusters"][0]["cluster"]["server"]
        n.say(f"read Secret {ISTIO_NAMESPACE}/{want} from cluster-a (cluster ID {cluster_id})")
        n.say(f"kubernetes_asyncio client built from its kubeconfig alone -> {server}")
        n.say(
            f"informers (LIST then WATCH) through {b.label}'s api-proxy: {len(pods.cache)} pods, "
            f"{len(services.cache)} services, {len(slices.cache)} EndpointSlices"
        )
        n.say(
            f"namespace {PRIVATE_NAMESPACE} is not exported (no apiproxy.io/export label): "
            "none of its pods reached the peer"
        )
        n.say(
            f"endpoints discovered: {sum(ready.values())} ready ("
            + ", ".join(f"{svc} {count}" for svc, count in sorted(ready.items()))
            + ")"
        )
        n.say(
            f"{proxy.open_watches(a.label)} watches of peer {a.label} open at {b.label}'s "
            "api-proxy, each relayed to its kube-apiserver"
        )

    # ------------------------------------------------------------------ 10

    async def step_new_pod(self) -> None:
        n = self.say
        n.begin("A new pod in cluster-b reaches cluster-a's stand-in live")
        b = self.sides()[1]
        pods, _services, slices = self.informers
        seeded = b.cluster.seeded
        assert seeded is not None
        ns, app = "ns-0", "app-0"
        suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))  # noqa: S311
        name = f"{app}-7d4b9c8f6d-{suffix}"
        new_pod = seed_pod(ns, name, app, "node-0", seeded.pods + 100)
        ip = new_pod["status"]["podIP"]
        key = f"{ns}/{name}"
        created = time.perf_counter()
        b.store.create(new_pod)
        await pods.wait_until(lambda: key in pods.cache, timeout=WAIT)
        arrival = pods.arrivals[key]
        check(arrival.kind == "ADDED", f"the pod arrived as {arrival.kind}")
        seen_ip = pods.cache[key].status.pod_ip
        check(seen_ip == ip, f"the stand-in sees IP {seen_ip}, not {ip}")
        n.say(f"created pod {key} (IP {ip}) in {b.label}'s kube-apiserver")
        n.say(
            f"cluster-a's stand-in got ADDED {key} {(arrival.at - created) * 1000:.1f} ms "
            f"after creation, on its open watch through {b.label}'s api-proxy"
        )
        # What the EndpointSlice controller does next: the ready pod joins its Service's slice.
        slice_name = f"{app}-abcde"
        es = b.store.get("endpointslices.discovery.k8s.io", slice_name, ns)
        es["endpoints"].append(
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "name": name, "namespace": ns},
            }
        )
        skey = f"{ns}/{slice_name}"
        before = ready_endpoints(slices)
        updated = time.perf_counter()
        b.store.update(es)

        def has_ip() -> bool:
            obj = slices.cache.get(skey)
            return obj is not None and any(ip in (e.addresses or []) for e in obj.endpoints or [])

        await slices.wait_until(has_ip, timeout=WAIT)
        after = ready_endpoints(slices)
        check(
            after.get(f"{ns}/{app}", 0) == before.get(f"{ns}/{app}", 0) + 1,
            f"{ns}/{app} endpoints went from {before.get(f'{ns}/{app}')} to "
            f"{after.get(f'{ns}/{app}')}",
        )
        n.say(
            f"EndpointSlice {skey} gained {ip}: stand-in got MODIFIED "
            f"{(slices.arrivals[skey].at - updated) * 1000:.1f} ms later; {ns}/{app} now has "
            f"{after[f'{ns}/{app}']} endpoints, {sum(after.values())} in total"
        )

    # ------------------------------------------------------------------ 11

    async def step_secrets_refused(self) -> None:
        n = self.say
        n.begin("The stand-in reads cluster-b's secrets: it sees none; its writes are refused")
        a, b = self.sides()
        assert self.remote is not None
        core = CoreV1Api(self.remote)
        held = len(b.store.list("secrets"))
        # The shipped policy answers secrets with an empty view (istiod's informer syncs and sees
        # nothing); a policy without that rule refuses them (403). Either way nothing is read.
        reads: list[tuple[str, Callable[[], Awaitable[Any]], int]] = [
            ("GET /api/v1/secrets", core.list_secret_for_all_namespaces, 200),
            (
                f"GET /api/v1/namespaces/{APIPROXY_NAMESPACE}/secrets/apiproxy-identity",
                lambda: core.read_namespaced_secret("apiproxy-identity", APIPROXY_NAMESPACE),
                404,
            ),
        ]
        for what, call, hidden in reads:
            try:
                result = await call()
            except ApiException as exc:
                status, reason, message = api_error(exc)
                check(status in (403, hidden), f"{what} answered {status} {reason}")
                n.say(f"{what} -> {status} {reason}: {message}")
                continue
            items = getattr(result, "items", None)
            if items is None or items:
                got = f"{len(items)} secrets" if items is not None else "a secret"
                raise StepFailed(
                    f"{what} was not hidden: the stand-in read {got} of {b.label} "
                    f"(policy {self.opts.policy.name} lets peers read secrets)"
                )
            n.say(f"{what} -> 200, an empty SecretList ({b.label} holds {held} secrets)")
        writes: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            (
                f"DELETE /api/v1/namespaces/{APIPROXY_NAMESPACE}/secrets/apiproxy-identity",
                lambda: core.delete_namespaced_secret("apiproxy-identity", APIPROXY_NAMESPACE),
            ),
            (
                "POST /api/v1/namespaces/default/configmaps",
                lambda: core.create_namespaced_config_map(
                    "default",
                    V1ConfigMap(metadata=V1ObjectMeta(name="planted"), data={"x": "y"}),
                ),
            ),
        ]
        for what, call in writes:
            try:
                await call()
            except ApiException as exc:
                status, reason, message = api_error(exc)
                check(status == 403, f"{what} answered {status} {reason}, expected 403")
                check(
                    reason == "Forbidden" and f'User "peer:{a.label}"' in message,
                    f"{what}: unexpected refusal {message!r}",
                )
                n.say(f"{what} -> {status} {reason}: {message}")
            else:
                raise StepFailed(f"{what} was not refused: the stand-in wrote to {b.label}")

    # ------------------------------------------------------------------ 12

    async def step_audit(self) -> None:
        n = self.say
        n.begin(f"apiproxy audit summarize of {b_label(self)}'s audit log")
        a, b = self.sides()
        for informer in self.informers:
            await informer.stop()
        self.informers = []
        if self.remote is not None:
            await self.remote.close()
            self.remote = None
        proxy = b.need_proxy()
        try:
            async with asyncio.timeout(WAIT):
                await proxy.wait_until(lambda: proxy.open_watches(a.label) == 0)
        except TimeoutError:
            raise StepFailed(f"{proxy.open_watches(a.label)} watches still open") from None
        if proxy.audit is not None:  # the demo always writes one; flush what is queued
            await proxy.audit.flush()
        log_path = b.dir / "audit.log"
        summary = summarize([str(log_path)])
        data = summary.to_dict()
        peer = data["peers"].get(a.label)
        check(peer, f"the audit log has no requests of {a.label}: {sorted(data['peers'])}")
        check(peer["denied"] >= 2, f"{a.label} has {peer['denied']} denied requests, expected 2")
        check(peer["watches"] >= 3, f"{a.label} has {peer['watches']} finished watches")
        check(data["malformed"] == 0, f"{data['malformed']} malformed audit lines")
        n.say(f"$ apiproxy audit summarize {log_path}")
        for line in render_table(summary).rstrip().splitlines():
            n.say(f"  {line}")


def b_label(demo: Demo) -> str:
    return demo.b.label if demo.b is not None else "cluster-b"


def ready_endpoints(slices: Informer) -> dict[str, int]:
    """Ready endpoint addresses per Service (namespace/name), from an EndpointSlice informer."""
    out: dict[str, int] = {}
    for es in slices.cache.values():
        labels = es.metadata.labels or {}
        service = labels.get("kubernetes.io/service-name")
        if not service:
            continue
        key = f"{es.metadata.namespace}/{service}"
        for ep in es.endpoints or []:
            if ep.conditions is not None and ep.conditions.ready:
                out[key] = out.get(key, 0) + len(ep.addresses or [])
    return out


# ---------------------------------------------------------------------- command line


def _parser(prog: str) -> flags.Parser:
    p = flags.Parser(
        prog=prog,
        description="Play the two-cluster story end to end on simulated clusters, narrating "
        "each step; exit 0 only if every step did what it says.",
    )
    p.switch("--verbose", "show the components' logs on stderr (else: components.log in the files)")
    p.switch("--keep", "keep the temporary files (kept anyway when a step fails); print the path")
    p.option(
        "--timeout",
        "overall safety bound",
        default="60s",
        type=flags.duration(minimum=0.001),
        metavar="DURATION",
    )
    p.option(
        "--policy",
        "access policy the api-proxies enforce (default: policies/istio-remote.yaml)",
        type=flags.path(),
        metavar="FILE",
    )
    return p


def main(argv: Sequence[str], prog: str = "apiproxy demo") -> int:
    args = _parser(prog).parse_args(list(argv))
    policy: Path = args.policy or DEFAULT_POLICY
    if not policy.is_file():
        raise UserError(f"--policy: {policy} not found (run from a checkout, or pass --policy)")
    Policy.load(policy)  # a bad policy is one clear line, before anything starts
    applog.configure("auto", "info" if args.verbose else "warning")
    options = Options(verbose=args.verbose, keep=args.keep, timeout=args.timeout, policy=policy)
    return asyncio.run(Demo(options, sys.stdout).run())
