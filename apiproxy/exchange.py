"""One request's exchange with the proxy, and the `Recorder` that accounts for it.

An `Exchange` is created when a request arrives and carries everything the pipeline learns about
it: who is calling, what they ask for, what the policy decided, what the client was sent and how
it ended. The pipeline (server.py) ends every exchange in one `finally` with
`Recorder.complete`, which writes exactly one final audit record (`ResponseComplete`) and one
`apiproxy_requests_total` sample, whatever happened: a refusal, a forwarded answer, a stream that
ended, a client that went away (aiohttp cancels the handler), or a bug (500). Every flow gets a
response or an error, never both and never neither, as kube-apiserver's audit filter and
mitmproxy keep it.

The `Recorder` is the only place that builds the proxy's own answers (`Status` bodies), maps
upstream failures to 502/503/504, writes audit records and chooses metric labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from apiproxy import log, status
from apiproxy.audit import AuditWriter
from apiproxy.audit import events as ev
from apiproxy.authn import AuthnFailure, Identity
from apiproxy.metrics import KNOWN_RESOURCES, KNOWN_SUBRESOURCES, Metrics
from apiproxy.policy import Decision
from apiproxy.request import METHOD_VERBS, RequestInfo, RequestRejected, classify

_log = log.get_logger("apiproxy.exchange")

# Code of an exchange whose client went away before it was sent anything (nginx's convention).
CLIENT_CLOSED = 499


class EndReason(enum.StrEnum):
    """How an exchange ended: the closed set of `apiproxy.io/ended-by` values."""

    COMPLETED = "completed"  # the whole answer went out (the proxy's own or the upstream's)
    UPSTREAM = "upstream"  # the upstream ended a watch or an upgraded stream
    CLIENT = "client"  # the client went away before the answer was complete
    UPSTREAM_ERROR = "upstream_error"  # unreachable, timed out, failed, or cut the answer short
    DEADLINE = "deadline"  # a stream reached its longest allowed time
    SHUTDOWN = "shutdown"  # the proxy is stopping
    REVOKED = "revoked"  # a reload withdrew the permission a stream was opened with
    ERROR = "error"  # a bug in the proxy: answered 500


UpstreamFailure = Literal["connect", "timeout", "protocol"]
# The one mapping of upstream failures to answers: metric kind → (code, message, log event).
_UPSTREAM_FAILURES: dict[UpstreamFailure, tuple[int, str, str | None]] = {
    "connect": (503, "upstream API server unreachable", "upstream_unreachable"),
    "timeout": (504, "upstream API server timed out", None),
    "protocol": (502, "upstream API server failed", "upstream_failed"),
}


@dataclass(eq=False, slots=True)
class Exchange:
    audit_id: str
    method: str
    target: str  # the raw request-target, exactly as received and forwarded
    received: float  # wall clock, for the audit record
    started: float  # monotonic, for durations
    source_ip: str
    user_agent: str
    identity: Identity | None = None  # set with `identify`
    peer: str = ""  # the identity's peer name ("" while anonymous)
    info: RequestInfo | None = None
    decision: Decision | None = None  # what the policy said
    allowed: bool | None = None  # the audited decision (a policy "allow" may still be overruled)
    upgrade: bool = False
    streamed: bool = False  # a watch's or upgraded session's head went out
    annotations: dict[str, object] = field(default_factory=dict)
    code: int = 0  # the status the client was sent (0: nothing yet)
    bytes_sent: int = 0
    ended_by: EndReason | None = None
    revoked: str = ""  # why a reload ended this exchange's stream
    latency_observed: bool = False

    @classmethod
    def begin(cls, request: web.BaseRequest) -> Exchange:
        return cls(
            audit_id=str(uuid.uuid4()),
            method=request.method,
            target=request.raw_path,
            received=time.time(),
            started=time.monotonic(),
            source_ip=request.remote or "",
            user_agent=request.headers.get("User-Agent", ""),
        )

    def identify(self, identity: Identity) -> None:
        self.identity = identity
        self.peer = identity.peer.name

    @property
    def verb(self) -> str:
        return self.info.verb if self.info is not None else self.method.lower()

    @property
    def long_lived(self) -> bool:
        """Watches and upgraded sessions: limited and bounded as streams."""
        return self.upgrade or (self.info is not None and self.info.verb == "watch")

    def decide(self, decision: Decision) -> None:
        self.decision = decision
        self.allowed = decision.allowed
        self.annotations[ev.DECISION] = (
            ev.DECISION_ALLOW if decision.allowed else ev.DECISION_FORBID
        )
        self.annotations[ev.REASON] = decision.reason
        self.annotations[ev.RULE] = decision.rule

    def forbid(self, reason: str) -> None:
        """Overrule an allowing decision (the rule that matched stays on record)."""
        self.allowed = False
        self.annotations[ev.DECISION] = ev.DECISION_FORBID
        self.annotations[ev.REASON] = reason

    def end(self, reason: EndReason, code: int | None = None) -> None:
        """Say how the exchange ended; the first word counts (a later cancellation does not turn
        a refusal already made into a client disconnect)."""
        if self.ended_by is None:
            self.ended_by = reason
        if code is not None and not self.code:
            self.code = code


class Recorder:
    """Refusals, stage records, the final record and sample, upstream failures, metric labels."""

    def __init__(self, metrics: Metrics, *, retry_after_seconds: int) -> None:
        self.metrics = metrics
        self.audit: AuditWriter | None = None  # set once the writer has started
        self.retry_after_seconds = retry_after_seconds
        self._policy_resources: frozenset[str] = frozenset()

    def policy_changed(self, resources: frozenset[str]) -> None:
        """Resources the policy names are labelled by name too (a bounded set)."""
        self._policy_resources = resources

    # -- metric labels ----------------------------------------------------------------------

    def labels(self, ex: Exchange) -> tuple[str, str, str]:
        """Metric labels with bounded values: label values must never come from what a caller
        can invent (a path, a method token), or anyone could grow the series without limit.
        Resources outside Kubernetes' built-ins and the policy are `(other)`; the audit log has
        the details."""
        info = ex.info
        if info is None:
            return ex.peer, METHOD_VERBS.get(ex.method, "other"), ""
        if not info.is_resource_request:
            return ex.peer, info.verb, "nonresource"
        known = info.resource in KNOWN_RESOURCES or info.resource in self._policy_resources
        if not known or (info.subresource and info.subresource not in KNOWN_SUBRESOURCES):
            return ex.peer, info.verb, "(other)"
        res = info.resource + (f"/{info.subresource}" if info.subresource else "")
        return ex.peer, info.verb, res

    def _observe_latency(self, ex: Exchange) -> None:
        if not ex.latency_observed:
            ex.latency_observed = True
            peer, verb, res = self.labels(ex)
            self.metrics.child(self.metrics.latency, peer, verb, res).observe(
                time.monotonic() - ex.started
            )

    # -- the proxy's own answers --------------------------------------------------------------

    def refuse(
        self,
        ex: Exchange,
        code: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        ended_by: EndReason = EndReason.COMPLETED,
    ) -> web.Response:
        """A `Status` answer; the exchange ends with it."""
        details: dict[str, object] | None = None
        info = ex.info
        if code == 403 and info is not None and not info.is_resource_request:
            details = {}  # kube-apiserver sends an empty `details` for non-resource refusals
        elif code == 403 and info is not None:
            details = {"kind": info.resource}
            if info.name:
                details["name"] = info.name
            if info.api_group:
                details["group"] = info.api_group
        if code == 429:
            details = {"retryAfterSeconds": self.retry_after_seconds}
        body = status.status_bytes(code, message, details=details)
        resp = web.Response(
            status=code,
            body=body,
            headers={
                "Content-Type": "application/json",
                "Audit-ID": ex.audit_id,
                **(headers or {}),
            },
        )
        if code in (401, 403, 429) or code >= 500:
            _log.info(
                "refused",
                audit_id=ex.audit_id,
                code=code,
                peer=ex.peer or None,
                verb=ex.verb,
                path=info.path if info is not None else None,
                reason=ex.annotations.get(ev.REASON)
                or ex.annotations.get(ev.AUTHN_FAILURE)
                or message,
            )
        ex.bytes_sent = len(body)
        ex.end(ended_by, code)
        return resp

    def forbidden(self, ex: Exchange, suffix: str = "") -> web.Response:
        """403 in kube-apiserver's words (kubectl prints them as `Error from server
        (Forbidden): ...`); the policy's reason is audited, not returned."""
        info = ex.info
        assert info is not None, "only a classified request is forbidden"
        user = ex.identity.peer.username if ex.identity else ev.ANONYMOUS
        if not info.is_resource_request:
            message = f'forbidden: User "{user}" cannot {info.verb} path "{info.path}"'
        else:
            resource = info.resource + (f"/{info.subresource}" if info.subresource else "")
            # kube-apiserver names the group-qualified resource (GroupResource.String()) first.
            qualified = f"{info.resource}.{info.api_group}" if info.api_group else info.resource
            subject = f'{qualified} "{info.name}"' if info.name else qualified
            where = f'the namespace "{info.namespace}"' if info.namespace else "the cluster scope"
            prep = "in" if info.namespace else "at"
            message = (
                f'{subject} is forbidden: User "{user}" cannot {info.verb} resource "{resource}"'
                f' in API group "{info.api_group}" {prep} {where}'
            )
        return self.refuse(ex, 403, message + suffix)

    def refuse_authn(self, ex: Exchange, failure: AuthnFailure) -> web.Response:
        self.metrics.authn_failures.labels(failure.reason).inc()
        ex.annotations[ev.AUTHN_FAILURE] = failure.reason
        with contextlib.suppress(RequestRejected):  # for the record's verb and objectRef
            ex.info = classify(ex.method, ex.target)
        _log.warning(
            "authentication_failed",
            audit_id=ex.audit_id,
            reason=failure.reason,
            certificate_subject=failure.cert_subject,
            source_ip=ex.source_ip,
        )
        return self.refuse(ex, 401, "Unauthorized")

    def upstream_failed(
        self, ex: Exchange, kind: UpstreamFailure, error: str, message: str | None = None
    ) -> web.Response:
        """The upstream could not answer: the metric, the log line and 502/503/504."""
        code, default, event = _UPSTREAM_FAILURES[kind]
        self.metrics.upstream_errors.labels(kind).inc()
        if event is not None:
            _log.warning(event, audit_id=ex.audit_id, error=error)
        return self.refuse(ex, code, message or default, ended_by=EndReason.UPSTREAM_ERROR)

    def upstream_reset(self) -> None:
        """The upstream cut an answer short after its headers."""
        self.metrics.upstream_errors.labels("reset").inc()

    def body_sent(self, ex: Exchange, sent: int, watch_events: int | None = None) -> None:
        """What a forwarded or relayed answer carried to the client."""
        ex.bytes_sent = sent
        m = self.metrics
        if watch_events is not None:
            m.child(m.watch_events, ex.peer).inc(watch_events)
        m.child(m.bytes_sent, ex.peer).inc(sent)

    def upstream_answered(self, ex: Exchange, since: float) -> None:
        self.metrics.child(self.metrics.upstream_latency, ex.verb).observe(time.monotonic() - since)

    def internal_error(self, ex: Exchange, exc: BaseException) -> web.Response | None:
        """A bug: log it loudly; a 500 `Status` unless the client already has an answer's head
        (then None: the caller lets aiohttp drop the connection)."""
        # The traceback as a field, so the log's credential redaction applies to it too.
        _log.error(
            "internal_error",
            audit_id=ex.audit_id,
            error=type(exc).__name__,
            traceback="".join(traceback.format_exception(exc)),
        )
        if ex.code:
            ex.end(EndReason.ERROR)
            return None
        return self.refuse(ex, 500, "internal error in the api-proxy", ended_by=EndReason.ERROR)

    # -- audit records ------------------------------------------------------------------------

    async def started(self, ex: Exchange, code: int) -> None:
        """A stream's head went out: its latency is the time to here; `ResponseStarted`."""
        ex.code = code
        self._observe_latency(ex)
        await self._write(ex, ev.STAGE_RESPONSE_STARTED, code)

    async def complete(self, ex: Exchange) -> None:
        """The one ending of every exchange: the final audit record and the metrics sample."""
        reason = ex.ended_by
        if reason is None:  # every path says how it ended; one that does not is a bug
            _log.error("exchange_end_unknown", audit_id=ex.audit_id)
            reason = EndReason.ERROR
        code = ex.code or (CLIENT_CLOSED if reason is EndReason.CLIENT else 500)
        ex.annotations[ev.BYTES_SENT] = ex.bytes_sent
        ex.annotations[ev.ENDED_BY] = reason.value
        if ex.streamed:
            ex.annotations[ev.STREAM_ENDED_BY] = reason.value
        self._observe_latency(ex)
        peer, verb, res = self.labels(ex)
        decision = "none" if ex.allowed is None else ("allow" if ex.allowed else "forbid")
        self.metrics.child(self.metrics.requests, peer, verb, res, str(code), decision).inc()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The handler is being cancelled (client gone, shutdown): a second cancellation
            # must not lose the record while the writer's queue is full.
            await asyncio.shield(self._write(ex, ev.STAGE_RESPONSE_COMPLETE, code))
        else:
            await self._write(ex, ev.STAGE_RESPONSE_COMPLETE, code)

    async def _write(self, ex: Exchange, stage: str, code: int) -> None:
        if self.audit is None:
            return
        ident = ex.identity
        event = ev.make_event(
            audit_id=ex.audit_id,
            stage=stage,
            request_uri=ex.target,
            verb=ex.verb,
            username=ident.peer.username if ident else ev.ANONYMOUS,
            groups=[ev.PEER_GROUP] if ident else [ev.UNAUTHENTICATED_GROUP],
            extra=ident.extra() if ident else None,
            source_ips=[ex.source_ip] if ex.source_ip else [],
            user_agent=ex.user_agent,
            object_ref=ev.object_ref_from_info(ex.info) if ex.info is not None else None,
            code=code,
            received=ex.received,
            stage_time=time.time(),
            annotations=dict(ex.annotations),
        )
        try:
            await self.audit.write(event)
        except RuntimeError as exc:
            _log.error("audit_write_failed", audit_id=ex.audit_id, error=str(exc))


__all__ = ["CLIENT_CLOSED", "EndReason", "Exchange", "Recorder", "UpstreamFailure"]
