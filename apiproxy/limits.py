"""Per-peer concurrency limits: open watches and upgraded sessions, and other requests.

An exchange takes a slot before it is forwarded and gives it back after its final audit record is
written, so a peer's slots also cover waiting for the audit log (back-pressure, never loss). The
`apiproxy_open_watches` and `apiproxy_inflight_requests` gauges follow the slots.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Gauge

from apiproxy.exchange import Exchange
from apiproxy.metrics import Metrics


class PeerLimits:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_requests: int,
        max_watches: int,
        on_change: Callable[[], None],
    ) -> None:
        self.metrics = metrics
        self.max_requests = max_requests
        self.max_watches = max_watches
        self._on_change = on_change
        self._requests: dict[str, int] = {}
        self._watches: dict[str, int] = {}
        # exchange → (its slot is a watch slot, the peer, the gauge it raised)
        self._held: dict[Exchange, tuple[bool, str, Gauge]] = {}

    def open_watches(self, peer: str) -> int:
        return self._watches.get(peer, 0)

    def admit(self, ex: Exchange) -> str | None:
        """Take a slot for `ex`; None when admitted, else what is exhausted (`watches` or
        `requests`) and the limit, for the 429."""
        watch = ex.long_lived
        counts = self._watches if watch else self._requests
        limit = self.max_watches if watch else self.max_requests
        peer = ex.peer
        if counts.get(peer, 0) >= limit:
            kind = "watches" if watch else "requests"
            self.metrics.limited.labels(peer, kind).inc()
            return f"too many concurrent {kind} from peer {peer!r} (limit {limit})"
        counts[peer] = counts.get(peer, 0) + 1
        m = self.metrics
        gauge = m.child(m.open_watches if watch else m.inflight, peer)
        gauge.inc()
        self._held[ex] = (watch, peer, gauge)
        self._on_change()
        return None

    def release(self, ex: Exchange) -> None:
        """Give back the slot of `ex`, if it holds one."""
        held = self._held.pop(ex, None)
        if held is None:
            return
        watch, peer, gauge = held
        (self._watches if watch else self._requests)[peer] -= 1
        gauge.dec()
        self._on_change()


__all__ = ["PeerLimits"]
