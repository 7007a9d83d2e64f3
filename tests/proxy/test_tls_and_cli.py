"""Hot swap of the serving certificate and peer anchors over real TLS; the command line."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest

from apiproxy import cli, pki, tokens
from apiproxy.errors import UserError
from apiproxy.serve_cli import build_parser, config_from_args
from tests.proxy.conftest import (
    OWN_UUID,
    ProxyFactory,
    Recorder,
    World,
    make_files,
)
from tests.proxy.serving import serve_process


async def get_status(ctx: ssl.SSLContext, url: str) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(url) as resp,
    ):
        return resp.status


async def test_serving_certificate_swap_applies_to_new_handshakes_and_keeps_watches(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    new_ca = pki.make_ca("rotated serving CA")
    new_cert = pki.server_cert_for_loopback(new_ca)
    old_ctx = world.client_ssl(world.client_a, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old_ctx)) as s:
        watch = await s.get(proxy.url + "/api/v1/pods?watch=1")
        assert watch.status == 200
        # a half-written pair (new cert, old key) is refused and the old pair stays
        files.tls_cert.write_text(new_cert.cert_pem)
        assert await proxy.reload_now() == [("tls", False)]
        assert (
            await get_status(world.client_ssl(world.client_a, tmp_path), proxy.url + "/api") == 200
        )
        files.tls_key.write_text(new_cert.key_pem)
        assert await proxy.reload_now() == [("tls", True)]
        # the open watch, on the old certificate, keeps streaming
        recorder.events.put_nowait(b'{"type":"ADDED"}\n')
        assert await asyncio.wait_for(watch.content.readline(), 10) == b'{"type":"ADDED"}\n'
        watch.close()
    new_ctx = ssl.create_default_context(cadata=new_ca.cert_pem)
    new_ctx.load_cert_chain(*_cert_files(world.client_a, tmp_path))
    assert await get_status(new_ctx, proxy.url + "/api/v1/pods") == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get_status(world.client_ssl(world.client_a, tmp_path), proxy.url + "/api/v1/pods")


def _cert_files(kp: pki.KeyPair, tmp: Path) -> tuple[Path, Path]:
    c, k = tmp / "c-extra.crt", tmp / "c-extra.key"
    c.write_text(kp.cert_pem)
    k.write_text(kp.key_pem)
    return c, k


async def test_peers_reload_rebuilds_trust_at_the_tls_layer(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    files = make_files(world, tmp_path)
    files.peers.write_text(world.peers_yaml(with_b=False))
    proxy, _ = await make_proxy(recorder.url, files=files)
    ctx_b = world.client_ssl(world.client_b, tmp_path)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
        await get_status(ctx_b, proxy.url + "/api/v1/pods")
    files.peers.write_text(world.peers_yaml(with_b=True))
    assert await proxy.reload_now() == [("peers", True)]
    assert await get_status(world.client_ssl(world.client_b, tmp_path), proxy.url + "/api") == 200
    # an invalid peers file keeps the peers in force
    files.peers.write_text("peers: [{name: x}]\n")
    assert await proxy.reload_now() == [("peers", False)]
    assert await get_status(world.client_ssl(world.client_b, tmp_path), proxy.url + "/api") == 200


def test_flags_and_environment(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_files(world, tmp_path)
    monkeypatch.setenv("APIPROXY_CLUSTER_UUID", OWN_UUID)
    monkeypatch.setenv("APIPROXY_MAX_WATCH_SECONDS", "600")
    ns = build_parser("apiproxy serve").parse_args(
        [
            "--listen=127.0.0.1:0",
            f"--tls-cert={files.tls_cert}",
            f"--tls-key={files.tls_key}",
            f"--peers={files.peers}",
            f"--policy={files.policy}",
            "--upstream=https://127.0.0.1:6443",
            f"--upstream-ca={files.upstream_ca}",
            f"--upstream-token-file={files.token}",
            "--metrics-listen=127.0.0.1:9090",
        ]
    )
    cfg = config_from_args(ns)
    assert cfg.cluster_uuid == OWN_UUID
    assert cfg.max_watch_seconds == 600
    assert cfg.metrics_listen == ("127.0.0.1", 9090)
    assert cfg.upstream.token is not None
    assert cfg.upstream.token.get() == "upstream-token-1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--tls-cert is required (or set APIPROXY_TLS_CERT)"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["+files", "--cluster-uuid", "x"], "--cluster-uuid: 'x' is not a canonical UUID"),
        (["+files", "--listen", "nope"], "--listen: 'nope' must be HOST:PORT"),
        (["+files", "--kubeconfig", "/nonexistent"], "--kubeconfig: /nonexistent: no such file"),
        (["+files", "--kubeconfig", "+peers"], "--upstream and --kubeconfig are mutually"),
        (["+files", "--log-level", "loud"], "--log-level: 'loud' must be one of debug"),
        (["+files", "--max-watch-seconds", "abc"], "--max-watch-seconds: 'abc' is not a number"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    files = make_files(world, tmp_path)
    if args and args[0] == "+files":
        args = [
            f"--tls-cert={files.tls_cert}",
            f"--tls-key={files.tls_key}",
            f"--peers={files.peers}",
            f"--policy={files.policy}",
            f"--cluster-uuid={OWN_UUID}",
            "--upstream=https://127.0.0.1:1/",
            *(str(files.peers) if a == "+peers" else a for a in args[1:]),
        ]
    assert cli.main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("apiproxy serve: error: ")
    assert message in err
    assert "\n" not in err.split("apiproxy serve: error: ", 1)[1]


def test_bad_files_are_refused_before_serving(world: World, tmp_path: Path) -> None:
    files = make_files(world, tmp_path)
    files.peers.write_text("peers:\n  - name: a\n")
    ns = build_parser("p").parse_args(
        [
            f"--tls-cert={files.tls_cert}",
            f"--tls-key={files.tls_key}",
            f"--peers={files.peers}",
            f"--policy={files.policy}",
            f"--cluster-uuid={OWN_UUID}",
            f"--upstream={'https://127.0.0.1:1'}",
        ]
    )
    from apiproxy.server import ProxyServer

    with pytest.raises(UserError, match=r"peers\.yaml: peers\[0\]\.clusterUUID: required"):
        ProxyServer(config_from_args(ns))


async def test_serve_process_answers_and_exits_cleanly_on_sigterm(
    world: World, recorder: Recorder, tmp_path: Path
) -> None:
    async with serve_process(world, recorder.url, tmp_path) as served:
        ctx = world.client_ssl(None, tmp_path)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            token = tokens.mint(
                world.key_a,
                subject="aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
                audience=OWN_UUID,
                scope="api",
                ttl_seconds=60,
            )
            async with s.get(
                f"https://127.0.0.1:{served.port}/api/v1/pods",
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 200
        served.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(served.proc.wait(), 30)
        await served.wait(lambda: served.find("stopped"))
    assert code == 0
    assert not any(token.encode() in line for line in served.lines)
