"""What every benchmark shares: processes, ports, the peer's files, `apiproxy serve`, nginx,
results. `bench.run`, `bench.compare`, `bench.real`, `bench.soak` and `bench.rotation` use it;
so should a new bench.

Processes
    `Child(name, argv, cpus, log)` starts a process in its own process group, pinned to `cpus`,
    stdin/stdout as JSON lines (`send`, `json_line`, `line`), stderr to the file `log`
    (`log_event` reads structured log records from it); `stop()` ends the whole group.
    `CPUS.hop` / `CPUS.rest`: the hop under test gets CPU 0, everything else the others
    (`CPUS.off()` for --no-pin). `memory`, `reset_peak`, `children`, `cpu_seconds`: /proc figures.

Ports: never picked and released (another process could take the port in between)
    - a child that can bind port 0 does, and says which port it got: `apiproxy serve
      --listen=127.0.0.1:0` (`serving_url` reads its `serving` log record), the simulator,
      `bench.upstream` and the Go programs (a JSON line or a line on stdout);
    - nginx cannot say: `HeldPort()` binds a port with SO_REUSEPORT and holds it (bound, never
      listening, so no connection lands on it) while nginx binds it too (`listen ... reuseport`,
      `nginx_server`); close it when the run ends.

Files: `BenchFiles.write(work, policy)`: serving CA and certificate, a peer with a JWT key (and a
client certificate for mTLS), `peers.yaml`, `policy.yaml`, all in `work`.

apiproxy: `serve_argv(files, upstream...)` is `apiproxy serve`'s command line for a bench (port 0,
JSON logs, limits far above any load); `serving_url(child)` waits for it to serve.

nginx: `nginx_exe()`, and `nginx_conf(work, name, servers, upstreams)` with `nginx_server(...)`
blocks and `nginx_proxy(...)` directives: one worker, TLS, no buffering, upstream keep-alive.

Results: `new_result(kind, module, argv, sizes)` (schema, when, command, machine, load average),
`write_result(out, result)` (atomically), `raise_nofile_limit()`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import queue
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import __version__, pki, tokens
from tests.proxy.data import POLICY as POLICY  # also bench.filtering's

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLUSTER_UUID = "11111111-1111-4111-8111-111111111111"  # the proxy's cluster: the JWT audience
PEER_UUID = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
PEER_NAME = "bench-peer"
SMALL_PATH = "/api/v1/namespaces/small/pods/small-0"  # the readiness check of every hop


def say(msg: str) -> None:
    """Progress for the person running the bench (stderr; stdout is the result)."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- processes


class Cpus:
    """Where processes run: the hop under test on the first CPU, everything else (upstream,
    clients) on the others, as a pod with one CPU would; None, None below two CPUs or after
    `off()`."""

    def __init__(self) -> None:
        avail = sorted(os.sched_getaffinity(0))
        self.hop: set[int] | None = {avail[0]} if len(avail) >= 2 else None
        self.rest: set[int] | None = set(avail[1:]) if len(avail) >= 2 else None

    def off(self) -> None:
        self.hop = self.rest = None


CPUS = Cpus()


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def fn() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        os.setpgrp()  # our children's children go when we kill the group

    return fn


class Child:
    """A child process with line-oriented stdin/stdout (JSON lines), stderr to `log`, bounded
    reads."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cpus: set[int] | None,
        log: Path,
        *,
        cwd: Path = ROOT,
        **kw: Any,
    ) -> None:
        self.name = name
        self.log = log
        self._err = log.open("ab")
        self._log_start = self._err.tell()  # a restarted child appends to the same log
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            preexec_fn=_preexec(cpus),
            cwd=cwd,
            **kw,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float) -> str:
        """The next line of stdout; an error naming the log if none comes or the child exits."""
        try:
            line = self._lines.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            self.stop()
            raise RuntimeError(
                f"{self.name}: no answer in {timeout:.0f}s; see {self.log}"
            ) from None
        if not line:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {tail}")
        return line.decode().strip()

    def json_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON object on stdout (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.line(deadline - time.monotonic())
            if text.startswith("{"):
                out: dict[str, Any] = json.loads(text)
                return out

    def log_event(self, event: str, timeout: float) -> dict[str, Any]:
        """The first JSON log record named `event` this child wrote to its log (apiproxy's
        `--log-format=json` on stderr): read as it grows, until `timeout`."""
        deadline = time.monotonic() + timeout
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            while True:
                line = f.readline()
                if line.endswith(b"\n"):
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and record.get("event") == event:
                            return record
                    continue
                f.seek(-len(line), os.SEEK_CUR)  # a partial line: read it again whole
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name}: no {event!r} in {timeout:.0f}s; {self.log}")
                time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"{self.name}: did not finish in {timeout:.0f}s") from None

    def stop(self, sig: int = 15) -> int | None:
        """End the process group (`sig`, then SIGKILL after 15 s); its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=15)
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        self._err.close()
        return self.proc.returncode


def memory(pid: int) -> dict[str, int]:
    """Bytes: rss and hwm from /proc/<pid>/status, uss (private) and pss from smaps_rollup."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key[2:].lower()] = int(value.split()[0]) * 1024
    with contextlib.suppress(OSError):
        uss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty"):
                uss += int(value.split()[0]) * 1024
            elif key == "Pss":
                out["pss"] = int(value.split()[0]) * 1024
        out["uss"] = uss
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (proc(5): writing 5 to clear_refs); False when not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ------------------------------------------------------------------------------------------ ports


class HeldPort:
    """A loopback TCP port held for a child that cannot bind port 0 and say which it got
    (nginx): bound with SO_REUSEPORT and never listening, so no connection lands on it and no
    other process can take the port; the child binds it too with SO_REUSEPORT (nginx: `listen
    ... reuseport`). Keep it until the child has stopped, then `close()`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, 0))
        self.host = host
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_http(url: str, token: str, path: str = SMALL_PATH, timeout: float = 60) -> None:
    """Until `url` answers GET `path` with 200 (TLS not verified: readiness only)."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.partition(":")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        conn: http.client.HTTPConnection
        if scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # readiness only; clients verify
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=5)
        else:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {timeout:.0f}s: {last}")


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class BenchFiles:
    """The files a hop and its clients need, in `work`: tls.crt/tls.key (serving, loopback),
    ca.crt (their CA), peers.yaml (one peer: `PEER_NAME`, JWT key, client CA), policy.yaml,
    peer-jwt.pub, client.crt/client.key (the peer's mTLS certificate); `jwt`, a peer token for
    `CLUSTER_UUID` valid three hours."""

    work: Path
    jwt: str

    @property
    def ca_file(self) -> Path:
        return self.work / "ca.crt"

    @classmethod
    def write(cls, work: Path, policy: str = POLICY) -> BenchFiles:
        ca = pki.make_ca("bench CA")
        server = pki.server_cert_for_loopback(ca)
        client_ca = pki.make_ca("bench peer CA")
        client = pki.issue(client_ca, "istiod", client=True)
        key = ed25519.Ed25519PrivateKey.generate()
        pub = tokens.public_key_pem(key)
        texts = {
            "ca.crt": ca.cert_pem,
            "tls.crt": server.cert_pem,
            "tls.key": server.key_pem,
            "client.crt": client.cert_pem,
            "client.key": client.key_pem,
            "peer-jwt.pub": pub,
            "policy.yaml": policy,
            "peers.yaml": f"peers:\n  - name: {PEER_NAME}\n    clusterUUID: {PEER_UUID}\n"
            + f"    clientCA: |\n{_indent(client_ca.cert_pem)}"
            + f"    jwtPublicKey: |\n{_indent(pub)}",
        }
        for name, text in texts.items():
            (work / name).write_text(text)
        for secret in ("tls.key", "client.key"):
            (work / secret).chmod(0o600)
        jwt = tokens.mint(
            key, subject=PEER_UUID, audience=CLUSTER_UUID, scope="api", ttl_seconds=3 * 3600
        )
        return cls(work, jwt)


def _indent(pem: str) -> str:
    return "".join(f"      {line}\n" for line in pem.strip().splitlines())


# ---------------------------------------------------------------------------------------- apiproxy


def serve_argv(
    files: BenchFiles,
    *,
    upstream: str | None = None,
    upstream_ca: str | Path | None = None,
    token_file: str | Path | None = None,
    kubeconfig: str | Path | None = None,
    audit_log: str | Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """`apiproxy serve` on a port the kernel picks (`serving_url` reads it back), in front of
    `upstream` (with its CA and token file) or `kubeconfig`; JSON logs on stderr; per-peer
    limits far above any bench load. `extra`: more flags (they win: argparse keeps the last)."""
    argv = [
        sys.executable,
        "-m",
        "apiproxy",
        "serve",
        "--listen=127.0.0.1:0",
        f"--tls-cert={files.work / 'tls.crt'}",
        f"--tls-key={files.work / 'tls.key'}",
        f"--peers={files.work / 'peers.yaml'}",
        f"--cluster-uuid={CLUSTER_UUID}",
        f"--policy={files.work / 'policy.yaml'}",
        f"--audit-log={audit_log}",
        "--max-watches-per-peer=100000",
        "--max-requests-per-peer=10000",
        "--log-format=json",
    ]
    if upstream is not None:
        argv.append(f"--upstream={upstream}")
    if upstream_ca is not None:
        argv.append(f"--upstream-ca={upstream_ca}")
    if token_file is not None:
        argv.append(f"--upstream-token-file={token_file}")
    if kubeconfig is not None:
        argv.append(f"--kubeconfig={kubeconfig}")
    return [*argv, *extra]


def serving_url(child: Child, timeout: float = 60) -> str:
    """`https://127.0.0.1:PORT` of an `apiproxy serve` child, from its `serving` log record
    (with `--workers`, the supervisor's and every worker's name the same port)."""
    listen = str(child.log_event("serving", timeout)["listen"])
    return f"https://127.0.0.1:{listen.rsplit(':', 1)[1]}"


# ------------------------------------------------------------------------------------------- nginx


def nginx_exe() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def nginx_argv(exe: str, work: Path, conf: Path) -> list[str]:
    return [exe, "-p", str(work), "-c", str(conf), "-e", str(conf.with_suffix(".error.log"))]


def nginx_conf(
    work: Path,
    name: str,
    servers: Sequence[str],
    *,
    upstreams: Mapping[str, str] | None = None,
    http: str = "",
    access_log: bool = True,
) -> str:
    """One nginx (one worker, in the foreground) whose files are `work/<name>-*`: `servers`
    (`nginx_server` blocks), `upstreams` (name → host:port, kept alive), `http`: more
    directives of the http block (`nginx_proxy()`); `access_log=False` for an upstream (a hop
    under test logs each request, as apiproxy's audit log does)."""
    ups = "".join(
        f"  upstream {u} {{ server {addr}; keepalive 256; keepalive_requests 10000000; "
        "keepalive_timeout 600s; }\n"
        for u, addr in (upstreams or {}).items()
    )
    user = "root root" if os.geteuid() == 0 else "nobody"
    temps = "".join(
        f"  {kind}_temp_path {work}/{name}-{kind.split('_')[0]};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"user {user};\nworker_processes 1;\nworker_rlimit_nofile 40000;\ndaemon off;\n"
        f"master_process on;\npid {work}/{name}.pid;\nerror_log {work}/{name}-error.log warn;\n"
        "events { worker_connections 30000; }\nhttp {\n"
        f"  access_log {f'{work}/{name}-access.log' if access_log else 'off'};\n{temps}"
        "  keepalive_requests 10000000;\n  keepalive_timeout 600s;\n"
        f"{ups}{http}{''.join(servers)}}}\n"
    )


def nginx_server(port: HeldPort, files: BenchFiles, body: str) -> str:
    """A TLS server block on a held port (`reuseport`: it binds next to the holder)."""
    w = files.work
    return (
        f"  server {{\n    listen {port.host}:{port.port} ssl reuseport;\n"
        f"    ssl_certificate {w}/tls.crt;\n    ssl_certificate_key {w}/tls.key;\n"
        f"    ssl_protocols TLSv1.2 TLSv1.3;\n{body}  }}\n"
    )


def nginx_proxy(token: str, *, verify_ca: Path | None = None, tls_upstream: bool = False) -> str:
    """The reverse proxy's directives: HTTP/1.1 keep-alive upstream, the upstream's token, no
    buffering either way; over TLS (`tls_upstream`), verified against `verify_ca` if given."""
    out = (
        '  proxy_http_version 1.1;\n  proxy_set_header Connection "";\n'
        f'  proxy_set_header Authorization "Bearer {token}";\n'
        "  proxy_buffering off;\n  proxy_request_buffering off;\n  proxy_read_timeout 3600s;\n"
    )
    if tls_upstream:
        out += "  proxy_ssl_session_reuse on;\n"
        if verify_ca is not None:
            out += (
                f"  proxy_ssl_trusted_certificate {verify_ca};\n  proxy_ssl_verify on;\n"
                "  proxy_ssl_name localhost;\n"
            )
        else:
            out += "  proxy_ssl_verify off;\n"
    return out


# ---------------------------------------------------------------------------------------- results


def raise_nofile_limit(want: int = 40_000) -> None:
    """Thousands of watches: as many open files as the hard limit allows, up to `want`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
            return None
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (p.stdout + p.stderr).strip().splitlines()
        return text[0] if text else None

    import aiohttp

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:  # pragma: no cover
        uv = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    nginx = nginx_exe()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "apiproxy": __version__,
        "commit": commit,
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "nginx": version([nginx, "-v"]) if nginx else None,
        "wrk": version(["wrk", "-v"]),
        "pinning": {
            "hop": sorted(CPUS.hop) if CPUS.hop else None,
            "upstream_and_clients": sorted(CPUS.rest) if CPUS.rest else None,
        },
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def new_result(kind: str, module: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The head of every results file: schema, kind, when, the command, the machine."""
    return {
        "schema": 1,
        "kind": kind,
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(
            [".venv/bin/python", "-m", module, *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine(),
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Replace `out` with the results JSON at once, so an interrupted run never leaves half a
    file where the README's figures come from (every bench entry point writes through here)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(out)
