"""The filter's pieces on their own: list splitting at any chunk boundary, watch events,
projections (Istio's transforms), content negotiation and sealed continue tokens."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import orjson
import pytest

from apiproxy.filtering import (
    ContinueSealer,
    FilterError,
    ListFilter,
    ObjectFilter,
    WatchFilter,
    negotiate_json,
)
from apiproxy.policy.visibility import LabelSelector, Visibility
from apiproxy.projection import LAST_APPLIED, PROXY_OVERRIDES, istiod_node, istiod_pod, strip

EXPORT = Visibility(frozenset({"istio-system"}), LabelSelector((("export", "true"),)))
LABELS = {"istio-system": {}, "shown": {"export": "true"}, "hidden": {}}


def a_pod(name: str, ns: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": name},
            "annotations": {LAST_APPLIED: '{"env":"SECRET"}', PROXY_OVERRIDES: "{}", "keep": "1"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs"},
                {"apiVersion": "v1", "kind": "X", "name": "y"},
            ],
        },
        "spec": {
            "serviceAccountName": "sa",
            "nodeName": "node-1",
            "hostname": "h",
            "containers": [
                {
                    "name": "app",
                    "image": "i",
                    "env": [{"name": "PASSWORD", "value": "SECRET"}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                },
                {"name": "noports", "image": "i", "command": ["SECRET"]},
            ],
            "initContainers": [
                {
                    "name": "sidecar",
                    "restartPolicy": "Always",
                    "ports": [{"containerPort": 15090}],
                    "image": "x",
                },
                {"name": "init", "ports": [{"containerPort": 1}], "image": "x"},
            ],
            "volumes": [{"name": "v", "secret": {"secretName": "SECRET"}}],
        },
        "status": {
            "podIP": "10.1.2.3",
            "phase": "Running",
            "containerStatuses": [{"name": "app"}],
            "initContainerStatuses": [{}],
        },
    }


def a_list(items: list[dict[str, Any]], *, sorted_keys: bool = False, **meta: Any) -> bytes:
    body: dict[str, Any] = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "7", **meta},
        "items": items,
    }
    if sorted_keys:  # how kube-apiserver encodes custom resource lists (unstructured)
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def run_list(
    data: bytes, filt: ObjectFilter, sizes: list[int], meta: Any = lambda m: None, batch: int = 1
) -> Any:
    """Fed in `sizes` pieces; batch 1 looks at every piece as it comes (the default gathers
    128 KiB first, so these small lists would be read whole at close). Read twice, with the list
    route and one item at a time: the answers and counts must be the same."""

    def once(f: ObjectFilter, many: bool) -> tuple[bytes, ListFilter]:
        lf = ListFilter(f.keep, meta, batch=batch, keep_many=f.keep_many if many else None)
        out = b""
        i = 0
        for size in sizes:
            out += lf.feed(data[i : i + size])
            i += size
        out += lf.feed(data[i:])
        out += lf.close()
        return out, lf

    alone = dataclasses.replace(filt, hidden=0)
    one_by_one, ref = once(alone, False)
    out, lf = once(filt, True)
    assert out == one_by_one
    assert out.endswith(b"\n") == data.endswith(b"\n")  # kube-apiserver ends a body with one
    assert (lf.items_in, filt.hidden) == (ref.items_in, alone.hidden)
    assert ref.items_listed == 0
    return orjson.loads(out), lf


def objfilter(projection: str = "") -> ObjectFilter:
    return ObjectFilter("pods", EXPORT, projection, LABELS.get)


@pytest.mark.parametrize("sorted_keys", [False, True])
def test_list_items_are_filtered_and_projected_at_every_chunk_boundary(sorted_keys: bool) -> None:
    items = [
        a_pod(f"p{i}", ns)
        for i, ns in enumerate(["shown", "hidden", "istio-system", "hidden", "unknown", "shown"])
    ]
    data = a_list(items, sorted_keys=sorted_keys, **{"continue": "TOKEN", "remainingItemCount": 9})
    expected = ["p0", "p2", "p5"]
    rng = random.Random(7)
    boundaries = [[len(data)], [1] * len(data)] + [
        [rng.randint(1, 300) for _ in range(40)] for _ in range(20)
    ]

    def meta(obj: Any) -> None:
        if "metadata" not in obj:
            return
        obj["metadata"].pop("remainingItemCount", None)
        obj["metadata"]["continue"] = "SEALED"

    for sizes in boundaries:
        f = objfilter("istiod-pod")
        out, lf = run_list(data, f, sizes, meta)
        assert [i["metadata"]["name"] for i in out["items"]] == expected
        assert out["metadata"] == {"resourceVersion": "7", "continue": "SEALED"}
        assert out["kind"] == "PodList"
        assert (f.hidden, lf.items_in) == (3, 6)
        assert b"SECRET" not in orjson.dumps(out)
        assert b"hidden" not in orjson.dumps(out)


def test_small_reads_are_gathered_and_a_long_list_still_streams() -> None:
    data = a_list([a_pod(f"p{i}", "shown" if i % 3 else "hidden") for i in range(600)])
    assert len(data) > 3 * 128 * 1024
    lf = ListFilter(objfilter("istiod-pod").keep, lambda m: None)
    outs = [lf.feed(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    first = next(i for i, out in enumerate(outs) if out)
    assert (first + 1) * 1000 >= 128 * 1024  # nothing looked at before 128 KiB had come
    assert sum(1 for out in outs if out) >= 3  # then it streams, 128 KiB at a time
    gathered = b"".join(outs) + lf.close()
    one_by_one, _ = run_list(data, objfilter("istiod-pod"), [1000] * (len(data) // 1000))
    assert orjson.loads(gathered) == one_by_one
    assert len(one_by_one["items"]) == 400


def test_empty_list_and_malformed_lists() -> None:
    out, _ = run_list(a_list([]), objfilter(), [3])
    assert out["items"] == []
    assert out["metadata"]["resourceVersion"] == "7"
    for bad in (
        b'{"kind":"PodList","items":null}',
        b'{"kind":"PodList","items":[{"a":1},',
        b"[1,2]",
    ):
        lf = ListFilter(objfilter().keep, lambda m: None)

        def run(lf: ListFilter = lf, bad: bytes = bad) -> None:
            lf.feed(bad)
            lf.close()

        with pytest.raises(FilterError):
            run()


def test_the_list_route_reads_most_items_and_leaves_odd_ones_to_the_item_route() -> None:
    pods = [a_pod(f"p{i}", "shown" if i % 3 else "hidden") for i in range(600)]
    reads = [1000] * (len(a_list(pods)) // 1000)
    out, lf = run_list(a_list(pods), objfilter("istiod-pod"), reads, batch=128 * 1024)
    assert len(out["items"]) == 400
    assert lf.items_listed >= 590  # the last item of each read waits for the next one
    odd = a_pod("odd", "shown") | {"unknownMember": 1}  # only the whole route takes it
    pods[300] = odd
    out, lf = run_list(a_list(pods), objfilter("istiod-pod"), reads, batch=128 * 1024)
    # The read holding it goes item by item, the others as lists.
    assert 400 < lf.items_listed < 590
    assert [i for i in out["items"] if i["metadata"]["name"] == "odd"] == [istiod_pod(odd)]
    # A non-object item among objects is still refused, never sent, by either route.
    bad = a_list([a_pod("a", "shown")] * 2 + [1] + [a_pod("b", "shown")] * 2)  # type: ignore[list-item]
    for many in (True, False):
        f = objfilter("istiod-pod")
        lf = ListFilter(f.keep, lambda m: None, keep_many=f.keep_many if many else None)
        lf.feed(bad)
        with pytest.raises(FilterError, match=r"^the list ended before its items did$"):
            lf.close()


def read_whole(data: bytes) -> tuple[Any, ListFilter, list[int]]:
    """The list fed in one read, with the sizes of what the list route was asked to read."""
    f = objfilter("istiod-pod")
    sizes: list[int] = []

    def many(data: bytes) -> tuple[bytes, int, int] | None:
        sizes.append(len(data))
        return f.keep_many(data)

    lf = ListFilter(f.keep, lambda m: None, keep_many=many)
    return orjson.loads(lf.feed(data) + lf.close()), lf, sizes


def test_a_declined_read_goes_item_by_item_without_asking_again() -> None:
    odd = a_pod("odd", "shown") | {"unknownMember": 1}
    out, lf, calls = read_whole(a_list([odd] + [a_pod(f"p{i}", "shown") for i in range(30)]))
    assert len(calls) == 2  # the last candidate, then the one before: both hold `odd`
    assert (lf.items_listed, lf.items_in, len(out["items"])) == (0, 31, 31)


def test_the_list_route_copies_at_most_a_mib_at_a_time() -> None:
    pods = [a_pod(f"p{i}", "shown") for i in range(12)]
    for pod in pods[::3]:  # ~300 KB items among small ones
        pod["metadata"]["annotations"]["big"] = "x" * 300_000
    big_one = a_pod("big", "shown")
    big_one["metadata"]["annotations"]["big"] = "x" * (1 << 20)  # larger than one list read
    pods.append(big_one)
    out, lf, sizes = read_whole(a_list(pods))
    assert [i["metadata"]["name"] for i in out["items"]] == [p["metadata"]["name"] for p in pods]
    assert len(sizes) == 2
    assert max(sizes) <= (1 << 20) + 2  # the brackets
    assert lf.items_listed == 12  # the last item, with no candidate after it, is read alone


@pytest.mark.parametrize("indent", [None, 1])
@pytest.mark.parametrize("after", [["metadata"], ["kind", "metadata"], ["apiVersion", "kind"]])
def test_members_after_the_items_are_kept_and_their_continue_token_sealed(
    after: list[str], indent: int | None
) -> None:
    """Lists whose members follow `items` (unstructured lists sort their keys): the list still
    ends where it does, and metadata found in the tail is rewritten like metadata in the head."""
    members = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "7", "continue": "TOKEN", "remainingItemCount": 9},
    }
    body = {"items": [a_pod("a", "shown"), a_pod("b", "hidden"), a_pod("c", "shown")]}
    body |= {key: members[key] for key in after}
    separators = None if indent else (",", ":")
    data = json.dumps(body, indent=indent, separators=separators).encode()

    def meta(obj: Any) -> None:
        if "metadata" in obj:
            obj["metadata"].pop("remainingItemCount")
            obj["metadata"]["continue"] = "SEALED"

    for step in (7, len(data)):
        out, _ = run_list(data, objfilter("istiod-pod"), [step] * (len(data) // step), meta)
        assert list(out) == ["items", *after]
        assert [i["metadata"]["name"] for i in out["items"]] == ["a", "c"]
        assert b"TOKEN" not in orjson.dumps(out)
        if "metadata" in after:
            assert out["metadata"] == {"resourceVersion": "7", "continue": "SEALED"}


def test_namespaces_are_seen_by_their_own_name_and_labels() -> None:
    f = ObjectFilter("namespaces", EXPORT, "", LABELS.get)

    def ns(name: str, **labels: str) -> bytes:
        meta: dict[str, Any] = {"name": name} | ({"labels": labels} if labels else {})
        return orjson.dumps({"kind": "Namespace", "metadata": meta})

    assert f.keep(ns("istio-system")) is not None
    assert f.keep(ns("other", export="true")) is not None  # its own labels, not the view's
    assert f.keep(ns("shown")) is None  # the view says exported; the object it is decides
    assert f.keep(ns("hidden")) is None
    odd = orjson.dumps({"metadata": {"name": "odd", "labels": [["export", "true"]]}})
    assert f.keep(odd) is None  # labels that are not a mapping select nothing
    assert f.hidden == 3
    pods = objfilter()
    for namespace in ("", 5, None, ["istio-system"]):
        pod = a_pod("p", "shown")
        pod["metadata"]["namespace"] = namespace
        if namespace is None:
            del pod["metadata"]["namespace"]
        assert pods.keep(orjson.dumps(pod)) is None, namespace
    assert pods.keep(orjson.dumps(a_pod("p", "shown"))) is not None


def test_nested_lists_of_objects_never_split_an_item() -> None:
    """Items whose nested lists start with the items' own first key (ownerReferences in
    sorted-key custom resource lists) are false candidates that fail to decode, never items."""
    items = [
        {
            "apiVersion": "x/v1",
            "kind": "W",
            "metadata": {
                "name": f"w{i}",
                "namespace": "shown",
                "ownerReferences": [
                    {"apiVersion": "a", "name": "o1"},
                    {"apiVersion": "b", "name": "o2"},
                ],
            },
            "spec": {"list": [{"apiVersion": "z"}]},
        }
        for i in range(3)
    ]
    body = json.dumps(
        {
            "apiVersion": "x/v1",
            "items": items,
            "kind": "WList",
            "metadata": {"resourceVersion": "3"},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    for step in (1, 5, len(body)):
        out, lf = run_list(body, objfilter(), [step] * (len(body) // step))
        assert [i["metadata"]["name"] for i in out["items"]] == ["w0", "w1", "w2"]
        assert out["items"][0]["spec"] == {"list": [{"apiVersion": "z"}]}
    # Read whole, the last candidate is inside w2 (a false one); the one before ends w1.
    assert lf.items_listed == 2


@pytest.mark.parametrize("indent", [4, None])  # None: `", "` and `": "`, spaced but on one line
def test_pretty_printed_lists_are_read_too(indent: int | None) -> None:
    body = json.dumps(
        {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": [a_pod("a", "shown"), a_pod("b", "hidden"), a_pod("c", "shown")],
        },
        indent=indent,
    ).encode()
    for step in (17, len(body)):
        out, _ = run_list(body, objfilter(), [step] * (len(body) // step))
        assert [i["metadata"]["name"] for i in out["items"]] == ["a", "c"]


def test_a_list_tail_is_bounded_like_its_head() -> None:
    body = orjson.dumps({"items": [a_pod("a", "shown")], "metadata": {"x": "x" * (2 << 20)}})
    lf = ListFilter(objfilter().keep, lambda m: None, batch=1)

    def first_1_5_mib() -> None:  # refused while it streams, not at the end
        for i in range(0, 3 << 19, 4096):
            lf.feed(body[i : i + 4096])

    with pytest.raises(FilterError, match=r"^list tail too large$"):
        first_1_5_mib()


def test_watch_events_filtered_bookmarks_and_errors_always_pass() -> None:
    f = objfilter("istiod-pod")
    wf = WatchFilter(f.keep)
    events = [
        {"type": "ADDED", "object": a_pod("a", "shown")},
        {"type": "ADDED", "object": a_pod("b", "hidden")},
        {"type": "MODIFIED", "object": a_pod("b", "hidden")},
        {"type": "DELETED", "object": a_pod("b", "hidden")},
        {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {
                    "resourceVersion": "9",
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        },
        {"type": "DELETED", "object": a_pod("a", "shown")},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410}},
    ]
    data = b"".join(orjson.dumps(e) + b"\n" for e in events)
    out = b""
    for i in range(0, len(data), 13):
        out += wf.feed(data[i : i + 13])
    out += wf.close()
    got = [orjson.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in got] == ["ADDED", "BOOKMARK", "DELETED", "ERROR"]
    assert got[1] == events[4]
    assert f.hidden == 3
    assert wf.events_out == 4
    assert b"SECRET" not in out
    assert b'"b"' not in out
    with pytest.raises(FilterError):
        WatchFilter(f.keep).feed(b'{"type":"WHAT","object":{}}\n')


def test_watch_events_framed_otherwise_are_read_whole() -> None:
    """kube-apiserver's framing is read without decoding the event; any other framing of the
    same event (spacing, key order, an extra member, a repeated key) gives the same answer."""
    shown = orjson.dumps(a_pod("a", "shown")).decode()
    hidden = orjson.dumps(a_pod("b", "hidden")).decode()
    lines = [
        '{"type":"ADDED","object":' + shown + "}",
        '{"type": "ADDED", "object": ' + shown + " }",
        '{"object":' + shown + ',"type":"MODIFIED"}',
        '{"type":"ADDED","object":' + shown + ',"extra":1}',
        '{"type":"DELETED","object":' + shown + ',"object":' + hidden + "}",
        '{"type":"ADDED","object":' + hidden + "}",
        '{"type":"ADDED","object":null}',
        '{"type":"ADDED"}',
    ]
    f = objfilter("istiod-pod")
    out = WatchFilter(f.keep).feed("".join(line + "\n" for line in lines).encode())
    got = [orjson.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in got] == ["ADDED", "ADDED", "MODIFIED", "ADDED"]
    assert all(e["object"]["metadata"]["name"] == "a" for e in got)
    assert all(set(e) == {"type", "object"} for e in got)
    assert all(e["object"]["spec"]["containers"][0]["name"] == "" for e in got)
    assert f.hidden == 4
    for bad in (
        b'{"type":"ADDED","object":{"a":}\n',
        b'{"type":"ADDED","object":{}\n',
        b'{"type":["ADDED"],"object":{}}\n',
        b'{"type":{"a":1},"object":{}}\n',
        b"[1]\n",
    ):
        with pytest.raises(FilterError):
            WatchFilter(f.keep).feed(bad)


def test_istiod_pod_projection_mirrors_strip_pod_unused_fields() -> None:
    pod = istiod_pod(a_pod("a", "shown"))
    assert pod["spec"] == {
        "containers": [{"name": "", "ports": [{"name": "http", "containerPort": 8080}]}],
        "initContainers": [
            {"name": "", "ports": [{"containerPort": 15090}], "restartPolicy": "Always"}
        ],
        "serviceAccountName": "sa",
        "nodeName": "node-1",
        "hostname": "h",
    }
    assert pod["status"] == {"podIP": "10.1.2.3", "phase": "Running"}
    assert pod["metadata"]["annotations"] == {"keep": "1"}
    assert "managedFields" not in pod["metadata"]
    assert pod["metadata"]["labels"] == {"app": "a"}
    assert len(pod["metadata"]["ownerReferences"]) == 2  # Istio keeps them on pods


def test_istiod_node_projection_mirrors_strip_node_unused_fields() -> None:
    node = {
        "metadata": {
            "name": "n",
            "labels": {"topology.kubernetes.io/zone": "z"},
            "annotations": {"a": "b"},
            "ownerReferences": [{}],
            "managedFields": [{}],
        },
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "capacity": {"cpu": "4"},
            "allocatable": {},
            "images": [{}],
            "conditions": [{}],
            "nodeInfo": {"kubeletVersion": "v1"},
        },
    }
    out = istiod_node(node)
    assert out["metadata"] == {"name": "n", "labels": {"topology.kubernetes.io/zone": "z"}}
    assert out["status"] == {
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        "nodeInfo": {"kubeletVersion": "v1"},
    }
    assert out["spec"] == {"podCIDR": "10.0.0.0/24"}


def test_strip_drops_only_the_three_things() -> None:
    obj = {
        "metadata": {"name": "s", "managedFields": [], "annotations": {LAST_APPLIED: "x"}},
        "spec": {"ports": [1]},
    }
    assert strip(obj) == {"metadata": {"name": "s"}, "spec": {"ports": [1]}}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", "application/json"),
        ("application/vnd.kubernetes.protobuf,application/json", "application/json"),
        ("application/vnd.kubernetes.protobuf", None),
        (
            "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        ),
        (
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
            "application/json",
        ),
        ("application/json;as=Table;v=v1;g=meta.k8s.io", None),
        ("application/yaml", None),
        ("*/*", "application/json"),
    ],
)
def test_negotiation_answers_json_or_nothing(accept: str, expected: str | None) -> None:
    assert negotiate_json(accept) == expected


def test_sealed_tokens_hide_the_key_and_bind_peer_and_rule() -> None:
    sealer = ContinueSealer(b"serving key")
    upstream = (
        "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6Nywic3RhcnQiOiJoaWRkZW4vc2VjcmV0LXBvZFx1MDAwMCJ9"
    )
    sealed = sealer.seal(upstream, "a\x00rule")
    assert upstream not in sealed
    assert "hidden" not in sealed
    assert sealer.open(sealed, "a\x00rule") == upstream
    assert sealer.open(sealed, "b\x00rule") is None
    assert sealer.open(upstream, "a\x00rule") is None
    assert sealer.open("apx1.!!!", "a\x00rule") is None
    other = ContinueSealer(b"another key")
    assert other.open(sealed, "a\x00rule") is None
    sealer.rotate(b"new key")
    assert sealer.open(sealed, "a\x00rule") == upstream  # the previous key still opens


def test_namespace_view_tells_resumed_watches_what_they_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apiproxy import nsview as nsview_mod
    from apiproxy.nsview import NamespaceChange, NamespaceView

    view = NamespaceView(None, None)  # type: ignore[arg-type]  # never started: no upstream
    concerns_export = lambda c: EXPORT.sees(c.name, c.old) != EXPORT.sees(c.name, c.new)  # noqa: E731
    assert view.changed_since(10, concerns_export)  # not synced: cannot tell
    view._apply("team", {}, 100)  # the first LIST
    view.synced, view.known_since = True, 100
    assert view.changed_since(99, concerns_export)  # older than what the view knows
    assert not view.changed_since(100, concerns_export)
    seen: list[NamespaceChange] = []
    view.subscribe(seen.append)
    clock = [1000.0]
    monkeypatch.setattr(nsview_mod.time, "monotonic", lambda: clock[0])
    view._apply("team", {"export": "true"}, 120)
    assert [c.name for c in seen] == ["team"]
    assert view.changed_since(119, concerns_export)
    # Learned just now: even a newer resourceVersion may hold a list filtered the old way.
    assert view.changed_since(150, concerns_export)
    clock[0] += nsview_mod.RECENT_SECONDS + 1
    assert not view.changed_since(150, concerns_export)
    assert view.changed_since(119, concerns_export)
    # A label change that does not change visibility concerns no one.
    view._apply("team", {"export": "true", "x": "y"}, 130)
    assert not view.changed_since(125, concerns_export)
    assert view.get("team") == {"export": "true", "x": "y"}
    # A list this view answered at an old resourceVersion (an idle resource's watch cache):
    # judged by when it was answered, never by the resourceVersion alone.
    view.note_list_served(42)
    assert not view.changed_since(42, concerns_export)  # older than known_since, yet no 410
    clock[0] += 1
    view._apply("team", {}, 140)  # leaves the export view after that list was answered
    assert view.changed_since(42, concerns_export)
    clock[0] += nsview_mod.RECENT_SECONDS + 1
    view.note_list_served(43)
    assert not view.changed_since(43, concerns_export)
    assert view.changed_since(41, concerns_export)  # never answered here: older than known
