"""`python -m apiproxy federate` as a real child process, for the shutdown tests against the
simulator (tests/federation/test_shutdown.py) and a real kube-apiserver (tests/real)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.federation.conftest import eventually

REPO = Path(__file__).resolve().parents[2]
# Comfortably more than the 5 s shutdown deadline plus an interpreter's exit on a loaded
# machine, and less than what the hangs the tests arrange would cost: a 30 s kube request
# timeout, a 10 s metadata fetch timeout, a 120 s fault, or forever (a lost cancellation).
SHUTDOWN_BOUND = 10.0


class Federate:
    """One `python -m apiproxy federate` child; its JSON log goes to a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, kubeconfig: Path, tmp: Path, *extra: str) -> Federate:
        """Started with the flags every case shares; `extra` adds or overrides."""
        log = tmp / "federate.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIPROXY_")}
        env["PYTHONPATH"] = str(REPO)
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "apiproxy",
                "federate",
                f"--kubeconfig={kubeconfig}",
                "--cluster-domain=cluster.local",
                "--api-host=api.a.example:4443",
                "--exporter-listen=127.0.0.1:0",
                "--ingress-gateway=192.0.2.10:15443",
                "--identity=federate-a",
                "--log-format=json",
                *extra,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=str(tmp),
                env=env,
            )
        return cls(proc, log)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r.get("event") == name), None)

    def alive(self) -> bool:
        if self.proc.returncode is not None:
            raise AssertionError(f"federate exited early:\n{self.log.read_text()}")
        return True

    async def wait_event(self, name: str, timeout: float = 30) -> dict[str, Any]:  # noqa: ASYNC109
        def seen() -> dict[str, Any] | None:
            self.alive()
            return self.event(name)

        return dict(await eventually(seen, timeout=timeout))

    async def sigterm(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took, awaited within SHUTDOWN_BOUND."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), SHUTDOWN_BOUND)
        except TimeoutError:
            raise AssertionError(
                f"federate still running {SHUTDOWN_BOUND:g}s after SIGTERM:\n"
                + "\n".join(self.log.read_text().splitlines()[-15:])
            ) from None
        return rc, time.monotonic() - started

    def assert_clean_exit(self, rc: int) -> dict[str, Any]:
        text = self.log.read_text()
        assert rc == 0, text
        assert "Traceback" not in text, text
        last = json.loads(text.strip().splitlines()[-1])
        assert last["event"] == "federation_stopped", text
        return dict(last)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class SilentPeer:
    """A loopback TCP server that accepts connections and never sends a byte (a peer whose
    metadata endpoint hangs in the TLS handshake)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> SilentPeer:
        async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.writers.append(w)
            self.connected.set()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()
