"""Timing whole steps fairly: the host allocator tuned for both frameworks, and variants that take turns
(interleaved rounds, every call waited for)."""

from __future__ import annotations

import ctypes
import platform
import time
from collections.abc import Callable
from typing import Any


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no mmap for large blocks, no trimming of the heap,
    and one arena, so that threads started later allocate from the heap that is never trimmed."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
        return (
            bool(libc.mallopt(m_mmap_max, 0))
            and bool(libc.mallopt(m_trim_threshold, -1))
            and bool(libc.mallopt(m_arena_max, 1))
        )
    except OSError:
        return False


class Variant:
    """One (framework, mode): a callable per step kind, each running one step and waiting for it."""

    def __init__(
        self,
        framework: str,
        mode: str,
        fns: dict[str, Callable[[], Any]],
        compile_s: dict[str, float],
        info: dict[str, Any],
    ):
        self.framework, self.mode, self.fns, self.compile_s, self.info = framework, mode, fns, compile_s, info


def measure(variants: list[Variant], step: str, warmup: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    for v in variants:
        for _ in range(warmup):
            v.fns[step]()
    times: dict[tuple[str, str], list[float]] = {(v.framework, v.mode): [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            start = time.perf_counter()
            v.fns[step]()
            times[(v.framework, v.mode)].append(time.perf_counter() - start)
    return times
