"""The serving TLS context (`apiproxy/tls.py`) to the letter: options, flags, ALPN, rebuilds and the
certificate parse memo. Each test kills mutants scripts/mutate found surviving."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from apiproxy import tls
from tests.proxy.conftest import World


@pytest.fixture
def files(world: World, tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text(world.server.cert_pem)
    key.write_text(world.server.key_pem)
    return cert, key


def test_context_options_add_to_the_defaults(files: tuple[Path, Path], world: World) -> None:
    ctx = tls.build_context(*files, world.ca_a.cert_pem)
    fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    wanted = ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    assert ctx.options & wanted == wanted
    assert ctx.options & fresh.options == fresh.options  # nothing the defaults set was dropped
    assert ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    assert ctx.verify_flags & fresh.verify_flags == fresh.verify_flags
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("commonName", "cluster-a client CA"),),)
    ]
    assert tls.build_context(*files, "").get_ca_certs() == []


def test_unusable_certificate_or_key_is_one_clear_error(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = files
    with pytest.raises(tls.TLSConfigError) as info:
        tls.build_context(cert, cert, "")
    assert str(info.value) == (
        f"{cert}, {cert}: not a PEM certificate chain and matching private key (SSLError)"
    )
    with pytest.raises(tls.TLSConfigError) as info:
        tls.build_context(tmp_path / "missing.crt", key, "")
    assert str(info.value) == f"{tmp_path / 'missing.crt'}: no such file"
    with pytest.raises(tls.TLSConfigError) as info:
        tls.build_context(cert, tmp_path / "missing.key", "")
    assert str(info.value) == f"{tmp_path / 'missing.key'}: no such file"
    with pytest.raises(tls.TLSConfigError) as info:
        tls.build_context(tmp_path / "a.crt", tmp_path / "a.key", "")
    assert str(info.value) == f"{tmp_path / 'a.crt'}, {tmp_path / 'a.key'}: no such file"


async def handshake(
    server_tls: tls.ServerTLS, world: World, tmp_path: Path
) -> tuple[str | None, bytes | None]:
    """One real handshake with the listening context: the ALPN chosen and the certificate seen."""
    seen: list[bytes | None] = []

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        obj = w.get_extra_info("ssl_object")
        seen.append(obj.getpeercert(binary_form=True))
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_tls.listening)
    port = server.sockets[0].getsockname()[1]
    ctx = world.client_ssl(world.client_a, tmp_path)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        alpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
        await _r.read()
        w.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await w.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return alpn, seen[0] if seen else None


async def test_handshakes_speak_http11_and_follow_rebuilds(
    files: tuple[Path, Path], world: World, tmp_path: Path
) -> None:
    server_tls = tls.ServerTLS(*files, world.ca_a.cert_pem)
    assert server_tls.generation == 0
    assert len(server_tls.listening.get_ca_certs()) == 1
    alpn, der = await handshake(server_tls, world, tmp_path)
    assert alpn == "http/1.1"
    assert der == world.client_a.cert.public_bytes(serialization.Encoding.DER)
    # New anchors, then a certificate-only rebuild (rotation): the anchors stay.
    server_tls.rebuild(client_ca_pem=world.ca_a.cert_pem + world.ca_b.cert_pem)
    assert server_tls.generation == 1
    server_tls.rebuild()
    assert server_tls.generation == 2
    assert len(server_tls.current.get_ca_certs()) == 2
    alpn, der = await handshake(server_tls, world, tmp_path)
    assert der is not None


def test_certificate_parses_are_memoised_and_bounded(world: World) -> None:
    der = world.client_a.cert.public_bytes(serialization.Encoding.DER)
    tls._cache.clear()
    first = tls._parse_der(der)
    assert first == world.client_a.cert
    assert tls._parse_der(der) is first
    assert tls._cache[der] is first
    tls._cache.clear()
    tls._cache.update({i.to_bytes(4, "big"): first for i in range(1024)})
    tls._parse_der(der)
    assert len(tls._cache) == 1025  # up to 1,024 kept, then one more before starting over
    other = world.client_b.cert.public_bytes(serialization.Encoding.DER)
    tls._parse_der(other)
    assert list(tls._cache) == [other]
    tls._cache.clear()


def test_peer_certificate_of_a_transport() -> None:
    class Transport:
        def __init__(self, obj: object) -> None:
            self.obj = obj

        def get_extra_info(self, name: str) -> object:
            assert name == "ssl_object"
            return self.obj

    class NoCert:
        def getpeercert(self, binary_form: bool) -> bytes:
            assert binary_form is True
            return b""

    assert tls.peer_certificate(None) is None
    assert tls.peer_certificate(Transport(None)) is None
    assert tls.peer_certificate(Transport(NoCert())) is None
