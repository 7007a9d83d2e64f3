"""The serving TLS context, and swapping it on reload without re-binding the listener.

The listening socket keeps one `SSLContext` for its whole life. Its `sni_callback` runs during every
ClientHello (OpenSSL calls it with or without SNI) and moves the handshake onto the most recent
context, so a new serving certificate or a new set of peer anchors applies to the next handshake
while open connections (and their watches) carry on.

The TLS layer only checks that a client certificate chains to *some* peer's anchor (the union).
Which peer it is gets decided per request in Python (`authn`), against each peer's own anchors.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509

from apiproxy.errors import UserError


class TLSConfigError(UserError):
    """The serving certificate or key cannot be used."""


def build_context(
    cert_file: str | Path, key_file: str | Path, client_ca_pem: str
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError:
        # ssl's error does not say which file (its filename is None): find it ourselves.
        missing = [str(f) for f in (cert_file, key_file) if not Path(f).exists()]
        raise TLSConfigError(f"{', '.join(missing) or cert_file}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSConfigError(
            f"{cert_file}, {key_file}: not a PEM certificate chain and matching private key"
            f" ({type(exc).__name__})"
        ) from None
    # Client certificates are optional at this layer: JWT-only peers exist. A certificate that is
    # presented must chain to a peer anchor, else the handshake fails (as with kube-apiserver).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # A peer's clientCA may be an intermediate; it is a trust anchor for that peer on its own.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ServerTLS:
    """A fixed listening context that hands each handshake to the latest built context."""

    def __init__(self, cert_file: str | Path, key_file: str | Path, client_ca_pem: str) -> None:
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self._lock = threading.Lock()
        self._current = build_context(cert_file, key_file, client_ca_pem)
        self._client_ca_pem = client_ca_pem
        self.generation = 0
        self.listening = build_context(cert_file, key_file, client_ca_pem)
        self.listening.sni_callback = self._on_client_hello

    @property
    def current(self) -> ssl.SSLContext:
        return self._current

    def _on_client_hello(self, sslobj: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._current
        if sslobj.context is not current:
            sslobj.context = current

    def rebuild(self, *, client_ca_pem: str | None = None) -> None:
        """Re-read the certificate and key files (and optionally new anchors); raise if unusable."""
        ca = self._client_ca_pem if client_ca_pem is None else client_ca_pem
        ctx = build_context(self.cert_file, self.key_file, ca)
        with self._lock:
            self._current = ctx
            self._client_ca_pem = ca
            self.generation += 1


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """The verified client leaf certificate of a connection, if one was presented."""
    if transport is None:
        return None
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return None
    return _parse_der(der)


_cache: dict[bytes, x509.Certificate] = {}


def _parse_der(der: bytes) -> x509.Certificate:
    cert = _cache.get(der)
    if cert is None:
        cert = x509.load_der_x509_certificate(der)
        if len(_cache) > 1024:
            _cache.clear()
        _cache[der] = cert
    return cert
