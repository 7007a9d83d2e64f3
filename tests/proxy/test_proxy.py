# ruff: noqa: SIM117  (nested client/response contexts read more clearly in these tests)
"""The proxy over real TLS sockets against a recording upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from pathlib import Path

import aiohttp
import pytest

from apiproxy import pki
from tests.proxy.conftest import (
    OWN_UUID,
    POLICY,
    POLICY_NO_ENDPOINTS,
    UUID_A,
    ProxyFactory,
    Recorder,
    World,
    audit_records,
    make_files,
)


def session(world: World, tmp_path: Path, cert: pki.KeyPair | None) -> aiohttp.ClientSession:
    ctx = world.client_ssl(cert, tmp_path)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), auto_decompress=False)


async def test_allowed_request_is_forwarded_byte_identical_and_scrubbed(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    target = "/api/v1/namespaces/x/pods?limit=500&resourceVersion=0&labelSelector=app%3Dweb"
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(
            proxy.url + target,
            headers={
                "Accept": "application/vnd.kubernetes.protobuf,application/json",
                "Accept-Encoding": "gzip",
                "User-Agent": "pilot-discovery/1.31",
                "Impersonate-User": "system:admin",
                "Impersonate-Group": "system:masters",
                "X-Remote-User": "admin",
                "X-Forwarded-For": "10.0.0.1",
                "X-Secret-Hop": "1",
                "Connection": "keep-alive, X-Secret-Hop, Accept-Encoding",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "Cookie": "a=b",
            },
        ) as resp:
            body = await resp.read()
            audit_id = resp.headers["Audit-ID"]
    assert resp.status == 200
    assert body == recorder.list_body
    assert len(recorder.requests) == 1
    got = recorder.requests[0]
    assert got.raw_path == target
    names = {k.lower() for k, _ in got.headers}
    for forbidden in (
        "impersonate-user",
        "impersonate-group",
        "x-remote-user",
        "x-forwarded-for",
        "x-secret-hop",
        "proxy-authorization",
        "cookie",
        "accept-encoding",  # named in Connection: hop-by-hop
    ):
        assert forbidden not in names, forbidden
    headers = dict(got.headers)
    assert headers["Authorization"] == "Bearer upstream-token-1"
    assert headers["Accept"] == "application/vnd.kubernetes.protobuf,application/json"
    assert headers["User-Agent"] == "pilot-discovery/1.31"
    assert headers["Audit-ID"] == audit_id
    await proxy.audit.flush()
    records = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert [r["stage"] for r in records] == ["ResponseComplete"]
    rec = records[0]
    assert rec["user"]["username"] == "peer:cluster-a"
    assert rec["user"]["extra"]["apiproxy.io/authenticated-by"] == ["mtls"]
    assert rec["annotations"]["authorization.k8s.io/decision"] == "allow"
    assert rec["annotations"]["apiproxy.io/rule"] == "discovery"
    assert rec["annotations"]["apiproxy.io/bytes-sent"] == str(len(body))


async def test_no_headers_are_auto_added_upstream(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx)
    writer.write(b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    names = {k.lower() for k, _ in recorder.requests[0].headers}
    assert names <= {"host", "authorization", "audit-id"}, names


async def test_forbidden_gets_kubernetes_status_and_never_reaches_upstream(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_b) as s:
        async with s.get(proxy.url + "/api/v1/namespaces/x/secrets") as resp:
            body = await resp.json()
            audit_id = resp.headers["Audit-ID"]
    assert resp.status == 403
    assert body["kind"] == "Status"
    assert body["reason"] == "Forbidden"
    assert body["message"] == (
        'secrets is forbidden: User "peer:cluster-b" cannot list resource "secrets"'
        ' in API group "" in the namespace "x"'
    )
    assert recorder.requests == []
    await proxy.audit.flush()
    (rec,) = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert rec["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert rec["responseStatus"]["code"] == 403


async def test_malformed_target_is_400_and_not_forwarded(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    ctx = world.client_ssl(world.client_a, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=ctx)
    writer.write(
        b"GET /api/v1/namespaces/x/../../secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400")
    assert b'"kind":"Status"' in raw
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("case", "cert", "token"),
    [
        ("no credentials", None, None),
        ("cert of A + token of B", "a", "b"),
        ("expired token", None, "expired"),
        ("alg none", None, "none"),
        ("HMAC with the public key", None, "hmac"),
        ("wrong audience", None, "aud"),
        ("wrong scope", None, "scope"),
        ("unknown subject", None, "sub"),
        ("Basic auth", None, "basic"),
    ],
)
async def test_authentication_failures_are_401(
    world: World,
    recorder: Recorder,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    case: str,
    cert: str | None,
    token: str | None,
) -> None:
    import jwt as pyjwt

    from apiproxy import tokens

    proxy, files = await make_proxy(recorder.url)
    headers = {}
    if token == "b":
        headers["Authorization"] = f"Bearer {world.token_b()}"
    elif token == "expired":
        headers["Authorization"] = "Bearer " + world.token_a(ttl_seconds=60, now=1_000_000)
    elif token == "none":
        t = pyjwt.encode(
            {"sub": UUID_A, "aud": OWN_UUID, "scope": "api", "exp": 4_000_000_000},
            None,
            algorithm="none",
        )
        headers["Authorization"] = f"Bearer {t}"
    elif token == "hmac":
        t = pyjwt.encode(
            {"sub": UUID_A, "aud": OWN_UUID, "scope": "api", "exp": 4_000_000_000},
            "an-hmac-secret-that-is-long-enough-for-hs256",
            algorithm="HS256",
        )
        headers["Authorization"] = f"Bearer {t}"
    elif token == "aud":
        headers["Authorization"] = "Bearer " + world.token_a(audience=UUID_A)
    elif token == "scope":
        headers["Authorization"] = "Bearer " + world.token_a(scope="private-multicluster")
    elif token == "sub":
        t = tokens.mint(
            world.key_a,
            subject="cccccccc-cccc-4ccc-8ccc-cccccccccccc",
            audience=OWN_UUID,
            scope="api",
            ttl_seconds=600,
        )
        headers["Authorization"] = f"Bearer {t}"
    elif token == "basic":
        headers["Authorization"] = "Basic YWRtaW46YWRtaW4="
    client_cert = world.client_a if cert == "a" else None
    async with session(world, tmp_path, client_cert) as s:
        async with s.get(proxy.url + "/api/v1/pods", headers=headers) as resp:
            body = await resp.json()
            audit_id = resp.headers["Audit-ID"]
    assert resp.status == 401, case
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    assert recorder.requests == []
    await proxy.audit.flush()
    (rec,) = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert rec["user"]["username"] == "system:anonymous"
    reason = rec["annotations"]["apiproxy.io/authn-failure"]
    assert reason
    text = files.audit.read_text()
    if "Authorization" in headers:
        assert headers["Authorization"].split()[1] not in text
    assert proxy.metrics.authn_failures.labels(reason)._value.get() == 1


async def test_token_of_a_peer_authenticates_as_that_peer(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_b) as s:
        async with s.get(
            proxy.url + "/api/v1/pods", headers={"Authorization": f"Bearer {world.token_b()}"}
        ) as resp:
            audit_id = resp.headers["Audit-ID"]
    assert resp.status == 200
    async with session(world, tmp_path, None) as s:
        async with s.get(
            proxy.url + "/api/v1/pods", headers={"Authorization": f"Bearer {world.token_a()}"}
        ) as resp2:
            audit_id2 = resp2.headers["Audit-ID"]
    assert resp2.status == 200
    # The peer's token never reaches the upstream; the proxy's own does.
    for got in recorder.requests:
        assert dict(got.headers)["Authorization"] == "Bearer upstream-token-1"
    await proxy.audit.flush()
    recs = {r["auditID"]: r for r in audit_records(files.audit)}
    assert recs[audit_id]["user"]["username"] == "peer:cluster-b"
    assert recs[audit_id]["user"]["extra"]["apiproxy.io/authenticated-by"] == ["mtls", "jwt"]
    assert recs[audit_id2]["user"]["username"] == "peer:cluster-a"
    assert recs[audit_id2]["user"]["extra"]["apiproxy.io/authenticated-by"] == ["jwt"]


async def test_certificate_from_unknown_ca_fails_the_handshake(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    ctx = world.client_ssl(world.client_unknown, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises((ssl.SSLError, ConnectionResetError, aiohttp.ClientError)):
            await s.get(proxy.url + "/api/v1/pods")
    assert recorder.requests == []


async def test_protocol_upgrade_is_refused_without_dangerous_rule(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(
            proxy.url + "/api/v1/namespaces/x/pods",
            headers={"Connection": "Upgrade", "Upgrade": "SPDY/3.1"},
        ) as resp:
            body = await resp.json()
    assert resp.status == 403
    assert body["reason"] == "Forbidden"
    assert recorder.requests == []


async def test_upstream_unreachable_is_503_status(
    world: World, make_proxy: ProxyFactory, tmp_path: Path, refused_port: int
) -> None:
    port = refused_port
    proxy, _ = await make_proxy(f"https://127.0.0.1:{port}")
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(proxy.url + "/api/v1/pods") as resp:
            body = await resp.json()
    assert resp.status == 503
    assert body["kind"] == "Status"
    assert proxy.metrics.upstream_errors.labels("connect")._value.get() == 1


async def test_watch_events_are_forwarded_one_by_one(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(
            proxy.url + "/api/v1/pods?watch=true&timeoutSeconds=300&allowWatchBookmarks=true"
        ) as resp:
            assert resp.status == 200  # headers arrived before any event was produced
            audit_id = resp.headers["Audit-ID"]
            for i in range(5):
                event = json.dumps({"type": "ADDED", "object": {"n": i}}).encode() + b"\n"
                recorder.events.put_nowait(event)
                # The next event is only produced after this one was received.
                line = await asyncio.wait_for(resp.content.readline(), 10)
                assert line == event
            recorder.events.put_nowait(None)  # upstream closes → client stream ends
            assert await asyncio.wait_for(resp.content.read(), 10) == b""
    await proxy.audit.flush()
    recs = [r for r in audit_records(files.audit) if r["auditID"] == audit_id]
    assert [r["stage"] for r in recs] == ["ResponseStarted", "ResponseComplete"]
    assert recs[1]["annotations"]["apiproxy.io/watch-events"] == "5"
    assert recs[1]["verb"] == "watch"


async def test_watch_is_ended_cleanly_at_max_watch_seconds(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An upstream that never ends a watch cannot hold it open past --max-watch-seconds."""
    proxy, files = await make_proxy(recorder.url, max_watch_seconds=0.5)
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(proxy.url + "/api/v1/pods?watch=true&timeoutSeconds=300") as resp:
            assert resp.status == 200
            audit_id = resp.headers["Audit-ID"]
            recorder.events.put_nowait(b'{"type":"ADDED"}\n')
            # The stream ends with a clean chunked EOF although the upstream never closed it.
            assert await asyncio.wait_for(resp.content.read(), 10) == b'{"type":"ADDED"}\n'
    await asyncio.wait_for(recorder.watch_ended.wait(), 10)
    await proxy.audit.flush()
    done = [
        r
        for r in audit_records(files.audit)
        if r["auditID"] == audit_id and r["stage"] == "ResponseComplete"
    ]
    assert done[0]["annotations"]["apiproxy.io/stream-ended-by"] == "deadline"


async def test_client_going_away_closes_the_upstream_watch(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        resp = await s.get(proxy.url + "/api/v1/pods?watch=1")
        assert resp.status == 200
        await asyncio.wait_for(recorder.watch_started.wait(), 10)
        assert proxy.metrics.open_watches.labels("cluster-a")._value.get() == 1
        resp.close()  # drops the connection
    await asyncio.wait_for(recorder.watch_ended.wait(), 10)
    assert proxy.metrics.open_watches.labels("cluster-a")._value.get() == 0


async def test_watch_limit_per_peer_is_429_with_retry_after(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url, max_watches_per_peer=1)
    # exported, so an alert can compare open watches with the limit
    assert proxy.metrics.registry.get_sample_value("apiproxy_max_watches_per_peer") == 1
    async with session(world, tmp_path, world.client_a) as s:
        first = await s.get(proxy.url + "/api/v1/pods?watch=1")
        assert first.status == 200
        async with s.get(proxy.url + "/api/v1/services?watch=1") as second:
            body = await second.json()
        assert second.status == 429
        assert second.headers["Retry-After"] == "1"
        assert body["reason"] == "TooManyRequests"
        # Another peer has its own budget.
    async with session(world, tmp_path, world.client_b) as s2:
        async with s2.get(proxy.url + "/api/v1/pods") as other:
            assert other.status == 200
    first.close()


async def test_invalid_policy_reload_keeps_old_policy_and_open_watch_survives(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        watch = await s.get(proxy.url + "/api/v1/pods?watch=1")
        assert watch.status == 200
        # 1. an invalid policy is refused; the old one stays in force
        files.policy.write_text("apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules: [{}]\n")
        assert await proxy.reload_now() == [("policy", False)]
        assert proxy.metrics.reloads.labels("policy", "failure")._value.get() == 1
        async with s.get(proxy.url + "/api/v1/endpoints") as r1:
            assert r1.status == 200
        # 2. a valid new policy applies to new requests at once
        files.policy.write_text(POLICY_NO_ENDPOINTS)
        assert await proxy.reload_now() == [("policy", True)]
        async with s.get(proxy.url + "/api/v1/endpoints") as r2:
            assert r2.status == 403
        # 3. a deleted policy keeps the last good one
        files.policy.unlink()
        assert await proxy.reload_now() == []
        async with s.get(proxy.url + "/api/v1/pods") as r3:
            assert r3.status == 200
        # the watch opened before all this still streams
        recorder.events.put_nowait(b'{"type":"ADDED"}\n')
        assert await asyncio.wait_for(watch.content.readline(), 10) == b'{"type":"ADDED"}\n'
        watch.close()


async def test_rotated_upstream_token_is_used_without_restart(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(proxy.url + "/api/v1/pods") as r1:
            assert r1.status == 200
        # kubelet rotates a projected token by an atomic rename
        tmp = files.token.with_suffix(".new")
        tmp.write_text("upstream-token-2\n")
        tmp.rename(files.token)
        assert ("upstream-token", True) in await proxy.reload_now()
        async with s.get(proxy.url + "/api/v1/pods") as r2:
            assert r2.status == 200
    assert [dict(r.headers)["Authorization"] for r in recorder.requests] == [
        "Bearer upstream-token-1",
        "Bearer upstream-token-2",
    ]
    await proxy.audit.flush()
    assert "upstream-token-2" not in files.audit.read_text()


async def test_metrics_health_and_readiness(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, _ = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        async with s.get(proxy.url + "/api/v1/pods") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/api/v1/secrets") as r:
            assert r.status == 403
    base = f"http://127.0.0.1:{proxy.metrics_port}"
    async with aiohttp.ClientSession() as plain:
        async with plain.get(base + "/healthz") as h:
            assert h.status == 200
        # the first probe runs at start; wait for its result
        await asyncio.wait_for(proxy.wait_until(lambda: proxy.upstream_ok is not None), 10)
        async with plain.get(base + "/readyz") as rz:
            assert rz.status == 200, await rz.text()
        async with plain.get(base + "/metrics") as m:
            text = await m.text()
    assert (
        'apiproxy_requests_total{code="200",decision="allow",peer="cluster-a",'
        'resource="pods",verb="list"} 1.0' in text
    )
    assert (
        'apiproxy_requests_total{code="403",decision="forbid",peer="cluster-a",'
        'resource="secrets",verb="list"} 1.0' in text
    )
    assert "apiproxy_request_duration_seconds_bucket" in text
    assert "apiproxy_audit_queue_depth" in text  # default registry included


async def test_readiness_fails_when_upstream_is_down(
    world: World, make_proxy: ProxyFactory, refused_port: int
) -> None:
    port = refused_port
    proxy, _ = await make_proxy(f"https://127.0.0.1:{port}")
    assert await proxy._probe_once() is False
    proxy.upstream_ok = False
    async with aiohttp.ClientSession() as plain:
        async with plain.get(f"http://127.0.0.1:{proxy.metrics_port}/readyz") as rz:
            assert rz.status == 503
            assert "[-]upstream failed" in await rz.text()


async def test_stop_ends_open_watches_cleanly(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        watch = await s.get(proxy.url + "/api/v1/pods?watch=1")
        assert watch.status == 200
        await asyncio.wait_for(recorder.watch_started.wait(), 10)
        await asyncio.wait_for(proxy.stop(), 10)
        # the chunked stream was terminated properly: a clean EOF, not a reset
        assert await asyncio.wait_for(watch.content.read(), 10) == b""
    await asyncio.wait_for(recorder.watch_ended.wait(), 10)
    recs = audit_records(files.audit)
    assert recs[-1]["annotations"]["apiproxy.io/stream-ended-by"] == "shutdown"


async def test_callers_cannot_grow_metric_series_without_bound(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Label values come from bounded sets, never from a path or method a caller invents."""
    proxy, _ = await make_proxy(recorder.url)
    async with session(world, tmp_path, world.client_a) as s:
        for i in range(20):
            async with s.get(f"{proxy.url}/api/v1/namespaces/x/made-up-{i}") as r:
                assert r.status == 403
            async with s.get(f"{proxy.url}/api/v1/namespaces/x/pods/p/sub-{i}") as r:
                assert r.status == 403
        async with s.get(proxy.url + "/api/v1/secrets") as r:
            assert r.status == 403
    async with session(world, tmp_path, None) as s:
        for i in range(20):
            async with s.request(f"VERB{i}", proxy.url + "/api/v1/pods") as r:
                assert r.status in (400, 401, 405)
    series = {
        tuple(sorted(sample.labels.items()))
        for metric in proxy.metrics.registry.collect()
        if metric.name == "apiproxy_requests"
        for sample in metric.samples
        if sample.name == "apiproxy_requests_total"
    }
    resources = {dict(labels)["resource"] for labels in series}
    verbs = {dict(labels)["verb"] for labels in series}
    assert "(other)" in resources
    assert "secrets" in resources  # built-in names stay visible for alerting on denials
    assert not any("made-up" in r or "sub-" in r for r in resources)
    assert not any(v.startswith("verb") for v in verbs)
    assert len(series) <= 6


async def test_two_authorization_headers_are_refused(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Which of several credentials counts differs between parsers, so none does."""
    proxy, _ = await make_proxy(recorder.url)
    valid = f"Bearer {world.token_a()}"
    for second in (valid, "Bearer not-a-token"):
        headers = [("Authorization", valid), ("Authorization", second)]
        async with session(world, tmp_path, None) as s:
            async with s.get(proxy.url + "/api/v1/pods", headers=headers) as resp:
                assert resp.status == 401
    async with session(world, tmp_path, None) as s:
        async with s.get(proxy.url + "/api/v1/pods", headers={"Authorization": valid}) as resp:
            assert resp.status == 200
    assert len(recorder.requests) == 1
    assert (
        proxy.metrics.registry.get_sample_value(
            "apiproxy_authentication_failures_total", {"reason": "multiple_authorization_headers"}
        )
        == 2
    )


async def test_large_bodies_cross_both_ways_byte_for_byte(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Both sides read TLS into one buffer shared by every connection (admission._BufferedReads,
    upstream_client): bodies many times that buffer, from several connections at once, must come
    through intact in both directions."""
    policy = POLICY + (
        "- name: write-configmaps\n"
        '  peers: ["*"]\n'
        '  apiGroups: [""]\n'
        "  resources: [configmaps]\n"
        "  verbs: [create]\n"
        "  dangerous: true\n"
    )
    files = make_files(world, tmp_path, policy=policy)
    proxy, _ = await make_proxy(recorder.url, files=files)
    recorder.list_body = os.urandom(5 * 1024 * 1024 + 7)
    sent = [os.urandom(900 * 1024 + i) for i in range(3)]  # the recorder takes up to 1 MiB
    async with session(world, tmp_path, world.client_a) as s:

        async def post(body: bytes) -> int:
            url = proxy.url + "/api/v1/namespaces/x/configmaps"
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status

        async def get() -> bytes:
            async with s.get(proxy.url + "/api/v1/namespaces/x/pods") as r:
                assert r.status == 200
                return await r.read()

        results = await asyncio.gather(*(post(b) for b in sent), get(), get())
    assert results[:3] == [200, 200, 200]
    assert results[3:] == [recorder.list_body, recorder.list_body]
    received = sorted((r.body for r in recorder.requests if r.method == "POST"), key=len)
    assert received == sent
