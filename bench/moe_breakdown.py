"""Where an MoE layer's forward+backward time goes, stage by stage, beside the dense FFN with
the same active FLOPs.

    .venv/bin/python bench/moe_breakdown.py [--tokens 1024] [--d-model 256] [--expert-hidden 128]
        [--experts 8] [--top-k 2] [--backend grouped_mm] [--precision fp32|bf16] [--reps 15]

Each stage runs forward and backward on its own inputs, the same shapes the layer gives it:
`router` (gate GEMM, scores, top-k, gate weights), `permute` (sort by expert and gather the
token copies), `experts` (the SwiGLU experts on rows grouped by expert), `combine` (gate-weighted
sum back per token), `losses+monitor` (Switch and z-losses, and the per-expert load counting
that `moe/metrics.py` does in training). `layer` is the whole MoELayer and `dense` the SwiGLU of
hidden k * expert_hidden. Stages are timed in turn (a, b, c, ...), best of `--reps`, so load
from other processes hits them alike; the stage sum need not equal `layer` exactly.

Writes bench/results/moe_breakdown.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from moe_layer import _cpu_name  # bench/ is on sys.path when a benchmark runs
from timing import interleaved_best

from mmfm.model.layers import SwiGLU
from mmfm.moe import MoEConfig, MoELayer
from mmfm.moe.dispatcher import permute, unpermute

ROOT = Path(__file__).resolve().parents[1]


def _backward_step(forward: Callable[[], list[torch.Tensor]],
                   params: list[torch.Tensor]) -> Callable[[], None]:
    """Run `forward`, back-propagate fixed random gradients into it, then free the grads."""
    grads: list[torch.Tensor] = []

    def step() -> None:
        outs = forward()
        if not grads:
            gen = torch.Generator().manual_seed(1)
            grads.extend(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)
        torch.autograd.backward(outs, grads)
        for p in params:
            p.grad = None

    return step


def stage_steps(args) -> dict[str, Callable[[], None]]:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    E, k, D, H, T = args.experts, args.top_k, args.d_model, args.expert_hidden, args.tokens
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=H, backend=args.backend)
    moe = MoELayer(cfg, D, H).to(dtype).train()
    dense = SwiGLU(D, k * H).to(dtype)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    x_TD.requires_grad_(True)
    with torch.no_grad():
        r = moe.router(x_TD)
        x_AD, state = permute(x_TD, r.topk_idx_TK, E)
    x_AD.requires_grad_(True)
    counts = state.counts_E
    y_AD = torch.randn_like(x_AD).requires_grad_(True)
    w_TK = r.topk_weight_TK.clone().requires_grad_(True)
    logits = r.logits_TE.clone().requires_grad_(True)
    probs = logits.softmax(-1)

    def losses() -> list[torch.Tensor]:
        rr = type(r)(logits, logits.softmax(-1), probs.detach(), r.topk_idx_TK, w_TK)
        totals = moe._routed_totals(rr)
        aux, parts = moe._aux_losses(rr, 1, totals)
        moe._monitor(rr, None, parts, 1, T, totals)
        return [aux]

    leaves = [x_TD, x_AD, y_AD, w_TK, logits, *moe.parameters(), *dense.parameters()]
    x_BTD = x_TD.detach().view(1, T, D).requires_grad_(True)
    leaves.append(x_BTD)
    router = moe.router
    return {
        "router": _backward_step(lambda: [router(x_TD).topk_weight_TK], leaves),
        "permute": _backward_step(lambda: [permute(x_TD, r.topk_idx_TK, E)[0]], leaves),
        "experts": _backward_step(lambda: [moe.experts(x_AD, counts)], leaves),
        "combine": _backward_step(lambda: [unpermute(y_AD, w_TK, state, T)], leaves),
        "losses+monitor": _backward_step(losses, leaves),
        "layer": _backward_step(lambda: list(moe(x_BTD)), leaves),
        "dense": _backward_step(lambda: [dense(x_BTD)], leaves),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="grouped_mm", choices=["loop", "grouped_mm"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_breakdown.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = stage_steps(args)
    seconds = interleaved_best(list(steps.values()), args.reps)
    ms = {name: s * 1e3 for name, s in zip(steps, seconds, strict=True)}
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": date.today().isoformat(), "machine": _cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "ms": ms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    dense = ms["dense"]
    print("| stage | fwd+bwd ms | / dense FFN |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / dense:.2f} |")


if __name__ == "__main__":
    main()
