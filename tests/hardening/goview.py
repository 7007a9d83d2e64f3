"""An independent model of how kube-apiserver reads a request: Go's URL parsing plus
k8s.io/apiserver `RequestInfoFactory.NewRequestInfo`, written from the Go sources, not from
apiproxy/request.py. The fuzzer and the property tests compare the proxy's classification with it.

What Go does and the proxy must match (or refuse):
- `url.ParseRequestURI` decodes the path (`%2F` becomes `/`), so kube-apiserver sees the decoded
  path; `splitPath` trims leading and trailing '/' and splits on '/', keeping empty segments;
- `req.URL.Query()` splits on '&', drops pairs containing ';', decodes keys and values
  (`+` is a space) and keeps every value, in order; readers take the first;
- the verb comes from the method (or a `watch`/`proxy` path prefix), list/watch from the `watch`
  parameter (`0`/`false` in any case are false, anything else true), the name from a
  `metadata.name` term of `fieldSelector` for list/watch.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

API_PREFIXES = ("api", "apis")
GROUPLESS = ("api",)
SPECIAL_VERBS = ("proxy", "watch")
NAMESPACE_SUBRESOURCES = ("status", "finalize")
METHOD_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


class GoParseError(Exception):
    """Go would answer 400 (bad escape in the path, or an unusable URL)."""


@dataclass(frozen=True)
class GoInfo:
    is_resource_request: bool
    path: str
    verb: str
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""


def _unhex_ok(s: str) -> bool:
    i = 0
    while i < len(s):
        if s[i] == "%":
            h = s[i + 1 : i + 3]
            if len(h) != 2 or any(c not in "0123456789abcdefABCDEF" for c in h):
                return False
            i += 3
        else:
            i += 1
    return True


def go_path(raw_path: str) -> str:
    if not _unhex_ok(raw_path):
        raise GoParseError("invalid URL escape")
    return unquote_to_bytes(raw_path).decode("utf-8", "surrogateescape")


def go_query(raw_query: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in raw_query.split("&"):
        if pair == "" or ";" in pair:
            continue
        key, _, value = pair.partition("=")
        if not (_unhex_ok(key) and _unhex_ok(value)):
            continue  # Go skips pairs with bad escapes
        k = unquote_to_bytes(key.replace("+", " ")).decode("utf-8", "surrogateescape")
        v = unquote_to_bytes(value.replace("+", " ")).decode("utf-8", "surrogateescape")
        out.setdefault(k, []).append(v)
    return out


def _split_path(path: str) -> list[str]:
    trimmed = path.strip("/")
    return [] if trimmed == "" else trimmed.split("/")


def _valid_path_segment_name(name: str) -> bool:
    # k8s.io/apimachinery/pkg/api/validation/path.IsValidPathSegmentName
    return name not in (".", "..") and "/" not in name and "%" not in name


def _split_unescaped(text: str, sep: str) -> list[str]:
    out, cur, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if text[i] == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    out.append("".join(cur))
    return out


def _split_term(term: str) -> tuple[str, str, str] | None:
    # fields.splitTerm: the first unescaped position where "!=", "==" or "=" starts
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], op, term[i + len(op) :]
        i += 1
    return None


def _unescape_value(value: str) -> str | None:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                return None  # Go: invalid escape → the selector does not parse
            out.append(value[i + 1])
            i += 2
            continue
        if value[i] in ",=":
            return None
        out.append(value[i])
        i += 1
    return "".join(out)


def _name_from_field_selector(selector: str) -> str:
    """`fields.ParseSelector(s).RequiresExactMatch("metadata.name")`: a `metadata.name=X` (or
    `==`) term anywhere in the AND pins the name; an unparsable selector pins nothing."""
    name = ""
    for term in _split_unescaped(selector, ","):
        if term == "":
            continue
        split = _split_term(term)
        if split is None:
            return ""
        lhs, op, rhs = split
        value = _unescape_value(rhs)
        if value is None:
            return ""
        if lhs == "metadata.name" and op in ("=", "==") and not name:
            name = value
    return name


def go_request_info(method: str, target: str) -> GoInfo:
    if not target.startswith("/"):
        raise GoParseError("not origin-form")
    raw_path, _, raw_query = target.partition("?")
    path = go_path(raw_path)
    query = go_query(raw_query)
    nonresource = GoInfo(False, path, method.lower())
    parts = _split_path(path)
    if len(parts) < 3 or parts[0] not in API_PREFIXES:
        return nonresource
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix not in GROUPLESS:
        if len(parts) < 3:
            return nonresource
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]
    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            raise GoParseError("unable to determine kind and namespace")
        verb, parts = parts[0], parts[1:]
    else:
        verb = METHOD_VERBS.get(method, "")
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    subresource = name = resource = ""
    if len(parts) >= 3 and verb != "proxy":
        subresource = parts[2]
    if len(parts) >= 2:
        name = parts[1]
    if len(parts) >= 1:
        resource = parts[0]
    if name == "" and verb == "get":
        watch = query.get("watch", [])
        is_watch = bool(watch) and watch[0].lower() not in ("0", "false")
        verb = "watch" if is_watch else "list"
        selectors = query.get("fieldSelector", [])
        if selectors:
            pinned = _name_from_field_selector(selectors[0])
            if pinned and _valid_path_segment_name(pinned):
                name = pinned
    if name == "" and verb == "delete":
        verb = "deletecollection"
    return GoInfo(True, path, verb, group, version, namespace, resource, subresource, name)


def compare(proxy_info: object, go: GoInfo) -> list[str]:
    """Differences that would let the proxy authorize one thing and kube-apiserver do another.
    The proxy may narrow the name to "" (it only pins single-term selectors)."""
    diffs = []
    for f in (
        "is_resource_request",
        "path",
        "verb",
        "api_group",
        "api_version",
        "namespace",
        "resource",
        "subresource",
    ):
        mine, theirs = getattr(proxy_info, f), getattr(go, f)
        if mine != theirs:
            diffs.append(f"{f}: proxy {mine!r} != go {theirs!r}")
    mine_name = getattr(proxy_info, "name")  # noqa: B009
    if mine_name not in ("", go.name):
        diffs.append(f"name: proxy {mine_name!r} != go {go.name!r}")
    return diffs
