"""The proxy's own view of namespace labels, to evaluate policy namespace selectors.

One informer (LIST, then WATCH with bookmarks, re-LIST after any failure) on `namespaces`, under
the proxy's own upstream credential (`policy rbac` grants list+watch on namespaces when a rule
has a selector). Until the first LIST has been read the view is not `synced` and filtered
requests are refused with 503 (fail closed); a namespace the view has never seen is not visible
through a selector.

Every change of a namespace's labels (and every namespace added or deleted) is recorded with the
namespace's resourceVersion and told to the listeners: open filtered watches end with an ERROR
410 Expired event when a namespace enters or leaves their view, so the client re-lists
(apiproxy/filtering.py). A watch that resumes from a resourceVersion older than a change that
concerns it is answered 410 the same way (`changed_since`), so it cannot miss what entered its
view while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
from multidict import CIMultiDict

from apiproxy import log
from apiproxy.forward import UpstreamPool, release_quietly
from apiproxy.upstream import UpstreamConfig
from apiproxy.upstream_client import UpstreamClientError

__all__ = ["NamespaceChange", "NamespaceView"]

_log = log.get_logger("apiproxy.nsview")

Labels = Mapping[str, str]
Listener = Callable[["NamespaceChange"], None]
# Changes kept to answer `changed_since`; an older resourceVersion than all of them gets 410.
HISTORY = 4096
_MAX_LINE = 4 * 1024 * 1024
_WATCH_SECONDS = 300
# How long after the view learns of a change a resumed watch it concerns is sent back to list,
# whatever its resourceVersion: covers a client's gap between a LIST and its WATCH.
RECENT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class NamespaceChange:
    name: str
    old: Labels | None  # None: the namespace did not exist (for the view)
    new: Labels | None  # None: it was deleted
    resource_version: int
    learned: float = 0.0  # monotonic time the view learned of it


def _rv(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _labels(obj: object) -> tuple[str, Labels] | None:
    if not isinstance(obj, dict):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        labels = {}
    return meta["name"], {str(k): str(v) for k, v in labels.items()}


class NamespaceView:
    def __init__(
        self,
        upstream: UpstreamConfig,
        pool: UpstreamPool,
        *,
        timeout: float = 30.0,
        backoff: float = 1.0,
    ) -> None:
        self._upstream = upstream
        self._pool = pool
        self._timeout = timeout
        self._backoff = backoff
        self.labels: dict[str, Labels] = {}
        self.synced = False
        # The resourceVersion of the first complete LIST: what happened before it is unknown.
        self.known_since = 0
        self.history: deque[NamespaceChange] = deque(maxlen=HISTORY)
        # resourceVersion of a filtered LIST this process answered -> when (monotonic): a watch
        # resumed from it was listed with this view, so only changes learned since then count.
        self._served: OrderedDict[int, float] = OrderedDict()
        self._listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._synced_event = asyncio.Event()

    # -- queries ---------------------------------------------------------------------------

    def get(self, name: str) -> Labels | None:
        return self.labels.get(name) if self.synced else None

    def changed_since(
        self, resource_version: int, concerns: Callable[[NamespaceChange], bool]
    ) -> bool:
        """Whether a change that `concerns` the caller happened after `resource_version`; True
        when the view cannot tell (not synced, or older than its knowledge)."""
        if not self.synced:
            return True
        served = self._served.get(resource_version)
        if served is not None:
            # kube-apiserver serves a list of an idle resource from its watch cache at an old
            # resourceVersion, possibly older than `known_since`: judged by the time it was
            # answered, a client's LIST+WATCH never loops on 410s.
            since = served - RECENT_SECONDS
            if len(self.history) == self.history.maxlen and self.history[0].learned > since:
                return True  # changes learned since then were dropped: cannot tell
            return any(c.learned > since and concerns(c) for c in self.history)
        if resource_version < self.known_since:
            return True
        if len(self.history) == self.history.maxlen and (
            not self.history or resource_version < self.history[0].resource_version
        ):
            return True
        # A change is also "after" a resourceVersion when it was learned moments ago: this view
        # may have been behind the apiserver, so a list served just before it learned of the
        # change can carry a newer resourceVersion than the change's own.
        recent = time.monotonic() - RECENT_SECONDS
        return any(
            (c.resource_version > resource_version or c.learned > recent) and concerns(c)
            for c in self.history
        )

    def note_list_served(self, resource_version: int) -> None:
        """A filtered LIST at `resource_version` was answered with this view (synced)."""
        if not self.synced:
            return
        self._served.setdefault(resource_version, time.monotonic())  # the earliest counts
        self._served.move_to_end(resource_version)
        while len(self._served) > HISTORY:
            self._served.popitem(last=False)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.create_task(self._run(), name="apiproxy-namespace-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # -- the informer ----------------------------------------------------------------------

    def _apply(self, name: str, new: Labels | None, rv: int) -> None:
        old = self.labels.get(name)
        if old == new:
            return
        if new is None:
            self.labels.pop(name, None)
        else:
            self.labels[name] = new
        # The first LIST is what the view starts from, not a change anyone could have missed.
        change = NamespaceChange(name, old, new, rv, time.monotonic() if self.synced else 0.0)
        self.history.append(change)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a listener's bug must not stop the view
                _log.exception("namespace_listener_failed")

    async def _request(self, target: str, watch: bool):  # type: ignore[no-untyped-def]
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Accept"] = "application/json"
        headers["User-Agent"] = "apiproxy-namespace-view"
        self._upstream.authorize(headers)
        async with asyncio.timeout(self._timeout):
            return await self._pool.send(
                "GET",
                target,
                headers,
                None,
                read_timeout=None if watch else self._timeout,
                watch=watch,
            )

    async def _list(self) -> int:
        up = await self._request("/api/v1/namespaces", watch=False)
        try:
            if up.status != 200:
                raise UpstreamClientError(f"namespace list answered {up.status}")
            body = orjson.loads(await up.read(256 * 1024 * 1024))
        finally:
            release_quietly(up)
        seen: dict[str, Labels] = {}
        for item in body.get("items") or ():
            parsed = _labels(item)
            if parsed is not None:
                seen[parsed[0]] = parsed[1]
        rv = _rv((body.get("metadata") or {}).get("resourceVersion"))
        for name in list(self.labels):
            if name not in seen:
                self._apply(name, None, rv)
        for name, labels in seen.items():
            self._apply(name, labels, rv)
        if not self.synced:
            self.known_since = rv
            self.synced = True
            self._synced_event.set()
            _log.info("namespace_view_synced", namespaces=len(self.labels), resource_version=rv)
        return rv

    async def _watch(self, rv: int) -> None:
        target = (
            f"/api/v1/namespaces?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
            f"&timeoutSeconds={_WATCH_SECONDS}"
        )
        up = await self._request(target, watch=True)
        try:
            if up.status != 200:
                raise UpstreamClientError(f"namespace watch answered {up.status}")
            pending = b""
            async for chunk in up.chunks():
                pending += chunk
                if len(pending) > _MAX_LINE:
                    raise UpstreamClientError("namespace watch event too large")
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        raise UpstreamClientError(f"namespace watch error: {obj.get('message')}")
                    event_rv = _rv((obj.get("metadata") or {}).get("resourceVersion"))
                    if kind == "BOOKMARK":
                        continue
                    parsed = _labels(obj)
                    if parsed is None:
                        continue
                    self._apply(parsed[0], None if kind == "DELETED" else parsed[1], event_rv)
        finally:
            release_quietly(up)

    async def _run(self) -> None:
        delay = self._backoff
        while True:
            try:
                rv = await self._list()
                delay = self._backoff
                while True:  # a watch that ends cleanly is reopened with a fresh LIST
                    await self._watch(rv)
                    rv = await self._list()
            except asyncio.CancelledError:
                raise
            except (UpstreamClientError, TimeoutError, ConnectionError, OSError, ValueError) as exc:
                _log.warning("namespace_view_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
