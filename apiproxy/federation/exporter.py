"""The metadata exporter: Deckhouse-compatible public and private documents over HTTP(S).

Public documents need no authentication. The private document needs a JWT with `aud` = our
cluster UUID, `scope` = `private-multicluster` and `sub` = the UUID of a *known peer* (one whose
public metadata this cluster fetched through an IstioMulticluster), signed by that peer's key.
Refusals answer 401 with `Authentication error: <reason>` like Deckhouse's exporter.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from apiproxy import tokens, uuids
from apiproxy.federation.gateways import GatewaySource
from apiproxy.federation.identity import LocalIdentity, RootCASource
from apiproxy.federation.kube import KubeError
from apiproxy.federation.metadata import PRIVATE_SCOPE, spiffe_bundle
from apiproxy.log import get_logger

log = get_logger("apiproxy.federation.exporter")


@dataclass(frozen=True, slots=True)
class KnownPeer:
    name: str
    cluster_uuid: str
    key: tokens.PublicKey


class PeerRegistry:
    """Peers whose public metadata we hold, by IstioMulticluster name. Shared by the exporter
    (who may read our private document) and the controller (which fills it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, KnownPeer] = {}

    def set(self, name: str, cluster_uuid: str, key_pem: str) -> None:
        try:
            key = tokens.load_public_key(key_pem)
        except tokens.TokenError:
            return
        with self._lock:
            self._by_name[name] = KnownPeer(name, uuids.key(cluster_uuid), key)

    def remove(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)

    def replace_all(self, peers: dict[str, tuple[str, str]]) -> None:
        fresh: dict[str, KnownPeer] = {}
        for name, (cluster_uuid, key_pem) in peers.items():
            try:
                fresh[name] = KnownPeer(
                    name, uuids.key(cluster_uuid), tokens.load_public_key(key_pem)
                )
            except tokens.TokenError:
                continue
        with self._lock:
            self._by_name = fresh

    def key_for(self, cluster_uuid: str) -> tokens.PublicKey | None:
        wanted = uuids.key(cluster_uuid)
        with self._lock:
            for peer in self._by_name.values():
                if peer.cluster_uuid == wanted:
                    return peer.key
        return None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)


def _auth_error(reason: str) -> web.Response:
    return web.Response(status=401, text=f"Authentication error: {reason}")


class Exporter:
    def __init__(
        self,
        *,
        identity: LocalIdentity,
        roots: RootCASource,
        gateways: GatewaySource,
        registry: PeerRegistry,
        api_host: str,
    ) -> None:
        self.identity = identity
        self.roots = roots
        self.gateways = gateways
        self.registry = registry
        self.api_host = api_host
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metadata/public/public.json", self.public_json)
        app.router.add_get("/metadata/public/spiffe-bundle-endpoint", self.spiffe)
        app.router.add_get("/metadata/private/multicluster.json", self.private_json)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        # A metadata request in flight at shutdown gets a second, not aiohttp's default minute.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    @property
    def serving(self) -> bool:
        return self._runner is not None and self.port > 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ok.")

    async def _root(self) -> str | None:
        try:
            return await self.roots.get()
        except KubeError as exc:
            log.warning("root_ca_unavailable", error=str(exc))
            return None

    async def public_document(self) -> dict[str, Any] | None:
        root = await self._root()
        if not root:
            return None
        return {
            "clusterUUID": self.identity.cluster_uuid,
            "authnKeyPub": self.identity.public_key_pem,
            "rootCA": root,
            "apiproxyClientCA": self.identity.client_ca.cert_pem,
        }

    async def public_json(self, _request: web.Request) -> web.Response:
        doc = await self.public_document()
        if doc is None:
            return web.Response(status=503, text="the local Istio root CA is not available yet")
        return web.json_response(doc)

    async def spiffe(self, _request: web.Request) -> web.Response:
        root = await self._root()
        if not root:
            return web.Response(status=503, text="the local Istio root CA is not available yet")
        return web.json_response(spiffe_bundle(root))

    async def private_json(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _auth_error("missing bearer token")
        try:
            claims = tokens.verify(
                token.strip(),
                audience=self.identity.cluster_uuid,
                scope=PRIVATE_SCOPE,
                key_for_subject=self.registry.key_for,
            )
        except tokens.TokenError as exc:
            log.info("private_metadata_refused", reason=exc.reason, peer=request.remote)
            return _auth_error(exc.reason)
        try:
            gateways = await self.gateways.get()
        except KubeError as exc:
            log.warning("gateway_discovery_failed", error=str(exc))
            return web.Response(status=503, text="ingress gateway discovery failed")
        log.info("private_metadata_served", subject=claims.subject)
        return web.json_response(
            {
                "clusterUUID": self.identity.cluster_uuid,
                "clusterID": self.identity.cluster_id,
                "networkName": self.identity.network,
                "apiHost": self.api_host,
                "ingressGateways": [g.to_dict() for g in gateways],
            }
        )
