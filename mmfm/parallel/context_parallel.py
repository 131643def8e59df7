"""Context parallelism for the text decoder: every sequence split over `parallel.cp` ranks.

The cp ranks of a group read the same data rows; each keeps a contiguous 1/cp of every
sequence (rank c holds positions [c·T/cp, (c+1)·T/cp)) through embeddings, norms, FFN/MoE and
the LM head. Attention is DeepSpeed-Ulysses (Jacobs et al. 2023): before it, one all-to-all
trades the sequence shards of q, k and v for head shards, so each rank holds the *whole*
sequence for H/cp query and K/cp key/value heads and runs ordinary causal attention (SDPA or
flash-attn, with document masks built from the full `doc_ids`, RoPE at global positions 0..T-1);
a second all-to-all trades the output back. Exact: the same sums as one process, regrouped.
Communication per layer and rank: forward one all-to-all of B·T/cp·(H+2K)·Dh values and one of
B·T/cp·H·Dh (each rank keeps 1/cp of them), backward the same again.

Why not ring attention: torch's `context_parallel` (torch.distributed.tensor.experimental)
has no sharding rule for CPU attention (`aten._scaled_dot_product_flash_attention_for_cpu`),
so it cannot run on gloo/CPU where the parity tests run; Ulysses needs only all-to-all, which
gloo has. Its limit: cp must divide the (per tensor-parallel rank) head counts.

Objective: the loss of each sequence is its token mean over all of it. Every cp rank returns
the same global values (LM token mean, aux loss), and its gradient is arranged so that the
mean of the dp × cp ranks' gradients is the gradient of the global objective: the LM part
backpropagates cp × (this rank's share of the global token mean), the aux part this rank's
aux loss, whose mean over the group is the full-sequence aux loss because the MoE layers count
expert load over the cp group (`MoELayer.cp_group`). Weights are replicated over cp, so their
gradients are averaged over the dp × cp ranks (`ParallelDims.dp_cp_group`, divisor dp·cp).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.moe.dispatcher import all_to_all


class ContextParallel:
    """This rank's place in its context-parallel group, and the exchanges the decoder makes.

    Set as `Decoder.context_parallel` and `Attention.context_parallel` by
    `apply_context_parallel`; the model calls it, it holds no tensors."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __deepcopy__(self, memo) -> ContextParallel:
        """Process groups cannot be copied; a copied model shares its rank's group."""
        return self

    def local(self, t_BT: Tensor | None) -> Tensor | None:
        """This rank's contiguous chunk of a (B, T, ...) tensor along the sequence (dim 1)."""
        if t_BT is None:
            return None
        T = t_BT.shape[1]
        if T % self.size:
            raise UserValueError(f"sequence length {T} is not divisible by parallel.cp="
                                 f"{self.size}: each context-parallel rank holds T/cp tokens")
        n = T // self.size
        return t_BT[:, self.rank * n:(self.rank + 1) * n]

    def _exchange(self, x: Tensor) -> Tensor:
        """All-to-all of equal blocks along dim 0 (one per rank), differentiable."""
        rows = x.shape[0] // self.size
        return all_to_all(x.contiguous(), [rows] * self.size, [rows] * self.size, self.group)

    def to_heads(self, q_BHtD: Tensor, k_BKtD: Tensor,
                 v_BKtD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, heads, T/cp, Dh) sequence shards -> (B, heads/cp, T, Dh) head shards, q, k and v
        in one all-to-all. Rank c gets heads [c·H/cp, (c+1)·H/cp) (and the matching K/cp
        key/value heads, so grouped-query sharing stays within a rank)."""
        cp = self.size
        B, _, t, Dh = q_BHtD.shape
        heads = [x.shape[1] // cp for x in (q_BHtD, k_BKtD, v_BKtD)]
        # (B, cp, heads/cp, t, Dh) each, concatenated per destination rank, destination first.
        send = torch.cat([x.view(B, cp, h, t, Dh) for x, h in zip((q_BHtD, k_BKtD, v_BKtD),
                                                                   heads, strict=True)], dim=2)
        recv = self._exchange(send.transpose(0, 1))  # (cp source chunk, B, H'+2K', t, Dh)
        full = recv.permute(1, 2, 0, 3, 4).reshape(B, sum(heads), cp * t, Dh)
        q, k, v = full.split(heads, dim=1)
        return q, k, v

    def to_sequence(self, out_BhTD: Tensor) -> Tensor:
        """(B, H/cp, T, Dh) head shard -> (B, H, T/cp, Dh) sequence shard (inverse exchange)."""
        cp = self.size
        B, h, T, Dh = out_BhTD.shape
        send = out_BhTD.view(B, h, cp, T // cp, Dh).permute(2, 0, 1, 3, 4)  # destination first
        recv = self._exchange(send)  # (cp source head block, B, h, T/cp, Dh)
        return recv.transpose(0, 1).reshape(B, cp * h, T // cp, Dh)

    def gather(self, t_Bt: Tensor) -> Tensor:
        """Concatenate the ranks' (B, T/cp, ...) chunks into (B, T, ...), without gradient
        (per-token losses for metrics, logits of a forward without labels)."""
        pieces = [torch.empty_like(t_Bt) for _ in range(self.size)]
        dist.all_gather(pieces, t_Bt.detach().contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)

    def global_losses(self, lm_local: Tensor | None, labels_Bt: Tensor | None,
                      aux_local: Tensor) -> tuple[Tensor | None, Tensor]:
        """(LM loss, aux loss) of the whole sequences, the same values on every cp rank, with
        the gradients the module docstring describes. `lm_local` is the mean over this rank's
        targets (`labels_Bt` != -100)."""
        from mmfm.model.fused_loss import IGNORE_INDEX

        stats = torch.zeros(3, dtype=torch.float64, device=aux_local.device)
        stats[2] = aux_local.detach().double()
        if lm_local is not None:
            local_n = (labels_Bt != IGNORE_INDEX).sum().clamp(min=1)
            stats[0] = lm_local.detach().double() * local_n
            stats[1] = (labels_Bt != IGNORE_INDEX).sum()
        dist.all_reduce(stats, group=self.group)
        aux = _with_value(aux_local, stats[2] / self.size)
        if lm_local is None:
            return None, aux
        global_n = stats[1].clamp(min=1)
        share = lm_local * (local_n / global_n).to(lm_local.dtype)  # this rank's part of the mean
        return _with_value(self.size * share, stats[0] / global_n), aux


def _with_value(x: Tensor, value: Tensor) -> Tensor:
    """`value` in forward, `x`'s gradient in backward."""
    return x + (value.to(x.dtype) - x).detach()


def apply_context_parallel(decoder: nn.Module, cp_group: dist.ProcessGroup) -> None:
    """Make `decoder` (a whole Decoder, identical on every cp rank) run its sequences split over
    `cp_group`: the decoder takes full (B, T) batches and keeps its chunk, attention exchanges
    shards, MoE layers count expert load over the group. A no-op for a 1-rank group."""
    if dist.get_world_size(cp_group) == 1:
        return
    cp = ContextParallel(cp_group)
    decoder.context_parallel = cp
    for module in decoder.modules():
        if hasattr(module, "context_parallel") and module is not decoder:
            module.context_parallel = cp
        if hasattr(module, "cp_group"):  # MoELayer: Switch-loss load over whole sequences
            module.cp_group = cp_group
