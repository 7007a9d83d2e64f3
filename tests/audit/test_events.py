"""make_event records, field by field, against the audit.k8s.io/v1 Event shape."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from apiproxy.audit import events as ev
from apiproxy.request import classify

MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

# Every top-level key an audit.k8s.io/v1 Event may carry (types.go, json tags).
EVENT_KEYS = {
    "kind",
    "apiVersion",
    "level",
    "auditID",
    "stage",
    "requestURI",
    "verb",
    "user",
    "impersonatedUser",
    "sourceIPs",
    "userAgent",
    "objectRef",
    "responseStatus",
    "requestObject",
    "responseObject",
    "requestReceivedTimestamp",
    "stageTimestamp",
    "annotations",
}


def check_common(e: dict) -> None:
    assert set(e) <= EVENT_KEYS
    assert e["kind"] == "Event"
    assert e["apiVersion"] == "audit.k8s.io/v1"
    assert e["level"] == "Metadata"
    assert "requestObject" not in e
    assert "responseObject" not in e
    assert MICRO.match(e["requestReceivedTimestamp"])
    assert MICRO.match(e["stageTimestamp"])
    assert all(isinstance(v, str) for v in e.get("annotations", {}).values())
    assert json.loads(json.dumps(e)) == e


def test_allowed_list(synth):
    e = synth.allowed_list(namespace="istio-system")
    check_common(e)
    assert e["auditID"] == "00000000-0000-4000-8000-000000000001"
    assert e["stage"] == "ResponseComplete"
    assert e["requestURI"] == "/api/v1/namespaces/istio-system/services?limit=500"
    assert e["verb"] == "list"
    assert e["user"] == {
        "username": "peer:cluster-b",
        "groups": ["apiproxy:peers"],
        "extra": {
            "apiproxy.io/authenticated-by": ["mtls"],
            "apiproxy.io/certificate-subject": ["CN=istiod.cluster-b"],
            "apiproxy.io/cluster-uuid": ["uuid-cluster-b"],
        },
    }
    assert e["sourceIPs"] == ["10.0.0.7"]
    assert e["userAgent"] == "pilot-discovery/1.24.0"
    # Empty ObjectReference fields are omitted (omitempty), as Kubernetes writes them.
    assert e["objectRef"] == {
        "resource": "services",
        "namespace": "istio-system",
        "apiVersion": "v1",
    }
    assert e["responseStatus"] == {"metadata": {}, "code": 200}
    assert e["requestReceivedTimestamp"] == "2026-11-26T02:12:32.123456Z"
    assert e["stageTimestamp"] == "2026-11-26T02:12:32.126456Z"
    assert e["annotations"] == {
        "authorization.k8s.io/decision": "allow",
        "authorization.k8s.io/reason": "rule istio-endpoint-discovery",
        "apiproxy.io/rule": "istio-endpoint-discovery",
        "apiproxy.io/bytes-sent": "1234",
    }


def test_allowed_watch_has_both_stages(synth):
    started, done = synth.watch(seconds=90.5, events=7)
    for e in (started, done):
        check_common(e)
        assert e["verb"] == "watch"
        assert e["objectRef"] == {
            "resource": "endpointslices",
            "apiGroup": "discovery.k8s.io",
            "apiVersion": "v1",
        }
        assert e["responseStatus"]["code"] == 200
    assert started["auditID"] == done["auditID"]
    assert started["requestReceivedTimestamp"] == done["requestReceivedTimestamp"]
    assert started["stage"] == "ResponseStarted"
    assert done["stage"] == "ResponseComplete"
    assert started["stageTimestamp"] < done["stageTimestamp"]
    assert "apiproxy.io/bytes-sent" not in started["annotations"]
    assert done["annotations"]["apiproxy.io/watch-events"] == "7"
    assert done["annotations"]["apiproxy.io/watch-duration-seconds"] == "90.5"
    assert done["annotations"]["apiproxy.io/bytes-sent"] == "50000"
    assert started["annotations"]["authorization.k8s.io/decision"] == "allow"


def test_denied_request(synth):
    e = synth.denied(verb="get", resource="configmaps", namespace="istio-system", name="istio")
    check_common(e)
    assert e["requestURI"] == "/api/v1/namespaces/istio-system/configmaps/istio"
    assert e["objectRef"] == {
        "resource": "configmaps",
        "namespace": "istio-system",
        "name": "istio",
        "apiVersion": "v1",
    }
    assert e["responseStatus"] == {
        "metadata": {},
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
    }
    assert e["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert e["annotations"]["authorization.k8s.io/reason"] == "no rule matched"
    assert "apiproxy.io/rule" not in e["annotations"]  # None values are dropped


def test_authentication_failure(synth):
    e = synth.authn_failure("client-certificate-untrusted")
    check_common(e)
    assert e["user"]["username"] == "system:anonymous"
    assert e["user"]["groups"] == ["system:unauthenticated"]
    assert e["user"]["extra"] == {"apiproxy.io/certificate-subject": ["CN=mallory"]}
    assert e["responseStatus"]["code"] == 401
    assert e["responseStatus"]["reason"] == "Unauthorized"
    assert e["annotations"]["apiproxy.io/authn-failure"] == "client-certificate-untrusted"
    assert e["annotations"]["authorization.k8s.io/decision"] == "forbid"


def test_non_resource_request_has_no_object_ref():
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    e = ev.make_event(
        audit_id="a1",
        stage="ResponseComplete",
        request_uri="/version",
        verb="get",
        username="peer:x",
        groups=["apiproxy:peers"],
        extra=None,
        source_ips=[],
        user_agent="",
        object_ref=None,
        code=200,
        received=at,
        stage_time=at,
        annotations={},
    )
    check_common(e)
    for absent in ("objectRef", "sourceIPs", "userAgent", "annotations"):
        assert absent not in e
    assert "extra" not in e["user"]
    assert e["requestReceivedTimestamp"] == "2026-01-02T03:04:05.000000Z"


def test_credentials_never_reach_the_record(synth):
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    at = synth.tick()
    e = ev.make_event(
        audit_id="a2",
        stage="ResponseComplete",
        request_uri=f"/api/v1/pods?access_token={jwt}&limit=5&token=abc&labelSelector=a%3Db",
        verb="list",
        username="system:anonymous",
        groups=[],
        extra={ev.EXTRA_TOKEN_SUBJECT: ["spiffe://b/istiod"]},
        source_ips=["127.0.0.1"],
        user_agent=f"evil Bearer {jwt}",
        object_ref=ev.object_ref(resource="pods"),
        code=401,
        received=at,
        stage_time=at,
        annotations={ev.AUTHN_FAILURE: f"bad token {jwt}"},
    )
    text = json.dumps(e)
    assert jwt not in text
    assert "abc" not in text
    assert e["requestURI"] == (
        "/api/v1/pods?access_token=REDACTED&limit=5&token=REDACTED&labelSelector=a%3Db"
    )


def test_timestamps_are_rfc3339_utc_micro():
    east = timezone(timedelta(hours=2))
    assert ev.format_time(datetime(2026, 11, 26, 4, 12, 31, 123456, tzinfo=east)) == (
        "2026-11-26T02:12:31.123456Z"
    )
    assert ev.format_time("2026-11-26T02:12:31.123456789Z") == "2026-11-26T02:12:31.123456Z"
    assert ev.format_time(0.5) == "1970-01-01T00:00:00.500000Z"
    with pytest.raises(ValueError, match="time zone"):
        ev.parse_time("2026-11-26T02:12:31")


@pytest.mark.parametrize(
    "value",
    [
        0,
        0.5,
        1_764_123_151,
        1_764_123_151.000001,
        1_764_123_151.999999,
        1_764_123_151.1234565,
        4_102_444_799.999999,
        datetime(2026, 11, 26, 2, 12, 31),  # naive: UTC, no microseconds
        datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-11))),
        datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        "2026-11-26T02:12:31Z",
        "2026-11-26T02:12:31.5+05:30",
    ],
)
def test_format_time_is_the_strftime_spelling(value):
    """isoformat replaced strftime on the hot path: the text must not change."""
    if isinstance(value, str):
        moment = ev.parse_time(value)
    elif isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        moment = datetime.fromtimestamp(value, UTC)
    assert ev.format_time(value) == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_unknown_stage_is_rejected(synth):
    with pytest.raises(ValueError, match="stage"):
        ev.make_event(
            audit_id="a",
            stage="RequestReceived",
            request_uri="/",
            verb="get",
            username="u",
            groups=[],
            extra=None,
            source_ips=[],
            user_agent="",
            object_ref=None,
            code=200,
            received=0.0,
            stage_time=0.0,
            annotations={},
        )


def test_object_ref_from_request_info():
    info = classify("GET", "/api/v1/namespaces/default/pods/p/status")
    assert ev.object_ref_from_info(info) == {
        "resource": "pods",
        "namespace": "default",
        "name": "p",
        "apiVersion": "v1",
        "subresource": "status",
    }
    assert ev.object_ref_from_info(classify("GET", "/healthz")) is None
