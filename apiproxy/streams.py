"""Open streams (watches and upgraded sessions): each one's deadline, and how it was ended.

A stream runs inside `OpenStreams.bounded`, which ends it at its deadline (`--max-watch-seconds`,
or a watch's own `timeoutSeconds` plus slack), when a reload withdraws the permission it was
opened with (`revoke`), or at shutdown (`end_all`). The exchange then says which of these it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from apiproxy import log
from apiproxy.exchange import EndReason, Exchange

_log = log.get_logger("apiproxy.streams")


class OpenStreams:
    def __init__(self) -> None:
        self._open: dict[asyncio.Timeout, Exchange] = {}
        self.ending_all = False

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.asynccontextmanager
    async def bounded(self, ex: Exchange, seconds: float | None) -> AsyncIterator[None]:
        """Run the body until it finishes or the stream is ended (deadline, revocation,
        shutdown); in the latter case the body is cancelled and `ex` ends with the reason."""
        loop = asyncio.get_running_loop()
        when = None if seconds is None else loop.time() + seconds
        timeout = asyncio.timeout_at(when)
        try:
            async with timeout:
                self._open[timeout] = ex
                if self.ending_all:
                    timeout.reschedule(loop.time())
                try:
                    yield
                finally:
                    self._open.pop(timeout, None)
        except TimeoutError:
            if not timeout.expired():
                raise  # not ours
            if self.ending_all:
                ex.end(EndReason.SHUTDOWN)
            else:
                ex.end(EndReason.REVOKED if ex.revoked else EndReason.DEADLINE)

    def revoke(self, still_allowed: Callable[[Exchange], bool], why: str) -> None:
        """End the open streams that the new peers or policy no longer allow: an open watch
        must not outlive the permission that opened it."""
        loop = asyncio.get_running_loop()
        for timeout, ex in list(self._open.items()):
            if not ex.revoked and not still_allowed(ex):
                ex.revoked = why
                _log.warning("stream_revoked", audit_id=ex.audit_id, why=why)
                timeout.reschedule(loop.time())

    def end_all(self) -> None:
        """Shutdown: end every open stream now, and any that opens from now on at once."""
        self.ending_all = True
        loop = asyncio.get_running_loop()
        for timeout in list(self._open):
            timeout.reschedule(loop.time())


__all__ = ["OpenStreams"]
