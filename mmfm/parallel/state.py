"""Full (unsharded) tensors from any layout: for parity tests, export and DeepSpeed checkpoints.

Each local weight is one of: a DTensor (FSDP and/or tensor parallel: `full_tensor()`), a
DeepSpeed ZeRO parameter (`safe_get_full_fp32_param`), or a plain tensor; expert-parallel
experts are additionally this rank's E/ep slice of the stack, all-gathered over the ep group.
All functions here are collectives over the ranks that share the weights: call them on every
rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from mmfm.parallel.api import ParallelModel
from mmfm.parallel.expert_parallel import is_routed_expert


def is_expert(pm: ParallelModel, name: str) -> bool:
    return pm.dims.ep > 1 and is_routed_expert(name)


def unshard(pm: ParallelModel, param: Tensor, optim_key: str | None = None) -> Tensor:
    """This rank's logical tensor (an expert stack stays E/ep) gathered from its shards;
    `optim_key` gives the optimizer state of that name instead (DeepSpeed only)."""
    if pm.engine is not None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if optim_key is None:
            return safe_get_full_fp32_param(param).detach().cpu()
        return safe_get_full_optimizer_state(param, optim_key).detach().cpu()
    if isinstance(param, DTensor):
        return param.full_tensor().detach().cpu()
    return param.detach().cpu()


def gather_experts(pm: ParallelModel, stack: Tensor) -> Tensor:
    """(E/ep, ...) local expert stack -> (E, ...) over the expert-parallel group."""
    pieces = [torch.empty_like(stack) for _ in range(pm.dims.ep)]
    dist.all_gather(pieces, stack.contiguous(), group=pm.dims.ep_group)
    return torch.cat(pieces)


def full_state_dict(pm: ParallelModel) -> dict[str, Tensor]:
    """{Decoder name: full CPU tensor} for every weight of every stage, on every rank."""
    out = {}
    for name, param in pm.named_parameters():
        full = unshard(pm, param)
        if is_expert(pm, name):
            full = gather_experts(pm, full.to(pm.dims.device)).cpu()
        out[name] = full
    for name, buf in pm.named_buffers():
        out[name] = buf.detach().cpu().clone()
    if pm.dims.pp > 1:
        parts: list = [None] * pm.dims.pp
        dist.all_gather_object(parts, out, group=pm.dims.pp_group)
        out = {k: v for part in parts for k, v in part.items()}
    return out
