import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from apiproxy import tokens

AUD = "11111111-1111-4111-8111-111111111111"
SUB = "22222222-2222-4222-8222-222222222222"


@pytest.fixture(params=["ed25519", "p256", "rsa"])
def keypair(request):
    if request.param == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif request.param == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, key.public_key()


def verify(token, pub, **kw):
    return tokens.verify(
        token,
        audience=kw.pop("audience", AUD),
        scope=kw.pop("scope", "api"),
        key_for_subject=lambda s: pub if s == SUB else None,
        **kw,
    )


def test_roundtrip_for_every_allowed_algorithm(keypair):
    priv, pub = keypair
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    claims = verify(token, pub)
    assert claims.subject == SUB
    assert claims.scope == "api"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"audience": "someone-else"}, "wrong_audience"),
        ({"scope": "private-multicluster"}, "wrong_scope"),
        ({"now": time.time() + 3600}, "expired"),
        ({"now": time.time() - 3600}, "not_yet_valid"),
    ],
)
def test_refusals(keypair, kwargs, reason):
    priv, pub = keypair
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    with pytest.raises(tokens.TokenError) as err:
        verify(token, pub, **kwargs)
    assert err.value.reason == reason


def test_unknown_subject_and_wrong_key():
    priv = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(token, audience=AUD, scope="api", key_for_subject=lambda s: None)
    assert err.value.reason == "unknown_subject"
    with pytest.raises(tokens.TokenError) as err:
        verify(token, other)
    assert err.value.reason == "bad_signature"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_is_refused():
    claims = {"sub": SUB, "aud": AUD, "scope": "api", "exp": int(time.time()) + 60}
    token = (
        _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
        + "."
    )
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(tokens.TokenError) as err:
        verify(token, pub)
    assert err.value.reason == "algorithm_not_allowed"


def test_hmac_with_public_key_as_secret_is_refused():
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tokens.public_key_pem(priv).encode()
    claims = {"sub": SUB, "aud": AUD, "scope": "api", "exp": int(time.time()) + 60}
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    import hashlib
    import hmac

    sig = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{_b64(sig)}"
    with pytest.raises(tokens.TokenError) as err:
        verify(token, priv.public_key())
    assert err.value.reason == "algorithm_not_allowed"


def test_algorithm_must_match_key_type():
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = tokens.mint(ec_key, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    ed_pub = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(tokens.TokenError) as err:
        verify(token, ed_pub)
    assert err.value.reason == "algorithm_mismatch"


def test_exp_is_required():
    priv = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode({"sub": SUB, "aud": AUD, "scope": "api"}, priv, algorithm="EdDSA")
    with pytest.raises(tokens.TokenError) as err:
        verify(token, priv.public_key())
    assert err.value.reason == "missing_claim"


def test_deckhouse_pem_labels_load():
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = tokens.public_key_pem(priv).replace("PUBLIC KEY", "ED25519 PUBLIC KEY")
    assert isinstance(tokens.load_public_key(pem), ed25519.Ed25519PublicKey)


def test_audience_and_subject_are_compared_canonically():
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = priv.public_key()
    sub, aud = "abcdef12-3456-4789-8abc-def012345678", "fedcba98-7654-4321-8fed-cba987654321"

    def check(token: str) -> tokens.Claims:
        return tokens.verify(
            token,
            audience=aud,
            scope="api",
            key_for_subject=lambda s: pub if s == sub else None,
        )

    for s, a in ((sub.upper(), aud), (sub, aud.upper())):
        token = tokens.mint(priv, subject=s, audience=a, scope="api", ttl_seconds=60)
        assert check(token).subject == sub
    # Compared canonically, not loosely: another UUID, or a non-UUID spelling, is another audience.
    for aud in (SUB, AUD.replace("-", ""), "{" + AUD + "}", AUD + " "):
        token = tokens.mint(priv, subject=SUB, audience=aud, scope="api", ttl_seconds=60)
        with pytest.raises(tokens.TokenError) as err:
            verify(token, pub)
        assert err.value.reason == "wrong_audience", aud


@pytest.mark.parametrize(
    ("aud", "ok"),
    [
        ([AUD], True),
        (["x", AUD.upper()], True),
        (["x", "y"], False),
        ([], False),
        (7, False),
        ([7, None], False),
        ({"a": AUD}, False),
    ],
)
def test_audience_may_be_a_list_of_strings(aud, ok):
    priv = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    claims = {"sub": SUB, "aud": aud, "scope": "api", "exp": now + 60}
    token = jwt.encode(claims, priv, algorithm="EdDSA")
    if ok:
        assert verify(token, priv.public_key()).audience == AUD
    else:
        with pytest.raises(tokens.TokenError) as err:
            verify(token, priv.public_key())
        assert err.value.reason == "wrong_audience"


@pytest.fixture(scope="module")
def weak_keys():
    """Keys of the allowed families that are still refused: P-384 (ES384 is not allowed) and
    RSA below 2048 bits."""
    return {
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 (refused)
    }


@pytest.mark.parametrize("name", ["p384", "rsa1024"])
def test_weak_or_unsupported_keys_are_refused_everywhere(weak_keys, name):
    from cryptography.hazmat.primitives import serialization

    priv = weak_keys[name]
    pub_pem = tokens.public_key_pem(priv)
    priv_pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for call in (
        lambda: tokens.load_public_key(pub_pem),
        lambda: tokens.load_private_key(priv_pem),
        lambda: tokens.algorithm_for(priv),
        lambda: tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60),
    ):
        with pytest.raises(tokens.TokenError) as err:
            call()
        assert err.value.reason == "unsupported_key"
    # A verifier handed such a key (never by a validated peers file) refuses before decoding.
    good = ec.generate_private_key(ec.SECP256R1())
    token = tokens.mint(good, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(token, audience=AUD, scope="api", key_for_subject=lambda s: priv.public_key())
    assert err.value.reason == "unsupported_key"


def test_rsa_2048_is_the_smallest_accepted():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert tokens.algorithm_for(key) == "RS256"
    assert tokens.algorithm_for(key.public_key()) == "RS256"


def test_other_key_types_are_unsupported():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed448

    key = ed448.Ed448PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(tokens.TokenError) as err:
        tokens.load_public_key(pem)
    assert err.value.reason == "unsupported_key"
    with pytest.raises(tokens.TokenError) as err:
        tokens.algorithm_for(key)  # type: ignore[arg-type]
    assert err.value.reason == "unsupported_key"
    with pytest.raises(tokens.TokenError) as err:
        tokens.load_public_key("not a key")
    assert err.value.reason == "bad_key"


# -- to the letter: each test below kills mutants scripts/mutate found surviving -------------------


def test_token_error_text_and_fields():
    err = tokens.TokenError("bad_signature", "detail here")
    assert (str(err), err.reason, err.detail) == (
        "bad_signature: detail here",
        "bad_signature",
        "detail here",
    )
    bare = tokens.TokenError("expired")
    assert (str(bare), bare.reason, bare.detail) == ("expired", "expired", "")


@pytest.mark.parametrize("as_text", [True, False])
def test_private_keys_load_from_text_or_bytes_and_deckhouse_labels(keypair, as_text):
    from cryptography.hazmat.primitives import serialization

    priv, pub = keypair
    pem = tokens.private_key_pem(priv)
    if isinstance(priv, ed25519.Ed25519PrivateKey):
        pem = pem.replace("PRIVATE KEY", "ED25519 PRIVATE KEY")  # Deckhouse's label
    loaded = tokens.load_private_key(pem if as_text else pem.encode())
    assert tokens.public_key_pem(loaded) == tokens.public_key_pem(pub)
    token = tokens.mint(loaded, subject=SUB, audience=AUD, scope="api", ttl_seconds=60)
    assert verify(token, pub).subject == SUB
    for bad in ("garbage", pem.replace("PRIVATE", "PUBLIC")):
        with pytest.raises(tokens.TokenError) as err:
            tokens.load_private_key(bad)
        assert err.value.reason == "bad_key"
    from cryptography.hazmat.primitives.asymmetric import ed448

    other = ed448.Ed448PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(tokens.TokenError) as err:
        tokens.load_private_key(other)
    assert err.value.reason == "unsupported_key"


def test_minted_claims():
    priv = ed25519.Ed25519PrivateKey.generate()
    token = tokens.mint(
        priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60, issuer="me", now=1000
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.pop("jti")
    assert claims == {
        "iss": "me",
        "sub": SUB,
        "aud": AUD,
        "scope": "api",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1060,
    }
    assert len(jti) == 36
    assert tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60) != token
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert (
        verify(
            tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60),
            priv.public_key(),
        ).issuer
        == "apiproxy"
    )  # the default issuer


def test_refused_algorithm_is_named():
    priv = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode({"sub": SUB, "aud": AUD, "exp": 2**40}, "k" * 32, algorithm="HS256")
    with pytest.raises(tokens.TokenError) as err:
        verify(token, priv.public_key())
    assert (err.value.reason, err.value.detail) == ("algorithm_not_allowed", "HS256")


def test_time_checks_at_their_exact_edges():
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = priv.public_key()
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60, now=1000)
    leeway = tokens.LEEWAY_SECONDS
    # exp: valid strictly before exp + leeway.
    assert verify(token, pub, now=1060 + leeway - 1).subject == SUB
    for now in (1060 + leeway, 1060 + leeway + 1):
        with pytest.raises(tokens.TokenError) as err:
            verify(token, pub, now=now)
        assert err.value.reason == "expired"
    # nbf (and iat, the same instant): valid from nbf - leeway on.
    assert verify(token, pub, now=1000 - leeway).subject == SUB
    with pytest.raises(tokens.TokenError) as err:
        verify(token, pub, now=1000 - leeway - 1)
    assert err.value.reason == "not_yet_valid"
    only_iat = jwt.encode(
        {"sub": SUB, "aud": AUD, "scope": "api", "iat": 1000, "exp": 5000}, priv, algorithm="EdDSA"
    )
    assert verify(only_iat, pub, now=1000 - leeway).subject == SUB
    with pytest.raises(tokens.TokenError) as err:
        verify(only_iat, pub, now=1000 - leeway - 1)
    assert err.value.reason == "issued_in_future"
    # The leeway argument is honoured (0: no slack at all).
    with pytest.raises(tokens.TokenError) as err:
        verify(token, pub, now=1060, leeway=0)
    assert err.value.reason == "expired"


def test_verify_cache_counts_and_passes_its_leeway_on():
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = priv.public_key()
    cache = tokens.VerifyCache()
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60, now=1000)

    def check(**kw):
        return cache.verify(
            token,
            audience=AUD,
            scope="api",
            key_for_subject=lambda s: pub if s == SUB else None,
            **kw,
        )

    for _ in range(3):
        assert check(now=1010).subject == SUB
    assert (cache.hits, cache.misses) == (2, 1)
    # A miss with leeway 0 after exp is refused (a default leeway would still accept it).
    with pytest.raises(tokens.TokenError) as err:
        check(now=1061, leeway=0)
    assert err.value.reason == "expired"
    assert cache.misses == 2


def test_refusal_details(weak_keys):
    """The detail of each refusal (logged for operators, never sent to the caller)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed448

    def refusal(call):
        with pytest.raises(tokens.TokenError) as err:
            call()
        return err.value.reason, err.value.detail

    assert refusal(lambda: tokens.algorithm_for(weak_keys["p384"])) == (
        "unsupported_key",
        "EC curve secp384r1",
    )
    assert refusal(lambda: tokens.algorithm_for(weak_keys["rsa1024"])) == (
        "unsupported_key",
        "RSA key shorter than 2048 bits",
    )
    assert refusal(lambda: tokens.algorithm_for(object())) == ("unsupported_key", "object")
    assert refusal(lambda: tokens.load_public_key("garbage")) == ("bad_key", "not a PEM public key")
    ed448_pem = (
        ed448.Ed448PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert refusal(lambda: tokens.load_public_key(ed448_pem)) == (
        "unsupported_key",
        "Ed448PublicKey",
    )
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = priv.public_key()
    other = tokens.mint(priv, subject="someone", audience=AUD, scope="x", ttl_seconds=60)
    assert refusal(lambda: verify(other, pub)) == ("unknown_subject", "someone")
    es = tokens.mint(
        ec.generate_private_key(ec.SECP256R1()),
        subject=SUB,
        audience=AUD,
        scope="api",
        ttl_seconds=60,
    )
    assert refusal(lambda: verify(es, pub)) == ("algorithm_mismatch", "ES256 token for a EdDSA key")
    no_exp = jwt.encode({"sub": SUB, "aud": AUD, "scope": "api"}, priv, algorithm="EdDSA")
    assert refusal(lambda: verify(no_exp, pub)) == ("missing_claim", "exp")
    bad_exp = jwt.encode({"sub": SUB, "aud": AUD, "exp": "x"}, priv, algorithm="EdDSA")
    assert refusal(lambda: verify(bad_exp, pub)) == ("invalid", "exp is not a number")
    wrong = tokens.mint(priv, subject=SUB, audience=AUD, scope="other", ttl_seconds=60)
    assert refusal(lambda: verify(wrong, pub)) == ("wrong_scope", "other")
    no_scope = jwt.encode({"sub": SUB, "aud": AUD, "exp": 2**40}, priv, algorithm="EdDSA")
    assert refusal(lambda: verify(no_scope, pub)) == ("wrong_scope", "None")


def test_claims_carry_issuer_and_expiry():
    priv = ed25519.Ed25519PrivateKey.generate()
    token = tokens.mint(priv, subject=SUB, audience=AUD, scope="api", ttl_seconds=60, now=1000)
    claims = verify(token, priv.public_key(), now=1000)
    assert (claims.issuer, claims.expires_at, claims.audience) == ("apiproxy", 1060.0, AUD)
    assert isinstance(claims.expires_at, float)
    anonymous = jwt.encode(
        {"sub": SUB, "aud": AUD, "scope": "api", "exp": 1060}, priv, algorithm="EdDSA"
    )
    assert verify(anonymous, priv.public_key(), now=1000).issuer == ""


def test_public_key_pem_of_a_public_key():
    priv = ed25519.Ed25519PrivateKey.generate()
    assert tokens.public_key_pem(priv.public_key()) == tokens.public_key_pem(priv)


def test_verify_cache_needs_room_for_one():
    with pytest.raises(ValueError, match="max_entries must be positive"):
        tokens.VerifyCache(max_entries=0)
    assert tokens.VerifyCache(max_entries=1).max_entries == 1


def test_private_key_refusal_details_and_cache_defaults():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed448

    with pytest.raises(tokens.TokenError) as err:
        tokens.load_private_key("garbage")
    assert (err.value.reason, err.value.detail) == ("bad_key", "not an unencrypted PEM private key")
    pem = ed448.Ed448PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(tokens.TokenError) as err:
        tokens.load_private_key(pem)
    assert (err.value.reason, err.value.detail) == ("unsupported_key", "Ed448PrivateKey")
    assert tokens.VerifyCache().max_entries == 1024
    with pytest.raises(ValueError, match=r"^max_entries must be positive$") as info:
        tokens.VerifyCache(max_entries=-1)
    assert str(info.value) == "max_entries must be positive"


def test_a_non_numeric_nbf_is_invalid_not_a_crash():
    priv = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(
        {"sub": SUB, "aud": AUD, "scope": "api", "exp": 2**40, "nbf": "soon"},
        priv,
        algorithm="EdDSA",
    )
    with pytest.raises(tokens.TokenError) as err:
        verify(token, priv.public_key())
    assert (err.value.reason, err.value.detail) == ("invalid", "nbf is not a number")
