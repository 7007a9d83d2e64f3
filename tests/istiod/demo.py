"""`./scripts/demo --real`: the two-cluster story on real binaries, narrated.

Two clusters, each with etcd, kube-apiserver and kube-controller-manager (built from Go modules and
cached, as the istiod tier uses them), `apiproxy serve`, `apiproxy federate` and a real istiod
(pilot-discovery). IstioMulticluster objects join them both ways; then each istiod's own debug
endpoints show what it sees of the other: the peer cluster synced, the peer's Service endpoints
under the peer's cluster ID, the peer's network and east-west gateway, the peer's root trusted.
Everything is torn down at the end.

Components write their logs into a work folder; they are shown (with the folder's path) only when a
step fails. Run from a checkout with the test extra installed (`scripts/demo --real` does both).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from apiproxy import pki
from apiproxy_dev.demo_kit import Narrator
from tests.istiod.mesh import ROOT, Side, start_clusters, wait_until
from tests.real.cluster import KubeCluster

TOTAL_STEPS = 8
NS = "shop"
HOST = f"web.{NS}.svc.cluster.local"
WAIT = 120.0  # seconds: the longest one step waits for istiod


class StepFailed(Exception):
    pass


def fingerprint(pem: str) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    der = pki.load_certs(pem)[0].public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 16, 2)) + "..."


class Story(Narrator):
    def __init__(self, work: Path, out: Any = sys.stdout) -> None:
        super().__init__(out, TOTAL_STEPS, seconds=True)  # steps take seconds here, not ms
        self.work = work
        self.started = time.monotonic()
        self.kubes: list[KubeCluster] = []
        self.sides: list[Side] = []
        self.ca = pki.make_ca("demo CA")
        self.ips: dict[str, set[str]] = {}

    # -- the steps ------------------------------------------------------------------------------

    def binaries(self) -> None:
        self.begin("Binaries: Kubernetes, etcd and istiod built from Go modules, or the cache")
        for env, script, what in (
            ("KUBEBUILDER_ASSETS", "kube-assets", "kube-apiserver, kube-controller-manager, etcd"),
            ("ISTIOD", "istiod", "istiod (pilot-discovery)"),
        ):
            if os.environ.get(env):
                self.say(f"{what}: {os.environ[env]} (from {env})")
                continue
            log = self.work / f"build-{script}.log"
            self.say(f"{what}: scripts/{script} (a first build takes minutes; log: {log})")
            t0 = time.monotonic()
            with log.open("w") as err:
                done = subprocess.run(
                    [str(ROOT / "scripts" / script)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    check=False,
                )
            if done.returncode != 0:
                raise StepFailed(f"scripts/{script} failed; its log: {log}")
            os.environ[env] = done.stdout.strip()
            self.say(f"  -> {os.environ[env]} ({time.monotonic() - t0:.1f} s)")
        assets = Path(os.environ["KUBEBUILDER_ASSETS"])
        for name, argv in (
            ("kube-apiserver", [str(assets / "kube-apiserver"), "--version"]),
            ("etcd", [str(assets / "etcd"), "--version"]),
        ):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            first = (done.stdout or done.stderr).strip().splitlines()
            self.say(f"{name}: {first[0] if first else '?'}")
        # pilot-discovery built from modules reports no version: the pin is the wrapper's.
        gomod = (ROOT / "tools" / "istiod" / "go.mod").read_text().split()
        pin = gomod[gomod.index("istio.io/istio") + 1] if "istio.io/istio" in gomod else "?"
        self.say(f"istiod: istio.io/istio {pin}")
        self.done()

    def clusters(self) -> None:
        self.begin("Two clusters on loopback: etcd, kube-apiserver, kube-controller-manager each")
        assets = Path(os.environ["KUBEBUILDER_ASSETS"])
        self.kubes = [KubeCluster(assets, name=n) for n in ("alpha", "beta")]
        start_clusters(self.kubes)
        for k in self.kubes:
            uid = k.ok("GET", "/api/v1/namespaces/kube-system")["metadata"]["uid"]
            self.say(f"{k.name}: kube-apiserver {k.url}, cluster UUID (kube-system uid) {uid}")
        self.done()

    def components(self) -> None:
        self.begin("On each: deploy/base, apiproxy serve, apiproxy federate, istiod")
        tls = pki.server_cert_for_loopback(self.ca)
        for kube, gw in zip(self.kubes, ("192.0.2.10", "192.0.2.20"), strict=True):
            side = Side(
                kube.name, kube, self.work / kube.name, tls, pki.make_ca(f"istio root {kube.name}")
            )
            self.sides.append(side)
            side.prepare(gw)
            side.start_proxy()
            side.start_federate()
            side.start_istiod(Path(os.environ["ISTIOD"]))
            assert side.istiod is not None
            self.say(
                f"{side.name}: cluster ID {side.cluster_id}, network {side.network}\n"
                f"  api-proxy https://127.0.0.1:{side.proxy_port} (policy istio-remote.yaml), "
                f"exporter {side.exporter_url}\n"
                f"  istiod debug http://127.0.0.1:{side.istiod.http_port}/debug/, "
                f"root CA {fingerprint(side.root.cert_pem)}"
            )
        self.done()

    def workloads(self) -> None:
        self.begin("A Service `web` with two ready pods in each cluster (the demo plays kubelet)")
        for side, net in zip(self.sides, ("10.10.0", "10.20.0"), strict=True):
            side.service(NS, "web", "web")
            for n in (1, 2):
                side.run_pod(NS, f"web-{n}", "web", f"{net}.{n}")
            self.ips[side.name] = {f"{net}.1", f"{net}.2"}
            self.say(f"{side.name}: web-1 {net}.1, web-2 {net}.2 (Running, Ready)")
        self.done()

    def federate(self) -> None:
        self.begin("Federate: an IstioMulticluster on each side, pointing at the other")
        a, b = self.sides
        a.join(b, b.name, self.ca.cert_pem)
        b.join(a, a.name, self.ca.cert_pem)
        for side, peer in ((a, b), (b, a)):
            secret, took = self.remote_secret(side, peer)
            ((cid, value),) = secret["data"].items()
            kc = yaml.safe_load(base64.b64decode(value))
            server = kc["clusters"][0]["cluster"]["server"]
            self.say(
                f"{side.name}: secret istio-system/istio-remote-secret-{peer.name} "
                f"({took:.1f} s), key {cid}\n"
                f"  server {server} = {peer.name}'s api-proxy, not its kube-apiserver"
            )
            if server != f"https://127.0.0.1:{peer.proxy_port}":
                raise StepFailed(f"remote secret points at {server}, not {peer.name}'s proxy")
        self.done()

    @staticmethod
    def remote_secret(side: Side, peer: Side) -> tuple[dict[str, Any], float]:
        path = f"/api/v1/namespaces/istio-system/secrets/istio-remote-secret-{peer.name}"

        def written() -> dict[str, Any] | None:
            status, out = side.kube.request("GET", path)
            return out if status == 200 else None

        return wait_until(
            written, WAIT, f"{side.name}'s federation writes the remote secret for {peer.name}"
        )

    def views(self) -> None:
        self.begin("What each istiod sees of the other (its own /debug endpoints)")
        for side, peer in (tuple(self.sides), tuple(reversed(self.sides))):
            istiod = side.istiod
            assert istiod is not None
            wait_until(
                lambda: istiod.clusters().get(peer.cluster_id) == "synced" or None,  # noqa: B023
                WAIT,
                f"{side.name}'s istiod lists {peer.name} as synced",
            )
            want = self.ips[peer.name]
            wait_until(
                lambda: istiod.ready_ips(HOST, NS, peer.cluster_id) == want or None,  # noqa: B023
                WAIT,
                f"{side.name}'s istiod holds {peer.name}'s web endpoints {sorted(want)}",
            )
            clusters = istiod.clusters()
            gateways = [g for g in istiod.debug("networkz") or [] if g["Network"] == peer.network]
            addr, port = peer.gateway.rsplit(":", 1)
            if not any(g["Addr"] == addr and int(g["Port"]) == int(port) for g in gateways):
                raise StepFailed(f"{side.name}'s istiod has no gateway {peer.gateway}: {gateways}")
            roots = [c.get("pem", "") for c in istiod.debug("mesh").get("caCertificates") or []]
            if [r.strip() for r in roots] != [peer.root.cert_pem.strip()]:
                raise StepFailed(f"{side.name}'s istiod does not trust exactly {peer.name}'s root")
            eps = istiod.endpoints(HOST, NS, peer.cluster_id)
            self.say(
                f"{side.name}'s istiod:\n"
                f"  /debug/clusterz        "
                + ", ".join(f"{c} {s}" for c, s in sorted(clusters.items()))
                + "\n"
                f"  /debug/endpointShardz  {HOST} from {peer.cluster_id}: "
                + ", ".join(
                    f"{a}:{ep['EndpointPort']}"
                    for ep in sorted(eps, key=lambda e: e["Addresses"])
                    for a in ep["Addresses"]
                )
                + f" (network {eps[0]['Network']})\n"
                f"  /debug/networkz        {peer.network} via gateway {addr}:{port}\n"
                f"  /debug/mesh            caCertificates: {peer.name}'s root "
                f"{fingerprint(roots[0])}"
            )
        self.done()

    def audit(self) -> None:
        self.begin("What the api-proxies let through (their audit logs)")
        for side, peer in (tuple(self.sides), tuple(reversed(self.sides))):
            # istiod's watches are still open: their ResponseStarted records count, once each.
            by_id: dict[str, dict[str, Any]] = {}
            for r in side.proxy_audit():
                merged = by_id.setdefault(r["auditID"], {**r, "annotations": {}})
                merged["annotations"].update(r.get("annotations") or {})
            records = list(by_id.values())
            users = sorted({r["user"]["username"] for r in records})
            resources = sorted(
                {str((r.get("objectRef") or {}).get("resource")) for r in records} - {"None"}
            )
            secrets = [
                r for r in records if (r.get("objectRef") or {}).get("resource") == "secrets"
            ]
            empty = all(r["annotations"].get("apiproxy.io/view") == "empty" for r in secrets)
            if users != [f"peer:{peer.name}"]:
                raise StepFailed(f"{side.name}'s proxy audited {users}, not only {peer.name}")
            if not secrets:
                raise StepFailed(f"{peer.name}'s istiod asked {side.name}'s proxy for no secrets")
            self.say(
                f"{side.name}'s api-proxy: {len(records)} requests so far, all from {users[0]}\n"
                f"  resources: {', '.join(resources)}\n"
                f"  secrets: {len(secrets)} request{'s' if len(secrets) != 1 else ''}, "
                + ("all answered by the empty view" if empty else "NOT all empty")
            )
            if not empty:
                raise StepFailed("a secrets request got more than the empty view")
        self.done()

    def teardown(self) -> None:
        self.begin("Tear down")
        self.stop()
        self.say("istiods, federation controllers, api-proxies, kube-apiservers and etcds stopped")
        self.done()

    def stop(self, keep_logs: bool = False) -> None:
        for side in self.sides:
            side.stop()
        self.sides = [] if not keep_logs else self.sides
        for kube in self.kubes:
            if not hasattr(kube, "workdir"):
                continue
            if keep_logs:
                dest = self.work / f"kube-{kube.name}"
                dest.mkdir(exist_ok=True)
                for log in kube.workdir.glob("*.log"):
                    shutil.copy(log, dest / log.name)
            kube.stop()
        self.kubes = []

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        steps: list[Callable[[], None]] = [
            self.binaries,
            self.clusters,
            self.components,
            self.workloads,
            self.federate,
            self.views,
            self.audit,
        ]
        self.line("apiproxy, the real story: two clusters, two istiods, each reading the other")
        self.line(f"(component logs: {self.work})")
        try:
            for step in steps:
                step()
            for side in self.sides:
                side.check_alive()
            self.teardown()
        except (Exception, KeyboardInterrupt) as exc:
            why = str(exc) if isinstance(exc, StepFailed | AssertionError) else repr(exc)
            self.line()
            self.line(f"FAILED: step {self.step}: {why}")
            if not isinstance(exc, StepFailed | AssertionError):
                self.line(traceback.format_exc())
            self.stop(keep_logs=True)
            self.line(f"component logs kept in {self.work}:")
            for log in sorted(self.work.rglob("*.log")):
                self.line(f"  {log}")
            return 1
        total = time.monotonic() - self.started
        self.line()
        self.line(f"All {TOTAL_STEPS} steps did what they said ({total:.0f} s).")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo --real",
        description="Play the two-cluster story on real Kubernetes and istiod binaries.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="apiproxy-demo-real-"))
    code = Story(work).run()
    if code == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif code == 0:
        print(f"work folder kept: {work}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
