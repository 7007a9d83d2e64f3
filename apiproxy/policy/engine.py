"""Decisions from an index compiled once per policy load, so a decision never scans all rules.

Per peer, resource rules are indexed by (verb, apiGroup, resource) where apiGroup may be '*' and
resource may be 'pods/log', '*' or '*/log'; a decision makes at most six dict look-ups and then
checks namespace and name on the few candidates. Non-resource rules are indexed by
(verb, exact path) plus a short per-verb list of prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

from apiproxy.policy.model import NON_RESOURCE_VERBS, RESOURCE_VERBS, Rule
from apiproxy.policy.visibility import Visibility
from apiproxy.request import RequestInfo

__all__ = ["Decision", "Engine", "describe"]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None
    reason: str
    dangerous: bool = False
    view: str = ""  # non-empty: answer with this view (apiproxy.view) instead of forwarding
    # Set by a rule with a `namespaces` mapping: answers are filtered to these namespaces.
    visibility: Visibility | None = None
    projection: str = ""  # set by a rule with `projection`: answers are projected

    @property
    def filters(self) -> bool:
        """The proxy must rewrite the answer (apiproxy/filtering.py), not copy it."""
        return self.visibility is not None or bool(self.projection)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A rule with its set-valued fields ready for O(1) membership tests."""

    priority: tuple[bool, int]  # dangerous rules first (the proxy needs them for upgrades)
    rule: Rule
    any_namespace: bool
    namespaces: frozenset[str]
    names: frozenset[str]

    def admits(self, info: RequestInfo) -> bool:
        if not (self.any_namespace or info.namespace in self.namespaces):
            return False
        return not self.names or info.name in self.names


class _Index:
    def __init__(self, rules: list[tuple[int, Rule]]) -> None:
        self.resource: dict[tuple[str, str, str], list[_Compiled]] = {}
        self.exact: dict[tuple[str, str], list[_Compiled]] = {}
        self.prefixes: dict[str, list[tuple[str, _Compiled]]] = {}
        for position, rule in rules:
            compiled = _Compiled(
                priority=(not rule.dangerous, position),
                rule=rule,
                any_namespace="*" in rule.namespaces,
                namespaces=frozenset(rule.namespaces),
                names=frozenset(rule.resource_names),
            )
            if rule.is_resource_rule:
                verbs = RESOURCE_VERBS if "*" in rule.verbs else rule.verbs
                for verb in verbs:
                    for group in rule.api_groups:
                        for resource in rule.resources:
                            self.resource.setdefault((verb, group, resource), []).append(compiled)
            else:
                verbs = NON_RESOURCE_VERBS if "*" in rule.verbs else rule.verbs
                for verb in verbs:
                    for url in rule.non_resource_urls:
                        if url == "*":
                            self.prefixes.setdefault(verb, []).append(("", compiled))
                        elif url.endswith("*"):
                            self.prefixes.setdefault(verb, []).append((url[:-1], compiled))
                        else:
                            self.exact.setdefault((verb, url), []).append(compiled)
        for bucket in self.resource.values():
            bucket.sort(key=lambda c: c.priority)

    def match(self, info: RequestInfo) -> Rule | None:
        best: _Compiled | None = None
        if info.is_resource_request:
            verb, sub = info.verb, info.subresource
            combined = f"{info.resource}/{sub}" if sub else info.resource
            resources = (combined, "*", f"*/{sub}") if sub else (combined, "*")
            get = self.resource.get
            for group in (info.api_group, "*"):
                for resource in resources:
                    bucket = get((verb, group, resource))
                    if bucket is None:
                        continue
                    for candidate in bucket:  # sorted: the first that admits is this bucket's best
                        if best is not None and candidate.priority >= best.priority:
                            break
                        if candidate.admits(info):
                            best = candidate
                            break
        else:
            for candidate in self.exact.get((info.verb, info.path), ()):
                if best is None or candidate.priority < best.priority:
                    best = candidate
            for prefix, candidate in self.prefixes.get(info.verb, ()):
                if info.path.startswith(prefix) and (
                    best is None or candidate.priority < best.priority
                ):
                    best = candidate
        return None if best is None else best.rule


class Engine:
    def __init__(self, rules: tuple[Rule, ...]) -> None:
        numbered = list(enumerate(rules))
        self._any_peer = _Index([(i, r) for i, r in numbered if "*" in r.peers])
        named = {p for r in rules for p in r.peers if p != "*"}
        self._by_peer = {
            peer: _Index([(i, r) for i, r in numbered if "*" in r.peers or peer in r.peers])
            for peer in named
        }

    def decide(self, peer: str, info: RequestInfo) -> Decision:
        if not peer:
            return Decision(False, None, "denied: the request has no authenticated peer")
        rule = self._by_peer.get(peer, self._any_peer).match(info)
        if rule is None:
            return Decision(
                False, None, f"denied: no rule allows peer {peer!r} to {describe(info)}"
            )
        if rule.view:
            return Decision(
                True,
                rule.name,
                f"allowed by rule {rule.name!r} with an {rule.view} view",
                view=rule.view,
            )
        if rule.filters:
            return Decision(
                True,
                rule.name,
                f"allowed by rule {rule.name!r}",
                rule.dangerous,
                visibility=rule.visibility,
                projection=rule.projection,
            )
        return Decision(True, rule.name, f"allowed by rule {rule.name!r}", rule.dangerous)


def describe(info: RequestInfo) -> str:
    """'list pods in namespace "a"' style text for reasons and audit records."""
    if not info.is_resource_request:
        return f"{info.verb} the non-resource URL {info.path}"
    what = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    group = f"{info.api_group}/{info.api_version}" if info.api_group else info.api_version
    text = f"{info.verb} {what} ({group})"
    if info.name:
        text += f" named {info.name!r}"
    text += f" in namespace {info.namespace!r}" if info.namespace else " cluster-wide"
    return text
