"""Fail-closed behaviour against a misbehaving peer: slow, invalid JSON, a public document without
rootCA, a pathological JSON document, a large document arriving in pieces. The last good
artifacts stay, the condition says why, and other peers keep being reconciled."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp
from aiohttp import web

from apiproxy import pki
from apiproxy.federation.controller import PRIVATE, PUBLIC

PUBLIC_PATH = "/metadata/public/public.json"
PRIVATE_PATH = "/metadata/private/multicluster.json"


class FakePeer:
    """A TLS exporter in front of a real one; `mode` decides what it answers."""

    def __init__(self, upstream: str, test_ca: pki.KeyPair, tls: tuple[str, str]) -> None:
        self.upstream = upstream.removesuffix("/metadata")
        self.client_ssl = ssl.create_default_context(cadata=test_ca.cert_pem)
        self.server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ssl.load_cert_chain(*tls)
        self.mode = "good"
        # Fields replaced in the private document (crafted identities for conflict tests).
        self.private_overrides: dict[str, Any] = {}
        self.release = asyncio.Event()
        self.hits: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/metadata"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _upstream(self, request: web.Request) -> tuple[int, bytes]:
        headers = {}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with (
            aiohttp.ClientSession(trust_env=False) as s,
            s.get(self.upstream + request.path, headers=headers, ssl=self.client_ssl) as resp,
        ):
            return resp.status, await resp.read()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[self.mode] = self.hits.get(self.mode, 0) + 1
        if self.mode == "slow":
            await self.release.wait()  # answers only after the test is over
        if self.mode == "invalid-json":
            return web.Response(text='{"clusterUUID": ', content_type="application/json")
        if self.mode == "nested-json":
            return web.Response(text="[" * 200_000, content_type="application/json")
        status, body = await self._upstream(request)
        if status == 200 and request.path == PRIVATE_PATH and self.private_overrides:
            return web.json_response({**json.loads(body), **self.private_overrides})
        if status != 200 or request.path != PUBLIC_PATH:
            return web.Response(status=status, body=body, content_type="application/json")
        doc: dict[str, Any] = json.loads(body)
        if self.mode == "no-root":
            del doc["rootCA"]
        if self.mode == "large":
            # A big but valid document sent in many small chunks (separate TLS records).
            doc["padding"] = "x" * 300_000
            raw = json.dumps(doc).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(raw), 8192):
                await resp.write(raw[i : i + 8192])
                await asyncio.sleep(0)
            await resp.write_eof()
            return resp
        return web.json_response(doc)


async def _setup(clusters, exporter_tls, test_ca):
    a, _b, _c, fa, _fb, _fc, fake = await setup_three(clusters, exporter_tls, test_ca)
    return a, fa, fake


async def setup_three(clusters, exporter_tls, test_ca):
    """A federates with B (behind a FakePeer, IstioMulticluster "b", created first) and C
    ("c"); both federate back. Returns (a, b, c, fa, fb, fc, fake) after convergence."""
    a, b, c = await clusters("a"), await clusters("bb"), await clusters("ccc")
    tls = {"exporter_tls_cert": exporter_tls[0], "exporter_tls_key": exporter_tls[1]}
    fa = await a.federation(**tls, fetch_timeout=0.5)
    fb = await b.federation(**tls)
    fc = await c.federation(**tls)
    fake = FakePeer(fb.exporter_url, test_ca, exporter_tls)
    await fake.start()
    a.create_imc("b", fake.url, test_ca.cert_pem)
    a.create_imc("c", fc.exporter_url, test_ca.cert_pem)
    b.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    c.create_imc("a", fa.exporter_url, test_ca.cert_pem)
    await fa.reconcile()
    await fb.reconcile()
    await fc.reconcile()
    await fa.reconcile()
    for peer in ("b", "c"):
        assert a.condition(peer, PRIVATE)["status"] == "True", a.condition(peer, PRIVATE)
    return a, b, c, fa, fb, fc, fake


def _artifacts(a) -> tuple[Any, ...]:
    secret = a.get("secrets", "istio-remote-secret-b", "istio-system")
    peers = a.get("secrets", "apiproxy-peers", "apiproxy-system")
    cache = a.imc("b")["status"]["metadataCache"]
    return secret["data"], peers["data"], a.mesh(), cache["public"], cache["private"]


async def test_misbehaving_peer_keeps_the_last_good_artifacts(clusters, exporter_tls, test_ca):
    a, fa, fake = await _setup(clusters, exporter_tls, test_ca)
    try:
        good = _artifacts(a)
        cases = [
            ("slow", "FetchFailed", "timed out after 0.5s"),
            ("invalid-json", "InvalidJSON", "not JSON"),
            ("no-root", "InvalidPublicMetadata", "rootCA"),
            ("nested-json", "InvalidJSON", "not JSON"),
        ]
        for mode, reason, text in cases:
            fake.mode = mode
            # Bounded by the fetch timeout, whatever the peer does: "slow" fails by its message.
            report = await fa.reconcile()
            cond = a.condition("b", PUBLIC)
            assert (mode, cond["status"], cond["reason"]) == (mode, "False", reason)
            assert text in cond["message"]
            assert fake.hits.get(mode)
            # Nothing removed or changed: secret, peers file, mesh, status cache.
            assert _artifacts(a) == good, mode
            # The other peer is reconciled in the same pass.
            assert report.conditions["c"][PUBLIC]["status"] == "True", mode
            metric = fa.metrics_registry.get_sample_value(
                "apiproxy_federation_metadata_fetch_errors_total",
                {"peer": "b", "document": "public", "reason": reason},
            )
            assert metric is not None
            assert metric >= 1
        # Back to normal: True again, same artifacts (nothing was lost in between).
        fake.mode = "good"
        await fa.reconcile()
        assert a.condition("b", PUBLIC)["status"] == "True"
        assert a.condition("b", PRIVATE)["status"] == "True"
        assert _artifacts(a) == good
    finally:
        await fake.stop()


async def test_large_document_arriving_in_pieces_is_read_whole(clusters, exporter_tls, test_ca):
    a, fa, fake = await _setup(clusters, exporter_tls, test_ca)
    try:
        fake.mode = "large"
        await fa.reconcile()
        cond = a.condition("b", PUBLIC)
        assert cond["status"] == "True", cond
        assert fake.hits["large"] >= 1
    finally:
        await fake.stop()


def _all_artifacts(a) -> tuple[Any, ...]:
    secrets = tuple(
        (a.get("secrets", f"istio-remote-secret-{p}", "istio-system") or {}).get("data")
        for p in ("b", "c")
    )
    peers = a.get("secrets", "apiproxy-peers", "apiproxy-system")["data"]
    return secrets, peers, a.mesh()


async def test_edited_status_cache_never_removes_artifacts(clusters, exporter_tls, test_ca):
    a, fa, fake = await _setup(clusters, exporter_tls, test_ca)
    try:
        good = _all_artifacts(a)
        good_cache = a.imc("b")["status"]["metadataCache"]
        fake.mode = "invalid-json"  # the refetch fails: only the edited cache is left
        edits = [
            ("public", {"rootCA": "not a certificate"}),
            ("private", {"ingressGateways": "nowhere"}),
            ("public", None),  # the whole cache wiped
        ]
        for which, patch in edits:
            obj = a.imc("b")
            cache = obj["status"]["metadataCache"]
            if patch is None:
                del obj["status"]["metadataCache"]
            else:
                cache[which] = {**cache[which], **patch}
            a.store.update(obj, subresource="status")
            report = await fa.reconcile()
            # Nothing new from the edited cache, nothing removed because of it (secret, peers
            # entry, root and network of b; c untouched), and c still reconciled.
            assert _all_artifacts(a) == good, (which, patch)
            assert report.conditions["c"][PRIVATE]["status"] == "True"
            assert a.condition("b", PUBLIC)["reason"] == "InvalidJSON"
            # The exporter still knows b (from its kept peers entry).
            assert "b" in fa.registry.names()
        # The next good fetch repairs the cache; the artifacts never moved.
        fake.mode = "good"
        await fa.reconcile()
        status = a.imc("b")["status"]
        assert status["metadataCache"]["public"] == good_cache["public"]
        assert status["metadataCache"]["private"] == good_cache["private"]
        assert a.condition("b", PRIVATE)["status"] == "True"
        assert _all_artifacts(a) == good
    finally:
        await fake.stop()


async def test_one_peers_unexpected_error_spares_the_other(
    clusters, exporter_tls, test_ca, monkeypatch
):
    from apiproxy.federation import artifacts
    from apiproxy.federation import controller as controller_mod

    a, fa, fake = await _setup(clusters, exporter_tls, test_ca)
    try:
        good = _all_artifacts(a)
        leak = "eyJhbGciOiJFZERTQSJ9.secret-token"

        def boom(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError(f"Traceback (most recent call last): {leak}")

        real_kubeconfig = artifacts.build_kubeconfig

        def kubeconfig(**kw: Any) -> Any:
            if "api.bb." in kw["server"]:
                boom()
            return real_kubeconfig(**kw)

        real_digest = artifacts.pem_digest
        b_root = a.imc("b")["status"]["metadataCache"]["public"]["rootCA"]

        def digest(pem: str) -> str:
            if pem == b_root:
                boom()
            return real_digest(pem)

        real_parse = controller_mod.parse_private

        def parse(doc: Any, **kw: Any) -> Any:
            if str(doc.get("apiHost", "")).startswith("api.bb."):
                boom()
            return real_parse(doc, **kw)

        cases = [
            (artifacts, "build_kubeconfig", kubeconfig, PRIVATE, "ReconcileFailed"),
            (artifacts, "pem_digest", digest, PRIVATE, "ReconcileFailed"),
            (controller_mod, "parse_private", parse, PUBLIC, "FetchFailed"),
        ]
        for module, attr, fake_fn, ctype, reason in cases:
            with monkeypatch.context() as m:
                m.setattr(module, attr, fake_fn)
                # c's remote secret is gone: only a pass under the fault can rewrite it, and
                # every such pass hits b's error first (peers run in name order).
                a.store.delete("secrets", "istio-remote-secret-c", "istio-system")
                report = await fa.reconcile()
            assert a.get("secrets", "istio-remote-secret-c", "istio-system") is not None, attr
            assert any("RuntimeError" in e for e in report.errors) or ctype == PUBLIC, attr
            assert report.conditions["c"][PRIVATE]["status"] == "True", attr
            cond = a.condition("b", ctype)
            assert (cond["status"], cond["reason"]) == ("False", reason), attr
            assert "RuntimeError" in cond["message"]
            status_text = json.dumps(a.imc("b")["status"])
            assert leak not in status_text
            assert "Traceback" not in status_text
            assert not any(leak in e for e in report.errors)
            # Nothing of b removed or changed (c's secret is recreated with new credentials).
            now = _all_artifacts(a)
            assert (now[0][0], now[1], now[2]) == (good[0][0], good[1], good[2]), attr
            # The next pass without the fault recovers b.
            await fa.reconcile()
            assert a.condition("b", PRIVATE)["status"] == "True", attr
            assert a.condition("b", PUBLIC)["status"] == "True", attr
    finally:
        await fake.stop()
