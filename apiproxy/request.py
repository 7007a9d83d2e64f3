"""Classify (HTTP method, raw request-target) exactly as kube-apiserver's RequestInfoFactory does.

The classification is done on the very bytes the proxy forwards. Any target that another parser
could read differently (dot or empty segments, percent-encoded path bytes, path parameters,
backslashes, fragments, absolute-form, conflicting repeated parameters, ...) is refused with
RequestRejected instead of being "cleaned up": cleaning would make us authorize one request and
forward another.

Deliberate differences from k8s.io/apiserver (all of them refuse or narrow, never widen):
- methods other than GET, HEAD, POST, PUT, PATCH, DELETE are refused (the reference maps them to
  the verb "" on resource paths and to the lowercased method on non-resource paths);
- a repeated fieldSelector or labelSelector is refused (the reference silently takes the first);
- a `watch` parameter is refused where kube-apiserver ignores it (named GETs, writes, the legacy
  /watch/ path prefix), so no reader can mistake a single GET for a watch;
- the name is taken from `fieldSelector` only when the selector is the single term
  `metadata.name=X` (or `==`); the reference also accepts it inside a larger AND. Leaving the
  name empty can only make a resourceNames rule fail to match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = ["METHOD_VERBS", "RequestInfo", "RequestRejected", "classify"]

METHOD_VERBS: dict[str, str] = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_API_PREFIXES = frozenset({"api", "apis"})
_GROUPLESS_PREFIXES = frozenset({"api"})
_SPECIAL_VERBS = frozenset({"proxy", "watch"})
_SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_VERBS_WITH_SELECTORS = frozenset({"list", "watch", "deletecollection"})

# RFC 3986 pchar without '%' (no percent-encoding in paths) and ';' (path parameters).
_PATH_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
# Query characters without ';' (Go drops pairs containing it; other parsers split on it).
_QUERY_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/?%]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_KEY_OK = re.compile(r"[A-Za-z0-9._~-]+")
# Values of the parameters we interpret: printable ASCII (space allowed: "app in (a,b)").
_INTERPRETED_VALUE_OK = re.compile(r"[\x20-\x7e]*")
# `metadata.name=X` as a single term; X is a plain object name (no selector escapes or operators).
_NAME_SELECTOR = re.compile(r"metadata\.name==?([A-Za-z0-9][A-Za-z0-9._:@-]*)")
_INTERPRETED_KEYS = frozenset({"watch", "fieldSelector", "labelSelector"})


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The Kubernetes view of a request; field meanings follow k8s.io/apiserver RequestInfo."""

    is_resource_request: bool
    path: str
    verb: str
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: tuple[str, ...] = ()
    field_selector: str = ""
    label_selector: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "isResourceRequest": self.is_resource_request,
            "path": self.path,
            "verb": self.verb,
            "apiPrefix": self.api_prefix,
            "apiGroup": self.api_group,
            "apiVersion": self.api_version,
            "namespace": self.namespace,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
            "parts": list(self.parts),
            "fieldSelector": self.field_selector,
            "labelSelector": self.label_selector,
        }


class RequestRejected(ValueError):
    """The target is malformed or could be read two ways; the proxy answers 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _go_bool(value: str) -> bool:
    # apimachinery Convert_Slice_string_To_bool: "0" and "false" (any case) are false, all else
    # (including the empty value of `?watch`) is true. Values are ASCII here, so folding is exact.
    return not (value == "0" or value.lower() == "false")


def _decode(key: str, raw: str) -> str:
    """Decode one query value the way Go's url.QueryUnescape does ('+' is a space)."""
    data = unquote_to_bytes(raw.replace("+", " "))
    try:
        value = data.decode("ascii")
    except UnicodeDecodeError:
        raise RequestRejected(
            f"The query parameter {key!r} decodes to non-ASCII bytes, which this proxy does "
            "not accept in parameters it interprets."
        ) from None
    if not _INTERPRETED_VALUE_OK.fullmatch(value):
        raise RequestRejected(
            f"The query parameter {key!r} decodes to control characters, which this proxy "
            "does not accept."
        )
    return value


def _parse_query(query: str) -> dict[str, list[str]]:
    """Return decoded values of the parameters we interpret; validate every other pair."""
    found: dict[str, list[str]] = {}
    if query == "":
        return found
    if ";" in query:
        raise RequestRejected(
            "The query contains ';', which some parsers treat as a separator and Go drops; "
            "use '&' between parameters."
        )
    if not _QUERY_OK.fullmatch(query):
        bad = next(c for c in query if not _QUERY_OK.fullmatch(c))
        raise RequestRejected(f"The query contains the character {bad!r}, which must be encoded.")
    if _BAD_PERCENT.search(query):
        raise RequestRejected(
            "The query contains a '%' that is not followed by two hexadecimal digits."
        )
    for pair in query.split("&"):
        if pair == "":
            raise RequestRejected("The query contains an empty parameter ('&&' or a stray '&').")
        key, _, raw = pair.partition("=")
        if not _QUERY_KEY_OK.fullmatch(key):
            raise RequestRejected(
                f"The query parameter name {key!r} is not accepted: names must be plain "
                "letters, digits, '.', '_', '~' or '-', without percent-encoding."
            )
        if key in _INTERPRETED_KEYS:
            found.setdefault(key, []).append(_decode(key, raw))
    for key in ("fieldSelector", "labelSelector"):
        if len(found.get(key, ())) > 1:
            raise RequestRejected(
                f"The query repeats {key}; parsers disagree on which one applies, so send it once."
            )
    watch = found.get("watch", [])
    if len({_go_bool(v) for v in watch}) > 1:
        raise RequestRejected("The query repeats 'watch' with values that disagree.")
    return found


def _check_path(path: str) -> list[str]:
    if "%" in path:
        raise RequestRejected(
            "The path contains percent-encoded characters; this proxy only accepts paths that "
            "read the same before and after decoding."
        )
    if "\\" in path:
        raise RequestRejected("The path contains a backslash, which some servers read as '/'.")
    if ";" in path:
        raise RequestRejected(
            "The path contains ';' (a path parameter), which servers interpret differently."
        )
    if not _PATH_OK.fullmatch(path):
        bad = next(c for c in path if not _PATH_OK.fullmatch(c))
        raise RequestRejected(f"The path contains the character {bad!r}, which is not accepted.")
    if path == "/":
        return []
    segments = path[1:].split("/")
    for segment in segments:
        if segment == "":
            raise RequestRejected(
                "The path contains an empty segment ('//' or a trailing '/'), which servers "
                "normalize differently."
            )
        if segment in (".", ".."):
            raise RequestRejected(
                f"The path contains a {segment!r} segment, which servers normalize differently."
            )
    return segments


def classify(method: str, target: str) -> RequestInfo:
    """Classify a request; raise RequestRejected when it is malformed or ambiguous."""
    if method not in METHOD_VERBS:
        raise RequestRejected(
            f"The HTTP method {method[:20]!r} is not supported; only GET, HEAD, POST, PUT, "
            "PATCH and DELETE are."
        )
    if target == "":
        raise RequestRejected("The request target is empty.")
    for ch in target:
        if not "\x21" <= ch <= "\x7e":
            raise RequestRejected(
                "The request target contains a space, control or non-ASCII character "
                f"(U+{ord(ch):04X})."
            )
    if not target.startswith("/"):
        raise RequestRejected(
            "The request target must be a path starting with '/'; absolute-form "
            "('http://host/...'), authority-form and '*' targets are not accepted."
        )
    if "#" in target:
        raise RequestRejected(
            "The request target contains a fragment ('#'), which clients never send."
        )
    path, has_query, query = target.partition("?")
    if has_query and not query:
        # URL libraries drop a bare '?', so what is forwarded would differ from what was read.
        raise RequestRejected("The request target ends with an empty query ('?').")
    segments = _check_path(path)
    params = _parse_query(query) if has_query else {}
    return _resolve(method, path, segments, params)


def _resolve(method: str, path: str, parts: list[str], params: dict[str, list[str]]) -> RequestInfo:
    # Non-resource unless proven otherwise (same order of tests as NewRequestInfo).
    nonresource = RequestInfo(is_resource_request=False, path=path, verb=method.lower())
    if len(parts) < 3 or parts[0] not in _API_PREFIXES:
        return nonresource
    api_prefix, rest = parts[0], parts[1:]
    api_group = ""
    if api_prefix not in _GROUPLESS_PREFIXES:
        if len(rest) < 3:
            return nonresource
        api_group, rest = rest[0], rest[1:]
    api_version, rest = rest[0], rest[1:]

    verb_via_path = False
    if rest[0] in _SPECIAL_VERBS:
        if len(rest) < 2:
            raise RequestRejected(
                f"The path ends at the special verb {rest[0]!r}; a resource must follow it."
            )
        verb, rest = rest[0], rest[1:]
        verb_via_path = True
    else:
        verb = METHOD_VERBS[method]

    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]

    subresource = name = resource = ""
    if len(rest) >= 3 and verb not in _SPECIAL_VERBS_NO_SUBRESOURCES:
        subresource = rest[2]
    if len(rest) >= 2:
        name = rest[1]
    resource = rest[0]

    watch_values = params.get("watch")
    listing = name == "" and verb == "get"
    if watch_values is not None and not listing:
        raise RequestRejected(
            "The 'watch' parameter is only meaningful on a GET of a collection; kube-apiserver "
            "ignores it here, so it is refused to avoid reading this request as a watch."
        )
    field_values = params.get("fieldSelector", [])
    if listing:
        verb = "watch" if watch_values and _go_bool(watch_values[0]) else "list"
        if field_values:
            pinned = _NAME_SELECTOR.fullmatch(field_values[0])
            if pinned:
                name = pinned.group(1)
    if name == "" and verb == "delete":
        verb = "deletecollection"

    field_selector = label_selector = ""
    if not verb_via_path and verb in _VERBS_WITH_SELECTORS:
        field_selector = field_values[0] if field_values else ""
        label_values = params.get("labelSelector", [])
        label_selector = label_values[0] if label_values else ""

    return RequestInfo(
        is_resource_request=True,
        path=path,
        verb=verb,
        api_prefix=api_prefix,
        api_group=api_group,
        api_version=api_version,
        namespace=namespace,
        resource=resource,
        subresource=subresource,
        name=name,
        parts=tuple(rest),
        field_selector=field_selector,
        label_selector=label_selector,
    )
