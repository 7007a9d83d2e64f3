"""The header filter (`apiproxy/forward.py`) to the letter, for both header containers it takes:
aiohttp's CIMultiDict (repeatable, case-insensitive) and a plain mapping (case-sensitive). Each
test kills mutants scripts/mutate found surviving."""

from __future__ import annotations

from multidict import CIMultiDict

from apiproxy.forward import connection_named, is_upgrade, upgrade_request_headers


def test_connection_named_reads_every_connection_header() -> None:
    multi: CIMultiDict[str] = CIMultiDict([("Connection", "a, B"), ("connection", "c,d")])
    assert connection_named(multi) == {"a", "b", "c", "d"}
    assert connection_named({"Connection": "x,Y , ,z"}) == {"x", "y", "z"}
    assert connection_named({"connection": "x"}) == set()  # a plain mapping is case-sensitive
    assert connection_named({}) == set()
    assert connection_named(CIMultiDict()) == set()


def test_is_upgrade_by_any_spelling() -> None:
    assert is_upgrade({"Upgrade": "websocket"}) is True
    assert is_upgrade({"Connection": "keep-alive, Upgrade"}) is True
    assert is_upgrade({"upgrade": "websocket"}) is False  # not the header of a plain mapping
    assert is_upgrade(CIMultiDict([("UPGRADE", "SPDY/3.1")])) is True
    assert is_upgrade({"Connection": "close"}) is False


def test_upgrade_request_headers_are_spelled_as_on_the_wire() -> None:
    out = upgrade_request_headers(
        {
            "Upgrade": "SPDY/3.1",
            "Connection": "Upgrade, X-Stream-Protocol-Version",
            "X-Stream-Protocol-Version": "v4.channel.k8s.io",
            "Sec-WebSocket-Protocol": "v5.channel.k8s.io",
            "Accept": "*/*",
        }
    )
    assert list(out.items()) == [
        ("Accept", "*/*"),
        ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
        ("Upgrade", "SPDY/3.1"),
        ("Connection", "Upgrade"),
    ]


def test_an_upgrade_named_only_in_connection_gets_an_empty_upgrade_value() -> None:
    out = upgrade_request_headers({"Connection": "upgrade"})
    assert out["Upgrade"] == ""
    assert out["Connection"] == "Upgrade"
