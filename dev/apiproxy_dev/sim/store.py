"""In-memory object store with etcd-like semantics: one global, increasing resourceVersion, a
bounded event history (the watch cache's window), snapshots for consistent pagination.

Objects are kept as JSON bytes (serialized once per version) plus the labels and fields selectors
need, so 50,000 realistic pods fit in memory and LIST/watch fan-out copy bytes, not dicts.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import datetime as dt
import json
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from apiproxy_dev.sim import errors
from apiproxy_dev.sim.errors import ApiError
from apiproxy_dev.sim.resources import Registry, ResourceType, crd_types
from apiproxy_dev.sim.selectors import (
    FieldRequirement,
    Requirement,
    SelectorError,
    fields_match,
    labels_match,
    parse_fields,
    parse_labels,
)

Obj = dict[str, Any]


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)


def dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class Entry:
    """One version of one object."""

    key: str  # "namespace/name" or "name": the etcd key below the resource prefix
    raw: bytes
    rv: int
    labels: dict[str, str]
    fields: dict[str, str]

    def obj(self) -> Obj:
        out: Obj = json.loads(self.raw)
        return out


@dataclass(slots=True)
class Event:
    rv: int
    type_key: str
    type: str  # ADDED, MODIFIED, DELETED
    entry: Entry  # the new state; for DELETED the last state, stamped with the deletion's RV
    prev: Entry | None
    _line: bytes | None = None

    def line(self) -> bytes:
        if self._line is None:
            self._line = (
                b'{"type":"' + self.type.encode() + b'","object":' + self.entry.raw + b"}\n"
            )
        return self._line


def _dig(obj: Obj, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _field_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def select_attrs(rt: ResourceType, obj: Obj) -> tuple[dict[str, str], dict[str, str]]:
    meta = obj.get("metadata") or {}
    fields = {"metadata.name": meta.get("name", "")}
    if rt.namespaced:
        fields["metadata.namespace"] = meta.get("namespace", "")
    for f in rt.fields:
        fields[f] = _field_str(_dig(obj, "source.component" if f == "source" else f))
    return dict(meta.get("labels") or {}), fields


@dataclass(frozen=True, slots=True)
class Filter:
    """What a list or watch selects: a namespace (or all) and label/field requirements."""

    namespace: str = ""
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, entry: Entry) -> bool:
        if self.namespace and entry.fields.get("metadata.namespace") != self.namespace:
            return False
        return labels_match(self.labels, entry.labels) and fields_match(self.fields, entry.fields)

    @property
    def empty(self) -> bool:
        return not self.labels and not self.fields


class Watcher:
    """A watch's buffer. Filled under the store lock (so in order), drained by the server."""

    def __init__(self, store: Store, rt: ResourceType, flt: Filter, limit: int) -> None:
        import asyncio

        self.store = store
        self.rt = rt
        self.filter = flt
        self.buffer: deque[bytes] = deque()
        self.closed = False
        self.overflowed = False
        self.limit = limit
        self.last_rv = 0
        self.wakeup = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def convert(self, ev: Event) -> bytes | None:
        """The event this watcher sees, as the cacher's convertToWatchEvent decides."""
        cur = ev.type != "DELETED" and self.filter.matches(ev.entry)
        old = ev.prev is not None and self.filter.matches(ev.prev)
        if cur and old:
            return ev.line() if ev.type == "MODIFIED" else _line("MODIFIED", ev.entry.raw)
        if cur:
            return ev.line() if ev.type == "ADDED" else _line("ADDED", ev.entry.raw)
        if old:
            if ev.type == "DELETED":
                return ev.line()
            assert ev.prev is not None
            return _line("DELETED", _with_rv(ev.prev.raw, ev.rv))
        return None

    def push(self, line: bytes, rv: int) -> None:
        if self.closed:
            return
        if len(self.buffer) >= self.limit:
            # The real cacher drops watchers that cannot keep up; clients re-watch.
            self.overflowed = True
            self.close()
            return
        self.buffer.append(line)
        self.last_rv = rv
        self._wake()

    def close(self) -> None:
        self.closed = True
        self.store._forget(self)
        self._wake()

    def _wake(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self.wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self.loop.call_soon_threadsafe(self.wakeup.set)


def _line(type_: str, raw: bytes) -> bytes:
    return b'{"type":"' + type_.encode() + b'","object":' + raw + b"}\n"


def _with_rv(raw: bytes, rv: int) -> bytes:
    obj = json.loads(raw)
    obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
    return dumps(obj)


@dataclass(slots=True)
class ListResult:
    items: list[Entry]
    rv: int
    continue_token: str = ""
    remaining: int | None = None


def encode_continue(rv: int, start_key: str) -> str:
    body = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start_key + "\x00"})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        pad = "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(token + pad))
        if body.get("v") != "meta.k8s.io/v1":
            raise ValueError
        return int(body["rv"]), str(body["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion "
            "(version meta.k8s.io/v1)"
        ) from exc


SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(slots=True)
class _Type:
    rt: ResourceType
    objects: dict[str, Entry] = field(default_factory=dict)
    sorted_keys: list[str] | None = None
    last_rv: int = 0  # RV of the latest change to this type
    watchers: set[Watcher] = field(default_factory=set)

    def keys(self) -> list[str]:
        if self.sorted_keys is None:
            self.sorted_keys = sorted(self.objects)
        return self.sorted_keys


class Store:
    """All objects of one simulated cluster. Thread-safe; every method is synchronous.

    Resource names are `pods`, `leases.coordination.k8s.io`, or a kind/short name (`Pod`, `po`).
    Methods return plain dicts (copies) and raise `ApiError` with the server's `Status` body.
    """

    def __init__(
        self,
        *,
        history_size: int = 10_000,
        kube_system_uid: str | None = None,
        watch_buffer: int = 100_000,
    ) -> None:
        self.registry = Registry.builtin()
        self.history_size = history_size
        self.watch_buffer = watch_buffer
        self._lock = threading.RLock()
        self._watchers_changed = threading.Condition(self._lock)
        self._rv = 100
        self._types: dict[str, _Type] = {}
        self._history: deque[Event] = deque()
        self._compacted = self._rv  # events with rv <= this are no longer available
        self._listeners: list[Callable[[], None]] = []
        for ns in SYSTEM_NAMESPACES:
            meta: Obj = {"name": ns}
            if ns == "kube-system" and kube_system_uid:
                meta["uid"] = kube_system_uid
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "kubernetes",
                    "namespace": "default",
                    "labels": {"component": "apiserver", "provider": "kubernetes"},
                },
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": "10.96.0.1",
                    "clusterIPs": ["10.96.0.1"],
                    "ports": [
                        {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}
                    ],
                    "sessionAffinity": "None",
                },
            }
        )

    # ----------------------------------------------------------------------------- lookups

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._rv

    @property
    def oldest_watchable(self) -> int:
        """The oldest resourceVersion a watch can start from without 410 Gone."""
        return self._compacted

    def resolve(self, resource: str) -> ResourceType:
        try:
            return self.registry.resolve(resource)
        except KeyError:
            raise ApiError(404, f"the server doesn't have a resource type {resource!r}") from None

    def _t(self, rt: ResourceType) -> _Type:
        t = self._types.get(rt.key)
        if t is None:
            t = self._types[rt.key] = _Type(rt)
        return t

    @staticmethod
    def _key(rt: ResourceType, namespace: str, name: str) -> str:
        return f"{namespace}/{name}" if rt.namespaced else name

    def _rt_for(self, obj: Obj, resource: str | None) -> ResourceType:
        if resource:
            return self.resolve(resource)
        rt = self.registry.by_kind(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        if rt is None:
            raise ApiError(
                404,
                f"no resource for apiVersion {obj.get('apiVersion')!r} kind {obj.get('kind')!r}",
            )
        return rt

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn` (under the lock) after every change; used to wake waiters."""
        self._listeners.append(fn)

    # ----------------------------------------------------------------------------- writes

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _entry(self, rt: ResourceType, obj: Obj, rv: int) -> Entry:
        meta = obj["metadata"]
        meta["resourceVersion"] = str(rv)
        labels, fields = select_attrs(rt, obj)
        key = self._key(rt, meta.get("namespace", ""), meta["name"])
        return Entry(key, dumps(obj), rv, labels, fields)

    def _record(self, t: _Type, type_: str, entry: Entry, prev: Entry | None) -> None:
        ev = Event(entry.rv, t.rt.key, type_, entry, prev)
        t.last_rv = entry.rv
        if self.history_size > 0:
            self._history.append(ev)
            while len(self._history) > self.history_size:
                self._compacted = self._history.popleft().rv
        else:
            self._compacted = ev.rv
        for w in list(t.watchers):
            line = w.convert(ev)
            if line is not None:
                w.push(line, ev.rv)
        if t.rt.key == "customresourcedefinitions.apiextensions.k8s.io":
            self._sync_crd(entry if type_ != "DELETED" else None, prev)
        for fn in self._listeners:
            fn()

    def _sync_crd(self, cur: Entry | None, prev: Entry | None) -> None:
        if prev is not None:
            old = crd_types(prev.obj())
            if old is not None:
                self.registry.remove(old[0].key)
        if cur is not None:
            new = crd_types(cur.obj())
            if new is not None:
                self.registry.add(new[0], versions=new[1])
        elif prev is not None:
            old = crd_types(prev.obj())
            if old is not None:
                # Deleting a CRD deletes its objects (after the fact, without events: the
                # watchers of that type are closed, as the real server tears its storage down).
                t = self._types.pop(old[0].key, None)
                if t is not None:
                    for w in list(t.watchers):
                        w.close()

    def _check_namespace(self, rt: ResourceType, namespace: str) -> None:
        if not rt.namespaced:
            return
        if not namespace:
            raise errors.bad_request("the server could not find the requested resource")
        ns = self._t(self.registry.types["namespaces"]).objects.get(namespace)
        if ns is None:
            raise errors.namespace_not_found(namespace)

    def create(
        self,
        obj: Obj,
        *,
        resource: str | None = None,
        namespace: str | None = None,
        dry_run: bool = False,
        keep_status: bool = True,
    ) -> Obj:
        """Create `obj` (kind/apiVersion pick the type unless `resource` is given)."""
        rt = self._rt_for(obj, resource)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if namespace is not None and rt.namespaced:
            meta["namespace"] = namespace
        if not rt.namespaced:
            meta.pop("namespace", None)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        with self._lock:
            t = self._t(rt)
            ns = meta.get("namespace", "")
            if rt.namespaced and not ns:
                meta["namespace"] = ns = "default"
            if not meta.get("name"):
                if meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                else:
                    raise errors.invalid(
                        rt,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                        [
                            {
                                "reason": "FieldValueRequired",
                                "message": "Required value: name or generateName is required",
                                "field": "metadata.name",
                            }
                        ],
                    )
            self._check_namespace(rt, ns)
            if rt.namespaced:
                ns_obj = self._types["namespaces"].objects[ns]
                if b'"deletionTimestamp"' in ns_obj.raw:
                    raise ApiError(
                        403,
                        f'{rt.resource} "{meta["name"]}" is forbidden: unable to create new '
                        f"content in namespace {ns} because it is being terminated",
                        reason="Forbidden",
                    )
            key = self._key(rt, ns, meta["name"])
            if key in t.objects:
                raise errors.already_exists(rt, meta["name"])
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            for gone in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
                meta.pop(gone, None)
            if rt.crd or "spec" in obj:
                meta["generation"] = 1
            if not keep_status and rt.has_status:
                obj.pop("status", None)
            self._defaults(rt, obj)
            if dry_run:
                meta["resourceVersion"] = ""
                return obj
            entry = self._entry(rt, obj, self._next_rv())
            t.objects[key] = entry
            t.sorted_keys = None
            self._record(t, "ADDED", entry, None)
            return obj

    @staticmethod
    def _defaults(rt: ResourceType, obj: Obj) -> None:
        if rt.key == "namespaces":
            meta = obj["metadata"]
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        elif rt.key == "customresourcedefinitions.apiextensions.k8s.io":
            spec = obj.get("spec") or {}
            names = dict(spec.get("names") or {})
            names.setdefault("singular", str(names.get("kind", "")).lower())
            names.setdefault("listKind", f"{names.get('kind', '')}List")
            ts = now_rfc3339()
            obj["status"] = {
                "acceptedNames": names,
                "conditions": [
                    {
                        "type": "NamesAccepted",
                        "status": "True",
                        "reason": "NoConflicts",
                        "message": "no conflicts found",
                        "lastTransitionTime": ts,
                    },
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "message": "the initial names have been accepted",
                        "lastTransitionTime": ts,
                    },
                ],
                "storedVersions": [
                    v["name"] for v in spec.get("versions") or [] if v.get("storage")
                ],
            }

    def get(self, resource: str, name: str, namespace: str = "") -> Obj:
        return self.get_entry(self.resolve(resource), namespace, name).obj()

    def get_entry(self, rt: ResourceType, namespace: str, name: str) -> Entry:
        with self._lock:
            entry = self._t(rt).objects.get(self._key(rt, namespace, name))
            if entry is None:
                raise errors.not_found(rt, name)
            return entry

    def update(
        self,
        obj: Obj,
        *,
        resource: str | None = None,
        subresource: str = "",
        dry_run: bool = False,
        keep_status: bool = True,
    ) -> Obj:
        """Replace an object. A `metadata.resourceVersion` in `obj` must match (else 409).

        `subresource="status"` changes only `.status`. With `keep_status=False` (the HTTP PUT of a
        type with a status subresource) the main resource keeps its stored status.
        """
        rt = self._rt_for(obj, resource)
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        name, ns = meta.get("name", ""), meta.get("namespace", "") if rt.namespaced else ""
        with self._lock:
            t = self._t(rt)
            cur_entry = t.objects.get(self._key(rt, ns, name))
            if cur_entry is None:
                self._check_namespace(rt, ns)
                raise errors.not_found(rt, name)
            cur = cur_entry.obj()
            want_rv = meta.get("resourceVersion")
            if want_rv and want_rv != cur["metadata"]["resourceVersion"]:
                raise errors.conflict(
                    rt,
                    name,
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again",
                )
            if meta.get("uid") and meta["uid"] != cur["metadata"]["uid"]:
                raise errors.conflict(
                    rt,
                    name,
                    f"Precondition failed: UID in precondition: {meta['uid']}, UID in "
                    f"object meta: {cur['metadata']['uid']}",
                )
            if subresource == "status":
                merged = copy.deepcopy(cur)  # `cur` is compared below: never merge into it
                if "status" in new:
                    merged["status"] = new["status"]
                else:
                    merged.pop("status", None)
                new = merged
            else:
                new["apiVersion"], new["kind"] = rt.api_version, rt.kind
                if not keep_status and rt.has_status:
                    if "status" in cur:
                        new["status"] = cur["status"]
                    else:
                        new.pop("status", None)
                cmeta = cur["metadata"]
                for k in (
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                ):
                    if k in cmeta:
                        meta[k] = cmeta[k]
                    else:
                        meta.pop(k, None)
                if rt.key == "namespaces":
                    new["status"] = cur.get("status", {"phase": "Active"})
                if "generation" in cmeta and self._spec_changed(rt, cur, new):
                    meta["generation"] = int(cmeta["generation"]) + 1
            new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            if new == cur:
                return cur  # a no-op update writes nothing and keeps the resourceVersion
            if dry_run:
                return new
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                return self._remove(t, cur_entry, new)
            entry = self._entry(rt, new, self._next_rv())
            t.objects[entry.key] = entry
            self._record(t, "MODIFIED", entry, cur_entry)
            return new

    @staticmethod
    def _spec_changed(rt: ResourceType, cur: Obj, new: Obj) -> bool:
        if rt.crd:  # custom resources: any change outside metadata and status
            skip = ("metadata", "status")
            return {k: v for k, v in cur.items() if k not in skip} != {
                k: v for k, v in new.items() if k not in skip
            }
        return bool(cur.get("spec") != new.get("spec"))

    def _remove(self, t: _Type, cur_entry: Entry, last: Obj | None = None) -> Obj:
        obj = last if last is not None else cur_entry.obj()
        entry = self._entry(t.rt, obj, self._next_rv())
        del t.objects[cur_entry.key]
        t.sorted_keys = None
        self._record(t, "DELETED", entry, cur_entry)
        if t.rt.key == "namespaces":
            self._purge_namespace(obj["metadata"]["name"])
        return obj

    def _purge_namespace(self, ns: str) -> None:
        # The namespace controller's job, done at once: every object in it goes.
        for t in list(self._types.values()):
            if not t.rt.namespaced:
                continue
            for key in [k for k in t.objects if k.startswith(ns + "/")]:
                self._remove(t, t.objects[key])

    def delete(
        self,
        resource: str,
        name: str,
        namespace: str = "",
        *,
        uid: str | None = None,
        resource_version: str | None = None,
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        """Delete; returns (object, removed). Finalizers hold the object with deletionTimestamp."""
        return self.delete_rt(
            self.resolve(resource),
            namespace,
            name,
            uid=uid,
            resource_version=resource_version,
            dry_run=dry_run,
        )

    def delete_rt(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        with self._lock:
            t = self._t(rt)
            cur_entry = t.objects.get(self._key(rt, namespace, name))
            if cur_entry is None:
                self._check_namespace(rt, namespace)
                raise errors.not_found(rt, name)
            cur = cur_entry.obj()
            meta = cur["metadata"]
            if uid and uid != meta["uid"]:
                raise errors.precondition_failed(
                    rt,
                    name,
                    f"the UID in the precondition ({uid}) does not match the UID in record "
                    f"({meta['uid']}). The object might have been deleted and then recreated",
                )
            if resource_version and resource_version != meta["resourceVersion"]:
                raise errors.precondition_failed(
                    rt,
                    name,
                    f"the ResourceVersion in the precondition ({resource_version}) does not "
                    f"match the ResourceVersion in record ({meta['resourceVersion']}). The "
                    "object might have been modified",
                )
            if dry_run:
                return cur, not meta.get("finalizers")
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return cur, False
                meta["deletionTimestamp"] = now_rfc3339()
                meta["deletionGracePeriodSeconds"] = 0
                if rt.key == "namespaces":
                    cur["status"] = {"phase": "Terminating"}
                entry = self._entry(rt, cur, self._next_rv())
                t.objects[entry.key] = entry
                self._record(t, "MODIFIED", entry, cur_entry)
                return cur, False
            return self._remove(t, cur_entry, cur), True

    def delete_collection(
        self, resource: str, namespace: str = "", label_selector: str = "", field_selector: str = ""
    ) -> list[Obj]:
        rt = self.resolve(resource)
        flt = self.make_filter(rt, namespace, label_selector, field_selector)
        out = []
        with self._lock:
            for entry in [e for e in self._t(rt).objects.values() if flt.matches(e)]:
                ns = entry.fields.get("metadata.namespace", "")
                obj, _ = self.delete_rt(rt, ns, entry.fields["metadata.name"])
                out.append(obj)
        return out

    def upsert(self, obj: Obj) -> Obj:
        """Create, or replace whatever is there (ignoring resourceVersion). For test set-up."""
        with self._lock:
            rt = self._rt_for(obj, None)
            meta = obj.get("metadata") or {}
            try:
                self.get_entry(
                    rt,
                    meta.get("namespace", "default") if rt.namespaced else "",
                    meta.get("name", ""),
                )
            except ApiError:
                return self.create(obj)
            obj = copy.deepcopy(obj)
            obj["metadata"].pop("resourceVersion", None)
            return self.update(obj)

    def bulk_create(self, rt: ResourceType, raws: Iterable[Obj]) -> int:
        """Store many fully-formed objects fast (seeding). Each gets its own resourceVersion."""
        n = 0
        with self._lock:
            t = self._t(rt)
            for obj in raws:
                meta = obj["metadata"]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now_rfc3339())
                key = self._key(rt, meta.get("namespace", ""), meta["name"])
                if key in t.objects:
                    raise errors.already_exists(rt, meta["name"])
                entry = self._entry(rt, obj, self._next_rv())
                t.objects[key] = entry
                self._record(t, "ADDED", entry, None)
                n += 1
            t.sorted_keys = None
        return n

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to `rv` (default: all), as etcd compaction / a full watch cache do."""
        with self._lock:
            rv = self._rv if rv is None else rv
            while self._history and self._history[0].rv <= rv:
                self._history.popleft()
            self._compacted = max(self._compacted, rv)

    # ----------------------------------------------------------------------------- reads

    def make_filter(
        self, rt: ResourceType, namespace: str, label_selector: str, field_selector: str
    ) -> Filter:
        try:
            labels = parse_labels(label_selector)
            fields = parse_fields(field_selector)
        except SelectorError as exc:
            raise errors.bad_request(str(exc)) from None
        allowed = {"metadata.name", *rt.fields}
        if rt.namespaced:
            allowed.add("metadata.namespace")
        for f in fields:
            if f.field not in allowed:
                if rt.crd:
                    msg = (
                        f'"{f.field}" is not a known field selector: only "metadata.name", '
                        '"metadata.namespace"'
                    )
                else:
                    msg = f"field label not supported: {f.field}"
                raise errors.bad_request(msg)
        return Filter(namespace if rt.namespaced else "", labels, fields)

    def list(
        self,
        resource: str,
        namespace: str = "",
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[Obj]:
        rt = self.resolve(resource)
        res = self.list_entries(rt, self.make_filter(rt, namespace, label_selector, field_selector))
        return [e.obj() for e in res.items]

    def _state_at(self, t: _Type, rv: int) -> dict[str, Entry]:
        """Objects of a type as of `rv`, rebuilt from the history. Lock held."""
        if t.last_rv <= rv:
            return t.objects
        if rv < self._compacted:
            raise errors.expired("The resourceVersion for the provided list is too old.")
        state = dict(t.objects)
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.type_key != t.rt.key:
                continue
            if ev.prev is None:
                state.pop(ev.entry.key, None)
            else:
                state[ev.prev.key] = ev.prev
        return state

    def list_entries(
        self,
        rt: ResourceType,
        flt: Filter,
        *,
        limit: int = 0,
        continue_token: str = "",
        exact_rv: int | None = None,
    ) -> ListResult:
        """LIST semantics of the storage layer: consistent snapshot, key order, pagination."""
        with self._lock:
            t = self._t(rt)
            start = ""
            if continue_token:
                snap_rv, start = decode_continue(continue_token)
                if snap_rv < self._compacted and t.last_rv > snap_rv:
                    raise errors.expired(
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter, "
                        "or use the continue token in this response to retrieve the remainder of "
                        "the results. Continuing with the provided token results in an "
                        "inconsistent list - objects that were created, modified, or deleted "
                        "between the time the first chunk was returned and now may show up in "
                        "the list."
                    )
            elif exact_rv is not None:
                snap_rv = exact_rv
            else:
                snap_rv = self._rv
            state = self._state_at(t, snap_rv)
            keys = sorted(state) if state is not t.objects else t.keys()
            if flt.namespace and not start:
                start = flt.namespace + "/"
            idx = 0
            if start:
                idx = bisect.bisect_left(keys, start)
            items: list[Entry] = []
            prefix = flt.namespace + "/" if flt.namespace else ""
            n = len(keys)
            while idx < n:
                key = keys[idx]
                if prefix and not key.startswith(prefix):
                    break
                idx += 1
                entry = state[key]
                if flt.empty or flt.matches(entry):
                    items.append(entry)
                    if limit and len(items) >= limit:
                        break
            more = False
            if limit and len(items) >= limit:
                j = idx
                while j < n and (not prefix or keys[j].startswith(prefix)):
                    if flt.empty or flt.matches(state[keys[j]]):
                        more = True
                        break
                    j += 1
            res = ListResult(items, snap_rv)
            if more:
                res.continue_token = encode_continue(snap_rv, items[-1].key)
                if flt.empty:
                    rest = keys[idx:]
                    res.remaining = (
                        sum(1 for k in rest if k.startswith(prefix)) if prefix else len(rest)
                    )
            return res

    # ----------------------------------------------------------------------------- watches

    def watch(
        self,
        rt: ResourceType,
        flt: Filter,
        since_rv: int | None,
        *,
        initial: bool = False,
    ) -> tuple[Watcher, int]:
        """Register a watcher. `since_rv`: replay history after it (410 Gone if compacted);
        None: start now. `initial`: first send every matching object as ADDED (watch-list).
        Returns the watcher and the RV its initial state corresponds to."""
        w = Watcher(self, rt, flt, self.watch_buffer)
        with self._lock:
            t = self._t(rt)
            if initial:
                for entry in self.list_entries(rt, flt).items:
                    w.buffer.append(_line("ADDED", entry.raw))
                start_rv = self._rv
            elif since_rv is None:
                start_rv = self._rv
            else:
                if since_rv > self._rv:
                    # The cacher waits ~3 s for freshness first; the outcome is the same.
                    raise ApiError(
                        504,
                        f"Too large resource version: {since_rv}, current: {self._rv}",
                        reason="Timeout",
                        details={
                            "causes": [
                                {
                                    "reason": "ResourceVersionTooLarge",
                                    "message": "Too large resource version",
                                }
                            ],
                            "retryAfterSeconds": 1,
                        },
                    )
                if since_rv < self._compacted:
                    raise errors.expired(
                        f"too old resource version: {since_rv} ({self._compacted})"
                    )
                for ev in self._history:
                    if ev.rv > since_rv and ev.type_key == rt.key:
                        line = w.convert(ev)
                        if line is not None:
                            w.buffer.append(line)
                start_rv = max(since_rv, 0)
            w.last_rv = start_rv
            t.watchers.add(w)
            self._watchers_changed.notify_all()
        return w, start_rv

    def _forget(self, w: Watcher) -> None:
        with self._lock:
            t = self._types.get(w.rt.key)
            if t is not None:
                t.watchers.discard(w)
            self._watchers_changed.notify_all()

    def wait_for_watchers(self, resource: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until `resource` has at least `count` open watches (TimeoutError otherwise).
        From async code, run it in a thread: `await asyncio.to_thread(...)`."""
        rt = self.resolve(resource)
        with self._watchers_changed:
            if not self._watchers_changed.wait_for(
                lambda: len(self._t(rt).watchers) >= count, timeout
            ):
                raise TimeoutError(f"fewer than {count} watches of {rt.key} after {timeout}s")

    def watcher_count(self, resource: str | None = None) -> int:
        with self._lock:
            if resource is not None:
                return len(self._t(self.resolve(resource)).watchers)
            return sum(len(t.watchers) for t in self._types.values())
