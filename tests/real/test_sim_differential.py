"""The simulator held to the real kube-apiserver: one corpus of requests against both.

Every difference in status code, `Status` reason and details, or response shape fails the run
unless it is in ALLOWED below, and ALLOWED is exactly the table in docs/simulator.md ("Known
differences"). The proxy's own request classifier is held to the real server on the same corpus:
whatever the real server streams, the proxy must authorize as a watch (or refuse).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from apiproxy.request import RequestRejected, classify
from apiproxy_dev.sim import SimAPIServer
from tests.real import differential as d
from tests.real.cluster import KubeCluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"

# Case id -> why the simulator differs. Keep in step with docs/simulator.md ("Known differences").
ALLOWED: dict[str, str] = {
    "openapi-v2": "no OpenAPI v2 document; kubectl falls back to compiled-in metadata",
    "accept-table": "no server-side Table",
    "accept-table-or-json": "no server-side Table; JSON is the client's stated fallback",
    "accept-protobuf": "no protobuf encoding",
    "accept-protobuf-or-json": "no protobuf encoding; JSON is the client's stated fallback",
    "accept-yaml": "no YAML responses",
    "create-protobuf": "cannot decode protobuf bodies: 415 instead of decoding",
    "create-cr-protobuf": "415 for a protobuf body; 1.37 closes the connection without an answer",
    "create-invalid-name": "no validation of object names",
    "create-cr-invalid-endpoint": "no CRD structural-schema validation",
    "create-cr-no-spec": "no CRD structural-schema validation",
    "get-deleted-namespace": "no Terminating phase: the namespace controller finishes at once",
    "get-in-deleted-namespace": "no Terminating phase: the namespace's objects go with it at once",
    "create-in-deleted-namespace": "no Terminating phase: 404 namespace not found instead of 403",
}


@pytest.fixture(scope="module")
def outcomes(
    kube: KubeCluster, kube_version: tuple[int, int]
) -> Iterator[dict[str, tuple[d.Outcome, d.Outcome]]]:
    real = d.Target(kube.url, kube.admin_token, kube.ca.cert_pem)
    sim_server = SimAPIServer()
    with sim_server.run_in_thread() as sim_running:
        sim = d.Target(sim_running.url, sim_running.token, sim_running.ca_pem)
        d.setup(real)
        d.setup(sim)
        out: dict[str, tuple[d.Outcome, d.Outcome]] = {}
        for case in d.corpus():
            if kube_version < case.min_version:
                continue  # reported by test_apis_newer_than_the_server below
            out[case.id] = (real.send(case), sim.send(case))
        yield out


@pytest.mark.parametrize(
    "case", [c for c in d.corpus() if c.min_version > (1, 0)], ids=lambda c: c.id
)
def test_apis_newer_than_the_server(
    case: d.Case,
    kube_version: tuple[int, int],
    outcomes: dict[str, tuple[d.Outcome, d.Outcome]],
) -> None:
    if kube_version < case.min_version:
        want = ".".join(map(str, case.min_version))
        pytest.skip(f"kube-apiserver {kube_version[0]}.{kube_version[1]} lacks this (needs {want})")
    real, sim = outcomes[case.id]
    assert real == sim or case.id in ALLOWED, f"real {real} | sim {sim}"


def test_the_simulator_answers_as_the_real_server(
    outcomes: dict[str, tuple[d.Outcome, d.Outcome]],
) -> None:
    unexpected = [
        f"{cid}: real {r} | sim {s}"
        for cid, (r, s) in outcomes.items()
        if r != s and cid not in ALLOWED
    ]
    assert not unexpected, "simulator differs from kube-apiserver:\n" + "\n".join(unexpected)
    # An allowed difference that went away is stale: drop it from ALLOWED and the docs.
    stale = [cid for cid in ALLOWED if cid in outcomes and outcomes[cid][0] == outcomes[cid][1]]
    assert not stale, f"no longer different, remove from ALLOWED and docs/simulator.md: {stale}"


def test_the_corpus_covers_what_the_brief_names(
    outcomes: dict[str, tuple[d.Outcome, d.Outcome]],
) -> None:
    # The differences that were confirmed before the simulator was fixed stay in the corpus.
    for cid in ("watch=yes", "watch=on", "watch=", "watch-bare", "named-get-watch=true"):
        assert outcomes[cid][0].shape.startswith("watch:") or cid.startswith("named"), cid
    assert outcomes["named-get-watch=true"][0].shape == "object:Pod"
    assert outcomes["create-text-plain"][0].code == 415
    assert outcomes["watch=false"][0].shape == "list:PodList"


def test_allowed_differences_are_the_documented_ones() -> None:
    text = DOC.read_text()
    section = text.split("## Known differences from kube-apiserver", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    assert documented == set(ALLOWED)


def test_the_proxy_reads_watches_as_the_real_server_does(
    outcomes: dict[str, tuple[d.Outcome, d.Outcome]],
) -> None:
    """A request the real server streams must be authorized as `watch`, never as get or list."""
    checked = 0
    for case in d.corpus():
        if case.id not in outcomes or case.method != "GET":
            continue
        real = outcomes[case.id][0]
        try:
            info = classify(case.method, case.path)
        except RequestRejected:
            continue  # refused before any upstream request: fail closed
        checked += 1
        if real.shape.startswith("watch:"):
            assert info.verb == "watch", (case.id, info.verb, str(real))
        elif real.shape.startswith("list:") or real.shape == "object:Table":
            assert info.verb == "list", (case.id, info.verb, str(real))
        elif real.shape.startswith("object:") and info.is_resource_request:
            assert info.verb == "get", (case.id, info.verb, str(real))
    assert checked > 40
