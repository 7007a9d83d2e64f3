"""Access-policy files: load with line/column marks, validate strictly, produce immutable Rules.

Validation works on PyYAML's node graph (compose), not on constructed Python objects, so every
error can name the file, line and column of the offending item and say what would be accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from apiproxy.errors import UserError
from apiproxy.kinds import KINDS, namespaced
from apiproxy.policy.visibility import (
    OPERATORS,
    PROJECTIONS,
    LabelSelector,
    Requirement,
    Visibility,
)

__all__ = [
    "API_VERSION",
    "DANGEROUS_RESOURCES",
    "DANGEROUS_SUBRESOURCES",
    "KIND",
    "NON_RESOURCE_VERBS",
    "READ_VERBS",
    "RESOURCE_VERBS",
    "VIEWS",
    "VIEW_VERBS",
    "PolicyError",
    "Rule",
    "parse_rules",
]

API_VERSION = "apiproxy/v1"
KIND = "AccessPolicy"
# Exactly the verbs apiproxy.request.classify can produce; any other verb could never match.
RESOURCE_VERBS = (
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
)
NON_RESOURCE_VERBS = ("get", "head", "post", "put", "patch", "delete")
READ_VERBS = frozenset({"get", "list", "watch", "head"})
DANGEROUS_RESOURCES = frozenset({"secrets"})
DANGEROUS_SUBRESOURCES = frozenset({"proxy", "exec", "attach", "portforward"})
# `view: empty`: the proxy answers matching reads itself with an empty view (apiproxy.view).
VIEWS = ("empty",)
VIEW_VERBS = ("get", "list", "watch")

_RULE_KEYS = (
    "name",
    "peers",
    "apiGroups",
    "resources",
    "verbs",
    "namespaces",
    "resourceNames",
    "nonResourceURLs",
    "dangerous",
    "view",
    "projection",
)
_VISIBILITY_KEYS = ("names", "selector")
_SELECTOR_KEYS = ("matchLabels", "matchExpressions")
_EXPRESSION_KEYS = ("key", "operator", "values")
# Label keys and values as Kubernetes validates them (IsQualifiedName, IsValidLabelValue).
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_TOP_KEYS = ("apiVersion", "kind", "rules")
_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"

_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?")
_PEER = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_RESOURCE_PART = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_OBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_URL = re.compile(r"/[A-Za-z0-9\-._~!$&'()+,=:@/]*\*?")


class PolicyError(UserError):
    """A policy file is wrong: the message is 'file:line:col: what is wrong; what is allowed'."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow rule. Empty resource_names means any name; namespaces ('*',) means any."""

    name: str
    peers: tuple[str, ...]
    verbs: tuple[str, ...]
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ("*",)
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    dangerous: bool = False
    view: str = ""  # "" forwards; "empty": the proxy answers with an empty view itself
    line: int = 0
    # A `namespaces` mapping: cluster-wide reads allowed, answers filtered to these namespaces.
    visibility: Visibility | None = None
    projection: str = ""  # a PROJECTIONS name: answers are projected (apiproxy/projection.py)

    @property
    def filters(self) -> bool:
        """The proxy rewrites this rule's answers (namespace filtering and/or projection)."""
        return self.visibility is not None or bool(self.projection)

    @property
    def is_resource_rule(self) -> bool:
        return not self.non_resource_urls


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Any, message: str) -> PolicyError:
        mark = node.start_mark if isinstance(node, yaml.Node) else node
        if mark is None:
            return PolicyError(f"{self.source}: {message}")
        return PolicyError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: {message}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping; allowed keys: {', '.join(allowed)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                raise self.error(key, f"keys of {what} must be plain strings")
            if key.value in out:
                first = out[key.value][0].start_mark.line + 1
                raise self.error(
                    key,
                    f"duplicate key {key.value!r} in {what} (first at line {first}); "
                    "each key may appear once",
                )
            if key.value not in allowed:
                raise self.error(
                    key, f"unknown key {key.value!r} in {what}; allowed keys: {', '.join(allowed)}"
                )
            out[key.value] = (key, value)
        return out

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            raise self.error(node, f"{what} must be a string{_hint(node)}")
        return str(node.value)

    def strings(
        self, node: yaml.Node, what: str, *, empty_ok: bool = False
    ) -> list[tuple[str, yaml.Node]]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f'{what} must be a list of strings, e.g. ["a", "b"]')
        if not node.value and not empty_ok:
            raise self.error(
                node, f"{what} must not be empty; a rule that matches nothing is a mistake"
            )
        items: list[tuple[str, yaml.Node]] = []
        seen: set[str] = set()
        for item in node.value:
            value = self.string(item, f"each entry of {what}")
            if value in seen:
                raise self.error(item, f"{value!r} is listed twice in {what}; list each once")
            seen.add(value)
            items.append((value, item))
        stars = [n for v, n in items if v == "*"]
        if stars and len(items) > 1:
            raise self.error(
                stars[0], f"'*' in {what} already matches everything; use '*' alone or list values"
            )
        return items


def _hint(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        if kind in ("bool", "int", "float", "null"):
            return f" (YAML read {node.value!r} as {kind}; put it in quotes)"
    return ""


def _check_events(parser: _Parser, text: str) -> None:
    """Refuse multiple documents and anchors/aliases before composing (no alias bombs)."""
    documents = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise parser.error(
                        event.start_mark,
                        "more than one YAML document; a policy file holds exactly one AccessPolicy",
                    )
            elif isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise parser.error(
                    event.start_mark,
                    "YAML anchors and aliases are not allowed in policy files; write each "
                    "rule out in full",
                )
    except yaml.MarkedYAMLError as exc:
        raise parser.error(exc.problem_mark, f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise parser.error(None, f"invalid YAML: {exc}") from None
    if documents == 0:
        raise parser.error(None, f"the file is empty; expected one {KIND} document")


def parse_rules(text: str, source: str) -> tuple[Rule, ...]:
    parser = _Parser(source)
    _check_events(parser, text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise parser.error(exc.problem_mark, f"invalid YAML: {exc.problem}") from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        raise parser.error(None, f"the file is empty; expected one {KIND} document")
    top = parser.mapping(root, "the policy", _TOP_KEYS)
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if key not in top:
            raise parser.error(root, f"missing {key}; it must be {expected!r}")
        value = parser.string(top[key][1], key)
        if value != expected:
            raise parser.error(top[key][1], f"{key} is {value!r}; it must be {expected!r}")
    if "rules" not in top:
        raise parser.error(root, "missing rules; list the allow rules (an empty list denies all)")
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode):
        raise parser.error(rules_node, "rules must be a list of rules")
    rules: list[Rule] = []
    names: dict[str, int] = {}
    for node in rules_node.value:
        rule = _parse_rule(parser, node)
        if rule.name in names:
            field = parser.mapping(node, "a rule", _RULE_KEYS)["name"][1]
            raise parser.error(
                field,
                f"duplicate rule name {rule.name!r} (first at line {names[rule.name]}); "
                "names must be unique because audit records cite them",
            )
        names[rule.name] = rule.line
        rules.append(rule)
    return tuple(rules)


def _parse_rule(p: _Parser, node: yaml.Node) -> Rule:
    fields = p.mapping(node, "a rule", _RULE_KEYS)

    def required(key: str, hint: str) -> yaml.Node:
        if key not in fields:
            raise p.error(node, f"rule is missing {key!r}; {hint}")
        return fields[key][1]

    name_node = required("name", "every rule needs a unique name, cited in audit records")
    name = p.string(name_node, "name")
    if not _NAME.fullmatch(name):
        raise p.error(
            name_node,
            f"rule name {name!r} is not valid; use letters, digits, '.', '_', ':' "
            "or '-' (at most 128, starting and ending alphanumeric)",
        )
    where = f"rule {name!r}"

    peers = p.strings(required("peers", 'list peer cluster names, or ["*"] for any peer'), "peers")
    for value, item in peers:
        if value != "*" and not _PEER.fullmatch(value):
            raise p.error(
                item,
                f"peer name {value!r} is not valid; "
                "use a peer cluster name from the peers file or '*'",
            )

    dangerous = False
    dangerous_node: yaml.Node | None = None
    if "dangerous" in fields:
        dangerous_node = fields["dangerous"][1]
        if not isinstance(dangerous_node, yaml.ScalarNode) or dangerous_node.tag != _BOOL:
            raise p.error(dangerous_node, "dangerous must be true or false")
        dangerous = dangerous_node.value.lower() in ("true", "yes", "on", "y")

    is_nonresource = "nonResourceURLs" in fields
    view = ""
    if "view" in fields:
        view_node = fields["view"][1]
        view = p.string(view_node, "view")
        if view not in VIEWS:
            raise p.error(
                view_node,
                f"view {view!r} is not known; allowed: {', '.join(VIEWS)} "
                "(omit view to forward the request)",
            )
        if is_nonresource:
            raise p.error(
                fields["view"][0],
                f"{where} has a view, which only resource rules can have; "
                "remove view or use apiGroups+resources",
            )
    resource_keys = [
        k
        for k in ("apiGroups", "resources", "namespaces", "resourceNames", "projection")
        if k in fields
    ]
    if is_nonresource and resource_keys:
        raise p.error(
            fields[resource_keys[0]][0],
            f"{where} mixes nonResourceURLs with {resource_keys[0]}; "
            "split it into one rule for resources and one for non-resource URLs",
        )
    verbs_node = required("verbs", "list the verbs this rule allows, e.g. [get, list, watch]")
    verbs = p.strings(verbs_node, "verbs")
    allowed_verbs = NON_RESOURCE_VERBS if is_nonresource else RESOURCE_VERBS
    hazards: list[tuple[yaml.Node, str]] = []
    for value, item in verbs:
        if value == "*":
            hazards.append((item, "verb '*' includes writes"))
        elif value not in allowed_verbs:
            kind = "non-resource URLs" if is_nonresource else "resources"
            raise p.error(
                item,
                f"unknown verb {value!r} for {kind}; allowed: {', '.join(allowed_verbs)} or '*'",
            )
        elif value not in READ_VERBS:
            hazards.append((item, f"verb {value!r} is not read-only"))
    verb_values = tuple(v for v, _ in verbs)
    if view:
        for value, item in verbs:
            if value not in VIEW_VERBS:
                raise p.error(
                    item,
                    f"verb {value!r} cannot be answered with a view; a rule with view: {view} "
                    f"allows only {', '.join(VIEW_VERBS)}",
                )
        hazards.clear()  # only read verbs are left, and a view exposes nothing

    if is_nonresource:
        urls = p.strings(fields["nonResourceURLs"][1], "nonResourceURLs")
        for value, item in urls:
            if value in ("*", "/*"):
                hazards.append(
                    (
                        item,
                        f"nonResourceURL {value!r} matches every URL, "
                        "including /metrics and /debug",
                    )
                )
            elif not _URL.fullmatch(value) or "//" in value or "/./" in value or "/../" in value:
                raise p.error(
                    item,
                    f"nonResourceURL {value!r} is not valid; use an absolute path such as "
                    "'/version', optionally ending in '*' to match a prefix ('/apis/*')",
                )
        _check_hazards(p, where, hazards, dangerous, dangerous_node)
        return Rule(
            name=name,
            peers=tuple(v for v, _ in peers),
            verbs=verb_values,
            non_resource_urls=tuple(v for v, _ in urls),
            dangerous=dangerous,
            line=node.start_mark.line + 1,
        )

    if "apiGroups" not in fields and "resources" not in fields:
        raise p.error(
            node,
            f"{where} has neither apiGroups+resources nor nonResourceURLs; "
            "it must have one of them",
        )
    groups = p.strings(required("apiGroups", 'list API groups; "" is the core group'), "apiGroups")
    for value, item in groups:
        if value not in ("", "*") and not _DNS_SUBDOMAIN.fullmatch(value):
            raise p.error(
                item,
                f"API group {value!r} is not valid; "
                "use \"\" (core), a group such as 'discovery.k8s.io', or '*'",
            )
    resources = p.strings(
        required("resources", "list resources such as pods or pods/status"), "resources"
    )
    for value, item in resources:
        _check_resource(p, value, item, hazards)
    if view:
        # The proxy makes the answer up, so it must know each Kind: no wildcards, no subresources.
        hazards.clear()  # secrets through an empty view expose nothing
        for value, item in groups:
            if value == "*":
                raise p.error(
                    item,
                    f"{where} has a view, so list its API groups exactly; "
                    "'*' would leave the kind of the answer unknown",
                )
        for value, item in resources:
            unknown = [g for g, _ in groups if (g, value) not in KINDS]
            if unknown:
                group = unknown[0] or '"" (core)'
                known = sorted({r for g, r in KINDS if g == unknown[0]})
                raise p.error(
                    item,
                    f"resource {value!r} in API group {group} has no kind the proxy knows, so it "
                    "cannot answer it with a view"
                    + (f"; known in that group: {', '.join(known)}" if known else "")
                    + " (subresources and '*' are never viewable)",
                )
    namespaces: tuple[str, ...] = ("*",)
    visibility: Visibility | None = None
    if "namespaces" in fields and isinstance(fields["namespaces"][1], yaml.MappingNode):
        visibility = _parse_visibility(p, fields["namespaces"][1])
        _check_filtering_rule(p, where, fields, "namespaces", groups, resources, verbs, view)
        for value, item in resources:
            group = groups[0][0]
            if value != "namespaces" and not namespaced(group, value):
                raise p.error(
                    item,
                    f"resource {value!r} is not a namespaced resource the proxy knows, so "
                    "namespaces cannot select its objects; list only namespaced resources "
                    "(apiproxy/kinds.py) or 'namespaces' in a rule with a namespaces mapping",
                )
    elif "namespaces" in fields:
        ns_items = p.strings(fields["namespaces"][1], "namespaces")
        for value, item in ns_items:
            if value not in ("", "*") and not _DNS_LABEL.fullmatch(value):
                raise p.error(
                    item,
                    f"namespace {value!r} is not valid; "
                    "use a namespace name, \"\" (no namespace) or '*'",
                )
        namespaces = tuple(v for v, _ in ns_items)
    projection = ""
    if "projection" in fields:
        proj_node = fields["projection"][1]
        projection = p.string(proj_node, "projection")
        if projection not in PROJECTIONS:
            raise p.error(
                proj_node,
                f"projection {projection!r} is not known; allowed: "
                f"{', '.join(sorted(PROJECTIONS))} (omit projection to forward objects whole)",
            )
        _check_filtering_rule(p, where, fields, "projection", groups, resources, verbs, view)
        want_group, want_resource = PROJECTIONS[projection]
        for value, item in resources:
            if value != want_resource:
                raise p.error(
                    item,
                    f"projection {projection!r} applies only to {want_resource!r}; "
                    f"move {value!r} to a rule without this projection",
                )
        for value, item in groups:
            if value != want_group:
                raise p.error(
                    item,
                    f'projection {projection!r} applies only to the core API group ""; '
                    f"move {value!r} to another rule",
                )
    resource_names: tuple[str, ...] = ()
    if "resourceNames" in fields:
        rn_items = p.strings(fields["resourceNames"][1], "resourceNames", empty_ok=True)
        for value, item in rn_items:
            if value == "*" or not _OBJECT_NAME.fullmatch(value):
                raise p.error(
                    item,
                    f"resource name {value!r} is not valid; "
                    "list exact object names (no wildcards); omit resourceNames to allow any name",
                )
        resource_names = tuple(v for v, _ in rn_items)
        nameless = [v for v in verb_values if v in ("create", "deletecollection")]
        if resource_names and nameless:
            raise p.error(
                fields["resourceNames"][0],
                f"resourceNames cannot restrict {nameless[0]!r}: such requests carry no name, "
                "so the rule would never match them; "
                "move that verb to a rule without resourceNames",
            )
    _check_hazards(p, where, hazards, dangerous, dangerous_node)
    return Rule(
        name=name,
        peers=tuple(v for v, _ in peers),
        verbs=verb_values,
        api_groups=tuple(v for v, _ in groups),
        resources=tuple(v for v, _ in resources),
        namespaces=namespaces,
        resource_names=resource_names,
        dangerous=dangerous,
        view=view,
        line=node.start_mark.line + 1,
        visibility=visibility,
        projection=projection,
    )


def _check_filtering_rule(
    p: _Parser,
    where: str,
    fields: dict[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    groups: list[tuple[str, yaml.Node]],
    resources: list[tuple[str, yaml.Node]],
    verbs: list[tuple[str, yaml.Node]],
    view: str,
) -> None:
    """What a rule whose answers the proxy rewrites must look like: reads of exact resources."""
    what = "a namespaces mapping" if key == "namespaces" else "a projection"
    if view:
        raise p.error(
            fields[key][0],
            f"{where} has a view and {what}; a view answers with no objects, so remove one",
        )
    for value, item in verbs:
        if value not in VIEW_VERBS:
            raise p.error(
                item,
                f"verb {value!r} cannot be filtered; a rule with {what} allows only "
                f"{', '.join(VIEW_VERBS)}",
            )
    for value, item in groups:
        if value == "*":
            raise p.error(item, f"{where} has {what}, so list its API groups exactly, not '*'")
    if len(groups) > 1 and key == "namespaces":
        raise p.error(
            groups[1][1],
            f"{where} has {what}: give it exactly one API group (split it into one rule per group)",
        )
    for value, item in resources:
        if value == "*" or "/" in value:
            raise p.error(
                item,
                f"resource {value!r}: a rule with {what} lists plain resources "
                "(no '*', no subresources)",
            )


def _parse_visibility(p: _Parser, node: yaml.Node) -> Visibility:
    fields = p.mapping(node, "namespaces", _VISIBILITY_KEYS)
    if not fields:
        raise p.error(
            node,
            "namespaces is an empty mapping; give names, a selector or both "
            "(or a list of namespace names)",
        )
    names: frozenset[str] = frozenset()
    if "names" in fields:
        items = p.strings(fields["names"][1], "namespaces.names")
        for value, item in items:
            if not _DNS_LABEL.fullmatch(value):
                raise p.error(
                    item,
                    f"namespace {value!r} is not valid; list namespace names "
                    "(no '*' or \"\" in a namespaces mapping)",
                )
        names = frozenset(v for v, _ in items)
    selector = _parse_selector(p, fields["selector"][1]) if "selector" in fields else None
    return Visibility(names=names, selector=selector)


def _label_key(p: _Parser, node: yaml.Node, what: str) -> str:
    key = p.string(node, what)
    prefix, slash, name = key.rpartition("/")
    if (
        slash and (not prefix or not _DNS_SUBDOMAIN.fullmatch(prefix))
    ) or not _LABEL_NAME.fullmatch(name):
        raise p.error(
            node,
            f"label key {key!r} is not valid; use name or prefix/name such as "
            "'apiproxy.io/export' (name: at most 63 alphanumerics, '-', '_', '.')",
        )
    return key


def _label_value(p: _Parser, node: yaml.Node, what: str) -> str:
    value = p.string(node, what)
    if not _LABEL_VALUE.fullmatch(value):
        raise p.error(
            node,
            f"label value {value!r} is not valid; at most 63 alphanumerics, '-', '_', '.', "
            "starting and ending alphanumeric (or empty)",
        )
    return value


def _parse_selector(p: _Parser, node: yaml.Node) -> LabelSelector:
    fields = p.mapping(node, "namespaces.selector", _SELECTOR_KEYS)
    labels: list[tuple[str, str]] = []
    if "matchLabels" in fields:
        ml = fields["matchLabels"][1]
        if not isinstance(ml, yaml.MappingNode):
            raise p.error(ml, 'matchLabels must be a mapping of label key to value, e.g. {a: "b"}')
        seen: set[str] = set()
        for key_node, value_node in ml.value:
            key = _label_key(p, key_node, "each matchLabels key")
            if key in seen:
                raise p.error(key_node, f"duplicate key {key!r} in matchLabels; list each once")
            seen.add(key)
            labels.append((key, _label_value(p, value_node, f"matchLabels value of {key!r}")))
    expressions: list[Requirement] = []
    if "matchExpressions" in fields:
        me = fields["matchExpressions"][1]
        if not isinstance(me, yaml.SequenceNode):
            raise p.error(
                me, "matchExpressions must be a list of {key, operator, values} requirements"
            )
        for item in me.value:
            req = p.mapping(item, "a matchExpressions requirement", _EXPRESSION_KEYS)
            for needed in ("key", "operator"):
                if needed not in req:
                    raise p.error(item, f"a matchExpressions requirement needs {needed!r}")
            key = _label_key(p, req["key"][1], "key")
            op_node = req["operator"][1]
            operator = p.string(op_node, "operator")
            if operator not in OPERATORS:
                raise p.error(
                    op_node, f"operator {operator!r} is not valid; allowed: {', '.join(OPERATORS)}"
                )
            values: list[str] = []
            if "values" in req:
                vnode = req["values"][1]
                items = p.strings(vnode, "values", empty_ok=True)
                values = [_label_value(p, n, "each of values") for _, n in items]
            if operator in ("In", "NotIn") and not values:
                raise p.error(
                    item, f"operator {operator} needs a non-empty values list, as in Kubernetes"
                )
            if operator in ("Exists", "DoesNotExist") and "values" in req:
                raise p.error(
                    req["values"][0],
                    f"operator {operator} takes no values; remove values, as in Kubernetes",
                )
            expressions.append(Requirement(key, operator, frozenset(values)))
    if not labels and not expressions:
        raise p.error(
            node,
            "namespaces.selector selects nothing in particular (an empty selector would match "
            "every namespace); give matchLabels or matchExpressions",
        )
    return LabelSelector(tuple(labels), tuple(expressions))


def _check_resource(
    p: _Parser, value: str, item: yaml.Node, hazards: list[tuple[yaml.Node, str]]
) -> None:
    bad = (
        f"resource {value!r} is not valid; use 'pods', 'pods/status', '*/status' or '*' "
        "(lowercase, as in the URL)"
    )
    base, slash, sub = value.partition("/")
    if value == "*":
        hazards.append((item, "resource '*' includes secrets and pods/exec"))
        return
    if slash and (sub == "" or "/" in sub):
        raise p.error(item, bad)
    if base == "*":
        if not slash:
            raise p.error(item, bad)
    elif not _RESOURCE_PART.fullmatch(base):
        raise p.error(item, bad)
    if slash and sub == "*":
        raise p.error(
            item,
            f"resource {value!r}: a wildcard subresource is not supported; "
            "list subresources explicitly ('pods/log') or use '*/status'",
        )
    if slash and not _RESOURCE_PART.fullmatch(sub):
        raise p.error(item, bad)
    if base in DANGEROUS_RESOURCES:
        hazards.append((item, f"resource {value!r} exposes credentials"))
    if sub in DANGEROUS_SUBRESOURCES:
        hazards.append((item, f"subresource {sub!r} reaches into workloads"))


def _check_hazards(
    p: _Parser,
    where: str,
    hazards: list[tuple[yaml.Node, str]],
    dangerous: bool,
    dangerous_node: yaml.Node | None,
) -> None:
    if hazards and not dangerous:
        node, why = hazards[0]
        raise p.error(node, f"{why}; set 'dangerous: true' on {where} to accept it deliberately")
    if dangerous and not hazards:
        raise p.error(
            dangerous_node,
            f"{where} grants nothing dangerous; "
            "remove 'dangerous: true' (it also lets the proxy allow protocol upgrades)",
        )


def read_policy_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror or exc}") from None
