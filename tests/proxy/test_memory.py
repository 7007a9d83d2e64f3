"""Process memory: the glibc settings that keep idle TLS connections small, the periodic trim."""

from __future__ import annotations

import asyncio
import platform

import pytest

from apiproxy import memory
from tests.proxy.conftest import ProxyFactory, Recorder


def test_tune_malloc_fixes_the_mmap_threshold_on_glibc() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert memory.tune_malloc() is glibc
    memory.release_free_memory()  # callable everywhere; a no-op without glibc


async def test_free_memory_is_returned_periodically(
    recorder: Recorder, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.CAN_TRIM:
        pytest.skip("no malloc_trim (not glibc)")
    trimmed = asyncio.Event()
    monkeypatch.setattr(memory, "release_free_memory", trimmed.set)
    await make_proxy(recorder.url, memory_trim_interval_seconds=0.01)
    await asyncio.wait_for(trimmed.wait(), 10)


async def test_no_trim_task_when_disabled(recorder: Recorder, make_proxy: ProxyFactory) -> None:
    proxy, _files = await make_proxy(recorder.url, memory_trim_interval_seconds=0)
    assert proxy._trim_task is None
