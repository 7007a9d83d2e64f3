"""Background tasks: stopping them the same way everywhere."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task and wait until it has finished unwinding (None entries are skipped).
    An exception other than the cancellation still propagates: a loop that died is a bug.

    The caller stays cancellable (a shutdown deadline), even while a task ignores its own
    cancellation: `asyncio.wait` is awaited, not the tasks. (Awaiting a task passes the
    caller's cancellation on to that task, and one that swallows it held the caller forever;
    and the caller's CancelledError used to be taken for the task's and suppressed.)"""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    await asyncio.wait(live)
    for task in live:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
