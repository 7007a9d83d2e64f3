"""Who the proxy sends its service-account token to: only an upstream that proves, by a certificate
from the configured CA for the host it was asked for, that it is the kube-apiserver.

Each test runs the real proxy over TLS in front of the raw recording upstream, configured the way it
is deployed: flags, a kubeconfig, or the in-cluster service account. An impostor (a certificate from
another CA, or for another host) must see no request at all, not even the readiness probe, so the
token never reaches it.
"""

from __future__ import annotations

import base64
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiproxy import pki, upstream
from apiproxy.server import ProxyServer, ServeConfig
from tests.hardening.conftest import HWorld, Stack, get, parse_responses
from tests.hardening.upstream import RawUpstream
from tests.proxy.conftest import OWN_UUID, Files, make_files

TOKEN = "upstream-token-1"  # what make_files writes to the token file

UpstreamFor = Callable[[RawUpstream, Files], upstream.UpstreamConfig]
Launch = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def launch(hworld: HWorld, tmp_path: Path) -> AsyncIterator[Launch]:
    """A raw upstream serving `cert` and a proxy in front of it, configured by `upstream_for`."""
    started: list[Stack] = []

    async def factory(cert: pki.KeyPair, upstream_for: UpstreamFor, **overrides: Any) -> Stack:
        d = tmp_path / uuid.uuid4().hex[:8]
        d.mkdir()
        up = RawUpstream(cert.cert_pem, cert.key_pem, tempfile.mkdtemp(dir=d))
        await up.start()
        files = make_files(hworld, d)
        cfg = ServeConfig(
            tls_cert=str(files.tls_cert),
            tls_key=str(files.tls_key),
            peers=str(files.peers),
            cluster_uuid=OWN_UUID,
            policy=str(files.policy),
            upstream=upstream_for(up, files),
            audit_log=str(files.audit),
            metrics_listen=("127.0.0.1", 0),
            reload_interval_seconds=0,
            **overrides,
        )
        proxy = ProxyServer(cfg)
        stack = Stack(hworld, d, up, proxy, files)
        started.append(stack)
        await proxy.start()
        return stack

    yield factory
    for s in started:
        await s.proxy.stop()
        await s.up.stop()


def by_flags(up: RawUpstream, files: Files) -> upstream.UpstreamConfig:
    return upstream.from_flags(up.url, str(files.upstream_ca), str(files.token))


async def first_probe(stack: Stack) -> bool:
    await stack.proxy.wait_until(lambda: stack.proxy.upstream_ok is not None)
    assert stack.proxy.upstream_ok is not None
    return stack.proxy.upstream_ok


async def pods_status(stack: Stack) -> int:
    return parse_responses(await stack.raw(get("/api/v1/pods", close=True)))[0].status


def assert_nothing_reached(up: RawUpstream) -> None:
    # The handshake never completed, so neither the probe nor the request (nor the token) arrived.
    assert up.probes == 0
    assert up.requests == []
    assert up.total_connections == 0


async def test_a_trusted_upstream_gets_the_token(launch: Launch, hworld: HWorld) -> None:
    stack = await launch(hworld.server, by_flags)
    assert await first_probe(stack) is True
    assert await pods_status(stack) == 200
    (req,) = stack.up.requests
    assert req.header("Authorization") == [f"Bearer {TOKEN}"]
    assert stack.metric("apiproxy_upstream_tls_verified") == 1


async def test_an_upstream_with_a_certificate_from_another_ca_gets_nothing(
    launch: Launch,
) -> None:
    impostor = pki.server_cert_for_loopback(pki.make_ca("proxy serving CA"))  # same name, other key
    stack = await launch(impostor, by_flags)
    assert await first_probe(stack) is False
    assert await pods_status(stack) == 503
    assert_nothing_reached(stack.up)
    assert stack.metric("apiproxy_upstream_errors_total", kind="connect") == 1


async def test_an_upstream_with_a_certificate_for_another_host_gets_nothing(
    launch: Launch, hworld: HWorld
) -> None:
    # Issued by the trusted CA, but for another name: not 127.0.0.1, which the proxy dialled.
    elsewhere = pki.issue(
        hworld.server_ca, "elsewhere", dns_names=("elsewhere.example",), server=True
    )
    stack = await launch(elsewhere, by_flags)
    assert await first_probe(stack) is False
    assert await pods_status(stack) == 503
    assert_nothing_reached(stack.up)


def kubeconfig(tmp: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }
    path = tmp / f"kubeconfig-{uuid.uuid4().hex[:6]}"
    path.write_text(yaml.safe_dump(doc))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_kubeconfig_tls_server_name_checks_that_name(
    launch: Launch, hworld: HWorld, tmp_path: Path
) -> None:
    elsewhere = pki.issue(
        hworld.server_ca, "elsewhere", dns_names=("elsewhere.example",), server=True
    )

    def via_kubeconfig(name: str) -> UpstreamFor:
        def make(up: RawUpstream, files: Files) -> upstream.UpstreamConfig:
            cluster = {
                "server": up.url,
                "certificate-authority-data": b64(hworld.server_ca.cert_pem),
                "tls-server-name": name,
            }
            return upstream.from_kubeconfig(kubeconfig(tmp_path, cluster, {"token": "kc-token"}))

        return make

    stack = await launch(elsewhere, via_kubeconfig("elsewhere.example"))
    assert await pods_status(stack) == 200
    assert stack.up.requests[0].header("Authorization") == ["Bearer kc-token"]

    stack = await launch(elsewhere, via_kubeconfig("another.example"))
    assert await pods_status(stack) == 503
    assert_nothing_reached(stack.up)


async def test_kubeconfig_insecure_skip_tls_verify_is_honoured_loudly(
    launch: Launch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    impostor = pki.server_cert_for_loopback(pki.make_ca("anyone"))

    def insecure(up: RawUpstream, files: Files) -> upstream.UpstreamConfig:
        cluster = {"server": up.url, "insecure-skip-tls-verify": True}
        return upstream.from_kubeconfig(kubeconfig(tmp_path, cluster, {"token": "kc-token"}))

    stack = await launch(impostor, insecure)
    assert await pods_status(stack) == 200  # as kubectl would: the operator asked for it
    assert stack.metric("apiproxy_upstream_tls_verified") == 0
    err = capsys.readouterr().err
    assert "upstream_tls_verification_disabled" in err
    assert "kc-token" not in err


async def test_in_cluster_service_account_is_the_upstream_identity(
    launch: Launch, hworld: HWorld, tmp_path: Path
) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_text(hworld.server_ca.cert_pem)
    (sa / "token").write_text("sa-token-1\n")

    def in_cluster(up: RawUpstream, files: Files) -> upstream.UpstreamConfig:
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(up.port)}
        return upstream.in_cluster(env, sa_dir=sa)

    stack = await launch(hworld.server, in_cluster)
    assert stack.proxy.upstream.source == "in-cluster"
    assert await pods_status(stack) == 200
    assert stack.up.requests[-1].header("Authorization") == ["Bearer sa-token-1"]
    # The kubelet rotates the projected token: the next reload picks it up.
    (sa / "token").write_text("sa-token-2\n")
    assert ("upstream-token", True) in await stack.proxy.reload_now()
    assert await pods_status(stack) == 200
    assert stack.up.requests[-1].header("Authorization") == ["Bearer sa-token-2"]

    # The same service-account CA does not vouch for a server of another CA.
    impostor = pki.server_cert_for_loopback(pki.make_ca("proxy serving CA"))
    stack = await launch(impostor, in_cluster)
    assert await pods_status(stack) == 503
    assert_nothing_reached(stack.up)
