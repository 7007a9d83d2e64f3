"""Synthetic audit records built with the real `make_event`, shaped like the proxy's own."""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from apiproxy.audit import events as ev

T0 = datetime(2026, 11, 26, 2, 12, 31, 123456, tzinfo=UTC)


class Synth:
    """Builds the records the proxy writes for each kind of request."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.clock = T0

    def _id(self) -> str:
        return f"00000000-0000-4000-8000-{next(self._ids):012d}"

    def tick(self, seconds: float = 1.0) -> datetime:
        self.clock += timedelta(seconds=seconds)
        return self.clock

    @staticmethod
    def user(peer: str) -> dict[str, Any]:
        return {
            "username": ev.peer_username(peer),
            "groups": [ev.PEER_GROUP],
            "extra": {
                ev.EXTRA_AUTHENTICATED_BY: ["mtls"],
                ev.EXTRA_CERT_SUBJECT: [f"CN=istiod.{peer}"],
                ev.EXTRA_CLUSTER_UUID: [f"uuid-{peer}"],
            },
        }

    def request(
        self,
        peer: str,
        verb: str,
        uri: str,
        ref: dict[str, str] | None,
        *,
        code: int = 200,
        decision: str = ev.DECISION_ALLOW,
        rule: str | None = "istio-endpoint-discovery",
        bytes_sent: int = 1234,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        received = at or self.tick()
        return ev.make_event(
            audit_id=self._id(),
            stage=ev.STAGE_RESPONSE_COMPLETE,
            request_uri=uri,
            verb=verb,
            **self.user(peer),
            source_ips=["10.0.0.7"],
            user_agent="pilot-discovery/1.24.0",
            object_ref=ref,
            code=code,
            received=received,
            stage_time=received + timedelta(milliseconds=3),
            annotations={
                ev.DECISION: decision,
                ev.REASON: f"rule {rule}" if decision == ev.DECISION_ALLOW else "no rule matched",
                ev.RULE: rule if decision == ev.DECISION_ALLOW else None,
                ev.BYTES_SENT: bytes_sent,
            },
        )

    def allowed_list(self, peer: str = "cluster-b", namespace: str = "") -> dict[str, Any]:
        uri = f"/api/v1/namespaces/{namespace}/services" if namespace else "/api/v1/services"
        ref = ev.object_ref(resource="services", namespace=namespace, api_version="v1")
        return self.request(peer, "list", uri + "?limit=500", ref)

    def watch(
        self, peer: str = "cluster-b", seconds: float = 1800.0, events: int = 42, code: int = 200
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A watch's ResponseStarted and final records; `code` is the final record's."""
        received = self.tick()
        common: dict[str, Any] = {
            "audit_id": self._id(),
            "request_uri": "/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=7",
            "verb": "watch",
            **self.user(peer),
            "source_ips": ["10.0.0.7"],
            "user_agent": "pilot-discovery/1.24.0",
            "object_ref": ev.object_ref(
                resource="endpointslices", api_group="discovery.k8s.io", api_version="v1"
            ),
            "received": received,
        }
        decision = {
            ev.DECISION: ev.DECISION_ALLOW,
            ev.REASON: "rule istio-endpoint-discovery",
            ev.RULE: "istio-endpoint-discovery",
        }
        started = ev.make_event(
            stage=ev.STAGE_RESPONSE_STARTED,
            code=200,
            stage_time=received + timedelta(milliseconds=2),
            annotations=decision,
            **common,
        )
        done = ev.make_event(
            stage=ev.STAGE_RESPONSE_COMPLETE,
            code=code,
            stage_time=received + timedelta(seconds=seconds),
            annotations={
                **decision,
                ev.BYTES_SENT: 50_000,
                ev.WATCH_EVENTS: events,
                ev.WATCH_DURATION: seconds,
            },
            **common,
        )
        return started, done

    def denied(
        self,
        peer: str = "cluster-b",
        verb: str = "get",
        resource: str = "configmaps",
        namespace: str = "istio-system",
        name: str = "istio",
        group: str = "",
        subresource: str = "",
    ) -> dict[str, Any]:
        prefix = f"/apis/{group}/v1" if group else "/api/v1"
        uri = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{resource}"
        if name:
            uri += f"/{name}"
        if subresource:
            uri += f"/{subresource}"
        if verb == "watch":
            uri += "?watch=true"
        ref = ev.object_ref(
            resource=resource,
            namespace=namespace,
            name=name,
            api_group=group,
            api_version="v1",
            subresource=subresource,
        )
        return self.request(
            peer, verb, uri, ref, code=403, decision=ev.DECISION_FORBID, rule=None, bytes_sent=300
        )

    def authn_failure(self, reason: str = "client-certificate-untrusted") -> dict[str, Any]:
        at = self.tick()
        return ev.make_event(
            audit_id=self._id(),
            stage=ev.STAGE_RESPONSE_COMPLETE,
            request_uri="/api/v1/secrets",
            verb="list",
            username=ev.ANONYMOUS,
            groups=[ev.UNAUTHENTICATED_GROUP],
            extra={ev.EXTRA_CERT_SUBJECT: ["CN=mallory"]},
            source_ips=["192.0.2.9"],
            user_agent="curl/8.5.0",
            object_ref=ev.object_ref(resource="secrets", api_version="v1"),
            code=401,
            received=at,
            stage_time=at + timedelta(milliseconds=1),
            annotations={
                ev.DECISION: ev.DECISION_FORBID,
                ev.REASON: "authentication failed",
                ev.AUTHN_FAILURE: reason,
                ev.BYTES_SENT: 120,
            },
        )


def write_log(
    path: Path, records: Iterable[dict[str, Any] | str], *, compress: bool = False
) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


@pytest.fixture
def synth() -> Synth:
    return Synth()


@pytest.fixture
def log_writer() -> Any:
    return write_log
