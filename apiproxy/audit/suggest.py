"""`suggest`: the smallest set of policy rules that would have allowed the policy-denied requests.

Only records with `authorization.k8s.io/decision: forbid` from authenticated peers count
(authentication failures and 400s are not policy questions). Requests are grouped by
(peer, apiGroup, resource/subresource, dangerous?) with verbs and namespaces unioned; groups are
then merged only where the merge grants exactly the union and nothing more:

- resources of one apiGroup with the same peer, verbs and namespaces share a rule (a rule's
  allowed set is the product apiGroups x resources x verbs x namespaces, so with one group and
  identical verbs/namespaces the product is exactly the union);
- identical rule bodies of different peers share a rule with several peers.

Anything the policy loader calls dangerous (verbs other than get/list/watch/head, `secrets`,
subresources proxy/exec/attach/portforward) is emitted COMMENTED OUT with a WARNING and
`dangerous: true`, so the printed file loads as-is and grants nothing dangerous unless an
operator deliberately uncomments it. Reads (get/list/watch) of a dangerous resource the proxy can
answer itself (secrets) are suggested as an active `view: empty` rule instead: the peer's client
syncs and sees no object, and nothing reaches the upstream. Nothing is ever applied automatically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from apiproxy.audit import events as ev
from apiproxy.audit.review import Filter, ReadStats, Rec, iter_parsed
from apiproxy.kinds import KINDS
from apiproxy.policy.model import (
    DANGEROUS_RESOURCES,
    DANGEROUS_SUBRESOURCES,
    NON_RESOURCE_VERBS,
    READ_VERBS,
    RESOURCE_VERBS,
    VIEW_VERBS,
)

MAX_GROUPS: Final = 10_000  # distinct (peer, group, resource) tracked; the rest are reported
MAX_NAMESPACES: Final = 100  # per group; beyond it the suggestion widens to all namespaces

# The policy loader's own syntax for names (apiproxy/policy/model.py), so suggestions load.
_PEER = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_RESOURCE_PART = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_URL = re.compile(r"/[A-Za-z0-9\-._~!$&'()+,=:@/]*")


@dataclass
class Seen:
    """What the denied requests of one group had in common, and where to find them."""

    count: int = 0
    verbs: dict[str, int] = field(default_factory=dict)
    namespaces: set[str] | None = field(default_factory=set)  # None: too many, widen to all
    first: tuple[str, str] = ("", "")  # (timestamp, auditID)
    last: tuple[str, str] = ("", "")

    def add(self, rec: Rec) -> None:
        self.count += 1
        self.verbs[rec.verb] = self.verbs.get(rec.verb, 0) + 1
        if self.namespaces is not None:
            self.namespaces.add(rec.namespace)
            if len(self.namespaces) > MAX_NAMESPACES:
                self.namespaces = None
        stamp = (rec.received, rec.audit_id)
        if not self.first[0] or stamp < self.first:
            self.first = stamp
        if stamp > self.last:
            self.last = stamp

    def merge(self, other: Seen) -> None:
        self.count += other.count
        for verb, n in other.verbs.items():
            self.verbs[verb] = self.verbs.get(verb, 0) + n
        if self.namespaces is None or other.namespaces is None:
            self.namespaces = None
        else:
            self.namespaces |= other.namespaces
        if not self.first[0] or (other.first[0] and other.first < self.first):
            self.first = other.first
        self.last = max(self.last, other.last)


@dataclass
class SuggestedRule:
    name: str
    peers: list[str]
    verbs: list[str]
    api_group: str | None = None  # None for a nonResourceURLs rule
    resources: list[str] = field(default_factory=list)
    namespaces: list[str] | None = None  # None: all namespaces (field omitted)
    non_resource_urls: list[str] = field(default_factory=list)
    dangerous: bool = False
    view: str = ""  # "empty": answered by the proxy (reads of secrets)
    seen: Seen = field(default_factory=Seen)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "peers": self.peers}
        if self.api_group is None:
            out["nonResourceURLs"] = self.non_resource_urls
        else:
            out["apiGroups"] = [self.api_group]
            out["resources"] = self.resources
        out["verbs"] = self.verbs
        if self.api_group is not None and self.namespaces is not None:
            out["namespaces"] = self.namespaces
        if self.dangerous:
            out["dangerous"] = True
        if self.view:
            out["view"] = self.view
        return out


@dataclass
class Suggestion:
    stats: ReadStats
    denied: int = 0
    rules: list[SuggestedRule] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> requests not covered

    @property
    def active(self) -> list[SuggestedRule]:
        return [r for r in self.rules if not r.dangerous]

    @property
    def commented(self) -> list[SuggestedRule]:
        return [r for r in self.rules if r.dangerous]


def _sorted_verbs(verbs: Iterable[str], order: tuple[str, ...]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(set(verbs), key=lambda v: (rank.get(v, len(order)), v))


def _why_unloadable(rec: Rec) -> str | None:
    """A reason this request cannot be expressed in a policy file, or None."""
    if not _PEER.fullmatch(rec.peer):
        return "peer name not valid in a policy"
    if not rec.is_resource:
        if rec.verb not in NON_RESOURCE_VERBS:
            return f"verb {rec.verb!r} unknown for non-resource URLs"
        if not _URL.fullmatch(rec.path) or "//" in rec.path or "/./" in rec.path:
            return "URL not expressible in a policy"
        return None
    if rec.verb not in RESOURCE_VERBS:
        return f"verb {rec.verb!r} unknown for resources"
    if rec.api_group and not _DNS_SUBDOMAIN.fullmatch(rec.api_group):
        return "API group not valid in a policy"
    for part in (rec.resource, rec.subresource):
        if part and not _RESOURCE_PART.fullmatch(part):
            return "resource not valid in a policy"
    if rec.namespace and not _DNS_LABEL.fullmatch(rec.namespace):
        return "namespace not valid in a policy"
    return None


def _mode(rec: Rec) -> str:
    """'' for a plain read rule, 'view' for an empty-view rule, 'dangerous' for the rest."""
    if rec.verb not in READ_VERBS:
        return "dangerous"
    if not rec.is_resource:
        return ""
    if rec.subresource in DANGEROUS_SUBRESOURCES:
        return "dangerous"
    if rec.resource in DANGEROUS_RESOURCES:
        viewable = (
            rec.verb in VIEW_VERBS
            and not rec.subresource
            and (rec.api_group, rec.resource) in KINDS
        )
        return "view" if viewable else "dangerous"
    return ""


GroupKey = tuple[str, bool, str, str, str]  # peer, is_resource, apiGroup, resource|url, mode


def suggest(paths: Iterable[str], flt: Filter | None = None) -> Suggestion:
    flt = flt or Filter()
    result = Suggestion(ReadStats())
    groups: dict[GroupKey, Seen] = {}
    for rec in iter_parsed(paths, result.stats):
        if rec.stage != ev.STAGE_RESPONSE_COMPLETE or not rec.policy_denied:
            continue
        if not flt.peer_ok(rec) or not flt.time_ok(rec):
            continue
        result.denied += 1
        why = _why_unloadable(rec)
        if why is not None:
            result.skipped[why] = result.skipped.get(why, 0) + 1
            continue
        what = rec.resource + (f"/{rec.subresource}" if rec.subresource else "")
        key = (rec.peer, rec.is_resource, rec.api_group, what if rec.is_resource else rec.path)
        full_key = (*key, _mode(rec))
        seen = groups.get(full_key)
        if seen is None:
            if len(groups) >= MAX_GROUPS:
                reason = f"more than {MAX_GROUPS} distinct resources; narrow with --peer/--since"
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
                continue
            seen = groups[full_key] = Seen()
        seen.add(rec)
    result.rules = _build_rules(groups)
    return result


def _build_rules(groups: dict[GroupKey, Seen]) -> list[SuggestedRule]:
    # 1. One peer: merge resources (or URLs) of one apiGroup with identical verbs and namespaces.
    BodyKey = tuple[str, bool, str, tuple[str, ...], tuple[str, ...] | None, str]
    by_body: dict[BodyKey, tuple[list[str], Seen]] = {}
    for (peer, is_resource, group, what, mode), seen in groups.items():
        order = RESOURCE_VERBS if is_resource else NON_RESOURCE_VERBS
        verbs = tuple(_sorted_verbs(seen.verbs, order))
        namespaces = (
            tuple(sorted(seen.namespaces)) if is_resource and seen.namespaces is not None else None
        )
        body: BodyKey = (peer, is_resource, group, verbs, namespaces, mode)
        entry = by_body.setdefault(body, ([], Seen()))
        entry[0].append(what)
        entry[1].merge(seen)
    # 2. Identical bodies of different peers share one rule.
    PeersKey = tuple[bool, str, tuple[str, ...], tuple[str, ...], tuple[str, ...] | None, str]
    by_peers: dict[PeersKey, tuple[list[str], Seen]] = {}
    for (peer, is_resource, group, verbs, namespaces, mode), (whats, seen) in by_body.items():
        key: PeersKey = (is_resource, group, tuple(sorted(whats)), verbs, namespaces, mode)
        entry = by_peers.setdefault(key, ([], Seen()))
        entry[0].append(peer)
        entry[1].merge(seen)
    rules: list[SuggestedRule] = []
    used: set[str] = set()
    for (is_resource, group, items, verbs, namespaces, mode), (peers, seen) in sorted(
        by_peers.items(),
        key=lambda kv: (kv[0][5] == "dangerous", sorted(kv[1][0]), kv[0][1], kv[0][2], kv[0][5]),
    ):
        peers = sorted(peers)
        dangerous = mode == "dangerous"
        rule = SuggestedRule(
            name=_unique(_rule_name(peers, items, is_resource, mode), used),
            peers=peers,
            verbs=list(verbs),
            api_group=group if is_resource else None,
            resources=list(items) if is_resource else [],
            namespaces=list(namespaces) if namespaces is not None else None,
            non_resource_urls=[] if is_resource else list(items),
            dangerous=dangerous,
            view="empty" if mode == "view" else "",
            seen=seen,
        )
        rules.append(rule)
    return rules


def _rule_name(peers: list[str], whats: tuple[str, ...], is_resource: bool, mode: str) -> str:
    who = peers[0] if len(peers) == 1 else f"{len(peers)}-peers"
    if is_resource:
        what = "-".join(w.replace("/", "-") for w in whats[:2])
    else:
        what = "urls" if len(whats) > 1 else "url" + whats[0].replace("/", "-")
    if len(whats) > 2 and is_resource:
        what += f"-and-{len(whats) - 2}-more"
    prefix = {"dangerous": "dangerous-", "view": "empty-view-"}.get(mode, "")
    name = f"suggested-{prefix}{who}-{what}".lower()
    name = re.sub(r"[^a-z0-9._:-]+", "-", name)
    name = re.sub(r"-{2,}", "-", name)[:120]
    return name.strip("-._:") or "suggested"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


# -- rendering ---------------------------------------------------------------------------------


def _q(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _rule_lines(rule: SuggestedRule) -> list[str]:
    s = rule.seen
    verbs = ", ".join(f"{v} x{n}" for v, n in sorted(s.verbs.items(), key=lambda kv: -kv[1]))
    lines = [
        f"# from {s.count} denied request(s) ({verbs}), {s.first[0]} .. {s.last[0]}",
        f"# first auditID {s.first[1]}, last auditID {s.last[1]}",
    ]
    if rule.view:
        lines.append(
            "# answered by the proxy with an empty view: the peer syncs and sees no object, "
            "nothing goes upstream"
        )
    if rule.api_group is not None and rule.namespaces is None:
        lines.append(
            f"# NOTE: requests came from more than {MAX_NAMESPACES} namespaces; widened to all"
        )
    lines.append(f"- name: {json.dumps(rule.name)}")
    lines.append(f"  peers: {_q(rule.peers)}")
    if rule.api_group is None:
        lines.append(f"  nonResourceURLs: {_q(rule.non_resource_urls)}")
    else:
        lines.append(f"  apiGroups: {_q([rule.api_group])}")
        lines.append(f"  resources: {_q(rule.resources)}")
    lines.append(f"  verbs: {_q(rule.verbs)}")
    if rule.api_group is not None and rule.namespaces is not None:
        lines.append(f"  namespaces: {_q(rule.namespaces)}")
    if rule.dangerous:
        lines.append("  dangerous: true")
    if rule.view:
        lines.append(f"  view: {rule.view}")
    return lines


def _hazards(rule: SuggestedRule) -> str:
    why = [f"verb {v!r}" for v in rule.verbs if v not in READ_VERBS]
    for r in rule.resources:
        base, _, sub = r.partition("/")
        if base in DANGEROUS_RESOURCES:
            why.append(f"{base} (credentials)")
        if sub in DANGEROUS_SUBRESOURCES:
            why.append(f"{r} (reaches into workloads)")
    return ", ".join(why)


def render(result: Suggestion, sources: list[str]) -> str:
    out = [
        "# Policy rules suggested by `apiproxy audit suggest` that would have allowed "
        f"{result.denied} policy-denied request(s)",
        f"# read from: {', '.join(sources)}",
        "# REVIEW BEFORE ADDING: nothing is applied automatically. Copy the rules you agree with",
        "# into the policy file. Rules that would grant writes, secrets or",
        "# exec/attach/portforward/proxy are commented out, with a WARNING saying why;",
        "# reads of secrets are suggested as an empty view (view: empty), which exposes nothing.",
        "apiVersion: apiproxy/v1",
        "kind: AccessPolicy",
    ]
    active, commented = result.active, result.commented
    if active:
        out.append("rules:")
        for rule in active:
            out += ["  " + line for line in _rule_lines(rule)]
    else:
        out.append("rules: []  # no read-only rule to suggest")
    for rule in commented:
        out.append("")
        out.append(f"  # WARNING: DANGEROUS, grants {_hazards(rule)}. Left commented out on")
        out.append("  # purpose; uncomment only if this peer truly needs it.")
        out += ["  # " + line for line in _rule_lines(rule)]
    if result.skipped:
        out.append("")
        for why, n in sorted(result.skipped.items()):
            out.append(f"# not covered: {n} denied request(s): {why}")
    if result.stats.malformed:
        out.append(f"# {result.stats.malformed} malformed line(s) were skipped")
    return "\n".join(out) + "\n"
