"""Fail-closed behaviour against a misbehaving peer: slow, invalid JSON, a public document without
rootCA, a pathological JSON document, a large document arriving in pieces. The last good
artifacts stay, the condition says why, and other peers keep being reconciled."""

from __future__ import annotations

import json
from typing import Any

from apiproxy.federation.controller import PRIVATE, PUBLIC
from tests.federation.conftest import FETCH_TIMEOUT


def _artifacts(a) -> tuple[Any, ...]:
    secret = a.get("secrets", "istio-remote-secret-b", "istio-system")
    peers = a.get("secrets", "apiproxy-peers", "apiproxy-system")
    cache = a.imc("b")["status"]["metadataCache"]
    return secret["data"], peers["data"], a.mesh(), cache["public"], cache["private"]


async def test_misbehaving_peer_keeps_the_last_good_artifacts(three):
    a, fa, fake = three.a, three.fa, three.fake
    good = _artifacts(a)
    cases = [
        ("slow", "FetchFailed", f"timed out after {FETCH_TIMEOUT:g}s"),
        ("invalid-json", "InvalidJSON", "not JSON"),
        ("no-root", "InvalidPublicMetadata", "rootCA"),
        ("nested-json", "InvalidJSON", "not JSON"),
    ]
    for mode, reason, text in cases:
        fake.mode = mode
        fake.stalled.clear()
        # Bounded by the fetch timeout, whatever the peer does: "slow" holds the public document
        # until the test ends, and the pass ends when the fetch gives up on it.
        report = await fa.reconcile()
        assert fake.stalled.is_set() == (mode == "slow"), mode
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


async def test_large_document_arriving_in_pieces_is_read_whole(three):
    a, fa, fake = three.a, three.fa, three.fake
    fake.mode = "large"
    await fa.reconcile()
    cond = a.condition("b", PUBLIC)
    assert cond["status"] == "True", cond
    assert fake.hits["large"] >= 1


def _all_artifacts(a) -> tuple[Any, ...]:
    secrets = tuple(
        (a.get("secrets", f"istio-remote-secret-{p}", "istio-system") or {}).get("data")
        for p in ("b", "c")
    )
    peers = a.get("secrets", "apiproxy-peers", "apiproxy-system")["data"]
    return secrets, peers, a.mesh()


async def test_edited_status_cache_never_removes_artifacts(three):
    a, fa, fake = three.a, three.fa, three.fake
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


async def test_one_peers_unexpected_error_spares_the_other(three, monkeypatch):
    from apiproxy.federation import artifacts
    from apiproxy.federation import controller as controller_mod

    a, fa = three.a, three.fa
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
