"""The simulator over HTTPS with a raw client: auth, Audit-ID, discovery, CRUD status codes,
content negotiation, LIST semantics."""

from __future__ import annotations

from typing import Any

from apiproxy_dev.sim import SimAPIServer


async def test_bearer_token_required_with_status_body(raw: Any) -> None:
    code, _, body = await raw.get("/api/v1/pods", headers={"Authorization": "Bearer wrong"})
    assert code == 401
    assert body["kind"] == "Status"
    assert body["reason"] == "Unauthorized"
    assert body["code"] == 401
    code, _, _ = await raw.get("/api/v1/pods")
    assert code == 200


async def test_audit_id_echoed_or_generated(raw: Any) -> None:
    _, headers, _ = await raw.get("/version", headers={"Audit-ID": "abc-123"})
    assert headers["Audit-ID"] == "abc-123"
    _, h1, _ = await raw.get("/version")
    _, h2, _ = await raw.get("/version")
    assert len(h1["Audit-ID"]) == 36
    assert h1["Audit-ID"] != h2["Audit-ID"]


async def test_discovery_lists_groups_and_resources(raw: Any) -> None:
    _, _, apis = await raw.get("/apis")
    names = {g["name"] for g in apis["groups"]}
    assert {"discovery.k8s.io", "coordination.k8s.io", "apiextensions.k8s.io"} <= names
    _, _, core = await raw.get("/api/v1")
    res = {r["name"]: r for r in core["resources"]}
    assert res["pods"]["namespaced"]
    assert not res["nodes"]["namespaced"]
    assert "pods/status" in res
    assert "watch" in res["events"]["verbs"]
    code, _, _ = await raw.get("/apis/deckhouse.io/v1alpha1")
    assert code == 404


async def test_crd_registration_extends_discovery(raw: Any, sim: SimAPIServer) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "istiomulticlusters.deckhouse.io"},
        "spec": {
            "group": "deckhouse.io",
            "scope": "Cluster",
            "names": {"plural": "istiomulticlusters", "kind": "IstioMulticluster"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                }
            ],
        },
    }
    code, _, _ = await raw.call(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
    )
    assert code == 201
    _, _, rl = await raw.get("/apis/deckhouse.io/v1alpha1")
    assert [r["name"] for r in rl["resources"]] == [
        "istiomulticlusters",
        "istiomulticlusters/status",
    ]
    obj = {
        "apiVersion": "deckhouse.io/v1alpha1",
        "kind": "IstioMulticluster",
        "metadata": {"name": "p"},
        "spec": {"x": 1},
        "status": {"ignored": True},
    }
    code, _, created = await raw.call("POST", "/apis/deckhouse.io/v1alpha1/istiomulticlusters", obj)
    assert code == 201
    assert "status" not in created
    assert created["metadata"]["generation"] == 1
    code, _, _ = await raw.call(
        "DELETE",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/istiomulticlusters.deckhouse.io",
    )
    assert code == 200
    code, _, _ = await raw.get("/apis/deckhouse.io/v1alpha1/istiomulticlusters")
    assert code == 404


async def test_create_conflict_notfound(raw: Any, make_pod: Any) -> None:
    code, _, created = await raw.call("POST", "/api/v1/namespaces/default/pods", make_pod("a"))
    assert code == 201
    assert created["metadata"]["uid"]
    assert created["metadata"]["creationTimestamp"]
    code, _, body = await raw.call("POST", "/api/v1/namespaces/default/pods", make_pod("a"))
    assert code == 409
    assert body["reason"] == "AlreadyExists"
    assert body["details"] == {"name": "a", "kind": "pods"}
    code, _, body = await raw.get("/api/v1/namespaces/default/pods/nope")
    assert code == 404
    assert body["message"] == 'pods "nope" not found'
    code, _, body = await raw.call(
        "POST", "/api/v1/namespaces/missing/pods", make_pod("a", "missing")
    )
    assert code == 404
    assert body["message"] == 'namespaces "missing" not found'
    code, _, body = await raw.get("/apis/coordination.k8s.io/v1/namespaces/default/leases/l")
    assert code == 404
    assert body["details"]["group"] == "coordination.k8s.io"
    assert body["message"] == 'leases.coordination.k8s.io "l" not found'


async def test_generate_name(raw: Any) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "x-"}}
    code, _, a = await raw.call("POST", "/api/v1/namespaces/default/configmaps", cm)
    _, _, b = await raw.call("POST", "/api/v1/namespaces/default/configmaps", cm)
    assert code == 201
    assert a["metadata"]["name"].startswith("x-")
    assert a["metadata"]["name"] != b["metadata"]["name"]


async def test_update_conflict_and_status_subresource(raw: Any, make_pod: Any) -> None:
    _, _, p = await raw.call("POST", "/api/v1/namespaces/default/pods", make_pod("a"))
    stale = dict(p)
    p["metadata"]["labels"] = {"x": "1"}
    code, _, p2 = await raw.call("PUT", "/api/v1/namespaces/default/pods/a", p)
    assert code == 200
    assert int(p2["metadata"]["resourceVersion"]) > int(p["metadata"]["resourceVersion"])
    stale["metadata"] = {**stale["metadata"], "labels": {"x": "2"}}
    code, _, body = await raw.call("PUT", "/api/v1/namespaces/default/pods/a", stale)
    assert code == 409
    assert body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]
    # The main resource ignores status changes; the status subresource ignores everything else.
    p2["status"] = {"phase": "Failed"}
    _, _, p3 = await raw.call("PUT", "/api/v1/namespaces/default/pods/a", p2)
    assert "phase" not in (p3.get("status") or {})
    p3["status"] = {"phase": "Succeeded"}
    p3["metadata"]["labels"] = {"x": "ignored"}
    _, _, p4 = await raw.call("PUT", "/api/v1/namespaces/default/pods/a/status", p3)
    assert p4["status"]["phase"] == "Succeeded"
    assert p4["metadata"]["labels"] == {"x": "1"}


async def test_noop_update_keeps_resource_version(raw: Any, sim: SimAPIServer) -> None:
    cm = sim.store.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "default"},
            "data": {"a": "1"},
        }
    )
    code, _, same = await raw.call("PUT", "/api/v1/namespaces/default/configmaps/c", cm)
    assert code == 200
    assert same["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]


async def test_generation_bumps_on_spec_change_only(raw: Any, sim: SimAPIServer) -> None:
    svc = sim.store.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]},
        }
    )
    assert svc["metadata"]["generation"] == 1
    code, _, s2 = await raw.call(
        "PATCH",
        "/api/v1/namespaces/default/services/s",
        {"metadata": {"labels": {"a": "b"}}},
        content_type="application/merge-patch+json",
    )
    assert code == 200
    assert s2["metadata"]["generation"] == 1
    _, _, s3 = await raw.call(
        "PATCH",
        "/api/v1/namespaces/default/services/s",
        {"spec": {"ports": [{"port": 81}]}},
        content_type="application/merge-patch+json",
    )
    assert s3["metadata"]["generation"] == 2


async def test_patch_kinds(raw: Any, make_pod: Any) -> None:
    await raw.call("POST", "/api/v1/namespaces/default/pods", make_pod("a"))
    base = "/api/v1/namespaces/default/pods/a"
    _, _, p = await raw.call(
        "PATCH",
        base,
        {"spec": {"containers": [{"name": "c", "image": "nginx"}, {"name": "d", "image": "x"}]}},
        content_type="application/strategic-merge-patch+json",
    )
    assert [(c["name"], c["image"]) for c in p["spec"]["containers"]] == [
        ("c", "nginx"),
        ("d", "x"),
    ]
    _, _, p = await raw.call(
        "PATCH",
        base,
        [{"op": "add", "path": "/metadata/labels/k", "value": "v"}],
        content_type="application/json-patch+json",
    )
    assert p["metadata"]["labels"] == {"k": "v"}
    code, _, body = await raw.call("PATCH", base, {"spec": {}}, content_type="application/json")
    assert code == 415
    assert body["reason"] == "UnsupportedMediaType"
    code, _, _ = await raw.call(
        "PATCH", base + "x", {"a": 1}, content_type="application/merge-patch+json"
    )
    assert code == 404


async def test_finalizers_hold_deletion(raw: Any, sim: SimAPIServer) -> None:
    sim.store.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "f", "namespace": "default", "finalizers": ["example.com/hold"]},
        }
    )
    code, _, held = await raw.call("DELETE", "/api/v1/namespaces/default/configmaps/f")
    assert code == 200
    assert held["metadata"]["deletionTimestamp"]
    code, _, still = await raw.get("/api/v1/namespaces/default/configmaps/f")
    assert code == 200
    assert still["metadata"]["deletionTimestamp"]
    code, _, _ = await raw.call(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/f",
        {"metadata": {"finalizers": None}},
        content_type="application/merge-patch+json",
    )
    assert code == 200
    code, _, _ = await raw.get("/api/v1/namespaces/default/configmaps/f")
    assert code == 404


async def test_delete_preconditions_and_collection(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    for i in range(3):
        sim.store.create(make_pod(f"p{i}", labels={"app": "x" if i < 2 else "y"}))
    code, _, _body = await raw.call(
        "DELETE", "/api/v1/namespaces/default/pods/p0", {"preconditions": {"uid": "nope"}}
    )
    assert code == 409
    code, _, lst = await raw.call("DELETE", "/api/v1/namespaces/default/pods?labelSelector=app%3Dx")
    assert code == 200
    assert sorted(i["metadata"]["name"] for i in lst["items"]) == ["p0", "p1"]
    assert [p["metadata"]["name"] for p in sim.store.list("pods", "default")] == ["p2"]


async def test_content_negotiation(raw: Any) -> None:
    code, headers, _ = await raw.get(
        "/api/v1/pods", headers={"Accept": "application/vnd.kubernetes.protobuf,application/json"}
    )
    assert code == 200
    assert headers["Content-Type"].startswith("application/json")
    code, _, body = await raw.get(
        "/api/v1/pods", headers={"Accept": "application/vnd.kubernetes.protobuf"}
    )
    assert code == 406
    assert body["reason"] == "NotAcceptable"


async def test_partial_object_metadata_for_metadata_informers(
    raw: Any, sim: SimAPIServer, make_pod: Any
) -> None:
    """client-go's metadata client asks for metadata only; kube-apiserver answers it so, in a
    list, a named get and every watch event (full objects would not decode in its watch)."""
    sim.store.create(make_pod("p0", labels={"app": "web"}))
    list_accept = (
        "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,"
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
    )
    code, _, lst = await raw.get("/api/v1/pods", headers={"Accept": list_accept})
    assert code == 200
    assert (lst["kind"], lst["apiVersion"]) == ("PartialObjectMetadataList", "meta.k8s.io/v1")
    (item,) = lst["items"]
    assert set(item) == {"kind", "apiVersion", "metadata"}
    assert (item["kind"], item["metadata"]["labels"]) == ("PartialObjectMetadata", {"app": "web"})
    one = list_accept.replace("MetadataList", "Metadata")
    code, _, got = await raw.get("/api/v1/namespaces/default/pods/p0", headers={"Accept": one})
    assert (code, got["kind"], "spec" in got) == (200, "PartialObjectMetadata", False)
    events = await raw.watch_lines(
        "/api/v1/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        "&allowWatchBookmarks=true",
        headers={"Accept": one},
        count=2,
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert {e["object"]["kind"] for e in events} == {"PartialObjectMetadata"}
    assert "spec" not in events[0]["object"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    # Plain JSON clients still get full objects.
    code, _, full = await raw.get("/api/v1/pods")
    assert (full["kind"], "spec" in full["items"][0]) == ("PodList", True)


async def test_list_selectors(raw: Any, sim: SimAPIServer, make_pod: Any) -> None:
    sim.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    sim.store.create(make_pod("a", labels={"app": "web", "tier": "fe"}))
    sim.store.create(make_pod("b", labels={"app": "db"}, phase="Succeeded"))
    sim.store.create(make_pod("c", "other", labels={"app": "web"}))

    async def names(q: str) -> list[str]:
        code, _, body = await raw.get("/api/v1/pods?" + q)
        assert code == 200, body
        assert body["kind"] == "PodList"
        assert body["metadata"]["resourceVersion"]
        return [i["metadata"]["name"] for i in body["items"]]

    assert await names("labelSelector=app%3Dweb") == ["a", "c"]
    assert await names("labelSelector=app+in+(web,db),tier") == ["a"]
    assert await names("labelSelector=!tier") == ["b", "c"]
    assert await names("labelSelector=app!%3Dweb") == ["b"]
    assert await names("fieldSelector=status.phase!%3DSucceeded") == ["a", "c"]
    assert await names("fieldSelector=metadata.namespace%3Dother") == ["c"]
    assert await names("fieldSelector=metadata.name%3Db") == ["b"]
    code, _, body = await raw.get("/api/v1/pods?fieldSelector=spec.bogus%3Dx")
    assert code == 400
    assert body["reason"] == "BadRequest"
    assert "field label not supported: spec.bogus" in body["message"]
    code, _, body = await raw.get("/api/v1/pods?labelSelector=a+in+(")
    assert code == 400


async def test_secret_type_field_selector(raw: Any, sim: SimAPIServer) -> None:
    sim.store.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "a", "namespace": "default"},
        }
    )
    sim.store.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "helm.sh/release.v1",
            "metadata": {"name": "b", "namespace": "default"},
        }
    )
    _, _, body = await raw.get("/api/v1/secrets?fieldSelector=type!%3Dhelm.sh/release.v1")
    assert [i["metadata"]["name"] for i in body["items"]] == ["a"]


async def test_openapi_v3_declares_field_validation_and_v2_is_absent(raw: Any) -> None:
    _, _, index = await raw.get("/openapi/v3")
    url = index["paths"]["api/v1"]["serverRelativeURL"]
    _, _, doc = await raw.get(url)
    patch_op = doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]["patch"]
    assert patch_op["x-kubernetes-group-version-kind"]["kind"] == "ConfigMap"
    assert {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}} in patch_op[
        "parameters"
    ]
    code, _, _ = await raw.get(
        "/openapi/v2",
        headers={"Accept": "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"},
    )
    assert code == 404


async def test_watch_parameter_spellings_as_the_real_server(raw: Any, sim: SimAPIServer) -> None:
    sim.store.create(_cm("seen"))
    base = "/api/v1/namespaces/default/configmaps"
    for value in ("", "yes", "on", "no", "off", "1", "True"):
        events = await raw.watch_lines(f"{base}?watch={value}&timeoutSeconds=5", count=1)
        assert events[0]["type"] == "ADDED", value
    for value in ("0", "false", "FALSE", "fAlSe"):
        code, _, body = await raw.get(f"{base}?watch={value}")
        assert (code, body["kind"]) == (200, "ConfigMapList"), value
    events = await raw.watch_lines(f"{base}?watch&timeoutSeconds=5", count=1)
    assert events[0]["object"]["metadata"]["name"] == "seen"


async def test_named_get_ignores_watch(raw: Any, sim: SimAPIServer) -> None:
    sim.store.create(_cm("one"))
    code, _, body = await raw.get("/api/v1/namespaces/default/configmaps/one?watch=true")
    assert (code, body["kind"]) == (200, "ConfigMap")
    code, _, body = await raw.get("/api/v1/namespaces/default/configmaps/nope?watch=1")
    assert (code, body["reason"]) == (404, "NotFound")
    events = await raw.watch_lines(
        "/api/v1/watch/namespaces/default/configmaps/one?timeoutSeconds=5", count=1
    )
    assert events[0]["object"]["metadata"]["name"] == "one"


async def test_create_body_content_types(raw: Any) -> None:
    path = "/api/v1/namespaces/default/configmaps?dryRun=All"
    for ctype in ("text/plain", "application/octet-stream", "not a type"):
        code, _, body = await raw.call("POST", path, _cm("c"), content_type=ctype)
        assert (code, body["reason"]) == (415, "UnsupportedMediaType"), ctype
    for ctype in ("application/json", "application/json; charset=utf-8", "application/yaml"):
        code, _, body = await raw.call("POST", path, _cm("c"), content_type=ctype)
        assert code == 201, (ctype, body)


async def test_write_options_are_validated(raw: Any, sim: SimAPIServer) -> None:
    sim.store.create(_cm("o"))
    code, _, body = await raw.call(
        "POST", "/api/v1/namespaces/default/configmaps?dryRun=Bogus", _cm("x")
    )
    assert (code, body["details"]["kind"]) == (422, "CreateOptions")
    code, _, body = await raw.call(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/o",
        {"data": {"a": "b"}},
        content_type="application/apply-patch+yaml",
    )
    assert (code, body["details"]["kind"]) == (422, "PatchOptions")
    assert sim.store.get("configmaps", "o", "default")["data"] == {"k": "v"}


def _cm(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"k": "v"},
    }
