"""The real-apiserver tier itself: the binaries, the fixture, kubectl and TokenRequest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.real.cluster import ClusterDied, KubeCluster
from tests.tools import KUBECTL


def test_serves_the_expected_version(kube: KubeCluster, kube_version: tuple[int, int]) -> None:
    info = kube.ok("GET", "/version")
    assert info["gitVersion"].startswith(f"v{kube_version[0]}.{kube_version[1]}.")


def test_kubectl_reads_the_bootstrap_namespaces(kube: KubeCluster) -> None:
    out = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kube.kubeconfig()), "get", "namespaces", "-o", "name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert {"namespace/default", "namespace/kube-system"} <= set(out)


def test_token_request_gives_a_token_the_authorizer_judges(kube: KubeCluster) -> None:
    token = kube.service_account_token("smoke", "reader")
    # Authenticated (not 401) but allowed nothing by RBAC (403): the token is real.
    status, body = kube.request("GET", "/api/v1/namespaces/smoke/pods", token=token)
    assert status == 403, body
    assert 'User "system:serviceaccount:smoke:reader"' in body["message"]
    status, _ = kube.request("GET", "/api/v1/namespaces/smoke/pods", token=token + "x")
    assert status == 401


def test_a_dead_server_fails_loudly(kube_assets: Path) -> None:
    cluster = KubeCluster(kube_assets, name="doomed").start()
    try:
        cluster.check_alive()
        assert cluster._apiserver is not None
        cluster._apiserver.kill()
        cluster._apiserver.wait()
        with pytest.raises(ClusterDied, match="kube-apiserver exited"):
            cluster.check_alive()
    finally:
        cluster.stop()


def test_flags_newer_apiservers_dropped_are_left_out() -> None:
    from tests.real.cluster import version_flags

    assert version_flags((1, 20)) == ["--insecure-port=0", "--logtostderr=true"]
    assert version_flags((1, 24)) == ["--logtostderr=true"]
    assert version_flags((1, 26)) == []
    assert version_flags((1, 32)) == []
