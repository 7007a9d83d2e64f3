"""Discovery documents (/version, /api, /apis, group versions) and a minimal OpenAPI v3.

Only the legacy (unaggregated) discovery is served: kubectl and client-go ask for the aggregated
form first and fall back to the legacy one when the response is plain `application/json`, as they
do with any server that does not implement it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from apiproxy_dev.sim.resources import STATUS_VERBS, Registry, ResourceType

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-apiproxy-sim",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group(reg: Registry, group: str) -> dict[str, Any]:
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in reg.group_versions[group]]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def api_group_list(reg: Registry) -> dict[str, Any]:
    groups = [_group(reg, g) for g in reg.group_versions if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(reg: Registry, group: str) -> dict[str, Any] | None:
    if not group or group not in reg.group_versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(reg, group)}


def resource_list(reg: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = reg.by_gv.get((group, version))
    if types is None:
        return None
    resources: list[dict[str, Any]] = []
    for rt in sorted(types.values(), key=lambda r: r.resource):
        resources.append(rt.api_resource())
        if rt.has_status:
            resources.append(
                {
                    "name": f"{rt.resource}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": list(STATUS_VERBS),
                }
            )
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _gv_doc(group: str, version: str, types: list[ResourceType]) -> dict[str, Any]:
    """Just enough OpenAPI v3 for kubectl to see that PATCH accepts `fieldValidation`, so it
    leaves validation to the server (which accepts anything well-formed)."""
    paths: dict[str, Any] = {}
    params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]
    for rt in types:
        prefix = "/" + _gv_path(group, version)
        ns = "/namespaces/{namespace}" if rt.namespaced else ""
        gvk = [{"group": group, "version": version, "kind": rt.kind}]
        paths[f"{prefix}{ns}/{rt.resource}/{{name}}"] = {
            "patch": {
                "operationId": f"patch{rt.kind}",
                "parameters": params,
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk[0],
                "responses": {"200": {"description": "OK"}},
            },
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }


def openapi_v3(reg: Registry) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The /openapi/v3 index and each group-version's document."""
    docs: dict[str, bytes] = {}
    index: dict[str, Any] = {}
    for (group, version), types in sorted(reg.by_gv.items()):
        body = json.dumps(_gv_doc(group, version, list(types.values()))).encode()
        path = _gv_path(group, version)
        digest = hashlib.sha512(body).hexdigest()[:128].upper()
        docs[path] = body
        index[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": index}, docs
