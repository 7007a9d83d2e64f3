"""The byte route of the projections (`apiproxy.projection.decoder`) against their definition (the
dict functions): for every object, pod-shaped or not, the bytes sent decode to exactly what the
definition makes of the decoded object, and visibility reads the same metadata.

Real pods take the typed route; anything it cannot type is decoded whole. Both are checked, and
so is which route an object took, so a route that silently always fell back would fail here."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apiproxy.projection import (
    LAST_APPLIED,
    PROXY_OVERRIDES,
    NotJSON,
    decoder,
    encode_all,
    istiod_node,
    istiod_pod,
    many_decoder,
    strip,
)
from apiproxy_dev.sim.seed import pod as sim_pod
from tests.proxy.test_filtering_units import a_pod

DEFINITIONS = {"": strip, "istiod-pod": istiod_pod, "istiod-node": istiod_node}


def by_definition(name: str, data: bytes) -> Any:
    obj = json.loads(data)
    return DEFINITIONS[name](obj) if isinstance(obj, dict) else None


def by_bytes(name: str, data: bytes) -> tuple[Any, Any]:
    decoded = decoder(name)(data)
    if not decoded.is_object:
        return None, None
    return orjson.loads(decoded.encode()), decoded


def check_same(name: str, data: bytes) -> Any:
    expected = by_definition(name, data)
    got, decoded = by_bytes(name, data)
    assert got == expected
    if decoded is not None:
        meta = expected.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        for key in ("namespace", "name", "labels"):
            assert decoded.member(key) == meta.get(key)
    return decoded


def enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def test_real_pods_take_the_typed_route_and_lose_what_istiod_drops() -> None:
    for pod in (
        a_pod("a", "shown"),
        sim_pod("ns", "p", "app", "node-1", 3, managed_fields=True),
        {"kind": "Pod", "apiVersion": "v1", **a_pod("b", "x")},
    ):
        data = enc(pod)
        decoded = check_same("istiod-pod", data)
        assert not decoded.whole
        out = decoded.encode()
        assert b"managedFields" not in out
        assert b"last-applied" not in out
        assert b"SECRET" not in out
        assert b"containerStatuses" not in out


def test_an_escaped_annotation_key_is_still_stripped() -> None:
    """JSON may escape any character of a key; the key is compared decoded, never as bytes."""
    data = enc(a_pod("a", "shown")).replace(
        b'"kubectl.kubernetes.io/last-applied-configuration"',
        b'"kubectl.kubernetes.io\\/last-applied-configuration"',
    )
    assert b"\\/last-applied" in data
    for name in DEFINITIONS:
        decoded = check_same(name, data)
        assert b"last-applied" not in decoded.encode()


def test_members_passed_on_keep_their_bytes() -> None:
    """Go escapes <, > and & in strings; what the projection does not touch is sent as received."""
    data = enc(a_pod("a", "shown")).replace(b'"app":"a"', b'"app":"\\u003cb\\u003e"')
    decoded = check_same("istiod-pod", data)
    assert b'"app":"\\u003cb\\u003e"' in decoded.encode()


ODD = [
    {},
    {"metadata": None},
    {"metadata": "x"},
    {"metadata": {"annotations": None, "managedFields": 1}},
    {"metadata": {"annotations": "s"}},
    {"metadata": {"annotations": {}}},
    {"metadata": {"annotations": {LAST_APPLIED: "x", PROXY_OVERRIDES: "y"}}},
    {"metadata": {"namespace": 5, "name": None, "labels": []}},
    {"spec": None},
    {"spec": "x"},
    {"spec": {}},
    {"spec": {"containers": None, "initContainers": None}},
    {"spec": {"containers": 1, "initContainers": True}},
    {"spec": {"containers": "ab", "initContainers": {"ports": [1]}}},
    {"spec": {"containers": [1, "x", None, {}]}},
    {"spec": {"containers": [{"ports": None}, {"ports": []}, {"ports": {"a": 1}}]}},
    {"spec": {"containers": [{"ports": "p"}, {"ports": 0}, {"ports": [0]}]}},
    {"spec": {"initContainers": [{"ports": [1], "restartPolicy": 1}]}},
    {"spec": {"initContainers": [{"ports": [1], "restartPolicy": "Always"}, {"ports": [2]}]}},
    {"spec": {"initContainers": [{"ports": [], "restartPolicy": "Always"}]}},
    {"spec": {"hostNetwork": None, "hostname": {"x": 1}, "subdomain": [], "nodeName": 0}},
    {"status": None},
    {"status": [1]},
    {"status": {"containerStatuses": None, "capacity": 1, "conditions": [], "podIP": "1"}},
    {"unknown": 1, "spec": {"containers": [{"ports": [1]}]}},
    {"kind": None, "apiVersion": 7},
    # decoded whole, yet with metadata that visibility reads
    {"metadata": {"namespace": "ns", "name": "n", "labels": {"a": "b"}}, "spec": None},
    # typed, with a status that has no container statuses to drop
    {"metadata": {"namespace": "ns"}, "status": {"phase": "Pending"}},
    {"metadata": {"name": "n"}, "spec": {"containers": []}, "status": {}},
]


@pytest.mark.parametrize("obj", ODD, ids=[enc(o).decode()[:60] for o in ODD])
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_odd_objects_are_projected_as_defined(name: str, obj: dict[str, Any]) -> None:
    check_same(name, enc(obj))


def test_what_the_typed_route_cannot_take_is_decoded_whole() -> None:
    typed = decoder("istiod-pod")
    assert not typed(enc({"metadata": {}, "spec": {"containers": [{"ports": [1]}]}})).whole
    assert not typed(enc({"metadata": {"namespace": "ns"}, "status": {"phase": "Pending"}})).whole
    whole = typed(enc({"metadata": {"namespace": "ns"}, "spec": None}))
    assert whole.whole
    assert whole.member("namespace") == "ns"
    for odd in (
        {"unknown": 1},
        {"spec": None},
        {"spec": {"containers": [1]}},
        {"spec": {"containers": [{"ports": {"a": 1}}]}},
        {"metadata": None},
        {"status": [1]},
    ):
        assert typed(enc(odd)).whole, odd


@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_non_objects_are_never_sent_and_broken_bytes_are_not_json(name: str) -> None:
    decode = decoder(name)
    for value in (b"null", b"[1]", b'"s"', b"3"):
        assert not decode(value).is_object
    for bad in (
        b"",
        b"{",
        b'{"metadata":{}',
        b'{"a":1}}',
        b'{"a":1},{"b":2}',
        b"nul",
        b'{"a":[1,}',
    ):
        with pytest.raises(NotJSON):
            decode(bad)
    assert decode(b' {"metadata":{"name":"n"}} ').is_object


KEYS = st.sampled_from(
    [
        "metadata",
        "spec",
        "status",
        "kind",
        "apiVersion",
        "name",
        "namespace",
        "labels",
        "annotations",
        "managedFields",
        "ownerReferences",
        "containers",
        "initContainers",
        "ports",
        "restartPolicy",
        "serviceAccountName",
        "nodeName",
        "hostNetwork",
        "hostname",
        "subdomain",
        "containerStatuses",
        "initContainerStatuses",
        "capacity",
        "allocatable",
        "images",
        "conditions",
        LAST_APPLIED,
        PROXY_OVERRIDES,
        "x",
    ]
)
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "Always", "a"])
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.dictionaries(KEYS, JSON, max_size=6), name=st.sampled_from(list(DEFINITIONS)))
def test_any_object_is_projected_as_defined(obj: dict[str, Any], name: str) -> None:
    check_same(name, enc(obj))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    objs=st.lists(st.dictionaries(KEYS, JSON, max_size=6), max_size=4),
    name=st.sampled_from(list(DEFINITIONS)),
)
def test_a_list_read_at_once_is_each_object_read_alone(objs: list[Any], name: str) -> None:
    """The list route (`many_decoder`) gives each object's bytes exactly as the item route, or
    declines the whole list when any object needs the whole route."""
    alone = [decoder(name)(enc(o)) for o in objs]
    many = many_decoder(name)(enc(objs))
    if any(d.whole for d in alone):
        assert many is None
        return
    assert many is not None
    assert encode_all(many) == b",".join(d.encode() for d in alone)
    for got, want in zip(many, alone, strict=True):
        for key in ("namespace", "name", "labels"):
            assert got.member(key) == want.member(key)


@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_the_list_route_declines_what_is_not_a_whole_list_of_objects(name: str) -> None:
    read = many_decoder(name)
    pods = enc([sim_pod("ns", f"p{i}", "app", "node-1", i) for i in range(3)])
    for bad in (b"[1]", b'[{"a":1},null]', b"{}", b"", b"[{}", pods[:-1], pods[: len(pods) // 2]):
        assert read(bad) is None, bad
    many = read(pods)
    assert many is not None
    assert len(many) == 3
    assert encode_all([]) == b""


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(1, 2000))
def test_a_cut_pod_is_never_an_object(cut: int) -> None:
    """What the list splitter relies on: a prefix of an item never decodes."""
    data = enc(sim_pod("ns", "p", "app", "node-1", 3, managed_fields=True))
    cut = cut % (len(data) - 1) + 1
    with pytest.raises(NotJSON):
        decoder("istiod-pod")(data[:cut])
    with pytest.raises(NotJSON):
        decoder("")(data[:cut])
