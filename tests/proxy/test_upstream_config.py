"""Where the upstream is and how the proxy authenticates to it (`apiproxy/upstream.py`): flags,
kubeconfig and in-cluster sources, the token file, and the client TLS context they produce.
The end-to-end trust checks (impostor upstreams) are in tests/hardening/test_upstream_trust.py."""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from apiproxy import pki, upstream
from apiproxy.upstream import TokenSource, UpstreamConfig, UpstreamError


@pytest.fixture(scope="module")
def ca() -> pki.KeyPair:
    return pki.make_ca("upstream CA")


@pytest.fixture(scope="module")
def client(ca: pki.KeyPair) -> pki.KeyPair:
    return pki.issue(ca, "apiproxy", client=True)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the token file -------------------------------------------------------------------------------


def test_token_file_is_re_read_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    tok = TokenSource(path=path)
    assert tok.get() == "one"
    assert tok.refresh() is False  # unchanged file: not even re-read
    path.write_text("two")
    assert tok.refresh() is True
    assert tok.get() == "two"
    os.utime(path, ns=(1, 1))  # touched, same content: re-read, not a change
    assert tok.refresh() is False
    assert tok.get() == "two"
    # A missing or empty file keeps the last good token.
    path.write_text("")
    assert tok.refresh() is False
    assert tok.get() == "two"
    path.unlink()
    assert tok.refresh() is False
    assert tok.get() == "two"
    path.write_text("three")
    assert tok.refresh() is True
    assert tok.get() == "three"


def test_token_file_must_be_usable_at_start(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match=r"token: cannot read token file \(FileNotFound"):
        TokenSource(path=tmp_path / "token")
    (tmp_path / "token").write_text("  \n")
    with pytest.raises(UpstreamError, match="token file is empty"):
        TokenSource(path=tmp_path / "token")
    (tmp_path / "token").write_bytes(b"\xff\xfe secret")
    with pytest.raises(UpstreamError, match=r"cannot read token file \(UnicodeDecodeError\)") as e:
        TokenSource(path=tmp_path / "token")
    assert "secret" not in str(e.value)


def test_inline_token_is_fixed() -> None:
    tok = TokenSource(value="inline")
    assert tok.get() == "inline"
    assert tok.refresh() is False
    assert TokenSource().get() is None


# -- the URL and the TLS context -----------------------------------------------------------------


def test_request_target_keeps_the_raw_bytes_and_the_path_prefix() -> None:
    cfg = UpstreamConfig(url=URL("https://api.example:6443/prefix/"))
    assert cfg.request_target("/api/v1/pods?x=%2F") == "/prefix/api/v1/pods?x=%2F"
    cfg.url = URL("https://other.example")
    assert cfg.request_target("/version") == "/version"


def test_tls_context_verifies_by_default(ca: pki.KeyPair) -> None:
    ctx = UpstreamConfig(url=URL("https://127.0.0.1:6443"), ca_pem=ca.cert_pem).ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert subjects == [{"commonName": "upstream CA"}]
    system = UpstreamConfig(url=URL("https://127.0.0.1:6443")).ssl_context()
    assert isinstance(system, ssl.SSLContext)
    assert system.verify_mode == ssl.CERT_REQUIRED
    assert system.check_hostname is True
    assert UpstreamConfig(url=URL("https://h")).verifies_tls is True


def test_tls_context_insecure_and_plain_http(ca: pki.KeyPair) -> None:
    cfg = UpstreamConfig(url=URL("https://h"), ca_pem=None, insecure_skip_verify=True)
    ctx = cfg.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    assert cfg.verifies_tls is False
    plain = UpstreamConfig(url=URL("http://127.0.0.1:8080"))
    assert plain.ssl_context() is False
    assert plain.verifies_tls is False


def test_client_certificate_is_loaded_and_a_bad_one_refused(
    ca: pki.KeyPair, client: pki.KeyPair
) -> None:
    cfg = UpstreamConfig(
        url=URL("https://h"), client_cert_pem=client.cert_pem, client_key_pem=client.key_pem
    )
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)
    other = pki.issue(ca, "other", client=True)
    cfg.client_key_pem = other.key_pem  # a key that does not match the certificate
    with pytest.raises(UpstreamError, match=r"client certificate/key unusable \(SSLError\)") as e:
        cfg.ssl_context()
    assert "PRIVATE KEY" not in str(e.value)


# -- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h", "must be https://HOST[:PORT]"),
        ("https://", "must be https://HOST[:PORT]"),
        ("h:6443", "must be https://HOST[:PORT]"),
        ("https://h/?a=1", "must not have a query or fragment"),
        ("https://h/#x", "must not have a query or fragment"),
        ("https://[::1", "is not a URL"),
    ],
)
def test_bad_upstream_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(UpstreamError) as e:
        upstream.from_flags(url, None, None)
    assert str(e.value).startswith("--upstream: ")
    assert message in str(e.value)


def test_from_flags(tmp_path: Path, ca: pki.KeyPair) -> None:
    (tmp_path / "ca").write_text(ca.cert_pem)
    (tmp_path / "token").write_text("t\n")
    cfg = upstream.from_flags(
        "https://127.0.0.1:6443", str(tmp_path / "ca"), str(tmp_path / "token")
    )
    assert cfg.ca_pem == ca.cert_pem
    assert cfg.token is not None
    assert cfg.token.get() == "t"
    assert cfg.source == "flags"
    bare = upstream.from_flags("https://h", None, None)
    assert bare.ca_pem is None
    assert bare.token is None
    with pytest.raises(UpstreamError, match=r"--upstream-ca .*/token: no PEM certificate"):
        upstream.from_flags("https://h", str(tmp_path / "token"), None)
    with pytest.raises(UpstreamError, match=r"missing: cannot read CA bundle \(FileNotFound"):
        upstream.from_flags("https://h", str(tmp_path / "missing"), None)


# -- in-cluster ----------------------------------------------------------------------------------


def sa_dir(tmp: Path, ca: pki.KeyPair) -> Path:
    d = tmp / "sa"
    d.mkdir(exist_ok=True)
    (d / "ca.crt").write_text(ca.cert_pem)
    (d / "token").write_text("sa-token\n")
    return d


def test_in_cluster(tmp_path: Path, ca: pki.KeyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    d = sa_dir(tmp_path, ca)
    cfg = upstream.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=d
    )
    assert (cfg.url.scheme, cfg.url.host, cfg.url.port) == ("https", "10.96.0.1", 443)
    assert cfg.ca_pem == ca.cert_pem
    assert cfg.token is not None
    assert cfg.token.get() == "sa-token"
    assert cfg.token.path == d / "token"
    assert cfg.source == "in-cluster"
    assert cfg.verifies_tls is True
    # IPv6 service addresses are bracketed; the environment is read when none is given.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert str(upstream.in_cluster(sa_dir=d).url) == "https://[fd00::1]:6443"


@pytest.mark.parametrize(
    ("env", "broken", "message"),
    [
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None, "KUBERNETES_SERVICE_HOST/PORT unset"),
        ({"KUBERNETES_SERVICE_PORT": "443"}, None, "KUBERNETES_SERVICE_HOST/PORT unset"),
        ({}, None, "no upstream: give --upstream or --kubeconfig"),
        (None, "ca.crt", "ca.crt: cannot read service-account CA (FileNotFoundError)"),
        (None, "token", "token: cannot read token file (FileNotFoundError)"),
        (None, "ca.crt=garbage", "ca.crt: no PEM certificate"),
    ],
)
def test_in_cluster_refusals(
    tmp_path: Path, ca: pki.KeyPair, env: dict[str, str] | None, broken: str | None, message: str
) -> None:
    d = sa_dir(tmp_path, ca)
    if broken == "ca.crt=garbage":
        (d / "ca.crt").write_text("garbage")
    elif broken:
        (d / broken).unlink()
    if env is None:
        env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(UpstreamError) as e:
        upstream.in_cluster(env, sa_dir=d)
    assert message in str(e.value)


# -- kubeconfig ----------------------------------------------------------------------------------


def write_kubeconfig(
    tmp: Path,
    cluster: dict[str, Any],
    user: dict[str, Any] | None = None,
    *,
    current: str | None = "c",
    extra_contexts: list[dict[str, Any]] | None = None,
) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]
        + (extra_contexts or []),
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user or {}}],
    }
    if current is not None:
        doc["current-context"] = current
    path = tmp / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_inline_data(tmp_path: Path, ca: pki.KeyPair, client: pki.KeyPair) -> None:
    path = write_kubeconfig(
        tmp_path,
        {
            "server": "https://127.0.0.1:6443",
            "certificate-authority-data": b64(ca.cert_pem),
            "tls-server-name": "kubernetes",
        },
        {
            "token": "inline-token",
            "client-certificate-data": b64(client.cert_pem),
            "client-key-data": b64(client.key_pem),
        },
    )
    cfg = upstream.from_kubeconfig(path)
    assert str(cfg.url) == "https://127.0.0.1:6443"
    assert cfg.ca_pem == ca.cert_pem
    assert cfg.tls_server_name == "kubernetes"
    assert cfg.token is not None
    assert cfg.token.get() == "inline-token"
    assert cfg.token.path is None
    assert cfg.client_cert_pem == client.cert_pem
    assert cfg.client_key_pem == client.key_pem
    assert cfg.insecure_skip_verify is False
    assert cfg.source == f"kubeconfig {path} context c"


def test_kubeconfig_files_are_relative_to_it(
    tmp_path: Path, ca: pki.KeyPair, client: pki.KeyPair
) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "certs" / "c.crt").write_text(client.cert_pem)
    (tmp_path / "certs" / "c.key").write_text(client.key_pem)
    (tmp_path / "certs" / "token").write_text("file-token\n")
    path = write_kubeconfig(
        tmp_path,
        {"server": "https://h:6443", "certificate-authority": "certs/ca.crt"},
        {
            "tokenFile": "certs/token",
            "token": "ignored: tokenFile wins",
            "client-certificate": str(tmp_path / "certs" / "c.crt"),  # absolute
            "client-key": "certs/c.key",
        },
    )
    cfg = upstream.from_kubeconfig(path)
    assert cfg.ca_pem == ca.cert_pem
    assert cfg.token is not None
    assert cfg.token.get() == "file-token"
    assert cfg.token.path == tmp_path / "certs" / "token"
    assert cfg.client_cert_pem == client.cert_pem
    assert cfg.client_key_pem == client.key_pem


def test_kubeconfig_context_is_chosen(tmp_path: Path, ca: pki.KeyPair) -> None:
    other = {"name": "o", "context": {"cluster": "k"}}  # no user: no credentials at all
    path = write_kubeconfig(
        tmp_path,
        {"server": "https://h", "certificate-authority-data": b64(ca.cert_pem)},
        {"token": "t"},
        current=None,
        extra_contexts=[other],
    )
    with pytest.raises(UpstreamError, match="no current-context; give --context"):
        upstream.from_kubeconfig(path)
    cfg = upstream.from_kubeconfig(path, context="o")
    assert cfg.token is None
    assert cfg.source.endswith("context o")
    assert upstream.from_kubeconfig(path, context="c").token is not None
    with pytest.raises(UpstreamError, match="no context named 'missing'"):
        upstream.from_kubeconfig(path, context="missing")


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        ({}, {}, "cluster 'k' has no server"),
        ({"server": "https://h", "certificate-authority-data": 7}, {}, "must be base64 text"),
        ({"server": "https://h", "certificate-authority-data": "%%"}, {}, "not valid base64 PEM"),
        (
            {"server": "https://h", "certificate-authority-data": b64("no pem here")},
            {},
            "certificate authority: no PEM certificate",
        ),
        (
            {
                "server": "https://h",
                "certificate-authority-data": b64(
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                ),
            },
            {},
            "cannot be parsed as PEM certificates",
        ),
        ({"server": "https://h", "certificate-authority": "nope"}, {}, "nope: cannot read"),
        ({"server": "https://h"}, {"exec": {"command": "x"}}, "exec and auth-provider"),
        ({"server": "https://h"}, {"auth-provider": {"name": "x"}}, "exec and auth-provider"),
        ({"server": "https://h"}, {"client-key-data": b64("k")}, "must be given together"),
        ({"server": "https://h"}, {"client-certificate": "c.crt"}, "c.crt: cannot read"),
        ({"server": "https://h"}, {"client-key": "c.key"}, "c.key: cannot read"),
        ({"server": "https://h", "insecure-skip-tls-verify": "false"}, {}, "must be true or false"),
        ({"server": "https://h/?q=1"}, {}, "must not have a query"),
    ],
)
def test_kubeconfig_refusals(
    tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any], message: str
) -> None:
    path = write_kubeconfig(tmp_path, cluster, user)
    with pytest.raises(UpstreamError) as e:
        upstream.from_kubeconfig(path)
    assert str(e.value).startswith(str(path)) or str(e.value).startswith(str(tmp_path))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("a: [", "not valid YAML"), ("- a list\n", "not a kubeconfig"), ("", "not a kubeconfig")],
)
def test_kubeconfig_must_be_a_yaml_mapping(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "kc").write_text(text)
    with pytest.raises(UpstreamError, match=message):
        upstream.from_kubeconfig(tmp_path / "kc")
    with pytest.raises(UpstreamError, match="cannot read kubeconfig"):
        upstream.from_kubeconfig(tmp_path / "missing")


def test_kubeconfig_refers_to_missing_entries(tmp_path: Path) -> None:
    doc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}, "junk"],
        "clusters": [{"name": "k", "cluster": "not a mapping"}],
    }
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    with pytest.raises(UpstreamError, match="no cluster named 'k'"):
        upstream.from_kubeconfig(tmp_path / "kc")
    doc["clusters"] = [{"name": "k", "cluster": {"server": "https://h"}}]
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    with pytest.raises(UpstreamError, match="no user named 'u'"):
        upstream.from_kubeconfig(tmp_path / "kc")


def test_kubeconfig_insecure_skip_tls_verify(
    tmp_path: Path, ca: pki.KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    # kubectl refuses a CA together with the insecure flag; so do we.
    path = write_kubeconfig(
        tmp_path,
        {
            "server": "https://h",
            "certificate-authority-data": b64(ca.cert_pem),
            "insecure-skip-tls-verify": True,
        },
    )
    with pytest.raises(UpstreamError, match="mutually exclusive"):
        upstream.from_kubeconfig(path)
    path = write_kubeconfig(
        tmp_path, {"server": "https://h", "insecure-skip-tls-verify": True}, {"token": "secret-t"}
    )
    cfg = upstream.from_kubeconfig(path)
    assert cfg.insecure_skip_verify is True
    assert cfg.verifies_tls is False
    err = capsys.readouterr().err
    assert "upstream_tls_verification_disabled" in err
    assert "secret-t" not in err
    path = write_kubeconfig(tmp_path, {"server": "https://h", "insecure-skip-tls-verify": False})
    assert upstream.from_kubeconfig(path).verifies_tls is True
    assert "upstream_tls_verification_disabled" not in capsys.readouterr().err


# -- to the letter: each test below kills mutants scripts/mutate found surviving -------------------


def test_an_unchanged_token_file_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("one")
    tok = TokenSource(path=path)
    reads: list[Path] = []
    real = Path.read_text

    def counting(self: Path, *a: Any, **kw: Any) -> str:
        reads.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", counting)
    assert tok.refresh() is False
    assert tok.refresh() is False
    assert reads == []
    path.write_text("two")
    assert tok.refresh() is True
    assert reads == [path]


def test_a_prefix_keeps_its_last_character() -> None:
    cfg = UpstreamConfig(url=URL("https://h/apiX/"))
    assert cfg.request_target("/version") == "/apiX/version"


async def test_the_client_context_offers_http11_on_a_real_handshake(
    tmp_path: Path, ca: pki.KeyPair
) -> None:
    import asyncio

    server_pair = pki.server_cert_for_loopback(ca)
    (tmp_path / "s.crt").write_text(server_pair.cert_pem)
    (tmp_path / "s.key").write_text(server_pair.key_pem)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    chosen: list[str | None] = []

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        chosen.append(w.get_extra_info("ssl_object").selected_alpn_protocol())
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    ctx = UpstreamConfig(url=URL(f"https://127.0.0.1:{port}"), ca_pem=ca.cert_pem).ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        await r.read()
        w.close()
    finally:
        server.close()
        await server.wait_closed()
    assert chosen == ["http/1.1"]


def test_client_key_material_stays_in_a_private_temp_dir(
    tmp_path: Path, client: pki.KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    modes: list[int] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & os.O_CREAT:
            modes.append(mode)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(upstream.os, "open", recording_open)
    cfg = UpstreamConfig(
        url=URL("https://h"), client_cert_pem=client.cert_pem, client_key_pem=client.key_pem
    )
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)
    assert modes == [0o600]
    assert list(tmp_path.iterdir()) == []  # nothing left behind, nothing in the working dir
    # Half a pair (only possible when built in code) is no client certificate at all.
    half = UpstreamConfig(url=URL("https://h"), client_cert_pem=client.cert_pem)
    assert isinstance(half.ssl_context(), ssl.SSLContext)


def test_plain_http_upstreams_are_accepted_by_flags() -> None:
    cfg = upstream.from_flags("http://127.0.0.1:8080", None, None)
    assert cfg.url.scheme == "http"
    assert cfg.verifies_tls is False


def test_in_cluster_errors_to_the_letter(tmp_path: Path, ca: pki.KeyPair) -> None:
    d = sa_dir(tmp_path, ca)
    with pytest.raises(UpstreamError) as e:
        upstream.in_cluster({}, sa_dir=d)
    assert str(e.value) == (
        "no upstream: give --upstream or --kubeconfig, or run in a pod "
        "(KUBERNETES_SERVICE_HOST/PORT unset)"
    )
    with pytest.raises(UpstreamError) as e:
        upstream.in_cluster(
            {"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "x"}, sa_dir=d
        )
    assert str(e.value) == "in-cluster: 'https://h:x' is not a URL"


def test_kubeconfig_errors_to_the_letter(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path, {"server": "https://h"}, {"token": "t"})

    def error(context: str | None = None) -> str:
        with pytest.raises(UpstreamError) as e:
            upstream.from_kubeconfig(path, context=context)
        return str(e.value)

    assert error("nope") == f"{path}: no context named 'nope'"
    doc = yaml.safe_load(path.read_text())
    doc["contexts"][0]["context"]["cluster"] = "gone"
    path.write_text(yaml.safe_dump(doc))
    assert error() == f"{path}: no cluster named 'gone'"
    doc["contexts"][0]["context"] = {"cluster": "k", "user": "gone"}
    path.write_text(yaml.safe_dump(doc))
    assert error() == f"{path}: no user named 'gone'"
    for cluster, user, message in [
        (
            {"server": "https://h", "certificate-authority": "ca.crt"},
            {},
            f"{tmp_path / 'ca.crt'}: cannot read certificate-authority (FileNotFoundError)",
        ),
        (
            {"server": "https://h"},
            {"client-certificate": "c.crt", "client-key": "c.key"},
            f"{tmp_path / 'c.crt'}: cannot read client-certificate (FileNotFoundError)",
        ),
        (
            {"server": "https://h"},
            {"client-certificate-data": "%%", "client-key-data": "%%"},
            f"{path}: client-certificate-data: not valid base64 PEM",
        ),
        (
            {"server": "https://h"},
            {"client-certificate-data": b64("c"), "client-key-data": "%%"},
            f"{path}: client-key-data: not valid base64 PEM",
        ),
    ]:
        path = write_kubeconfig(tmp_path, cluster, user)
        assert error() == message
    (tmp_path / "c.crt").write_text("c")
    path = write_kubeconfig(
        tmp_path, {"server": "https://h"}, {"client-certificate": "c.crt", "client-key": "k"}
    )
    assert error() == f"{tmp_path / 'k'}: cannot read client-key (FileNotFoundError)"


def test_kubeconfig_without_client_certificate_has_none(tmp_path: Path) -> None:
    cfg = upstream.from_kubeconfig(write_kubeconfig(tmp_path, {"server": "https://h"}))
    assert cfg.client_cert_pem is None
    assert cfg.client_key_pem is None
    assert cfg.token is None


def test_insecure_warning_names_the_source_and_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = write_kubeconfig(
        tmp_path, {"server": "https://h:6443", "insecure-skip-tls-verify": True}
    )
    upstream.from_kubeconfig(path)
    (rec,) = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if "upstream_tls_verification_disabled" in line
    ]
    assert rec["event"] == "upstream_tls_verification_disabled"
    assert rec["source"] == f"kubeconfig {path} context c"
    assert rec["server"] == "https://h:6443"
    assert rec["level"] == "warning"
