"""Property: what reaches the upstream is exactly what the policy allows, byte for byte.

Hypothesis generates request targets from kube-apiserver path pieces, tricky segments and query
parameters, sends them through the real proxy over TLS, and checks against an independent oracle
(the Go model in goview.py plus the policy): a request reaches the upstream only if kube-apiserver's
reading of it is allowed, and then with the very target bytes the client sent.

More examples: `HARDENING_EXAMPLES=20000 .venv/bin/pytest tests/hardening/test_property.py`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apiproxy.request import RequestRejected, classify
from tests.hardening.conftest import HWorld, Stack, start_stack, stop_stack
from tests.hardening.goview import GoParseError, go_request_info

T = TypeVar("T")
EXAMPLES = int(os.environ.get("HARDENING_EXAMPLES", "300"))

SEGMENTS = [
    "api", "apis", "v1", "v1beta1", "namespaces", "istio-system", "x", "debug", "default",
    "pods", "configmaps", "istio", "other", "secrets", "watch", "proxy", "status", "finalize",
    "exec", "log", "eviction", "discovery.k8s.io", "endpointslices", "nodes", "services",
    "endpoints", "version", "apps", "deployments", "Pods", "PODS",
    ".", "..", "", "%2F", "%2f", "%2e%2e", "%2e", "%252F", "a;b", ";", "\\", "..%2F", "%00",
    "%c0%ae", "p%6Fds", "~", "@", "*", "-", "pods:80",
]  # fmt: skip
PARAMS = [
    "watch=1", "watch=0", "watch=", "watch", "watch=false", "watch=FALSE", "watch=f",
    "fieldSelector=metadata.name%3Distio", "fieldSelector=metadata.name=istio",
    "fieldSelector=metadata.name%3Dother", "fieldSelector=metadata.name%3D%3Distio",
    "fieldSelector=metadata.name%3Distio,a%3Db", "fieldSelector=metadata.name!%3Distio",
    "fieldSelector=a%3Db,metadata.name%3Distio", "fieldSelector=metadata.name%3Dist%5C,io",
    "labelSelector=a%3Db", "labelSelector=a+in+(b,c)", "limit=5", "limit=x",
    "resourceVersion=0", "timeoutSeconds=1", "allowWatchBookmarks=true", "%77atch=1",
    "a;b=c", "dryRun=All", "x=%zz", "x=%00", "fieldselector=metadata.name%3Distio", "",
]  # fmt: skip
METHODS = ["GET", "GET", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@st.composite
def targets(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=8))
    if draw(st.booleans()):
        segs = ["api", "v1", *segs] if draw(st.booleans()) else ["apis", *segs]
    path = "/" + "/".join(segs)
    if draw(st.integers(0, 9)) == 0:
        path += draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=6))
    params = draw(st.lists(st.sampled_from(PARAMS), max_size=4))
    return path + ("?" + "&".join(params) if params else "")


@st.composite
def kube_targets(draw: st.DrawFn) -> str:
    """Well-formed kube-apiserver paths, sometimes with one tricky piece swapped in."""
    pick = st.sampled_from
    parts = (
        ["api", "v1"]
        if draw(st.booleans())
        else ["apis", draw(pick(["discovery.k8s.io", "apps", "networking.istio.io", "v1"])), "v1"]
    )
    if draw(st.integers(0, 4)) == 0:
        parts.append(draw(pick(["watch", "proxy"])))
    if draw(st.booleans()):
        parts += ["namespaces", draw(pick(["istio-system", "x", "debug", "default"]))]
    parts.append(
        draw(
            pick(
                [
                    "pods",
                    "configmaps",
                    "services",
                    "endpointslices",
                    "secrets",
                    "nodes",
                    "namespaces",
                    "endpoints",
                    "status",
                ]
            )
        )
    )
    if draw(st.booleans()):
        parts.append(draw(pick(["istio", "p", "other", "n1"])))
        if draw(st.integers(0, 2)) == 0:
            parts.append(draw(pick(["status", "exec", "log", "proxy", "eviction"])))
    if draw(st.integers(0, 3)) == 0:
        parts[draw(st.integers(0, len(parts) - 1))] = draw(pick(SEGMENTS))
    params = draw(st.lists(pick(PARAMS), max_size=3))
    return "/" + "/".join(parts) + ("?" + "&".join(params) if params else "")


def _go_allowed(stack: Stack, peer: str, method: str, target: str) -> bool:
    try:
        info = go_request_info(method, target)
    except GoParseError:
        return False
    return stack.proxy.policy.decide(peer, info).allowed  # type: ignore[arg-type]


class _Threaded:
    """The upstream and the proxy on an event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self, world: HWorld, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack: Stack = self.run(start_stack(world, tmp))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.run(stop_stack(self.stack))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def threaded(hworld: HWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Threaded]:
    t = _Threaded(hworld, tmp_path_factory.mktemp("property"))
    t.stack.up.watch_script = (b'{"type":"ADDED","object":{}}\n',)
    yield t
    t.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(METHODS),
    target=st.one_of(targets(), kube_targets()),
    who=st.sampled_from(["a", "b"]),
)
def test_upstream_receives_exactly_what_the_policy_allows(
    threaded: _Threaded, method: str, target: str, who: str
) -> None:
    stack = threaded.stack
    peer = {"a": "cluster-a", "b": "cluster-b"}[who]
    body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
    before = len(stack.up.requests)
    resp = threaded.run(stack.request(method, target, body=body, who=who))
    arrived = stack.up.requests[before:]
    try:
        info = classify(method, target)
        decision = stack.proxy.policy.decide(peer, info)
    except RequestRejected:
        info, decision = None, None
    event(f"status {resp.status}")
    if arrived:
        assert len(arrived) == 1
        got = arrived[0]
        assert (got.method, got.target, got.body) == (method, target, body)  # byte-exact
        assert _go_allowed(stack, peer, method, target), (
            f"kube-apiserver reads it as denied: {target}"
        )
        assert resp.status == 200
        assert decision is not None
        assert decision.allowed
    else:
        assert resp.status in (400, 403), (resp.status, resp.body[:200])
        if resp.status == 400:
            assert info is None
        else:
            assert decision is not None
            assert not decision.allowed


def test_empty_query_is_forwarded_byte_exact_or_refused(threaded: _Threaded) -> None:
    stack = threaded.stack
    before = len(stack.up.requests)
    resp = threaded.run(stack.request("GET", "/api/v1/pods?"))
    arrived = stack.up.requests[before:]
    if resp.status == 400:
        assert arrived == []
    else:
        assert [r.target for r in arrived] == ["/api/v1/pods?"]
