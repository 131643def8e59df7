"""Gradient reduction, tied-embedding sync and the global gradient norm for mixed layouts.

Objective of a step: the mean over the dp replicas of each replica's loss. So every gradient is
averaged over the ranks that hold the same weights with divisor dp:

- ordinary weights: all-reduce over the dp group, / dp (the `ddp` engine; FSDP and DeepSpeed do
  this themselves);
- expert-parallel experts: each rank's expert gradient already sums the ep group's tokens (the
  all-to-all carries them), so all-reduce over the expert-data-parallel group and divide by dp,
  not by its size dp/ep.

The global norm is computed once for all layouts: each rank adds the squared norm of its local
gradient pieces, each divided by how many ranks hold an identical copy of that piece, and one
all-reduce over the world sums them (`GradSpec.copies`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


@dataclass
class GradSpec:
    """How one parameter is laid out: who holds copies, who must average its gradient."""

    param: nn.Parameter
    reduce_group: dist.ProcessGroup | None  # None: the engine (FSDP/DeepSpeed) reduces it
    divisor: int
    holders: int  # ranks holding some piece of this (local) tensor, e.g. dp·tp
    tied: bool = False  # embedding shared by the first and last pipeline stage

    @property
    def copies(self) -> int:
        """Ranks holding an identical copy of this rank's local piece."""
        shards = 1
        if isinstance(self.param, DTensor):
            mesh = self.param.device_mesh
            # Shard and FSDP's _StridedShard (FSDP over TP on the same dim) both split data.
            shards = math.prod(mesh.size(i) for i, p in enumerate(self.param.placements)
                               if not (p.is_replicate() or p.is_partial()))
        return self.holders // shards * (2 if self.tied else 1)


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def all_reduce_grads(specs: list[GradSpec]) -> None:
    """Average gradients the engine does not reduce, one flat buffer per (group, dtype)."""
    buckets: dict[tuple, list[Tensor]] = {}
    for spec in specs:
        if spec.reduce_group is None:
            continue
        if spec.param.grad is None:  # unused on this rank this step; peers may have used it
            spec.param.grad = torch.zeros_like(spec.param)
        grad = local(spec.param.grad)
        buckets.setdefault((spec.reduce_group, spec.divisor, grad.dtype), []).append(grad)
    for (group, divisor, _), grads in buckets.items():
        if dist.get_world_size(group) == 1 and divisor == 1:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def sync_tied_grads(specs: list[GradSpec], tied_group: dist.ProcessGroup | None) -> None:
    """Sum the tied embedding's gradient over the first and last stage (pp > 1)."""
    if tied_group is None:
        return
    for spec in specs:
        if spec.tied and spec.param.grad is not None:
            dist.all_reduce(local(spec.param.grad), group=tied_group)


@torch.no_grad()
def global_grad_norm(specs: list[GradSpec]) -> Tensor:
    """L2 norm of the full gradient of the whole model, identical on every rank."""
    total = torch.zeros((), dtype=torch.float64)
    for spec in specs:
        if spec.param.grad is not None:
            g = local(spec.param.grad).detach()
            total += g.double().pow(2).sum().cpu() / spec.copies
    device = specs[0].param.device if specs else torch.device("cpu")
    total = total.to(device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.sqrt().float()


@torch.no_grad()
def clip_grads(specs: list[GradSpec], max_norm: float) -> float:
    """Scale all gradients so the global norm is at most `max_norm` (0 disables); returns the
    norm before clipping, as `torch.nn.utils.clip_grad_norm_` does."""
    norm = global_grad_norm(specs)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for spec in specs:
            if spec.param.grad is not None:
                local(spec.param.grad).mul_(coef.to(spec.param.grad.device))
    return float(norm)
