"""The built image, run: both entrypoints in front of a real kube-apiserver, as deploy/ runs them.

The image is what `scripts/image` builds from the project's Dockerfile (reused while the sources
are unchanged). Each container runs under deploy/'s securityContext (tests/deploy/container.py),
with in-cluster configuration as in a pod: KUBERNETES_SERVICE_HOST/PORT and a service account
folder holding a TokenRequest token, the cluster CA and the namespace. Nothing here skips: without
podman, kube-apiserver or the image, the tests fail.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiproxy import pki
from tests.real.cluster import KubeCluster, assets_dir
from tests.real.deploy import provision
from tests.real.proxied import (
    OWN_UUID,
    POLICY,
    SA_NAMESPACE,
    Peers,
    RealProxy,
    bind_policy,
    run_kubectl,
)

from .conftest import BASE
from .container import BUILD_TIMEOUT, Container, built_image, give_to_container_user

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LEASE = "/apis/coordination.k8s.io/v1/namespaces/apiproxy-system/leases/apiproxy-federation"


def holder(kube: KubeCluster) -> str:
    return str((kube.ok("GET", LEASE).get("spec") or {}).get("holderIdentity") or "")


# The first test may build the image (scripts/image, minutes on a fresh machine) when scripts/test
# has not: the bound is the build's, each wait inside has its own.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 300)]


def pod_spec(deployment: str) -> dict[str, Any]:
    doc = yaml.safe_load((BASE / f"{deployment}.yaml").read_text())
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def grace(deployment: str) -> float:
    """terminationGracePeriodSeconds of a deploy/base Deployment: the kubelet's SIGKILL bound."""
    return float(pod_spec(deployment)["terminationGracePeriodSeconds"])


def limits(deployment: str) -> dict[str, str]:
    """The container's CPU and memory limits in deploy/base."""
    (container,) = pod_spec(deployment)["containers"]
    return {
        k: str(v) for k, v in container["resources"]["limits"].items() if k != "ephemeral-storage"
    }


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeCluster]:
    cluster = KubeCluster(assets_dir(), name="image").start()
    try:
        yield cluster
        cluster.check_alive()
    finally:
        cluster.stop()


def service_account_dir(folder: Path, kube: KubeCluster, token: str, namespace: str) -> Path:
    """The projected kube-api-access volume of deploy/ (token, ca.crt, namespace)."""
    folder.mkdir()
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_text(kube.ca.cert_pem)
    (folder / "namespace").write_text(namespace)
    for f in folder.iterdir():
        f.chmod(0o440)
    return folder


def in_cluster_env(kube: KubeCluster) -> dict[str, str]:
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(kube.port)}


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(c: Container, port: int, timeout: float = 60.0) -> float:
    """Seconds from `podman run` to the first 200 from /readyz (the readiness probe's answer).
    A probe polls; so does this, every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if status == 200:
                return time.monotonic() - c.started
        except OSError:
            pass
        assert c.proc.poll() is None, f"container exited:\n{c.log_tail()}"
        assert time.monotonic() < deadline, f"/readyz not 200 in {timeout:.0f}s:\n{c.log_tail()}"
        time.sleep(0.05)


def proc_status(c: Container) -> dict[str, str]:
    """/proc/1/status of the entrypoint, read from inside the container."""
    done = c.exec("python", "-c", "print(open('/proc/1/status').read())")
    assert done.returncode == 0, done.stderr
    return {
        k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in done.stdout.splitlines())
    }


# ----------------------------------------------------------------------------------- contents

INSPECT = r"""
import importlib.util, json, os, sys

def stale(src, pyc):
    data = open(pyc, "rb").read(16)
    if data[:4] != importlib.util.MAGIC_NUMBER:
        return "magic"
    flags = int.from_bytes(data[4:8], "little")
    raw = open(src, "rb").read()
    if flags & 1:  # hash-based
        return None if data[8:16] == importlib.util.source_hash(raw) else "hash"
    st = os.stat(src)
    mtime, size = int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")
    fresh = (mtime, size) == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    return None if fresh else "mtime"

paths = {p for p in sys.path if p and os.path.isdir(p)} | {"/opt/apiproxy"}
roots = sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))
checked, bad = 0, []
for root in roots:
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            src = os.path.join(d, f)
            pyc = importlib.util.cache_from_source(src)
            checked += 1
            why = stale(src, pyc) if os.path.exists(pyc) else "missing"
            if why:
                bad.append(f"{src}: {why}")
elsewhere = []
for d, dirs, files in os.walk("/"):
    if d.startswith(("/proc", "/sys", "/dev")) or any(d.startswith(r) for r in roots):
        dirs[:] = []
        continue
    elsewhere += [os.path.join(d, f) for f in files if f.endswith(".py")]

tools = ("pip", "pip3", "pip3.11", "easy_install", "gcc", "cc", "c++", "g++", "clang", "tcc",
         "ld", "as", "cpp", "make")
dirs = set(os.environ["PATH"].split(":")) | {"/usr/bin", "/bin", "/usr/local/bin", "/sbin",
                                              "/usr/sbin", "/usr/local/sbin"}
print(json.dumps({
    "roots": roots,
    "checked": checked,
    "bad": bad,
    "elsewhere": sorted(elsewhere),
    "tools": sorted(os.path.join(d, t) for d in dirs for t in tools
                    if os.path.lexists(os.path.join(d, t))),
    "modules": [m for m in ("pip", "setuptools", "wheel", "_distutils_hack")
                if importlib.util.find_spec(m) is not None],
    "site": [n for n in os.listdir(next(p for p in sys.path if p.endswith("site-packages")))
             if n.split("-")[0].lower() in ("pip", "setuptools", "wheel", "_distutils_hack")],
    "executable": sys.executable,
}))
"""


def test_the_image_holds_no_installer_no_compiler_and_only_compiled_python(image: str) -> None:
    """The Dockerfile's promises, checked in the built image by its own interpreter: no pip,
    setuptools or wheel importable or installed, no compiler or pip on any bin folder, and every
    .py file on the interpreter's path (stdlib, venv, apiproxy) has bytecode that is valid for it
    (a stale or missing .pyc would be recompiled at every start: the root is read-only)."""
    c = Container.run(image, ["-c", INSPECT], mounts={}, entrypoint="/opt/apiproxy/bin/python")
    try:
        code = c.proc.wait(timeout=120)
    finally:
        c.remove()
    assert code == 0, c.log_tail()
    report: dict[str, Any] = json.loads(c.log[-1])
    assert report["executable"] == "/opt/apiproxy/bin/python"
    assert "/opt/apiproxy" in report["roots"], report["roots"]  # the venv: deps and apiproxy
    assert report["checked"] > 1000, report["checked"]  # stdlib + dependencies + apiproxy
    assert report["bad"] == [], report["bad"][:20]
    assert report["modules"] == [], "importable installers/build tools"
    assert report["site"] == [], "installers in the runtime venv"
    assert report["tools"] == [], "pip or a compiler on a bin folder"
    # .py files off the interpreter's path are not Python that apiproxy runs: in the Debian
    # stand-in base, gdb's pretty-printers for libstdc++, the py3compile helpers of dpkg's
    # maintainer scripts, and /etc/python3.11/sitecustomize.py (run through its compiled link in
    # the stdlib folder). The official base has none.
    for path in report["elsewhere"]:
        assert path.startswith(
            ("/usr/share/gdb/", "/usr/share/gcc/", "/usr/share/python3/", "/etc/python3.11/")
        ), path


# --------------------------------------------------------------------------------- serve


def test_serve_in_the_image_in_front_of_the_real_apiserver(
    image: str, kube: KubeCluster, tmp_path: Path
) -> None:
    """`apiproxy serve` as deploy/ runs it: in-cluster upstream configuration from the projected
    service account folder, TLS and peers and policy from read-only mounts, audit log to a
    mounted volume. A peer (client certificate) lists namespaces with kubectl; SIGTERM ends it
    within the grace period with exit code 0, and the audit record is in the volume."""
    peers = Peers.make()
    mounts: dict[str, Path] = {}
    for name, files in {
        "tls": {"tls.crt": peers.server.cert_pem, "tls.key": peers.server.key_pem},
        "peers": {"peers.yaml": peers.peers_yaml()},
        "policy": {"policy.yaml": POLICY},
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        for fname, text in files.items():
            (folder / fname).write_text(text)
            (folder / fname).chmod(0o440)
        mounts[f"/etc/apiproxy/{name}"] = folder
    bind_policy(
        kube, tmp_path / "policy" / "policy.yaml", "apiproxy:upstream", (SA_NAMESPACE, "api-proxy")
    )
    token = kube.service_account_token(SA_NAMESPACE, "api-proxy")
    mounts[SA_DIR] = service_account_dir(tmp_path / "sa", kube, token, SA_NAMESPACE)
    audit = tmp_path / "audit"
    audit.mkdir()
    mounts["/var/log/apiproxy"] = audit
    give_to_container_user(*mounts.values())

    c = Container.run(
        image,
        [
            "serve",
            "--listen=127.0.0.1:0",
            "--tls-cert=/etc/apiproxy/tls/tls.crt",
            "--tls-key=/etc/apiproxy/tls/tls.key",
            "--peers=/etc/apiproxy/peers/peers.yaml",
            f"--cluster-uuid={OWN_UUID}",
            "--policy=/etc/apiproxy/policy/policy.yaml",
            "--audit-log=/var/log/apiproxy/audit.log",
            "--metrics-listen=127.0.0.1:0",
            "--log-format=json",
        ],
        mounts=mounts,
        writable=frozenset({"/var/log/apiproxy"}),
        env=in_cluster_env(kube),
        limits=limits("api-proxy-deployment"),
    )
    try:
        serving = c.wait_event("serving")
        assert serving["upstream"] == kube.url
        assert serving["upstream_source"] == "in-cluster", serving
        port = int(serving["listen"].rsplit(":", 1)[1])
        ready = wait_ready(c, int(serving["metrics"]))
        print(f"serve: podman run -> /readyz 200 in {ready:.2f}s")

        # The securityContext, as the kernel sees the entrypoint.
        status = proc_status(c)
        assert status["Uid"].split() == [str(65532)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(65532)] * 4, status["Gid"]
        assert int(status["CapEff"], 16) == 0
        assert int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2", "a seccomp filter (the runtime's default profile)"
        write = c.exec("python", "-c", "open('/opt/apiproxy/x', 'w')")
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr, write

        proxy = RealProxy(kube, peers, tmp_path / "peer", port=port)
        (tmp_path / "peer").mkdir()
        kubeconfig = proxy.kubeconfig(tmp_path / "peer" / "kubeconfig")
        listed = run_kubectl(kubeconfig, "get", "namespaces", "-o", "name")
        assert listed.returncode == 0, listed.stderr + "\n" + c.log_tail()
        names = set(listed.stdout.split())
        assert {"namespace/kube-system", f"namespace/{SA_NAMESPACE}"} <= names, names
        # The policy in the mounted ConfigMap folder is the one in force: no Secrets for peers.
        denied = run_kubectl(kubeconfig, "get", "secrets", "-n", "kube-system")
        assert denied.returncode != 0
        assert "Forbidden" in denied.stderr, denied

        code, took = c.terminate(grace("api-proxy-deployment"))
    finally:
        c.remove()
    assert code == 0, c.log_tail()
    print(f"serve: SIGTERM -> exit 0 in {took:.2f}s")
    records = [json.loads(x) for x in (audit / "audit.log").read_text().splitlines() if x]
    assert (audit / "audit.log").stat().st_uid == 65532  # written by the container's user
    lists = [
        r
        for r in records
        if r["user"]["username"] == "peer:cluster-a"
        and r["verb"] == "list"
        and r["requestURI"].startswith("/api/v1/namespaces")
        and r["responseStatus"]["code"] == 200
    ]
    assert lists, records[-5:]


# ------------------------------------------------------------------------------ federate


def test_federate_in_the_image_holds_the_lease_and_exports_public_json(
    image: str, kube: KubeCluster, tmp_path: Path
) -> None:
    """`apiproxy federate` as deploy/ runs it, with the shipped RBAC and Lease: it takes the
    Lease, its exporter answers public.json with this cluster's identity and Istio root, and
    SIGTERM ends it within the grace period with exit code 0, the Lease released."""
    root = pki.make_ca("istio root (image test)")
    provision(kube, root)
    uid = kube.ok("GET", "/api/v1/namespaces/kube-system")["metadata"]["uid"]
    token = kube.service_account_token(SA_NAMESPACE, "apiproxy-federation")
    sa = service_account_dir(tmp_path / "sa", kube, token, SA_NAMESPACE)
    give_to_container_user(sa)
    identity = f"image-{os.getpid()}"
    c = Container.run(
        image,
        [
            "federate",
            "--cluster-domain=cluster.local",
            f"--namespace={SA_NAMESPACE}",
            "--istio-namespace=istio-system",
            "--api-host=127.0.0.1:4443",
            "--exporter-listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            "--leader-elect",
            f"--identity={identity}",
            "--ingress-gateway=192.0.2.1:15443",
            "--log-format=json",
        ],
        mounts={SA_DIR: sa},
        env=in_cluster_env(kube),
        limits=limits("federation-deployment"),
    )
    try:
        started = c.wait_event("federation_started")
        assert started["cluster_uuid"] == uid
        ready = wait_ready(c, int(started["metrics_port"]))
        print(f"federate: podman run -> /readyz 200 in {ready:.2f}s")
        deadline = time.monotonic() + 30
        while holder(kube) != identity:
            assert time.monotonic() < deadline, f"Lease not taken:\n{c.log_tail()}"
            time.sleep(0.1)  # the elector's retry period is 2 s; the Lease is free at once here

        status, body = get(
            f"http://127.0.0.1:{started['exporter_port']}/metadata/public/public.json"
        )
        assert status == 200, body
        doc = json.loads(body)
        assert doc["clusterUUID"] == uid
        assert doc["rootCA"].strip() == root.cert_pem.strip()
        assert doc["authnKeyPub"].startswith("-----BEGIN PUBLIC KEY-----")
        # The identity it created is the one it publishes.
        secret = kube.ok("GET", f"/api/v1/namespaces/{SA_NAMESPACE}/secrets/apiproxy-client-ca")
        ca = base64.b64decode(secret["data"]["ca.crt"]).decode()
        assert doc["apiproxyClientCA"].strip() == ca.strip()

        code, took = c.terminate(grace("federation-deployment"))
    finally:
        c.remove()
    assert code == 0, c.log_tail()
    print(f"federate: SIGTERM -> exit 0 in {took:.2f}s")
    assert holder(kube) == "", c.log_tail()
