"""`mmfm plan`: a compute planner on the command line (the numbers come from `mmfm.plan`).

The lead CLI (`mmfm.cli`) calls :func:`register` with its subparsers; user errors are
`MmfmError`s, printed as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from mmfm.config import ExperimentConfig, load_config, save_config
from mmfm.errors import UserValueError
from mmfm.model.counting import count_params, flops_per_token
from mmfm.plan import Allocation, parse_moe, plan_budget, plan_moe, wall_clock_s

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM bf16 dense peak (datasheet)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `plan` to the `mmfm` command line."""
    p = subparsers.add_parser(
        "plan", help="compute-optimal model size, tokens, loss and wall-clock for a budget",
        description="Chinchilla compute-optimal allocation (Hoffmann et al. 2022: Approach 1 "
                    "from its Table 3, Approach 3's parametric loss with the published "
                    "coefficients), the fine-grained MoE law of Krajewski et al. 2024 with "
                    "--moe, FLOPs per token of a preset in mmfm's convention (6N + 12LDT), and "
                    "wall-clock at a stated MFU. Give exactly one of --flops, --params, --tokens.")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training FLOP budget C, e.g. 1e21")
    budget.add_argument("--params", type=float, help="parameter count N (Approach 1 gives C, D)")
    budget.add_argument("--tokens", type=float, help="token count D (Approach 1 gives C, N)")
    p.add_argument("--moe", metavar="E,k,G", help="experts, top-k and granularity (dense FFN "
                   "width / expert width) for the fine-grained MoE law; with --preset also "
                   "applied to the preset (num_experts, top_k, expert_hidden = ffn_hidden / G)")
    p.add_argument("--preset", type=Path, help="a config YAML: its FLOPs/token and the tokens "
                   "the budget buys at its size")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization (default 0.4)")
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE,
                   help="peak FLOP/s of one device (default 989e12, H100 SXM bf16 dense)")
    p.add_argument("--write-preset", type=Path, metavar="OUT_YAML",
                   help="with --preset: write it rescaled to the planned size and token count")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    for line in plan_lines(args):
        print(line)
    return 0


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _allocation_line(name: str, a: Allocation) -> str:
    return (f"{name}: N={_fmt(a.params)} params, D={_fmt(a.tokens)} tokens "
            f"({a.tokens / a.params:.1f} tokens/param), C={_fmt(a.flops)} FLOPs, "
            f"predicted loss {a.loss:.3f}")


def plan_lines(args: argparse.Namespace) -> list[str]:
    """The report `mmfm plan` prints, one line each (and the preset it writes, if asked)."""
    plans = plan_budget(args.flops, args.params, args.tokens)
    flops = plans["approach1"].flops
    lines = [_allocation_line("Chinchilla approach 1 (Table 3 power law)", plans["approach1"]),
             _allocation_line("Chinchilla approach 3 (parametric loss optimum)", plans["approach3"])]
    target, moe_shape = plans["approach1"], None
    if args.moe:
        experts, top_k, granularity = parse_moe(args.moe)
        moe_shape = (experts, top_k, granularity)
        target = plan_moe(flops, granularity)
        lines.append(_allocation_line(
            f"fine-grained MoE (Krajewski et al. 2024, E={experts}, k={top_k}, G={granularity:g}; "
            "N = active params)", target))
    hours = wall_clock_s(flops, args.mfu, args.devices, args.peak_flops) / 3600
    lines.append(f"wall-clock: {hours:.3g} h at MFU {args.mfu:g} on {args.devices} device(s) "
                 f"of {_fmt(args.peak_flops)} FLOP/s")
    if args.preset is not None:
        cfg = _with_moe_shape(load_config(args.preset), moe_shape)
        lines += _preset_lines(cfg, flops)
        if args.write_preset is not None:
            written = write_sized_preset(cfg, target.params, target.tokens, args.write_preset)
            lines.append(f"wrote {args.write_preset}: {_describe(written)}")
    elif args.write_preset is not None:
        raise UserValueError("--write-preset needs --preset (the recipe to rescale)")
    return lines


def _with_moe_shape(cfg: ExperimentConfig, shape: tuple[int, int, float] | None):
    """The preset with `--moe E,k,G` applied: E experts, top-k, expert width = ffn_hidden / G."""
    if shape is None:
        return cfg
    if cfg.model.moe is None:
        raise UserValueError("--moe with a dense --preset: pick an MoE preset (model.moe set)")
    experts, top_k, granularity = shape
    moe = dataclasses.replace(cfg.model.moe, num_experts=experts, top_k=top_k,
                              expert_hidden=max(1, round(cfg.model.ffn_hidden / granularity)))
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    out.validate()
    return out


def _describe(cfg: ExperimentConfig) -> str:
    counts = count_params(cfg.model)
    return (f"d_model={cfg.model.d_model}, n_layers={cfg.model.n_layers}, "
            f"{_fmt(counts.active)} active / {_fmt(counts.total)} total params, "
            f"train.steps={cfg.train.steps}")


def _preset_lines(cfg: ExperimentConfig, flops: float) -> list[str]:
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    return [f"preset {cfg.run.name}: {_describe(cfg)}; {_fmt(per_token)} training FLOPs/token "
            f"at seq_len {cfg.data.seq_len} (6N + 12LDT); the budget buys "
            f"{_fmt(flops / per_token)} tokens at this size"]


def _scaled_model(model, width: int):
    """The model at d_model=`width`: head width, depth/width ratio and FFN/expert widths kept
    in proportion to the preset's."""
    ratio = width / model.d_model
    n_heads = max(1, width // model.head_dim)
    kv = max(1, n_heads * model.n_kv_heads // model.n_heads)
    while n_heads % kv:
        kv -= 1
    moe = model.moe
    if moe is not None:
        moe = dataclasses.replace(
            moe, expert_hidden=moe.expert_hidden and max(1, round(moe.expert_hidden * ratio)),
            shared_expert_hidden=moe.shared_expert_hidden
            and max(1, round(moe.shared_expert_hidden * ratio)))
    return dataclasses.replace(
        model, d_model=n_heads * model.head_dim, n_heads=n_heads, n_kv_heads=kv,
        n_layers=max(1, round(model.n_layers * ratio)),
        ffn_hidden=max(1, round(model.ffn_hidden * ratio)), moe=moe)


def write_sized_preset(cfg: ExperimentConfig, active_params: float, tokens: float,
                       out: Path) -> ExperimentConfig:
    """Write `cfg` rescaled so its active parameters come closest to `active_params` (widths in
    steps of one head), with train.steps set to see `tokens` tokens; returns the config."""
    widths = range(cfg.model.head_dim, 64 * 1024 + 1, cfg.model.head_dim)
    model = min((_scaled_model(cfg.model, w) for w in widths),
                key=lambda m: abs(math.log(count_params(m).active / active_params)))
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    steps = max(1, math.ceil(tokens / per_step))
    train = dataclasses.replace(cfg.train, steps=steps,
                                warmup_steps=min(cfg.train.warmup_steps, steps))
    run = dataclasses.replace(cfg.run, name=out.stem)
    sized = dataclasses.replace(cfg, model=model, train=train, run=run)
    sized.validate()
    save_config(sized, out)
    return sized
