"""The resource types the simulator serves: built-ins plus whatever CRDs are registered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    resource: str  # plural, as in the URL
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    has_status: bool = True
    categories: tuple[str, ...] = ()
    # Fields this type accepts in a field selector, besides metadata.name/metadata.namespace.
    fields: tuple[str, ...] = ()
    crd: bool = False

    @property
    def key(self) -> str:
        """`resource.group` (or just `resource` for core): the store's name for this type."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def api_resource(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.resource,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            out["shortNames"] = list(self.short_names)
        if self.categories:
            out["categories"] = list(self.categories)
        return out


def _core(resource: str, kind: str, namespaced: bool, **kw: Any) -> ResourceType:
    return ResourceType("", "v1", resource, kind, namespaced, **kw)


BUILTIN: tuple[ResourceType, ...] = (
    _core(
        "namespaces",
        "Namespace",
        False,
        short_names=("ns",),
        fields=("status.phase",),
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    ),
    _core(
        "pods",
        "Pod",
        True,
        short_names=("po",),
        categories=("all",),
        fields=(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
    ),
    _core("services", "Service", True, short_names=("svc",), categories=("all",)),
    _core("endpoints", "Endpoints", True, short_names=("ep",), has_status=False),
    _core("nodes", "Node", False, short_names=("no",), fields=("spec.unschedulable",)),
    _core("secrets", "Secret", True, has_status=False, fields=("type",)),
    _core("configmaps", "ConfigMap", True, short_names=("cm",), has_status=False),
    _core("serviceaccounts", "ServiceAccount", True, short_names=("sa",), has_status=False),
    _core(
        "events",
        "Event",
        True,
        short_names=("ev",),
        has_status=False,
        fields=(
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ),
    ),
    ResourceType(
        "discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, has_status=False
    ),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, has_status=False),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
    ),
)

# Subresources listed in discovery next to their parent (only `status` is implemented).
STATUS_VERBS = ("get", "patch", "update")


@dataclass(slots=True)
class Registry:
    """Types by store key, plus the preferred version order of each group."""

    types: dict[str, ResourceType] = field(default_factory=dict)
    # (group, version) -> {resource plural -> type}; several versions of one CRD share a key.
    by_gv: dict[tuple[str, str], dict[str, ResourceType]] = field(default_factory=dict)
    group_versions: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> Registry:
        reg = cls()
        for rt in BUILTIN:
            reg.add(rt)
        return reg

    def add(self, rt: ResourceType, *, versions: tuple[str, ...] | None = None) -> None:
        self.types[rt.key] = rt
        for v in versions or (rt.version,):
            self.by_gv.setdefault((rt.group, v), {})[rt.resource] = rt
            gv = self.group_versions.setdefault(rt.group, [])
            if v not in gv:
                gv.append(v)

    def remove(self, key: str) -> None:
        rt = self.types.pop(key, None)
        if rt is None:
            return
        for (group, version), res in list(self.by_gv.items()):
            if group == rt.group and res.get(rt.resource) is rt:
                del res[rt.resource]
                if not res:
                    del self.by_gv[(group, version)]
                    self.group_versions[group].remove(version)
                    if not self.group_versions[group]:
                        del self.group_versions[group]

    def lookup(self, group: str, version: str, resource: str) -> ResourceType | None:
        return self.by_gv.get((group, version), {}).get(resource)

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        for rt in self.by_gv.get((group, version), {}).values():
            if rt.kind == kind:
                return rt
        return None

    def resolve(self, name: str) -> ResourceType:
        """`pods`, `leases.coordination.k8s.io`, or a kind (`Pod`) → the type. KeyError if none."""
        if name in self.types:
            return self.types[name]
        for rt in self.types.values():
            if name in (rt.kind, rt.singular, *rt.short_names):
                return rt
        raise KeyError(name)


def crd_types(crd: dict[str, Any]) -> tuple[ResourceType, tuple[str, ...]] | None:
    """The type a CustomResourceDefinition registers (storage version first), or None if invalid."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    served = [v for v in spec.get("versions") or [] if v.get("served", True)]
    if not (group and plural and kind and served):
        return None
    storage = next((v for v in served if v.get("storage")), served[0])
    versions = (storage["name"], *[v["name"] for v in served if v is not storage])
    has_status = "status" in (storage.get("subresources") or {})
    rt = ResourceType(
        group,
        storage["name"],
        plural,
        kind,
        spec.get("scope", "Namespaced") == "Namespaced",
        singular=names.get("singular", ""),
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        has_status=has_status,
        crd=True,
    )
    return rt, versions
