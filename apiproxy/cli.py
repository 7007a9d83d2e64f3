"""The `apiproxy` console script: one dispatcher, each subcommand in the module that owns it.

Subcommand modules are imported only when invoked, so `apiproxy policy check` does not pay for
aiohttp and the Kubernetes client at start-up. Each module exposes `main(argv, prog) -> int`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from apiproxy import __version__
from apiproxy.errors import UserError

DEV_PACKAGE = "apiproxy_dev"
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "apiproxy.serve_cli",
        "run the api-proxy: authenticate peers, enforce policy, forward",
    ),
    "federate": (
        "apiproxy.federation.main",
        "run the federation controller and metadata exporter",
    ),
    "policy": ("apiproxy.policy.cli", "check, explain and derive RBAC from access policies"),
    "audit": ("apiproxy.audit.cli", "summarize audit logs and suggest policy rules"),
    "sim": ("apiproxy_dev.sim.cli", "run the simulated Kubernetes API server (development tool)"),
    "demo": ("apiproxy_dev.demo", "play the two-cluster story end to end on simulated clusters"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: apiproxy COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'apiproxy COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"apiproxy {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"apiproxy: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name != DEV_PACKAGE:
            raise
        # sim and demo live in the apiproxy-dev distribution, absent from production installs.
        print(
            f"apiproxy {name}: error: a development tool, not part of this installation "
            "(from a checkout: pip install -e ./dev)",
            file=sys.stderr,
        )
        return 2
    try:
        code: int = module.main(rest, prog=f"apiproxy {name}")
    except UserError as exc:
        print(f"apiproxy {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code
