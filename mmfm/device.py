"""Where a run computes and in which precision, chosen once from `train.device` and
`train.precision`, so that nothing downstream assumes a device.

`auto` picks CUDA when a GPU is visible (one device per local rank) and bf16 only where the
hardware runs it natively: CUDA devices with bf16 support, and CPUs whose /proc/cpuinfo lists
AVX512-BF16 or AMX-BF16 (x86) or BF16 (Arm). Elsewhere bf16 is emulated and slow: on a 2-core
AVX2 EPYC a 1024² bf16 matmul runs at 0.84 GFLOP/s against 63 GFLOP/s in fp32 (torch 2.14.1),
so `auto` takes fp32 there. Where the flags say nothing (no /proc/cpuinfo, unknown layout) a
short measured matmul probe decides. Every choice carries the reason the run logs, and the
probe's measurement when one was taken; nothing is cached between calls.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmfm.errors import UserValueError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
# /proc/cpuinfo flags of CPUs that multiply bf16 natively: x86 AVX512-BF16 and AMX-BF16
# ("flags" line), Arm's BF16 extension ("Features" line, e.g. Graviton3, Neoverse V1/N2).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# In the probe, bf16 must be at least this fast relative to fp32 to count as native.
PROBE_NATIVE_RATIO = 1.0


class DeviceError(UserValueError):
    """`train.device` or `train.precision` cannot be honoured on this machine."""


class SlowPrecisionWarning(UserWarning):
    """An explicit `train.precision` that this hardware only emulates (slow, but correct)."""


@dataclass(frozen=True)
class ProbeResult:
    """Seconds per `size`² matmul, best of `repeats`, in fp32 and bf16."""

    size: int
    fp32_s: float
    bf16_s: float

    @property
    def slowdown(self) -> float:
        """How many times slower bf16 ran than fp32 (< 1: bf16 is faster)."""
        return self.bf16_s / self.fp32_s


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in, and why (the line the run logs)."""

    name: str  # fp32 | bf16 | fp8
    dtype: torch.dtype  # compute dtype under autocast (fp8 runs its non-linear ops in bf16)
    reason: str
    probe: ProbeResult | None = None  # the measurement, when one was taken


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """The device of this process for `train.device` = auto | cpu | cuda.

    auto and cuda take `cuda:<local_rank>` (one GPU per local rank, as torchrun launches);
    auto falls back to the CPU when no GPU is visible, cuda raises one line instead."""
    if setting not in DEVICES:
        raise DeviceError(f"train.device={setting!r} is not one of {', '.join(DEVICES)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("train.device=cuda but torch sees no CUDA device "
                          "(torch.cuda.is_available() is False); use train.device=auto or cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"train.device={setting}: local rank {local_rank} has no GPU of its "
                          f"own ({count} visible); launch at most {count} processes per node")
    return torch.device("cuda", local_rank)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU description the kernel gives ("" where there is none, e.g. macOS)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_feature_flags(cpuinfo: str) -> set[str] | None:
    """The flags of the first processor in `cpuinfo` text (x86 `flags`, Arm `Features`),
    lower-cased; None when the text has neither line, i.e. the flags cannot tell."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.lower().split())
    return None


def native_bf16_flags(flags: set[str]) -> list[str]:
    """Which of `NATIVE_BF16_FLAGS` the CPU has (empty: bf16 is emulated)."""
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def probe_bf16(size: int = 256, repeats: int = 3) -> ProbeResult:
    """Time a `size`² matmul in fp32 and in bf16 on the CPU (best of `repeats` after one
    warm-up), on one thread: whether bf16 is native is a property of the core, and on a
    loaded machine the thread pool's wake-up (~50 ms measured on a shared 2-core EPYC) would
    swamp a small product. 256² keeps the slow case short: ~45 ms per bf16 product there."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ProbeResult(size, _best_matmul_s(a, b, repeats),
                           _best_matmul_s(a.bfloat16(), b.bfloat16(), repeats))
    finally:
        torch.set_num_threads(threads)


def _best_matmul_s(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    a @ b  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def resolve_precision(setting: str, device: torch.device, cpuinfo: str | None = None,
                      probe=probe_bf16) -> PrecisionChoice:
    """The precision for `train.precision` = auto | fp32 | bf16 | fp8 on `device`.

    `cpuinfo` (default: /proc/cpuinfo) and `probe` (a `() -> ProbeResult`) are parameters so
    tests can fake the CPU. An explicit bf16 on a CPU without native bf16 trains (correctly, but
    slowly) and warns with the measured slowdown; fp8 anywhere but a capable GPU is an error."""
    if setting not in PRECISIONS:
        raise DeviceError(f"train.precision={setting!r} is not one of {', '.join(PRECISIONS)}")
    if setting == "fp32":
        return PrecisionChoice("fp32", torch.float32, "train.precision=fp32")
    if setting == "fp8":
        from mmfm.parallel.fp8 import check_fp8_supported

        check_fp8_supported(device)
        return PrecisionChoice("fp8", torch.bfloat16,
                               "train.precision=fp8: torchao float8 linears, bf16 elsewhere")
    if device.type == "cuda":
        return _cuda_precision(setting, device)
    return _cpu_precision(setting, read_cpuinfo() if cpuinfo is None else cpuinfo, probe)


def _cuda_precision(setting: str, device: torch.device) -> PrecisionChoice:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16", torch.bfloat16,
                               f"train.precision={setting}: {name} supports bf16 natively")
    if setting == "bf16":
        raise DeviceError(f"train.precision=bf16 but {name} has no bf16 support; "
                          f"use train.precision=auto or fp32")
    return PrecisionChoice("fp32", torch.float32,
                           f"train.precision=auto: {name} has no bf16 support, fp32")


def _cpu_precision(setting: str, cpuinfo: str, probe) -> PrecisionChoice:
    flags = cpu_feature_flags(cpuinfo)
    native = native_bf16_flags(flags) if flags is not None else []
    if native:
        return PrecisionChoice("bf16", torch.bfloat16,
                               f"train.precision={setting}: CPU has {'+'.join(native)}, bf16")
    # No native flag (or no flags to read): measure, so the choice or the warning has a number.
    result = probe()
    fast = result.slowdown <= PROBE_NATIVE_RATIO
    if setting == "auto":
        if flags is None and fast:
            return PrecisionChoice("bf16", torch.bfloat16, "train.precision=auto: CPU flags "
                                   f"unknown, bf16 matmul measured {1 / result.slowdown:.1f}x "
                                   "as fast as fp32", result)
        why = "no AVX512-BF16/AMX-BF16 in CPU flags" if flags is not None else "CPU flags unknown"
        return PrecisionChoice("fp32", torch.float32, f"train.precision=auto: {why}, bf16 matmul "
                               f"measured {result.slowdown:.1f}x slower than fp32; fp32", result)
    reason = f"train.precision=bf16 as set; bf16 matmul measured {result.slowdown:.1f}x slower " \
             f"than fp32 on this CPU"
    if not fast:
        warnings.warn(f"{reason} (no native bf16): training will be slow; "
                      f"train.precision=auto picks fp32 here", SlowPrecisionWarning, stacklevel=3)
    return PrecisionChoice("bf16", torch.bfloat16, reason, result)


def autocast_context(precision: PrecisionChoice | str, device: torch.device | str = "cpu"):
    """Autocast by the device's type: bf16 (and fp8's non-linear ops) under
    `torch.autocast(device.type)`, nothing for fp32. `precision` is a `PrecisionChoice` or its
    name; "auto" is not accepted here, resolve it first."""
    name = precision.name if isinstance(precision, PrecisionChoice) else precision
    device_type = torch.device(device).type
    if name in ("bf16", "fp8"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    assert name == "fp32", f"unresolved precision {name!r}: call resolve_precision first"
    return contextlib.nullcontext()


def move_batch(batch: Any, device: torch.device) -> Any:
    """`batch` (a `Batch`, `MMBatch`, tensor, or anything with `.to`) on `device`.

    To a GPU the host tensors are pinned first (a no-op where the loader pinned them) and
    copied with `non_blocking=True`, so the copy overlaps the previous step's kernels."""
    if device.type != "cuda":
        return batch.to(device)
    if hasattr(batch, "pin_memory"):
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def resolve_run(tcfg, local_rank: int = 0) -> tuple[torch.device, PrecisionChoice]:
    """(device, precision) of this process for a `TrainConfig`: what the trainer calls once,
    then logs `precision.reason` and passes both on (parallelize, autocast, move_batch)."""
    device = resolve_device(tcfg.device, local_rank)
    return device, resolve_precision(tcfg.precision, device)
