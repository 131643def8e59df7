"""Model FLOPs utilization (MFU) of mmfm's distributed layouts on GPUs.

    torchrun --nproc-per-node 8 bench/parallel_mfu.py --config configs/text_moe_small.yaml \\
        --layouts "engine=fsdp" "engine=fsdp,tp=2" "engine=fsdp,ep=8" \\
                  "engine=ddp,pp=2,microbatches=8" "engine=deepspeed,zero_stage=2,ep=4" \\
        --rows-per-rank 8 --steps 20

Each layout is a comma-separated list of `parallel.*` fields (dp is the rest of the world). For
each, the script trains on random tokens (bf16 autocast on CUDA), times `--steps` steps after
`--warmup`, and reports tokens/s, TFLOP/s per device and MFU = tokens/s × FLOPs per token /
(devices × peak), with FLOPs per token from `mmfm.model.counting.flops_per_token`, the
convention of `mmfm info` (6·N_active + 12·L·D·T, PaLM appendix B). Peak: `--peak-tflops`, or
the dense bf16 peak of known GPUs (H100/H200 SXM 989, A100 312, L40S 362). Rank 0 prints a
Markdown table and writes bench/results/parallel_mfu.json.

It runs on CPU too (gloo, fp32; pass --peak-tflops), which is how it was checked here: no GPU
was available to this project's session, so no GPU numbers are recorded yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def parse_layout(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() if key.strip() in ("engine", "pp_schedule") else \
            (value.strip().lower() == "true" if value.strip().lower() in ("true", "false")
             else int(value))
    return out


def peak_tflops(arg: float | None) -> float:
    if arg:
        return arg
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
    raise SystemExit("on CPU pass --peak-tflops (e.g. a measured matmul rate)")


def measure(cfg, layout: dict, rows: int, warmup: int, steps: int) -> dict:
    from mmfm.model.counting import flops_per_token
    from mmfm.parallel.config import ParallelConfig
    from mmfm.parallel.runner import fixed_batch_trainer, make_batches

    pcfg = ParallelConfig(**layout)
    seq = cfg.data.seq_len
    world = dist.get_world_size()
    global_rows = rows * pcfg.resolved_dp(world)
    batches = make_batches(warmup + steps, global_rows, seq, cfg.model.vocab_size)
    trainer = fixed_batch_trainer(cfg.model, pcfg, cfg.train, batches)
    dims = trainer.dims
    cuda = dims.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stream = iter(trainer.loader)
    times = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        trainer.train_step(stream)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens_per_s = global_rows * seq / step_s
    flops = flops_per_token(cfg.model, seq)
    return {"layout": layout, "world": dims.world_size, "step_s": step_s,
            "tokens_per_s": tokens_per_s, "tflops_per_device":
            tokens_per_s * flops / dims.world_size / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "text_moe_small.yaml"))
    parser.add_argument("overrides", nargs="*", help="config overrides (model.*, data.seq_len)")
    parser.add_argument("--layouts", nargs="+", default=["engine=fsdp"])
    parser.add_argument("--rows-per-rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak (default: bf16 dense peak of known GPUs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel_mfu.json"))
    args = parser.parse_args()

    from mmfm.config import load_config
    from mmfm.parallel.mesh import init_distributed

    init_distributed()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(args.config, args.overrides)
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for text in args.layouts:
        r = measure(cfg, parse_layout(text), args.rows_per_rank, args.warmup, args.steps)
        r["mfu"] = r["tflops_per_device"] / peak
        rows.append(r)
        if dist.get_rank() == 0:
            print(f"{text}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}", file=sys.stderr)
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": device, "peak_tflops": peak,
                                              "config": args.config, "results": rows}, indent=1))
        print(f"| layout | devices | step ms | tokens/s | TFLOP/s per device | MFU ({device}) |")
        print("|---|---|---|---|---|---|")
        for text, r in zip(args.layouts, rows, strict=True):
            print(f"| {text} | {r['world']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} "
                  f"| {r['tflops_per_device']:.2f} | {r['mfu']:.1%} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
