"""Step time, communication share and bytes moved per step of each distributed layout on CPU
(gloo), against the analytical payload of that layout.

    .venv/bin/python bench/parallel_layouts.py [--layouts ddp_dp2 tp2 ...] [--steps 3]

Each layout trains the benchmark MoE model (d 128, 4 layers, 8 experts top-2, seq 64, 8 rows per
step, fp32) on N local processes. On a machine with fewer cores than processes the ranks share
cores, so step times are upper bounds and "communication" includes waiting for a descheduled
peer. Writes bench/results/parallel_layouts.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parallel_common import bench_model, run_layout  # noqa: E402

from mmfm.config import TrainConfig  # noqa: E402
from mmfm.parallel.config import ParallelConfig  # noqa: E402
from mmfm.parallel.local import spawn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS, SEQ = 8, 64
# name: (processes, parallel config)
LAYOUTS = {
    "single": (1, {}),
    "ddp_dp2": (2, dict(engine="ddp")),
    "fsdp_zero2_dp2": (2, dict(engine="fsdp", zero_stage=2)),
    "fsdp_zero3_dp2": (2, dict(engine="fsdp", zero_stage=3)),
    "ds_zero1_dp2": (2, dict(engine="deepspeed", zero_stage=1)),
    "ds_zero2_dp2": (2, dict(engine="deepspeed", zero_stage=2)),
    "ds_zero3_dp2": (2, dict(engine="deepspeed", zero_stage=3)),
    "ddp_ep2_dp2": (2, dict(engine="ddp", ep=2)),
    "tp2": (2, dict(engine="ddp", tp=2)),
    "pp2_1f1b": (2, dict(engine="ddp", pp=2, microbatches=4, pp_schedule="1f1b")),
    "fsdp_tp2_dp2": (4, dict(engine="fsdp", tp=2)),
    "fsdp_ep2_tp2_dp2": (4, dict(engine="fsdp", tp=2, ep=2)),
    "ddp_pp2_dp2": (4, dict(engine="ddp", pp=2, microbatches=2)),
    "fsdp_ep2_dp4": (4, dict(engine="fsdp", ep=2)),
}
TRAIN = TrainConfig(steps=100, micro_batch_size=2, lr=1e-3, warmup_steps=0, precision="fp32",
                    grad_clip=1.0)


def _worker(name: str, warmup: int, timed: int, profiled: int) -> dict:
    world, kw = LAYOUTS[name]
    pcfg = ParallelConfig(**kw)
    pcfg.dp = pcfg.resolved_dp(world)
    return run_layout(bench_model(seq=SEQ), pcfg, TRAIN, ROWS, SEQ, warmup, timed, profiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--profiled", type=int, default=2, help="profiled steps (comm stats)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel_layouts.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for name in args.layouts:
        world = LAYOUTS[name][0]
        results[name] = spawn(_worker, world, (name, args.warmup, args.steps, args.profiled),
                              timeout_s=600)[0]
        print(f"{name}: {results[name]['step_s'] * 1e3:.0f} ms/step", file=sys.stderr)
    meta = {"date": str(date.today()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "rows": ROWS, "seq": SEQ, "threads_per_rank": 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))


def _fold(by_op: dict) -> dict:
    """gloo emulates reduce-scatter with an all-reduce of the same payload: show them together."""
    out = {k: v for k, v in by_op.items() if k not in ("all_reduce", "reduce_scatter")}
    total = by_op.get("all_reduce", 0) + by_op.get("reduce_scatter", 0)
    if total:
        out["all_reduce+reduce_scatter"] = total
    return out


def table(results: dict) -> str:
    lines = ["| layout | procs | step ms | comm share | measured MB/step | analytical MB/step "
             "| ratio | by op (measured / analytical MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        measured, analytic = _fold(r["measured_bytes"]), _fold(r["analytic_bytes"])
        m, a = sum(measured.values()) / 1e6, sum(analytic.values()) / 1e6
        ops = sorted(set(measured) | set(analytic))
        by_op = ", ".join(f"{op} {measured.get(op, 0) / 1e6:.2f}/{analytic.get(op, 0) / 1e6:.2f}"
                          for op in ops)
        ratio = f"{m / a:.2f}" if a else "-"
        lines.append(f"| {name} | {r['world']} | {r['step_s'] * 1e3:.0f} | "
                     f"{r['comm_share']:.0%} | {m:.2f} | {a:.2f} | {ratio} | {by_op} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
