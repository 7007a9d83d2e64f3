"""The verified-token cache never accepts a token that a full verification would refuse now."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import tokens
from apiproxy.authn import AuthnFailure, authenticate
from apiproxy.peers import parse
from tests.proxy.conftest import OWN_UUID, UUID_A, ProxyFactory, Recorder, World

SUB = UUID_A


def _key_lookup(keys: dict[str, tokens.PublicKey]):  # type: ignore[no-untyped-def]
    return lambda subject: keys.get(subject)


def _verify(cache: tokens.VerifyCache, token: str, keys: dict[str, tokens.PublicKey], **kw):  # type: ignore[no-untyped-def]
    return cache.verify(
        token,
        audience=kw.pop("audience", OWN_UUID),
        scope=kw.pop("scope", "api"),
        key_for_subject=_key_lookup(keys),
        **kw,
    )


def _reason(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(tokens.TokenError) as err:
        fn()
    return err.value.reason


def test_second_verification_is_a_hit_with_the_same_claims() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    token = tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
    cache = tokens.VerifyCache()
    first = _verify(cache, token, keys)
    second = _verify(cache, token, keys)
    assert (cache.misses, cache.hits) == (1, 1)
    assert second == first
    assert second.subject == SUB


def test_cached_token_is_refused_once_expired() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    now = time.time()
    token = tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60, now=now)
    cache = tokens.VerifyCache()
    _verify(cache, token, keys, now=now)
    later = now + 60 + tokens.LEEWAY_SECONDS
    assert _reason(lambda: _verify(cache, token, keys, now=later)) == "expired"
    assert len(cache) == 0  # the stale entry is gone and the failure was not cached
    # A moment earlier than the limit it is still fine (and cached again).
    _verify(cache, token, keys, now=later - 1)
    assert len(cache) == 1


def test_cached_token_is_refused_when_the_peer_goes_or_its_key_changes() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    token = tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
    cache = tokens.VerifyCache()
    _verify(cache, token, {SUB: priv.public_key()})
    assert _reason(lambda: _verify(cache, token, {})) == "unknown_subject"
    _verify(cache, token, {SUB: priv.public_key()})
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert _reason(lambda: _verify(cache, token, {SUB: other})) == "bad_signature"
    assert cache.hits == 0


def test_a_token_with_the_same_claims_but_a_bad_signature_is_refused() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    token = tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
    cache = tokens.VerifyCache()
    _verify(cache, token, keys)
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 1
    forged = f"{head}.{body}." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert _reason(lambda: _verify(cache, forged, keys)) == "bad_signature"
    # Same claims signed by another key: refused as well; the good token still passes.
    other = ed25519.Ed25519PrivateKey.generate()
    twin = tokens.mint(other, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
    assert _reason(lambda: _verify(cache, twin, keys)) == "bad_signature"
    assert _verify(cache, token, keys).subject == SUB
    assert len(cache) == 1


def test_audience_and_scope_are_part_of_the_cache_key() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    token = tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
    cache = tokens.VerifyCache()
    _verify(cache, token, keys)
    assert _reason(lambda: _verify(cache, token, keys, scope="other")) == "wrong_scope"
    assert _reason(lambda: _verify(cache, token, keys, audience="someone")) == "wrong_audience"


def test_not_yet_valid_refusals_are_not_cached() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    now = time.time()
    token = tokens.mint(
        priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=600, now=now + 300
    )
    cache = tokens.VerifyCache()
    assert _reason(lambda: _verify(cache, token, keys, now=now)) == "not_yet_valid"
    assert len(cache) == 0
    assert _verify(cache, token, keys, now=now + 300).subject == SUB


def test_cache_is_bounded() -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    keys = {SUB: priv.public_key()}
    cache = tokens.VerifyCache(max_entries=3)
    toks = [
        tokens.mint(priv, subject=SUB, audience=OWN_UUID, scope="api", ttl_seconds=60)
        for _ in range(5)
    ]
    for t in toks:
        _verify(cache, t, keys)
    assert len(cache) == 3
    _verify(cache, toks[0], keys)  # evicted earlier: a miss, re-verified
    assert cache.hits == 0


def test_authenticate_with_cache_after_peers_reload(world: World) -> None:
    ps = parse(world.peers_yaml(), "src")
    cache = tokens.VerifyCache()
    token = world.token_a()
    auth = f"Bearer {token}"
    for _ in range(2):
        ident = authenticate(
            ps, certificate=None, authorization=auth, cluster_uuid=OWN_UUID, token_cache=cache
        )
        assert ident.peer.name == "cluster-a"
    assert cache.hits == 1
    # A reloaded peers file without cluster-a: the cached token no longer authenticates.
    without_a = parse(world.peers_yaml().replace(UUID_A, "cccccccc-cccc-4ccc-8ccc-cccccccccccc"))
    with pytest.raises(AuthnFailure) as info:
        authenticate(
            without_a,
            certificate=None,
            authorization=auth,
            cluster_uuid=OWN_UUID,
            token_cache=cache,
        )
    assert info.value.reason == "token_unknown_subject"


async def test_proxy_refuses_a_cached_token_after_a_peers_reload_changes_the_key(
    world: World, recorder: Recorder, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, files = await make_proxy(recorder.url)
    token = world.token_a()
    headers = {"Authorization": f"Bearer {token}"}
    ctx = world.client_ssl(None, tmp_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        for _ in range(2):
            async with s.get(proxy.url + "/api/v1/pods", headers=headers) as resp:
                assert resp.status == 200
        assert proxy.token_cache.hits >= 1
        # cluster-a's key is replaced in the peers file: the same token must now fail.
        new_key = ed25519.Ed25519PrivateKey.generate()
        text = world.peers_yaml()
        old_pem = tokens.public_key_pem(world.key_a).strip().splitlines()
        new_pem = tokens.public_key_pem(new_key).strip().splitlines()
        for a, b in zip(old_pem, new_pem, strict=True):
            text = text.replace(a, b)
        files.peers.write_text(text)
        assert ("peers", True) in await proxy.reload_now()
        async with s.get(proxy.url + "/api/v1/pods", headers=headers) as resp:
            assert resp.status == 401
        assert proxy.metrics.authn_failures.labels("token_bad_signature")._value.get() == 1
        # cluster-a removed altogether: refused as an unknown subject.
        files.peers.write_text(
            world.peers_yaml().replace(UUID_A, "cccccccc-cccc-4ccc-8ccc-cccccccccccc")
        )
        assert ("peers", True) in await proxy.reload_now()
        async with s.get(proxy.url + "/api/v1/pods", headers=headers) as resp:
            assert resp.status == 401
        assert proxy.metrics.authn_failures.labels("token_unknown_subject")._value.get() == 1
