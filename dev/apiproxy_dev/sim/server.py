"""The simulated kube-apiserver's HTTP(S) side: authentication, routing, content negotiation,
CRUD, LIST and WATCH with the real server's status codes and bodies. Development and test tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web

from apiproxy import pki
from apiproxy.log import get_logger
from apiproxy_dev.sim import discovery, patch
from apiproxy_dev.sim.errors import ApiError, bad_request, internal
from apiproxy_dev.sim.faults import Faults, StartRefused
from apiproxy_dev.sim.resources import BUILTIN, ResourceType
from apiproxy_dev.sim.store import Store, Watcher, dumps, now_rfc3339

log = get_logger("apiproxy_dev.sim")

JSON = "application/json"
PROTOBUF = "application/vnd.kubernetes.protobuf"
_NS_SUBRESOURCES = ("status", "finalize")
_LIST_CHUNK = 256  # objects per write when streaming a LIST body
_BUILTIN_GROUPS = frozenset(rt.group for rt in BUILTIN)
# Non-resource paths the real server answers GET on; other methods there are 405.
_NONRESOURCE_GET = ("/version", "/api", "/apis")
_HEALTH = ("/healthz", "/livez", "/readyz")
# Create/update bodies the real server decodes (protobuf too, which the simulator cannot).
_BODY_TYPES = (JSON, "application/yaml")
_AUDIT_KEY = web.RequestKey("audit_id", str) if hasattr(web, "RequestKey") else "audit_id"


_PARTIAL = ("PartialObjectMetadata", "PartialObjectMetadataList")


def _negotiate(accept: str) -> str | None:
    """The first Accept entry we serve: "json", "partial" (JSON metadata-only objects, what
    metadata informers ask for with `as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`), or
    None when nothing is acceptable (we serve no protobuf, Table or YAML)."""
    if not accept.strip():
        return "json"
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        params = {
            k.strip().lower(): v.strip()
            for k, _, v in (p.partition("=") for p in parts[1:] if "=" in p)
        }
        if mtype not in ("*/*", "application/*", JSON):
            continue
        if not params.keys() & {"as", "g", "v"}:
            return "json"
        if (
            params.get("as") in _PARTIAL
            and params.get("g") == "meta.k8s.io"
            and params.get("v") in ("v1", "v1beta1")
        ):
            return "partial"
    return None


def _accepts_json(accept: str) -> bool:
    return _negotiate(accept) is not None


def _partial(raw: bytes) -> bytes:
    """An object as kube-apiserver answers `as=PartialObjectMetadata`: its metadata only."""
    obj = json.loads(raw)
    return dumps(
        {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata", {}),
        }
    )


def _partial_event(line: bytes) -> bytes:
    ev = json.loads(line)
    if ev.get("type") != "ERROR":
        ev["object"] = json.loads(_partial(dumps(ev["object"])))
    return dumps(ev) + b"\n"


class _Route:
    __slots__ = ("group", "name", "namespace", "resource", "subresource", "version", "watch")

    def __init__(self) -> None:
        self.group = self.version = self.namespace = self.resource = self.name = ""
        self.subresource = ""
        self.watch = False


def _parse_resource_path(parts: list[str]) -> _Route | None:
    """`parts` after /api or /apis, as RequestInfoFactory splits them."""
    r = _Route()
    if parts[0] == "api":
        if len(parts) < 3:
            return None
        r.version, rest = parts[1], parts[2:]
    else:
        if len(parts) < 4:
            return None
        r.group, r.version, rest = parts[1], parts[2], parts[3:]
    if rest and rest[0] == "watch":
        r.watch, rest = True, rest[1:]
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) > 1:
        r.namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NS_SUBRESOURCES:
            rest = rest[2:]
    r.resource = rest[0]
    if len(rest) > 1:
        r.name = rest[1]
    if len(rest) > 2:
        r.subresource = rest[2]
    if len(rest) > 3:
        return None
    if r.resource == "namespaces":
        r.namespace = ""
    return r


class SimAPIServer:
    """A simulated kube-apiserver on 127.0.0.1. See docs/simulator.md.

    >>> async with SimAPIServer() as sim:
    ...     sim.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {...}})
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        token: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        serving: pki.KeyPair | None = None,
        ca: pki.KeyPair | None = None,
        kube_system_uid: str | None = None,
        history_size: int = 10_000,
        bookmark_interval: float = 60.0,
        watch_timeout: float = 1800.0,
        store: Store | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self.store = store or Store(history_size=history_size, kube_system_uid=kube_system_uid)
        self.faults = Faults()
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.url = ""
        self.ca_pem = ""
        self._tls_files: tuple[str, str] | None = None
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise ValueError("tls_cert and tls_key go together")
            self._tls_files = (str(tls_cert), str(tls_key))
            self.ca_pem = Path(tls_cert).read_text()
        elif tls:
            self._ca = ca or pki.make_ca("apiproxy-sim CA")
            self._serving = serving or pki.issue(
                self._ca,
                "kube-apiserver",
                dns_names=("localhost", "kubernetes", "kubernetes.default.svc"),
                ip_addresses=("127.0.0.1", "::1"),
                server=True,
            )
            self.ca_pem = self._ca.cert_pem if serving is None or ca is not None else ""
        self._runner: web.AppRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._watch_tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None  # created on start (needs a loop)
        self._openapi: tuple[int, dict[str, Any], dict[str, bytes]] | None = None

    # ------------------------------------------------------------------------- lifecycle

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # no HTTP/2: Go clients fall back to 1.1
        if self._tls_files:
            ctx.load_cert_chain(*self._tls_files)
            return ctx
        self._tmp = tempfile.TemporaryDirectory(prefix="apiproxy-sim-")
        cert, key = Path(self._tmp.name, "tls.crt"), Path(self._tmp.name, "tls.key")
        cert.write_text(self._serving.cert_pem)
        key.touch(mode=0o600)
        key.write_text(self._serving.key_pem)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def start(self) -> None:
        if self.faults.refuse_start:
            raise StartRefused("simulated kube-apiserver refused to start (fault injected)")
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(self._add_headers)
        # handler_cancellation: a watch handler whose client has gone is cancelled at once;
        # otherwise it would only notice on its next write, and a quiet watch would pile up
        # (with its store watcher) for as long as its timeout.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self._ssl_context(), backlog=1024
        )
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = int(sock.getsockname()[1])
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{scheme}://{host}:{self.port}"
        log.info("sim_started", url=self.url)

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        for task in list(self._watch_tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> SimAPIServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[SimAPIServer]:
        """Serve from a background thread with its own event loop (for synchronous clients)."""
        loop = asyncio.new_event_loop()
        started: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                try:
                    await self.start()
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                started.set_result(None)

            loop.run_until_complete(boot())
            if started.exception() is None:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name="apiproxy-sim", daemon=True)
        ready = threading.Event()
        started.add_done_callback(lambda _f: ready.set())
        thread.start()
        ready.wait()
        if started.exception() is not None:
            thread.join()
            raise started.exception()  # type: ignore[misc]
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    def kubeconfig(self, *, context: str = "sim") -> dict[str, Any]:
        import base64

        cluster: dict[str, Any] = {"server": self.url}
        if self.tls and self.ca_pem:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem.encode()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }

    def write_kubeconfig(self, path: str | Path, *, context: str = "sim") -> Path:
        """Write a kubeconfig (server URL, CA, token) for kubectl and the client libraries."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch(mode=0o600)
        p.write_text(yaml.safe_dump(self.kubeconfig(context=context), sort_keys=False))
        return p

    # ------------------------------------------------------------------------- plumbing

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Audit-ID"] = request.get(_AUDIT_KEY, "")
        response.headers.setdefault("Cache-Control", "no-cache, private")

    @staticmethod
    def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        raw = body if isinstance(body, bytes) else dumps(body)
        return web.Response(body=raw, status=status, content_type=JSON, headers=headers)

    def _error(self, err: ApiError) -> web.Response:
        return self._json(err.body, err.code, err.headers or None)

    def _authenticated(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request[_AUDIT_KEY] = request.headers.get("Audit-ID") or str(uuid.uuid4())
        path = request.path
        is_watch = _is_watch(request)
        if (rule := self.faults.take("drop", request.method, path, is_watch)) is not None:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if (rule := self.faults.take("delay", request.method, path, is_watch)) is not None:
            await asyncio.sleep(rule.seconds)
        if not self._authenticated(request):
            return self._error(ApiError(401, "Unauthorized"))
        if (rule := self.faults.take("fail", request.method, path, is_watch)) is not None:
            headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after else None
            msg = rule.message or (
                "Too many requests, please try again later."
                if rule.code == 429
                else "simulated failure (fault injected)"
            )
            return self._error(ApiError(rule.code, msg, headers=headers))
        try:
            return await self._dispatch(request, path)
        except ApiError as err:
            return self._error(err)

    async def _dispatch(self, request: web.Request, path: str) -> web.StreamResponse:
        if path.startswith("/openapi/"):
            # Not negotiated: kubectl asks for v2 as protobuf; a server without it says 404.
            return self._openapi_response([p for p in path.split("/") if p])
        accept = request.headers.get("Accept", "")
        if not _accepts_json(accept):
            raise ApiError(
                406,
                "only the following media types are accepted: application/json",
                reason="NotAcceptable",
            )
        parts = [p for p in path.split("/") if p]
        reg = self.store.registry
        if path in _HEALTH:  # the health checks answer whatever the method
            return web.Response(text="ok", content_type="text/plain")
        if request.method != "GET" and (
            path.rstrip("/") in _NONRESOURCE_GET or _discovery_path(parts)
        ):
            raise ApiError(
                405,
                "the server does not allow this method on the requested resource",
                reason="MethodNotAllowed",
            )
        if request.method == "GET":
            if path in ("/version", "/version/"):
                return self._json(discovery.VERSION)
            if parts == ["api"]:
                return self._json(discovery.api_versions(f"{self.host}:{self.port}"))
            if parts == ["apis"]:
                return self._json(discovery.api_group_list(reg))
            if parts and parts[0] == "openapi":
                return self._openapi_response(parts)
            doc: dict[str, Any] | None = None
            if len(parts) == 2 and parts[0] == "api":
                doc = discovery.resource_list(reg, "", parts[1])
            elif len(parts) == 2 and parts[0] == "apis":
                doc = discovery.api_group(reg, parts[1])
            elif len(parts) == 3 and parts[0] == "apis":
                doc = discovery.resource_list(reg, parts[1], parts[2])
            if doc is not None:
                return self._json(doc)
        if not parts or parts[0] not in ("api", "apis"):
            # The real server's catch-all (1.37) is the mux's plain-text 404, for every method.
            return web.Response(status=404, text="404 page not found\n", content_type="text/plain")
        if parts[0] == "apis" and (len(parts) < 2 or parts[1] not in _BUILTIN_GROUPS):
            # Groups served by no built-in API (unknown ones, CRDs' groups) fall through to the
            # mux's plain-text 404 whenever the path names no served resource.
            not_found: web.Response = web.Response(
                status=404, text="404 page not found\n", content_type="text/plain"
            )
        else:
            not_found = self._error(
                ApiError(404, "the server could not find the requested resource")
            )
        route = _parse_resource_path(parts)
        rt = reg.lookup(route.group, route.version, route.resource) if route else None
        if route is None or rt is None:
            return not_found
        if not rt.namespaced and route.namespace and rt.resource != "namespaces":
            return not_found  # a cluster-scoped resource under /namespaces/<ns>/
        if route.subresource and not (route.subresource == "status" and rt.has_status):
            raise ApiError(404, "the server could not find the requested resource")
        if rt.namespaced and route.namespace == "" and route.name:
            raise ApiError(404, "the server could not find the requested resource")
        return await self._resource(request, route, rt)

    def _openapi_response(self, parts: list[str]) -> web.Response:
        if parts[:2] != ["openapi", "v3"]:
            raise ApiError(404, "the server could not find the requested resource")
        rv = self.store.resource_version
        reg_key = (
            len(self.store.registry.by_gv),
            sum(len(v) for v in self.store.registry.by_gv.values()),
        )
        if self._openapi is None or self._openapi[0] != hash(reg_key):
            index, docs = discovery.openapi_v3(self.store.registry)
            self._openapi = (hash(reg_key), index, docs)
        del rv
        _, index, docs = self._openapi
        if len(parts) == 2:
            # kube-apiserver 1.37 sends the index without a Content-Type of its own, so Go's
            # sniffing labels the JSON text/plain.
            return web.Response(
                body=json.dumps(index, separators=(",", ":")).encode(),
                content_type="text/plain",
                charset="utf-8",
            )
        body = docs.get("/".join(parts[2:]))
        if body is None:
            raise ApiError(404, "the server could not find the requested resource")
        return self._json(body)

    # ------------------------------------------------------------------------- resources

    async def _resource(
        self, request: web.Request, route: _Route, rt: ResourceType
    ) -> web.StreamResponse:
        q = request.query
        method = request.method
        if method != "GET":
            _check_write_options(method, request, q)
        dry_run = q.get("dryRun") == "All"
        store = self.store
        if method == "GET":
            partial = _negotiate(request.headers.get("Accept", "")) == "partial"
            # ?watch only turns a LIST into a watch; a GET of one object returns the object (a
            # single-object watch is the /watch/ path, or a LIST with fieldSelector=metadata.name).
            if route.watch or (not route.name and _bool(q.get("watch"))):
                if route.name:
                    flt_fs = f"metadata.name={route.name}"
                    extra = q.get("fieldSelector", "")
                    return await self._watch(
                        request, rt, route, ",".join(s for s in (flt_fs, extra) if s), partial
                    )
                return await self._watch(request, rt, route, q.get("fieldSelector", ""), partial)
            if route.name:
                raw = store.get_entry(rt, route.namespace, route.name).raw
                return self._json(_partial(raw) if partial else raw)
            return await self._list(request, rt, route, partial)
        if method == "POST":
            if route.name:
                raise ApiError(
                    405,
                    "the server does not allow this method on the requested resource",
                    reason="MethodNotAllowed",
                )
            obj = await self._body(request, rt)
            self._check_ns(obj, route, rt)
            created = store.create(
                obj,
                resource=rt.key,
                namespace=route.namespace or None,
                dry_run=dry_run,
                keep_status=False,
            )
            return self._json(created, 201)
        if method == "PUT":
            if not route.name:
                raise ApiError(
                    405,
                    "the server does not allow this method on the requested resource",
                    reason="MethodNotAllowed",
                )
            obj = await self._body(request, rt)
            self._check_ns(obj, route, rt)
            meta = obj.setdefault("metadata", {})
            if meta.get("name", route.name) != route.name:
                raise bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the URL "
                    f"({route.name})"
                )
            meta["name"] = route.name
            if rt.namespaced:
                meta["namespace"] = route.namespace
            updated = store.update(
                obj,
                resource=rt.key,
                subresource=route.subresource,
                dry_run=dry_run,
                keep_status=False,
            )
            return self._json(updated)
        if method == "PATCH":
            return await self._patch(request, rt, route, dry_run)
        if method == "DELETE":
            opts = await self._delete_options(request)
            pre = opts.get("preconditions") or {}
            if route.name:
                obj, removed = store.delete_rt(
                    rt,
                    route.namespace,
                    route.name,
                    uid=pre.get("uid"),
                    resource_version=pre.get("resourceVersion"),
                    dry_run=dry_run,
                )
                if removed and rt.key == "namespaces":
                    # The real server answers with the namespace as the namespace controller
                    # finds it (Terminating); the simulator's controller then finishes at once.
                    obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
                    obj["status"] = {"phase": "Terminating"}
                    return self._json(obj)
                if removed and rt.key != "pods":
                    details: dict[str, Any] = {
                        "name": route.name,
                        "kind": rt.resource,
                        "uid": obj["metadata"]["uid"],
                    }
                    if rt.group:
                        details["group"] = rt.group
                    return self._json(
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Success",
                            "details": details,
                        }
                    )
                return self._json(obj)
            flt = store.make_filter(
                rt, route.namespace, q.get("labelSelector", ""), q.get("fieldSelector", "")
            )
            if rt.namespaced and route.namespace:
                store.get_entry(store.registry.types["namespaces"], "", route.namespace)
            deleted: list[dict[str, Any]] = []
            for entry in store.list_entries(rt, flt).items:
                ns = entry.fields.get("metadata.namespace", "")
                with contextlib.suppress(ApiError):
                    deleted.append(
                        store.delete_rt(rt, ns, entry.fields["metadata.name"], dry_run=dry_run)[0]
                    )
            return self._json(
                {
                    "kind": rt.list_kind,
                    "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(store.resource_version)},
                    "items": deleted,
                }
            )
        raise ApiError(
            405,
            "the server does not allow this method on the requested resource",
            reason="MethodNotAllowed",
        )

    @staticmethod
    def _check_ns(obj: dict[str, Any], route: _Route, rt: ResourceType) -> None:
        ns = (obj.get("metadata") or {}).get("namespace")
        if rt.namespaced and ns and route.namespace and ns != route.namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )

    async def _body(self, request: web.Request, rt: ResourceType) -> dict[str, Any]:
        # NegotiateInputSerializer: no Content-Type means JSON; anything else must be a type the
        # server decodes (parameters such as charset are allowed).
        header = request.headers.get("Content-Type", "")
        ctype = header.split(";", 1)[0].strip().lower() or JSON
        if ctype not in _BODY_TYPES:
            raise ApiError(
                415,
                "the body of the request was in an unknown format - accepted media types include: "
                "application/json, application/yaml, application/vnd.kubernetes.protobuf",
                reason="UnsupportedMediaType",
            )
        raw = await request.read()
        try:
            obj = json.loads(raw) if ctype == JSON else yaml.safe_load(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"error decoding request body: {exc}") from None
        if not isinstance(obj, dict):
            raise bad_request("the request body is not an object")
        av, kind = obj.get("apiVersion"), obj.get("kind")
        if (
            av
            and av != rt.api_version
            and (rt.group, av.rpartition("/")[2]) not in (self.store.registry.by_gv)
        ):
            raise bad_request(
                f"the API version in the data ({av}) does not match the expected API version "
                f"({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        return obj

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            opts = json.loads(raw)
        except ValueError as exc:
            # kube-apiserver 1.37 answers a malformed DeleteOptions body with a 400.
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None
        return opts if isinstance(opts, dict) else {}

    async def _patch(
        self, request: web.Request, rt: ResourceType, route: _Route, dry_run: bool
    ) -> web.Response:
        if not route.name:
            raise ApiError(
                405,
                "the server does not allow this method on the requested resource",
                reason="MethodNotAllowed",
            )
        ctype = request.content_type
        kinds = (patch.JSON, patch.MERGE, patch.APPLY, patch.STRATEGIC)
        if ctype not in kinds or (ctype == patch.STRATEGIC and rt.crd):
            raise ApiError(
                415,
                "the body of the request was in an unknown format - accepted media types include: "
                + ", ".join(k for k in kinds if not (rt.crd and k == patch.STRATEGIC)),
                reason="UnsupportedMediaType",
            )
        raw = await request.read()
        try:
            body = yaml.safe_load(raw) if ctype == patch.APPLY else json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            if ctype == patch.MERGE:
                raise bad_request("invalid JSON patch") from None
            raise bad_request(f"error decoding patch: {exc}") from None
        if ctype == patch.MERGE and body is not None and not isinstance(body, dict):
            # Go decodes a merge patch into a map first.
            raise bad_request(
                f"error decoding patch: json: cannot unmarshal {_go_json_type(body)} into Go "
                "value of type map[string]interface {}"
            )
        store = self.store
        try:
            cur = store.get_entry(rt, route.namespace, route.name).obj()
        except ApiError:
            if ctype != patch.APPLY:
                raise
            if not isinstance(body, dict):
                raise bad_request("an apply patch must be an object") from None
            body.setdefault("metadata", {})["name"] = route.name
            return self._json(
                store.create(
                    body,
                    resource=rt.key,
                    namespace=route.namespace or None,
                    dry_run=dry_run,
                    keep_status=route.subresource == "status",
                ),
                201,
            )
        try:
            new = patch.apply_patch(cur, body, ctype)
        except patch.PatchError as exc:
            raise ApiError(422, str(exc), reason="Invalid") from None
        if not isinstance(new, dict):
            raise ApiError(
                422, "the patch produced something that is not an object", reason="Invalid"
            )
        meta = new.setdefault("metadata", {})
        # A patch that does not mention resourceVersion applies to the current version.
        body_rv = (
            (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        )
        meta["resourceVersion"] = body_rv or cur["metadata"]["resourceVersion"]
        if meta.get("name") != route.name:
            raise bad_request("the name of the object does not match the name on the URL")
        updated = store.update(
            new,
            resource=rt.key,
            subresource=route.subresource,
            dry_run=dry_run,
            keep_status=route.subresource == "status",
        )
        return self._json(updated)

    # ------------------------------------------------------------------------- LIST

    async def _list(
        self, request: web.Request, rt: ResourceType, route: _Route, partial: bool = False
    ) -> web.StreamResponse:
        q = request.query
        rv, rvm, cont = (
            q.get("resourceVersion", ""),
            q.get("resourceVersionMatch", ""),
            q.get("continue", ""),
        )
        limit = _int_param(q.get("limit", "0"), "limit")
        causes = []
        if rvm:
            if not rv:
                causes.append(
                    (
                        "resourceVersionMatch",
                        "Forbidden",
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    )
                )
            if cont:
                causes.append(
                    (
                        "resourceVersionMatch",
                        "Forbidden",
                        "resourceVersionMatch is forbidden when continue is provided",
                    )
                )
            if rvm not in ("Exact", "NotOlderThan"):
                causes.append(
                    (
                        "resourceVersionMatch",
                        "FieldValueNotSupported",
                        f'Unsupported value: "{rvm}": supported values: "Exact", '
                        '"NotOlderThan", ""',
                    )
                )
            if rvm == "Exact" and rv == "0":
                causes.append(
                    (
                        "resourceVersionMatch",
                        "Forbidden",
                        'resourceVersionMatch "exact" is forbidden for resourceVersion "0"',
                    )
                )
        if "sendInitialEvents" in q:
            causes.append(
                ("sendInitialEvents", "Forbidden", "sendInitialEvents is forbidden for list")
            )
        if causes:
            raise _invalid_list_options(causes)
        if cont and rv and rv != "0":
            raise bad_request("specifying resource version is not allowed when using continue")
        flt = self.store.make_filter(
            rt, route.namespace, q.get("labelSelector", ""), q.get("fieldSelector", "")
        )
        exact: int | None = None
        if rv and rv != "0":
            n = _rv_param(rv)
            if n > self.store.resource_version:
                raise _too_large(n, self.store.resource_version)
            if rvm == "Exact":
                exact = n
        if rv == "0" and not cont:
            limit = 0  # served from the watch cache, which ignores limit
        res = self.store.list_entries(rt, flt, limit=limit, continue_token=cont, exact_rv=exact)
        if rt.namespaced and route.namespace and not res.items:
            # Listing in a missing namespace is an empty list, as in the real server.
            pass
        meta: dict[str, Any] = {"resourceVersion": str(res.rv)}
        if res.continue_token:
            meta["continue"] = res.continue_token
        if res.remaining is not None:
            meta["remainingItemCount"] = res.remaining
        kind, api_version = (
            ("PartialObjectMetadataList", "meta.k8s.io/v1")
            if partial
            else (rt.list_kind, rt.api_version)
        )
        head = (
            b'{"kind":"'
            + kind.encode()
            + b'","apiVersion":"'
            + api_version.encode()
            + b'","metadata":'
            + dumps(meta)
            + b',"items":['
        )
        items = res.items
        if partial:
            return self._json(head + b",".join(_partial(e.raw) for e in items) + b"]}")
        if len(items) <= _LIST_CHUNK:
            return self._json(head + b",".join(e.raw for e in items) + b"]}")
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(head)
        for i in range(0, len(items), _LIST_CHUNK):
            chunk = b",".join(e.raw for e in items[i : i + _LIST_CHUNK])
            await resp.write(chunk if i == 0 else b"," + chunk)
        await resp.write(b"]}")
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------------------- WATCH

    async def _watch(
        self,
        request: web.Request,
        rt: ResourceType,
        route: _Route,
        field_selector: str,
        partial: bool = False,
    ) -> web.StreamResponse:
        q = request.query
        rv, rvm = q.get("resourceVersion", ""), q.get("resourceVersionMatch", "")
        bookmarks = _bool(q.get("allowWatchBookmarks"))
        sie_raw = q.get("sendInitialEvents")
        sie = None if sie_raw is None else _bool(sie_raw)
        causes = []
        if sie is not None:
            if rvm != "NotOlderThan":
                causes.append(
                    (
                        "resourceVersionMatch",
                        "Forbidden",
                        "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    )
                )
            if sie and not bookmarks:
                causes.append(
                    (
                        "allowWatchBookmarks",
                        "Forbidden",
                        "sendInitialEvents requires setting allowWatchBookmarks to true",
                    )
                )
        if rvm:
            if sie is None:
                causes.append(
                    (
                        "resourceVersionMatch",
                        "Forbidden",
                        "resourceVersionMatch is "
                        "forbidden for watch unless sendInitialEvents is provided",
                    )
                )
            if rvm != "NotOlderThan":
                causes.append(
                    (
                        "resourceVersionMatch",
                        "FieldValueNotSupported",
                        f'Unsupported value: "{rvm}": supported values: "NotOlderThan"',
                    )
                )
        if causes:
            raise _invalid_list_options(causes)
        flt = self.store.make_filter(
            rt, route.namespace, q.get("labelSelector", ""), field_selector
        )
        timeout = self.watch_timeout * (1 + random.random())  # noqa: S311
        if "timeoutSeconds" in q:
            timeout = float(_int_param(q["timeoutSeconds"], "timeoutSeconds"))
        since: int | None = None
        initial = False
        if sie is not None:
            initial = sie
            if not sie and rv not in ("", "0"):
                since = _rv_param(rv, watch=True)
        elif rv in ("", "0"):
            initial = True  # "Get State and Start at Most Recent/Any": synthetic ADDED events
        else:
            since = _rv_param(rv, watch=True)
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.enable_chunked_encoding()
        try:
            watcher, start_rv = self.store.watch(rt, flt, since, initial=initial)
        except ApiError as err:
            # After admission the real server reports a stale resourceVersion as an ERROR event
            # on a 200 stream (the cacher's errWatcher), not as an HTTP 410.
            await resp.prepare(request)
            await resp.write(b'{"type":"ERROR","object":' + dumps(err.body) + b"}\n")
            await resp.write_eof()
            return resp
        cut = self.faults.take("cut_watch", "GET", request.path, True)
        task = asyncio.current_task()
        if task is not None:
            self._watch_tasks.add(task)
        try:
            await resp.prepare(request)
            init_end = (len(watcher.buffer), start_rv) if sie else None
            await self._pump(resp, watcher, rt, bookmarks, timeout, init_end, cut, partial)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watcher.close()
            if task is not None:
                self._watch_tasks.discard(task)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _pump(
        self,
        resp: web.StreamResponse,
        w: Watcher,
        rt: ResourceType,
        bookmarks: bool,
        duration: float,
        init_end: tuple[int, int] | None,
        cut: Any,
        partial: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        next_bookmark = loop.time() + self.bookmark_interval
        sent = 0
        initial_left = init_end[0] if init_end else -1
        while True:
            while w.buffer:
                line = w.buffer.popleft()
                await resp.write(_partial_event(line) if partial else line)
                sent += 1
                if cut is not None and sent >= cut.events:
                    if cut.abrupt and resp._req is not None and resp._req.transport is not None:
                        resp._req.transport.abort()
                    return
                if initial_left > 0:
                    initial_left -= 1
            if initial_left == 0 and init_end is not None:
                await resp.write(_bookmark(rt, init_end[1], initial_end=True, partial=partial))
                initial_left = -1
            if w.closed:
                return
            now = loop.time()
            if now >= deadline:
                return
            wait = deadline - now
            if bookmarks:
                if now >= next_bookmark:
                    with self.store._lock:
                        rv = self.store.resource_version if not w.buffer else None
                    if rv is not None:
                        await resp.write(_bookmark(rt, rv, partial=partial))
                    next_bookmark = now + self.bookmark_interval
                    continue
                wait = min(wait, next_bookmark - now)
            w.wakeup.clear()
            if w.buffer or w.closed:
                continue
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await w.wakeup.wait()
            if self._stopping.is_set():
                return


def _bookmark(
    rt: ResourceType, rv: int, *, initial_end: bool = False, partial: bool = False
) -> bytes:
    meta: dict[str, Any] = {"resourceVersion": str(rv), "creationTimestamp": None}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    kind, api_version = (
        ("PartialObjectMetadata", "meta.k8s.io/v1") if partial else (rt.kind, rt.api_version)
    )
    obj = {"kind": kind, "apiVersion": api_version, "metadata": meta}
    return b'{"type":"BOOKMARK","object":' + dumps(obj) + b"}\n"


def _is_watch(request: web.Request) -> bool:
    """Whether the server will stream: a /watch/ path, or ?watch on a GET of a collection (a GET
    of one object ignores ?watch, as the real server's named GET handler does)."""
    if request.method != "GET":
        return False
    parts = [p for p in request.path.split("/") if p]
    route = _parse_resource_path(parts) if parts and parts[0] in ("api", "apis") else None
    if route is None:
        return False
    return route.watch or (not route.name and _bool(request.query.get("watch")))


def _bool(value: str | None) -> bool:
    """A boolean query parameter as apimachinery's Convert_Slice_string_To_bool reads it: absent
    is false, and of a present value only "0" and "false" (any case) are false; "", "yes", "no",
    "off" are all true. `request.query.get` gives the first value, as the converter uses."""
    return value is not None and value != "0" and value.lower() != "false"


def _discovery_path(parts: list[str]) -> bool:
    """/api/<v>, /apis/<g>, /apis/<g>/<v>: discovery documents, GET only."""
    return (parts[:1] == ["api"] and len(parts) == 2) or (
        parts[:1] == ["apis"] and len(parts) in (2, 3)
    )


def _check_write_options(method: str, request: web.Request, q: Any) -> None:
    """Create/Update/Patch/DeleteOptions validation: 422, as the real server answers."""
    kind = {"POST": "CreateOptions", "PUT": "UpdateOptions", "PATCH": "PatchOptions"}.get(
        method, "DeleteOptions"
    )
    causes: list[tuple[str, str, str]] = []
    dry = q.getall("dryRun", [])
    if any(v != "All" for v in dry):
        shown = "[]string{" + ", ".join(json.dumps(v) for v in dry) + "}"
        causes.append(
            (
                "dryRun",
                "FieldValueNotSupported",
                f'Unsupported value: {shown}: supported values: "All"',
            )
        )
    if (
        method == "PATCH"
        and request.headers.get("Content-Type", "").split(";")[0].strip() == patch.APPLY
        and not q.get("fieldManager")
    ):
        causes.append(
            ("fieldManager", "FieldValueRequired", "Required value: is required for apply patch")
        )
    if causes:
        raise _invalid_options(kind, causes)


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid value for {name}: {value!r}") from None


def _rv_param(value: str, *, watch: bool = False) -> int:
    try:
        n = int(value)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        invalid = (
            f'resourceVersion: Invalid value: "{value}": strconv.ParseUint: parsing "{value}": '
            "invalid syntax"
        )
        if watch:
            # kube-apiserver 1.37 still answers a watch's with a 500 without a reason.
            raise internal(invalid) from None
        raise bad_request(f"invalid resource version: {invalid}") from None


def _go_json_type(value: object) -> str:
    """How Go's encoding/json names a JSON value's type in an unmarshal error."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "object"


def _too_large(want: int, have: int) -> ApiError:
    return ApiError(
        504,
        f"Too large resource version: {want}, current: {have}",
        reason="Timeout",
        details={
            "causes": [
                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
            ],
            "retryAfterSeconds": 1,
        },
    )


def _invalid_list_options(causes: list[tuple[str, str, str]]) -> ApiError:
    return _invalid_options("ListOptions", causes)


def _invalid_options(kind: str, causes: list[tuple[str, str, str]]) -> ApiError:
    msgs = "; ".join(f"{f}: {m}" for f, _, m in causes)
    if len(causes) > 1:
        msgs = "[" + ", ".join(f"{f}: {m}" for f, _, m in causes) + "]"
    return ApiError(
        422,
        f'{kind}.meta.k8s.io "" is invalid: {msgs}',
        reason="Invalid",
        details={
            "group": "meta.k8s.io",
            "kind": kind,
            "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes],
        },
    )
