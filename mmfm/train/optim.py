"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, tcfg, fused: bool | None = None) -> torch.optim.AdamW:
    """Decay 2-D+ weights except the embedding table; norms, biases and embeddings are not
    decayed (as in nanoGPT and OLMo).

    `fused` (default: wherever it can run) picks torch's single-kernel AdamW, 3x faster than
    the per-tensor loop on CPU for the small presets (docs/performance.md); it is also the
    Hugging Face Trainer's default. It needs plain floating-point tensors on CPU or CUDA, so
    DTensor (sharded) parameters keep the default implementation.
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and id(param) not in embed_ids else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(_fusable(p) for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8,
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
