"""Where the real kube-apiserver is and how we authenticate to it.

Three sources, as client libraries have them: explicit flags (`--upstream`, `--upstream-ca`,
`--upstream-token-file`), a kubeconfig (`--kubeconfig [--context]`), or the in-cluster service
account (KUBERNETES_SERVICE_HOST/PORT and /var/run/secrets/kubernetes.io/serviceaccount/).

The token comes from a file and is re-read when the file changes (bound service-account tokens
rotate hourly); `TokenSource.refresh()` is called by the reload loop and after an upstream 401.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import ssl
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from apiproxy.errors import UserError
from apiproxy.log import get_logger

_log = get_logger("apiproxy.upstream")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class UpstreamError(UserError):
    """The upstream configuration is unusable."""


class TokenSource:
    """A bearer token from a file (re-read on change) or an inline value (fixed)."""

    def __init__(self, *, path: str | Path | None = None, value: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._value = value
        self._stamp: tuple[int, int, int, int] | None = None
        if self.path is not None:
            self.refresh(strict=True)

    def get(self) -> str | None:
        return self._value

    def refresh(self, *, strict: bool = False) -> bool:
        """Re-read the file if it changed; True when the token changed. A missing or empty file
        keeps the last good token (unless `strict`, used at start-up)."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)
            if stamp == self._stamp and self._value is not None:
                return False
            text = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            if strict:
                raise UpstreamError(
                    f"{self.path}: cannot read token file ({type(exc).__name__})"
                ) from None
            return False
        if not text:
            if strict:
                raise UpstreamError(f"{self.path}: token file is empty")
            return False
        self._stamp = stamp
        changed = text != self._value
        self._value = text
        return changed


@dataclass
class UpstreamConfig:
    url: URL  # scheme://host:port[/prefix], no trailing slash
    ca_pem: str | None = None  # None: system trust store
    insecure_skip_verify: bool = False
    tls_server_name: str | None = None
    token: TokenSource | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    source: str = "flags"

    def request_target(self, raw_target: str) -> str:
        """The origin-form request-target upstream (the URL's path prefix, then the raw target
        byte for byte)."""
        return self.url.raw_path.rstrip("/") + raw_target

    def authorize(self, headers: MutableMapping[str, str]) -> None:
        """Add the proxy's own credential (the current token) to an upstream request."""
        token = self.token.get() if self.token is not None else None
        if token:
            headers["Authorization"] = f"Bearer {token}"

    @property
    def verifies_tls(self) -> bool:
        """Whether the upstream's certificate and host name are checked before the token is sent."""
        return self.url.scheme == "https" and not self.insecure_skip_verify

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.url.scheme == "http":
            return False
        ctx = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else None
        if ctx is None:
            ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_pem and self.client_key_pem:
            _load_chain_from_memory(ctx, self.client_cert_pem, self.client_key_pem)
        return ctx


def _load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # ssl can only load keys from files: a private temp dir, removed at once.
    with tempfile.TemporaryDirectory(prefix="apiproxy-") as d:
        cert = Path(d, "c.pem")
        key = Path(d, "k.pem")
        cert.write_text(cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as exc:
            raise UpstreamError(
                f"upstream client certificate/key unusable ({type(exc).__name__})"
            ) from None


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"{path}: cannot read {what} ({type(exc).__name__})") from None


def _check_url(url: str, what: str) -> URL:
    try:
        parsed = URL(url)
    except ValueError:
        raise UpstreamError(f"{what}: {url!r} is not a URL") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise UpstreamError(f"{what}: {url!r} must be https://HOST[:PORT]")
    if parsed.query_string or parsed.fragment:
        raise UpstreamError(f"{what}: {url!r} must not have a query or fragment")
    return parsed


def _check_ca(pem: str, where: str) -> str:
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise UpstreamError(f"{where}: no PEM certificate")
    try:
        ssl.create_default_context(cadata=pem)
    except ssl.SSLError:
        raise UpstreamError(f"{where}: cannot be parsed as PEM certificates") from None
    return pem


def from_flags(url: str, ca_file: str | None, token_file: str | None) -> UpstreamConfig:
    parsed = _check_url(url, "--upstream")
    ca = _check_ca(_read(ca_file, "CA bundle"), f"--upstream-ca {ca_file}") if ca_file else None
    token = TokenSource(path=token_file) if token_file else None
    return UpstreamConfig(url=parsed, ca_pem=ca, token=token, source="flags")


def in_cluster(env: dict[str, str] | None = None, sa_dir: Path = SA_DIR) -> UpstreamConfig:
    env = dict(os.environ) if env is None else env
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise UpstreamError(
            "no upstream: give --upstream or --kubeconfig, or run in a pod "
            "(KUBERNETES_SERVICE_HOST/PORT unset)"
        )
    try:
        ipaddress.IPv6Address(host)
        host = f"[{host}]"
    except ValueError:
        pass
    ca = _check_ca(_read(sa_dir / "ca.crt", "service-account CA"), str(sa_dir / "ca.crt"))
    return UpstreamConfig(
        url=_check_url(f"https://{host}:{port}", "in-cluster"),
        ca_pem=ca,
        token=TokenSource(path=sa_dir / "token"),
        source="in-cluster",
    )


def _b64(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UpstreamError(f"{where}: must be base64 text")
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise UpstreamError(f"{where}: not valid base64 PEM") from None


def _named(doc: dict[str, Any], kind: str, name: str, path: str) -> dict[str, Any]:
    for item in doc.get(kind) or []:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind[:-1])
            if isinstance(body, dict):
                return body
    raise UpstreamError(f"{path}: no {kind[:-1]} named {name!r}")


def from_kubeconfig(path: str | Path, context: str | None = None) -> UpstreamConfig:
    text = _read(path, "kubeconfig")
    base = Path(path).parent
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UpstreamError(f"{path}: not valid YAML") from None
    if not isinstance(doc, dict):
        raise UpstreamError(f"{path}: not a kubeconfig")
    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise UpstreamError(f"{path}: no current-context; give --context")
    ctx = _named(doc, "contexts", str(ctx_name), str(path))
    cluster = _named(doc, "clusters", str(ctx.get("cluster")), str(path))
    user = _named(doc, "users", str(ctx.get("user")), str(path)) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str):
        raise UpstreamError(f"{path}: cluster {ctx.get('cluster')!r} has no server")

    def rel(p: str) -> Path:
        return Path(p) if os.path.isabs(p) else base / p

    ca: str | None = None
    if "certificate-authority-data" in cluster:
        ca = _b64(cluster["certificate-authority-data"], f"{path}: certificate-authority-data")
    elif "certificate-authority" in cluster:
        ca = _read(rel(str(cluster["certificate-authority"])), "certificate-authority")
    if ca is not None:
        _check_ca(ca, f"{path}: certificate authority")
    if "exec" in user or "auth-provider" in user:
        raise UpstreamError(f"{path}: exec and auth-provider credentials are not supported")
    token: TokenSource | None = None
    if user.get("tokenFile"):
        token = TokenSource(path=rel(str(user["tokenFile"])))
    elif user.get("token"):
        token = TokenSource(value=str(user["token"]))
    cert_pem = key_pem = None
    if "client-certificate-data" in user:
        cert_pem = _b64(user["client-certificate-data"], f"{path}: client-certificate-data")
    elif "client-certificate" in user:
        cert_pem = _read(rel(str(user["client-certificate"])), "client-certificate")
    if "client-key-data" in user:
        key_pem = _b64(user["client-key-data"], f"{path}: client-key-data")
    elif "client-key" in user:
        key_pem = _read(rel(str(user["client-key"])), "client-key")
    if bool(cert_pem) != bool(key_pem):
        raise UpstreamError(f"{path}: client certificate and key must be given together")
    # Honoured as kubectl does (a development cluster may have nothing else), but loudly: the
    # proxy's token then goes to whoever answers. Only a real YAML boolean counts ("false" is not).
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise UpstreamError(f"{path}: insecure-skip-tls-verify must be true or false")
    if insecure and ca is not None:
        raise UpstreamError(
            f"{path}: certificate-authority and insecure-skip-tls-verify are mutually exclusive"
        )
    cfg = UpstreamConfig(
        url=_check_url(server, f"{path}: server"),
        ca_pem=ca,
        insecure_skip_verify=insecure,
        tls_server_name=cluster.get("tls-server-name"),
        token=token,
        client_cert_pem=cert_pem,
        client_key_pem=key_pem,
        source=f"kubeconfig {path} context {ctx_name}",
    )
    cfg.ssl_context()  # fail now, not on the first request
    if insecure:
        _log.warning("upstream_tls_verification_disabled", source=cfg.source, server=server)
    return cfg
