# ruff: noqa: E501
"""`apiproxy policy` through the real console script and in-process, with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apiproxy.policy import Policy
from apiproxy.policy.cli import main
from apiproxy.policy.rbac import rbac_documents

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("apiproxy")
ISTIO = ROOT / "policies" / "istio-remote.yaml"
MINIMAL = ROOT / "policies" / "minimal.yaml"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "policy", *args], input=stdin, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_check_shipped_policies_with_console_script() -> None:
    done = run("check", str(ISTIO), str(MINIMAL))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        f"{ISTIO}: ok, 11 rules (10 resource, 1 non-resource, 0 dangerous, "
        "2 answered with an empty view, 5 filtered to selected namespaces, 2 projected)",
        f"{MINIMAL}: ok, 1 rules (1 resource, 0 non-resource, 0 dangerous)",
    ]


def test_check_bad_file_prints_precise_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.read_text().replace("verbs: [get, list, watch]", "verbs: [get, delete]"))
    done = run("check", str(MINIMAL), str(bad))
    assert done.returncode == 2
    assert f"{MINIMAL}: ok" in done.stdout
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "delete" in t)
    assert f"error: {bad}:{line}:" in done.stderr
    assert "verb 'delete' is not read-only; set 'dangerous: true'" in done.stderr


def test_explain_allowed_denied_rejected_exit_codes() -> None:
    ok = run("explain", "--policy", str(ISTIO), "--peer", "c2", "GET", "/api/v1/pods?watch=true")
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["decision"] == {
        "allowed": True, "rule": "istio-pods", "reason": "allowed by rule 'istio-pods'",
        "visibleNamespaces": {
            "names": ["istio-system"], "selector": {"matchLabels": {"apiproxy.io/export": "true"}},
        },
        "projection": "istiod-pod",
    }  # fmt: skip
    assert body["request"]["verb"] == "watch"
    assert set(body["request"]) == {
        "isResourceRequest", "path", "verb", "apiPrefix", "apiGroup", "apiVersion", "namespace",
        "resource", "subresource", "name", "parts", "fieldSelector", "labelSelector",
    }  # fmt: skip
    denied = run("explain", "--policy", str(ISTIO), "DELETE", "/api/v1/namespaces/a/secrets/s")
    assert denied.returncode == 3
    assert json.loads(denied.stdout)["decision"]["allowed"] is False
    # Reading secrets is allowed only as the proxy's own empty view, and explain says so.
    view = run("explain", "--policy", str(ISTIO), "GET", "/api/v1/namespaces/a/secrets")
    assert view.returncode == 0, view.stderr
    assert json.loads(view.stdout)["decision"] == {
        "allowed": True, "rule": "istio-remote-empty-secrets",
        "reason": "allowed by rule 'istio-remote-empty-secrets' with an empty view", "view": "empty",
    }  # fmt: skip
    rejected = run("explain", "--policy", str(ISTIO), "GET", "/api/v1/namespaces/a/pods/%2e%2e")
    assert rejected.returncode == 3
    out = json.loads(rejected.stdout)
    assert "percent-encoded" in out["request"]["rejected"]
    assert out["decision"]["allowed"] is False
    assert out["decision"]["rule"] is None


def test_explain_stdin_lines_one_object_each() -> None:
    done = run(
        "explain", "--policy", str(ISTIO),
        stdin="# comment\nGET /version\n\nHEAD /api\nGET /api/v1/nodes\n",
    )  # fmt: skip
    assert done.returncode == 3  # HEAD /api is verb "head": not granted
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["decision"]["allowed"] for r in results] == [True, False, True]
    assert results[2]["request"]["resource"] == "nodes"


def test_explain_bad_usage_and_bad_policy(tmp_path: Path) -> None:
    assert run("explain", "--policy", str(ISTIO), "GET").returncode == 2
    assert run("explain", "GET", "/version").returncode == 2  # --policy missing
    assert run("frobnicate").returncode == 2
    bad = tmp_path / "p.yaml"
    bad.write_text("kind: AccessPolicy\n")
    done = run("explain", "--policy", str(bad), "GET", "/version")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"apiproxy policy: error: {bad}:1:1: missing apiVersion; it must be 'apiproxy/v1'"
    )
    assert done.stdout == ""


def test_rbac_is_deterministic_and_matches_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rbac", str(ISTIO)]) == 0
    first = capsys.readouterr().out
    assert main(["rbac", str(ISTIO)]) == 0
    assert capsys.readouterr().out == first
    docs = list(yaml.safe_load_all(first))
    assert [d["kind"] for d in docs] == ["ClusterRole", "Role", "RoleBinding"]
    assert docs[0]["metadata"]["name"] == "apiproxy:upstream"
    cluster_rules = docs[0]["rules"]
    # Nothing in the ClusterRole touches secrets or configmaps, and every verb is read-only.
    assert all("secrets" not in r.get("resources", []) for r in cluster_rules)
    assert all("configmaps" not in r.get("resources", []) for r in cluster_rules)
    assert {v for r in cluster_rules for v in r["verbs"]} == {"get", "list", "watch"}
    role = docs[1]
    assert role["metadata"]["namespace"] == "istio-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["istio"],
         "verbs": ["get", "list", "watch"]},
    ]  # fmt: skip
    assert docs[2]["subjects"] == [
        {"kind": "ServiceAccount", "name": "api-proxy", "namespace": "apiproxy-system"}
    ]
    assert first.startswith("# Generated by `apiproxy policy rbac istio-remote.yaml`")


def test_rbac_console_script_name_and_subject() -> None:
    done = run("rbac", str(MINIMAL), "--name", "custom", "--service-account", "ns/sa")
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert len(docs) == 1
    assert docs[0]["metadata"]["name"] == "custom"
    assert docs[0]["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["endpoints", "pods", "services"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert run("rbac", str(MINIMAL), "--service-account", "nope").returncode == 2


def test_rbac_unions_peers_and_keeps_cluster_scope_for_empty_namespace() -> None:
    p = Policy.from_text(
        "apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules:\n"
        "- {name: a, peers: [c1], apiGroups: [''], resources: [nodes], verbs: [list], namespaces: ['']}\n"
        "- {name: b, peers: [c2], apiGroups: [''], resources: [pods], verbs: [get], namespaces: [x, y]}\n"
        "- {name: c, peers: [c3], apiGroups: [''], resources: [nodes], verbs: [list]}\n"
    )
    docs = rbac_documents(p.rules)
    assert docs[0]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in docs[1:]] == [
        ("Role", "x"), ("RoleBinding", "x"), ("Role", "y"), ("RoleBinding", "y"),
    ]  # fmt: skip
