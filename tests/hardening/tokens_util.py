"""Forged, expired and otherwise wrong peer tokens, by name (so test cases stay data)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import tokens
from tests.proxy.conftest import OWN_UUID, UUID_A, World

UNKNOWN_UUID = "cccccccc-cccc-4ccc-8ccc-cccccccccccc"
_ATTACKER = ed25519.Ed25519PrivateKey.generate()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": "apiproxy",
        "sub": UUID_A,
        "aud": OWN_UUID,
        "scope": "api",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def _sign_a(world: World, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return pyjwt.encode(claims, world.key_a, algorithm="EdDSA", headers=headers)


def make_token(world: World, spec: str) -> str:
    """A token by name. Tokens of peer A unless the name says otherwise."""
    now = time.time()
    pub_a = tokens.public_key_pem(world.key_a).encode()
    match spec:
        case "a":
            return world.token_a()
        case "b":
            return world.token_b()
        case "expired":
            return world.token_a(ttl_seconds=60, now=now - 3600)
        case "expired-within-leeway":  # exp 10 s ago, leeway is 30 s
            return _sign_a(world, _claims(iat=int(now) - 70, nbf=int(now) - 70, exp=int(now) - 10))
        case "expired-beyond-leeway":
            return _sign_a(
                world, _claims(iat=int(now) - 200, nbf=int(now) - 200, exp=int(now) - 60)
            )
        case "nbf-within-leeway":
            return _sign_a(world, _claims(nbf=int(now) + 10, iat=int(now)))
        case "nbf-future":
            return _sign_a(world, _claims(nbf=int(now) + 600, exp=int(now) + 1200))
        case "iat-future":
            return _sign_a(world, _claims(iat=int(now) + 600, exp=int(now) + 1200))
        case "no-exp":
            return _sign_a(world, _claims(exp=None))
        case "exp-string":
            return _sign_a(world, _claims(exp=str(int(now) + 600)))
        case "alg-none":
            return pyjwt.encode(_claims(), None, algorithm="none")
        case "alg-none-sig":  # alg none, but with the real signature of an EdDSA token appended
            real = world.token_a().split(".")
            header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            return f"{header}.{real[1]}.{real[2]}"
        case "hmac-public-key":  # HS256 keyed with A's public key PEM (classic key confusion)
            import hashlib
            import hmac

            header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
            payload = _b64(json.dumps(_claims()).encode())
            sig = hmac.new(pub_a, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            return f"{header}.{payload}.{_b64(sig)}"
        case "hmac-secret":
            return pyjwt.encode(_claims(), "x" * 32, algorithm="HS256")
        case "wrong-aud":
            return world.token_a(audience=UUID_A)
        case "aud-list-other":
            return _sign_a(world, _claims(aud=[UUID_A]))
        case "wrong-scope":
            return world.token_a(scope="private-multicluster")
        case "no-scope":
            return _sign_a(world, _claims(scope=None))
        case "unknown-sub":
            return _sign_a(world, _claims(sub=UNKNOWN_UUID))
        case "no-sub":
            return _sign_a(world, _claims(sub=None))
        case "attacker-key":
            return pyjwt.encode(_claims(), _ATTACKER, algorithm="EdDSA")
        case "attacker-key-unknown-kid":
            return pyjwt.encode(_claims(), _ATTACKER, algorithm="EdDSA", headers={"kid": "nope"})
        case "attacker-jwk-header":  # the attacker's public key embedded in the header
            jwk = json.loads(pyjwt.algorithms.OKPAlgorithm.to_jwk(_ATTACKER.public_key()))
            return pyjwt.encode(_claims(), _ATTACKER, algorithm="EdDSA", headers={"jwk": jwk})
        case "attacker-jku-header":
            return pyjwt.encode(
                _claims(),
                _ATTACKER,
                algorithm="EdDSA",
                headers={"jku": "https://127.0.0.1:1/jwks"},
            )
        case "b-key-a-sub":  # peer B's key, peer A's subject
            return pyjwt.encode(_claims(), world.key_b, algorithm="ES256")
        case "a-unknown-kid":  # A's own key with an unknown kid: the key is chosen by `sub`
            return _sign_a(world, _claims(), headers={"kid": "unknown-kid"})
        case "tampered-payload":
            h, _, s = world.token_a().split(".")
            return f"{h}.{_b64(json.dumps(_claims(sub=UUID_A, scope='admin')).encode())}.{s}"
        case "truncated":
            return world.token_a()[:-5]
        case "garbage":
            return "not.a.jwt"
        case "private-key-pem-leak-check":
            return _ATTACKER.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            ).hex()
    raise KeyError(spec)
