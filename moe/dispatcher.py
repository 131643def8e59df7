"""Token dispatchers: route token copies to the experts that hold them and combine the results.

Shape legend: T tokens on this rank, D model width, K experts per token, E experts (global),
L experts held by this rank (E/P), P expert-parallel ranks, A assignments kept on this rank
(T*K in dropless mode), R rows received from all ranks for the local experts.

`dispatch(x_TD, topk_idx_TK, keep_TK)` returns the rows for the local experts grouped by local
expert (`x_RD`, `counts_L`) and a state; `combine(y_RD, weight_TK, state)` returns (T, D):
each token's gate-weighted sum over its kept experts. Both are differentiable, and neither builds
a dense (T, E, D) tensor: tokens are gathered once per assignment, sorted by expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mmfm.errors import UserValueError


@dataclass
class LocalState:
    """How assignments were permuted on this rank (sorted by global expert id)."""

    order_A: Tensor  # flat assignment ids (t*K + j) in expert-sorted order
    token_A: Tensor  # token id of each sorted row
    counts_E: Tensor  # assignments per global expert (kept ones only)


def permute(x_TD: Tensor, topk_idx_TK: Tensor, num_experts: int,
            keep_TK: Tensor | None = None) -> tuple[Tensor, LocalState]:
    """Gather token copies sorted by expert; dropped assignments (keep=False) are left out."""
    K = topk_idx_TK.shape[1]
    expert_A = topk_idx_TK.flatten()
    if keep_TK is not None:
        expert_A = expert_A.masked_fill(~keep_TK.flatten(), num_experts)  # sorts past the end
    order_A = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=num_experts + 1)
    num_kept = expert_A.numel() - int(counts[num_experts]) if keep_TK is not None else None
    order_A = order_A[:num_kept]
    token_A = order_A // K
    # index_select, not x_TD[token_A]: its backward is an index_add rather than an
    # accumulating index_put, which sorts the indices first (about 3x slower on CPU).
    return x_TD.index_select(0, token_A), LocalState(order_A, token_A, counts[:num_experts])


def unpermute(y_AD: Tensor, weight_TK: Tensor, state: LocalState, num_tokens: int) -> Tensor:
    """Scale each expert output by its gate weight and sum the copies back per token."""
    w_A = weight_TK.flatten().index_select(0, state.order_A).to(y_AD.dtype)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, state.token_A, y_AD * w_A.unsqueeze(-1))


class LocalDispatcher:
    """All experts live on this rank: permute, run, unpermute."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: Tensor, topk_idx_TK: Tensor, keep_TK: Tensor | None = None):
        x_AD, state = permute(x_TD, topk_idx_TK, self.num_experts, keep_TK)
        return x_AD, state.counts_E, state

    def combine(self, y_AD: Tensor, weight_TK: Tensor, state: LocalState,
                num_tokens: int) -> Tensor:
        return unpermute(y_AD, weight_TK, state, num_tokens)


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` with uneven splits; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Send rows `in_splits[r]` to rank r, receive `out_splits[r]` from rank r (autograd-aware)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class AllToAllState:
    local: LocalState
    in_splits: list[int]  # rows this rank sends to each rank
    out_splits: list[int]  # rows this rank receives from each rank
    order_R: Tensor  # received rows (source-major) -> local-expert-major order
    inverse_R: Tensor  # and back


class AllToAllDispatcher:
    """Expert parallelism: rank r holds experts [r*L, (r+1)*L); tokens travel by all-to-all.

    1. permute locally by global expert id (experts of rank r are then one contiguous block);
    2. exchange per-expert counts, then the rows, with `all_to_all_single` (uneven splits; the
       list form of all_to_all is not implemented by gloo);
    3. regroup the received rows from (source rank, local expert) to (local expert, source rank)
       so the experts see contiguous groups; `combine` runs the inverse path.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise UserValueError(
                f"parallel.ep={self.ep} does not divide model.moe.num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep

    def __deepcopy__(self, memo) -> AllToAllDispatcher:
        """Process groups cannot be copied; a copied layer shares its rank's group."""
        return self

    def dispatch(self, x_TD: Tensor, topk_idx_TK: Tensor, keep_TK: Tensor | None = None):
        x_AD, local = permute(x_TD, topk_idx_TK, self.num_experts, keep_TK)
        send_PL = local.counts_E.view(self.ep, self.num_local)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.group)
        in_splits = send_PL.sum(dim=1).tolist()
        out_splits = recv_PL.sum(dim=1).tolist()
        x_RD = all_to_all(x_AD, out_splits, in_splits, self.group)
        order_R = _expert_major_order(recv_PL)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        state = AllToAllState(local, in_splits, out_splits, order_R, inverse_R)
        return x_RD.index_select(0, order_R), recv_PL.sum(dim=0), state

    def combine(self, y_RD: Tensor, weight_TK: Tensor, state: AllToAllState,
                num_tokens: int) -> Tensor:
        y_back_AD = all_to_all(y_RD.index_select(0, state.inverse_R), state.in_splits, state.out_splits,
                               self.group)
        return unpermute(y_back_AD, weight_TK, state.local, num_tokens)


def _expert_major_order(recv_PL: Tensor) -> Tensor:
    """Permutation taking rows laid out (source rank, local expert) to (local expert, source)."""
    P, L = recv_PL.shape
    local_expert_R = torch.arange(L, device=recv_PL.device).repeat(P)
    local_expert_R = local_expert_R.repeat_interleave(recv_PL.flatten())
    return torch.argsort(local_expert_R, stable=True)
