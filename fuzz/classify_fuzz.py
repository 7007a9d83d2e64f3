"""Coverage-guided fuzzing of the request classifier (atheris / libFuzzer).

Each input is one request: the first byte picks the method, the rest (latin-1) is the raw
request-target. For every input:
1. `classify` either returns or raises `RequestRejected`; any other exception is a crash;
2. an accepted target is printable ASCII in origin-form, with no '%', '\\', ';', '#', empty or
   dot segments in its path (what the proxy promises to forward only);
3. an accepted target reads the same to kube-apiserver: the independent Go model
   (tests/hardening/goview.py) gives the same verb, group, version, namespace, resource and
   subresource, and the same name or none;
4. the upstream URL the proxy builds sends exactly the target's bytes (no re-encoding);
5. under the hardening policy and the shipped istio-remote policy, whatever the proxy allows is
   also allowed for kube-apiserver's reading of the request.

    .venv/bin/python fuzz/classify_fuzz.py -dict=fuzz/classify.dict -max_total_time=60 fuzz/seeds
    .venv/bin/python fuzz/classify_fuzz.py -runs=200000 -dict=fuzz/classify.dict fuzz/seeds

Give a scratch corpus directory first (`mkdir /tmp/c; ... /tmp/c fuzz/seeds`) to keep the seeds
directory unchanged. A crash leaves `crash-<sha1>` in the working directory; re-run it with
`.venv/bin/python fuzz/classify_fuzz.py crash-<sha1>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from yarl import URL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["apiproxy.request", "apiproxy.policy", "tests.hardening"]):
    from apiproxy.policy import Policy
    from apiproxy.request import RequestRejected, classify
    from tests.hardening.data import POLICY
    from tests.hardening.goview import GoParseError, compare, go_request_info
from apiproxy.upstream import UpstreamConfig  # noqa: E402
from apiproxy.upstream_client import ConnectionPool  # noqa: E402

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "CONNECT", "TRACE")
POLICIES = (
    Policy.from_text(POLICY, "hardening"),
    Policy.load(ROOT / "policies" / "istio-remote.yaml"),
)
PEERS = ("cluster-a", "cluster-b")
UPSTREAM = UpstreamConfig(url=URL("https://127.0.0.1:6443"))
POOL = ConnectionPool(UPSTREAM.url, False)  # never connects: it only writes request heads here


def check(method: str, target: str) -> None:
    """The property; raises AssertionError (or the classifier's crash) on a finding."""
    try:
        info = classify(method, target)
    except RequestRejected:
        return
    assert target.startswith("/"), target
    assert all("\x21" <= ch <= "\x7e" for ch in target), target
    path = target.partition("?")[0]
    for bad in ("%", "\\", ";", "#"):
        assert bad not in path, (bad, target)
    if path != "/":
        for seg in path[1:].split("/"):
            assert seg not in ("", ".", ".."), target
    # the request line the upstream client sends carries exactly these bytes
    sent = POOL._head(method, UPSTREAM.request_target(target), [], None).split(b"\r\n", 1)[0]
    if sent != f"{method} {target} HTTP/1.1".encode():
        raise AssertionError(f"forwarded {sent!r} for {target!r}")
    try:
        go = go_request_info(method, target)
    except GoParseError as exc:
        raise AssertionError(f"proxy accepts what Go refuses: {target!r}: {exc}") from None
    diffs = compare(info, go)
    assert not diffs, (method, target, diffs)
    for policy in POLICIES:
        for peer in PEERS:
            if policy.decide(peer, info).allowed:
                assert policy.decide(peer, go).allowed, (method, target, peer)  # type: ignore[arg-type]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    method = METHODS[data[0] % len(METHODS)]
    check(method, data[1:].decode("latin-1"))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
