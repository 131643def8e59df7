"""Bytes the expert-parallel all-to-alls move per training step of the multimodal MoMa model,
measured, against the analytical count; and what placing whole modality groups on ranks would
have cost instead of sharding every group over the ep ranks.

    .venv/bin/python bench/mm_ep_bytes.py [--steps 3] [--rows 8] [--seq 128]

Model: the widths of configs/mm_moe_tiny.yaml (d_model 128, 4 MoE layers, top-2, groups
{text: 8, image: 4, audio: 4}) with the parity harness's tiny encoders and interleaved rows
(`mmfm.parallel.mm_runner`: real image/audio preprocessing; on odd steps half the ranks hold
no media). Layout: dp2 × ep2 (2 gloo processes, FSDP2), one micro-batch per rank.

Measured: every `all_to_all_single` of the dispatcher, the rows each rank sends to the other
rank (its own rows never leave it) × row bytes, split into forward (dispatch + combine) and
backward (their gradients), plus the per-expert count exchanges. Analytical (uniform routing):
T tokens per rank and layer, each with K assignments, a fraction (ep-1)/ep of which live on
another rank, each sent there and back: T·K·D·4 B·2·(ep-1)/ep per layer forward, the same
again backward. Whole-group placement (text on rank 0, image and audio on rank 1) is counted
from the same rows: its bytes and how unevenly it loads the ranks' experts.

Writes bench/results/mm_ep_bytes.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"text": 8, "image": 4, "audio": 4}


def model_cfg(seq: int):
    from mmfm.config import ModelConfig
    from mmfm.moe.config import MoEConfig

    return ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                       ffn_hidden=256, max_seq_len=seq,
                       moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=128,
                                     aux_loss_coef=0.01, z_loss_coef=1e-3))


def _worker(args: dict) -> dict:
    """One rank: train `steps` steps under dp2 × ep2, counting what the all-to-alls send."""
    import torch
    import torch.distributed as dist

    from mmfm.config import TrainConfig
    from mmfm.moe.metrics import in_backward
    from mmfm.parallel.config import ParallelConfig
    from mmfm.parallel.mm_runner import make_mm_rows, mm_distributed_run, tiny_encoders

    sent = {"forward": 0, "backward": 0, "counts": 0}
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if input_split_sizes is None:  # the per-expert counts: equal splits
            sent["counts"] += input.numel() * input.element_size() * (world - 1) // world
        else:
            rows = sum(input_split_sizes) - input_split_sizes[rank]
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            sent["backward" if in_backward() else "forward"] += rows * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, group=group,
                        async_op=async_op)

    dist.all_to_all_single = counting
    cfg = model_cfg(args["seq"])
    data = make_mm_rows(args["steps"], args["rows"], args["seq"], cfg.vocab_size,
                        tiny_encoders())
    tcfg = TrainConfig(steps=args["steps"], micro_batch_size=args["rows"] // 2, lr=1e-3,
                       warmup_steps=0, precision="fp32")
    pcfg = ParallelConfig(engine="fsdp", dp=2, ep=2)
    result = mm_distributed_run(cfg, pcfg, tcfg, data, tiny_encoders(), "modality", GROUPS,
                                gather=False)
    totals = torch.tensor([sent["forward"], sent["backward"], sent["counts"]], dtype=torch.float64)
    dist.all_reduce(totals)
    return {"sent": dict(zip(("forward", "backward", "counts"), totals.tolist(), strict=True)),
            "step_s": result.step_seconds}


def placement_cost(data, rows_per_rank: int, cfg) -> dict:
    """Whole groups on ranks (text -> 0, image and audio -> 1): bytes over all layers and
    steps, and the assignments each rank's experts process (load balance)."""
    from mmfm.parallel.mm_runner import special_ids

    ids = special_ids(cfg.vocab_size)
    media = {ids["image"], ids["audio"]}
    K, D, layers = cfg.moe.top_k, cfg.d_model, cfg.n_layers
    crossing, load = 0, [0, 0]
    for batch in data:
        for r, row in enumerate(batch):
            rank = r // rows_per_rank
            tokens = row.tokens[:-1]
            n_media = sum(int(t in media) for t in tokens)
            n_text = len(tokens) - n_media
            load[0] += n_text * K * layers
            load[1] += n_media * K * layers
            crossing += (n_text if rank == 1 else n_media) * K * layers
    return {"bytes_forward": crossing * D * 4 * 2, "expert_assignments_per_rank": load,
            "max_over_mean_load": max(load) / (sum(load) / 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    from mmfm.parallel.local import spawn
    from mmfm.parallel.mm_runner import make_mm_rows, tiny_encoders

    cfg = model_cfg(args.seq)
    out = spawn(_worker, 2, (vars(args),), timeout_s=600)[0]
    ep, K, D, layers = 2, cfg.moe.top_k, cfg.d_model, cfg.n_layers
    tokens = args.steps * args.rows * args.seq  # over both ranks and all steps
    analytical = tokens * layers * K * D * 4 * 2 * (ep - 1) / ep
    data = make_mm_rows(args.steps, args.rows, args.seq, cfg.vocab_size, tiny_encoders())
    report = {
        "date": str(date.today()), "layout": "dp2 x ep2 (fsdp, gloo, 2 CPU processes)",
        "model": {"d_model": D, "moe_layers": layers, "top_k": K, "groups": GROUPS},
        "steps": args.steps, "tokens_per_step": args.rows * args.seq,
        "measured_bytes_per_step": {k: v / args.steps for k, v in out["sent"].items()},
        "analytical_bytes_per_step_forward": analytical / args.steps,
        "measured_over_analytical_forward": out["sent"]["forward"] / analytical,
        "whole_group_placement": {k: (v / args.steps if k == "bytes_forward" else v)
                                  for k, v in placement_cost(data, args.rows // 2, cfg).items()},
        "step_seconds": out["step_s"],
    }
    path = ROOT / "bench" / "results" / "mm_ep_bytes.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
