"""`apiproxy serve`'s command line: its flags (and `APIPROXY_*` variables) → a `ServeConfig`.

`main` parses, then runs the configuration in this process (`server.run`) or, with `--workers N`,
hands it to the supervisor (`workers.main`). The proxy itself is `apiproxy/server.py`; nothing
there parses flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from apiproxy import flags, log, upstream, uuids, workers
from apiproxy.errors import UserError
from apiproxy.server import ServeConfig, run

MiB = 1024 * 1024


def build_parser(prog: str) -> flags.Parser:
    """Every `apiproxy serve` option (each also read from `APIPROXY_<FLAG>`)."""
    p = flags.Parser(
        prog=prog, description="Run the api-proxy in front of kube-apiserver.", env=True
    )
    count, seconds = flags.number(), flags.number(float)
    p.option(
        "--listen", "HOST:PORT to serve HTTPS on", default="0.0.0.0:4443", type=flags.host_port
    )
    p.option("--tls-cert", "serving certificate chain (PEM)", type=flags.path(), required=True)
    p.option("--tls-key", "serving private key (PEM)", type=flags.path(), required=True)
    p.option("--peers", "peers file (YAML)", type=flags.path(), required=True)
    p.option(
        "--cluster-uuid",
        "this cluster's UUID: the audience of peer tokens",
        type=_canonical_uuid,
        required=True,
    )
    p.option("--policy", "access policy (YAML)", type=flags.path(), required=True)
    p.option("--upstream", "upstream API server URL (else --kubeconfig, else in-cluster)")
    p.option("--upstream-ca", "CA bundle for --upstream")
    p.option("--upstream-token-file", "bearer token file for --upstream (re-read on change)")
    p.option("--kubeconfig", "kubeconfig for the upstream", type=flags.path())
    p.option("--context", "kubeconfig context (default: current-context)")
    p.option("--audit-log", "audit log path, or - for stdout (default: no audit log)")
    p.option(
        "--audit-max-bytes", "rotate the audit log at this size", default=str(100 * MiB), type=count
    )
    p.option(
        "--audit-backups", "rotated audit logs to keep", default="5", type=flags.number(minimum=0)
    )
    p.option(
        "--metrics-listen",
        "HOST:PORT for /healthz, /readyz, /metrics (plain HTTP)",
        type=flags.host_port,
    )
    p.option(
        "--max-watch-seconds",
        "longest watch stream the proxy keeps open",
        default="1800",
        type=seconds,
    )
    p.option(
        "--max-requests-per-peer",
        "concurrent non-watch requests per peer",
        default="200",
        type=count,
    )
    p.option("--max-watches-per-peer", "concurrent watches per peer", default="100", type=count)
    p.option("--max-body-bytes", "largest request body accepted", default=str(3 * MiB), type=count)
    p.option(
        "--upstream-timeout-seconds",
        "read timeout of non-watch requests",
        default="60",
        type=seconds,
    )
    p.option(
        "--upstream-max-connections",
        "upstream connections for non-watch requests (watches have their own connections)",
        default="1000",
        type=count,
    )
    p.option(
        "--reload-interval-seconds",
        "how often watched files are checked",
        default="2",
        type=flags.number(float, minimum=0.05),
    )
    p.option(
        "--shutdown-grace-seconds",
        "time for requests to finish on SIGTERM",
        default="25",
        type=flags.number(float, minimum=0),
    )
    p.option(
        "--readiness-probe-interval-seconds", "upstream probe interval", default="10", type=seconds
    )
    p.option(
        "--tls-handshake-timeout-seconds",
        "time from accept to a done TLS handshake",
        default="10",
        type=flags.number(float, minimum=0.1),
    )
    p.option(
        "--request-head-timeout-seconds",
        "time from the TLS handshake (or a request's first byte) to its complete head",
        default="20",
        type=flags.number(float, minimum=0.1),
    )
    p.option(
        "--idle-timeout-seconds",
        "keep-alive time between a peer's requests",
        default="90",
        type=flags.number(float),
    )
    p.option(
        "--max-unauthenticated-connections",
        "connections not yet authenticated, in total (the oldest is cut for a new one)",
        default="1000",
        type=count,
    )
    p.option(
        "--max-unauthenticated-per-source",
        "connections not yet authenticated per source address (IPv6: per /64); more are reset",
        default="250",
        type=count,
    )
    p.option(
        "--max-request-line-bytes",
        "longest request-target (431 beyond)",
        default="16384",
        type=flags.number(minimum=1024),
    )
    p.option(
        "--max-header-bytes",
        "longest header, name + value (431 beyond)",
        default="16384",
        type=flags.number(minimum=1024),
    )
    p.option(
        "--max-headers",
        "most headers in a request (431 beyond)",
        default="64",
        type=flags.number(minimum=16),
    )
    p.option(
        "--workers",
        f"worker processes sharing the port (SO_REUSEPORT), 1 to {MAX_WORKERS}; "
        "per-peer limits are divided among them (docs/operations.md)",
        default="1",
        type=_workers,
    )
    p.log_options()
    return p


MAX_WORKERS = 64


def _workers(value: str, flag: str) -> int:
    n: int = flags.number()(value, flag)
    if n > MAX_WORKERS:
        raise UserError(f"{flag}: {value!r} is more than {MAX_WORKERS}")
    return n


def _canonical_uuid(value: str, flag: str) -> str:
    canonical = uuids.canonical(value)  # compared in one form everywhere (apiproxy/uuids.py)
    if canonical is None:
        raise UserError(f"{flag}: {value!r} is not a canonical UUID")
    return canonical


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` of parsed flags; reads the upstream's kubeconfig or in-cluster files."""
    if ns.upstream and ns.kubeconfig:
        raise UserError("--upstream and --kubeconfig are mutually exclusive")
    if (ns.upstream_ca or ns.upstream_token_file) and not ns.upstream:
        raise UserError("--upstream-ca and --upstream-token-file need --upstream")
    if ns.context and not ns.kubeconfig:
        raise UserError("--context needs --kubeconfig")
    if ns.upstream:
        up = upstream.from_flags(ns.upstream, ns.upstream_ca, ns.upstream_token_file)
    elif ns.kubeconfig:
        up = upstream.from_kubeconfig(ns.kubeconfig, ns.context)
    else:
        up = upstream.in_cluster()
    return ServeConfig(
        tls_cert=str(ns.tls_cert),
        tls_key=str(ns.tls_key),
        peers=str(ns.peers),
        cluster_uuid=ns.cluster_uuid,
        policy=str(ns.policy),
        upstream=up,
        listen_host=ns.listen[0],
        listen_port=ns.listen[1],
        audit_log=ns.audit_log or None,
        audit_max_bytes=ns.audit_max_bytes,
        audit_backups=ns.audit_backups,
        metrics_listen=ns.metrics_listen,
        max_watch_seconds=ns.max_watch_seconds,
        max_requests_per_peer=ns.max_requests_per_peer,
        max_watches_per_peer=ns.max_watches_per_peer,
        max_body_bytes=ns.max_body_bytes,
        upstream_timeout_seconds=ns.upstream_timeout_seconds,
        upstream_max_connections=ns.upstream_max_connections,
        reload_interval_seconds=ns.reload_interval_seconds,
        shutdown_grace_seconds=ns.shutdown_grace_seconds,
        readiness_probe_interval_seconds=ns.readiness_probe_interval_seconds,
        tls_handshake_timeout_seconds=ns.tls_handshake_timeout_seconds,
        request_head_timeout_seconds=ns.request_head_timeout_seconds,
        idle_timeout_seconds=ns.idle_timeout_seconds,
        max_unauthenticated_connections=ns.max_unauthenticated_connections,
        max_unauthenticated_per_source=ns.max_unauthenticated_per_source,
        max_request_line_bytes=ns.max_request_line_bytes,
        max_header_bytes=ns.max_header_bytes,
        max_headers=ns.max_headers,
    )


def main(argv: Sequence[str], prog: str = "apiproxy serve") -> int:
    ns = build_parser(prog).parse_args(list(argv))
    log.configure(ns.log_format, ns.log_level)
    if ns.workers > 1:  # the supervisor, or one of its workers
        return workers.main(argv, workers=ns.workers, config=lambda: config_from_args(ns))
    run(config_from_args(ns))
    return 0


__all__ = ["MAX_WORKERS", "build_parser", "config_from_args", "main"]
