"""A real etcd + kube-apiserver pair on loopback, envtest-style.

The binaries come from KUBEBUILDER_ASSETS, or from `scripts/kube-assets`, which builds the pinned
Kubernetes release (tools/kube) and etcd (tools/etcd) from Go modules once and caches them.
Nothing here skips: a missing binary, a server that does not come up, or one that died while the
suite used it fails the run loudly.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apiproxy import pki
from tests.tools import built_tool

START_TIMEOUT = 90.0
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterDied(AssertionError):
    """The real apiserver or etcd exited while a test depended on it."""


def assets_dir() -> Path:
    """Where kube-apiserver and etcd are: KUBEBUILDER_ASSETS, else the project's cached build."""
    path = built_tool("KUBEBUILDER_ASSETS", "kube-assets")
    for name in ("kube-apiserver", "etcd"):
        if not os.access(path / name, os.X_OK):
            raise AssertionError(f"{path} has no executable {name} (KUBEBUILDER_ASSETS)")
    return path


def server_version(assets: Path) -> tuple[int, int]:
    out = subprocess.run(
        [str(assets / "kube-apiserver"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "Kubernetes v1.20.2" (possibly with a +suffix)
    major, minor = out.split()[-1].lstrip("v").split(".")[:2]
    return int(major), int(minor.rstrip("+"))


def version_flags(version: tuple[int, int]) -> list[str]:
    """Flags only some versions know: 1.24 removed --insecure-port (the insecure port is gone),
    1.26 removed --logtostderr (stderr is the default from then on)."""
    flags = []
    if version < (1, 24):
        flags.append("--insecure-port=0")
    if version < (1, 26):
        flags.append("--logtostderr=true")
    return flags


def _free_port() -> int:
    # etcd and kube-apiserver take explicit ports; a lost race shows as a failed start and is
    # retried with fresh ports by KubeCluster.start.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KubeCluster:
    """One etcd and one kube-apiserver, each a child process, state in a private folder."""

    assets: Path
    name: str = "real"
    extra_args: list[str] = field(default_factory=list)
    # Write the apiserver's own audit log (audit.log, every request at Metadata level): what a
    # peer's requests really cost upstream, seen from the server.
    audit: bool = False
    workdir: Path = field(init=False)
    port: int = 0
    etcd_port: int = 0
    admin_token: str = field(init=False, repr=False)
    ca: pki.KeyPair = field(init=False, repr=False)
    _etcd: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _apiserver: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _kcm: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KubeCluster:
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"apiproxy-{self.name}-", dir=base))
        self.admin_token = secrets.token_urlsafe(32)
        self.ca = pki.make_ca(f"{self.name} apiserver CA")
        self._write_credentials()
        last: Exception | None = None
        for _ in range(3):
            try:
                self._start_etcd()
                self._start_apiserver()
                self._wait_ready()
                return self
            except _PortTaken as exc:
                last = exc
                self._stop_processes()
        raise AssertionError(f"{self.name}: could not start after 3 tries: {last}")

    def stop(self) -> None:
        self._stop_processes()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Fail loudly if either process has exited (e.g. a runtime crash mid-suite)."""
        procs = [
            (self._etcd, "etcd", "etcd.log"),
            (self._apiserver, "kube-apiserver", "apiserver.log"),
        ]
        if self._kcm is not None:
            procs.append((self._kcm, "kube-controller-manager", "controller-manager.log"))
        for proc, what, log in procs:
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ClusterDied(f"{self.name}: {what} exited ({code}):\n{self.log_tail(log)}")

    def log_tail(self, name: str = "apiserver.log", lines: int = 60) -> str:
        path = self.workdir / name
        if not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(line.replace(self.admin_token, "<redacted>") for line in text)

    # -- access ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.cert_pem)

    def kubeconfig(self, path: Path | None = None, token: str | None = None) -> Path:
        """A kubeconfig for this server with a bearer token (the admin's by default)."""
        path = path or self.workdir / "admin.kubeconfig"
        data = base64.b64encode(self.ca.cert_pem.encode()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {"server": self.url, "certificate-authority-data": data},
                }
            ],
            "users": [{"name": "user", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "user"}}],
            "current-context": self.name,
        }
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP request as admin (or `token`); returns (status, decoded JSON or text)."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:  # noqa: S310
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, out = self.request(method, path, body, **kw)
        if status >= 300:
            raise AssertionError(f"{method} {path} -> {status}: {out}")
        return out

    def apply(self, manifest: dict[str, Any]) -> Any:
        """Create an object (or replace it if it exists) through the REST API."""
        path = _collection_path(manifest)
        status, out = self.request("POST", path, manifest)
        if status == 409:
            name = manifest["metadata"]["name"]
            current = self.ok("GET", f"{path}/{name}")
            manifest = dict(manifest)
            manifest["metadata"] = dict(manifest["metadata"])
            manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self.ok("PUT", f"{path}/{name}", manifest)
        if status >= 300:
            raise AssertionError(f"POST {path} -> {status}: {out}")
        return out

    def service_account_token(
        self, namespace: str, name: str, *, audiences: list[str] | None = None, seconds: int = 3600
    ) -> str:
        """A real bound token from the TokenRequest API; creates the ServiceAccount if need be."""
        self.ensure_namespace(namespace)
        self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = audiences
        out = self.ok(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(out["status"]["token"])

    def ensure_namespace(self, name: str) -> None:
        status, out = self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        if status not in (201, 409):
            raise AssertionError(f"create namespace {name} -> {status}: {out}")

    def start_controller_manager(self, controllers: str = "endpointslice") -> None:
        """kube-controller-manager running only `controllers` (EndpointSlices, by default, come
        from the real controller). No kubelet runs, so the node lifecycle and pod GC controllers
        stay off: they would mark the test's pods NotReady or delete them."""
        kubeconfig = self.kubeconfig(self.workdir / "controller-manager.kubeconfig")
        self._kcm = self._spawn(
            "controller-manager.log",
            str(self.assets / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--controllers={controllers}",
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=false",
            "--v=1",
        )

    def audit_records(self) -> list[dict[str, Any]]:
        """The apiserver's audit log (`audit=True`), one dict per event."""
        assert self.audit, "this cluster was started without audit=True"
        path = self.workdir / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- internals ------------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        w = self.workdir
        (w / "ca.crt").write_text(self.ca.cert_pem)
        serving = pki.server_cert_for_loopback(self.ca)
        (w / "serving.crt").write_text(serving.cert_pem)
        (w / "serving.key").write_text(serving.key_pem)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (w / "sa.key").write_bytes(
            sa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (w / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (w / "tokens.csv").write_text(f'{self.admin_token},admin,admin-uid,"system:masters"\n')
        for name in ("serving.key", "sa.key", "tokens.csv"):
            (w / name).chmod(0o600)

    def _start_etcd(self) -> None:
        self.etcd_port, peer_port = _free_port(), _free_port()
        data = self.workdir / f"etcd-{self.etcd_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._etcd = self._spawn(
            "etcd.log",
            str(self.assets / "etcd"),
            f"--name={self.name}",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--log-level=warn",
        )

    def _start_apiserver(self) -> None:
        self.port = _free_port()
        w = self.workdir
        self._apiserver = self._spawn(
            "apiserver.log",
            str(self.assets / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--etcd-prefix=/{self.name}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # Nothing routes to the `kubernetes` Service here, and from 1.37 the endpoint
            # reconciler refuses a loopback advertise address.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            *version_flags(server_version(self.assets)),
            f"--cert-dir={w}",
            f"--tls-cert-file={w / 'serving.crt'}",
            f"--tls-private-key-file={w / 'serving.key'}",
            f"--client-ca-file={w / 'ca.crt'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # No controller manager runs: nothing would create the token Secrets that the
            # ServiceAccount admission plugin insists on for pods.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=false",
            "--profiling=false",
            "--v=1",
            *self._audit_flags(),
            *self.extra_args,
        )

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
            "omitStages: [RequestReceived]\nrules:\n- level: Metadata\n"
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.workdir / 'audit.log'}",
            "--audit-log-mode=blocking",
            "--audit-log-format=json",
        ]

    def _spawn(self, log: str, *argv: str) -> subprocess.Popen[bytes]:
        out = (self.workdir / log).open("ab")
        try:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            out.close()

    def _wait_ready(self) -> None:
        # A child process has no readiness event to await; poll /readyz as envtest does.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for proc, log in ((self._etcd, "etcd.log"), (self._apiserver, "apiserver.log")):
                if proc is not None and proc.poll() is not None:
                    tail = self.log_tail(log)
                    if "address already in use" in tail:
                        raise _PortTaken(tail.splitlines()[-1])
                    raise AssertionError(f"{self.name}: {log} process exited:\n{tail}")
            try:
                status, _ = self.request("GET", "/readyz")
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: kube-apiserver not ready in {START_TIMEOUT:.0f}s:\n"
                    + self.log_tail()
                )
            time.sleep(0.2)

    def _stop_processes(self) -> None:
        for proc in (self._kcm, self._apiserver, self._etcd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._kcm = self._apiserver = self._etcd = None


class _PortTaken(Exception):
    pass


def _collection_path(manifest: dict[str, Any]) -> str:
    api_version = manifest["apiVersion"]
    kind = manifest["kind"]
    namespace = manifest.get("metadata", {}).get("namespace")
    plural = _PLURALS.get(kind) or kind.lower() + "s"
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespace:
        return f"{base}/namespaces/{namespace}/{plural}"
    return f"{base}/{plural}"


_PLURALS = {
    "Endpoints": "endpoints",
    "CustomResourceDefinition": "customresourcedefinitions",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Ingress": "ingresses",
    "NetworkPolicy": "networkpolicies",
    "IstioMulticluster": "istiomulticlusters",
    "EndpointSlice": "endpointslices",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Lease": "leases",
}
