"""`apiproxy sim`: run the simulated kube-apiserver standalone (development tool)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from apiproxy import flags
from apiproxy import log as logging_
from apiproxy.errors import UserError


def _parser(prog: str) -> flags.Parser:
    p = flags.Parser(
        prog=prog,
        description="Run the simulated Kubernetes API server (a development and test tool).",
    )
    p.option(
        "--listen",
        "HOST:PORT to serve on (:PORT means 127.0.0.1)",
        default="127.0.0.1:6443",
        type=flags.listen_address("127.0.0.1"),
    )
    p.option("--tls-cert", "serving certificate (PEM); default: self-made", type=flags.path())
    p.option("--tls-key", "its private key (PEM)", type=flags.path())
    p.switch("--plain-http", "serve HTTP without TLS")
    p.option("--token", "bearer token clients must send (default: random)")
    p.option("--pods", "seed this many realistic pods", default="0", type=flags.number(minimum=0))
    p.option("--namespaces", "namespaces to spread them over", default="10", type=flags.number())
    p.option(
        "--churn",
        "change seeded pods at this rate",
        default="0",
        type=flags.number(float, minimum=0),
        metavar="PER_SECOND",
    )
    p.option("--kube-system-uid", "fixed uid of the kube-system namespace")
    p.option("--kubeconfig", "where to write the kubeconfig", type=flags.path(must_exist=False))
    p.log_options(log_format=False)
    return p


async def _serve(args: argparse.Namespace) -> int:
    from apiproxy_dev.sim.seed import Churn, seed
    from apiproxy_dev.sim.server import SimAPIServer
    from apiproxy_dev.sim.store import Store

    store = Store(kube_system_uid=args.kube_system_uid)
    if args.pods:
        seed(store, pods=args.pods, namespaces=args.namespaces)
    host, port = args.listen
    try:
        sim = SimAPIServer(
            host=host,
            port=port,
            tls=not args.plain_http,
            token=args.token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            store=store,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot use the TLS files: {exc}") from None
    try:
        await sim.start()
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    kubeconfig = args.kubeconfig or Path(tempfile.mkdtemp(prefix="apiproxy-sim-")) / "kubeconfig"
    sim.write_kubeconfig(kubeconfig)
    churn = Churn(store, args.churn) if args.churn > 0 else None
    if churn is not None:
        churn.start()
    print(f"apiproxy sim: serving {sim.url}; kubeconfig {kubeconfig} (Ctrl-C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if churn is not None:
            await churn.stop()
        await sim.stop()
    return 0


def main(argv: list[str], prog: str = "apiproxy sim") -> int:
    args = _parser(prog).parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    if args.plain_http and args.tls_cert:
        raise UserError("--plain-http and --tls-cert exclude each other")
    logging_.configure(level=args.log_level)
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return int(runner.run(_serve(args)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
