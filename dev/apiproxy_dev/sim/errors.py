"""API errors carrying the Kubernetes `Status` body the server would send."""

from __future__ import annotations

from typing import Any

from apiproxy.status import status
from apiproxy_dev.sim.resources import ResourceType


class ApiError(Exception):
    """A failed API call: `code` is the HTTP status, `body` the `Status` object."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.body = status(code, message, reason=reason, details=details)
        self.headers = headers or {}

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", ""))


def _details(rt: ResourceType, name: str, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name}
    if rt.group:
        d["group"] = rt.group
    d["kind"] = rt.resource
    d.update(extra)
    return d


def qualified(rt: ResourceType) -> str:
    return rt.key


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{qualified(rt)} "{name}" not found', details=_details(rt, name))


def namespace_not_found(name: str) -> ApiError:
    return ApiError(
        404, f'namespaces "{name}" not found', details={"name": name, "kind": "namespaces"}
    )


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        f'{qualified(rt)} "{name}" already exists',
        reason="AlreadyExists",
        details=_details(rt, name),
    )


def conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {qualified(rt)} "{name}": {why}',
        reason="Conflict",
        details=_details(rt, name),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, reason="BadRequest")


def invalid(rt: ResourceType, name: str, message: str, causes: list[dict[str, str]]) -> ApiError:
    kind = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    return ApiError(
        422,
        f'{kind} "{name}" is invalid: {message}',
        reason="Invalid",
        details={**_details(rt, name), "kind": rt.kind, "causes": causes},
    )


def internal(message: str) -> ApiError:
    """A 500 as kube-apiserver sends it for some malformed input: no `reason` in the body."""
    err = ApiError(500, message)
    del err.body["reason"]
    return err


def precondition_failed(rt: ResourceType, name: str, why: str) -> ApiError:
    """A delete precondition that does not hold: 409 naming the Kind, as storage reports it."""
    kind = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    details: dict[str, Any] = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.kind
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {kind} "{name}": {why}',
        reason="Conflict",
        details=details,
    )


def expired(message: str) -> ApiError:
    return ApiError(410, message, reason="Expired")
