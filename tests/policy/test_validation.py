# ruff: noqa: E501  (one error case per line reads best)
"""Every validation error path: file, line, column and a message saying what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from apiproxy.errors import UserError
from apiproxy.policy import Policy, PolicyError

HEAD = "apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules:\n"
# A valid rule body (line 4 onwards) that cases below modify.
OK_RULE = (
    "  - name: r1\n"  # line 4
    "    peers: ['*']\n"  # 5
    "    apiGroups: ['']\n"  # 6
    "    resources: [pods]\n"  # 7
    "    verbs: [get, list]\n"  # 8
)


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        Policy.from_text(text, source="p.yaml")
    assert isinstance(caught.value, UserError)
    return str(caught.value)


CASES = [
    # (id, text, expected "p.yaml:line:col: message-prefix", must-also-contain)
    ("empty", "", "p.yaml: the file is empty", "AccessPolicy"),
    ("comments only", "# nothing\n", "p.yaml: the file is empty", "AccessPolicy"),
    ("null document", "---\n", "p.yaml: the file is empty", "AccessPolicy"),
    ("two documents", HEAD + OK_RULE + "---\n" + HEAD, "p.yaml:9:1: more than one YAML document", "exactly one"),
    ("bad yaml", HEAD + "  - name: [\n", "p.yaml:5:1: invalid YAML", ""),
    ("anchor", HEAD + "  - &a {name: x}\n", "p.yaml:4:5: YAML anchors and aliases are not allowed", "in full"),
    ("alias bomb", "a: &a [x, x]\nb: [*a, *a]\n", "p.yaml:1:4: YAML anchors and aliases", ""),
    ("top not mapping", "- a\n", "p.yaml:1:1: the policy must be a mapping", "apiVersion, kind, rules"),
    ("unknown top key", HEAD + OK_RULE + "metadata: {}\n", "p.yaml:9:1: unknown key 'metadata' in the policy", "allowed keys: apiVersion, kind, rules"),
    ("duplicate top key", HEAD + OK_RULE + "kind: AccessPolicy\n", "p.yaml:9:1: duplicate key 'kind' in the policy (first at line 2)", "once"),
    ("missing apiVersion", "kind: AccessPolicy\nrules: []\n", "p.yaml:1:1: missing apiVersion", "'apiproxy/v1'"),
    ("wrong apiVersion", "apiVersion: v1\nkind: AccessPolicy\nrules: []\n", "p.yaml:1:13: apiVersion is 'v1'", "must be 'apiproxy/v1'"),
    ("wrong kind", "apiVersion: apiproxy/v1\nkind: Role\nrules: []\n", "p.yaml:2:7: kind is 'Role'", "'AccessPolicy'"),
    ("missing rules", "apiVersion: apiproxy/v1\nkind: AccessPolicy\n", "p.yaml:1:1: missing rules", "empty list denies all"),
    ("rules not list", HEAD.replace("rules:\n", "rules: {}\n"), "p.yaml:3:8: rules must be a list", ""),
    ("rule not mapping", HEAD + "  - just-a-string\n", "p.yaml:4:5: a rule must be a mapping", "allowed keys: name, peers"),
    ("unknown rule key", HEAD + OK_RULE + "    verb: [get]\n", "p.yaml:9:5: unknown key 'verb' in a rule", "allowed keys: name, peers, apiGroups"),
    ("duplicate rule key", HEAD + OK_RULE + "    verbs: [watch]\n", "p.yaml:9:5: duplicate key 'verbs' in a rule (first at line 8)", ""),
    ("missing name", HEAD + OK_RULE.replace("- name: r1\n    ", "- "), "p.yaml:4:5: rule is missing 'name'", "unique name"),
    ("name not string", HEAD + OK_RULE.replace("name: r1", "name: 12"), "p.yaml:4:11: name must be a string (YAML read '12' as int; put it in quotes)", ""),
    ("bad name", HEAD + OK_RULE.replace("name: r1", "name: 'r 1'"), "p.yaml:4:11: rule name 'r 1' is not valid", "letters, digits"),
    ("duplicate name", HEAD + OK_RULE + OK_RULE, "p.yaml:9:11: duplicate rule name 'r1' (first at line 4)", "audit records"),
    ("missing peers", HEAD + OK_RULE.replace("    peers: ['*']\n", ""), "p.yaml:4:5: rule is missing 'peers'", '["*"] for any peer'),
    ("peers not list", HEAD + OK_RULE.replace("peers: ['*']", "peers: '*'"), "p.yaml:5:12: peers must be a list of strings", ""),
    ("peers empty", HEAD + OK_RULE.replace("peers: ['*']", "peers: []"), "p.yaml:5:12: peers must not be empty", ""),
    ("peer star mixed", HEAD + OK_RULE.replace("peers: ['*']", "peers: [a, '*']"), "p.yaml:5:16: '*' in peers already matches everything", "alone"),
    ("bad peer", HEAD + OK_RULE.replace("peers: ['*']", "peers: ['c*']"), "p.yaml:5:13: peer name 'c*' is not valid", ""),
    ("peer bool", HEAD + OK_RULE.replace("peers: ['*']", "peers: [yes]"), "p.yaml:5:13: each entry of peers must be a string (YAML read 'yes' as bool; put it in quotes)", ""),
    ("dup list item", HEAD + OK_RULE.replace("[get, list]", "[get, get]"), "p.yaml:8:18: 'get' is listed twice in verbs", ""),
    ("missing verbs", HEAD + OK_RULE.replace("    verbs: [get, list]\n", ""), "p.yaml:4:5: rule is missing 'verbs'", ""),
    ("unknown verb", HEAD + OK_RULE.replace("[get, list]", "[get, read]"), "p.yaml:8:18: unknown verb 'read' for resources", "allowed: get, list, watch, create"),
    ("rbac-only verb", HEAD + OK_RULE.replace("[get, list]", "[impersonate]"), "p.yaml:8:13: unknown verb 'impersonate'", ""),
    ("head on resources", HEAD + OK_RULE.replace("[get, list]", "[head]"), "p.yaml:8:13: unknown verb 'head' for resources", ""),
    ("write verb", HEAD + OK_RULE.replace("[get, list]", "[get, create]"), "p.yaml:8:18: verb 'create' is not read-only; set 'dangerous: true' on rule 'r1'", "deliberately"),
    ("star verb", HEAD + OK_RULE.replace("[get, list]", "['*']"), "p.yaml:8:13: verb '*' includes writes; set 'dangerous: true'", ""),
    ("proxy verb", HEAD + OK_RULE.replace("[get, list]", "[proxy]"), "p.yaml:8:13: verb 'proxy' is not read-only", ""),
    ("secrets", HEAD + OK_RULE.replace("[pods]", "[pods, secrets]"), "p.yaml:7:23: resource 'secrets' exposes credentials; set 'dangerous: true'", ""),
    ("exec", HEAD + OK_RULE.replace("[pods]", "[pods/exec]"), "p.yaml:7:17: subresource 'exec' reaches into workloads", ""),
    ("attach", HEAD + OK_RULE.replace("[pods]", "[pods/attach]"), "p.yaml:7:17: subresource 'attach'", ""),
    ("portforward", HEAD + OK_RULE.replace("[pods]", "[pods/portforward]"), "p.yaml:7:17: subresource 'portforward'", ""),
    ("proxy sub", HEAD + OK_RULE.replace("[pods]", "['*/proxy']"), "p.yaml:7:17: subresource 'proxy'", ""),
    ("star resource", HEAD + OK_RULE.replace("[pods]", "['*']"), "p.yaml:7:17: resource '*' includes secrets and pods/exec", ""),
    ("needless dangerous", HEAD + OK_RULE + "    dangerous: true\n", "p.yaml:9:16: rule 'r1' grants nothing dangerous; remove 'dangerous: true'", ""),
    ("dangerous not bool", HEAD + OK_RULE + "    dangerous: 'true'\n", "p.yaml:9:16: dangerous must be true or false", ""),
    ("bad resource", HEAD + OK_RULE.replace("[pods]", "[Pods]"), "p.yaml:7:17: resource 'Pods' is not valid", "lowercase"),
    ("resource wildcard sub", HEAD + OK_RULE.replace("[pods]", "['pods/*']"), "p.yaml:7:17: resource 'pods/*': a wildcard subresource is not supported", ""),
    ("resource deep", HEAD + OK_RULE.replace("[pods]", "[pods/a/b]"), "p.yaml:7:17: resource 'pods/a/b' is not valid", ""),
    ("resource partial star", HEAD + OK_RULE.replace("[pods]", "['po*']"), "p.yaml:7:17: resource 'po*' is not valid", ""),
    ("bad group", HEAD + OK_RULE.replace("['']", "['*.k8s.io']"), "p.yaml:6:17: API group '*.k8s.io' is not valid", "'discovery.k8s.io'"),
    ("missing groups", HEAD + OK_RULE.replace("    apiGroups: ['']\n", ""), "p.yaml:4:5: rule is missing 'apiGroups'", "core group"),
    ("missing resources", HEAD + OK_RULE.replace("    resources: [pods]\n", ""), "p.yaml:4:5: rule is missing 'resources'", ""),
    ("neither kind", HEAD + "  - name: r1\n    peers: ['*']\n    verbs: [get]\n", "p.yaml:4:5: rule 'r1' has neither apiGroups+resources nor nonResourceURLs", ""),
    ("mixed", HEAD + OK_RULE + "    nonResourceURLs: [/version]\n", "p.yaml:6:5: rule 'r1' mixes nonResourceURLs with apiGroups", "split it"),
    ("bad namespace", HEAD + OK_RULE + "    namespaces: ['team-*']\n", "p.yaml:9:18: namespace 'team-*' is not valid", ""),
    ("namespaces empty", HEAD + OK_RULE + "    namespaces: []\n", "p.yaml:9:17: namespaces must not be empty", ""),
    ("star resourceName", HEAD + OK_RULE + "    resourceNames: ['*']\n", "p.yaml:9:21: resource name '*' is not valid", "no wildcards"),
    ("resourceNames create", HEAD + OK_RULE.replace("[get, list]", "[get, create]") + "    resourceNames: [x]\n    dangerous: true\n", "p.yaml:9:5: resourceNames cannot restrict 'create'", ""),
    ("nonresource bad verb", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: [/version]\n    verbs: [list]\n", "p.yaml:7:13: unknown verb 'list' for non-resource URLs", "get, head, post"),
    ("nonresource write", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: [/version]\n    verbs: [post]\n", "p.yaml:7:13: verb 'post' is not read-only", ""),
    ("nonresource star", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: ['/*']\n    verbs: [get]\n", "p.yaml:6:23: nonResourceURL '/*' matches every URL", ""),
    ("nonresource relative", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: [version]\n    verbs: [get]\n", "p.yaml:6:23: nonResourceURL 'version' is not valid", "'/apis/*'"),
    ("nonresource mid star", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: ['/a*b']\n    verbs: [get]\n", "p.yaml:6:23: nonResourceURL '/a*b' is not valid", ""),
    ("nonresource dotdot", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: ['/a/../b']\n    verbs: [get]\n", "p.yaml:6:23: nonResourceURL '/a/../b' is not valid", ""),
    ("tagged value", HEAD + OK_RULE.replace("name: r1", "name: !x r1"), "p.yaml:4:11: name must be a string", ""),
    ("view unknown", HEAD + OK_RULE + "    view: full\n", "p.yaml:9:11: view 'full' is not known; allowed: empty", "omit view to forward"),
    ("view not string", HEAD + OK_RULE + "    view: yes\n", "p.yaml:9:11: view must be a string (YAML read 'yes' as bool", ""),
    ("view write verb", HEAD + OK_RULE.replace("[get, list]", "[get, delete]") + "    view: empty\n", "p.yaml:8:18: verb 'delete' cannot be answered with a view", "allows only get, list, watch"),
    ("view star verb", HEAD + OK_RULE.replace("[get, list]", "['*']") + "    view: empty\n", "p.yaml:8:13: verb '*' cannot be answered with a view", ""),
    ("view nonresource", HEAD + "  - name: n\n    peers: ['*']\n    nonResourceURLs: [/version]\n    verbs: [get]\n    view: empty\n", "p.yaml:8:5: rule 'n' has a view, which only resource rules can have", ""),
    ("view star group", HEAD + OK_RULE.replace("['']", "['*']") + "    view: empty\n", "p.yaml:6:17: rule 'r1' has a view, so list its API groups exactly", ""),
    ("view subresource", HEAD + OK_RULE.replace("[pods]", "[pods/log]") + "    view: empty\n", "p.yaml:7:17: resource 'pods/log' in API group \"\" (core) has no kind the proxy knows", "known in that group: configmaps"),
    ("view star resource", HEAD + OK_RULE.replace("[pods]", "['*']") + "    view: empty\n", "p.yaml:7:17: resource '*' in API group \"\" (core) has no kind", "never viewable"),
    ("view unknown kind", HEAD + OK_RULE.replace("['']", "[example.com]").replace("[pods]", "[widgets]") + "    view: empty\n", "p.yaml:7:17: resource 'widgets' in API group example.com has no kind the proxy knows", ""),
    ("view kind of other group", HEAD + OK_RULE.replace("['']", "['', apps]").replace("[pods]", "[secrets]") + "    view: empty\n", "p.yaml:7:17: resource 'secrets' in API group apps has no kind", "known in that group: daemonsets"),
    ("view needless dangerous", HEAD + OK_RULE.replace("[pods]", "[secrets]") + "    view: empty\n    dangerous: true\n", "p.yaml:10:16: rule 'r1' grants nothing dangerous", ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "prefix", "also"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validation_errors(text: str, prefix: str, also: str) -> None:
    message = error_of(text)
    assert message.startswith(prefix), message
    assert also in message


def test_valid_dangerous_rule_is_accepted() -> None:
    p = Policy.from_text(
        HEAD + OK_RULE.replace("[pods]", "[pods, pods/exec, secrets]") + "    dangerous: true\n"
    )
    assert p.rules[0].dangerous is True
    assert p.rules[0].resources == ("pods", "pods/exec", "secrets")


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read policy file"):
        Policy.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(bad)


def test_error_on_loaded_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + OK_RULE.replace("[get, list]", "[get, lst]"))
    with pytest.raises(PolicyError) as caught:
        Policy.load(path)
    assert str(caught.value).startswith(f"{path}:8:18: unknown verb 'lst'")


def test_empty_view_of_secrets_needs_no_dangerous_flag() -> None:
    from apiproxy.policy.rbac import rbac_documents
    from apiproxy.request import classify

    p = Policy.from_text(
        HEAD
        + OK_RULE.replace("[pods]", "[secrets, configmaps]").replace("[get, list]", "[list, watch]")
        + "    view: empty\n"
        + OK_RULE.replace("r1", "r2")
    )
    assert (p.rules[0].view, p.rules[0].dangerous, p.rules[1].view) == ("empty", False, "")
    decision = p.decide("c1", classify("GET", "/api/v1/secrets?watch=1"))
    assert (decision.allowed, decision.rule, decision.view) == (True, "r1", "empty")
    assert p.decide("c1", classify("GET", "/api/v1/pods")).view == ""
    assert not p.decide("c1", classify("GET", "/api/v1/namespaces/a/secrets/s")).allowed
    # The proxy answers the view itself, so its upstream RBAC grants none of it.
    (role,) = rbac_documents(p.rules)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
