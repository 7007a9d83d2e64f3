"""The project's image, built by scripts/image and run with podman the way deploy/ runs it.

`Container.run` applies the pods' securityContext as container flags: read-only root filesystem
with only /tmp writable (the 16 MiB in-memory emptyDir), user and group 65532, every capability
dropped, no privilege escalation, the runtime's default seccomp profile. Host network: every
server in the tests binds 127.0.0.1. podman needs runc and explicit ulimits on these machines
(docs/deploy.md, "Build the image").
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conftest import REPO

UID = 65532  # deploy/: runAsUser, runAsGroup; the Dockerfile's USER
BUILD_TIMEOUT = 1200.0  # a fresh machine: the Debian stand-in base (~3 min) plus the build

ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# deploy/base/*-deployment.yaml's securityContext and /tmp emptyDir, as podman flags.
SECURITY = [
    "--read-only",
    "--read-only-tmpfs=false",  # only what deploy/ makes writable: /tmp
    "--tmpfs",
    "/tmp:rw,size=16m,mode=1777",
    f"--user={UID}:{UID}",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


def podman() -> list[str]:
    """podman with the OCI runtime scripts/image uses (runc where installed)."""
    exe = shutil.which("podman")
    assert exe, "podman not found: ./scripts/ensure-tools installs it (with runc)"
    runtime = os.environ.get("APIPROXY_OCI_RUNTIME") or ("runc" if shutil.which("runc") else "")
    return [exe, "--runtime", runtime] if runtime else [exe]


def built_image() -> str:
    """APIPROXY_IMAGE (scripts/test sets it), else what `scripts/image --host-ca` prints last.
    scripts/image reuses an image built from the same sources, so this is fast after the first
    build; a failed build fails the test, never skips it."""
    name = os.environ.get("APIPROXY_IMAGE")
    if name:
        return name
    done = subprocess.run(
        [str(REPO / "scripts" / "image"), "--host-ca"],
        env={**os.environ, "APIPROXY_ENGINE": "podman"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"scripts/image failed:\n{done.stderr[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


def limit_flags(limits: dict[str, str]) -> list[str]:
    """Kubernetes quantities as podman flags: cpu "1" or "500m", memory "512Mi"."""
    flags = []
    if "cpu" in limits:
        cpu = limits["cpu"]
        cpus = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        flags.append(f"--cpus={cpus:g}")
    if "memory" in limits:
        mem = limits["memory"]
        units = {"Ki": "k", "Mi": "m", "Gi": "g"}
        assert mem[-2:] in units, f"memory limit {mem}: expected Ki, Mi or Gi"
        flags.append(f"--memory={mem[:-2]}{units[mem[-2:]]}")
    return flags


def give_to_container_user(*paths: Path) -> None:
    """What the kubelet's fsGroup does for a pod's volumes: the container's user may read (and
    for the audit folder, write) them. As root, chown; rootless, inside podman's user namespace."""
    for path in paths:
        if os.geteuid() == 0:
            for p in [path, *path.rglob("*")]:
                os.chown(p, UID, UID)
        else:
            subprocess.run(
                [*podman(), "unshare", "chown", "-R", f"{UID}:{UID}", str(path)],
                check=True,
                timeout=30,
            )


@dataclass
class Container:
    """One `podman run` of the image in the foreground; its output is read line by line."""

    name: str
    proc: subprocess.Popen[bytes]
    started: float
    log: list[str] = field(default_factory=list)
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @classmethod
    def run(
        cls,
        image: str,
        args: list[str],
        *,
        mounts: dict[str, Path],
        writable: frozenset[str] = frozenset(),
        env: dict[str, str] | None = None,
        entrypoint: str | None = None,
        limits: dict[str, str] | None = None,
    ) -> Container:
        """`mounts`: container path -> host folder, read-only unless the path is in `writable`.
        `limits`: a container's `resources.limits` from deploy/ (cpu, memory)."""
        name = f"apiproxy-test-{uuid.uuid4().hex[:10]}"
        argv = [*podman(), "run", "--rm", f"--name={name}", "--network=host", *ULIMITS, *SECURITY]
        argv += limit_flags(limits or {})
        for target, source in mounts.items():
            mode = "rw" if target in writable else "ro"
            argv.append(f"--volume={source}:{target}:{mode}")
        for k, v in (env or {}).items():
            argv.append(f"--env={k}={v}")
        if entrypoint:
            argv.append(f"--entrypoint={entrypoint}")
        argv += [image, *args]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        c = cls(name, proc, started)
        threading.Thread(target=c._pump, daemon=True).start()
        return c

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.append(line)
            self._lines.put(line)
        self._lines.put("")  # end of output: the container is gone

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log[-n:])

    def wait_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first structured log record with this event name (JSON logs)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"no {event!r} in {timeout:.0f}s:\n{self.log_tail()}"
                ) from None
            if not line:
                raise AssertionError(f"container exited before {event!r}:\n{self.log_tail()}")
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    return record

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A process beside the entrypoint, with the container's user, capabilities, filesystem."""
        return subprocess.run(
            [*podman(), "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def terminate(self, grace: float) -> tuple[int, float]:
        """SIGTERM, as the kubelet sends it; (exit code, seconds until the container was gone).
        The wait is bounded by the pod's grace period: a container still running then fails."""
        sent = time.monotonic()
        subprocess.run(
            [*podman(), "kill", "--signal=TERM", self.name],
            capture_output=True,
            timeout=30,
            check=True,
        )
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {grace:.0f}s after SIGTERM:\n{self.log_tail()}"
            ) from None
        return code, time.monotonic() - sent

    def remove(self) -> None:
        """Cleanup after a failed test: the container must not outlive it."""
        if self.proc.poll() is None:
            subprocess.run(
                [*podman(), "rm", "--force", "--time=0", self.name],
                capture_output=True,
                timeout=60,
                check=False,
            )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
