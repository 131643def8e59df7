"""Capacity-factor mode: each expert takes at most C assignments per forward, the rest drop.

Shape legend: T tokens, K experts per token, E experts, A = T*K assignments (flat id t*K + j).

C = ceil(capacity_factor * T * K / E), computed from the tokens of this rank (as Megatron-Core).
Drop policy `probs` keeps, per expert, the assignments with the highest gate weight (ties by
position); `position` keeps the earliest ones (by token index, then slot). A dropped assignment
contributes nothing to its token's output; the remaining gate weights are not renormalized.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmfm.errors import UserValueError


def expert_capacity(num_tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
    """Assignments each expert may take: ceil(factor * T * K / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@torch.no_grad()
def capacity_keep_mask(topk_idx_TK: Tensor, weight_TK: Tensor, capacity: int,
                       num_experts: int, policy: str) -> Tensor:
    """Bool (T, K): which assignments fit within their expert's capacity."""
    expert_A = topk_idx_TK.flatten()
    A = expert_A.numel()
    if policy == "probs":
        priority_A = torch.argsort(weight_TK.flatten(), descending=True, stable=True)
    elif policy == "position":
        priority_A = torch.arange(A, device=expert_A.device)
    else:
        raise UserValueError(f"model.moe.drop_policy={policy!r} is not one of probs, position")
    order_A = priority_A[torch.argsort(expert_A[priority_A], stable=True)]
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_A = torch.arange(A, device=expert_A.device) - starts_E[expert_A[order_A]]
    keep_A = torch.empty(A, dtype=torch.bool, device=expert_A.device)
    keep_A[order_A] = rank_A < capacity
    return keep_A.view_as(topk_idx_TK)
