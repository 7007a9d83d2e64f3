"""The adversarial request table: every case is data, run by test_adversarial.py.

`expect`:
- "refuse": the answer is one of `codes` and nothing reaches the upstream;
- "forward": 200, and the upstream received exactly one request with this method, this target
  byte for byte, this body, the proxy's own Authorization and none of the client's credentials or
  impersonation headers;
- "either": a "refuse" or a "forward" (for shapes where both are safe; the run records which).
A case with `xfail` is a finding: the test is strict-xfail until the fix lands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REFUSE = frozenset({400, 401, 403})


@dataclass(frozen=True)
class Case:
    cls: str
    name: str
    method: str = "GET"
    target: str = "/api/v1/pods"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    raw: bytes | None = None  # the whole request as bytes (overrides method/target/headers/body)
    who: str | None = "a"  # client certificate: "a", "b" or None
    token: str | None = None  # tokens_util.make_token spec, sent as Authorization: Bearer
    expect: str = "refuse"
    codes: frozenset[int] = REFUSE
    xfail: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _raw(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + body


def _cases() -> list[Case]:
    c: list[Case] = []

    # ---- path tricks -----------------------------------------------------------------------
    def path(name: str, target: str, expect: str = "refuse", **kw: object) -> None:
        c.append(Case("path", name, target=target, expect=expect, **kw))  # type: ignore[arg-type]

    path("dotdot", "/api/v1/namespaces/x/pods/../../secrets")
    path("dotdot-nonresource", "/version/../api/v1/secrets")
    path("dot", "/api/v1/namespaces/x/./secrets")
    path("dotdot-at-root", "/../api/v1/secrets")
    path("double-slash", "/api/v1//secrets")
    path("leading-double-slash", "//api/v1/pods")
    path("empty-namespace-segment", "/api/v1/namespaces//pods")
    path("pct-slash", "/api/v1/namespaces/x/pods%2F..%2F..%2Fsecrets")
    path("pct-slash-lower", "/api/v1/namespaces/x/pods%2f..%2f..%2fsecrets")
    path("pct-dot", "/api/v1/namespaces/x/pods/%2e%2e/%2e%2e/secrets")
    path("pct-dot-upper", "/api/v1/namespaces/x/pods/%2E%2E/%2E%2E/secrets")
    path("pct-dot-mixed", "/api/v1/namespaces/x/pods/.%2e/.%2E/secrets")
    path("double-pct-slash", "/api/v1/namespaces/x/pods%252F..%252F..%252Fsecrets")
    path("double-pct-dot", "/api/v1/namespaces/x/pods/%252e%252e/secrets")
    path("pct-letter", "/api/v1/%70ods")  # %70 = 'p'
    path("pct-resource-secrets", "/api/v1/namespaces/x/%73ecrets")
    path("pct-null", "/api/v1/pods%00")
    path("pct-bad", "/api/v1/pods%zz")
    path("semicolon-param", "/api/v1/pods;x=y")
    path("semicolon-segment", "/api/v1/namespaces/x/secrets;/../pods")
    path("semicolon-resource", "/api/v1/namespaces/x/pods;secrets")
    path("backslash", "/api/v1/namespaces/x/pods\\..\\secrets")
    path("backslash-lead", "\\api\\v1\\secrets")
    path("pct-backslash", "/api/v1/namespaces/x/pods%5C..%5Csecrets")
    path("overlong-utf8-dot-pct", "/api/v1/namespaces/x/pods/%c0%ae%c0%ae/secrets")
    path("overlong-utf8-slash-pct", "/api/v1/namespaces/x/pods%c0%af..%c0%afsecrets")
    path("fullwidth-dot-pct", "/api/v1/namespaces/x/pods/%ef%bc%8e%ef%bc%8e/secrets")
    path("fragment", "/api/v1/secrets#/api/v1/pods")
    path("fragment-pct", "/api/v1/pods%23/../secrets")
    path("question-in-path-pct", "/api/v1/secrets%3F/api/v1/pods")
    path("uppercase-resource", "/api/v1/namespaces/x/Secrets")
    path("uppercase-allowed-resource", "/api/v1/namespaces/x/PODS")
    path("uppercase-prefix", "/API/v1/secrets")
    path("uppercase-version", "/api/V1/secrets")
    path("uppercase-namespaces", "/api/v1/NAMESPACES/x/secrets")
    path("trailing-slash", "/api/v1/pods/")
    path("trailing-slash-named", "/api/v1/namespaces/istio-system/configmaps/istio/")
    path("trailing-slash-secrets", "/api/v1/namespaces/x/secrets/")
    path("legacy-watch-secrets", "/api/v1/watch/secrets")
    path("legacy-watch-ns-secrets", "/api/v1/watch/namespaces/x/secrets")
    path("legacy-watch-pods", "/api/v1/watch/pods", expect="forward")
    path("legacy-watch-param", "/api/v1/watch/pods?watch=0")
    path("legacy-watch-only", "/api/v1/watch")
    path("legacy-proxy", "/api/v1/proxy/namespaces/x/pods/p")
    path("legacy-proxy-nodes", "/api/v1/proxy/nodes/n1/metrics")
    path("services-proxy", "/api/v1/namespaces/x/services/s:80/proxy/admin")
    path("nodes-proxy", "/api/v1/nodes/n1/proxy/configz")
    path("nodes-proxy-allowed-resource", "/api/v1/nodes/n1/proxy")
    path("pods-proxy", "/api/v1/namespaces/x/pods/p/proxy")
    path("group-secrets-lookalike", "/apis/v1/namespaces/x/secrets")
    path("apis-core-alias", "/apis/core/v1/namespaces/x/pods")
    path(
        "fieldselector-other-name",
        "/api/v1/namespaces/istio-system/configmaps/other?fieldSelector=metadata.name%3Distio",
    )
    path(
        "fieldselector-pinned",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio",
        expect="forward",
    )
    path(
        "fieldselector-pinned-raw-eq",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name=istio",
        expect="forward",
    )
    path(
        "fieldselector-pinned-dbl-eq",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3D%3Distio&watch=1",
        expect="forward",
    )
    path(
        "fieldselector-named-get",
        "/api/v1/namespaces/istio-system/configmaps/istio",
        expect="forward",
    )
    path(
        "fieldselector-two-terms",
        "/api/v1/namespaces/istio-system/configmaps"
        "?fieldSelector=metadata.name%3Distio,metadata.name%3Dother",
    )
    path(
        "fieldselector-not-equal",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name!%3Dother",
    )
    path(
        "fieldselector-repeated",
        "/api/v1/namespaces/istio-system/configmaps"
        "?fieldSelector=metadata.name%3Distio&fieldSelector=metadata.name%3Dother",
    )
    path(
        "fieldselector-repeated-reverse",
        "/api/v1/namespaces/istio-system/configmaps"
        "?fieldSelector=metadata.name%3Dother&fieldSelector=metadata.name%3Distio",
    )
    path(
        "fieldselector-lowercase-key",
        "/api/v1/namespaces/istio-system/configmaps?fieldselector=metadata.name%3Distio",
    )
    path(
        "fieldselector-pct-key",
        "/api/v1/namespaces/istio-system/configmaps?%66ieldSelector=metadata.name%3Distio",
    )
    path(
        "fieldselector-trailing-space",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio+",
    )
    path(
        "fieldselector-nul",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio%00",
    )
    path("fieldselector-cluster-wide", "/api/v1/configmaps?fieldSelector=metadata.name%3Distio")
    path(
        "fieldselector-legacy-watch",
        "/api/v1/watch/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio",
    )
    path(
        "fieldselector-other-ns",
        "/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name%3Distio",
    )
    path(
        "fieldselector-namespace-term",
        "/api/v1/namespaces/istio-system/configmaps"
        "?fieldSelector=metadata.namespace%3Distio-system",
    )
    path(
        "fieldselector-escaped-comma",
        "/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio%5C,x",
    )
    path("repeated-watch-disagree", "/api/v1/pods?watch=1&watch=0")
    path("repeated-watch-agree", "/api/v1/pods?watch=1&watch=true", expect="forward")
    path("repeated-labelselector", "/api/v1/pods?labelSelector=a%3Db&labelSelector=c%3Dd")
    path("repeated-limit", "/api/v1/pods?limit=1&limit=2", expect="forward")
    path("query-semicolon", "/api/v1/pods?watch=1;limit=2")
    path("query-pct-key", "/api/v1/pods?%77atch=1")
    path("query-empty-pair", "/api/v1/pods?limit=1&&watch=1")
    path("query-bad-pct", "/api/v1/pods?limit=%G1")
    path("query-nonascii-pct", "/api/v1/pods?labelSelector=%ff")
    path("nonresource-allowed", "/apis/apps/v1", expect="forward")
    path("nonresource-version", "/version", expect="forward")
    path("nonresource-metrics", "/metrics")
    path("nonresource-debug", "/debug/pprof/")
    path("nonresource-logs", "/logs/")
    path("nonresource-root", "/")
    path("nonresource-version-dot", "/version/.")
    path("openapi", "/openapi/v2")
    path("secrets-named", "/api/v1/namespaces/x/secrets/token")
    path("configmap-other-name", "/api/v1/namespaces/istio-system/configmaps/other")
    path("configmap-istio-other-ns", "/api/v1/namespaces/default/configmaps/istio")
    path("configmap-list-no-selector", "/api/v1/namespaces/istio-system/configmaps")
    path("namespace-status", "/api/v1/namespaces/x/status")
    path("namespace-finalize", "/api/v1/namespaces/x/finalize")
    path("namespace-get", "/api/v1/namespaces/x", expect="forward")
    path("pod-status-sub", "/api/v1/namespaces/x/pods/p/status")
    path("pods-log", "/api/v1/namespaces/x/pods/p/log")
    path("pods-exec-get", "/api/v1/namespaces/x/pods/p/exec?command=sh")
    path("pods-attach-get", "/api/v1/namespaces/x/pods/p/attach")
    path("pods-portforward-get", "/api/v1/namespaces/x/pods/p/portforward")
    path("pods-ephemeral", "/api/v1/namespaces/x/pods/p/ephemeralcontainers")

    # raw-byte targets (NUL, control, overlong UTF-8 bytes, absolute/authority/asterisk forms)
    def rawpath(name: str, target: bytes, method: bytes = b"GET") -> None:
        c.append(
            Case(
                "path",
                name,
                raw=method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        )

    rawpath("nul-byte", b"/api/v1/pods\x00/../secrets")
    rawpath("ctl-byte", b"/api/v1/pods\x01")
    rawpath("del-byte", b"/api/v1/pods\x7f")
    rawpath("tab-in-target", b"/api/v1/secrets\t/api/v1/pods")
    rawpath("cr-in-target", b"/api/v1/secrets\r/api/v1/pods")
    rawpath("overlong-utf8-bytes", b"/api/v1/namespaces/x/pods/\xc0\xae\xc0\xae/secrets")
    rawpath("utf8-bytes", b"/api/v1/namespaces/\xc3\xa9/pods")
    rawpath("high-bytes", b"/api/v1/\xff\xfe")
    rawpath("absolute-form-https", b"https://127.0.0.1/api/v1/secrets")
    rawpath("absolute-form-http", b"http://apiproxy/api/v1/pods")
    rawpath("absolute-form-userinfo", b"http://a@127.0.0.1:1/api/v1/pods")
    rawpath("authority-form", b"127.0.0.1:443")
    rawpath("authority-form-connect", b"127.0.0.1:443", method=b"CONNECT")
    rawpath("asterisk-form", b"*", method=b"OPTIONS")
    rawpath("no-leading-slash", b"api/v1/pods")
    rawpath("empty-target", b"")

    # ---- verb and method tricks ------------------------------------------------------------
    def verb(name: str, method: str, target: str, expect: str = "refuse", **kw: object) -> None:
        c.append(Case("verb", name, method=method, target=target, expect=expect, **kw))  # type: ignore[arg-type]

    verb("head-allowed", "HEAD", "/api/v1/pods", expect="forward")
    verb("head-secrets", "HEAD", "/api/v1/namespaces/x/secrets")
    verb("head-nonresource", "HEAD", "/version")
    for m in ("OPTIONS", "TRACE", "PROPFIND", "MKCOL", "LINK", "PURGE", "SEARCH", "get", "Get"):
        verb(f"method-{m}", m, "/api/v1/pods")
    verb("method-connect-path", "CONNECT", "/api/v1/pods")
    verb(
        "override-delete-on-get",
        "GET",
        "/api/v1/namespaces/x/pods/p",
        expect="forward",
        headers=(
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Method-Override", "DELETE"),
            ("X-HTTP-Method", "DELETE"),
        ),
    )
    verb(
        "override-get-on-post",
        "POST",
        "/api/v1/namespaces/x/pods",
        headers=(("X-HTTP-Method-Override", "GET"),),
        body=b"{}",
    )
    for v in ("true", "1", "", "yes", "f", "0", "false", "FALSE", "False", "t"):
        verb(f"watch={v or 'empty'}-pods", "GET", f"/api/v1/pods?watch={v}", expect="forward")
        verb(f"watch={v or 'empty'}-secrets", "GET", f"/api/v1/namespaces/x/secrets?watch={v}")
    verb("watch-bare-key", "GET", "/api/v1/pods?watch", expect="forward")
    verb("watch-pct-value", "GET", "/api/v1/pods?watch=%74rue", expect="forward")
    verb("watch-on-named-get", "GET", "/api/v1/namespaces/x/pods/p?watch=1")
    verb("watch-on-post", "POST", "/api/v1/namespaces/x/pods?watch=1", body=b"{}")
    verb("watch-on-delete", "DELETE", "/api/v1/namespaces/x/pods?watch=1")
    verb("body-on-get", "GET", "/api/v1/pods", body=b'{"kind":"DeleteOptions"}', expect="forward")
    verb("body-on-get-secrets", "GET", "/api/v1/namespaces/x/secrets", body=b"{}")
    verb("body-on-head", "HEAD", "/api/v1/pods", body=b"x", expect="either")
    for m in ("POST", "PUT", "PATCH", "DELETE"):
        target = "/api/v1/namespaces/x/pods" + ("" if m == "POST" else "/p")
        verb(f"dryrun-{m}", m, target + "?dryRun=All", body=b"{}" if m != "DELETE" else b"")
        verb(f"write-{m}", m, target, body=b"{}" if m != "DELETE" else b"")
    verb("deletecollection", "DELETE", "/api/v1/namespaces/x/pods")
    verb("deletecollection-dryrun", "DELETE", "/api/v1/namespaces/x/pods?dryRun=All")
    verb("pods-log", "GET", "/api/v1/namespaces/x/pods/p/log?follow=true")
    verb("pods-exec-post", "POST", "/api/v1/namespaces/x/pods/p/exec?command=sh&stdin=true")
    verb("pods-attach-post", "POST", "/api/v1/namespaces/x/pods/p/attach")
    verb("pods-portforward-post", "POST", "/api/v1/namespaces/x/pods/p/portforward?ports=80")
    verb("pods-eviction", "POST", "/api/v1/namespaces/x/pods/p/eviction", body=b"{}")
    verb("pods-binding", "POST", "/api/v1/namespaces/x/pods/p/binding", body=b"{}")
    verb("services-proxy-get", "GET", "/api/v1/namespaces/x/services/s/proxy")
    verb("services-proxy-post", "POST", "/api/v1/namespaces/x/services/s/proxy", body=b"{}")
    verb("nodes-proxy-get", "GET", "/api/v1/nodes/n/proxy")
    verb("token-request", "POST", "/api/v1/namespaces/x/serviceaccounts/sa/token", body=b"{}")
    verb(
        "selfsubjectreview", "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=b"{}"
    )
    verb("tokenreview", "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=b"{}")
    verb(
        "csr-approve",
        "PUT",
        "/apis/certificates.k8s.io/v1/certificatesigningrequests/c/approval",
        body=b"{}",
    )
    verb("nonresource-post", "POST", "/apis", body=b"{}")
    verb("nonresource-delete", "DELETE", "/version")
    # peer B holds a dangerous exec rule in namespace "debug": a plain (non-upgrade) request is
    # forwarded as the policy allows; other namespaces and other subresources are not.
    verb(
        "b-exec-allowed-no-upgrade",
        "GET",
        "/api/v1/namespaces/debug/pods/p/exec?command=id",
        who="b",
        expect="forward",
    )
    verb("b-exec-other-ns", "GET", "/api/v1/namespaces/x/pods/p/exec?command=id", who="b")
    verb("b-attach", "GET", "/api/v1/namespaces/debug/pods/p/attach", who="b")
    verb("a-exec-debug", "GET", "/api/v1/namespaces/debug/pods/p/exec?command=id", who="a")

    # ---- header tricks ---------------------------------------------------------------------
    def hdr(
        name: str, headers: tuple[tuple[str, str], ...], expect: str = "forward", **kw: object
    ) -> None:
        c.append(Case("header", name, headers=headers, expect=expect, **kw))  # type: ignore[arg-type]

    hdr("impersonate-user", (("Impersonate-User", "system:admin"),))
    hdr(
        "impersonate-all",
        (
            ("Impersonate-User", "system:admin"),
            ("Impersonate-Group", "system:masters"),
            ("Impersonate-Uid", "0"),
            ("Impersonate-Extra-Scopes", "all"),
        ),
    )
    hdr(
        "impersonate-lowercase",
        (("impersonate-user", "system:admin"), ("impersonate-group", "system:masters")),
    )
    hdr("impersonate-uppercase", (("IMPERSONATE-USER", "system:admin"),))
    hdr("impersonate-value-spaces", (("Impersonate-User", "   system:admin   "),))
    hdr(
        "authorization-from-client-with-cert",
        (("Authorization", "Bearer " + "x" * 40),),
        expect="refuse",
        codes=frozenset({401}),
    )
    hdr("authorization-lowercase-token", (("authorization", "Bearer {tok:a}"),), who=None)
    hdr(
        "authorization-uppercase-leading-spaces",
        (("AUTHORIZATION", "   Bearer {tok:a}  "),),
        who=None,
    )
    hdr("authorization-scheme-lowercase", (("Authorization", "bearer {tok:a}"),), who=None)
    hdr("connection-names-authorization", (("Connection", "Authorization"),), who=None, token="a")
    hdr(
        "connection-names-impersonate",
        (("Connection", "Impersonate-User"), ("Impersonate-User", "system:admin")),
    )
    hdr("connection-names-audit-id", (("Connection", "Audit-ID, Host"), ("Audit-ID", "forged")))
    hdr(
        "x-remote-headers",
        (
            ("X-Remote-User", "admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Remote-Extra-Scopes", "x"),
        ),
    )
    hdr(
        "forwarded-headers",
        (
            ("X-Forwarded-For", "10.0.0.1"),
            ("Forwarded", "for=10.0.0.1"),
            ("X-Real-IP", "10.0.0.1"),
            ("X-Forwarded-Host", "kubernetes"),
        ),
    )
    hdr("proxy-authorization", (("Proxy-Authorization", "Basic YTpi"),))
    hdr("cookie", (("Cookie", "session=abc"),))
    hdr("audit-id-forged", (("Audit-ID", "forged-id"),))
    hdr("x-method-override", (("X-HTTP-Method-Override", "DELETE"),))
    hdr(
        "upgrade-websocket",
        (
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ),
        expect="refuse",
    )
    hdr("upgrade-spdy", (("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")), expect="refuse")
    hdr("upgrade-header-only", (("Upgrade", "SPDY/3.1"),), expect="refuse")
    hdr("connection-upgrade-only", (("Connection", "upgrade"),), expect="refuse")
    hdr(
        "upgrade-h2c",
        (
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ),
        expect="refuse",
    )
    exec_target = "/api/v1/namespaces/debug/pods/p/exec?command=sh"
    spdy = (("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"))
    # peer B's dangerous exec rule: the upgrade is relayed (upgrade headers go upstream), and the
    # client's credentials and impersonation headers still do not
    c.append(
        Case(
            "header",
            "upgrade-on-b-exec",
            who="b",
            target=exec_target,
            headers=spdy,
            expect="forward",
            extra={"upgrade": "1"},
        )
    )
    c.append(
        Case(
            "header",
            "upgrade-on-b-exec-impersonate",
            who="b",
            target=exec_target,
            headers=(
                *spdy,
                ("Impersonate-User", "system:admin"),
                ("Impersonate-Group", "system:masters"),
                ("X-Remote-User", "admin"),
                ("Connection", "Impersonate-Group"),
            ),
            expect="forward",
            extra={"upgrade": "1"},
        )
    )
    c.append(
        Case(
            "header",
            "upgrade-h2c-on-b-exec",
            who="b",
            target=exec_target,
            headers=(
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ),
        )
    )
    c.append(
        Case(
            "header",
            "upgrade-with-body-on-b-exec",
            who="b",
            target=exec_target,
            method="POST",
            headers=spdy,
            body=b"GET /api/v1/secrets HTTP/1.1\r\n\r\n",
        )
    )
    c.append(
        Case(
            "header",
            "upgrade-on-b-exec-other-namespace",
            who="b",
            target="/api/v1/namespaces/x/pods/p/exec?command=sh",
            headers=spdy,
        )
    )
    c.append(
        Case(
            "header",
            "upgrade-on-b-pods",
            who="b",
            headers=(("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")),
        )
    )
    hdr("expect-100", (("Expect", "100-continue"),), body=b"{}")
    hdr("te-trailers", (("TE", "trailers"),))
    hdr("accept-table", (("Accept", "application/json;as=Table;g=meta.k8s.io;v=v1"),))

    def rawh(name: str, data: bytes, expect: str = "refuse", **kw: object) -> None:
        smuggling = name.startswith(("te-", "cl-", "chunk-", "get-te-"))
        cls = "smuggling" if smuggling else "header"
        c.append(Case(cls, name, raw=data, expect=expect, **kw))  # type: ignore[arg-type]

    rawh(
        "authorization-leading-space-name",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\n Authorization: Bearer x\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "obs-fold-authorization",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nAccept: a\n Impersonate-User: admin\n"
            "Connection: close\n\n"
        ),
        expect="either",
    )
    rawh(
        "space-before-colon",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nImpersonate-User : admin\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "nul-in-header-value",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nAccept: a\x00b\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "ctl-in-header-value",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nUser-Agent: a\x01\x7fb\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "high-bytes-in-header-value",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nUser-Agent: caf\xe9\xff\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "bare-lf-header",
        b"GET /api/v1/pods HTTP/1.1\r\nHost: x\nImpersonate-User: admin\r\n"
        b"Connection: close\r\n\r\n",
        expect="either",
    )
    rawh(
        "no-host-http11", _raw("GET /api/v1/pods HTTP/1.1\nConnection: close\n\n"), expect="either"
    )
    rawh(
        "two-hosts",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: a\nHost: b\nConnection: close\n\n"),
        expect="either",
    )
    rawh("http10", _raw("GET /api/v1/pods HTTP/1.0\n\n"), expect="forward")
    rawh("http09", _raw("GET /api/v1/pods\n\n"), expect="either")
    rawh("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    rawh(
        "bad-version",
        _raw("GET /api/v1/pods HTTP/1.7\nHost: x\nConnection: close\n\n"),
        expect="either",
    )
    rawh(
        "te-and-cl",
        _raw(
            "POST /api/v1/namespaces/x/pods HTTP/1.1\nHost: x\nContent-Length: 5\n"
            "Transfer-Encoding: chunked\nConnection: close\n\n",
            b"0\r\n\r\n",
        ),
    )
    rawh(
        "get-te-and-cl",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: 5\n"
            "Transfer-Encoding: chunked\nConnection: close\n\n",
            b"0\r\n\r\n",
        ),
    )
    smuggled = "GET /api/v1/namespaces/x/secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    rawh(
        "cl-te",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: 6\nTransfer-Encoding: chunked\n\n",
            b"0\r\n\r\n" + smuggled.encode(),
        ),
    )
    rawh(
        "te-cl",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nContent-Length: 3\n\n",
            f"{len(smuggled):x}\r\n{smuggled}\r\n0\r\n\r\n".encode(),
        ),
    )
    for i, te in enumerate(
        (
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding: chunked\nTransfer-Encoding: x",
            "Transfer-Encoding : chunked",
            "Transfer-Encoding:\tchunked\t",
            "Transfer-Encoding: CHUNKED",
            "Transfer-Encoding: chunked;q=1",
            "Transfer_Encoding: chunked",
            "Transfer-Encoding: \x0bchunked",
            "X: y\n Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip, chunked",
        )
    ):
        body = b"0\r\n\r\n" + smuggled.encode()
        rawh(
            f"te-te-{i}",
            _raw(
                f"GET /api/v1/pods HTTP/1.1\nHost: x\n{te}\nContent-Length: {len(body)}\n\n", body
            ),
            expect="either",
            extra={"te": te},
        )
        rawh(
            f"te-only-{i}",
            _raw(f"GET /api/v1/pods HTTP/1.1\nHost: x\n{te}\n\n", body),
            expect="either",
            extra={"te": te},
        )
    hidden = "GET /api/v1/namespaces/x/secrets HTTP/1.1\r\nHost: x\r\n\r\n"
    c.append(Case("smuggling", "pipelined-in-body", body=hidden.encode(), expect="forward"))
    c.append(
        Case(
            "smuggling",
            "pipelined-in-chunked-body",
            expect="forward",
            raw=_raw(
                "GET /api/v1/pods HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"
                "Connection: close\n\n",
                f"{len(hidden):x}\r\n{hidden}\r\n0\r\n\r\n".encode(),
            ),
            extra={"body": hidden},
        )
    )
    rawh(
        "cl-duplicate-differ",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: 0\nContent-Length: 44\n\n",
            smuggled.encode(),
        ),
    )
    rawh(
        "cl-comma-list",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: 0, 44\n\n", smuggled.encode()),
    )
    rawh("cl-negative", _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: -1\n\n"))
    rawh("cl-plus", _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: +4\n\n", b"abcd"))
    rawh("cl-hex", _raw("GET /api/v1/pods HTTP/1.1\nHost: x\nContent-Length: 0x4\n\n", b"abcd"))
    rawh(
        "chunk-size-overflow",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n",
            b"ffffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
        ),
    )
    rawh(
        "chunk-ext-smuggle",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n",
            b"2;\nxx\r\n0\r\n\r\n" + smuggled.encode(),
        ),
    )
    rawh(
        "huge-header",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\nX-Big: "
            + "a" * 100_000
            + "\nConnection: close\n\n"
        ),
        codes=frozenset({400, 413, 431}),
    )
    rawh(
        "many-headers",
        _raw(
            "GET /api/v1/pods HTTP/1.1\nHost: x\n"
            + "".join(f"X-H{i}: {i}\n" for i in range(5000))
            + "Connection: close\n\n"
        ),
        codes=frozenset({400, 413, 431}),
        expect="either",
    )
    rawh(
        "huge-target",
        _raw("GET /api/v1/pods?x=" + "a" * 100_000 + " HTTP/1.1\nHost: x\nConnection: close\n\n"),
        codes=frozenset({400, 413, 414, 431}),
    )
    rawh(
        "huge-header-name",
        _raw("GET /api/v1/pods HTTP/1.1\nHost: x\n" + "X" * 100_000 + ": 1\nConnection: close\n\n"),
        codes=frozenset({400, 413, 431}),
    )
    c.append(
        Case(
            "smuggling",
            "pipelined-second-request-denied",
            expect="pipeline",
            raw=_raw(
                "GET /api/v1/pods HTTP/1.1\nHost: x\n\n"
                "GET /api/v1/namespaces/x/secrets HTTP/1.1\nHost: x\n"
                "Connection: close\n\n"
            ),
        )
    )

    # ---- identity tricks -------------------------------------------------------------------
    def ident(
        name: str, who: str | None, token: str | None, expect: str = "refuse", **kw: object
    ) -> None:
        codes = frozenset({401}) if expect == "refuse" else REFUSE
        c.append(Case("identity", name, who=who, token=token, expect=expect, codes=codes, **kw))  # type: ignore[arg-type]

    ident("no-credentials", None, None)
    ident("cert-a-token-b", "a", "b")
    ident("cert-b-token-a", "b", "a")
    ident("token-a-only", None, "a", expect="forward")
    ident("cert-a-token-a", "a", "a", expect="forward")
    for spec in (
        "expired",
        "expired-beyond-leeway",
        "nbf-future",
        "iat-future",
        "no-exp",
        "exp-string",
        "alg-none",
        "alg-none-sig",
        "hmac-public-key",
        "hmac-secret",
        "wrong-aud",
        "aud-list-other",
        "wrong-scope",
        "no-scope",
        "unknown-sub",
        "no-sub",
        "attacker-key",
        "attacker-key-unknown-kid",
        "attacker-jwk-header",
        "attacker-jku-header",
        "b-key-a-sub",
        "tampered-payload",
        "truncated",
        "garbage",
    ):
        ident(f"token-{spec}", None, spec)
        ident(f"cert-a-token-{spec}", "a", spec)
    ident("token-expired-within-leeway", None, "expired-within-leeway", expect="forward")
    ident("token-nbf-within-leeway", None, "nbf-within-leeway", expect="forward")
    ident("token-a-unknown-kid", None, "a-unknown-kid", expect="forward")

    def authz(name: str, value: str, who: str | None = None, expect: str = "refuse") -> None:
        codes = frozenset({401}) if expect == "refuse" else REFUSE
        c.append(
            Case(
                "identity",
                name,
                who=who,
                headers=(("Authorization", value),),
                expect=expect,
                codes=codes,
            )
        )

    authz("basic-auth", "Basic YWRtaW46YWRtaW4=")
    authz("bearer-empty", "Bearer ")
    authz("bearer-two-tokens", "Bearer a b")
    authz("negotiate", "Negotiate abc")
    authz("bearer-no-token", "Bearer")
    c.append(
        Case(
            "identity",
            "token-in-query-only",
            who=None,
            target="/api/v1/pods?access_token=x",
            codes=frozenset({401}),
        )
    )
    c.append(
        Case(
            "identity",
            "two-authorization-headers-bad-first",
            who=None,
            headers=(("Authorization", "Bearer garbage"),),
            token="a",
            codes=frozenset({401}),
        )
    )
    return c


CASES = _cases()
