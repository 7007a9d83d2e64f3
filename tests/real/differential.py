"""One corpus of raw HTTP requests, sent to the real kube-apiserver and to the simulator, reduced to
what a client (and the proxy) can tell apart: status code, `Status` reason and details, and the
shape of the answer (an object of some kind, a list, a watch stream, plain text).

Requests go out byte for byte as written (http.client, no URL normalization), so query spellings
such as `?watch=` or `?watch` reach both servers unchanged.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
NS = "simdiff"
GONE = "simdiff-gone"  # deleted by the corpus
CRD_PATH = ROOT / "deploy" / "base" / "crd-istiomulticluster.yaml"
IMC = "/apis/deckhouse.io/v1alpha1/istiomulticlusters"
PODS = f"/api/v1/namespaces/{NS}/pods"
CMS = f"/api/v1/namespaces/{NS}/configmaps"
# A first event (or a complete body) arrives at once from either server; the bound only stops a
# broken server from hanging the run.
READ_TIMEOUT = 15.0


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: Any = None  # dict/list -> JSON; bytes as they are; None -> no body
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # None: the server's admin token
    min_version: tuple[int, int] = (1, 0)


@dataclass(frozen=True)
class Outcome:
    """What the comparison looks at."""

    code: int
    shape: str  # "object:<Kind>", "list:<Kind>", "watch:<first event type>", "text", "status"
    reason: str = ""
    details: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        extra = f" {self.reason}" if self.reason else ""
        det = f" {dict(self.details)}" if self.details else ""
        return f"{self.code} {self.shape}{extra}{det}"


def pod(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "busybox"}],
        },
    }


def configmap(name: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, **meta},
        "data": {"k": "v"},
    }


def imc(name: str, endpoint: str = "https://peer.example/metadata") -> dict[str, Any]:
    return {
        "apiVersion": "deckhouse.io/v1alpha1",
        "kind": "IstioMulticluster",
        "metadata": {"name": name},
        "spec": {"metadataEndpoint": endpoint},
    }


def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


SETUP: list[tuple[str, str, Any]] = [
    (
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
    ),
    ("POST", PODS, pod("p1", "web")),
    ("POST", PODS, pod("p2", "db")),
    ("POST", CMS, configmap("cm1", labels={"team": "a"})),
    ("POST", CMS, configmap("cm2", labels={"team": "b"})),
    ("POST", IMC, imc("peer1")),
    (
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": GONE}},
    ),
    ("POST", f"/api/v1/namespaces/{GONE}/configmaps", configmap("left")),
]

JSON_CT = {"Content-Type": "application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
STRATEGIC = {"Content-Type": "application/strategic-merge-patch+json"}
JSONPATCH = {"Content-Type": "application/json-patch+json"}
APPLY = {"Content-Type": "application/apply-patch+yaml"}
DRY = "dryRun=All"


def _watch_cases() -> list[Case]:
    out = []
    # Every spelling of the watch parameter: only "0" and "false" (any case) mean false.
    for value in ("true", "1", "yes", "on", "", "True", "TRUE", "t", "no", "off", "x"):
        out.append(Case(f"watch={value}", "GET", f"{PODS}?watch={value}"))
    for value in ("false", "0", "FALSE", "False", "fAlSe"):
        out.append(Case(f"watch={value}", "GET", f"{PODS}?watch={value}"))
    out += [
        Case("watch-bare", "GET", f"{PODS}?watch"),
        Case("watch-first-of-two", "GET", f"{PODS}?watch=false&watch=true"),
        Case("watch-first-true-of-two", "GET", f"{PODS}?watch=true&watch=false"),
        Case("watch-path-prefix", "GET", f"/api/v1/watch/namespaces/{NS}/pods"),
        Case("watch-path-prefix-named", "GET", f"/api/v1/watch/namespaces/{NS}/pods/p1"),
        Case("watch-path-prefix-watch-false", "GET", f"/api/v1/watch/namespaces/{NS}/pods?watch=0"),
        Case("watch-all-namespaces", "GET", "/api/v1/pods?watch=1&labelSelector=app%3Dweb"),
        Case("watch-cluster-scoped-cr", "GET", f"{IMC}?watch=true"),
        Case(
            "watch-field-selector-name", "GET", f"{PODS}?watch=1&fieldSelector=metadata.name%3Dp2"
        ),
        Case("watch-bad-field-selector", "GET", f"{PODS}?watch=1&fieldSelector=spec.bogus%3D1"),
        Case("watch-bad-label-selector", "GET", f"{PODS}?watch=1&labelSelector=a%3D%3D%3Db"),
        Case("watch-bookmarks-yes", "GET", f"{PODS}?watch=1&allowWatchBookmarks=yes"),
        Case("watch-bad-timeout", "GET", f"{PODS}?watch=1&timeoutSeconds=abc"),
        Case("watch-bad-rv", "GET", f"{PODS}?watch=1&resourceVersion=abc"),
        Case(
            "watch-rv-match",
            "GET",
            f"{PODS}?watch=1&resourceVersion=1&resourceVersionMatch=NotOlderThan",
        ),
        Case(
            "watch-missing-namespace",
            "GET",
            "/api/v1/namespaces/nope/pods?watch=1&timeoutSeconds=1",
        ),
        # A named GET ignores ?watch on the real server: the plain object comes back.
        Case("named-get-watch=true", "GET", f"{PODS}/p1?watch=true"),
        Case("named-get-watch=1", "GET", f"{PODS}/p1?watch=1"),
        Case("named-get-watch-missing", "GET", f"{PODS}/nope?watch=true"),
        Case("named-cr-get-watch", "GET", f"{IMC}/peer1?watch=true"),
        Case("namespace-get-watch", "GET", f"/api/v1/namespaces/{NS}?watch=true"),
        Case("watch-write-ignored", "POST", f"{CMS}?watch=true&{DRY}", configmap("w1")),
    ]
    return out


def _list_cases() -> list[Case]:
    return [
        Case("list", "GET", PODS),
        Case("list-all-namespaces", "GET", "/api/v1/pods?labelSelector=app%3Dweb"),
        Case("list-missing-namespace", "GET", "/api/v1/namespaces/nope/pods"),
        Case("list-limit", "GET", f"{PODS}?limit=1"),
        Case("list-limit-bad", "GET", f"{PODS}?limit=abc"),
        Case("list-limit-negative", "GET", f"{PODS}?limit=-1"),
        Case("list-continue-garbage", "GET", f"{PODS}?limit=1&continue=garbage"),
        Case("list-rv-0", "GET", f"{PODS}?resourceVersion=0"),
        Case("list-rv-bad", "GET", f"{PODS}?resourceVersion=abc"),
        Case("list-rvm-without-rv", "GET", f"{PODS}?resourceVersionMatch=Exact"),
        Case("list-rvm-exact-0", "GET", f"{PODS}?resourceVersion=0&resourceVersionMatch=Exact"),
        Case("list-rvm-bogus", "GET", f"{PODS}?resourceVersion=1&resourceVersionMatch=Bogus"),
        Case(
            "list-rvm-notolderthan",
            "GET",
            f"{PODS}?resourceVersion=1&resourceVersionMatch=NotOlderThan",
        ),
        Case("list-label", "GET", f"{PODS}?labelSelector=app%3Dweb"),
        Case("list-label-set", "GET", f"{PODS}?labelSelector=app+in+%28web%2Cdb%29"),
        Case("list-label-bad", "GET", f"{PODS}?labelSelector=a%3D%3D%3Db"),
        Case("list-field-name", "GET", f"{PODS}?fieldSelector=metadata.name%3Dp1"),
        Case("list-field-phase", "GET", f"{PODS}?fieldSelector=status.phase%3DRunning"),
        Case("list-field-unsupported", "GET", f"{PODS}?fieldSelector=spec.bogus%3D1"),
        Case("list-field-bad-syntax", "GET", f"{PODS}?fieldSelector=%3D%3D"),
        Case(
            "list-field-namespace", "GET", "/api/v1/pods?fieldSelector=metadata.namespace%3Dsimdiff"
        ),
        Case("list-field-node", "GET", f"{PODS}?fieldSelector=spec.nodeName%3D"),
        Case("list-field-not-equal", "GET", f"{PODS}?fieldSelector=metadata.name%21%3Dp1"),
        Case(
            "list-field-two-terms",
            "GET",
            f"{PODS}?fieldSelector=metadata.name%3Dp1,status.phase%3DPending",
        ),
        Case("list-field-cr-unsupported", "GET", f"{IMC}?fieldSelector=spec.metadataEndpoint%3Dx"),
        Case("list-field-cr-name", "GET", f"{IMC}?fieldSelector=metadata.name%3Dpeer1"),
        Case(
            "list-field-secret-type",
            "GET",
            f"/api/v1/namespaces/{NS}/secrets?fieldSelector=type%3DOpaque",
        ),
        Case("list-label-not-exists", "GET", f"{PODS}?labelSelector=%21app"),
        Case("list-label-notin", "GET", f"{PODS}?labelSelector=app+notin+%28web%29"),
        Case("list-label-exists", "GET", f"{PODS}?labelSelector=app"),
        Case("list-label-bad-key", "GET", f"{PODS}?labelSelector=-bad%3Dx"),
        Case("list-label-long-value", "GET", f"{PODS}?labelSelector=app%3D{'x' * 64}"),
        Case("list-cr", "GET", IMC),
        Case("list-namespaces", "GET", "/api/v1/namespaces?fieldSelector=metadata.name%3Dsimdiff"),
        Case("list-unknown-param", "GET", f"{PODS}?bogus=1"),
    ]


def _read_cases() -> list[Case]:
    return [
        Case("get", "GET", f"{PODS}/p1"),
        Case("get-missing", "GET", f"{PODS}/nope"),
        Case("get-wrong-namespace", "GET", "/api/v1/namespaces/default/pods/p1"),
        Case("get-missing-namespace", "GET", "/api/v1/namespaces/nope/pods/p1"),
        Case("get-namespaced-without-namespace", "GET", "/api/v1/pods/p1"),
        Case("get-status", "GET", f"{PODS}/p1/status"),
        Case("get-unknown-subresource", "GET", f"{PODS}/p1/bogus"),
        Case("get-unknown-resource", "GET", f"/api/v1/namespaces/{NS}/bogus"),
        Case("get-unknown-resource-named", "GET", f"/api/v1/namespaces/{NS}/bogus/x"),
        Case("get-unknown-group", "GET", "/apis/nogroup.example/v1/things"),
        Case("get-unknown-version", "GET", "/api/v2/pods"),
        Case("get-namespace", "GET", f"/api/v1/namespaces/{NS}"),
        Case("get-namespace-missing", "GET", "/api/v1/namespaces/nope"),
        Case("get-cr", "GET", f"{IMC}/peer1"),
        Case("get-cr-missing", "GET", f"{IMC}/nope"),
        Case("get-cr-status", "GET", f"{IMC}/peer1/status"),
        Case(
            "get-cr-namespaced-path",
            "GET",
            f"/apis/deckhouse.io/v1alpha1/namespaces/{NS}/istiomulticlusters/peer1",
        ),
        Case("get-too-deep", "GET", f"{PODS}/p1/status/extra"),
        Case("get-unknown-builtin-resource", "GET", "/apis/coordination.k8s.io/v1/bogus"),
        Case("get-unknown-builtin-version", "GET", "/apis/coordination.k8s.io/v9/leases"),
        Case("get-unknown-crd-resource", "GET", "/apis/deckhouse.io/v1alpha1/bogus"),
        Case("get-unknown-crd-version", "GET", "/apis/deckhouse.io/v9/istiomulticlusters"),
        Case("get-cluster-scoped-namespaced-path", "GET", f"/api/v1/namespaces/{NS}/nodes/x"),
        Case("list-cluster-scoped-namespaced-path", "GET", f"/api/v1/namespaces/{NS}/nodes"),
        Case(
            "list-cr-namespaced-path",
            "GET",
            f"/apis/deckhouse.io/v1alpha1/namespaces/{NS}/istiomulticlusters",
        ),
        Case("get-api-prefix-only-group", "GET", "/apis/deckhouse.io/v1alpha1/namespaces"),
        Case("unauthorized", "GET", PODS, token="wrong-token"),
        Case("unauthorized-nonresource", "GET", "/api", token="wrong-token"),
    ]


def _nonresource_cases() -> list[Case]:
    return [
        Case("discovery-api", "GET", "/api"),
        Case("discovery-apis", "GET", "/apis"),
        Case("discovery-core-v1", "GET", "/api/v1"),
        Case("discovery-group", "GET", "/apis/coordination.k8s.io"),
        Case("discovery-group-version", "GET", "/apis/coordination.k8s.io/v1"),
        Case("discovery-crd-group-version", "GET", "/apis/deckhouse.io/v1alpha1"),
        Case("discovery-unknown-group", "GET", "/apis/nogroup.example"),
        Case("discovery-unknown-group-version", "GET", "/apis/nogroup.example/v1"),
        Case("version", "GET", "/version"),
        Case("healthz", "GET", "/healthz"),
        Case("readyz", "GET", "/readyz"),
        Case("unknown-path", "GET", "/nonexistent"),
        Case("openapi-v2", "GET", "/openapi/v2"),
        Case("openapi-v3", "GET", "/openapi/v3", min_version=(1, 27)),
        Case(
            "discovery-aggregated",
            "GET",
            "/apis",
            headers={
                "Accept": "application/json;g=apidiscovery.k8s.io;v=v2beta1;"
                "as=APIGroupDiscoveryList,application/json"
            },
            min_version=(1, 30),  # aggregated discovery (v2beta1 from 1.26, v2 from 1.30)
        ),
        Case("discovery-endpointslice-v1", "GET", "/apis/discovery.k8s.io/v1", min_version=(1, 21)),
    ]


def _accept_cases() -> list[Case]:
    table = "application/json;as=Table;v=v1;g=meta.k8s.io"
    pom = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
    return [
        Case(
            "accept-json-charset",
            "GET",
            PODS,
            headers={"Accept": "application/json; charset=utf-8"},
        ),
        Case("accept-any", "GET", PODS, headers={"Accept": "*/*"}),
        Case("accept-html", "GET", PODS, headers={"Accept": "text/html"}),
        Case("accept-table", "GET", PODS, headers={"Accept": table}),
        Case("accept-table-or-json", "GET", PODS, headers={"Accept": f"{table},application/json"}),
        Case("accept-partial-metadata", "GET", PODS, headers={"Accept": pom}),
        Case(
            "accept-protobuf",
            "GET",
            PODS,
            headers={"Accept": "application/vnd.kubernetes.protobuf"},
        ),
        Case(
            "accept-protobuf-or-json",
            "GET",
            PODS,
            headers={"Accept": "application/vnd.kubernetes.protobuf,application/json"},
        ),
        Case("accept-yaml", "GET", f"{PODS}/p1", headers={"Accept": "application/yaml"}),
    ]


def _write_cases() -> list[Case]:
    cm = configmap
    return [
        # Content types of a create.
        Case("create", "POST", f"{CMS}?{DRY}", cm("c1")),
        Case(
            "create-no-content-type",
            "POST",
            f"{CMS}?{DRY}",
            json.dumps(cm("c2")).encode(),
            headers={"Content-Type": ""},
        ),
        Case(
            "create-json-charset",
            "POST",
            f"{CMS}?{DRY}",
            cm("c3"),
            headers={"Content-Type": "application/json; charset=utf-8"},
        ),
        Case(
            "create-yaml",
            "POST",
            f"{CMS}?{DRY}",
            yaml.safe_dump(cm("c4")).encode(),
            headers={"Content-Type": "application/yaml"},
        ),
        Case(
            "create-text-plain",
            "POST",
            f"{CMS}?{DRY}",
            cm("c5"),
            headers={"Content-Type": "text/plain"},
        ),
        Case(
            "create-octet-stream",
            "POST",
            f"{CMS}?{DRY}",
            cm("c6"),
            headers={"Content-Type": "application/octet-stream"},
        ),
        Case(
            "create-form",
            "POST",
            f"{CMS}?{DRY}",
            b"a=b",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        Case("create-merge-patch-type", "POST", f"{CMS}?{DRY}", cm("c7"), headers=MERGE),
        Case(
            "create-bad-content-type",
            "POST",
            f"{CMS}?{DRY}",
            cm("c8"),
            headers={"Content-Type": "not a type"},
        ),
        # Bodies.
        Case(
            "create-bad-json",
            "POST",
            f"{CMS}?{DRY}",
            b'{"apiVersion": "v1", "kind": ',
            headers=JSON_CT,
        ),
        Case("create-json-array", "POST", f"{CMS}?{DRY}", [1, 2]),
        Case("create-empty-body", "POST", f"{CMS}?{DRY}", b"", headers=JSON_CT),
        Case("create-wrong-kind", "POST", f"{CMS}?{DRY}", {**cm("c9"), "kind": "Secret"}),
        Case("create-wrong-version", "POST", f"{CMS}?{DRY}", {**cm("c10"), "apiVersion": "v2"}),
        Case("create-no-kind", "POST", f"{CMS}?{DRY}", {"metadata": {"name": "c11"}}),
        Case("create-namespace-mismatch", "POST", f"{CMS}?{DRY}", cm("c12", namespace="default")),
        Case("create-missing-namespace", "POST", "/api/v1/namespaces/nope/configmaps", cm("c13")),
        Case("create-exists", "POST", CMS, cm("cm1")),
        Case("create-named-url", "POST", f"{CMS}/cm1", cm("cm1")),
        Case(
            "create-no-name",
            "POST",
            f"{CMS}?{DRY}",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}},
        ),
        Case(
            "create-generate-name",
            "POST",
            f"{CMS}?{DRY}",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "g-"}},
        ),
        Case("create-invalid-name", "POST", f"{CMS}?{DRY}", cm("Not_Valid")),
        Case("create-dryrun-bogus", "POST", f"{CMS}?dryRun=Bogus", cm("c14")),
        Case("create-unknown-resource", "POST", f"/api/v1/namespaces/{NS}/bogus", cm("c15")),
        Case("create-cr", "POST", f"{IMC}?{DRY}", imc("peer2")),
        Case(
            "create-cr-invalid-endpoint", "POST", f"{IMC}?{DRY}", imc("peer3", endpoint="ftp://x")
        ),
        Case("create-cr-no-spec", "POST", f"{IMC}?{DRY}", {**imc("peer4"), "spec": None}),
        # Updates.
        Case(
            "put-stale",
            "PUT",
            f"{CMS}/cm1",
            {**cm("cm1"), "metadata": {"name": "cm1", "resourceVersion": "1"}},
        ),
        Case("put-name-mismatch", "PUT", f"{CMS}/cm1?{DRY}", cm("other")),
        Case("put-collection", "PUT", CMS, cm("cm1")),
        Case("put-missing", "PUT", f"{CMS}/nope?{DRY}", cm("nope")),
        Case(
            "put-text-plain",
            "PUT",
            f"{CMS}/cm1?{DRY}",
            cm("cm1"),
            headers={"Content-Type": "text/plain"},
        ),
        # Patches.
        Case("patch-merge", "PATCH", f"{CMS}/cm1?{DRY}", {"data": {"x": "y"}}, headers=MERGE),
        Case(
            "patch-strategic", "PATCH", f"{CMS}/cm1?{DRY}", {"data": {"x": "y"}}, headers=STRATEGIC
        ),
        Case(
            "patch-json",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            [{"op": "add", "path": "/data/x", "value": "y"}],
            headers=JSONPATCH,
        ),
        Case(
            "patch-json-bad-op",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            [{"op": "frob", "path": "/data/x"}],
            headers=JSONPATCH,
        ),
        Case(
            "patch-json-test-fails",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            [{"op": "test", "path": "/data/k", "value": "nope"}],
            headers=JSONPATCH,
        ),
        Case(
            "patch-apply-no-manager", "PATCH", f"{CMS}/cm1?{DRY}", b"data: {x: y}\n", headers=APPLY
        ),
        Case(
            "patch-apply",
            "PATCH",
            f"{CMS}/cm1?{DRY}&fieldManager=t",
            {**cm("cm1"), "data": {"x": "z"}},
            headers=APPLY,
        ),
        Case(
            "patch-json-content-type",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            {"data": {"x": "y"}},
            headers=JSON_CT,
        ),
        Case(
            "patch-text-plain",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            {"data": {"x": "y"}},
            headers={"Content-Type": "text/plain"},
        ),
        Case("patch-bad-json", "PATCH", f"{CMS}/cm1?{DRY}", b"{not json", headers=MERGE),
        Case("patch-missing", "PATCH", f"{CMS}/nope?{DRY}", {"data": {"x": "y"}}, headers=MERGE),
        Case("patch-collection", "PATCH", CMS, {"data": {"x": "y"}}, headers=MERGE),
        Case(
            "patch-change-name",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            {"metadata": {"name": "other"}},
            headers=MERGE,
        ),
        Case(
            "patch-stale-rv",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            {"metadata": {"resourceVersion": "1"}},
            headers=MERGE,
        ),
        Case(
            "patch-cr-strategic",
            "PATCH",
            f"{IMC}/peer1?{DRY}",
            {"spec": {"enableIngressGateway": False}},
            headers=STRATEGIC,
        ),
        Case(
            "patch-cr-merge",
            "PATCH",
            f"{IMC}/peer1?{DRY}",
            {"spec": {"enableIngressGateway": False}},
            headers=MERGE,
        ),
        Case(
            "patch-cr-status",
            "PATCH",
            f"{IMC}/peer1/status?{DRY}",
            {"status": {"pinnedClusterUUID": "u"}},
            headers=MERGE,
        ),
        Case(
            "patch-pod-status-subresource",
            "PATCH",
            f"{PODS}/p1/status?{DRY}",
            {"status": {"phase": "Running"}},
            headers=MERGE,
        ),
        # Deletes.
        Case("delete", "DELETE", f"{CMS}/cm2?{DRY}"),
        Case("delete-missing", "DELETE", f"{CMS}/nope"),
        Case(
            "delete-uid-precondition",
            "DELETE",
            f"{CMS}/cm2",
            {"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}},
        ),
        Case("delete-bad-body", "DELETE", f"{CMS}/cm2?{DRY}", b"{not json", headers=JSON_CT),
        Case("delete-collection", "DELETE", f"{CMS}?{DRY}&labelSelector=team%3Db"),
        Case("delete-pod", "DELETE", f"{PODS}/p2?{DRY}"),
        Case("delete-cr", "DELETE", f"{IMC}/peer1?{DRY}"),
        # Namespace deletion (the last cases to touch GONE): no namespace controller runs.
        Case("delete-namespace", "DELETE", f"/api/v1/namespaces/{GONE}"),
        Case("get-deleted-namespace", "GET", f"/api/v1/namespaces/{GONE}"),
        Case("get-in-deleted-namespace", "GET", f"/api/v1/namespaces/{GONE}/configmaps/left"),
        Case(
            "create-in-deleted-namespace", "POST", f"/api/v1/namespaces/{GONE}/configmaps", cm("x")
        ),
        # Methods.
        Case("head-named", "HEAD", f"{PODS}/p1"),
        Case("options", "OPTIONS", PODS),
        Case("post-nonresource", "POST", "/version", {}),
        Case("post-discovery", "POST", "/api/v1", {}),
        Case("post-unknown-path", "POST", "/nonexistent", {}),
        Case("delete-healthz", "DELETE", "/healthz"),
        Case(
            "create-protobuf",
            "POST",
            f"{CMS}?{DRY}",
            cm("c16"),
            headers={"Content-Type": "application/vnd.kubernetes.protobuf"},
        ),
        Case(
            "create-cr-protobuf",
            "POST",
            f"{IMC}?{DRY}",
            imc("peer5"),
            headers={"Content-Type": "application/vnd.kubernetes.protobuf"},
        ),
        Case(
            "patch-no-content-type",
            "PATCH",
            f"{CMS}/cm1?{DRY}",
            {"data": {"x": "y"}},
            headers={"Content-Type": ""},
        ),
        Case("put-dryrun-bogus", "PUT", f"{CMS}/cm1?dryRun=Bogus", cm("cm1")),
        Case("patch-dryrun-bogus", "PATCH", f"{CMS}/cm1?dryRun=Bogus", {"data": {}}, headers=MERGE),
        Case("delete-dryrun-bogus", "DELETE", f"{CMS}/cm2?dryRun=Bogus"),
        Case(
            "delete-rv-precondition",
            "DELETE",
            f"{CMS}/cm2",
            {"preconditions": {"resourceVersion": "1"}},
        ),
        Case(
            "delete-cr-uid-precondition",
            "DELETE",
            f"{IMC}/peer1",
            {"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}},
        ),
        Case("delete-empty-json-body", "DELETE", f"{CMS}/cm2?{DRY}", {}),
        Case("create-dryrun-twice", "POST", f"{CMS}?dryRun=All&dryRun=All", cm("c17")),
        Case("patch-merge-array-body", "PATCH", f"{CMS}/cm1?{DRY}", [1], headers=MERGE),
        Case(
            "patch-strategic-bad-json", "PATCH", f"{CMS}/cm1?{DRY}", b"{not json", headers=STRATEGIC
        ),
        Case("patch-json-bad-json", "PATCH", f"{CMS}/cm1?{DRY}", b"{not json", headers=JSONPATCH),
    ]


def corpus() -> list[Case]:
    cases = _watch_cases() + _list_cases() + _read_cases() + _nonresource_cases()
    cases += _accept_cases() + _write_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# -- sending ----------------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    token: str
    ca_pem: str

    def send(self, case: Case) -> Outcome:
        return classify(*self.raw(case))

    def raw(self, case: Case) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, the body's first line): a watch's first event, or a whole body."""
        parts = urlsplit(self.url)
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, context=ctx, timeout=READ_TIMEOUT
        )
        headers = {
            "Authorization": f"Bearer {case.token or self.token}",
            "Accept": "application/json",
        }
        body: bytes | None = None
        if case.body is not None:
            body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
            headers["Content-Type"] = "application/json"
        headers.update(case.headers)
        try:
            conn.putrequest(case.method, case.path, skip_accept_encoding=True)
            for k, v in headers.items():
                if v:  # "" means: send no such header
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            try:
                resp = conn.getresponse()
            except http.client.RemoteDisconnected:
                # kube-apiserver 1.37 closes the connection on a custom resource whose body is
                # labelled protobuf but is not: no status to compare, so say exactly that.
                return 0, {}, b"<connection closed>"
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if case.method == "HEAD":
                return resp.status, hdrs, b""
            try:
                first = resp.readline()
            except TimeoutError:
                return resp.status, hdrs, b"<silent stream>"
            try:
                json.loads(first)
            except ValueError:
                # Not one line of JSON (a watch event or a compact body): an indented document
                # or text, which is never a stream; read all of it.
                first += resp.read()
            return resp.status, hdrs, first
        finally:
            conn.close()


def classify(status: int, headers: dict[str, str], body: bytes) -> Outcome:
    ctype = headers.get("content-type", "").split(";")[0].strip()
    text = body.strip()
    if text == b"<silent stream>":
        return Outcome(status, "stream:silent")
    if text == b"<connection closed>":
        return Outcome(status, "closed")
    if not text:
        return Outcome(status, "empty")
    if ctype != "application/json":
        return Outcome(status, f"text:{ctype or '-'}")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    try:
        doc = doc if doc is not None else json.loads(text.split(b"\n", 1)[0])
    except ValueError:
        return Outcome(status, "text:unparsed-json")
    if isinstance(doc, dict) and set(doc) == {"type", "object"}:
        obj = doc["object"]
        shape = f"watch:{doc['type']}"
        if doc["type"] == "ERROR" and isinstance(obj, dict):
            return Outcome(status, shape, str(obj.get("reason", "")), _details(obj))
        return Outcome(status, shape)
    if not isinstance(doc, dict):
        return Outcome(status, f"json:{type(doc).__name__}")
    kind = str(doc.get("kind", ""))
    if kind == "Status":
        return Outcome(status, "status", str(doc.get("reason", "")), _details(doc))
    if "items" in doc:
        return Outcome(status, f"list:{kind}")
    return Outcome(status, f"object:{kind}")


def _details(status: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    det = status.get("details") or {}
    return tuple(sorted((k, str(det[k])) for k in ("name", "group", "kind") if det.get(k)))


def setup(target: Target) -> None:
    """Create the corpus's objects (and the CRD, waiting until it serves) on one server."""
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    out = target.send(Case("setup", "POST", path, crd()))
    assert out.code in (201, 409), f"setup {path}: {out}"  # 409: another test made it
    deadline = time.monotonic() + 30
    while target.send(Case("crd-ready", "GET", IMC)).code != 200:
        assert time.monotonic() < deadline, "the CRD did not start serving"
        time.sleep(0.1)  # establishing a CRD has no event a raw client can await
    for method, path, body in SETUP:
        out = target.send(Case("setup", method, path, body))
        assert out.code == 201, f"setup {path}: {out}"
