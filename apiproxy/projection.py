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

The functions below change decoded JSON dicts in place and return them; they are the definition.
Answers are projected from their bytes (`decode`, further down), which gives the same objects
without decoding what the projection drops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

__all__ = [
    "LAST_APPLIED",
    "PROXY_OVERRIDES",
    "Decoded",
    "NotJSON",
    "decoder",
    "encode_all",
    "istiod_node",
    "istiod_pod",
    "many_decoder",
    "projector",
    "strip",
]

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
PROXY_OVERRIDES = "proxy.istio.io/overrides"
_NODE_STATUS_DROPPED = ("allocatable", "capacity", "images", "conditions")
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


def _items(value: Any) -> list[Any]:
    """A list member, or none: a container list of another type (no API server sends one) keeps
    no container."""
    return value if isinstance(value, list) else []


def istiod_pod(obj: Object) -> Object:
    strip(obj)
    spec = obj.get("spec")
    if isinstance(spec, dict):
        new: dict[str, Any] = {
            "containers": [
                {"name": "", "ports": c["ports"]}
                for c in _items(spec.get("containers"))
                if isinstance(c, dict) and c.get("ports")
            ]
        }
        inits = [
            {"name": "", "ports": c["ports"], "restartPolicy": "Always"}
            for c in _items(spec.get("initContainers"))
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
        for key in _NODE_STATUS_DROPPED:
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


# -- answers as bytes: decoded only as deep as the projection reads --------------------------------
#
# msgspec keeps each member the projection passes on unchanged as its encoded bytes (`Raw`) and
# skips the members it drops without building Python objects for them; most of a pod is dropped,
# so this costs a fraction of decoding it (bench/filtering.py). What the typed route cannot take (a
# pod with a top-level member it does not know, or a member of another type than the API's) is
# decoded whole and projected by the functions above. Either way the result is the same object;
# tests/proxy/test_projection_bytes.py holds the two routes to each other.


class NotJSON(ValueError):
    """The bytes are not one JSON value: a list splitter's false candidate, or a broken answer."""


Members = dict[str, msgspec.Raw]
_members = msgspec.json.Decoder(Members)
_value = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
_UNSET: Any = msgspec.UNSET


def _open(raw: msgspec.Raw | None) -> Members | None:
    """A JSON object's members, each still encoded; None for any other value, or none."""
    if raw is None:
        return None
    try:
        return _members.decode(raw)
    except msgspec.ValidationError:
        return None


class _Container(msgspec.Struct):
    ports: list[msgspec.Raw] | None = None
    restartPolicy: Any = None


class _PodSpec(msgspec.Struct):
    containers: list[_Container] | None = None
    initContainers: list[_Container] | None = None
    serviceAccountName: msgspec.Raw = _UNSET
    nodeName: msgspec.Raw = _UNSET
    hostNetwork: msgspec.Raw = _UNSET
    hostname: msgspec.Raw = _UNSET
    subdomain: msgspec.Raw = _UNSET


class _Pod(msgspec.Struct, forbid_unknown_fields=True):
    kind: msgspec.Raw = _UNSET
    apiVersion: msgspec.Raw = _UNSET
    metadata: Members = _UNSET
    spec: _PodSpec = _UNSET
    status: Members = _UNSET


_pod = msgspec.json.Decoder(_Pod)


class Decoded:
    """One object on its way to a peer: its metadata for the visibility decision, and its bytes
    as projected (`encode`, done only for what is sent)."""

    __slots__ = ("_bytes", "_meta", "_obj", "_project", "is_object", "whole")

    def __init__(
        self,
        obj: Any,
        meta: dict[str, Any] | None,
        project: Callable[[Any], Any],
        *,
        whole: bool = False,
        is_object: bool = True,
    ) -> None:
        self._obj = obj
        self._meta = meta
        self._project = project
        self.whole = whole  # decoded whole (the definition's route): members are values, not Raw
        self.is_object = is_object  # anything else is never sent
        self._bytes: bytes | None = None

    def member(self, key: str) -> Any:
        """metadata[key] decoded; None without metadata (not an object) or without the key."""
        meta = self._meta
        if meta is None:
            return None
        value = meta.get(key)
        if value is None or self.whole:
            return value
        return _value.decode(value)

    def encode(self) -> bytes:
        """The projected object's bytes (projected once: the projection changes it in place)."""
        if self._bytes is None:
            self._bytes = _encode(self._project(self._obj))
        return self._bytes


def encode_all(objs: list[Decoded]) -> bytes:
    """The projected objects' bytes, comma-separated, as `encode` would give each (one encoder
    call for all: msgspec writes a list with no space after its commas). For objects not encoded
    before: the projection changes them in place."""
    return _encode([o._project(o._obj) for o in objs])[1:-1]


def _whole(data: bytes | memoryview, project: Callable[[Object], Object]) -> Decoded:
    try:
        obj = _value.decode(data)
    except msgspec.DecodeError:
        raise NotJSON from None
    if not isinstance(obj, dict):
        return Decoded(obj, None, project, whole=True, is_object=False)
    meta = obj.get("metadata")
    return Decoded(obj, meta if isinstance(meta, dict) else None, project, whole=True)


def _strip_members(meta: Members, *, all_annotations: bool = False) -> None:
    meta.pop("managedFields", None)
    if all_annotations:
        meta.pop("annotations", None)
        return
    annotations = _open(meta.get("annotations"))
    if annotations is None:
        return
    annotations.pop(LAST_APPLIED, None)
    annotations.pop(PROXY_OVERRIDES, None)
    if annotations:
        meta["annotations"] = annotations  # type: ignore[assignment]  # encoded as an object
    else:
        del meta["annotations"]


def _decode_members(data: bytes | memoryview, project: Callable[[Any], Any]) -> Decoded:
    try:
        top = _members.decode(data)
    except msgspec.ValidationError:
        return _whole(data, strip)  # not an object: never shown
    except msgspec.DecodeError:
        raise NotJSON from None
    return _with_metadata(top, project)


def _with_metadata(top: Members, project: Callable[[Any], Any]) -> Decoded:
    meta = _open(top.get("metadata"))
    if meta is not None:
        top["metadata"] = meta  # type: ignore[assignment]
    return Decoded(top, meta, project)


def _strip_raw(top: dict[str, Any]) -> dict[str, Any]:
    meta = top.get("metadata")
    if isinstance(meta, dict):
        _strip_members(meta)
    return top


def _istiod_node_raw(top: dict[str, Any]) -> dict[str, Any]:
    meta = top.get("metadata")
    if isinstance(meta, dict):
        meta.pop("ownerReferences", None)
        _strip_members(meta, all_annotations=True)
    status = _open(top.get("status"))
    if status is not None:
        for key in _NODE_STATUS_DROPPED:
            status.pop(key, None)
        top["status"] = status
    return top


def _istiod_pod_raw(pod: _Pod) -> _Pod:
    """`istiod_pod` on the typed pod, in place. Encoded as the struct: members it does not know
    were never read, and those left unset are left out."""
    if pod.metadata is not _UNSET:
        _strip_members(pod.metadata)
    spec = pod.spec
    if spec is not _UNSET:
        spec.containers = [
            {"name": "", "ports": c.ports}  # type: ignore[misc]  # encoded as they are
            for c in spec.containers or ()
            if c.ports
        ]
        inits = [
            {"name": "", "ports": c.ports, "restartPolicy": "Always"}
            for c in spec.initContainers or ()
            if c.restartPolicy == "Always" and c.ports
        ]
        spec.initContainers = inits or _UNSET  # type: ignore[assignment]
    if pod.status is not _UNSET:
        pod.status.pop("initContainerStatuses", None)
        pod.status.pop("containerStatuses", None)
    return pod


def _decode_pod(data: bytes | memoryview) -> Decoded:
    try:
        pod = _pod.decode(data)
    except msgspec.ValidationError:
        return _whole(data, istiod_pod)
    except msgspec.DecodeError:
        raise NotJSON from None
    return _typed_pod(pod)


def _typed_pod(pod: _Pod) -> Decoded:
    return Decoded(pod, pod.metadata if pod.metadata is not _UNSET else None, _istiod_pod_raw)


_pods = msgspec.json.Decoder(list[_Pod])
_objects = msgspec.json.Decoder(list[Members])


def _decode_pods(data: bytes) -> list[Decoded] | None:
    try:
        pods = _pods.decode(data)
    except msgspec.DecodeError:  # ValidationError included: an odd pod, read one by one
        return None
    return [_typed_pod(pod) for pod in pods]


def _decode_objects(data: bytes, project: Callable[[Any], Any]) -> list[Decoded] | None:
    try:
        tops = _objects.decode(data)
    except msgspec.DecodeError:
        return None
    return [_with_metadata(top, project) for top in tops]


_DECODERS: dict[str, Callable[[bytes | memoryview], Decoded]] = {
    "": lambda data: _decode_members(data, _strip_raw),
    "istiod-pod": _decode_pod,
    "istiod-node": lambda data: _decode_members(data, _istiod_node_raw),
}


_MANY_DECODERS: dict[str, Callable[[bytes], list[Decoded] | None]] = {
    "": lambda data: _decode_objects(data, _strip_raw),
    "istiod-pod": _decode_pods,
    "istiod-node": lambda data: _decode_objects(data, _istiod_node_raw),
}


def many_decoder(name: str) -> Callable[[bytes], list[Decoded] | None]:
    """Reads a JSON list of objects at once, as `decoder(name)` reads each; None when the bytes
    are not such a list, or hold an object only the whole route takes (the caller then reads
    them one by one). KeyError for an unknown name."""
    return _MANY_DECODERS[name]


def decoder(name: str) -> Callable[[bytes | memoryview], Decoded]:
    """Reads one JSON object for a rule's projection ("" strips only): raises NotJSON for bytes
    that are not one JSON value; KeyError for an unknown name."""
    return _DECODERS[name]
