# ruff: noqa: E501  (vector tables are easier to compare with the Go source one per line)
"""Request classification: the requestinfo_test.go vectors as facts, plus the ambiguity refusals."""

from __future__ import annotations

import pytest

from apiproxy.request import RequestInfo, RequestRejected, classify

# (method, url, verb, apiPrefix, apiGroup, apiVersion, namespace, resource, subresource, name,
#  parts) from TestGetAPIRequestInfo. The reference lists apiPrefix "api" for /apis/... paths
# without checking it; the real prefix is "apis", which is what we assert.
API_VECTORS = [
    ("GET", "/api/v1/namespaces", "list", "api", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("GET", "/api/v1/namespaces/other", "get", "api", "", "v1", "other", "namespaces", "", "other", ["namespaces", "other"]),
    ("GET", "/api/v1/namespaces/other/pods", "list", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("HEAD", "/api/v1/pods", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    # The reference lists namespace "" here, which contradicts its own GET vector of the same
    # shape and the code (Namespace = parts[1]); we follow the code: a namespace is in itself.
    ("PATCH", "/api/v1/namespaces/new-namespace", "patch", "api", "", "v1", "new-namespace", "namespaces", "", "new-namespace", ["namespaces", "new-namespace"]),
    # special verbs
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo", "subpath", "not", "a", "subresource"]),
    ("GET", "/api/v1/watch/pods", "watch", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=true", "watch", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/pods?watch=false", "list", "api", "", "v1", "", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    # subresource identification
    ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "api", "", "v1", "other", "pods", "status", "foo", ["pods", "foo", "status"]),
    ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "api", "", "v1", "other", "pods", "proxy", "foo", ["pods", "foo", "proxy", "subpath"]),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "api", "", "v1", "other", "namespaces", "finalize", "other", ["namespaces", "other", "finalize"]),
    ("PUT", "/api/v1/namespaces/other/status", "update", "api", "", "v1", "other", "namespaces", "status", "other", ["namespaces", "other", "status"]),
    # verb identification
    ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "api", "", "v1", "other", "pods", "", "foo", ["pods", "foo"]),
    ("POST", "/api/v1/namespaces/other/pods", "create", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    # deletecollection verb identification
    ("DELETE", "/api/v1/nodes", "deletecollection", "api", "", "v1", "", "nodes", "", "", ["nodes"]),
    ("DELETE", "/api/v1/namespaces", "deletecollection", "api", "", "v1", "", "namespaces", "", "", ["namespaces"]),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "api", "", "v1", "other", "pods", "", "", ["pods"]),
    ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "apis", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    # api group / version identification
    ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "apis", "extensions", "v1", "other", "pods", "", "", ["pods"]),
    ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "apis", "extensions", "v1beta3", "other", "pods", "", "", ["pods"]),
]  # fmt: skip


@pytest.mark.parametrize(
    (
        "method",
        "url",
        "verb",
        "prefix",
        "group",
        "version",
        "ns",
        "resource",
        "sub",
        "name",
        "parts",
    ),
    API_VECTORS,
)
def test_reference_api_vectors(
    method: str, url: str, verb: str, prefix: str, group: str, version: str, ns: str,
    resource: str, sub: str, name: str, parts: list[str],
) -> None:  # fmt: skip
    info = classify(method, url)
    assert info.is_resource_request
    assert (info.verb, info.api_prefix, info.api_group, info.api_version) == (
        verb, prefix, group, version,
    )  # fmt: skip
    assert (info.namespace, info.resource, info.subresource, info.name) == (ns, resource, sub, name)
    assert info.parts == tuple(parts)
    assert info.path == url.split("?")[0]


# errorCases of TestGetAPIRequestInfo: non-resource in the reference. Those with a trailing slash
# are refused here instead, because '/apis/g/v/' and '/apis/g/v' must not be two different URLs.
@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("/", False),
        ("/api/version/", True),
        ("/apis/group/version/", True),
        ("/badprefix/version/resource", False),
        ("/apis/version/resource", False),
    ],
)
def test_reference_error_cases(url: str, refused: bool) -> None:
    if refused:
        with pytest.raises(RequestRejected, match="empty segment"):
            classify("GET", url)
    else:
        info = classify("GET", url)
        assert not info.is_resource_request
        assert info.verb == "get"
        assert info.path == url


# TestGetNonAPIRequestInfo; "" (empty URL) is refused: a request-target is never empty.
@pytest.mark.parametrize(
    ("url", "resource"),
    [
        ("/api/version/resource", True),
        ("/apis/group/version/resource/name/subresource", True),
        ("/api/version/resource/name/subresource", True),
        ("/apis/batch/v1/job", True),
        ("/apis/batch/v1/job/foo", True),
        ("/apis/batch/v1/job/foo/scale", True),
        ("/not-api/version/resource", False),
        ("/apis/extensions/v1beta1", False),
        ("/api/version", False),
        ("/api", False),
        ("/", False),
    ],
)
def test_reference_non_api_vectors(url: str, resource: bool) -> None:
    assert classify("GET", url).is_resource_request is resource


def test_empty_target_is_refused() -> None:
    with pytest.raises(RequestRejected, match="empty"):
        classify("GET", "")


# TestSelectorParsing: (method, url, name, verb, fieldSelector, labelSelector).
SELECTOR_VECTORS = [
    ("GET", "/apis/group/version/resource", "", "list", "", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "name1", "list", "metadata.name=name1", ""),
    ("GET", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "name1", "watch", "metadata.name=name1", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "list", "foo=bar", "baz=qux"),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "", "list", "metadata.name=name1,foo", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=true", "", "watch", "metadata.name=name1,foo", ""),
    ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo&watch=false", "", "list", "metadata.name=name1,foo", ""),
    ("DELETE", "/apis/group/version/resource?fieldSelector=foo=bar&labelSelector=baz=qux", "", "deletecollection", "foo=bar", "baz=qux"),
    ("GET", "/apis/group/version/resource/name?fieldSelector=foo=bar&labelSelector=foo=bar", "name", "get", "", ""),
    ("GET", "/apis/group/version/watch/resource?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "", "watch", "", ""),
    ("GET", "/apis/group/version/watch/resource/name?fieldSelector=metadata.name=foo&labelSelector=foo=bar", "name", "watch", "", ""),
]  # fmt: skip


@pytest.mark.parametrize(("method", "url", "name", "verb", "fsel", "lsel"), SELECTOR_VECTORS)
def test_reference_selector_vectors(
    method: str, url: str, name: str, verb: str, fsel: str, lsel: str
) -> None:
    info = classify(method, url)
    assert (info.name, info.verb, info.field_selector, info.label_selector) == (
        name, verb, fsel, lsel,
    )  # fmt: skip


def test_repeated_selector_reference_case_is_refused() -> None:
    # The reference takes the first of repeated selectors; a proxy that did the same while the
    # next hop took the last would authorize one object and serve another.
    url = (
        "/apis/group/version/resource?fieldSelector=metadata.name=foo"
        "&fieldSelector=metadata.name=bar&labelSelector=foo=bar&labelSelector=foo=baz"
    )
    with pytest.raises(RequestRejected, match="repeats fieldSelector"):
        classify("GET", url)
    with pytest.raises(RequestRejected, match="repeats labelSelector"):
        classify("GET", "/api/v1/pods?labelSelector=a=b&labelSelector=a=b")


@pytest.mark.parametrize(
    ("url", "verb", "name", "fsel"),
    [
        # client-go encodes '=' and ',' in values: the decoded selector is what counts.
        ("/api/v1/namespaces/istio-system/configmaps?fieldSelector=metadata.name%3Distio", "list", "istio", "metadata.name=istio"),
        ("/api/v1/namespaces/x/configmaps?fieldSelector=metadata.name%3D%3Distio&watch=1", "watch", "istio", "metadata.name==istio"),
        ("/api/v1/pods?fieldSelector=status.phase%21%3DFailed&limit=500&resourceVersion=0", "list", "", "status.phase!=Failed"),
        ("/api/v1/pods?fieldSelector=metadata.name!%3Dfoo", "list", "", "metadata.name!=foo"),
        ("/api/v1/pods?fieldSelector=metadata.name%3Dfoo%2Cspec.nodeName%3Dn", "list", "", "metadata.name=foo,spec.nodeName=n"),
        ("/api/v1/pods?fieldSelector=metadata.name%3Dfo%5C%2Co", "list", "", "metadata.name=fo\\,o"),
        ("/api/v1/pods?watch", "watch", "", ""),
        ("/api/v1/pods?watch=", "watch", "", ""),
        ("/api/v1/pods?watch=FALSE", "list", "", ""),
        ("/api/v1/pods?watch=no", "watch", "", ""),
        ("/api/v1/pods?watch=true&watch=1", "watch", "", ""),
    ],
)  # fmt: skip
def test_query_semantics(url: str, verb: str, name: str, fsel: str) -> None:
    info = classify("GET", url)
    assert (info.verb, info.name, info.field_selector) == (verb, name, fsel)


def test_label_selector_with_spaces_is_decoded() -> None:
    info = classify("GET", "/api/v1/pods?labelSelector=app+in+%28a%2Cb%29&watch=true")
    assert info.label_selector == "app in (a,b)"
    assert info.verb == "watch"


def test_non_resource_verbs_are_lowercased_methods() -> None:
    assert classify("HEAD", "/version").verb == "head"
    assert classify("POST", "/api").verb == "post"
    info = classify("GET", "/apis/discovery.k8s.io/v1")
    assert not info.is_resource_request
    assert info.to_dict()["apiGroup"] == ""


def test_uppercase_resources_are_classified_as_is() -> None:
    info = classify("GET", "/api/v1/namespaces/a/Pods")
    assert info.resource == "Pods"


def test_to_dict_uses_kubernetes_spelling() -> None:
    info = classify("GET", "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices?labelSelector=x")
    assert info.to_dict() == {
        "isResourceRequest": True,
        "path": "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices",
        "verb": "list",
        "apiPrefix": "apis",
        "apiGroup": "discovery.k8s.io",
        "apiVersion": "v1",
        "namespace": "a",
        "resource": "endpointslices",
        "subresource": "",
        "name": "",
        "parts": ["endpointslices"],
        "fieldSelector": "",
        "labelSelector": "x",
    }
    assert isinstance(info, RequestInfo)


REJECTED = [
    # a bare '?' is dropped by URL libraries, so the forwarded target would differ
    ("GET", "/api/v1/pods?", "empty query"),
    ("GET", "/api/v1/namespaces/a/../kube-system/secrets", "'..' segment"),
    ("GET", "/api/v1/./pods", "'.' segment"),
    ("GET", "/api/v1//pods", "empty segment"),
    ("GET", "//api/v1/pods", "empty segment"),
    ("GET", "/api/v1/pods/", "empty segment"),
    ("GET", "/api/v1/namespaces/a/pods%2Ffoo", "percent-encoded"),
    ("GET", "/api/v1/namespaces/a/%70ods", "percent-encoded"),
    ("GET", "/api/v1/namespaces/a/pods/%2e%2e", "percent-encoded"),
    ("GET", "/api/v1\\namespaces/a/pods", "backslash"),
    ("GET", "/api/v1/pods;x=y", "path parameter"),
    ("GET", "/api/v1/pods?watch=1;x", "';'"),
    ("GET", "/api/v1/pods\x00", "control"),
    ("GET", "/api/v1/pods\r\nX: y", "control"),
    ("GET", "/api/v1/pods\t", "control"),
    ("GET", "/api/v1/pods ", "space"),
    ("GET", "/api/v1/p\u00f6ds", "non-ASCII"),
    ("GET", "http://evil/api/v1/pods", "absolute-form"),
    ("GET", "api/v1/pods", "starting with '/'"),
    ("GET", "*", "starting with '/'"),
    ("GET", "/api/v1/pods#frag", "fragment"),
    ("GET", "/api/v1/pods?watch=true&watch=false", "disagree"),
    ("GET", "/api/v1/pods?watch=0&watch=yes", "disagree"),
    ("GET", "/api/v1/namespaces/a/pods/foo?watch=true", "only meaningful"),
    ("GET", "/api/v1/namespaces/a/pods/foo?watch=false", "only meaningful"),
    ("POST", "/api/v1/namespaces/a/pods?watch=true", "only meaningful"),
    ("GET", "/api/v1/watch/pods?watch=false", "only meaningful"),
    ("GET", "/api/v1/pods?wat%63h=true", "parameter name"),
    ("GET", "/api/v1/pods?a%26watch=true", "parameter name"),
    ("GET", "/api/v1/pods?watch+=true", "parameter name"),
    ("GET", "/api/v1/pods?=x", "parameter name"),
    ("GET", "/api/v1/pods?limit=1&&watch=1", "empty parameter"),
    ("GET", "/api/v1/pods?watch=%zz", "two hexadecimal"),
    ("GET", "/api/v1/pods?limit=%4", "two hexadecimal"),
    ("GET", "/api/v1/pods?labelSelector=a%0Ab", "control"),
    ("GET", "/api/v1/pods?labelSelector=%C3%A4", "non-ASCII"),
    ("GET", "/api/v1/pods?x=<", "must be encoded"),
    ("GET", "/api/v1/pods/<", "not accepted"),
    ("GET", "/api/v1/watch", "special verb"),
    ("GET", "/apis/g/v1/proxy", "special verb"),
    ("OPTIONS", "/api/v1/pods", "not supported"),
    ("TRACE", "/api/v1/pods", "not supported"),
    ("CONNECT", "/api/v1/pods", "not supported"),
    ("get", "/api/v1/pods", "not supported"),
    ("PROPFIND", "/version", "not supported"),
]


@pytest.mark.parametrize(("method", "target", "why"), REJECTED)
def test_ambiguous_targets_are_refused(method: str, target: str, why: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        classify(method, target)
    assert why in caught.value.reason
    # A human sentence: capitalised, ends with a full stop, names no Python internals.
    assert caught.value.reason[0].isupper()
    assert caught.value.reason.endswith(".")
    assert str(caught.value) == caught.value.reason


def test_watch_on_non_resource_paths_is_ignored() -> None:
    # Non-resource handlers do not read 'watch'; nothing to disambiguate.
    assert classify("GET", "/version?watch=1").verb == "get"


# Whole sentences, for the refusals whose wording mutants changed unnoticed (scripts/mutate).
EXACT = [
    (
        "GET",
        "/api/v1/pods?watch=1;x",
        "The query contains ';', which some parsers treat as a separator and Go drops; "
        "use '&' between parameters.",
    ),
    ("GET", "/api/v1/pods?x=<", "The query contains the character '<', which must be encoded."),
    ("GET", "/api/v1/pods/<", "The path contains the character '<', which is not accepted."),
    (
        "GET",
        "/api/v1/namespaces/a/pods%2Ffoo",
        "The path contains percent-encoded characters; this proxy only accepts paths that "
        "read the same before and after decoding.",
    ),
    (
        "GET",
        "/api/v1//pods",
        "The path contains an empty segment ('//' or a trailing '/'), which servers "
        "normalize differently.",
    ),
    ("GET", "", "The request target is empty."),
    (
        "GET",
        "/api/v1/pods ",
        "The request target contains a space, control or non-ASCII character (U+0020).",
    ),
    (
        "GET",
        "/api/v1/pods\x7f",
        "The request target contains a space, control or non-ASCII character (U+007F).",
    ),
    (
        "GET",
        "http://evil/api/v1/pods",
        "The request target must be a path starting with '/'; absolute-form ",
    ),
    (
        "GET",
        "/api/v1/namespaces/a/pods/foo?watch=true",
        "The 'watch' parameter is only meaningful on a GET of a collection; kube-apiserver "
        "ignores it here, so it is refused to avoid reading this request as a watch.",
    ),
    (
        "GET",
        "/api/v1/pods?labelSelector=%C3%A4",
        "The query parameter 'labelSelector' decodes to non-ASCII bytes, which this proxy does "
        "not accept in parameters it interprets.",
    ),
    (
        "X" * 30,
        "/api/v1/pods",
        f"The HTTP method {'X' * 20!r} is not supported; only GET, HEAD, POST, PUT, "
        "PATCH and DELETE are.",
    ),
]


@pytest.mark.parametrize(("method", "target", "reason"), EXACT)
def test_refusals_word_for_word(method: str, target: str, reason: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        classify(method, target)
    assert caught.value.reason.startswith(reason)
    if not reason.endswith(" "):
        assert caught.value.reason == reason


def test_a_tilde_is_an_ordinary_character() -> None:
    assert classify("GET", "/api/v1/namespaces/a/pods/~p").name == "~p"
    assert classify("GET", "/api/v1/namespaces/a/pods?labelSelector=a~b").label_selector == "a~b"
