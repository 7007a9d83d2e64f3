"""Process memory of a long-running proxy: glibc allocator settings that keep idle TLS
connections small, and a way to hand freed heap memory back to the OS.

Every TLS connection (each peer watch, and each upstream watch when the upstream is HTTPS) gets a
256 KiB read buffer from uvloop's SSL protocol, of which an idle connection touches one or two
pages. glibc raises its mmap threshold above 256 KiB once the first such buffer is freed, so later
buffers come from the heap, and one carved out of memory that earlier requests dirtied is
resident in full: +15 KiB per idle watch in the benchmark after its max-rate phase (64 -> 50).
A fixed threshold keeps the buffers mmap'd: only touched pages count, and closing returns them.
Bursts (max-rate watches, large lists) leave freed memory inside the heap that glibc returns
only from its top; `malloc_trim` hands back the rest (the benchmark's 100-watch max-rate phase
left ~120 MiB resident, ~60 MiB after a trim, the same as a fresh process).
"""

from __future__ import annotations

import ctypes
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc mallopt(3) parameter
MMAP_THRESHOLD_BYTES = 256 * 1024  # uvloop's per-connection SSL read buffer (SSL_READ_MAX_SIZE)


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:  # pragma: no cover - no dynamic C library
        return None


_TRIM = _libc_function("malloc_trim")  # glibc only
CAN_TRIM = _TRIM is not None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 256 KiB (see above); False where there is no glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or _TRIM is None:  # musl has a no-op mallopt and no malloc_trim
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc malloc_trim; ~0.1 ms when there is none, a few ms
    after a burst)."""
    if _TRIM is not None:
        _TRIM(0)
