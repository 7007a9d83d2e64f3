"""serialize (orjson) writes what the standard library wrote: the same bytes for every JSON value
an audit record holds except floats, which parse to the same values; what orjson refuses takes
the standard library's path unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apiproxy.audit import events as ev
from apiproxy.audit.writer import serialize


def stdlib(event: Any) -> bytes:
    return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text()  # any code point but lone surrogates: control characters, U+2028, emoji, ...
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=30
)


@given(st.dictionaries(st.text(), values))
def test_same_bytes_as_the_standard_library(event: dict[str, Any]) -> None:
    assert serialize(event) == stdlib(event)


@given(st.dictionaries(st.text(), st.floats(allow_nan=False, allow_infinity=False)))
def test_floats_parse_to_the_same_values(event: dict[str, Any]) -> None:
    out = serialize(event)
    assert out.endswith(b"\n")
    assert out.count(b"\n") == 1
    assert json.loads(out) == json.loads(stdlib(event)) == event


def test_a_real_record_is_byte_identical() -> None:
    event = ev.make_event(
        audit_id="6f1c2c1e-1111-4111-8111-111111111111",
        stage=ev.STAGE_RESPONSE_COMPLETE,
        request_uri="/api/v1/namespaces/small/pods/small-0?watch=1",
        verb="watch",
        username="peer:aaaaaaaa",
        groups=[ev.PEER_GROUP],
        extra={"apiproxy.io/peer": ["bench-peer"]},
        source_ips=["127.0.0.1"],
        user_agent="kubectl/v1.30 ünïcødé \u2028 \x01",
        object_ref={"resource": "pods", "namespace": "small", "name": "small-0"},
        code=200,
        received=1_764_000_000.123456,
        stage_time=1_764_000_000.654321,
        annotations={"apiproxy.io/bytes-sent": 7123, "apiproxy.io/watch-events": 3},
    )
    assert serialize(event) == stdlib(event)


@pytest.mark.parametrize(
    ("event", "error"),
    [
        ({"ua": "bad \udcff byte"}, UnicodeEncodeError),  # as before: a lone surrogate fails
        ({1: "x"}, None),  # non-string key: the stdlib's "1"
        ({"big": 2**70}, None),  # beyond 64 bits
    ],
)
def test_what_orjson_refuses_takes_the_old_path(event: dict[Any, Any], error: Any) -> None:
    if error is not None:
        with pytest.raises(error):
            stdlib(event)
        with pytest.raises(error):
            serialize(event)
    else:
        assert serialize(event) == stdlib(event)
