"""Two clusters joined into one mesh on loopback, with real istiods reading each other through
apiproxy.

Each side is what a platform team runs, every part a real process:
- etcd, kube-apiserver (with its own audit log) and kube-controller-manager, whose EndpointSlice
  controller builds the slices istiod reads; no kubelet runs, so `Side.run_pod` plays it through the
  status subresource;
- deploy/base applied; `apiproxy serve` (the CLI) under the shipped policy and the api-proxy
  ServiceAccount's shipped RBAC; `apiproxy federate` (the CLI) under the federation ServiceAccount;
- istiod (`pilot-discovery discovery`) with its own root CA (plugged as `cacerts`), the cluster ID
  and network federation derives for its cluster, reading the local apiserver as admin and the
  peer through the remote secret federation writes.

The kubelet's projection of the `apiproxy-peers` Secret into the proxy's --peers file is played by
a watch thread (`PeersProjection`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from apiproxy import pki
from apiproxy.federation import identity
from tests.real.cluster import KubeCluster
from tests.real.deploy import IMC, provision, ready_node
from tests.tools import built_tool

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "istio-remote.yaml"
DOMAIN = "cluster.local"
PROXY_SA = ("apiproxy-system", "api-proxy")
FED_SA = ("apiproxy-system", "apiproxy-federation")
START_TIMEOUT = 120.0
T = TypeVar("T")


def istiod_binary() -> Path:
    """ISTIOD, else what `scripts/istiod` builds from tools/istiod and caches."""
    return built_tool("ISTIOD", "istiod")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2
) -> tuple[T, float]:
    """Poll `probe` until it returns something truthy; (that value, seconds it took).

    istiod's state is only visible through its debug endpoints, which have no watch: polling
    them, bounded, is the only way to wait for it."""
    start = time.monotonic()
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last seen: {last!r})")
        time.sleep(interval)


def start_clusters(kubes: list[KubeCluster], *, controller_manager: bool = True) -> None:
    """Start the clusters side by side (each takes seconds), with kube-controller-manager;
    the first failure is raised here, on the caller's thread."""
    errors: list[BaseException] = []

    def start(kube: KubeCluster) -> None:
        try:
            kube.start()
            if controller_manager:
                kube.start_controller_manager()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(k,)) for k in kubes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def pod_status(ip: str, ready: bool) -> dict[str, Any]:
    """What a kubelet reports for a running pod: a merge patch for the status subresource."""
    cond = "True" if ready else "False"
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.250.0.1",
            "conditions": [
                {"type": "Ready", "status": cond},
                {"type": "ContainersReady", "status": cond},
            ],
        }
    }


def export_namespace(kube: KubeCluster, namespace: str) -> None:
    """Label a namespace for export: the shipped policy shows peers only those (and
    istio-system)."""
    kube.ensure_namespace(namespace)
    kube.ok(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"apiproxy.io/export": "true"}}},
        content_type="application/merge-patch+json",
    )


def _free_port() -> int:
    # istiod and the proxies' peers take explicit ports; a lost race fails the start loudly.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """A child process whose stderr+stdout go to a log file and, line by line, to a queue."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    lines: queue.Queue[str] = field(default_factory=queue.Queue, repr=False)

    def start(self) -> Child:
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )
        threading.Thread(target=self._pump, name=f"{self.name}-log", daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                out.flush()
                self.lines.put(raw.decode(errors="replace"))
        self.lines.put("")

    def wait_json(self, event: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The first JSON log line with this event name, as the process writes it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {event!r} in {timeout:.0f}s") from None
            if not line:
                raise AssertionError(f"{self.name} exited before {event!r}:\n{self.tail()}")
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == event:
                    return doc

    def tail(self, n: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"{self.name} exited ({code}):\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class PeersProjection:
    """The kubelet's part: copy Secret apiproxy-peers into the proxy's --peers file whenever it
    changes, through a watch on that one Secret. The proxy's reload interval does the rest."""

    def __init__(self, kube: KubeCluster, path: Path) -> None:
        self.kube, self.path = kube, path
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peers-projection", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        import base64

        url = (
            f"{self.kube.url}/api/v1/namespaces/apiproxy-system/secrets"
            "?watch=1&fieldSelector=metadata.name%3Dapiproxy-peers&timeoutSeconds=5"
        )
        while not self.stopped.is_set():
            req = urllib.request.Request(url)  # noqa: S310 - loopback
            req.add_header("Authorization", f"Bearer {self.kube.admin_token}")
            try:
                with urllib.request.urlopen(  # noqa: S310
                    req, context=self.kube.ssl_context(), timeout=30
                ) as resp:
                    for line in resp:
                        if self.stopped.is_set():
                            return
                        ev = json.loads(line)
                        if ev.get("type") not in ("ADDED", "MODIFIED"):
                            continue
                        data = ev["object"].get("data") or {}
                        text = base64.b64decode(data.get("peers.yaml", "")).decode()
                        if text and (not self.path.exists() or self.path.read_text() != text):
                            tmp = self.path.with_suffix(".tmp")
                            tmp.write_text(text)
                            os.replace(tmp, self.path)
            except (OSError, ValueError, urllib.error.URLError):
                if self.stopped.wait(0.5):
                    return


@dataclass
class Istiod:
    """pilot-discovery as a plain process: own working folder, plugged root CA, debug on a
    loopback HTTP port (no auth from loopback), every other listener off."""

    binary: Path
    workdir: Path
    kubeconfig: Path
    cluster_id: str
    root: pki.KeyPair
    # istiod's own namespace: where it reads remote secrets and its mesh ConfigMap.
    namespace: str = "istio-system"
    # More environment for pilot-discovery (e.g. PILOT_REMOTE_CLUSTER_TIMEOUT).
    extra_env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    child: Child | None = None

    def start(self) -> Istiod:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cacerts = self.workdir / "etc" / "cacerts"
        cacerts.mkdir(parents=True, exist_ok=True)
        # A self-signed root plugged as istiod's CA: ca-cert is the root itself.
        for name, text in (
            ("ca-cert.pem", self.root.cert_pem),
            ("ca-key.pem", self.root.key_pem),
            ("root-cert.pem", self.root.cert_pem),
            ("cert-chain.pem", self.root.cert_pem),
        ):
            (cacerts / name).write_text(text)
        (cacerts / "ca-key.pem").chmod(0o600)
        self.http_port = _free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "POD_NAMESPACE": self.namespace,
            "POD_NAME": f"istiod-{self.cluster_id}",
            # No sidecar injection or webhooks here: nothing to inject into, nothing to patch.
            "INJECT_ENABLED": "false",
            "INJECTION_WEBHOOK_CONFIG_NAME": "",
            "VALIDATION_WEBHOOK_CONFIG_NAME": "",
            "GOMAXPROCS": "2",
            # Everything else at istiod's defaults (Gateway API on: no CRDs, so nothing starts).
            **self.extra_env,
        }
        argv = [
            str(self.binary),
            "discovery",
            f"--kubeconfig={self.kubeconfig}",
            f"--clusterID={self.cluster_id}",
            f"--domain={DOMAIN}",
            f"--httpAddr=127.0.0.1:{self.http_port}",
            "--grpcAddr=",
            "--secureGRPCAddr=",
            "--monitoringAddr=",
            "--httpsAddr=",
            f"--ctrlz_port={_free_port()}",
            "--ctrlz_address=127.0.0.1",
            "--log_output_level=default:info",
        ]
        log = self.workdir / "istiod.log"
        self.child = Child(f"istiod-{self.cluster_id}", argv, log, env=env, cwd=self.workdir)
        self.child.start()
        wait_until(lambda: self._ready(), START_TIMEOUT, f"istiod {self.cluster_id} /ready")
        return self

    def _ready(self) -> bool:
        assert self.child is not None
        self.child.check_alive()
        try:
            status, _ = self.get("/ready")
        except OSError:
            return False
        return status == 200

    def get(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def debug(self, name: str) -> Any:
        status, out = self.get(f"/debug/{name}")
        assert status == 200, (name, status, out)
        return out

    def clusters(self) -> dict[str, str]:
        """/debug/clusterz: cluster ID -> sync status (`synced`, `syncing`, `timeout`, ...)."""
        return {c["id"]: c["syncStatus"] for c in self.debug("clusterz") or []}

    def endpoints(self, host: str, namespace: str, cluster_id: str) -> list[dict[str, Any]]:
        """The endpoints istiod holds for one Service from one cluster (/debug/endpointShardz)."""
        shards = (self.debug("endpointShardz") or {}).get(host, {}).get(namespace, {})
        return list((shards.get("Shards") or {}).get(f"Kubernetes/{cluster_id}") or [])

    def ready_ips(self, host: str, namespace: str, cluster_id: str) -> set[str]:
        """Addresses of the healthy endpoints (HealthStatus 1) istiod holds for that Service."""
        out = set()
        for ep in self.endpoints(host, namespace, cluster_id):
            if ep.get("HealthStatus", 1) == 1:
                out.update(ep.get("Addresses") or [])
        return out

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def check_alive(self) -> None:
        assert self.child is not None
        self.child.check_alive()


@dataclass
class Side:
    """One cluster of the mesh and everything running for it."""

    name: str
    kube: KubeCluster
    workdir: Path
    tls: pki.KeyPair  # serving certificate of the proxy and the exporter
    root: pki.KeyPair  # this cluster's Istio root CA
    credential_ttl: str = "24h"
    uuid: str = ""
    cluster_id: str = ""
    network: str = ""
    gateway: str = ""
    proxy: Child | None = None
    proxy_port: int = 0
    metrics_port: int = 0
    federate: Child | None = None
    exporter_port: int = 0
    istiod: Istiod | None = None
    projection: PeersProjection | None = None

    @property
    def peers_file(self) -> Path:
        return self.workdir / "peers.yaml"

    @property
    def audit_file(self) -> Path:
        return self.workdir / "proxy-audit.log"

    def prepare(self, gateway_ip: str) -> None:
        """deploy/base, istio-system as Istio would leave it, and the proxy's files."""
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        provision(self.kube, self.root)
        self.uuid = str(self.kube.ok("GET", "/api/v1/namespaces/kube-system")["metadata"]["uid"])
        self.cluster_id = identity.cluster_id(DOMAIN, self.uuid)
        self.network = identity.network_name(self.cluster_id)
        self.gateway = f"{gateway_ip}:15443"
        # istiod's own network: the system namespace's label (pod label > namespace label).
        self.kube.ok(
            "PATCH",
            "/api/v1/namespaces/istio-system",
            {"metadata": {"labels": {"topology.istio.io/network": self.network}}},
            content_type="application/merge-patch+json",
        )
        ready_node(self.kube, "node-1", "10.250.0.1")
        (w / "tls.crt").write_text(self.tls.cert_pem)
        (w / "tls.key").write_text(self.tls.key_pem)
        (w / "tls.key").chmod(0o600)
        if not self.peers_file.exists():
            self.peers_file.write_text("peers: []\n")
        self.kube.kubeconfig(
            w / "federation.kubeconfig", token=self.kube.service_account_token(*FED_SA)
        )
        self.kube.kubeconfig(w / "admin.kubeconfig")

    def start_proxy(self, port: int = 0) -> None:
        w = self.workdir
        # A fresh token each start, as the kubelet would project it.
        (w / "token").write_text(self.kube.service_account_token(*PROXY_SA) + "\n")
        (w / "token").chmod(0o600)
        self.proxy = Child(
            f"serve-{self.name}",
            [
                sys.executable,
                "-m",
                "apiproxy",
                "serve",
                f"--listen=127.0.0.1:{port}",
                f"--tls-cert={w / 'tls.crt'}",
                f"--tls-key={w / 'tls.key'}",
                f"--peers={self.peers_file}",
                f"--cluster-uuid={self.uuid}",
                f"--policy={w / 'policy.yaml'}",
                f"--upstream={self.kube.url}",
                f"--upstream-ca={self.kube.ca_file}",
                f"--upstream-token-file={w / 'token'}",
                f"--audit-log={self.audit_file}",
                "--metrics-listen=127.0.0.1:0",
                "--log-format=json",
                "--reload-interval-seconds=0.5",
            ],
            w / "serve.log",
        )
        if not (w / "policy.yaml").exists():
            shutil.copy(POLICY, w / "policy.yaml")
        self.proxy.start()
        serving = self.proxy.wait_json("serving")
        self.proxy_port = int(serving["listen"].rsplit(":", 1)[1])
        self.metrics_port = int(serving["metrics"])

    def start_federate(self) -> None:
        w = self.workdir
        self.federate = Child(
            f"federate-{self.name}",
            [
                sys.executable,
                "-m",
                "apiproxy",
                "federate",
                f"--kubeconfig={w / 'federation.kubeconfig'}",
                f"--cluster-domain={DOMAIN}",
                f"--api-host=127.0.0.1:{self.proxy_port}",
                "--exporter-listen=127.0.0.1:0",
                f"--exporter-tls-cert={w / 'tls.crt'}",
                f"--exporter-tls-key={w / 'tls.key'}",
                f"--ingress-gateway={self.gateway}",
                f"--credential-ttl={self.credential_ttl}",
                "--resync-interval=2s",
                f"--identity=federate-{self.name}",
                "--log-format=json",
            ],
            w / "federate.log",
        ).start()
        started = self.federate.wait_json("federation_started")
        assert started["cluster_id"] == self.cluster_id, started
        self.exporter_port = int(started["exporter_port"])
        self.projection = PeersProjection(self.kube, self.peers_file)
        self.projection.start()

    def start_istiod(self, binary: Path) -> None:
        self.istiod = Istiod(
            binary,
            self.workdir / "istiod",
            self.workdir / "admin.kubeconfig",
            self.cluster_id,
            self.root,
        ).start()

    @property
    def exporter_url(self) -> str:
        return f"https://127.0.0.1:{self.exporter_port}/metadata"

    def join(self, peer: Side, name: str, ca_pem: str) -> None:
        """The operator's one step: an IstioMulticluster pointing at the peer's exporter."""
        self.kube.apply(
            {
                "apiVersion": "deckhouse.io/v1alpha1",
                "kind": "IstioMulticluster",
                "metadata": {"name": name},
                "spec": {"metadataEndpoint": peer.exporter_url, "metadata": {"ca": ca_pem}},
            }
        )

    def leave(self, name: str) -> None:
        self.kube.ok("DELETE", f"{IMC}/{name}")

    # -- workloads (this test plays the kubelet) -------------------------------------------------

    def service(self, namespace: str, name: str, app: str, *, export: bool = True) -> None:
        """A Service in `namespace`, exported to peers (labelled apiproxy.io/export=true, which
        the shipped policy requires) unless `export` is False."""
        self.kube.ensure_namespace(namespace)
        if export:
            export_namespace(self.kube, namespace)
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "selector": {"app": app},
                    # A named targetPort: istiod resolves it from the pods' container ports.
                    "ports": [{"name": "http", "port": 80, "targetPort": "web"}],
                },
            }
        )

    def run_pod(self, namespace: str, name: str, app: str, ip: str, *, ready: bool = True) -> None:
        """Create a pod on node-1 and report it Running with `ip`, Ready or not."""
        pods = f"/api/v1/namespaces/{namespace}/pods"
        status, _ = self.kube.request("GET", f"{pods}/{name}")
        if status == 404:
            self.kube.ok(
                "POST",
                pods,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": {"app": app}},
                    "spec": {
                        "nodeName": "node-1",
                        "serviceAccountName": "default",
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "app",
                                "image": "app",
                                "ports": [{"name": "web", "containerPort": 8080}],
                            }
                        ],
                    },
                },
            )
        self.set_ready(namespace, name, ip, ready)

    def set_ready(self, namespace: str, name: str, ip: str, ready: bool) -> None:
        self.kube.ok(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            pod_status(ip, ready),
            content_type="application/merge-patch+json",
        )

    def delete_pod(self, namespace: str, name: str) -> None:
        # No kubelet confirms termination: delete at once, as a force delete does.
        self.kube.ok(
            "DELETE",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0},
        )

    # -- what the peer's istiod did here --------------------------------------------------------

    def proxy_audit(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        text = self.audit_file.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def mesh_config(self) -> dict[str, Any]:
        cm = self.kube.ok("GET", "/api/v1/namespaces/istio-system/configmaps/istio")
        return dict(yaml.safe_load(cm["data"]["mesh"]) or {})

    def check_alive(self) -> None:
        self.kube.check_alive()
        for child in (self.proxy, self.federate):
            if child is not None:
                child.check_alive()
        if self.istiod is not None:
            self.istiod.check_alive()

    def stop(self) -> None:
        if self.projection is not None:
            self.projection.stop()
        if self.istiod is not None:
            self.istiod.stop()
        for child in (self.federate, self.proxy):
            if child is not None:
                child.stop()


def ssl_context_for(ca: pki.KeyPair) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.cert_pem)
