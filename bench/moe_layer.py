"""MoE layer forward+backward time against the dense SwiGLU FFN with the same active FLOPs,
and peak memory growth with the number of experts.

    .venv/bin/python bench/moe_layer.py [--tokens 1024] [--d-model 256] [--expert-hidden 128]
        [--experts 8 32 64] [--top-k 1 2 8] [--backends loop grouped_mm]
        [--precisions fp32 bf16 autocast] [--reps 5] [--no-memory]

Dense equivalent: one SwiGLU of hidden k * expert_hidden, so both do the same matmul FLOPs per
token; the MoE layer additionally routes (router GEMM, top-k, permute/unpermute, aux losses).
Routing is the real router's (random init, dropless), not forced uniform. Precisions:
`fp32`; `bf16`: module and input cast to bf16 (the router still computes in fp32); `autocast`:
fp32 weights under `torch.autocast("cpu", bf16)`, which is what `mmfm train` does for
`train.precision=bf16`. Time is the best of `--reps` steps after 2 warm-up steps, the
MoE layer and its dense equivalent stepped in turn.

Memory: peak resident set size of one fp32 forward+backward (after a warm-up step) minus the
RSS just before it, in a fresh subprocess per E started with `MALLOC_MMAP_THRESHOLD_=65536`, so
every tensor is its own mmap, returned to the OS on free: RSS then tracks live tensor bytes.
The peak is Linux's VmHWM, reset just before the step through /proc/self/clear_refs; where that
is unavailable, `resource.getrusage(RUSAGE_SELF).ru_maxrss` (a process-wide high-water mark
that cannot be reset, hence the subprocess). Why not the alternatives: `tracemalloc` sees only
Python's allocator, and torch allocates tensors with its own CPU allocator, so it reports ~0;
the torch profiler's memory events are attributed to ops rather than giving a timeline of live
bytes (its memory-timeline API is private).

Writes bench/results/moe_layer.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from timing import interleaved_best  # bench/ is on sys.path when a benchmark runs

from mmfm.model.layers import SwiGLU
from mmfm.moe import MoEConfig, MoELayer

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast": torch.float32}


def make_moe(E: int, k: int, D: int, H: int, backend: str) -> MoELayer:
    """A dropless MoE layer of E SwiGLU experts of width H, top-k softmax routing."""
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=H, backend=backend)
    return MoELayer(cfg, D, H).train()


def make_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor,
              precision: str) -> Callable[[], None]:
    """One forward+backward (MoE: output and aux loss; dense: output), grads freed after."""
    is_moe = isinstance(module, MoELayer)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            out = module(x)
        if is_moe:
            y, aux = out
            torch.autograd.backward([y, aux], [grad.to(y.dtype), torch.ones_like(aux)])
        else:
            out.backward(grad.to(out.dtype))
        for p in module.parameters():
            p.grad = None
        x.grad = None

    return step


def inputs(T: int, D: int, precision: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[precision]
    x = torch.randn(1, T, D, generator=gen).to(dtype).requires_grad_(True)
    return x, torch.randn(1, T, D, generator=gen).to(dtype)


def time_pair(args, E: int, k: int, backend: str, precision: str) -> dict:
    """MoE layer and its dense equivalent (hidden k * expert_hidden), timed interleaved."""
    torch.manual_seed(0)
    dtype = DTYPES[precision]
    moe = make_moe(E, k, args.d_model, args.expert_hidden, backend).to(dtype)
    dense = SwiGLU(args.d_model, k * args.expert_hidden).to(dtype)
    x, grad = inputs(args.tokens, args.d_model, precision)
    moe_s, dense_s = interleaved_best(
        [make_step(moe, x, grad, precision), make_step(dense, x, grad, precision)], args.reps)
    return {"E": E, "k": k, "backend": backend, "precision": precision, "moe_ms": moe_s * 1e3,
            "dense_ms": dense_s * 1e3, "ratio": moe_s / dense_s}


def timing_rows(args) -> list[dict]:
    rows = []
    for precision in args.precisions:
        for k in args.top_k:
            for E in args.experts:
                if k > E:
                    continue
                for backend in args.backends:
                    rows.append(time_pair(args, E, k, backend, precision))
                    print(_row_md(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- memory (subprocess per E)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where /proc/self/clear_refs is absent."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(E: int, k: int, T: int, D: int, H: int, backend: str) -> dict:
    """Run in a fresh process: peak RSS growth (bytes) of one fp32 forward+backward after a
    warm-up step (one-time buffers excluded), measured as VmHWM after resetting it, minus VmRSS
    before; where the mark cannot be reset, `ru_maxrss` (then the warm-up is skipped)."""
    torch.manual_seed(0)
    moe = make_moe(E, k, D, H, backend)
    x, grad = inputs(T, D, "fp32")
    step = make_step(moe, x, grad, "fp32")
    resettable = Path("/proc/self/clear_refs").exists()
    if resettable:
        step()
    before = _status_kib("VmRSS")
    resettable = resettable and _reset_peak_rss()
    step()
    peak_kib = _status_kib("VmHWM") if resettable else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    peak = (peak_kib - before) * 1024
    weight_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
    return {"E": E, "k": k, "backend": backend, "peak_growth_bytes": peak,
            "expert_weight_bytes": weight_bytes, "method": "VmHWM" if resettable else "ru_maxrss",
            # what one dense (T, E, D) fp32 intermediate would add, for scale
            "dense_TED_bytes": T * E * D * 4}


def memory_rows(args) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS":
           str(torch.get_num_threads())}
    rows = []
    for backend in args.backends:
        for E in args.experts:
            cmd = [sys.executable, __file__, "--memory-child", str(E), str(args.memory_k),
                   str(args.memory_tokens), str(args.d_model), str(args.expert_hidden), backend]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ---------------------------------------------------------------- report


def _row_md(r: dict) -> str:
    return (f"| {r['precision']} | {r['E']} | {r['k']} | {r['backend']} | {r['moe_ms']:.2f} | "
            f"{r['dense_ms']:.2f} | {r['ratio']:.2f} |")


def markdown(result: dict) -> str:
    lines = ["| precision | E | k | backend | MoE fwd+bwd ms | dense-equiv ms | ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row_md(r) for r in result["timing"]]
    if result.get("memory"):
        lines += ["", f"Peak memory growth of one fp32 forward+backward, "
                      f"k={result['settings']['memory_k']}, "
                      f"{result['settings']['memory_tokens']} tokens:", "",
                  "| backend | E | peak growth MiB | expert weights MiB | one [T, E, D] fp32 MiB |",
                  "|---|---|---|---|---|"]
        for r in result["memory"]:
            lines.append(f"| {r['backend']} | {r['E']} | {r['peak_growth_bytes'] / 2**20:.1f} | "
                         f"{r['expert_weight_bytes'] / 2**20:.1f} | "
                         f"{r['dense_TED_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--backends", nargs="+", default=["loop", "grouped_mm"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "autocast"],
                   choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-k", type=int, default=2)
    p.add_argument("--memory-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every measurement (default: torch's own choice); "
                        "1 is far steadier on a machine shared with other jobs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_layer.json"))
    return p.parse_args(argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        E, k, T, D, H = (int(v) for v in sys.argv[2:7])
        print(json.dumps(memory_child(E, k, T, D, H, sys.argv[7])))
        return
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": date.today().isoformat(), "machine": _cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    result["timing"] = timing_rows(args)
    result["memory"] = [] if args.no_memory else memory_rows(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
