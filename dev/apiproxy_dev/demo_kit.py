"""Stand-ins `apiproxy demo` needs around the product: a simulated cluster as Istio leaves it, the
kubelet's projection of a Secret into files, and a client-go-style informer; and the narrator both
demos tell their story with (this one and `scripts/demo --real`, tests/istiod/demo.py).

None of this is deployed; it plays the parts a real cluster plays (kube-apiserver, kubelet, a remote
istiod) so the demo can run on one machine, on loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio import watch as kwatch
from kubernetes_asyncio.client import ApiClient, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from apiproxy import pki
from apiproxy.federation.main import load_crd
from apiproxy.log import get_logger
from apiproxy_dev.sim import SimAPIServer
from apiproxy_dev.sim.seed import Seeded, seed

log = get_logger("apiproxy_dev.demo")

CLUSTER_DOMAIN = "cluster.local"
ISTIO_NAMESPACE = "istio-system"
EXPORT_LABEL = "apiproxy.io/export"  # the shipped policy's namespace selector
PRIVATE_NAMESPACE = "team-private"  # not exported: the demo shows that no peer sees it
APIPROXY_NAMESPACE = "apiproxy-system"


class DeadlineExceeded(Exception):
    """A wait ran past its deadline."""


async def wait_event(
    changed: Callable[[], asyncio.Event],
    predicate: Callable[[], bool],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for an event wait, not a poll
) -> None:
    """Wait until `predicate()` holds, re-checking it whenever the event from `changed()` fires."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await changed().wait()
    except TimeoutError:
        raise DeadlineExceeded(f"not reached within {timeout:g} s") from None


class Notifier:
    """An event that is replaced after each notification, so every waiter sees every change."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def event(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


def reserve_loopback_port() -> int:
    """A free port on 127.0.0.1 for a listener whose address must be known before it starts (the
    api-proxy's address is published by the exporter, as a Service address would be)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------- a simulated cluster


@dataclass
class SimCluster:
    """A simulated kube-apiserver with what an Istio cluster has before apiproxy is installed:
    the `istio-system` and `apiproxy-system` namespaces, the IstioMulticluster CRD, the local Istio
    root (`istio-ca-root-cert`) and the mesh ConfigMap `istio`."""

    name: str
    uuid: str
    sim: SimAPIServer
    istio_root: pki.KeyPair
    serving_ca: pki.KeyPair  # issues the certificates of this cluster's api-proxy and exporter
    directory: Path
    admin: ApiClient | None = None
    seeded: Seeded | None = None
    clients: list[ApiClient] = field(default_factory=list)

    @classmethod
    async def start(cls, name: str, directory: Path) -> SimCluster:
        cluster_uuid = str(uuid.uuid4())
        sim = SimAPIServer(kube_system_uid=cluster_uuid)
        store = sim.store
        for ns in (APIPROXY_NAMESPACE, ISTIO_NAMESPACE):
            store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        store.create(load_crd())
        root = pki.make_ca(f"Istio root CA ({name})")
        store.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio-ca-root-cert", "namespace": ISTIO_NAMESPACE},
                "data": {"root-cert.pem": root.cert_pem},
            }
        )
        mesh = {
            "trustDomain": CLUSTER_DOMAIN,
            "defaultConfig": {"discoveryAddress": "istiod:15012"},
        }
        store.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio", "namespace": ISTIO_NAMESPACE},
                "data": {"mesh": yaml.safe_dump(mesh), "meshNetworks": "networks: {}\n"},
            }
        )
        _mkdir(directory)
        cluster = cls(name, cluster_uuid, sim, root, pki.make_ca(f"{name} ingress CA"), directory)
        try:
            await sim.start()
            cluster.admin = await cluster.client()
        except BaseException:
            await asyncio.shield(cluster.close())
            raise
        return cluster

    async def client(self) -> ApiClient:
        """A kubernetes_asyncio client with the cluster's admin kubeconfig."""
        api = await kconfig.new_client_from_config_dict(self.sim.kubeconfig())
        self.clients.append(api)
        return api

    def seed_workloads(self, *, pods: int, namespaces: int, services_per_namespace: int) -> Seeded:
        """Seeded namespaces are exported to peers (the shipped policy shows a peer only
        istio-system and namespaces labelled EXPORT_LABEL); PRIVATE_NAMESPACE, with one pod, is
        not, so no peer sees it."""
        self.seeded = seed(
            self.sim.store,
            pods=pods,
            namespaces=namespaces,
            services_per_namespace=services_per_namespace,
        )
        store = self.sim.store
        for i in range(namespaces):
            ns = store.get("namespaces", f"ns-{i}")
            ns["metadata"].setdefault("labels", {})[EXPORT_LABEL] = "true"
            store.update(ns)
        store.create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PRIVATE_NAMESPACE}}
        )
        store.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "payroll-0", "namespace": PRIVATE_NAMESPACE},
                "spec": {"containers": [{"name": "app", "image": "payroll:1"}]},
                "status": {"phase": "Running", "podIP": "10.99.0.1"},
            }
        )
        return self.seeded

    def exported_namespaces(self) -> set[str]:
        """What a peer sees through the shipped policy: istio-system and exported namespaces."""
        return {ISTIO_NAMESPACE} | {
            n["metadata"]["name"]
            for n in self.sim.store.list("namespaces")
            if (n["metadata"].get("labels") or {}).get(EXPORT_LABEL) == "true"
        }

    def get(self, resource: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.sim.store.get(resource, name, namespace)
        except Exception:
            return None
        return obj

    def write_serving_files(self) -> tuple[Path, Path, Path]:
        """tls.crt/tls.key for 127.0.0.1 issued by this cluster's ingress CA, and that CA."""
        tls = self.directory / "tls"
        tls.mkdir()
        pair = pki.server_cert_for_loopback(self.serving_ca)
        crt, key, ca = tls / "tls.crt", tls / "tls.key", tls / "ca.crt"
        crt.write_text(pair.cert_pem)
        _write_private(key, pair.key_pem)
        ca.write_text(self.serving_ca.cert_pem)
        return crt, key, ca

    def write_service_account(self) -> tuple[Path, Path]:
        """The projected service-account files of a pod: the kube-apiserver CA and a token."""
        sa = self.directory / "serviceaccount"
        sa.mkdir()
        ca, token = sa / "ca.crt", sa / "token"
        ca.write_text(self.sim.ca_pem)
        _write_private(token, self.sim.token + "\n")
        return ca, token

    async def close(self) -> None:
        for api in self.clients:
            with contextlib.suppress(Exception):
                await api.close()
        self.clients.clear()
        await self.sim.stop()


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------------- kubelet: Secret volume


def project_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` the way the kubelet's AtomicWriter updates a Secret volume: a new timestamped
    directory, the `..data` symlink swapped onto it with one rename, `key -> ..data/key` links, and
    the previous directory removed. A reader sees the old set of files or the new one, never a mix.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
    new = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    for key, content in files.items():
        path = new / key
        path.write_bytes(content)
        path.chmod(0o440)
    data = directory / "..data"
    old = data.resolve() if data.is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(new.name, tmp)
    os.replace(tmp, data)
    for key in files:
        link = directory / key
        if not link.is_symlink():
            os.symlink(f"..data/{key}", link)
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old is not None and old != new and old.parent == directory:
        shutil.rmtree(old, ignore_errors=True)


class SecretVolume:
    """The kubelet's part for a `secret:` volume: watch one Secret and project its keys as files.

    `on_update(keys)` runs after each projection (the demo asks the api-proxy to re-check its
    files, as SIGHUP does, instead of waiting for its polling interval)."""

    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        directory: Path,
        on_update: Callable[[dict[str, bytes]], Awaitable[None]] | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.directory = directory
        self.on_update = on_update
        self.files: dict[str, bytes] | None = None
        self.updates = 0
        self.errors: list[str] = []
        self.changed = Notifier()
        self._task: asyncio.Task[None] | None = None
        self._version = ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"secret-volume-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float) -> None:  # noqa: ASYNC109
        await wait_event(self.changed.event, predicate, timeout=timeout)

    async def _apply(self, secret: Any) -> None:
        rv = str(secret.metadata.resource_version or "")
        if rv and rv == self._version:
            return
        self._version = rv
        files = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        if files == self.files:
            return
        project_files(self.directory, files)
        self.files = files
        self.updates += 1
        if self.on_update is not None:
            try:
                await self.on_update(files)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        self.changed.notify()

    async def _run(self) -> None:
        core = CoreV1Api(self.api)
        selector = f"metadata.name={self.name}"
        delay = 0.1
        while True:
            try:
                listing = await core.list_namespaced_secret(self.namespace, field_selector=selector)
                for secret in listing.items:
                    await self._apply(secret)
                w = kwatch.Watch()
                async with w:
                    async for event in w.stream(
                        core.list_namespaced_secret,
                        self.namespace,
                        field_selector=selector,
                        resource_version=listing.metadata.resource_version,
                        allow_watch_bookmarks=True,
                    ):
                        if event["type"] in ("ADDED", "MODIFIED"):
                            await self._apply(event["object"])
                        delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the kubelet retries; so do we
                log.warning("secret_volume_watch_failed", secret=self.name, error=repr(exc))
            await asyncio.sleep(delay)  # retry backoff after an error, not a wait for an event
            delay = min(delay * 2, 2.0)


# ---------------------------------------------------------------------- informer


@dataclass
class Arrival:
    kind: str  # ADDED / MODIFIED / DELETED
    at: float  # time.perf_counter()


class Informer:
    """client-go's informer in miniature: LIST, then WATCH from the list's resourceVersion, with a
    local cache keyed namespace/name; re-lists after a 410. `arrivals` records when each key's
    latest event came in (perf_counter), so a caller can tell how fresh the cache is."""

    def __init__(self, kind: str, list_func: Callable[..., Awaitable[Any]]) -> None:
        self.kind = kind
        self.list_func = list_func
        self.cache: dict[str, Any] = {}
        self.arrivals: dict[str, Arrival] = {}
        self.synced = asyncio.Event()
        self.events = 0
        self.changed = Notifier()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    @staticmethod
    def key(obj: Any) -> str:
        meta = obj.metadata
        return f"{meta.namespace}/{meta.name}" if meta.namespace else str(meta.name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float) -> None:  # noqa: ASYNC109
        def check() -> bool:
            if self.failure is not None:
                raise self.failure
            return predicate()

        await wait_event(self.changed.event, check, timeout=timeout)

    async def _run(self) -> None:
        try:
            while True:
                listing = await self.list_func()
                self.cache = {self.key(o): o for o in listing.items}
                self.synced.set()
                self.changed.notify()
                try:
                    w = kwatch.Watch()
                    async with w:
                        async for event in w.stream(
                            self.list_func,
                            resource_version=listing.metadata.resource_version,
                            allow_watch_bookmarks=True,
                        ):
                            kind, obj = event["type"], event["object"]
                            if kind == "BOOKMARK":
                                continue
                            key = self.key(obj)
                            if kind == "DELETED":
                                self.cache.pop(key, None)
                            else:
                                self.cache[key] = obj
                            self.arrivals[key] = Arrival(kind, time.perf_counter())
                            self.events += 1
                            self.changed.notify()
                except ApiException as exc:
                    if exc.status != 410:
                        raise
                    # Expired: re-list, like client-go's reflector.
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = exc
            self.changed.notify()


# ---------------------------------------------------------------------- narration

INDENT = "      "  # a step's facts, under its numbered title


class Narrator:
    """Numbered step lines on `out`, each with its facts and how long it took: in milliseconds,
    or in seconds (`seconds=True`) for steps that take that long."""

    def __init__(self, out: TextIO, total_steps: int, *, seconds: bool = False) -> None:
        self.out = out
        self.total_steps = total_steps
        self.seconds = seconds
        self.step = 0
        self._started = time.perf_counter()

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def begin(self, title: str) -> None:
        self.step += 1
        self._started = time.perf_counter()
        self.line()
        self.line(f"[{self.step}/{self.total_steps}] {title}")

    def say(self, text: str) -> None:
        for line in text.splitlines():
            self.line(INDENT + line)

    def done(self) -> None:
        took = time.perf_counter() - self._started
        self.line(
            f"{INDENT}ok ({took:.1f} s)" if self.seconds else f"{INDENT}ok ({took * 1000:.0f} ms)"
        )
