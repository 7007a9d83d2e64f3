"""Answers under a rule that filters (a `namespaces` mapping) or projects (`projection`).

Such answers are rewritten, never copied: the upstream is asked for JSON (a protobuf-first Accept,
as istiod sends, gets JSON; an Accept without JSON gets 406; `as=Table` entries are skipped, so
kubectl falls back to its own printing), without compression, and

- GET: an object outside the visible namespaces is 404 NotFound in kube-apiserver's words,
  decided before anything goes upstream when the path names the namespace; never 403;
- LIST: items are filtered and projected one at a time as they stream in (`ListFilter`: the
  whole list is never held, one item at most); `continue` tokens are sealed (AES-GCM, bound to
  the peer and rule) so no page carries a hidden name, and `remainingItemCount` is removed;
- WATCH: each event is filtered and projected; BOOKMARK and ERROR events always pass. When a
  namespace enters or leaves the view of an open watch, it ends with an ERROR 410 Expired event so
  the client lists again; a watch resumed from a resourceVersion older than such a change is
  answered 410 Expired at once (apiproxy/nsview.py keeps the changes).

Every object sent loses managedFields and the last-applied / proxy-overrides annotations
(apiproxy/projection.py). Nothing unfiltered is ever sent: any answer the filter cannot read
(protobuf, compressed, malformed) ends in 502 or a cut stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import msgspec
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from apiproxy import log, status
from apiproxy.audit import events as ev
from apiproxy.exchange import EndReason, Exchange
from apiproxy.forward import (
    ForwardContext,
    _send,
    _UpstreamFailed,
    _watch_deadline,
    downstream_response_headers,
    release_quietly,
    upstream_request_headers,
)
from apiproxy.nsview import NamespaceChange, NamespaceView
from apiproxy.policy import Decision
from apiproxy.policy.visibility import Visibility
from apiproxy.projection import Decoded, NotJSON, decoder, encode_all, many_decoder
from apiproxy.request import RequestInfo
from apiproxy.upstream_client import UpstreamClientError

__all__ = [
    "ContinueSealer",
    "FilterError",
    "ListFilter",
    "WatchFilter",
    "expired_event",
    "negotiate_json",
    "serve",
]

_log = log.get_logger("apiproxy.filtering")

JSON = "application/json"
MAX_OBJECT_BYTES = 64 * 1024 * 1024  # one item, one watch event, one GET answer
_MAX_HEAD = 1024 * 1024
_BATCH = 128 * 1024  # a LIST is filtered in reads of at least this much (the last one aside)
_MANY_BYTES = 1024 * 1024  # the most the list route copies at once (an item can be 64 MiB)
# How long a filtered request waits for the namespace view's first LIST before 503.
SYNC_WAIT_SECONDS = 5.0
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
TOKEN_PREFIX = "apx1."  # noqa: S105 - a format marker, not a credential
EXPIRED_MESSAGE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter."
)


class FilterError(Exception):
    """The upstream answer cannot be read by the filter: never forwarded as is."""


# -- content negotiation -------------------------------------------------------------------------


def negotiate_json(accept: str) -> str | None:
    """The Accept to send upstream for a rewritten answer: the client's first JSON entry (its
    `as`/`g`/`v` parameters kept), skipping protobuf and `as=Table`; None when nothing remains."""
    if not accept.strip():
        return JSON
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        mtype = parts[0].lower()
        if mtype not in (JSON, "*/*", "application/*"):
            continue
        params = []
        table = False
        for p in parts[1:]:
            key, eq, value = p.partition("=")
            key = key.strip().lower()
            if key == "as" and value.strip() == "Table":
                table = True
            if eq and key in ("as", "g", "v"):
                params.append(f"{key}={value.strip()}")
        if table:
            continue
        return ";".join([JSON, *params])
    return None


# -- continue tokens -----------------------------------------------------------------------------


class ContinueSealer:
    """Seals upstream `continue` tokens (base64 JSON naming the last key read, which may be a
    hidden object) with AES-GCM under a key derived from the proxy's serving key, so every
    replica that shares the serving certificate opens the others' tokens; the peer and rule are
    bound in as associated data. A token that does not open is answered 410 Expired, which makes
    client-go's pager list again from the start."""

    def __init__(self, secret: bytes) -> None:
        self._keys = [self._derive(secret)]

    @staticmethod
    def _derive(secret: bytes) -> AESGCM:
        return AESGCM(hashlib.sha256(b"apiproxy continue token v1\x00" + secret).digest())

    def rotate(self, secret: bytes) -> None:
        """A new serving key: seal with it, still open tokens sealed with the previous one."""
        self._keys = [self._derive(secret), self._keys[0]]

    def seal(self, token: str, bound: str) -> str:
        nonce = os.urandom(12)
        sealed = self._keys[0].encrypt(nonce, token.encode(), bound.encode())
        return TOKEN_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, sealed: str, bound: str) -> str | None:
        if not sealed.startswith(TOKEN_PREFIX):
            return None
        raw = sealed[len(TOKEN_PREFIX) :]
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except ValueError:
            return None
        if len(data) < 13:
            return None
        for key in self._keys:
            try:
                return key.decrypt(data[:12], data[12:], bound.encode()).decode()
            except Exception:  # noqa: S112 - InvalidTag: try the previous key
                continue
        return None


# -- the per-object decision ---------------------------------------------------------------------


@dataclass
class ObjectFilter:
    """Decides and projects one object from its bytes; counts what it withholds."""

    resource: str
    visibility: Visibility | None
    projection: str  # a name from apiproxy.projection ("" strips only)
    labels_of: Callable[[str], Any]
    hidden: int = 0

    def __post_init__(self) -> None:
        self._decode = decoder(self.projection)
        self._decode_many = many_decoder(self.projection)

    def visible(self, obj: Decoded) -> bool:
        if not obj.is_object:
            return False
        vis = self.visibility
        if vis is None:
            return True
        if self.resource == "namespaces":
            name = obj.member("name")
            if not isinstance(name, str):
                return False
            labels = obj.member("labels")
            return vis.sees(name, labels if isinstance(labels, dict) else {})
        namespace = obj.member("namespace")
        if not isinstance(namespace, str) or not namespace:
            return False
        return vis.sees(namespace, self.labels_of(namespace))

    def keep(self, data: bytes | memoryview | msgspec.Raw | None) -> bytes | None:
        """The object's bytes as sent, or None when it is withheld (None: no object at all).
        Raises NotJSON for bytes that are not one JSON value."""
        if data is None:
            self.hidden += 1
            return None
        obj = self._decode(data)
        if not self.visible(obj):
            self.hidden += 1
            return None
        return obj.encode()

    def keep_many(self, data: bytes) -> tuple[bytes, int, int] | None:
        """`keep` for a JSON list of objects at once: the kept objects' bytes, comma-separated,
        how many objects came and how many were kept; None when the list must be read one by one
        (it is not a list of objects, or holds one only the whole route takes)."""
        objs = self._decode_many(data)
        if objs is None:
            return None
        kept = [o for o in objs if self.visible(o)]
        self.hidden += len(objs) - len(kept)
        return encode_all(kept), len(objs), len(kept)


# -- LIST: a read's whole items at once, or one item at a time -------------------------------------

_ITEMS = re.compile(rb'"items"\s*:\s*\[')
_event = msgspec.json.Decoder(dict[str, msgspec.Raw])
_FRAMES = {
    kind: b'{"type":"' + kind.encode() + b'","object":' for kind in ("ADDED", "MODIFIED", "DELETED")
}
_value = msgspec.json.Decoder()
_FIRST_KEY = re.compile(rb'\{\s*"((?:[^"\\]|\\.)*)"\s*:')
_WS_COMMA = re.compile(rb"[\s,]*")


class ListFilter:
    """Rewrites a JSON list as it streams: head (up to `"items":[`), each item, then the tail.

    An item's end is found by candidates (`}` then `,{"<first key of the first item>":`, or `}`
    then `]`) verified by decoding: a prefix of an item that decodes is the whole item, since JSON
    is read left to right, so a false candidate (a nested list of objects) only fails to decode.
    In compact JSON, with `keep_many`, the items up to a read's last candidate are first tried as
    one list (`_take_many`), which the same argument covers. At most one item and _BATCH bytes
    after it are held at a time."""

    def __init__(
        self,
        keep: Callable[[memoryview], bytes | None],
        meta: Callable[[Any], None],
        batch: int = _BATCH,
        keep_many: Callable[[bytes], tuple[bytes, int, int] | None] | None = None,
    ) -> None:
        self._keep = keep
        self._keep_many = keep_many
        self._one_by_one = keep_many is None  # until the next read, after the list route failed
        self._batch = batch
        self._meta = meta
        self._buf = b""
        self._pos = 0  # items: where the next item starts in _buf
        self._scan = 0  # items: where to look for the next end candidate
        self._state = "head"
        self._sep: re.Pattern[bytes] | None = None
        # Compact JSON (kube-apiserver's, unless pretty-printed): candidates are found with
        # bytes.find on the literal separator, much faster than the regular expression.
        self._compact = False
        self._literal = b""
        self._sent_any = False  # a comma goes before every item sent after the first
        self._waiting: list[bytes] = []  # reads not yet looked at, fewer than _BATCH bytes
        self._waiting_size = 0
        self.items_in = 0
        self.items_listed = 0  # of items_in, those read by the list route (tests: it is taken)

    def feed(self, chunk: bytes) -> bytes:
        if self._state == "tail":
            self._buf += chunk
            if len(self._buf) > _MAX_HEAD:
                raise FilterError("list tail too large")
            return b""
        # Small reads are gathered first: per read, the item in progress is copied and searched
        # again, which more than doubled the cost per pod at 2 KiB reads.
        self._waiting.append(chunk)
        self._waiting_size += len(chunk)
        if self._waiting_size < self._batch:
            return b""
        return self._drain()

    def _drain(self) -> bytes:
        # One copy: what is left of the item in progress and the reads, joined.
        self._buf = b"".join([memoryview(self._buf)[self._pos :], *self._waiting])
        self._waiting.clear()
        self._waiting_size = 0
        self._scan -= self._pos
        self._pos = 0
        self._one_by_one = self._keep_many is None
        out: list[bytes] = []
        if self._state == "head":
            head = self._head()
            if head is None:
                return b""
            out.append(head)
        self._items(out)
        return b"".join(out)

    def _head(self) -> bytes | None:
        for m in _ITEMS.finditer(self._buf):
            try:
                obj = orjson.loads(self._buf[: m.end()] + b"]}")
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                raise FilterError("the answer is not a list")
            self._meta(obj)
            self._state = "items"
            self._pos = self._scan = m.end()
            self._compact = m.group() == b'"items":['
            encoded = orjson.dumps(obj)
            if not encoded.endswith(b"[]}"):
                raise FilterError("list head did not re-encode")
            return encoded[:-2]
        if len(self._buf) > _MAX_HEAD:
            raise FilterError("no items in the first MiB of the list")
        return None

    def _items(self, out: list[bytes]) -> None:
        buf = self._buf
        while self._state == "items":
            start = _WS_COMMA.match(buf, self._pos)
            assert start is not None
            i = start.end()
            if i >= len(buf):
                return
            if buf[i : i + 1] == b"]":
                self._state = "tail"
                self._buf = buf[i:]
                self._pos = self._scan = 0
                return
            if buf[i : i + 1] != b"{":
                raise FilterError("list item is not an object")
            if self._pos != i:
                self._scan = max(self._scan, i)
                self._pos = i
            if self._sep is None:
                first = _FIRST_KEY.match(buf, i)
                if first is None:
                    if len(buf) - i > _MAX_HEAD:
                        raise FilterError("list item has no first key")
                    return
                self._literal = b'},{"' + first.group(1) + b'":'
                self._compact = self._compact and first.group() == b'{"' + first.group(1) + b'":'
                key = re.escape(first.group(1))
                # The end of the last item: `]` then the end of the list or its next key.
                self._sep = re.compile(
                    rb'\}(?=\s*,\s*\{\s*"'
                    + key
                    + rb'"\s*:)|\}(?=\s*\]\s*(?:\}\s*\Z|,\s*"(?:kind|metadata|apiVersion)"\s*:))'
                )
            if self._compact and not self._one_by_one and self._take_many(buf, i, out):
                continue
            end = self._next_item_end(buf, i)
            if end is None:
                if len(buf) - i > MAX_OBJECT_BYTES:
                    raise FilterError(f"list item larger than {MAX_OBJECT_BYTES} bytes")
                return
            kept, self._pos = end
            self._scan = self._pos
            self.items_in += 1
            if kept is not None:
                if self._sent_any:
                    out.append(b",")
                out.append(kept)
                self._sent_any = True

    def _take_many(self, buf: bytes, start: int, out: list[bytes]) -> bool:
        """Every whole item up to the last candidate in the buffer, read as one JSON list (one
        decode and one encode for them all, not one per item): a false candidate only fails to
        decode, as for one item, and so does an item only the whole route reads; the items are
        then read one by one until the next read."""
        assert self._keep_many is not None
        literal = self._literal
        a = buf.rfind(literal, start, start + _MANY_BYTES)
        for _ in range(2):  # a false last candidate: try the one before
            if a <= start:
                break
            got = self._keep_many(b"".join((b"[", memoryview(buf)[start : a + 1], b"]")))
            if got is not None:
                kept, came, sent = got
                self.items_in += came
                self.items_listed += came
                if sent:
                    if self._sent_any:
                        out.append(b",")
                    out.append(kept)
                    self._sent_any = True
                self._pos = self._scan = a + 1
                return True
            a = buf.rfind(literal, start, a + len(literal) - 1)
        self._one_by_one = True
        return False

    def _item(self, buf: bytes, start: int, end: int) -> tuple[bytes | None, int] | None:
        """The item if buf[start:end] is one (it decodes), as sent or None when withheld."""
        try:
            return self._keep(memoryview(buf)[start:end]), end
        except NotJSON:
            return None

    def _next_item_end(self, buf: bytes, start: int) -> tuple[bytes | None, int] | None:
        if self._compact:
            return self._next_compact_end(buf, start)
        assert self._sep is not None
        search = self._sep.search
        pos = max(self._scan, start)
        while True:
            m = search(buf, pos)
            if m is None:
                # A candidate whose look-ahead is cut off by the end of the buffer is found again
                # when more arrives: resume a little before the end.
                self._scan = max(start, len(buf) - 256)
                return None
            item = self._item(buf, start, m.end())
            if item is not None:
                return item
            pos = m.end()

    def _next_compact_end(self, buf: bytes, start: int) -> tuple[bytes | None, int] | None:
        """`_next_item_end` for compact JSON. While a `},{"<key>":` follows, it is the only
        candidate (the list's end cannot come before a next item); otherwise `}]` followed by
        `}` and the end of the body, or by `,"kind":` / `,"metadata":` / `,"apiVersion":`
        (sorted-key lists)."""
        literal = self._literal
        pos = max(self._scan, start)
        find = buf.find
        n = len(buf)
        while True:
            a = find(literal, pos)
            if a >= 0:
                item = self._item(buf, start, a + 1)
                if item is not None:
                    return item
                pos = a + 1  # inside the item (a nested list of such objects)
                continue
            b = find(b"}]", pos)
            if b < 0:
                self._scan = max(start, n - len(literal))
                return None
            after = buf[b + 2 : b + 16]
            if after.startswith(b"}"):
                # The list's own `]}` ends the body (a newline at most after it).
                if n - (b + 3) > 2 or buf[b + 3 :].strip():
                    pos = b + 1  # `}]}` inside an item
                    continue
            elif not after.startswith((b',"kind":', b',"metadata":', b',"apiVersion":')):
                if len(after) >= 14:  # 14: len(',"apiVersion":'), the longest
                    pos = b + 1
                    continue
                self._scan = b  # cut off at the end of the buffer: decide when more comes
                return None
            item = self._item(buf, start, b + 1)
            if item is not None:
                return item
            pos = b + 1

    def close(self) -> bytes:
        items = self._drain() if self._waiting else b""
        if self._state != "tail":
            raise FilterError("the list ended before its items did")
        tail = self._buf
        newline = tail.endswith(b"\n")
        try:
            obj = orjson.loads(b'{"items":[' + tail)
        except orjson.JSONDecodeError:
            raise FilterError("list tail is not JSON") from None
        if not isinstance(obj, dict):
            raise FilterError("list tail is not JSON")
        if len(obj) > 1:
            self._meta(obj)
        encoded = orjson.dumps(obj)
        return items + encoded[len(b'{"items":[') :] + (b"\n" if newline else b"")


# -- WATCH: one event per line -------------------------------------------------------------------


class WatchFilter:
    """JSON watch events (one per line): BOOKMARK and ERROR pass as they are; ADDED, MODIFIED
    and DELETED go through the object filter and projection or are withheld."""

    def __init__(self, keep: Callable[[msgspec.Raw | None], bytes | None]) -> None:
        self._keep = keep
        self._pending = b""
        self.events_out = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_OBJECT_BYTES:
            raise FilterError(f"watch event larger than {MAX_OBJECT_BYTES} bytes")
        out: list[bytes] = []
        keep = self._keep
        for line in lines:
            if not line.strip():
                continue
            kind, kept = self._framed(line)
            if kind is None:
                try:
                    event = _event.decode(line)
                    kind = _value.decode(event["type"]) if "type" in event else None
                except msgspec.DecodeError:
                    raise FilterError("watch event is not a JSON object") from None
                if kind in ("BOOKMARK", "ERROR"):
                    out.append(line + b"\n")
                    continue
                if not isinstance(kind, str) or kind not in _FRAMES:
                    raise FilterError(f"unknown watch event type {kind!r}")
                try:
                    kept = keep(event.get("object"))
                except NotJSON:
                    raise FilterError("watch event is not JSON") from None
            if kept is not None:
                out.append(_FRAMES[kind] + kept + b"}\n")
        self.events_out += len(out)
        return b"".join(out)

    def _framed(self, line: bytes) -> tuple[str | None, bytes | None]:
        """kube-apiserver's own framing, `{"type":"<T>","object":<object>}`, read without
        decoding the event around the object (which would read the object twice): the object's
        bytes are exactly what lies between, when they decode as one object. (None, None) for
        anything else, which is then decoded whole."""
        if line[-1:] != b"}":
            return None, None
        for kind, head in _FRAMES.items():
            if line.startswith(head):
                try:
                    return kind, self._keep(memoryview(line)[len(head) : -1])  # type: ignore[arg-type]
                except NotJSON:
                    return None, None
        return None, None

    def close(self) -> bytes:
        if self._pending.strip():
            raise FilterError("watch stream ended inside an event")
        return b""


def expired_event(message: str) -> bytes:
    return (
        orjson.dumps({"type": "ERROR", "object": status.status(410, message, reason="Expired")})
        + b"\n"
    )


# -- the exchange --------------------------------------------------------------------------------


@dataclass
class FilterContext:
    """What filtering needs beyond forwarding: the namespace view, the token sealer, a counter."""

    nsview: NamespaceView | None
    sealer: ContinueSealer
    count_hidden: Callable[[str, int], None] = field(default=lambda peer, n: None)


def _concerns(vis: Visibility, namespace: str = "") -> Callable[[NamespaceChange], bool]:
    """Whether a change moves a namespace into or out of the view (of `namespace`'s requests
    only, for a request inside one namespace)."""
    if namespace:
        return lambda c: c.name == namespace and vis.sees(c.name, c.old) != vis.sees(c.name, c.new)
    return lambda c: vis.sees(c.name, c.old) != vis.sees(c.name, c.new)


def _query_pairs(target: str) -> tuple[str, list[tuple[str, str]]]:
    path, _, query = target.partition("?")
    pairs = []
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        pairs.append((key, value))
    return path, pairs


def _json_answer(
    ex: Exchange, ctx: ForwardContext, code: int, body: bytes, content_type: str = JSON
) -> web.Response:
    ex.end(EndReason.COMPLETED, code)
    ctx.recorder.body_sent(ex, len(body))
    return web.Response(
        status=code,
        body=body,
        headers={
            "Content-Type": content_type,
            "Audit-ID": ex.audit_id,
            "Cache-Control": "no-cache, private",
        },
    )


def not_found(info: RequestInfo) -> bytes:
    details: dict[str, Any] = {"name": info.name}
    if info.api_group:
        details["group"] = info.api_group
    details["kind"] = info.resource
    what = f"{info.resource}.{info.api_group}" if info.api_group else info.resource
    return status.status_bytes(404, f'{what} "{info.name}" not found', details=details)


async def serve(
    ctx: ForwardContext,
    fctx: FilterContext,
    request: web.BaseRequest,
    ex: Exchange,
    decision: Decision,
) -> web.StreamResponse:
    info = ex.info
    assert info is not None
    assert decision.filters
    vis = decision.visibility
    labels_of: Callable[[str], Any] = lambda _ns: None  # noqa: E731
    ex.annotations[ev.FILTERED] = ",".join(
        (["namespaces"] if vis is not None else [])
        + [f"projection={decision.projection or 'strip'}"]
    )
    if vis is not None and vis.needs_labels:
        view = fctx.nsview
        if view is not None and not view.synced and view.running:
            # Just started: the first namespace LIST is usually a few milliseconds away.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_WAIT_SECONDS):  # never drops a cancel
                    await view.wait_synced()
        if view is None or not view.synced:
            return ctx.recorder.refuse(
                ex,
                503,
                "the proxy has not read the namespaces yet; retry",
                headers={"Retry-After": str(ctx.recorder.retry_after_seconds)},
            )
        labels_of = view.get
    accept = negotiate_json(request.headers.get("Accept", ""))
    if accept is None:
        return ctx.recorder.refuse(
            ex,
            406,
            f"only the following media types are accepted: {JSON} "
            "(objects of this resource are filtered or projected by the proxy)",
        )
    # A request for one namespace's objects, or one namespace: decided before going upstream.
    named_ns = info.namespace or (info.name if info.resource == "namespaces" else "")
    hidden_ns = vis is not None and named_ns and not vis.sees(named_ns, labels_of(named_ns))
    if hidden_ns and info.verb == "get":
        return _json_answer(ex, ctx, 404, not_found(info))
    path, pairs = _query_pairs(ex.target)
    query = {unquote(k): unquote(v) for k, v in pairs}
    bound = f"{ex.peer}\x00{decision.rule}\x00{info.api_group}/{info.resource}"
    if vis is not None and "continue" in query and query["continue"]:
        opened = fctx.sealer.open(query["continue"], bound)
        if opened is None:
            return ctx.recorder.refuse(ex, 410, EXPIRED_MESSAGE)
        pairs = [(k, quote(opened, safe="") if unquote(k) == "continue" else v) for k, v in pairs]
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in pairs) if pairs else "")
    if info.verb == "watch" and vis is not None and vis.needs_labels and fctx.nsview is not None:
        rv = query.get("resourceVersion", "")
        initial = query.get("sendInitialEvents") in _TRUE
        if rv not in ("", "0") and not initial:
            try:
                since = int(rv)
            except ValueError:
                since = -1
            if since < 0 or fctx.nsview.changed_since(since, _concerns(vis, info.namespace)):
                ex.annotations[ev.FILTER_EXPIRED] = "resumed-after-visibility-change"
                return ctx.recorder.refuse(
                    ex,
                    410,
                    f"too old resource version: {rv} (the namespaces visible to this peer "
                    "changed since; list again)",
                )

    headers = upstream_request_headers(request.headers)
    headers.popall("Accept-Encoding", None)
    headers["Accept"] = accept
    ctx.upstream.authorize(headers)
    headers["Audit-ID"] = ex.audit_id
    watch = info.verb == "watch"
    started = time.monotonic()
    saved_target = ex.target
    ex.target = target  # what goes upstream; the audit record keeps the client's URI below
    try:
        up = await _send(ctx, ex, headers, None, watch)
    except _UpstreamFailed as failed:
        return ctx.recorder.upstream_failed(ex, failed.kind, failed.error)
    finally:
        ex.target = saved_target
    ctx.recorder.upstream_answered(ex, started)
    ofilter = ObjectFilter(info.resource, vis, decision.projection, labels_of)
    try:
        return await _answer(ctx, fctx, request, ex, up, info, vis, ofilter, bound)
    finally:
        release_quietly(up)
        if ofilter.hidden:
            ex.annotations[ev.ITEMS_HIDDEN] = ofilter.hidden
            fctx.count_hidden(ex.peer, ofilter.hidden)


async def _answer(
    ctx: ForwardContext,
    fctx: FilterContext,
    request: web.BaseRequest,
    ex: Exchange,
    up: Any,
    info: RequestInfo,
    vis: Visibility | None,
    ofilter: ObjectFilter,
    bound: str,
) -> web.StreamResponse:
    watch = info.verb == "watch"
    ctype = up.headers.get("Content-Type", "")
    encoding = up.headers.get("Content-Encoding", "identity").lower()
    if up.status != 200:
        # Errors (Status objects) name only what the client asked for: copy them.
        body = await up.read(MAX_OBJECT_BYTES)
        headers = downstream_response_headers(up.headers)
        headers["Audit-ID"] = ex.audit_id
        ex.end(EndReason.COMPLETED, up.status)
        ctx.recorder.body_sent(ex, len(body))
        return web.Response(status=up.status, reason=up.reason, body=body, headers=headers)
    if not ctype.lower().startswith(JSON) or encoding not in ("", "identity"):
        _log.warning("filter_unreadable_answer", audit_id=ex.audit_id, content_type=ctype)
        return ctx.recorder.refuse(ex, 502, "upstream answer could not be filtered")
    if info.verb == "get" and request.method == "HEAD":
        # No body to filter: the path named the namespace, which was checked before going up.
        return _json_answer(ex, ctx, 200, b"", ctype)
    if info.verb == "get":
        try:
            kept = ofilter.keep(await up.read(MAX_OBJECT_BYTES))
        except (NotJSON, UpstreamClientError, TimeoutError):
            return ctx.recorder.refuse(ex, 502, "upstream answer could not be filtered")
        if kept is None:
            return _json_answer(ex, ctx, 404, not_found(info))
        return _json_answer(ex, ctx, 200, kept, ctype)  # as=... kept

    def rewrite_meta(obj: Any) -> None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or vis is None:
            return
        meta.pop("remainingItemCount", None)
        token = meta.get("continue")
        if token:
            meta["continue"] = fctx.sealer.seal(str(token), bound)
        if fctx.nsview is not None and vis.needs_labels:
            with contextlib.suppress(ValueError, TypeError):
                fctx.nsview.note_list_served(int(str(meta.get("resourceVersion"))))

    transform: ListFilter | WatchFilter = (
        WatchFilter(ofilter.keep)
        if watch
        else ListFilter(ofilter.keep, rewrite_meta, keep_many=ofilter.keep_many)
    )
    headers = downstream_response_headers(up.headers)
    headers.popall("Content-Length", None)
    headers["Audit-ID"] = ex.audit_id
    resp = web.StreamResponse(status=200, reason=up.reason, headers=headers)
    sent = 0
    try:
        try:
            await resp.prepare(request)
        except ConnectionError:
            ex.end(EndReason.CLIENT)
            return resp
        ex.code = 200
        if watch:
            ex.streamed = True
            await ctx.recorder.started(ex, 200)
        loop = asyncio.get_running_loop()
        own = asyncio.timeout(None)
        unsubscribe: Callable[[], None] = lambda: None  # noqa: E731
        if watch and vis is not None and vis.needs_labels and fctx.nsview is not None:
            concerns = _concerns(vis, info.namespace)

            def changed(change: NamespaceChange) -> None:
                if concerns(change) and not own.expired():
                    ex.annotations[ev.FILTER_EXPIRED] = "visibility-changed"
                    own.reschedule(loop.time())

            unsubscribe = fctx.nsview.subscribe(changed)
        ended = "upstream"
        deadline = _watch_deadline(ctx, ex) if watch else None
        try:
            async with ctx.streams.bounded(ex, deadline):
                try:
                    async with own:
                        async for chunk in up.chunks():
                            out = transform.feed(chunk)
                            if out:
                                try:
                                    await resp.write(out)
                                except (ConnectionError, RuntimeError):
                                    ended = "client"
                                    break
                                sent += len(out)
                        else:
                            out = transform.close()
                            if out:
                                await resp.write(out)
                                sent += len(out)
                except TimeoutError:
                    if not own.expired():
                        raise
                    line = expired_event("the namespaces visible to this watch changed; list again")
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await resp.write(line)
                        sent += len(line)
                    ended = "expired"
        except (UpstreamClientError, TimeoutError, ConnectionError):
            ended = "upstream_error"
        except FilterError as exc:
            _log.warning("filter_failed", audit_id=ex.audit_id, error=str(exc))
            ended = "upstream_error"
        finally:
            unsubscribe()
        if ex.ended_by is not None:
            pass
        elif ended == "client":
            ex.end(EndReason.CLIENT)
            return resp
        elif ended == "upstream_error":
            ctx.recorder.upstream_reset()
            ex.end(EndReason.UPSTREAM_ERROR)
            # A cut list must not look complete: drop the connection (a watch just ends).
            if not watch and request.transport is not None:
                request.transport.close()
                return resp
        else:
            ex.end(EndReason.UPSTREAM if watch and ended == "upstream" else EndReason.COMPLETED)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp
    finally:
        events = transform.events_out if isinstance(transform, WatchFilter) else None
        if watch:
            ex.annotations[ev.WATCH_EVENTS] = events or 0
            ex.annotations[ev.WATCH_DURATION] = round(time.monotonic() - ex.started, 3)
        ctx.recorder.body_sent(ex, sent, events)
