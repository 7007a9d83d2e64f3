"""`apiproxy serve --workers N`: real worker processes on one loopback port (SO_REUSEPORT), the
supervisor's merged metrics, reload, restarts and shutdown; the metric merge and the limits."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apiproxy import cli, upstream, workers
from apiproxy.admission import ConnectionMetrics
from apiproxy.errors import UserError
from apiproxy.metrics import Metrics
from apiproxy.server import ServeConfig
from tests.proxy.conftest import OWN_UUID, POLICY, Files, Recorder, World, make_files
from tests.proxy.serving import Served, alive, serve_process


@pytest.fixture
async def served(world: World, recorder: Recorder, tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_process(world, recorder.url, tmp_path, workers=2) as s:
        yield s


async def get(world: World, tmp_path: Path, port: int, path: str = "/api/v1/pods") -> int:
    """One request on a new connection (the kernel picks a worker per connection)."""
    ctx = world.client_ssl(None, tmp_path)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s,
        s.get(
            f"https://127.0.0.1:{port}{path}",
            headers={"Authorization": f"Bearer {world.token_a()}"},
        ) as resp,
    ):
        await resp.read()
        return resp.status


def audit_lines(files: Files) -> list[int]:
    out = []
    for i in range(2):
        path = files.dir / f"audit.worker-{i}.log"
        out.append(len(path.read_bytes().splitlines()) if path.exists() else 0)
    return out


async def until_audited(files: Files, total: int) -> list[int]:
    """Audit records reach the files shortly after the answers: read until they are there
    (another process writes them, so there is no event to await: a bounded re-read)."""
    for _ in range(1000):
        if sum(counts := audit_lines(files)) >= total:
            return counts
        await asyncio.sleep(0.02)
    raise AssertionError(f"{total} audit records expected, {audit_lines(files)} written")


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def promtool_check(text: str) -> None:
    """`promtool check metrics` (Debian's prometheus package), where it is installed."""
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_two_workers_share_the_port_and_the_supervisor_merges_and_supervises(
    world: World, served: Served, tmp_path: Path
) -> None:
    files = served.files
    # Both workers serve: new connections until each worker's audit file has a record.
    sent = 0
    for _ in range(10):
        statuses = await asyncio.gather(*(get(world, tmp_path, served.port) for _ in range(10)))
        assert statuses == [200] * 10
        sent += 10
        counts = await until_audited(files, sent)
        if all(counts):
            break
    assert all(counts), counts
    assert sum(counts) == sent
    # Merged metrics: the requests of both workers, summed; the supervisor's own series.
    status, text = await scrape(served.metrics_port)
    assert status == 200
    assert value(text, "apiproxy_requests_total", code="200") == sent
    assert value(text, "apiproxy_workers") == 2
    assert value(text, "apiproxy_worker_restarts_total") == 0
    assert value(text, "apiproxy_max_watches_per_peer") == 100  # 2 x 50
    assert value(text, "apiproxy_upstream_up") == 1
    promtool_check(text)
    # ready once both workers' first upstream probes succeeded
    await served.wait(lambda: len(served.find("upstream_probe", reachable=True)) == 2)
    assert (await scrape(served.metrics_port, "/readyz"))[0] == 200
    assert (await scrape(served.metrics_port, "/healthz"))[0] == 200

    # SIGHUP reaches both workers: a policy without pods is in force everywhere.
    files.policy.write_text(POLICY.replace("pods, ", ""))
    served.proc.send_signal(signal.SIGHUP)
    await served.wait(
        lambda: len({e["worker"] for e in served.find("reloaded", what="policy")}) == 2
    )
    statuses = await asyncio.gather(*(get(world, tmp_path, served.port) for _ in range(6)))
    assert statuses == [403] * 6
    files.policy.write_text(POLICY)
    served.proc.send_signal(signal.SIGHUP)
    await served.wait(lambda: len(served.find("reloaded", what="policy")) == 4)

    # kill -9 one worker: it is restarted, counted, and the port keeps serving meanwhile.
    victim = served.find("worker_started", worker=0)[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    await served.wait(lambda: served.find("worker_exited", worker=0, code=-9))
    assert await get(world, tmp_path, served.port) == 200  # worker 1 alone
    await served.wait(lambda: len(served.find("worker_started", worker=0)) == 2)
    assert served.find("worker_restarting", worker=0)
    status, text = await scrape(served.metrics_port)
    assert value(text, "apiproxy_worker_restarts_total") == 1
    assert value(text, "apiproxy_workers") == 2
    assert await get(world, tmp_path, served.port) == 200
    # the new worker serves its metrics (and readiness) on the socket the old one left behind
    await served.wait(lambda: len(served.find("upstream_probe", reachable=True)) == 3)
    status, body = await scrape(served.metrics_port, "/readyz")
    assert (status, body.splitlines()[:2]) == (200, ["[+]worker-0 ok", "[+]worker-1 ok"])

    # SIGTERM: the supervisor stops the workers, waits for them and exits 0.
    pids = served.worker_pids()
    assert len(pids) == 3
    assert all(alive(p) for p in pids - {victim})
    served.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.proc.wait(), 60) == 0
    assert not any(alive(p) for p in pids)
    assert len(served.find("worker_exited")) == 3
    assert served.find("stopped")
    assert not [
        e
        for e in served.events
        if e.get("level") == "error" and e["event"] not in ("worker_exited",)
    ]


async def test_audit_to_stdout_comes_out_in_whole_records(
    world: World, recorder: Recorder, tmp_path: Path
) -> None:
    async with serve_process(world, recorder.url, tmp_path, workers=2, audit="-") as served:
        statuses = await asyncio.gather(*(get(world, tmp_path, served.port) for _ in range(30)))
        assert statuses == [200] * 30
        await served.wait(lambda: len(served.stdout) >= 30)
        records = [json.loads(line) for line in served.stdout]
        assert len({r["auditID"] for r in records}) == 30
        assert all(r["responseStatus"]["code"] == 200 for r in records)


async def test_workers_do_not_outlive_a_killed_supervisor(
    world: World, recorder: Recorder, tmp_path: Path
) -> None:
    async with serve_process(world, recorder.url, tmp_path, workers=2) as served:
        pids = served.worker_pids()
        assert len(pids) == 2
        # No chance to stop them: PR_SET_PDEATHSIG sends them SIGTERM. (Not `proc.wait()`: on
        # Python 3.11 it also waits for the stderr pipe, which the workers hold.)
        served.proc.kill()
        # Each worker stops as on SIGTERM (it logs `stopped`), though nobody told it to.
        await served.wait(lambda: {e.get("worker") for e in served.find("stopped")} == {0, 1})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--workers", "65"], "--workers: '65' is more than 64"),
        (
            ["--workers", "3", "--max-watches-per-peer", "2"],
            "--workers 3 exceeds --max-watches-per-peer 2: each worker needs at least one",
        ),
        (
            ["--workers", "4", "--max-requests-per-peer", "3"],
            "--workers 4 exceeds --max-requests-per-peer 3: each worker needs at least one",
        ),
    ],
)
def test_bad_worker_counts_are_one_line(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    assert cli.main(["serve", *_serve_argv(make_files(world, tmp_path), *args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"apiproxy serve: error: {message}"


def _serve_argv(files: Files, *args: str) -> list[str]:
    return [
        f"--tls-cert={files.tls_cert}",
        f"--tls-key={files.tls_key}",
        f"--peers={files.peers}",
        f"--policy={files.policy}",
        f"--cluster-uuid={OWN_UUID}",
        "--upstream=https://127.0.0.1:1/",
        "--listen=127.0.0.1:0",
        *args,
    ]


@pytest.mark.parametrize("spec", ["[]", "not json", '"index"'])
def test_a_worker_spec_not_from_a_supervisor_is_refused(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    spec: str,
) -> None:
    monkeypatch.setenv(workers.INTERNAL_ENV, spec)
    argv = _serve_argv(make_files(world, tmp_path), "--workers", "2")
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    why = "not set by an apiproxy supervisor"
    assert err == f"apiproxy serve: error: {workers.INTERNAL_ENV}: {why}"


async def test_a_worker_that_cannot_start_stops_the_supervisor_with_its_error(
    world: World, tmp_path: Path
) -> None:
    files = make_files(world, tmp_path)
    config = _config(files)
    # The supervisor checked good files; the workers find a broken policy (changed meanwhile).
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: apiproxy/v1\nkind: AccessPolicy\nrules: [{name: x}]\n")
    argv = [
        f"--tls-cert={files.tls_cert}",
        f"--tls-key={files.tls_key}",
        f"--peers={files.peers}",
        f"--policy={broken}",
        f"--cluster-uuid={OWN_UUID}",
        "--upstream=https://127.0.0.1:1/",
        "--workers=2",
    ]
    port, held = workers.reserve("127.0.0.1", 0)
    try:
        supervisor = workers.Supervisor(argv, config, 2, port)
        with pytest.raises(UserError, match=r"broken\.yaml") as raised:
            await asyncio.wait_for(supervisor.run(), 60)
    finally:
        for sock in held:
            sock.close()
    assert "\n" not in str(raised.value)
    assert not os.path.exists(supervisor.dir)  # noqa: ASYNC240 - after the run, nothing waits
    assert all(s.proc is None for s in supervisor.slots)


def _config(files: Files, **kw: Any) -> ServeConfig:
    return ServeConfig(
        tls_cert=str(files.tls_cert),
        tls_key=str(files.tls_key),
        peers=str(files.peers),
        cluster_uuid=OWN_UUID,
        policy=str(files.policy),
        upstream=upstream.from_flags("https://127.0.0.1:1", str(files.upstream_ca), None),
        **kw,
    )


def test_worker_config_divides_limits_and_names_audit_files(world: World, tmp_path: Path) -> None:
    files = make_files(world, tmp_path)
    base = _config(
        files,
        audit_log="/var/log/apiproxy/audit.log",
        metrics_listen=("0.0.0.0", 9090),
        max_requests_per_peer=201,
        max_watches_per_peer=100,
    )
    c = workers.worker_config(base, workers=3, index=2, port=4443, metrics_unix="/d/w.sock")
    assert (c.max_requests_per_peer, c.max_watches_per_peer) == (67, 33)
    assert c.audit_log == "/var/log/apiproxy/audit.worker-2.log"
    assert (c.listen_port, c.reuse_port, c.metrics_listen, c.metrics_unix) == (
        4443,
        True,
        None,
        "/d/w.sock",
    )
    assert workers.audit_path("-", 1) == "-"
    assert workers.audit_path(None, 1) is None
    assert workers.audit_path("audit", 0) == "audit.worker-0"
    assert workers.audit_path("logs/a.jsonl", 1) == "logs/a.worker-1.jsonl"


def test_reserve_holds_one_port_that_reuseport_listeners_share() -> None:
    import socket

    port, held = workers.reserve("127.0.0.1", 0)
    try:
        assert port > 0
        listeners = []
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            listeners.append(s)
        plain = socket.socket()
        # a socket without SO_REUSEPORT cannot take the port
        with pytest.raises(OSError, match="in use"):
            plain.bind(("127.0.0.1", port))
        plain.close()
        for s in listeners:
            s.close()
    finally:
        for s in held:
            s.close()


# -- merging -------------------------------------------------------------------------------------

WORKER_0 = """\
# HELP apiproxy_requests_total Requests.
# TYPE apiproxy_requests_total counter
apiproxy_requests_total{code="200",peer="a"} 3.0
apiproxy_requests_total{code="403",peer="a"} 1.0
# HELP apiproxy_requests_created Requests.
# TYPE apiproxy_requests_created gauge
apiproxy_requests_created{code="200",peer="a"} 1700000010.0
# HELP apiproxy_request_duration_seconds Latency.
# TYPE apiproxy_request_duration_seconds histogram
apiproxy_request_duration_seconds_bucket{le="0.1"} 2.0
apiproxy_request_duration_seconds_bucket{le="+Inf"} 3.0
apiproxy_request_duration_seconds_count 3.0
apiproxy_request_duration_seconds_sum 0.5
# HELP apiproxy_open_watches Watches.
# TYPE apiproxy_open_watches gauge
apiproxy_open_watches{peer="a"} 4.0
# HELP apiproxy_upstream_up Up.
# TYPE apiproxy_upstream_up gauge
apiproxy_upstream_up 1.0
# HELP apiproxy_reload_failing Failing.
# TYPE apiproxy_reload_failing gauge
apiproxy_reload_failing{what="policy"} 0.0
"""

WORKER_1 = """\
# HELP apiproxy_requests_total Requests.
# TYPE apiproxy_requests_total counter
apiproxy_requests_total{code="200",peer="a"} 5.0
apiproxy_requests_total{code="200",peer="b"} 2.0
# HELP apiproxy_requests_created Requests.
# TYPE apiproxy_requests_created gauge
apiproxy_requests_created{code="200",peer="a"} 1700000000.0
# HELP apiproxy_request_duration_seconds Latency.
# TYPE apiproxy_request_duration_seconds histogram
apiproxy_request_duration_seconds_bucket{le="0.1"} 1.0
apiproxy_request_duration_seconds_bucket{le="+Inf"} 1.0
apiproxy_request_duration_seconds_count 1.0
apiproxy_request_duration_seconds_sum 0.05
# HELP apiproxy_open_watches Watches.
# TYPE apiproxy_open_watches gauge
apiproxy_open_watches{peer="a"} 1.0
# HELP apiproxy_upstream_up Up.
# TYPE apiproxy_upstream_up gauge
apiproxy_upstream_up 0.0
# HELP apiproxy_reload_failing Failing.
# TYPE apiproxy_reload_failing gauge
apiproxy_reload_failing{what="policy"} 1.0
"""


def test_merge_sums_counters_histograms_and_counts_and_takes_the_worst_state() -> None:
    text = workers.merge([WORKER_0, WORKER_1]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("apiproxy_requests_total", (("code", "200"), ("peer", "a")))] == 8
    assert samples[("apiproxy_requests_total", (("code", "403"), ("peer", "a")))] == 1
    assert samples[("apiproxy_requests_total", (("code", "200"), ("peer", "b")))] == 2
    assert samples[("apiproxy_requests_created", (("code", "200"), ("peer", "a")))] == 1.7e9
    assert samples[("apiproxy_request_duration_seconds_bucket", (("le", "0.1"),))] == 3
    assert samples[("apiproxy_request_duration_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("apiproxy_request_duration_seconds_count", ())] == 4
    assert samples[("apiproxy_request_duration_seconds_sum", ())] == pytest.approx(0.55)
    assert samples[("apiproxy_open_watches", (("peer", "a"),))] == 5
    assert samples[("apiproxy_upstream_up", ())] == 0  # one worker cannot reach it
    assert samples[("apiproxy_reload_failing", (("what", "policy"),))] == 1
    # one worker alone comes out as it went in
    assert workers.merge([WORKER_0]).decode().count("\napiproxy_") == WORKER_0.count("\napiproxy_")
    promtool_check(text)


def test_every_gauge_is_classified() -> None:
    """A new gauge must be placed in workers.MERGE on purpose: summing a setting or a 0/1 state
    across workers would silently report nonsense."""
    import apiproxy.audit.writer  # noqa: F401  (its gauges live in the default registry)

    metrics = Metrics()
    ConnectionMetrics(metrics.registry)
    gauges = {
        fam.name
        for fam in text_string_to_metric_families(metrics.render().decode())
        if fam.type == "gauge" and not fam.name.endswith("_created")
    }
    assert "apiproxy_open_watches" in gauges
    assert "apiproxy_audit_healthy" in gauges
    assert "process_resident_memory_bytes" in gauges or sys.platform != "linux"
    unclassified = sorted(g for g in gauges - workers.MERGE.keys() if _ours(g))
    assert unclassified == [], f"add these gauges to apiproxy.workers.MERGE: {unclassified}"
    assert set(workers.MERGE.values()) <= {"sum", "max", "min"}


def _ours(name: str) -> bool:
    # The default registry is process-wide: other tests may register gauges of their own in it.
    return name.startswith(("apiproxy_", "process_", "python_"))
