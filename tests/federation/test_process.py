"""`/readyz` of `apiproxy federate`, in process and as a real `python -m apiproxy federate`
subprocess against a simulated cluster."""

from __future__ import annotations

import base64
import json

import aiohttp

from apiproxy.federation import identity
from tests.federation.conftest import eventually
from tests.federation.process import Federate


async def _get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.text()


async def test_readyz_follows_the_kube_api(clusters):
    a = await clusters("a")
    fed = await a.federation(metrics_listen="127.0.0.1:0", api_ready_window=0.3)
    url = f"http://127.0.0.1:{fed.metrics_port}/readyz"
    status, body = await _get(url)
    assert status == 200, body
    assert "[+]identity ok" in body
    assert f"[+]exporter ok: port {fed.exporter_port}" in body
    assert "[+]kube-api ok" in body
    assert "[+]leader-election ok: disabled" in body
    assert (await _get(f"http://127.0.0.1:{fed.metrics_port}/healthz"))[0] == 200

    # The API stops answering: once the last answer is older than the window, /readyz asks the
    # API itself, gets 503s, and reports not ready. Liveness is unaffected.
    a.sim.faults.fail(503)

    async def not_ready() -> bool:
        status, body = await _get(url)
        return status == 503 and "[-]kube-api failed" in body

    await eventually(not_ready, timeout=10)
    assert (await _get(f"http://127.0.0.1:{fed.metrics_port}/healthz"))[0] == 200
    a.sim.faults.clear()
    await eventually(lambda: _status_is(url, 200), timeout=10)

    # The exporter is down: not ready (the Service must not route to it).
    assert fed.exporter is not None
    await fed.exporter.stop()
    status, body = await _get(url)
    assert status == 503
    assert "[-]exporter failed" in body


async def _status_is(url: str, want: int) -> bool:
    return (await _get(url))[0] == want


async def test_cli_process_serves_readyz_and_exits_cleanly_on_sigterm(clusters, tmp_path):
    a = await clusters("a")
    kubeconfig = a.sim.write_kubeconfig(tmp_path / "kubeconfig")
    fed = await Federate.start(
        kubeconfig, tmp_path, "--metrics-listen=127.0.0.1:0", "--no-leader-elect"
    )
    try:
        # Asked for port 0: the kernel picks a free port, nothing can take it between pick and bind.
        started = await fed.wait_event("federation_started")
        exporter_port, metrics_port = int(started["exporter_port"]), int(started["metrics_port"])

        async def ready() -> bool:
            fed.alive()
            try:
                status, _ = await _get(f"http://127.0.0.1:{metrics_port}/readyz")
            except aiohttp.ClientError:
                return False
            return status == 200

        await eventually(ready, timeout=30, interval=0.1)
        status, body = await _get(f"http://127.0.0.1:{exporter_port}/metadata/public/public.json")
        assert status == 200
        doc = json.loads(body)
        assert doc["clusterUUID"] == a.uuid
        assert doc["rootCA"] == a.root.cert_pem
        ident = a.get("secrets", identity.IDENTITY_SECRET, "apiproxy-system")
        client_ca = a.get("secrets", identity.CLIENT_CA_SECRET, "apiproxy-system")
        assert ident is not None
        assert client_ca is not None
        assert base64.b64decode(ident["data"]["pub.pem"]).decode() == doc["authnKeyPub"]
        assert base64.b64decode(client_ca["data"]["ca.crt"]).decode() == doc["apiproxyClientCA"]
        private_pem = base64.b64decode(ident["data"]["priv.pem"]).decode()
        ca_key = base64.b64decode(client_ca["data"]["ca.key"]).decode()

        rc, _seconds = await fed.sigterm()
    finally:
        await fed.kill()
    err = fed.log.read_text()  # stdout and stderr both
    assert rc == 0, err
    assert "federation_started" in err
    assert "stopping" in err
    assert "Traceback" not in err
    for secret in (private_pem, ca_key, a.sim.token):
        assert secret.strip() not in err
    for marker in ("PRIVATE KEY", "eyJ"):  # PEM keys, JWTs
        assert marker not in err
