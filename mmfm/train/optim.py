"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, tcfg, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over a whole (unsharded) model: decay 2-D+ weights except the embedding table;
    norms, biases and embeddings are not decayed (as in nanoGPT and OLMo)."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return adamw(model.named_parameters(), tcfg, no_decay_ids=embed_ids, fused=fused)


def adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], tcfg,
          no_decay_ids: set[int] = frozenset(), no_decay_names: set[str] = frozenset(),
          fused: bool | None = None) -> torch.optim.AdamW:
    """The one optimizer rule, for one process and every layout: decay 2-D+ weights except
    those named in `no_decay_*` (embedding tables, a tied LM head); each parameter once.
    Groups are further split by device mesh, so foreach kernels never mix plain tensors with
    DTensors of different meshes.

    `fused` (default: wherever it can run) picks torch's single-kernel AdamW, 3x faster than
    the per-tensor loop on CPU for the small presets (docs/performance.md); it is also the
    Hugging Face Trainer's default. It needs plain floating-point tensors on CPU or CUDA, so
    DTensor (sharded) parameters keep the default implementation.
    """
    groups: dict[tuple, list] = {}
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = p.ndim >= 2 and id(p) not in no_decay_ids and name not in no_decay_names
        mesh = getattr(p, "device_mesh", None)
        groups.setdefault((decay, None if mesh is None else id(mesh)), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: not kv[0][0])  # decayed groups first
    param_groups = [{"params": params, "weight_decay": tcfg.weight_decay if decay else 0.0}
                    for (decay, _), params in ordered]
    if fused is None:
        fused = all(_fusable(p) for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8,
                             fused=fused or None)


def _fusable(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return (not isinstance(param, DTensor) and param.device.type in ("cpu", "cuda")
            and param.is_floating_point())


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: warmup_cosine(
        step, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio))
