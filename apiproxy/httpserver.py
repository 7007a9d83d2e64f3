"""What every HTTP server of `apiproxy serve` shares: answers that do not name their implementation.

aiohttp adds `Server: Python/3.x aiohttp/3.y` to every answer it writes, which tells a stranger
which advisories to read; kube-apiserver sends no `Server` header, and neither do we. Every server
of `apiproxy serve` (the TLS listener in `admission.py`, the probe endpoints of one process and
of the workers' supervisor) builds its requests with `make_request`, whose response writer
removes the header as the head is written: whatever wrote the answer (the pipeline, a refusal,
aiohttp's own 400 for an unparsable head or its 500), it goes out without one. An upstream's own
`Server` header is dropped from forwarded answers too (`forward._DROPPED_RESPONSE_HEADERS`).

`probe_server` is the plain-HTTP `--metrics-listen` endpoints: `/healthz`, `/livez`, `/readyz`,
`/metrics`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


async def _drop_server_header(headers: CIMultiDict[str]) -> None:
    headers.popall(hdrs.SERVER, None)


def make_request(
    message: Any,
    payload: Any,
    protocol: RequestHandler,
    _writer: Any,
    task: asyncio.Task[None],
) -> web.BaseRequest:
    """An aiohttp `request_factory`: the request's answer is written without a `Server` header.

    aiohttp's own writer for the request is replaced by one built the same way plus the
    `on_headers_sent` hook, which sees the head just before it is serialised."""
    loop = asyncio.get_running_loop()
    writer = StreamWriter(protocol, loop, on_headers_sent=_drop_server_header)
    return web.BaseRequest(message, payload, protocol, writer, task, loop)


def probe_server(*, healthz: Handler, readyz: Handler, metrics: Handler) -> web.Server:
    """The --metrics-listen endpoints (one process's, or the workers' supervisor's), GET or
    HEAD; anything else is 404 (unknown path) or 405 (another method)."""
    routes = {"/healthz": healthz, "/livez": healthz, "/readyz": readyz, "/metrics": metrics}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        handler = routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="404: Not Found")
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return web.Response(
                status=405, text="405: Method Not Allowed", headers={hdrs.ALLOW: "GET,HEAD"}
            )
        return await handler(request)

    return web.Server(handle, request_factory=make_request, access_log=None)


__all__ = ["Handler", "make_request", "probe_server"]
