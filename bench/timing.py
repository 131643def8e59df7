"""Timing helper shared by the benchmarks (run as `python bench/NAME.py`, so this module sits
on sys.path beside them)."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_best(steps: list[Callable[[], None]], reps: int,
                     warmup: int = 2) -> list[float]:
    """Best (minimum) seconds of each step, timing them in turn (a, b, a, b, ...): load from
    other processes on a shared machine only ever adds time, and hits all steps alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for step, bucket in zip(steps, times, strict=True):
            started = time.perf_counter()
            step()
            bucket.append(time.perf_counter() - started)
    return [min(bucket) for bucket in times]
