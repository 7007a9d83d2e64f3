"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's semantics.

- A candidate takes the Lease only when its holder is empty, or the record has not changed for
  `lease_duration` *as observed on the candidate's own monotonic clock* (clocks across nodes
  are never compared).
- Every update carries the resourceVersion read just before, so two candidates racing for an
  expired Lease cannot both win: the loser gets 409.
- The holder may write only until `renew_deadline` after the start of its last successful renew
  (`can_write`). Since `renew_deadline < lease_duration`, a holder that cannot renew stops writing
  before any other candidate may take over: two replicas never both write.
- On shutdown the holder releases the Lease (empty holder) so the standby takes over at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Callable
from typing import Any

from apiproxy.federation.kube import Kube, KubeError, lease_path
from apiproxy.log import get_logger

log = get_logger("apiproxy.federation.leader")


def micro_time(now: float | None = None) -> str:
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        # Each Lease request gets at most the retry period (client-go bounds the renew by its
        # deadline): a hung connection must not keep the loop from noticing it lost the Lease.
        self._timeout = renew_deadline / 2
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._valid_until = 0.0
        self._leading = False
        # Leading when run() was cancelled: release() still owes the Lease back (run() drops
        # _leading at once, so nothing is written after the cancel).
        self._held_at_cancel = False
        self._last_seen: float | None = None  # monotonic: last time the Lease was read
        self.transitions = 0
        self.changed = asyncio.Event()

    @property
    def can_write(self) -> bool:
        return self._leading and time.monotonic() < self._valid_until

    @property
    def healthy(self) -> bool:
        """Leading, or a standby that read the Lease within the last `lease_duration` (so it
        would notice an expiry and take over). Used by /readyz."""
        if self.can_write:
            return True
        return self._last_seen is not None and time.monotonic() - self._last_seen < (
            self.lease_duration
        )

    @property
    def observed_holder(self) -> str:
        return str((self._observed or {}).get("holderIdentity") or "")

    def _set_leading(self, value: bool) -> None:
        if value != self._leading:
            self._leading = value
            log.info("leadership_changed", identity=self.identity, leading=value)
            self.changed.set()
            if self.on_change is not None:
                self.on_change(value)

    def _spec(self, *, acquire_time: str, transitions: int, now: str) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, int(self.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        started = time.monotonic()
        now = micro_time()
        path = lease_path(self.namespace, self.name)
        try:
            lease = await self.kube.get(path, timeout=self._timeout)
            self._last_seen = started
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(acquire_time=now, transitions=0, now=now),
                }
                created = await self.kube.create(
                    lease_path(self.namespace), body, timeout=self._timeout
                )
                self._observe(created.get("spec") or {}, started)
                self._valid_until = started + self.renew_deadline
                return True
            spec = dict(lease.get("spec") or {})
            if spec != self._observed:
                self._observe(spec, started)
            holder = spec.get("holderIdentity") or ""
            mine = holder == self.identity
            if holder and not mine and time.monotonic() < self._observed_at + self.lease_duration:
                return False
            transitions = int(spec.get("leaseTransitions") or 0)
            new_spec = self._spec(
                acquire_time=str(spec.get("acquireTime") or now) if mine else now,
                transitions=transitions if mine else transitions + 1,
                now=now,
            )
            body = dict(lease)
            body["spec"] = new_spec
            updated = await self.kube.replace(path, body, timeout=self._timeout)
        except KubeError as exc:
            if exc.status != 409:
                log.warning("lease_update_failed", error=str(exc))
            return False
        except (TimeoutError, OSError) as exc:
            log.warning("lease_update_failed", error=type(exc).__name__)
            return False
        self._observe(updated.get("spec") or {}, started)
        self._valid_until = started + self.renew_deadline
        return True

    def _observe(self, spec: dict[str, Any], at: float) -> None:
        self._observed = dict(spec)
        self._observed_at = at

    async def run(self) -> None:
        """Acquire, then renew every `retry_period`; forever (cancel to stop)."""
        try:
            while True:
                if self._leading and not self.can_write:
                    # The write window lapsed since the last turn: that is a loss of
                    # leadership even if the next renew succeeds (which is then a new gain,
                    # with its forced pass and `changed` for waiters).
                    self._set_leading(False)
                try:
                    ok = await self.try_acquire_or_renew()
                except Exception as exc:  # never let one odd failure end the election loop
                    log.warning("lease_update_failed", error=type(exc).__name__)
                    ok = False
                if ok:
                    self._set_leading(True)
                elif self._leading and (
                    not self.can_write or self.observed_holder not in ("", self.identity)
                ):
                    self._set_leading(False)
                delay = (
                    self.retry_period
                    if self._leading
                    else self.retry_period
                    * (
                        1 + random.uniform(0, 0.2)  # noqa: S311 - jitter, not crypto
                    )
                )
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._held_at_cancel = self._leading
            self._set_leading(False)
            raise

    async def release(self) -> None:
        """Give the Lease up if we hold it, so a standby need not wait for it to expire."""
        was = self._leading or self._held_at_cancel
        self._leading = False
        self._held_at_cancel = False
        self._valid_until = 0.0
        if not was:
            return
        path = lease_path(self.namespace, self.name)
        try:
            lease = await self.kube.get(path, timeout=self._timeout)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = dict(lease.get("spec") or {})
            spec["holderIdentity"] = ""
            spec["leaseDurationSeconds"] = 1
            spec["renewTime"] = micro_time()
            body = dict(lease)
            body["spec"] = spec
            await self.kube.replace(path, body, timeout=self._timeout)
        except (TimeoutError, KubeError, OSError) as exc:
            log.warning("lease_release_failed", error=str(exc))
