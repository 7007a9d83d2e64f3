"""audit.k8s.io/v1 `Event` records (level Metadata), as the kube-apiserver writes them.

Field names and order follow k8s.io/apiserver/pkg/apis/audit/v1/types.go. Only metadata is ever
recorded: no request or response bodies, no credentials. User-supplied strings that could quote a
credential (the user agent, annotation values) are passed through `apiproxy.log.redact_text`, and
query parameters named like a token are replaced in `requestURI`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Final
from urllib.parse import unquote

from apiproxy.log import redact_text
from apiproxy.request import RequestInfo
from apiproxy.status import REASONS

API_VERSION: Final = "audit.k8s.io/v1"
KIND: Final = "Event"
LEVEL: Final = "Metadata"

STAGE_RESPONSE_STARTED: Final = "ResponseStarted"
STAGE_RESPONSE_COMPLETE: Final = "ResponseComplete"
STAGES: Final = frozenset({STAGE_RESPONSE_STARTED, STAGE_RESPONSE_COMPLETE})  # what we write
# Stages kube-apiserver writes too; `audit summarize`/`report` read its logs as well.
STAGE_REQUEST_RECEIVED: Final = "RequestReceived"
STAGE_PANIC: Final = "Panic"
# A request's last record: it is over, whichever way it ended.
FINAL_STAGES: Final = frozenset({STAGE_RESPONSE_COMPLETE, STAGE_PANIC})

# Annotation keys: every key the proxy writes (listed in docs/audit.md).
DECISION: Final = "authorization.k8s.io/decision"
REASON: Final = "authorization.k8s.io/reason"
RULE: Final = "apiproxy.io/rule"
BYTES_SENT: Final = "apiproxy.io/bytes-sent"
ENDED_BY: Final = "apiproxy.io/ended-by"
WATCH_EVENTS: Final = "apiproxy.io/watch-events"
WATCH_DURATION: Final = "apiproxy.io/watch-duration-seconds"
STREAM_ENDED_BY: Final = "apiproxy.io/stream-ended-by"
VIEW: Final = "apiproxy.io/view"  # `empty`: the proxy answered itself (policy `view: empty`)
UPGRADE: Final = "apiproxy.io/upgrade"
BYTES_RECEIVED: Final = "apiproxy.io/bytes-received"
STREAM_DURATION: Final = "apiproxy.io/stream-duration-seconds"
AUTHN_FAILURE: Final = "apiproxy.io/authn-failure"
# The answer was rewritten under a rule with a namespaces mapping and/or a projection:
# "namespaces,projection=istiod-pod", "projection=strip", ...
FILTERED: Final = "apiproxy.io/filtered"
ITEMS_HIDDEN: Final = "apiproxy.io/items-hidden"  # objects or events withheld by filtering
# Why a filtered watch was answered or ended with 410 Expired (its visible namespaces changed).
FILTER_EXPIRED: Final = "apiproxy.io/filter-expired"
DECISION_ALLOW: Final = "allow"
DECISION_FORBID: Final = "forbid"

# user.extra keys (pinned).
EXTRA_AUTHENTICATED_BY: Final = "apiproxy.io/authenticated-by"
EXTRA_CERT_SUBJECT: Final = "apiproxy.io/certificate-subject"
EXTRA_TOKEN_SUBJECT: Final = "apiproxy.io/token-subject"  # noqa: S105 - a key name
EXTRA_CLUSTER_UUID: Final = "apiproxy.io/cluster-uuid"

PEER_PREFIX: Final = "peer:"
PEER_GROUP: Final = "apiproxy:peers"
ANONYMOUS: Final = "system:anonymous"
UNAUTHENTICATED_GROUP: Final = "system:unauthenticated"

_OBJECT_REF_KEYS: Final = (
    "resource",
    "namespace",
    "name",
    "uid",
    "apiGroup",
    "apiVersion",
    "resourceVersion",
    "subresource",
)

# Query parameter names whose values are credentials (`token`, `access_token`, `id_token`, ...).
_SECRET_PARAM = re.compile(r"token|password|secret|jwt|bearer|authorization", re.IGNORECASE)
REDACTED_PARAM: Final = "REDACTED"


Timestamp = datetime | float | str


def format_time(value: Timestamp) -> str:
    """RFC 3339 UTC with microseconds, as `metav1.MicroTime`: 2026-11-26T02:12:31.123456Z.

    Accepts an aware datetime (any zone), a naive datetime (taken as UTC), a POSIX timestamp, or a
    string already in RFC 3339 (re-normalised)."""
    if isinstance(value, int | float):
        # The hot path (the proxy passes time.time()); a naive UTC datetime formats without an
        # offset, so only the "Z" is appended. isoformat is much cheaper than strftime.
        return (
            datetime.fromtimestamp(value, UTC).replace(tzinfo=None).isoformat("T", "microseconds")
            + "Z"
        )
    if isinstance(value, str):
        value = parse_time(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat("T", "microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (`Z` or an offset, any fraction) into an aware datetime."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    # Python 3.11 accepts only 3 or 6 fraction digits; Kubernetes may write 9 (RFC3339Nano).
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)$", s)
    if m:
        s = f"{m.group(1)}.{m.group(2)[:6].ljust(6, '0')}{m.group(3)}"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return dt.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


def redact_uri(uri: str) -> str:
    """Replace the values of query parameters named like a credential (token, access_token, ...)."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        if _SECRET_PARAM.search(unquote(name.replace("+", " "))):
            parts.append(f"{name}={REDACTED_PARAM}" if eq else name)
        else:
            parts.append(param)
    return f"{path}?{'&'.join(parts)}"


def peer_username(peer: str) -> str:
    return f"{PEER_PREFIX}{peer}"


def peer_of(username: str) -> str | None:
    """The peer name of a `peer:<name>` username, else None (e.g. system:anonymous)."""
    return username[len(PEER_PREFIX) :] if username.startswith(PEER_PREFIX) else None


def object_ref(
    *,
    resource: str = "",
    namespace: str = "",
    name: str = "",
    api_group: str = "",
    api_version: str = "",
    subresource: str = "",
) -> dict[str, str]:
    """An `ObjectReference` with empty fields omitted (`omitempty`)."""
    ref = {
        "resource": resource,
        "namespace": namespace,
        "name": name,
        "apiGroup": api_group,
        "apiVersion": api_version,
        "subresource": subresource,
    }
    return {k: v for k, v in ref.items() if v}


def object_ref_from_info(info: RequestInfo) -> dict[str, str] | None:
    """The `objectRef` of a classified request (None for non-resource requests)."""
    if not info.is_resource_request:
        return None
    return object_ref(
        resource=info.resource,
        namespace=info.namespace,
        name=info.name,
        api_group=info.api_group,
        api_version=info.api_version,
        subresource=info.subresource,
    )


def _status_text(code: int) -> dict[str, object]:
    status: dict[str, object] = {"metadata": {}}
    if code >= 400:
        status["status"] = "Failure"
        reason = REASONS.get(code)
        if reason:
            status["reason"] = reason
    status["code"] = code
    return status


def _annotation_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return redact_text(str(value))


def make_event(
    *,
    audit_id: str,
    stage: str,
    request_uri: str,
    verb: str,
    username: str,
    groups: Iterable[str],
    extra: Mapping[str, Iterable[str]] | None,
    source_ips: Iterable[str],
    user_agent: str,
    object_ref: Mapping[str, str] | None,
    code: int,
    received: Timestamp,
    stage_time: Timestamp,
    annotations: Mapping[str, object],
) -> dict[str, object]:
    """Build one audit.k8s.io/v1 Event (level Metadata) as a JSON-ready dict.

    `object_ref` is None for non-resource requests (use `object_ref()` / `object_ref_from_info()`);
    empty fields are dropped. Annotation values may be str/int/float/bool and are stringified
    (the Kubernetes type is map[string]string); None values are dropped. `extra` values are lists
    of strings. Credentials must never be passed in; as a defence, credential-looking text in the
    user agent, annotations and extra is redacted and token-like query parameters are masked.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, not {stage!r}")
    if not audit_id:
        raise ValueError("audit_id is required")
    user: dict[str, object] = {"username": username, "groups": list(groups)}
    if extra:
        user["extra"] = {
            k: [redact_text(str(v)) for v in values] for k, values in extra.items() if values
        }
    event: dict[str, object] = {
        "kind": KIND,
        "apiVersion": API_VERSION,
        "level": LEVEL,
        "auditID": str(audit_id),
        "stage": stage,
        "requestURI": redact_uri(request_uri),
        "verb": verb,
        "user": user,
    }
    ips = list(source_ips)
    if ips:
        event["sourceIPs"] = ips
    if user_agent:
        event["userAgent"] = redact_text(user_agent)
    if object_ref is not None:
        ref = {k: str(object_ref[k]) for k in _OBJECT_REF_KEYS if object_ref.get(k)}
        if ref:
            event["objectRef"] = ref
    event["responseStatus"] = _status_text(int(code))
    event["requestReceivedTimestamp"] = format_time(received)
    event["stageTimestamp"] = format_time(stage_time)
    notes = {k: _annotation_value(v) for k, v in annotations.items() if v is not None}
    if notes:
        event["annotations"] = notes
    return event


__all__ = [
    "ANONYMOUS",
    "API_VERSION",
    "AUTHN_FAILURE",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DECISION",
    "DECISION_ALLOW",
    "DECISION_FORBID",
    "ENDED_BY",
    "EXTRA_AUTHENTICATED_BY",
    "EXTRA_CERT_SUBJECT",
    "EXTRA_CLUSTER_UUID",
    "EXTRA_TOKEN_SUBJECT",
    "FINAL_STAGES",
    "PEER_GROUP",
    "REASON",
    "RULE",
    "STAGE_PANIC",
    "STAGE_REQUEST_RECEIVED",
    "STAGE_RESPONSE_COMPLETE",
    "STAGE_RESPONSE_STARTED",
    "STREAM_DURATION",
    "STREAM_ENDED_BY",
    "UNAUTHENTICATED_GROUP",
    "UPGRADE",
    "VIEW",
    "WATCH_DURATION",
    "WATCH_EVENTS",
    "format_time",
    "make_event",
    "now",
    "object_ref",
    "object_ref_from_info",
    "parse_time",
    "peer_of",
    "peer_username",
    "redact_uri",
]
