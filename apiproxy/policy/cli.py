"""`apiproxy policy`: check policy files, explain a decision, derive the upstream RBAC."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from apiproxy import flags
from apiproxy.errors import UserError
from apiproxy.policy import Policy, PolicyError
from apiproxy.policy.rbac import DEFAULT_NAME, render
from apiproxy.request import RequestRejected, classify

EXIT_ALLOWED = 0
EXIT_BAD = 2
EXIT_DENIED = 3


def _parser(prog: str) -> flags.Parser:
    parser = flags.Parser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="validate policy files; exit 2 on the first bad one")
    check.add_argument("files", nargs="+", metavar="FILE")
    explain = sub.add_parser(
        "explain",
        help="classify a request and print the decision as JSON (exit 0 allowed, 3 denied)",
        description="Without METHOD TARGET, reads 'METHOD TARGET' lines from stdin and prints "
        "one JSON object per line.",
    )
    explain.option("--policy", "access policy (YAML)", type=flags.path(), required=True)
    explain.option("--peer", "peer cluster name (default: a peer named in no rule)", default="*")
    explain.add_argument("method", nargs="?", metavar="METHOD")
    explain.add_argument("target", nargs="?", metavar="TARGET")
    rbac = sub.add_parser("rbac", help="print the ClusterRole (and Roles) the proxy needs")
    rbac.add_argument("file", metavar="FILE")
    rbac.option("--name", "role name", default=DEFAULT_NAME)
    rbac.option(
        "--service-account",
        "subject of the RoleBindings for namespaced Roles",
        default="apiproxy-system/api-proxy",
        type=flags.text(r"[^/]+/[^/]+", "NAMESPACE/NAME"),
        metavar="NAMESPACE/NAME",
    )
    return parser


def main(argv: list[str], prog: str = "apiproxy policy") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command == "check":
        return _check(args.files, prog)
    if args.command == "explain":
        if (args.method is None) != (args.target is None):
            raise UserError("give both METHOD and TARGET, or neither to read lines from stdin")
        policy = Policy.load(args.policy)
        if args.method is not None:
            allowed = _explain(policy, args.peer, args.method, args.target, sys.stdout)
            return EXIT_ALLOWED if allowed else EXIT_DENIED
        return _explain_lines(policy, args.peer, sys.stdin, sys.stdout)
    namespace, _, name = args.service_account.partition("/")
    policy = Policy.load(args.file)
    sys.stdout.write(render(policy.rules, Path(args.file).name, args.name, (namespace, name)))
    return 0


def _check(files: list[str], prog: str) -> int:
    status = 0
    for file in files:
        try:
            policy = Policy.load(file)
        except PolicyError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            status = EXIT_BAD
            continue
        resource = sum(r.is_resource_rule for r in policy.rules)
        dangerous = sum(r.dangerous for r in policy.rules)
        views = sum(bool(r.view) for r in policy.rules)
        selected = sum(r.visibility is not None for r in policy.rules)
        projected = sum(bool(r.projection) for r in policy.rules)
        print(
            f"{file}: ok, {len(policy.rules)} rules ({resource} resource, "
            f"{len(policy.rules) - resource} non-resource, {dangerous} dangerous"
            + (f", {views} answered with an empty view" if views else "")
            + (f", {selected} filtered to selected namespaces" if selected else "")
            + (f", {projected} projected" if projected else "")
            + ")"
        )
    return status


def _result(policy: Policy, peer: str, method: str, target: str) -> tuple[bool, dict[str, Any]]:
    try:
        info = classify(method, target)
    except RequestRejected as exc:
        refused = {"allowed": False, "rule": None, "reason": f"rejected: {exc.reason}"}
        return False, {"request": {"rejected": exc.reason}, "decision": refused}
    verdict = policy.decide(peer, info)
    decision: dict[str, Any] = {
        "allowed": verdict.allowed,
        "rule": verdict.rule,
        "reason": verdict.reason,
    }
    if verdict.view:
        decision["view"] = verdict.view  # answered by the proxy; nothing goes upstream
    if verdict.visibility is not None:
        # Which namespaces' objects the answer may hold; the rest are filtered out (404 on GET).
        visible: dict[str, Any] = verdict.visibility.to_dict()
        ns = info.namespace or (info.name if info.resource == "namespaces" else "")
        if ns:
            if ns in verdict.visibility.names:
                visible["requestedNamespace"] = f"{ns}: visible (named)"
            elif verdict.visibility.selector is not None:
                visible["requestedNamespace"] = f"{ns}: visible only if its labels match selector"
            else:
                visible["requestedNamespace"] = f"{ns}: not visible (404 on get, no items)"
        decision["visibleNamespaces"] = visible
    if verdict.filters:
        # Every object answered under such a rule loses managedFields and the annotations
        # kubectl.kubernetes.io/last-applied-configuration and proxy.istio.io/overrides.
        decision["projection"] = verdict.projection or "strip-only"
    return verdict.allowed, {"request": info.to_dict(), "decision": decision}


def _explain(policy: Policy, peer: str, method: str, target: str, out: TextIO) -> bool:
    allowed, result = _result(policy, peer, method, target)
    out.write(json.dumps(result, sort_keys=False) + "\n")
    return allowed


def _explain_lines(policy: Policy, peer: str, lines: TextIO, out: TextIO) -> int:
    """One JSON object per non-blank, non-comment line; exit 3 if any request was denied."""
    status = EXIT_ALLOWED
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 2:
            result = {
                "request": {"rejected": f"expected 'METHOD TARGET', got {text[:200]!r}"},
                "decision": {"allowed": False, "rule": None, "reason": "rejected: bad input line"},
            }
            out.write(json.dumps(result) + "\n")
            status = EXIT_DENIED
            continue
        if not _explain(policy, peer, fields[0], fields[1], out):
            status = EXIT_DENIED
        out.flush()
    return status
