"""A thin dict-in, dict-out layer over kubernetes-asyncio's ApiClient.

The controller manipulates Secrets, ConfigMaps, Leases, Events and custom objects as plain JSON
documents; the generated typed models would only add conversions. Errors surface as
`KubeError` with the HTTP status so callers can tell 404/409 apart from outages.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

Obj = dict[str, Any]

GROUP = "deckhouse.io"
VERSION = "v1alpha1"
PLURAL = "istiomulticlusters"
IMC_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


class KubeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"kube-apiserver answered {status}: {reason}")
        self.status = status
        self.reason = reason


def _reason(exc: ApiException) -> str:
    body: object = exc.body
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str):
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                return str(doc["message"])[:300]
        except ValueError:
            pass
    return str(exc.reason or "error")[:300]


def secret_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/secrets"
    return f"{base}/{name}" if name else base


def configmap_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    return f"{base}/{name}" if name else base


def lease_path(namespace: str, name: str = "") -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def _answered(status: int) -> bool:
    """The kube-apiserver itself answered (a 404 or 409 is an answer; 5xx and 429 are not)."""
    return 0 < status < 500 and status != 429


class Kube:
    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client
        # Monotonic time of the last answer from the kube-apiserver (any request or watch
        # event): /readyz judges reachability from it.
        self.last_answer: float | None = None

    def _seen(self) -> None:
        self.last_answer = time.monotonic()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,  # noqa: ASYNC109 - passed to the client as a request timeout
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            result = await self.api_client.call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=True,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            status = int(exc.status or 0)
            if _answered(status):
                self._seen()
            raise KubeError(status, _reason(exc)) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Transport failures (refused, reset, timed out, disconnected) are KubeError too, so
            # every caller's outage handling covers them; aiohttp's ServerDisconnectedError is
            # not an OSError and used to escape (and kill the leader-election loop).
            raise KubeError(0, f"kube-apiserver unreachable: {type(exc).__name__}") from None
        self._seen()
        return result if isinstance(result, dict) else {}

    async def ping(self, timeout: float = 3.0) -> None:  # noqa: ASYNC109 - a request timeout
        """GET /version (readable by every authenticated user): is the API answering?"""
        await self.request("GET", "/version", timeout=timeout)

    async def get(self, path: str, *, timeout: float = 30.0) -> Obj | None:  # noqa: ASYNC109
        try:
            return await self.request("GET", path, timeout=timeout)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, collection: str, body: Obj, *, timeout: float = 30.0) -> Obj:  # noqa: ASYNC109
        return await self.request("POST", collection, body=body, timeout=timeout)

    async def replace(self, path: str, body: Obj, *, timeout: float = 30.0) -> Obj:  # noqa: ASYNC109
        return await self.request("PUT", path, body=body, timeout=timeout)

    async def merge_patch(self, path: str, body: Obj) -> Obj:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str) -> bool:
        try:
            await self.request("DELETE", path)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list(self, path: str, label_selector: str = "") -> Obj:
        query = [("labelSelector", label_selector)] if label_selector else []
        return await self.request("GET", path, query=query)

    async def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[Obj]:
        """One watch segment from `resource_version`; yields raw watch events until it ends."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        try:
            resp = await self.api_client.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout_seconds + 30,
            )
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), _reason(exc)) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, f"kube-apiserver unreachable: {type(exc).__name__}") from None
        try:
            if resp.status >= 300:
                text = (await resp.read()).decode(errors="replace")
                raise KubeError(resp.status, text[:300])
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                self._seen()
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event
        finally:
            resp.release()
