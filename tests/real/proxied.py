"""`apiproxy serve` in front of the real kube-apiserver, under a real ServiceAccount token that is
bound only to what `apiproxy policy rbac` generates for the policy under test.

The proxy runs as the real CLI in a child process (`python -m apiproxy serve`), listening on port 0;
the bound port is read back from its `serving` log line. Peers authenticate with a client
certificate (cluster-a) or a peer JWT (cluster-b).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from apiproxy import pki, tokens
from apiproxy.policy import cli as policy_cli
from tests.real.cluster import KubeCluster
from tests.tools import KUBECTL

OWN_UUID = "11111111-1111-4111-8111-111111111111"
UUID_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
UUID_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
SA_NAMESPACE = "apiproxy-system"
START_TIMEOUT = 60.0

# The policy the proxy tier runs under: read-only workload discovery cluster-wide, one named
# ConfigMap in one namespace (namespaced + named rule), and API discovery for kubectl.
POLICY = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: workloads
  peers: ["*"]
  apiGroups: [""]
  resources: [pods, podtemplates, services, endpoints, namespaces, nodes]
  verbs: [get, list, watch]
- name: slices
  peers: ["*"]
  apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- name: team-settings
  peers: [cluster-a]
  apiGroups: [""]
  resources: [configmaps]
  namespaces: [team-a]
  resourceNames: [settings]
  verbs: [get, list, watch]
- name: discovery
  peers: ["*"]
  nonResourceURLs: [/api, /api/*, /apis, /apis/*, /version]
  verbs: [get]
"""


@dataclass
class Peers:
    """Two peer clusters sharing one SPIFFE trust domain, as in tests/proxy: a CA and client
    certificate each, and a JWT signing key each."""

    server_ca: pki.KeyPair
    server: pki.KeyPair
    ca_a: pki.KeyPair
    ca_b: pki.KeyPair
    client_a: pki.KeyPair
    key_a: ed25519.Ed25519PrivateKey
    key_b: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls) -> Peers:
        server_ca = pki.make_ca("proxy serving CA")
        ca_a = pki.make_ca("cluster-a client CA")
        return cls(
            server_ca=server_ca,
            server=pki.server_cert_for_loopback(server_ca),
            ca_a=ca_a,
            ca_b=pki.make_ca("cluster-b client CA"),
            client_a=pki.issue(
                ca_a,
                "istiod",
                uris=("spiffe://cluster.local/ns/istio-system/sa/istiod",),
                client=True,
            ),
            key_a=ed25519.Ed25519PrivateKey.generate(),
            key_b=ec.generate_private_key(ec.SECP256R1()),
        )

    def token_b(self) -> str:
        return tokens.mint(
            self.key_b, subject=UUID_B, audience=OWN_UUID, scope="api", ttl_seconds=3600
        )

    def token_a(self) -> str:
        return tokens.mint(
            self.key_a, subject=UUID_A, audience=OWN_UUID, scope="api", ttl_seconds=3600
        )

    def peers_yaml(self) -> str:
        def block(text: str) -> str:
            return "\n".join("      " + line for line in text.strip().splitlines())

        return (
            "peers:\n"
            f"  - name: cluster-a\n    clusterUUID: {UUID_A}\n"
            f"    clientCA: |\n{block(self.ca_a.cert_pem)}\n"
            f"    jwtPublicKey: |\n{block(tokens.public_key_pem(self.key_a))}\n"
            f"  - name: cluster-b\n    clusterUUID: {UUID_B}\n"
            f"    clientCA: |\n{block(self.ca_b.cert_pem)}\n"
            f"    jwtPublicKey: |\n{block(tokens.public_key_pem(self.key_b))}\n"
        )


# ------------------------------------------------------------------------------------------ RBAC


def generated_rbac(
    policy_file: Path, role_name: str, service_account: tuple[str, str]
) -> list[dict[str, Any]]:
    """What `apiproxy policy rbac FILE --name N --service-account NS/SA` prints, parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = policy_cli.main(
            [
                "rbac",
                str(policy_file),
                "--name",
                role_name,
                "--service-account",
                "/".join(service_account),
            ]
        )
    assert code == 0
    return [d for d in yaml.safe_load_all(out.getvalue()) if d]


def cluster_role_binding(role_name: str, service_account: tuple[str, str]) -> dict[str, Any]:
    """deploy/base/api-proxy-clusterrolebinding.yaml, for this role and service account: the
    generator prints the ClusterRole, the deployment binds it."""
    root = Path(__file__).resolve().parents[2]
    doc: dict[str, Any] = yaml.safe_load(
        (root / "deploy" / "base" / "api-proxy-clusterrolebinding.yaml").read_text()
    )
    doc["metadata"] = {"name": role_name}
    doc["roleRef"]["name"] = role_name
    doc["subjects"] = [
        {"kind": "ServiceAccount", "namespace": service_account[0], "name": service_account[1]}
    ]
    return doc


def sa_user(service_account: tuple[str, str]) -> tuple[str, list[str]]:
    ns, name = service_account
    return (
        f"system:serviceaccount:{ns}:{name}",
        ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
    )


def access_review(
    kube: KubeCluster, service_account: tuple[str, str], attrs: dict[str, Any]
) -> bool:
    """SubjectAccessReview as the service account: what the real RBAC authorizer decides."""
    user, groups = sa_user(service_account)
    key = "nonResourceAttributes" if "path" in attrs else "resourceAttributes"
    out = kube.ok(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, key: attrs},
        },
    )
    return bool(out["status"].get("allowed"))


def bind_policy(
    kube: KubeCluster, policy_file: Path, role_name: str, service_account: tuple[str, str]
) -> list[dict[str, Any]]:
    """Apply the generated RBAC (plus the deployment's ClusterRoleBinding) and wait until the
    authorizer's informers have it; returns the generated documents."""
    docs = generated_rbac(policy_file, role_name, service_account)
    for doc in docs:
        if doc["kind"] in ("Role", "RoleBinding"):
            kube.ensure_namespace(doc["metadata"]["namespace"])
        kube.apply(doc)
    kube.apply(cluster_role_binding(role_name, service_account))
    # RBAC is served from informers: a fresh binding takes effect a moment after it is stored.
    # There is no event to await from outside, so poll the authorizer for each grant's first verb.
    deadline = time.monotonic() + 30
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            attrs = first_grant(rule, doc["metadata"].get("namespace", ""))
            while not access_review(kube, service_account, attrs):
                assert time.monotonic() < deadline, f"RBAC never took effect: {attrs}"
                time.sleep(0.1)
    return docs


def first_grant(rule: dict[str, Any], namespace: str) -> dict[str, Any]:
    if "nonResourceURLs" in rule:
        url = rule["nonResourceURLs"][0]
        return {"path": url[:-1] + "x" if url.endswith("*") else url, "verb": rule["verbs"][0]}
    resource, _, sub = rule["resources"][0].partition("/")
    attrs = {
        "group": rule["apiGroups"][0],
        "resource": resource,
        "subresource": sub,
        "verb": rule["verbs"][0],
        "namespace": namespace,
    }
    if rule.get("resourceNames"):
        attrs["name"] = rule["resourceNames"][0]
    return attrs


# ------------------------------------------------------------------------------------ the proxy


def _has_selector(policy_text: str) -> bool:
    from apiproxy.policy import Policy

    rules = Policy.from_text(policy_text).rules
    return any(r.visibility is not None and r.visibility.needs_labels for r in rules)


@dataclass
class RealProxy:
    """`apiproxy serve` as a child process in front of `kube`."""

    kube: KubeCluster
    peers: Peers
    workdir: Path
    policy_text: str = POLICY
    service_account: tuple[str, str] = (SA_NAMESPACE, "api-proxy")
    role_name: str = "apiproxy:upstream"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    upstream_token: str = field(default="", repr=False)
    rbac: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def policy_file(self) -> Path:
        return self.workdir / "policy.yaml"

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "proxy-ca.crt"

    def start(self) -> RealProxy:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        self.policy_file.write_text(self.policy_text)
        (w / "peers.yaml").write_text(self.peers.peers_yaml())
        (w / "tls.crt").write_text(self.peers.server.cert_pem)
        (w / "tls.key").write_text(self.peers.server.key_pem)
        (w / "tls.key").chmod(0o600)
        self.ca_file.write_text(self.peers.server_ca.cert_pem)
        self.rbac = bind_policy(self.kube, self.policy_file, self.role_name, self.service_account)
        self.upstream_token = self.kube.service_account_token(*self.service_account)
        (w / "token").write_text(self.upstream_token + "\n")
        (w / "token").chmod(0o600)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apiproxy",
                "serve",
                "--listen=127.0.0.1:0",
                f"--tls-cert={w / 'tls.crt'}",
                f"--tls-key={w / 'tls.key'}",
                f"--peers={w / 'peers.yaml'}",
                f"--cluster-uuid={OWN_UUID}",
                f"--policy={self.policy_file}",
                f"--upstream={self.kube.url}",
                f"--upstream-ca={self.kube.ca_file}",
                f"--upstream-token-file={w / 'token'}",
                f"--audit-log={self.audit_file}",
                "--log-format=json",
                "--reload-interval-seconds=0.5",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._log: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        needs_namespaces, synced = _has_selector(self.policy_text), False
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"apiproxy serve did not start:\n{self.log_tail()}") from None
            if not line:
                raise AssertionError(f"apiproxy serve exited at start:\n{self.log_tail()}")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "serving":
                    self.port = int(event["listen"].rsplit(":", 1)[1])
                # A policy with a namespace selector is served once the proxy has read the
                # namespaces (until then filtered requests are 503: fail closed).
                synced = synced or event.get("event") == "namespace_view_synced"
                if self.port and (synced or not needs_namespaces):
                    return self

    def _pump(self, lines: queue.Queue[str]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self._log.append(line)
            lines.put(line)
        lines.put("")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self._log[-n:])

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"apiproxy serve exited ({code}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- peer access ----------------------------------------------------------------------------

    def ssl_context(self, *, cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.peers.server_ca.cert_pem)
        if cert:
            c, k = self.client_cert_files()
            ctx.load_cert_chain(c, k)
        return ctx

    def client_cert_files(self) -> tuple[Path, Path]:
        c, k = self.workdir / "client-a.crt", self.workdir / "client-a.key"
        if not c.exists():
            c.write_text(self.peers.client_a.cert_pem)
            k.write_text(self.peers.client_a.key_pem)
            k.chmod(0o600)
        return c, k

    def kubeconfig(self, path: Path, *, peer: str = "cluster-a") -> Path:
        """cluster-a authenticates with its client certificate, cluster-b with a peer JWT."""

        def b64(s: str) -> str:
            return base64.b64encode(s.encode()).decode()

        user: dict[str, str]
        if peer == "cluster-a":
            user = {
                "client-certificate-data": b64(self.peers.client_a.cert_pem),
                "client-key-data": b64(self.peers.client_a.key_pem),
            }
        else:
            user = {"token": self.peers.token_b()}
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "peer",
                            "cluster": {
                                "server": self.url,
                                "certificate-authority-data": b64(self.peers.server_ca.cert_pem),
                            },
                        }
                    ],
                    "users": [{"name": peer, "user": user}],
                    "contexts": [{"name": "peer", "context": {"cluster": "peer", "user": peer}}],
                    "current-context": "peer",
                }
            )
        )
        path.chmod(0o600)
        return path

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        cert: bool = True,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request as a peer (client certificate by default); (status, headers, raw body)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)  # noqa: S310
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(  # noqa: S310
                req, context=self.ssl_context(cert=cert), timeout=30
            ) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers.items()), err.read()

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(x) for x in self.audit_file.read_text().splitlines() if x.strip()]


def run_kubectl(
    kubeconfig: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    kubectl = KUBECTL
    if not os.access(kubectl, os.X_OK):
        kubectl = "kubectl"
    return subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "HOME": str(kubeconfig.parent)},
    )
