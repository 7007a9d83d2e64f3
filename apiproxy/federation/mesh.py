"""The `istio` ConfigMap's `caCertificates` and `meshNetworks`: what this pass should make of
them, decided without I/O.

```python
result = update(configmap, [MeshPeer("b", ca=(pem, digest), network=spec)], "cluster.local")
if result is not None:      # None: the ConfigMap already says exactly this
    body["data"], body["metadata"]["annotations"] = result.data, result.annotations
```

Ownership lives in annotations on the ConfigMap: which roots and networks apiproxy wrote (only
those are ever rewritten or removed; everything else is foreign and kept as found) and which peer
each belongs to (so a peer on hold keeps exactly its own entries).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from apiproxy.federation import artifacts

Obj = dict[str, Any]


class MeshConfigError(ValueError):
    """The ConfigMap's mesh documents cannot be read: nothing is written."""


@dataclass(frozen=True)
class MeshPeer:
    """What one active peer wants in the mesh config this pass.

    `ca`: (root PEM, its `artifacts.pem_digest`), or None to hold the root this peer owns.
    `network`: its meshNetworks entry, or None to hold the network this peer owns.
    `gateways` False (spec.enableIngressGateway) removes its network, whatever the documents.
    """

    name: str
    ca: tuple[str, str] | None
    network: artifacts.NetworkSpec | None
    gateways: bool = True


@dataclass(frozen=True)
class MeshUpdate:
    data: dict[str, str]  # the ConfigMap's new `data`
    annotations: dict[str, str]  # its new `metadata.annotations`
    peers: list[str]  # peers whose root is written this pass
    networks: list[str]  # networks apiproxy owns afterwards


def _json_map(text: str | None) -> dict[str, str] | None:
    """An owner annotation: {"<IMC name>": "<value>"}; None when absent or not such a map."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return {str(k): v for k, v in doc.items() if isinstance(v, str)}


def _json_list(text: str | None) -> set[str]:
    try:
        doc = json.loads(text or "[]")
    except ValueError:
        return set()
    return {str(v) for v in doc} if isinstance(doc, list) else set()


def owners(cm: Obj | None) -> tuple[dict[str, str] | None, dict[str, str]]:
    """(CA digest by peer or None when never recorded, network by peer) of the istio ConfigMap.
    Networks written before the owner annotation existed are attributed by their
    `fromRegistry: <IMC name>` endpoint."""
    if cm is None:
        return None, {}
    annotations = (cm.get("metadata") or {}).get("annotations") or {}
    ca = _json_map(annotations.get(artifacts.CA_OWNERS_ANNOTATION))
    nets = _json_map(annotations.get(artifacts.NETWORK_OWNERS_ANNOTATION))
    if nets is None:
        nets = {}
        try:
            doc = yaml.safe_load(((cm.get("data") or {}).get("meshNetworks")) or "") or {}
        except yaml.YAMLError:
            doc = {}
        networks = doc.get("networks") if isinstance(doc, dict) else None
        for name in sorted(_json_list(annotations.get(artifacts.OWNED_NETWORKS_ANNOTATION))):
            entry = networks.get(name) if isinstance(networks, dict) else None
            for ep in (entry.get("endpoints") if isinstance(entry, dict) else None) or []:
                if isinstance(ep, dict) and isinstance(ep.get("fromRegistry"), str):
                    nets.setdefault(ep["fromRegistry"], name)
    return ca, nets


def update(cm: Obj, desired: Sequence[MeshPeer], cluster_domain: str) -> MeshUpdate | None:
    """The ConfigMap's new data and annotations, or None when nothing changes. A peer not in
    `desired` (deleted) loses what it owned; foreign entries are never touched."""
    data = dict(cm.get("data") or {})
    annotations = dict((cm.get("metadata") or {}).get("annotations") or {})
    try:
        mesh = yaml.safe_load(data.get("mesh") or "") or {}
        networks_doc = yaml.safe_load(data.get("meshNetworks") or "") or {}
    except yaml.YAMLError:
        raise MeshConfigError("mesh YAML does not parse") from None
    if not isinstance(mesh, dict) or not isinstance(networks_doc, dict):
        raise MeshConfigError("mesh is not a mapping")
    owned_ca = _json_list(annotations.get(artifacts.OWNED_CA_ANNOTATION))
    owned_nets = _json_list(annotations.get(artifacts.OWNED_NETWORKS_ANNOTATION))
    old_ca_owners, old_net_owners = owners(cm)
    ca_desired: dict[str, tuple[str, list[str]]] = {}
    net_desired: list[artifacts.NetworkSpec] = []
    ca_owners: dict[str, str] = {}
    net_owners: dict[str, str] = {}
    keep_ca: set[str] = set()
    keep_nets: set[str] = set()
    unattributed_hold = False
    for peer in desired:
        if peer.ca is not None:
            ca_desired[peer.name] = (peer.ca[0], [cluster_domain])
            ca_owners[peer.name] = peer.ca[1]
        elif old_ca_owners is None:
            # Written before owners were recorded: which root is this peer's is unknown, so
            # every root we own stays until the peer is usable again.
            keep_ca |= owned_ca
            unattributed_hold = True
        elif peer.name in old_ca_owners:
            keep_ca.add(old_ca_owners[peer.name])
            ca_owners[peer.name] = old_ca_owners[peer.name]
        if not peer.gateways:
            continue  # the spec says no network: removed, whatever the documents
        if peer.network is not None:
            net_desired.append(peer.network)
            net_owners.setdefault(peer.name, peer.network.network)
        elif peer.name in old_net_owners:
            keep_nets.add(old_net_owners[peer.name])
            net_owners[peer.name] = old_net_owners[peer.name]
    new_mesh, new_owned_ca = artifacts.merge_ca_certificates(mesh, ca_desired, owned_ca, keep_ca)
    new_nets, new_owned_nets = artifacts.merge_mesh_networks(
        networks_doc, net_desired, owned_nets, keep_nets
    )
    ca_owners = {n: d for n, d in ca_owners.items() if d in new_owned_ca}
    # One owner per network: a held one first, then by name.
    claimed: set[str] = set()
    for n in sorted(net_owners, key=lambda n: (net_owners[n] not in keep_nets, n)):
        if net_owners[n] in new_owned_nets and net_owners[n] not in claimed:
            claimed.add(net_owners[n])
        else:
            net_owners.pop(n)
    new_data = dict(data)
    if new_mesh != mesh:
        new_data["mesh"] = artifacts.dump_yaml(new_mesh)
    if new_nets != networks_doc and ("meshNetworks" in data or new_owned_nets):
        new_data["meshNetworks"] = artifacts.dump_yaml(new_nets)
    new_ann = dict(annotations)
    new_ann[artifacts.OWNED_CA_ANNOTATION] = json.dumps(sorted(new_owned_ca))
    new_ann[artifacts.OWNED_NETWORKS_ANNOTATION] = json.dumps(sorted(new_owned_nets))
    if not new_owned_ca and artifacts.OWNED_CA_ANNOTATION not in annotations:
        new_ann.pop(artifacts.OWNED_CA_ANNOTATION)
    if not new_owned_nets and artifacts.OWNED_NETWORKS_ANNOTATION not in annotations:
        new_ann.pop(artifacts.OWNED_NETWORKS_ANNOTATION)
    for key, by_peer in (
        (artifacts.CA_OWNERS_ANNOTATION, ca_owners),
        (artifacts.NETWORK_OWNERS_ANNOTATION, net_owners),
    ):
        if key == artifacts.CA_OWNERS_ANNOTATION and unattributed_hold:
            continue  # stays unrecorded until every held root can be attributed
        if by_peer or key in annotations:
            new_ann[key] = json.dumps(by_peer, sort_keys=True)
    if new_data == data and new_ann == annotations:
        return None
    return MeshUpdate(new_data, new_ann, sorted(ca_desired), sorted(new_owned_nets))
