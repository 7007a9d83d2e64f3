"""apiproxy against the same upstream reached directly and through nginx: one command, one table.

    .venv/bin/python -m bench.run          full run (~8 minutes), writes bench/results/latest.json
    .venv/bin/python -m bench.run --smoke  about a minute, tiny sizes (tests run this)

Contenders, all in front of one simulated kube-apiserver process (`bench.upstream`, plain HTTP,
50,000 seeded Istio-injected pods):
  direct    clients talk to the simulator itself (its bearer token)
  nginx     Debian's nginx, one worker, TLS in front, `proxy_buffering off`, upstream keep-alive,
            adds the upstream token (skipped with a note when nginx is not installed)
  apiproxy  `apiproxy serve` (uvloop), TLS in front, a peer JWT per request, policy, audit log to a
            file; the same upstream token file

On two or more cores the hop under test (nginx or apiproxy) is pinned to CPU 0 and everything else
(simulator, wrk, Python clients) to CPU 1, so the hop gets one core, as a pod with one CPU would.
Contenders run alternately (the order rotates each repeat); figures are medians with min-max spread.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.harness import (
    CPUS,
    RESULTS,
    ROOT,
    SMALL_PATH,
    BenchFiles,
    Child,
    HeldPort,
    memory,
    new_result,
    nginx_argv,
    nginx_conf,
    nginx_exe,
    nginx_proxy,
    nginx_server,
    raise_nofile_limit,
    reset_peak,
    say,
    serve_argv,
    serving_url,
    wait_http,
    write_result,
)
from bench.harness import children as child_pids

LIST_PATHS = {
    "small": "/api/v1/namespaces/list-small/pods",
    "large": "/api/v1/pods?labelSelector=bench.apiproxy.io%2Flist%3Dyes",
}


@dataclass(frozen=True)
class Sizes:
    small_seconds: float
    concurrency: tuple[int, ...]
    repeats: int
    watch_counts: tuple[int, ...]
    watch_seconds: float
    watch_paced_events: int  # offered events/s (all watchers together) in the latency run
    idle_counts: tuple[int, ...]
    idle_repeats: int
    list_pods: int
    list_split: int
    list_repeats: int
    policy_requests: int
    policy_samples: int
    profile_seconds: float


FULL = Sizes(
    small_seconds=5,
    concurrency=(1, 16, 64),
    repeats=3,
    watch_counts=(1, 100),
    watch_seconds=3,
    watch_paced_events=1000,
    idle_counts=(1000, 5000),
    idle_repeats=1,
    list_pods=50_000,
    list_split=10_000,
    list_repeats=3,
    policy_requests=20_000,
    policy_samples=7,
    profile_seconds=8,
)
SMOKE = Sizes(
    small_seconds=1,
    concurrency=(1, 4),
    repeats=1,
    watch_counts=(1, 5),
    watch_seconds=1,
    watch_paced_events=100,
    idle_counts=(20, 50),
    idle_repeats=1,
    list_pods=600,
    list_split=300,
    list_repeats=1,
    policy_requests=500,
    policy_samples=2,
    profile_seconds=0,
)


# --------------------------------------------------------------------------------------- the bench


@dataclass
class Contender:
    name: str
    url: str
    token: str
    hop_pid: int | None  # the process whose memory is the hop's (None for direct)


class Bench:
    def __init__(self, sizes: Sizes, work: Path, *, want_nginx: bool = True) -> None:
        self.sizes = sizes
        self.work = work
        self.py = sys.executable
        self.notes: list[str] = []
        self.children: list[Child] = []
        self.held: list[HeldPort] = []  # nginx's ports, held until the run ends
        self.files = BenchFiles.write(work)
        self.ca_file = self.files.ca_file
        self.jwt = self.files.jwt
        self.want_nginx = want_nginx
        self.nginx: Child | None = None
        self.proxy: Child | None = None
        self.contenders: list[Contender] = []

    # -- processes --------------------------------------------------------------------------

    def spawn(
        self, name: str, argv: Sequence[str], cpus: set[int] | None, *, cwd: Path = ROOT
    ) -> Child:
        child = Child(name, argv, cpus, self.work / f"{name}.log", cwd=cwd)
        self.children.append(child)
        return child

    def start_upstream(self) -> None:
        s = self.sizes
        self.upstream = self.spawn(
            "upstream",
            [
                self.py,
                "-m",
                "bench.upstream",
                f"--list-pods={s.list_pods}",
                f"--list-split={s.list_split}",
            ],
            CPUS.rest,
        )
        info = self.upstream.json_line(timeout=300)
        self.upstream_info = info
        (self.work / "upstream-token").write_text(info["token"] + "\n")
        self.contenders.append(Contender("direct", info["url"], info["token"], None))

    def start_proxy(self) -> Contender:
        info = self.upstream_info
        argv = serve_argv(
            self.files,
            upstream=info["url"],
            upstream_ca=info.get("ca_file"),
            token_file=self.work / "upstream-token",
            audit_log=self.work / "audit.log",
        )
        self.proxy = self.spawn("apiproxy", argv, CPUS.hop)
        url = serving_url(self.proxy)
        wait_http(url, self.jwt)
        return Contender("apiproxy", url, self.jwt, self.proxy.pid)

    def restart_proxy(self) -> Contender:
        assert self.proxy is not None
        self.proxy.stop()
        c = self.start_proxy()
        self.contenders = [x if x.name != "apiproxy" else c for x in self.contenders]
        return c

    def start_nginx(self) -> None:
        exe = nginx_exe()
        if not self.want_nginx:
            self.notes.append("nginx skipped (--no-nginx)")
            return
        if exe is None:
            note = "nginx not installed: skipped (apt-get install nginx)"
            self.notes.append(note)
            say("NOTE: " + note)
            return
        info = self.upstream_info
        scheme, _, address = info["url"].partition("://")
        port = HeldPort()
        self.held.append(port)
        conf = self.work / "nginx.conf"
        location = f"    location / {{ proxy_pass {scheme}://sim; }}\n"
        conf.write_text(
            nginx_conf(
                self.work,
                "nginx",
                [nginx_server(port, self.files, location)],
                upstreams={"sim": address},
                # A real apiserver's certificate names 127.0.0.1, which nginx does not check (it
                # checks names): verification off, over loopback only.
                http=nginx_proxy(info["token"], tls_upstream=scheme == "https"),
            )
        )
        self.nginx = self.spawn("nginx", nginx_argv(exe, self.work, conf), CPUS.hop)
        url = f"https://127.0.0.1:{port.port}"
        wait_http(url, self.jwt)
        workers = child_pids(self.nginx.pid)
        self.contenders.append(Contender("nginx", url, self.jwt, workers[0] if workers else None))

    def start(self) -> None:
        say(f"starting upstream ({self.sizes.list_pods} list pods) ...")
        self.start_upstream()
        self.start_nginx()
        self.contenders.append(self.start_proxy())

    def close(self) -> None:
        """Stop every child, newest first (one that fails to stop spares none of the others),
        then let go of the ports held for nginx."""
        for c in reversed(self.children):
            with contextlib.suppress(Exception):
                if c is getattr(self, "upstream", None):
                    c.send("quit")
                    c.wait(10)
            with contextlib.suppress(Exception):
                c.stop()
        for port in self.held:
            port.close()

    def client(self, c: Contender, mode: str, *extra: str) -> Child:
        # --token=VALUE: a token may begin with "-" (token_urlsafe), which argparse reads as a flag.
        argv = [self.py, "-m", "bench.client", mode, "--url", c.url, f"--token={c.token}"]
        if c.url.startswith("https:"):
            argv += ["--ca", str(self.ca_file)]
        return self.spawn(f"client-{mode}-{c.name}", [*argv, *extra], CPUS.rest)

    def rotations(self, repeats: int) -> Iterator[tuple[int, Contender]]:
        cs = self.contenders
        for r in range(repeats):
            k = r % len(cs)
            for c in cs[k:] + cs[:k]:
                yield r, c

    # -- 1. small requests ------------------------------------------------------------------

    def wrk(self, c: Contender, conns: int, seconds: float) -> dict[str, Any]:
        wrk = shutil.which("wrk")
        assert wrk is not None
        argv = [
            wrk,
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--timeout=10s",
            "-s",
            str(ROOT / "bench" / "wrk_report.lua"),
            "-H",
            f"Authorization: Bearer {c.token}",
            "-H",
            "Accept: application/json",
            c.url + SMALL_PATH,
        ]
        child = self.spawn(f"wrk-{c.name}", argv, CPUS.rest)
        out = child.json_line(timeout=seconds + 60)
        child.wait(30)
        out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
        out["errors"] = sum(
            out[k]
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        )
        return out

    def small_requests(self) -> dict[str, Any]:
        s = self.sizes
        if shutil.which("wrk") is None:
            self.notes.append("wrk not installed: small-request figures skipped")
            say("NOTE: wrk not installed (apt-get install wrk): small requests skipped")
            return {}
        out: dict[str, Any] = {}
        for c in self.contenders:  # warm-up: connections, caches, first-request paths
            self.wrk(c, max(s.concurrency), 1)
        for conns in s.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.contenders}
            for _, c in self.rotations(s.repeats):
                runs[c.name].append(self.wrk(c, conns, s.small_seconds))
                r = runs[c.name][-1]
                say(
                    f"  small c={conns:<3} {c.name:<8} {r['rps']:9.0f} req/s  "
                    f"p50 {r['p50_us'] / 1e3:6.2f} ms  p99 {r['p99_us'] / 1e3:6.2f} ms"
                    + (f"  ERRORS {r['errors']}" if r["errors"] else "")
                )
            out[str(conns)] = {
                name: {
                    "rps": spread([r["rps"] for r in rs]),
                    "p50_ms": spread([r["p50_us"] / 1e3 for r in rs]),
                    "p99_ms": spread([r["p99_us"] / 1e3 for r in rs]),
                    "errors": sum(r["errors"] for r in rs),
                    "requests": sum(r["requests"] for r in rs),
                }
                for name, rs in runs.items()
            }
        return out

    # -- 2. watch delivery ------------------------------------------------------------------

    def watch_once(self, c: Contender, watchers: int, rate: float) -> dict[str, Any]:
        child = self.client(c, "watch", "--watchers", str(watchers))
        child.json_line(timeout=120)
        self.upstream.send(f"churn {rate} {self.sizes.watch_seconds}")
        churn = self.upstream.json_line(timeout=self.sizes.watch_seconds + 60)
        time.sleep(1.0)  # drain: late events still count, at their late arrival
        child.send("stop")
        out = child.json_line(timeout=60)
        child.wait(30)
        out["updates"] = churn["updates"]
        out["offered_events"] = churn["updates"] * watchers
        return out

    def watches(self) -> dict[str, Any]:
        s = self.sizes
        out: dict[str, Any] = {}
        for watchers in s.watch_counts:
            for mode, rate in (("max", 0.0), ("paced", s.watch_paced_events / watchers)):
                runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.contenders}
                for _, c in self.rotations(s.repeats):
                    r = self.watch_once(c, watchers, rate)
                    runs[c.name].append(r)
                    say(
                        f"  watch n={watchers:<3} {mode:<5} {c.name:<8} "
                        f"{r['events_per_second']:9.0f} ev/s  "
                        f"({r['events']}/{r['offered_events']} delivered)  "
                        f"p50 {r['latency_p50_us'] / 1e3:7.2f} ms  "
                        f"p99 {r['latency_p99_us'] / 1e3:7.2f} ms"
                    )
                out[f"{watchers}/{mode}"] = {
                    name: {
                        "events_per_second": spread([r["events_per_second"] for r in rs]),
                        "delivered_fraction": spread(
                            [r["events"] / max(r["offered_events"], 1) for r in rs]
                        ),
                        "latency_p50_ms": spread([r["latency_p50_us"] / 1e3 for r in rs]),
                        "latency_p99_ms": spread([r["latency_p99_us"] / 1e3 for r in rs]),
                        "events": sum(r["events"] for r in rs),
                    }
                    for name, rs in runs.items()
                }
        return out

    # -- 3. idle watches --------------------------------------------------------------------

    def wait_upstream_watchers(self, target: int, timeout: float = 30) -> None:
        """Wait until the watches of a finished run have ended upstream (the simulator cancels a
        watch handler as soon as its client, the hop, closes the connection)."""
        deadline = time.monotonic() + timeout
        while self.upstream_watchers() > target and time.monotonic() < deadline:
            time.sleep(0.2)

    def upstream_watchers(self) -> int:
        self.upstream.send("watchers")
        return int(self.upstream.json_line(timeout=30)["watchers"])

    def idle_once(self, c: Contender, n: int) -> dict[str, Any]:
        assert c.hop_pid is not None
        warm = self.client(c, "idle", "--watchers", "10")
        warm.json_line(timeout=60)
        warm.send("stop")
        warm.json_line(timeout=60)
        warm.wait(30)
        time.sleep(0.5)
        before = memory(c.hop_pid)
        up_before = self.upstream_watchers()
        child = self.client(c, "idle", "--watchers", str(n))
        ready = child.json_line(timeout=300)
        time.sleep(1.0)  # let the hop settle (buffers, GC) before reading /proc
        after = memory(c.hop_pid)
        upstream_watchers = self.upstream_watchers() - up_before
        child.send("stop")
        child.json_line(timeout=120)
        child.wait(60)
        self.wait_upstream_watchers(up_before)
        per = {k: (after[k] - before[k]) / n for k in ("rss", "uss") if k in after}
        say(
            f"  idle n={n:<5} {c.name:<8} {per['rss'] / 1024:6.1f} KiB/watch RSS  "
            f"{per.get('uss', 0) / 1024:6.1f} KiB/watch USS  (open {ready['open_seconds']:.1f}s,"
            f" upstream sees {upstream_watchers} more)"
            + (f"  RETRIED OPENS {ready['retries']}" if ready.get("retries") else "")
        )
        return {
            "before": before,
            "after": after,
            "per_watch_rss_kib": per["rss"] / 1024,
            "per_watch_uss_kib": per.get("uss", 0) / 1024,
            "open_seconds": ready["open_seconds"],
            "upstream_watchers": upstream_watchers,
            "retried_opens": ready.get("retries", {}),
        }

    def idle(self) -> dict[str, Any]:
        s = self.sizes
        out: dict[str, Any] = {}
        for n in s.idle_counts:
            runs: dict[str, list[dict[str, Any]]] = {}
            for _ in range(s.idle_repeats):
                for c in list(self.contenders):
                    if c.hop_pid is None:
                        continue
                    if c.name == "apiproxy":
                        c = self.restart_proxy()  # a fresh process: nothing left from before
                    runs.setdefault(c.name, []).append(self.idle_once(c, n))
            out[str(n)] = {
                name: {
                    "per_watch_rss_kib": spread([r["per_watch_rss_kib"] for r in rs]),
                    "per_watch_uss_kib": spread([r["per_watch_uss_kib"] for r in rs]),
                    "rss_after_mib": spread([r["after"]["rss"] / 2**20 for r in rs]),
                    "open_seconds": spread([r["open_seconds"] for r in rs]),
                }
                for name, rs in runs.items()
            }
        return out

    # -- 4. large lists ---------------------------------------------------------------------

    def lists(self) -> dict[str, Any]:
        s = self.sizes
        out: dict[str, Any] = {}
        for label, path in LIST_PATHS.items():
            pods = s.list_split if label == "small" else s.list_pods
            runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.contenders}
            for _, c in self.rotations(s.list_repeats):
                peak_ok = c.hop_pid is not None and reset_peak(c.hop_pid)
                before = memory(c.hop_pid) if c.hop_pid else {}
                child = self.client(c, "list", "--path", path)
                r = child.json_line(timeout=600)
                child.wait(30)
                if r["status"] != 200:
                    raise RuntimeError(f"LIST through {c.name}: HTTP {r['status']}")
                if c.hop_pid is not None:
                    after = memory(c.hop_pid)
                    r["rss_before_mib"] = before["rss"] / 2**20
                    r["peak_mib"] = after["hwm"] / 2**20 if peak_ok else None
                r["mb_per_second"] = r["bytes"] / r["seconds"] / 1e6
                runs[c.name].append(r)
                say(
                    f"  list {pods:>6} pods {c.name:<8} {r['bytes'] / 1e6:7.1f} MB "
                    f"{r['seconds']:6.2f} s {r['mb_per_second']:7.1f} MB/s"
                    + (f"  peak {r['peak_mib']:.1f} MiB" if r.get("peak_mib") else "")
                )
            out[str(pods)] = {
                name: {
                    "bytes": rs[0]["bytes"],
                    "seconds": spread([r["seconds"] for r in rs]),
                    "mb_per_second": spread([r["mb_per_second"] for r in rs]),
                    **(
                        {
                            "peak_mib": spread([r["peak_mib"] for r in rs if r["peak_mib"]]),
                            "rss_before_mib": spread([r["rss_before_mib"] for r in rs]),
                        }
                        if rs and "peak_mib" in rs[0] and rs[0]["peak_mib"] is not None
                        else {}
                    ),
                }
                for name, rs in runs.items()
            }
        return out

    # -- 5. policy decisions ----------------------------------------------------------------

    def policy(self) -> dict[str, Any]:
        from bench.policy_decisions import measure

        s = self.sizes
        out: dict[str, Any] = {}
        for rules in (10, 1_000):
            samples = [measure(rules, s.policy_requests, 1) for _ in range(s.policy_samples)]
            out[str(rules)] = {
                "decisions_per_second": spread([1e6 / d for d, _ in samples]),
                "decision_us": spread([d for d, _ in samples]),
                "classify_us": spread([c for _, c in samples]),
            }
            dps = out[str(rules)]["decisions_per_second"]["median"]
            say(f"  policy rules={rules:<5} {dps:,.0f} decisions/s")
        return out

    # -- profile ----------------------------------------------------------------------------

    def profile(self) -> dict[str, Any]:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        proxy = next(c for c in self.contenders if c.name == "apiproxy")
        if not Path(spy).exists() or proxy.hop_pid is None:
            self.notes.append("py-spy not installed: no profile (pip install py-spy)")
            return {}
        out: dict[str, Any] = {}
        secs = self.sizes.profile_seconds
        for what, load in (
            ("small_get_c16", lambda: self.wrk(proxy, 16, secs + 2)),
            ("watch_100_max", lambda: self.watch_once(proxy, 100, 0.0)),
        ):
            raw = RESULTS / f"profile-{what}.raw"
            spy_child = self.spawn(
                f"py-spy-{what}",
                [
                    spy,
                    "record",
                    "-p",
                    str(proxy.hop_pid),
                    "-d",
                    str(int(secs)),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                ],
                CPUS.rest,
            )
            time.sleep(0.5)
            load()
            spy_child.wait(secs + 60)
            out[what] = top_functions(raw)
            for name, pct in out[what].get("self_percent", [])[:6]:
                say(f"  {what}: {pct:5.1f}% self  {name}")
        return out


def top_functions(raw: Path, n: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {}
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count

    def top(d: dict[str, int]) -> list[list[Any]]:
        return [
            [k, round(100 * v / total, 1)] for k, v in sorted(d.items(), key=lambda x: -x[1])[:n]
        ]

    return {"samples": total, "self_percent": top(own), "inclusive_percent": top(incl)}


def spread(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "samples": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "samples": [round(v, 4) for v in vals],
    }


# ----------------------------------------------------------------------------------- reporting


def _m(d: dict[str, Any] | None, key: str) -> float | None:
    if not d or key not in d:
        return None
    v = d[key]
    return float(v["median"]) if isinstance(v, dict) else float(v)


def _fmt(d: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    if not d or key not in d:
        return "-"
    v = d[key]
    return f"{v['median']:,.{digits}f} [{v['min']:,.{digits}f}-{v['max']:,.{digits}f}]"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met (medians)."""
    out: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, limit: float, higher_is_better: bool, unit: str
    ) -> None:
        if value is None:
            return
        met = value >= limit if higher_is_better else value < limit
        out.append(
            {
                "target": name,
                "value": round(value, 4),
                "limit": limit,
                "unit": unit,
                "met": met,
                "how_far": round(value / limit, 3) if limit else None,
            }
        )

    for conns, row in res.get("small_requests", {}).items():
        p, n, d = row.get("apiproxy"), row.get("nginx"), row.get("direct")
        if p and n:
            add(
                f"small c={conns}: apiproxy/nginx req/s >= 0.5",
                _m(p, "rps") / _m(n, "rps"),
                0.5,
                True,
                "ratio",
            )
        if p and d:
            add(
                f"small c={conns}: added p99 < 1 ms",
                _m(p, "p99_ms") - _m(d, "p99_ms"),
                1.0,
                False,
                "ms",
            )
    for key, row in res.get("watch", {}).items():
        p, d = row.get("apiproxy"), row.get("direct")
        if not (p and d):
            continue
        if key.endswith("/max"):
            add(
                f"watch {key}: apiproxy/direct events/s >= 0.9",
                _m(p, "events_per_second") / max(_m(d, "events_per_second") or 1, 1e-9),
                0.9,
                True,
                "ratio",
            )
        else:
            add(
                f"watch {key}: added p99 per event < 1 ms",
                _m(p, "latency_p99_ms") - _m(d, "latency_p99_ms"),
                1.0,
                False,
                "ms",
            )
    for n, row in res.get("idle_watches", {}).items():
        if p := row.get("apiproxy"):
            add(
                f"idle {n} watches: KiB per watch (USS) < 20",
                _m(p, "per_watch_uss_kib"),
                20.0,
                False,
                "KiB",
            )
            add(
                f"idle {n} watches: KiB per watch (RSS) < 20",
                _m(p, "per_watch_rss_kib"),
                20.0,
                False,
                "KiB",
            )
    for pods, row in res.get("lists", {}).items():
        if (p := row.get("apiproxy")) and "peak_mib" in p:
            add(
                f"LIST {pods} pods: apiproxy peak memory < 100 MB",
                _m(p, "peak_mib") * 1.048576,
                100.0,
                False,
                "MB",
            )
    return out


def table(res: dict[str, Any]) -> str:
    names = ["direct", "nginx", "apiproxy"]
    lines: list[str] = []

    def row(label: str, cells: list[str], extra: str = "") -> None:
        lines.append(f"{label:<34}" + "".join(f"{c:>26}" for c in cells) + f"  {extra}")

    row("", names, "ratio (apiproxy vs ...)")
    for conns, r in res.get("small_requests", {}).items():
        rps = [_fmt(r.get(n), "rps") for n in names]
        ratio = ""
        if r.get("nginx") and r.get("apiproxy"):
            ratio = f"/nginx {_m(r['apiproxy'], 'rps') / _m(r['nginx'], 'rps'):.2f}"
        if r.get("direct") and r.get("apiproxy"):
            ratio += f"  /direct {_m(r['apiproxy'], 'rps') / _m(r['direct'], 'rps'):.2f}"
        row(f"GET pod c={conns} req/s", rps, ratio)
        row(f"GET pod c={conns} p50 ms", [_fmt(r.get(n), "p50_ms", 2) for n in names])
        added = ""
        if r.get("direct") and r.get("apiproxy"):
            added = f"added {_m(r['apiproxy'], 'p99_ms') - _m(r['direct'], 'p99_ms'):+.2f} ms"
        row(f"GET pod c={conns} p99 ms", [_fmt(r.get(n), "p99_ms", 2) for n in names], added)
    for key, r in res.get("watch", {}).items():
        ratio = ""
        if r.get("direct") and r.get("apiproxy"):
            a, b = _m(r["apiproxy"], "events_per_second"), _m(r["direct"], "events_per_second")
            ratio = f"/direct {a / b:.2f}" if b else ""
        row(f"watch {key} events/s", [_fmt(r.get(n), "events_per_second") for n in names], ratio)
        row(f"watch {key} p50 ms", [_fmt(r.get(n), "latency_p50_ms", 2) for n in names])
        added = ""
        if r.get("direct") and r.get("apiproxy"):
            d = _m(r["apiproxy"], "latency_p99_ms") - _m(r["direct"], "latency_p99_ms")
            added = f"added {d:+.2f} ms"
        row(f"watch {key} p99 ms", [_fmt(r.get(n), "latency_p99_ms", 2) for n in names], added)
    for n, r in res.get("idle_watches", {}).items():
        row(f"idle {n} KiB/watch USS", [_fmt(r.get(x), "per_watch_uss_kib", 1) for x in names])
        row(f"idle {n} KiB/watch RSS", [_fmt(r.get(x), "per_watch_rss_kib", 1) for x in names])
    for pods, r in res.get("lists", {}).items():
        mb = next(iter(r.values()))["bytes"] / 1e6
        row(
            f"LIST {pods} pods ({mb:.0f} MB) MB/s", [_fmt(r.get(n), "mb_per_second") for n in names]
        )
        row(f"LIST {pods} pods seconds", [_fmt(r.get(n), "seconds", 2) for n in names])
        row(f"LIST {pods} pods peak MiB", [_fmt(r.get(n), "peak_mib") for n in names])
    for rules, r in res.get("policy", {}).items():
        row(f"policy {rules} rules decisions/s", ["", "", _fmt(r, "decisions_per_second")])
    lines.append("")
    lines.append("targets (medians):")
    for t in res.get("targets", []):
        mark = "MET " if t["met"] else "MISS"
        lines.append(f"  [{mark}] {t['target']}: {t['value']:.3f} {t['unit']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny sizes")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/latest.json)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--seconds", type=float, help="override the seconds per small/watch run")
    parser.add_argument(
        "--only",
        default="small,watch,list,policy,profile,idle",
        help="comma-separated parts to run (default: all)",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.seconds:
        sizes = replace(sizes, small_seconds=args.seconds, watch_seconds=args.seconds)
    if args.no_pin:
        CPUS.off()
    out = args.out or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    raise_nofile_limit()
    parts = set(args.only.split(","))
    started = time.monotonic()
    result = new_result("smoke" if args.smoke else "full", "bench.run", argv)
    result["sizes"] = asdict(sizes)
    with tempfile.TemporaryDirectory(prefix="apiproxy-bench-") as tmp:
        bench = Bench(sizes, Path(tmp), want_nginx=not args.no_nginx)
        try:
            bench.start()
            result["upstream"] = {
                k: bench.upstream_info[k] for k in ("pods", "list_bytes_per_pod", "seed_seconds")
            }
            result["contenders"] = [c.name for c in bench.contenders]
            steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
                ("small", "small_requests", bench.small_requests),
                ("watch", "watch", bench.watches),
                ("list", "lists", bench.lists),
                ("policy", "policy", bench.policy),
                ("profile", "profile", bench.profile),
                ("idle", "idle_watches", bench.idle),  # last: it restarts the proxy
            ]
            if args.smoke or args.no_profile:
                parts.discard("profile")
            for part, key, fn in steps:
                if part in parts:
                    say(f"== {key}")
                    result[key] = fn()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            say(f"FAILED: {result['error']}")
        finally:
            bench.close()
        result["notes"] = bench.notes
    result["targets"] = targets(result)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    text = table(result)
    print(text)
    write_result(out, result)
    say(f"wrote {out} ({result['wall_seconds']} s)")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
