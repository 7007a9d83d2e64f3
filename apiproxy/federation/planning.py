"""Which peers get artifacts this pass: identity collisions between peers, decided without I/O.

```python
plans, refusals = plan(peers, existing, identity)
plans["b"].pub      # the public document b's artifacts are built from; None: hold them as they are
refusals            # [Refusal(peer="c", kind=NETWORK_CONFLICT, value="net-1", other=...)]
```

A cluster UUID, cluster ID or (for peers with ingress gateways) network name claimed by two peers
goes to the peer whose artifacts already hold it (the incumbent), else to the oldest object
(creationTimestamp, then name). One that is this cluster's own, or (cluster ID) that a remote
secret not managed by us registers, goes to nobody. Every other claimant is refused: its existing
artifacts are held, none are written for it. A peer gets at most one refusal per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from apiproxy import uuids
from apiproxy.federation import artifacts
from apiproxy.federation.identity import cluster_id
from apiproxy.federation.metadata import PrivateMetadata, PublicMetadata

UUID_CONFLICT = "ClusterUUIDConflict"
ID_CONFLICT = "ClusterIDConflict"
NETWORK_CONFLICT = "NetworkNameConflict"
CONFLICT_REASONS = frozenset({UUID_CONFLICT, ID_CONFLICT, NETWORK_CONFLICT})
_WHAT = {UUID_CONFLICT: "cluster UUID", ID_CONFLICT: "cluster ID", NETWORK_CONFLICT: "network name"}


class LocalNames(Protocol):
    """This cluster's identity as far as collisions go (`identity.LocalIdentity` is one)."""

    @property
    def cluster_uuid(self) -> str: ...
    @property
    def cluster_id(self) -> str: ...
    @property
    def network(self) -> str: ...
    @property
    def cluster_domain(self) -> str: ...


@dataclass(frozen=True)
class Peer:
    """One IstioMulticluster as the planner sees it. `pub`/`priv` are its cached documents
    (None when absent or unusable: its artifacts are held)."""

    name: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts by time)
    pub: PublicMetadata | None
    priv: PrivateMetadata | None
    gateways: bool = True  # spec.enableIngressGateway: only then does it claim a network


@dataclass
class Existing:
    """Who holds which identity in the artifacts written so far (read once per pass)."""

    secret_ids: dict[str, set[str]] = field(default_factory=dict)  # IMC name -> cluster IDs
    foreign_ids: dict[str, str] = field(default_factory=dict)  # cluster ID -> foreign secret
    peer_entries: dict[str, artifacts.PeerEntry] = field(default_factory=dict)
    net_owners: dict[str, str] = field(default_factory=dict)  # IMC name -> network


@dataclass
class Plan:
    """What one peer's artifacts are built from this pass. `pub`/`priv` None means *hold*: the
    artifacts derived from that document are kept exactly as they are (not rewritten, not
    removed). Only deleting the IstioMulticluster removes a peer's artifacts."""

    pub: PublicMetadata | None
    priv: PrivateMetadata | None
    refused: str = ""  # a *Conflict reason when the peer was refused


@dataclass(frozen=True)
class Refusal:
    peer: str
    kind: str  # UUID_CONFLICT, ID_CONFLICT or NETWORK_CONFLICT
    value: str
    other: str  # who has it: "this cluster's own", 'already used by IstioMulticluster "b"', ...

    @property
    def what(self) -> str:
        return _WHAT[self.kind]

    @property
    def message(self) -> str:
        return (
            f"{self.what} {self.value} is {self.other}; refused: this peer's existing artifacts "
            "are kept and no new ones are written until the conflict is resolved"
        )


def peer_cluster_id(pub: PublicMetadata, priv: PrivateMetadata, cluster_domain: str) -> str:
    """Recent peers publish clusterID; older ones share our cluster domain (same mesh)."""
    return priv.cluster_id or cluster_id(cluster_domain, pub.cluster_uuid)


def plan(
    peers: Sequence[Peer], existing: Existing, local: LocalNames
) -> tuple[dict[str, Plan], list[Refusal]]:
    """Each peer's documents for this pass, and the refusals (in a stable order)."""
    ex = existing
    plans = {p.name: Plan(p.pub, p.priv if p.pub is not None else None) for p in peers}
    claims: dict[tuple[str, str], set[str]] = {}

    def claim(kind: str, value: str | None, name: str) -> None:
        if value:
            claims.setdefault((kind, value), set()).add(name)

    for peer in peers:
        p, entry = plans[peer.name], ex.peer_entries.get(peer.name)
        # A peer on hold still claims what its artifacts hold, so nobody takes it over.
        held_uuid = uuids.key(entry.cluster_uuid) if entry is not None else None
        claim(UUID_CONFLICT, p.pub.cluster_uuid if p.pub else held_uuid, peer.name)
        if p.pub is not None and p.priv is not None:
            claim(ID_CONFLICT, peer_cluster_id(p.pub, p.priv, local.cluster_domain), peer.name)
            if peer.gateways:
                claim(NETWORK_CONFLICT, p.priv.network_name, peer.name)
        else:
            for cid in ex.secret_ids.get(peer.name, ()):
                claim(ID_CONFLICT, cid, peer.name)
            if peer.gateways:
                claim(NETWORK_CONFLICT, ex.net_owners.get(peer.name), peer.name)

    def holds(kind: str, value: str, name: str) -> bool:
        if kind == UUID_CONFLICT:
            entry = ex.peer_entries.get(name)
            return entry is not None and uuids.key(entry.cluster_uuid) == value
        if kind == ID_CONFLICT:
            return value in ex.secret_ids.get(name, set())
        return ex.net_owners.get(name) == value

    own = {
        UUID_CONFLICT: local.cluster_uuid,
        ID_CONFLICT: local.cluster_id,
        NETWORK_CONFLICT: local.network,
    }
    created = {p.name: p.created for p in peers}
    refusals: list[Refusal] = []
    for (kind, value), names in sorted(claims.items()):
        ordered = sorted(names, key=lambda n: (created[n], n))
        if value == own[kind]:
            losers, other = ordered, "this cluster's own"
        elif kind == ID_CONFLICT and value in ex.foreign_ids:
            losers = ordered
            other = f"registered by secret {ex.foreign_ids[value]} (not managed by apiproxy)"
        elif len(ordered) > 1:
            winner = next((n for n in ordered if holds(kind, value, n)), ordered[0])
            losers = [n for n in ordered if n != winner]
            other = f'already used by IstioMulticluster "{winner}"'
        else:
            continue
        for name in losers:
            p = plans[name]
            if p.refused:
                continue  # one reason per pass is enough
            p.pub, p.priv, p.refused = None, None, kind
            refusals.append(Refusal(name, kind, value, other))
    return plans, refusals
