"""The empty view: reads a policy rule marks `view: empty` are answered by the proxy itself.

Nothing goes upstream. The answers are what kube-apiserver gives for a resource with no objects,
so a client (client-go informers, kubectl, the Python clients) syncs and sees nothing:

- LIST: an empty `<Kind>List` (or `PartialObjectMetadataList` / `Table` when the Accept header
  asks for them) with resourceVersion `RESOURCE_VERSION`, which a client may pass back;
- WATCH: a stream that stays open until `timeoutSeconds`, the proxy's watch deadline, a reload
  that revokes it or shutdown; it starts with the `k8s.io/initial-events-end` bookmark when
  `sendInitialEvents=true` (WatchList) and sends periodic bookmarks when `allowWatchBookmarks`;
- named GET: 404 NotFound, as for an object that does not exist.

Answers are always JSON: a protobuf Accept gets JSON, which client-go decodes by Content-Type.
The caller (server.py's pipeline) has authenticated, authorized (decision allow) and taken the
peer's slot; this module answers and says how the exchange ended, like `forward.forward`, and the
pipeline's `finally` writes the one final audit record and metrics sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from apiproxy import log, status
from apiproxy.audit import events as ev
from apiproxy.exchange import EndReason, Exchange
from apiproxy.kinds import kind_of

if TYPE_CHECKING:
    from apiproxy.forward import ForwardContext
    from apiproxy.request import RequestInfo

__all__ = [
    "ANNOTATION",
    "BOOKMARK_INTERVAL_SECONDS",
    "RESOURCE_VERSION",
    "ViewError",
    "serve",
]

_log = log.get_logger("apiproxy.view")

ANNOTATION = ev.VIEW
# One fixed version: every replica answers alike, and a view never changes. Not "0", which asks
# a server for "any version" and means something else to clients.
RESOURCE_VERSION = "1"
# kube-apiserver sends a bookmark about once a minute to a watch that asked for them.
BOOKMARK_INTERVAL_SECONDS = 60.0
JSON = "application/json"
_META_GROUP = "meta.k8s.io"
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool, as the server parses


class ViewError(Exception):
    """A request the real server would refuse (bad parameters, nothing acceptable)."""

    def __init__(self, code: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True, slots=True)
class _Shape:
    """What the answer is: 'object' (the resource's own kind), 'partial' or 'table'."""

    form: str
    version: str = "v1"  # meta.k8s.io version of partial/table answers


def negotiate(accept: str) -> _Shape:
    """The first Accept entry a JSON answer can satisfy; protobuf entries count as their JSON
    twin (the answer is JSON, which client-go decodes by Content-Type)."""
    if not accept.strip():
        return _Shape("object")
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        if mtype not in (JSON, "application/vnd.kubernetes.protobuf", "*/*", "application/*"):
            continue
        params: dict[str, str] = {}
        for p in parts[1:]:
            key, eq, value = p.partition("=")
            if eq:
                params[key.strip().lower()] = value.strip()
        as_ = params.get("as")
        if as_ is None:
            return _Shape("object")
        if params.get("g") != _META_GROUP or params.get("v") not in ("v1", "v1beta1"):
            continue
        if as_ in ("PartialObjectMetadata", "PartialObjectMetadataList"):
            return _Shape("partial", params["v"])
        if as_ == "Table":
            return _Shape("table", params["v"])
    raise ViewError(406, f"only the following media types are accepted: {JSON}")


def _query(target: str) -> dict[str, str]:
    query = URL(target, encoded=True).query
    return {k: query[k] for k in query}


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ViewError(400, f"invalid value for {name}: {value!r}") from None


def _list_options_invalid(causes: list[tuple[str, str]]) -> ViewError:
    """422 as the real server words ListOptions validation (client-go only checks the code)."""
    text = "; ".join(f"{f}: {m}" for f, m in causes)
    return ViewError(
        422,
        f'ListOptions.meta.k8s.io "" is invalid: {text}',
        {
            "group": _META_GROUP,
            "kind": "ListOptions",
            "causes": [{"reason": "Forbidden", "message": m, "field": f} for f, m in causes],
        },
    )


def _check_list(q: dict[str, str]) -> None:
    causes: list[tuple[str, str]] = []
    if "sendInitialEvents" in q:
        causes.append(("sendInitialEvents", "sendInitialEvents is forbidden for list"))
    rvm = q.get("resourceVersionMatch", "")
    if rvm and not q.get("resourceVersion"):
        causes.append(
            (
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        )
    if rvm not in ("", "Exact", "NotOlderThan"):
        causes.append(("resourceVersionMatch", f'Unsupported value: "{rvm}"'))
    if causes:
        raise _list_options_invalid(causes)
    if "limit" in q:
        _int(q["limit"], "limit")


@dataclass(frozen=True, slots=True)
class _WatchPlan:
    bookmarks: bool
    initial_events: bool
    timeout: float | None


def _check_watch(q: dict[str, str]) -> _WatchPlan:
    bookmarks = q.get("allowWatchBookmarks") in _TRUE
    raw = q.get("sendInitialEvents")
    initial = raw in _TRUE
    rvm = q.get("resourceVersionMatch", "")
    causes: list[tuple[str, str]] = []
    if raw is not None:
        if rvm != "NotOlderThan":
            causes.append(
                (
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                )
            )
        if initial and not bookmarks:
            causes.append(
                (
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                )
            )
    elif rvm:
        causes.append(
            (
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            )
        )
    if causes:
        raise _list_options_invalid(causes)
    timeout: float | None = None
    if "timeoutSeconds" in q:
        seconds = _int(q["timeoutSeconds"], "timeoutSeconds")
        timeout = float(seconds) if seconds > 0 else None
    return _WatchPlan(bookmarks, initial, timeout)


def _api_version(info: RequestInfo) -> str:
    return f"{info.api_group}/{info.api_version}" if info.api_group else info.api_version


def empty_list(info: RequestInfo, kind: str, shape: _Shape) -> dict[str, Any]:
    meta = {"resourceVersion": RESOURCE_VERSION}
    if shape.form == "partial":
        return {
            "kind": "PartialObjectMetadataList",
            "apiVersion": f"{_META_GROUP}/{shape.version}",
            "metadata": meta,
            "items": [],
        }
    if shape.form == "table":
        # The default table convertor's columns: what kubectl prints headers from.
        columns = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name must be unique within a namespace.",
                "priority": 0,
            },
            {
                "name": "Created At",
                "type": "date",
                "format": "",
                "description": "CreationTimestamp is a timestamp representing the server time "
                "when this object was created.",
                "priority": 0,
            },
        ]
        return {
            "kind": "Table",
            "apiVersion": f"{_META_GROUP}/{shape.version}",
            "metadata": meta,
            "columnDefinitions": columns,
            "rows": [],
        }
    return {"kind": f"{kind}List", "apiVersion": _api_version(info), "metadata": meta, "items": []}


def bookmark(info: RequestInfo, kind: str, shape: _Shape, *, initial_end: bool = False) -> bytes:
    meta: dict[str, Any] = {"resourceVersion": RESOURCE_VERSION, "creationTimestamp": None}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    if shape.form == "partial":
        obj = {
            "kind": "PartialObjectMetadata",
            "apiVersion": f"{_META_GROUP}/{shape.version}",
            "metadata": meta,
        }
    else:
        obj = {"kind": kind, "apiVersion": _api_version(info), "metadata": meta}
    return json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"


def not_found(info: RequestInfo) -> ViewError:
    details: dict[str, Any] = {"name": info.name}
    if info.api_group:
        details["group"] = info.api_group
    details["kind"] = info.resource
    what = f"{info.resource}.{info.api_group}" if info.api_group else info.resource
    return ViewError(404, f'{what} "{info.name}" not found', details)


async def serve(
    ctx: ForwardContext, request: web.BaseRequest, ex: Exchange, view: str
) -> web.StreamResponse:
    """Answer `ex` with the `view` the policy chose; the peer's slot is already held."""
    info = ex.info
    if info is None or not info.is_resource_request or view != "empty":
        raise RuntimeError(f"view.serve called for {info!r} with view {view!r}")
    ex.annotations[ANNOTATION] = view
    kind = kind_of(info.api_group, info.resource)
    try:
        if kind is None or info.subresource:
            # The policy loader refuses such rules; fail closed if one ever slips through.
            raise ViewError(404, f"the server could not find the requested resource ({view} view)")
        q = _query(ex.target)
        shape = negotiate(request.headers.get("Accept", ""))
        if info.verb == "watch":
            plan = _check_watch(q)
            return await _watch(ctx, request, ex, kind, shape, plan)
        if info.verb == "get":
            raise not_found(info)
        _check_list(q)
        body = empty_list(info, kind, shape)
    except ViewError as err:
        return _finish(
            ctx, ex, err.code, status.status_bytes(err.code, err.message, details=err.details)
        )
    return _finish(ctx, ex, 200, json.dumps(body, separators=(",", ":")).encode())


def _headers(ex: Exchange) -> dict[str, str]:
    return {"Content-Type": JSON, "Audit-ID": ex.audit_id, "Cache-Control": "no-cache, private"}


def _finish(ctx: ForwardContext, ex: Exchange, code: int, body: bytes) -> web.Response:
    ex.end(EndReason.COMPLETED, code)
    ctx.recorder.body_sent(ex, len(body))
    return web.Response(status=code, body=body, headers=_headers(ex))


async def _watch(
    ctx: ForwardContext,
    request: web.BaseRequest,
    ex: Exchange,
    kind: str,
    shape: _Shape,
    plan: _WatchPlan,
) -> web.StreamResponse:
    info = ex.info
    assert info is not None
    resp = web.StreamResponse(status=200, headers=_headers(ex))
    sent = events = 0
    try:
        try:
            await resp.prepare(request)
        except ConnectionError:
            ex.end(EndReason.CLIENT)
            return resp
        ex.streamed = True
        await ctx.recorder.started(ex, 200)
        # We are this watch's server: it ends at its own timeoutSeconds (completed), or earlier
        # at the proxy's cap, a revocation or shutdown (which `bounded` records).
        own = asyncio.timeout(plan.timeout)
        try:
            async with ctx.streams.bounded(ex, ctx.limits.max_stream_seconds), own:
                if plan.initial_events:
                    line = bookmark(info, kind, shape, initial_end=True)
                    await resp.write(line)
                    sent, events = sent + len(line), events + 1
                if not plan.bookmarks:
                    await asyncio.get_running_loop().create_future()  # until it is ended
                while True:
                    await asyncio.sleep(BOOKMARK_INTERVAL_SECONDS)
                    line = bookmark(info, kind, shape)
                    await resp.write(line)
                    sent, events = sent + len(line), events + 1
        except TimeoutError:
            if not own.expired():
                raise
            ex.end(EndReason.COMPLETED)
        except ConnectionError:
            ex.end(EndReason.CLIENT)
            return resp
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp
    finally:
        ex.annotations[ev.WATCH_EVENTS] = events
        ex.annotations[ev.WATCH_DURATION] = round(time.monotonic() - ex.started, 3)
        ctx.recorder.body_sent(ex, sent, events)
        _log.debug("empty_view_watch_ended", audit_id=ex.audit_id, ended_by=ex.ended_by)
