"""`apiproxy federate` stops promptly on SIGTERM, whatever it is doing: a real
`python -m apiproxy federate` subprocess against a simulated cluster, signalled while it starts,
while a peer never answers, while it stands by or its Lease requests hang, and while it runs
normally. Each must exit 0 within SHUTDOWN_BOUND (awaited, not slept) and end its log with
`federation_stopped`. Plus the in-process race that used to lose the cancellation for good."""

from __future__ import annotations

import asyncio

import pytest

from apiproxy import tasks
from apiproxy.federation.controller import PRIVATE
from apiproxy.federation.main import LEASE_NAME
from tests.federation.conftest import Cluster, eventually
from tests.federation.process import SHUTDOWN_BOUND, Federate, SilentPeer

LEASE = ("leases.coordination.k8s.io", LEASE_NAME, "apiproxy-system")
LEASES = "/apis/coordination.k8s.io/v1/namespaces/apiproxy-system/leases"


@pytest.fixture
async def federate(clusters, tmp_path):
    started: list[Federate] = []

    async def factory(cluster: Cluster, *extra: str) -> Federate:
        kubeconfig = cluster.sim.write_kubeconfig(tmp_path / "kubeconfig")
        f = await Federate.start(kubeconfig, tmp_path, *extra)
        started.append(f)
        return f

    yield factory
    for f in started:
        await f.kill()


def _lease_holder(cluster: Cluster) -> str:
    return str(((cluster.get(*LEASE) or {}).get("spec") or {}).get("holderIdentity") or "")


async def test_sigterm_while_start_waits_for_a_hanging_api(clusters, federate):
    """The kube-apiserver holds the cluster-UUID read (start-up's first request): SIGTERM ends
    start-up at once instead of after the 30 s request timeout (and exits 0, not 'cannot
    start')."""
    a = await clusters("a")
    hang = a.sim.faults.delay(120, path="/api/v1/namespaces/kube-system")
    f = await federate(a)
    await eventually(lambda: f.alive() and hang.fired >= 1, timeout=30)
    rc, took = await f.sigterm()
    last = f.assert_clean_exit(rc)
    assert f.event("federation_started") is None
    assert (f.event("stopping") or {}).get("during") == "start-up"
    assert last["abandoned"] == []
    print(f"SIGTERM during start-up: exited in {took:.2f}s")


async def test_sigterm_while_the_first_pass_waits_for_a_silent_peer(clusters, federate):
    """The first pass fetches a peer that accepted the connection and never answers (its
    fetch timeout is 10 s): SIGTERM cancels the pass, the leader gives its Lease back."""
    a = await clusters("a")
    async with SilentPeer() as peer:
        a.create_imc("silent", f"https://127.0.0.1:{peer.port}/metadata", None)
        f = await federate(a)
        await f.wait_event("federation_started")
        await asyncio.wait_for(peer.connected.wait(), 30)
        assert _lease_holder(a) == "federate-a"
        rc, took = await f.sigterm()
    last = f.assert_clean_exit(rc)
    assert last["abandoned"] == []
    assert _lease_holder(a) == ""  # released, so a standby takes over at once
    assert f.event("reconcile_failed") is None
    print(f"SIGTERM while a peer fetch hangs: exited in {took:.2f}s")


async def test_sigterm_while_standing_by(clusters, federate):
    """Another replica holds the Lease: this one waits in the election loop. SIGTERM stops it
    at once and it leaves the other's Lease alone."""
    a = await clusters("a")
    a.store.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": "apiproxy-system"},
            "spec": {
                "holderIdentity": "someone-else",
                "leaseDurationSeconds": 3600,
                "acquireTime": "2026-01-01T00:00:00.000000Z",
                "renewTime": "2026-01-01T00:00:00.000000Z",
                "leaseTransitions": 0,
            },
        }
    )
    reads = a.sim.faults.delay(0, method="GET", path=LEASES)  # counts the election's reads
    f = await federate(a)
    await f.wait_event("federation_started")
    await eventually(lambda: f.alive() and reads.fired >= 2, timeout=30)
    rc, took = await f.sigterm()
    last = f.assert_clean_exit(rc)
    assert last["abandoned"] == []
    assert _lease_holder(a) == "someone-else"
    assert f.event("leadership_changed") is None
    print(f"SIGTERM while standing by: exited in {took:.2f}s")


async def test_sigterm_while_the_lease_api_hangs(clusters, federate):
    """The leader's renew hangs, and so would the release on the way out: the shutdown
    deadline (`--shutdown-timeout`, shortened here) abandons it with a warning instead of
    waiting it out."""
    a = await clusters("a")
    f = await federate(a, "--shutdown-timeout=2s")
    await f.wait_event("federation_started")
    await eventually(lambda: f.alive() and _lease_holder(a) == "federate-a", timeout=30)
    hang = a.sim.faults.delay(120, path=LEASES)
    await eventually(lambda: f.alive() and hang.fired >= 1, timeout=30)
    rc, took = await f.sigterm()
    last = f.assert_clean_exit(rc)
    assert last["abandoned"] == ["lease release"], last
    warning = f.event("shutdown_step_abandoned")
    assert warning is not None
    assert warning["level"] == "warning"
    assert warning["step"] == "lease release"
    assert 1.0 <= warning["shutdown_timeout"] <= 2.0  # what was left of the 2 s after SIGTERM
    print(f"SIGTERM while the Lease API hangs: exited in {took:.2f}s")


async def test_sigterm_in_normal_operation(clusters, federate, exporter_tls, test_ca):
    """A leader federated with a peer (an in-process federation on cluster b): SIGTERM exits
    promptly and cleanly and gives the Lease back."""
    a, b = await clusters("a"), await clusters("b")
    fb = await b.federation(exporter_tls_cert=exporter_tls[0], exporter_tls_key=exporter_tls[1])
    a.create_imc("b", fb.exporter_url, test_ca.cert_pem)
    f = await federate(
        a, f"--exporter-tls-cert={exporter_tls[0]}", f"--exporter-tls-key={exporter_tls[1]}"
    )
    started = await f.wait_event("federation_started")
    b.create_imc("a", f"https://127.0.0.1:{started['exporter_port']}/metadata", test_ca.cert_pem)
    await fb.reconcile()  # b knows a now: a's next fetch of b's private document succeeds
    await eventually(
        lambda: f.alive() and (a.condition("b", PRIVATE) or {}).get("status") == "True",
        timeout=30,
    )
    assert f.event("remote_secret_written") is not None
    rc, took = await f.sigterm()
    last = f.assert_clean_exit(rc)
    assert last["abandoned"] == []
    assert _lease_holder(a) == ""
    print(f"SIGTERM in normal operation: exited in {took:.2f}s")


async def test_stop_right_after_a_trigger_finishes(clusters):
    """A pass triggered in the same loop turn as stop() (a watch event or a leadership change
    arriving with SIGTERM): asyncio.wait_for on Python 3.11 returned the wake-up and dropped
    the cancellation, so the controller loop ran on and stop() waited for it forever."""
    a = await clusters("a")
    fed = await a.federation()
    assert fed.controller is not None
    controller = fed.controller
    # After its first pass the loop waits for the next trigger (the Event has a waiter).
    await eventually(lambda: controller.passes >= 1 and controller._wake._waiters)
    passes = controller.passes

    async def trigger_and_stop() -> list[str]:
        fed.trigger()  # the same loop turn as stop()'s cancellation of the loops
        return await fed.stop()

    stopping = asyncio.create_task(trigger_and_stop())
    done, _ = await asyncio.wait({stopping}, timeout=SHUTDOWN_BOUND)
    assert stopping in done, f"stop() still waiting after {SHUTDOWN_BOUND:g}s"
    assert await stopping == []
    a.feds.remove(fed)
    assert controller.passes == passes  # no pass ran after the stop


async def _stubborn(release: asyncio.Event) -> None:
    """A task that swallows every cancellation until `release` is set."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def test_cancel_and_wait_can_itself_be_cancelled():
    """A task that ignores its cancellation must not make the stopper uncancellable: the
    stopper's own cancellation (a shutdown deadline) used to be swallowed as the task's."""
    release = asyncio.Event()
    task = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(tasks.cancel_and_wait(task))
    await asyncio.sleep(0)
    stopper.cancel()
    try:
        done, _ = await asyncio.wait({stopper}, timeout=SHUTDOWN_BOUND)
        assert stopper in done, "cancel_and_wait swallowed its own cancellation"
        assert stopper.cancelled()
    finally:
        release.set()
        await task


async def test_stop_abandons_a_loop_that_ignores_its_cancellation(clusters):
    """The bound holds even against a background loop that swallows every cancellation (the
    bug class above): stop() gives up on it at the deadline, says so, and still closes the
    exporter."""
    a = await clusters("a")
    fed = await a.federation(shutdown_timeout=1.0)
    release = asyncio.Event()
    fed._tasks.append(asyncio.create_task(_stubborn(release)))
    exporter = fed.exporter
    assert exporter is not None
    try:
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(fed.stop())
        done, _ = await asyncio.wait({stopping}, timeout=SHUTDOWN_BOUND)
        assert stopping in done, f"stop() still waiting after {SHUTDOWN_BOUND:g}s"
        took = asyncio.get_running_loop().time() - started
        assert await stopping == ["background loops"]
        assert took < 3.0, took  # the 1 s budget, with room for a loaded machine
        assert not exporter.serving
    finally:
        release.set()
    a.feds.remove(fed)
