"""Fault injection, driven from tests: `sim.faults.fail(503, times=1)` and so on.

A rule matches requests by HTTP method, a path prefix, and whether the request is a watch.
`times` limits how often it fires (None: until cleared). `fired` counts what happened.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class StartRefused(OSError):
    """The simulator was told to refuse to start (`faults.refuse_start = True`)."""


@dataclass(slots=True)
class Rule:
    action: str  # "delay", "fail", "drop", "cut_watch"
    method: str | None = None
    path: str | None = None  # prefix of the URL path
    watch: bool | None = None  # only watches (True), only non-watches (False), both (None)
    times: int | None = None
    seconds: float = 0.0
    code: int = 500
    retry_after: int | None = None
    message: str = ""
    events: int = 0
    abrupt: bool = False
    fired: int = 0

    def matches(self, method: str, path: str, watch: bool) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path is not None and not path.startswith(self.path):
            return False
        return self.watch is None or self.watch == watch


@dataclass
class Faults:
    """The faults currently armed. Safe to call from any thread."""

    rules: list[Rule] = field(default_factory=list)
    refuse_start: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def delay(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
        times: int | None = None,
    ) -> Rule:
        """Hold matching requests `seconds` before handling them."""
        return self._add(Rule("delay", method, path, watch, times, seconds=seconds))

    def fail(
        self,
        code: int = 500,
        *,
        retry_after: int | None = None,
        message: str = "",
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
        times: int | None = None,
    ) -> Rule:
        """Answer matching requests with `code` and a Status body (429/503: `Retry-After`)."""
        if retry_after is None and code == 429:
            retry_after = 1
        return self._add(
            Rule(
                "fail",
                method,
                path,
                watch,
                times,
                code=code,
                retry_after=retry_after,
                message=message,
            )
        )

    def drop_connections(
        self,
        *,
        method: str | None = None,
        path: str | None = None,
        watch: bool | None = None,
        times: int | None = None,
    ) -> Rule:
        """Close the socket abruptly instead of answering."""
        return self._add(Rule("drop", method, path, watch, times))

    def cut_watch_after(
        self,
        events: int,
        *,
        abrupt: bool = False,
        path: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """End matching watches after `events` events: cleanly, or (`abrupt`) by a reset socket."""
        return self._add(Rule("cut_watch", None, path, True, times, events=events, abrupt=abrupt))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.refuse_start = False

    def take(self, action: str, method: str, path: str, watch: bool) -> Rule | None:
        """The first armed rule of `action` matching the request; counts it as fired."""
        with self._lock:
            for rule in self.rules:
                if rule.action == action and rule.matches(method, path, watch):
                    rule.fired += 1
                    return rule
        return None
