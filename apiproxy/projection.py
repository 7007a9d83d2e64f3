"""Projections: the fields of an object a peer is sent under a rule that filters or projects.

Every object answered under such a rule loses `metadata.managedFields` and the annotations
`kubectl.kubernetes.io/last-applied-configuration` (a copy of the whole manifest, env included)
and `proxy.istio.io/overrides` (can hold a whole container spec): `strip`.

The named projections mirror Istio's informer transforms exactly (istio/istio `pkg/kube/util.go`
at 86c9f01, `StripPodUnusedFields` lines 389-436 and `StripNodeUnusedFields` lines 364-385), so
istiod receives exactly what it would keep anyway:

- `istiod-pod`: metadata (minus the above); spec only `containers` reduced to those with ports
  and only their `ports`, native sidecar `initContainers` (restartPolicy Always) with ports
  reduced to `ports` + `restartPolicy` (each with `name: ""`, as Go encodes the new Container
  Istio builds, and as typed clients require the field), `serviceAccountName`, `nodeName`,
  `hostNetwork`, `hostname`, `subdomain`; status without `initContainerStatuses` and
  `containerStatuses`.
- `istiod-node`: metadata without any annotations or ownerReferences; status without
  `allocatable`, `capacity`, `images` and `conditions`.

Objects are the decoded JSON dicts; the functions change them in place and return them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["LAST_APPLIED", "PROXY_OVERRIDES", "projector", "strip"]

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
PROXY_OVERRIDES = "proxy.istio.io/overrides"
_POD_SPEC_KEYS = ("serviceAccountName", "nodeName", "hostNetwork", "hostname", "subdomain")

Object = dict[str, Any]


def strip(obj: Object) -> Object:
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED, None)
            annotations.pop(PROXY_OVERRIDES, None)
            if not annotations:
                del meta["annotations"]
    return obj


def istiod_pod(obj: Object) -> Object:
    strip(obj)
    spec = obj.get("spec")
    if isinstance(spec, dict):
        new: dict[str, Any] = {
            "containers": [
                {"name": "", "ports": c["ports"]}
                for c in spec.get("containers") or ()
                if isinstance(c, dict) and c.get("ports")
            ]
        }
        inits = [
            {"name": "", "ports": c["ports"], "restartPolicy": "Always"}
            for c in spec.get("initContainers") or ()
            if isinstance(c, dict) and c.get("restartPolicy") == "Always" and c.get("ports")
        ]
        if inits:
            new["initContainers"] = inits
        for key in _POD_SPEC_KEYS:
            if key in spec:
                new[key] = spec[key]
        obj["spec"] = new
    status = obj.get("status")
    if isinstance(status, dict):
        status.pop("initContainerStatuses", None)
        status.pop("containerStatuses", None)
    return obj


def istiod_node(obj: Object) -> Object:
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        meta.pop("annotations", None)
        meta.pop("ownerReferences", None)
    status = obj.get("status")
    if isinstance(status, dict):
        for key in ("allocatable", "capacity", "images", "conditions"):
            status.pop(key, None)
    return obj


_PROJECTIONS: dict[str, Callable[[Object], Object]] = {
    "": strip,
    "istiod-pod": istiod_pod,
    "istiod-node": istiod_node,
}


def projector(name: str) -> Callable[[Object], Object]:
    """The transform for a rule's projection ("" strips only); KeyError for an unknown name."""
    return _PROJECTIONS[name]
