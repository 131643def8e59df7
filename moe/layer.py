"""MoELayer: router -> (capacity) -> dispatcher -> experts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model width, E experts, K experts per
token, L experts held by this rank (E, or E/P under expert parallelism over P ranks),
R rows this rank's experts process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmfm.moe.capacity import capacity_keep_mask, expert_capacity
from mmfm.moe.config import MoEConfig
from mmfm.moe.dispatcher import AllToAllDispatcher, LocalDispatcher
from mmfm.moe.experts import Experts, SharedExperts
from mmfm.moe.losses import (
    router_z_loss,
    sequence_balance_loss,
    switch_load_balancing_loss,
    tokens_per_expert,
)
from mmfm.moe.metrics import LoadMonitor, in_backward
from mmfm.moe.router import Router, RouterOutput

_COEFS = {"lb_loss": "aux_loss_coef", "seq_aux_loss": "seq_aux_loss_coef",
          "z_loss": "z_loss_coef"}


@dataclass
class RoutedTotals:
    """One forward's routing counts: this rank's, and its group's (the ep group, or under
    context parallelism the cp group holding the other chunks of the same sequences)."""

    local_counts_E: Tensor  # assignments per expert routed by this rank
    counts_E: Tensor  # over the group (= local_counts_E without ep or cp)
    mean_over: Tensor | None  # tokens a token mean divides by: group tokens / ranks (None: local)
    group_tokens: Tensor | None  # tokens routed by the whole group (None: no ep or cp)

    def group_is_empty(self, local_tokens: int) -> bool:
        """No token at all in the group (host sync only when this rank has none)."""
        if local_tokens > 0:
            return False
        return self.group_tokens is None or int(self.group_tokens) == 0


class MoELayer(nn.Module):
    """Mixture-of-Experts SwiGLU FFN; `forward` returns (output, coefficient-weighted aux loss).

    With `ep_group`, experts are sharded E/P over that process group (this rank holds experts
    [rank*L, (rank+1)*L)) and tokens travel by all-to-all. The balance losses are then those of
    the group's tokens taken together, split over the ranks so that the mean of the ranks' aux
    losses is exactly the aux loss of one process seeing all their tokens, also when ranks hold
    different token counts (a modality group's tokens, `mmfm.moe.modality`):

    - Switch loss `E Σ_i f_i P_i`: f (load fractions, no gradient) is counted over the group
      (counts all-reduced); P_i, the group's mean router probability, is `Σ_r S_r,i / T` with
      S_r,i the sum over rank r's T_r tokens and T = Σ_r T_r. The trainer averages the ranks'
      losses (divides by P ranks), so rank r contributes `E Σ_i f_i S_r,i / (T / P)`: its local
      mean weighted by P·T_r/T. T comes for free from the all-reduced counts (Σ_i c_i = K·T).
    - z-loss `mean_t lse_t²` likewise: rank r contributes `Σ_{t∈r} lse_t² / (T / P)`.

    A rank (or a whole group) with no token contributes 0 with a zero gradient.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, default_expert_hidden: int,
                 init_std: float = 0.02, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.init_std = init_std
        E = cfg.num_experts
        hidden = cfg.expert_hidden or default_expert_hidden
        self.router = Router(cfg, d_model)
        if ep_group is None:
            self.dispatcher, first = LocalDispatcher(E), 0
        else:
            self.dispatcher = AllToAllDispatcher(E, ep_group)
            first = dist.get_rank(ep_group) * self.dispatcher.num_local
        num_local = E if ep_group is None else self.dispatcher.num_local
        self.experts = Experts(num_local, d_model, hidden, cfg.backend, first_expert=first)
        self.shared_experts = None
        self.shared_gate = None
        if cfg.num_shared_experts:
            shared_hidden = cfg.shared_expert_hidden or hidden
            self.shared_experts = SharedExperts(d_model, cfg.num_shared_experts * shared_hidden)
        if cfg.shared_expert_gate:
            self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.load = LoadMonitor(E)
        # Context parallelism sets the group of ranks holding the other chunks of the same
        # sequences: the Switch loss then counts expert load over whole sequences.
        self.cp_group: dist.ProcessGroup | None = None
        self.reset_parameters()

    def reset_parameters(self, out_std: float | None = None) -> None:
        """Experts like a dense SwiGLU FFN: N(0, init_std) for w1/w3, N(0, out_std) for w2
        (out_std defaults to init_std; pass the dense FFN's depth-scaled std for parity)."""
        self.router.reset_parameters(self.init_std)
        self.experts.reset_parameters(self.init_std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(self.init_std, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=self.init_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, D) -> (y (B, S, D), aux loss scalar fp32)."""
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        r = self.router(x_TD)
        totals = self._routed_totals(r)
        keep_TK = self._capacity_keep(r)
        x_RD, counts_L, state = self.dispatcher.dispatch(x_TD, r.topk_idx_TK, keep_TK)
        y_RD = self.experts(x_RD, counts_L)
        y_TD = self.dispatcher.combine(y_RD, r.topk_weight_TK, state, B * S)
        if self.shared_experts is not None:
            y_TD = y_TD + self._shared(x_TD)
        aux, losses = self._aux_losses(r, B, totals)
        self._monitor(r, keep_TK, losses, B, S, totals)
        return y_TD.view(B, S, D), aux

    @property
    def expert_parallel(self) -> bool:
        """Whether experts are sharded over an expert-parallel group (all-to-all dispatch)."""
        return getattr(self.dispatcher, "group", None) is not None

    def _shared(self, x_TD: Tensor) -> Tensor:
        """Shared-expert output, times Qwen2-MoE's sigmoid gate (T, 1) when configured."""
        out_TD = self.shared_experts(x_TD)
        if self.shared_gate is None:
            return out_TD
        return torch.sigmoid(self.shared_gate(x_TD)) * out_TD

    def _capacity_keep(self, r: RouterOutput) -> Tensor | None:
        if self.cfg.capacity_factor is None:
            return None
        T, K = r.topk_idx_TK.shape
        cap = expert_capacity(T, K, self.cfg.num_experts, self.cfg.capacity_factor)
        return capacity_keep_mask(r.topk_idx_TK, r.topk_weight_TK, cap, self.cfg.num_experts,
                                  self.cfg.drop_policy)

    def _loss_fns(self, r: RouterOutput, batch_size: int, totals: RoutedTotals) -> dict:
        """Raw (coefficient 1) balance losses, as thunks so unused ones cost nothing. Under
        expert parallelism token means divide by the ep group's tokens / ep (class docstring);
        the sequence-level loss stays per rank (each rank's sequences are whole)."""
        E = self.cfg.num_experts
        return {
            "lb_loss": lambda: switch_load_balancing_loss(
                r.probs_TE, r.topk_idx_TK, E, counts_E=totals.counts_E,
                mean_over=totals.mean_over),
            "seq_aux_loss": lambda: sequence_balance_loss(r.probs_TE, r.topk_idx_TK, batch_size),
            "z_loss": lambda: router_z_loss(r.logits_TE, mean_over=totals.mean_over),
        }

    def _aux_losses(self, r: RouterOutput, batch_size: int,
                    totals: RoutedTotals) -> tuple[Tensor, dict[str, Tensor]]:
        """(sum of coefficient-weighted losses, {name: raw loss} of those with coefficient > 0)."""
        aux = r.logits_TE.new_zeros(())
        losses: dict[str, Tensor] = {}
        for name, fn in self._loss_fns(r, batch_size, totals).items():
            coef = getattr(self.cfg, _COEFS[name])
            if coef > 0:
                losses[name] = fn()
                aux = aux + coef * losses[name]
        losses["aux_loss"] = aux
        return aux, losses

    @torch.compiler.disable
    @torch.no_grad()
    def _monitor(self, r: RouterOutput, keep_TK: Tensor | None, losses: dict[str, Tensor],
                 B: int, S: int, totals: RoutedTotals) -> None:
        """Count load (training, outside backward).

        Skipped inside backward so activation-checkpoint recomputation never counts twice, and
        when the whole ep group routed no token (an absent modality: a single process would not
        have run the group). Losses whose coefficient is 0 are computed here, without autograd,
        for the metrics.
        """
        if in_backward() or not self.training or totals.group_is_empty(B * S):
            return
        for name, fn in self._loss_fns(r, B, totals).items():
            if name not in losses:
                losses[name] = fn()
        dropped = 0 if keep_TK is None else (~keep_TK).sum()
        self.load.update(totals.local_counts_E, r.probs_TE, dropped, losses,
                         count_for_bias=self.cfg.bias_update_rate > 0)

    def _routed_totals(self, r: RouterOutput) -> RoutedTotals:
        """Expert counts of this forward; under expert parallelism also over the ep group, and
        under context parallelism over the cp group (the ranks holding chunks of the same
        sequences): one all-reduce of E counts per group, entered by every rank even with no
        token. The groups are orthogonal (cp with ep is refused today), so the sums cover
        their product."""
        local_E = tokens_per_expert(r.topk_idx_TK, self.cfg.num_experts)
        groups = [g for g in (getattr(self.dispatcher, "group", None), self.cp_group)
                  if g is not None]
        if not groups:
            return RoutedTotals(local_E, local_E, None, None)
        counts_E = local_E.clone()
        ranks = 1
        for group in groups:
            dist.all_reduce(counts_E, group=group)
            ranks *= dist.get_world_size(group)
        group_tokens = counts_E.sum() // self.cfg.top_k  # every token makes K assignments
        mean_over = group_tokens.float() / ranks
        return RoutedTotals(local_E, counts_E, mean_over, group_tokens)

    def compute_metrics(self, reset: bool = True) -> dict[str, tuple[Tensor, str]]:
        """name -> (value, reduce_op) accumulated in training since the last reset."""
        out = self.load.metrics(self.router.expert_bias)
        if reset:
            self.load.reset()
        return out

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing step: b <- b + rate * sign(mean load - load), using the load
        counted since the last call (all-reduced over `group`). No-op when the rate is 0."""
        rate = self.cfg.bias_update_rate
        if rate == 0:
            return
        load_E = self.load.bias_load_E.float()
        if group is not None:
            dist.all_reduce(load_E, group=group)
        self.router.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))
        self.load.bias_load_E.zero_()

    def load_full_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load an unsharded state dict (all E experts) into this possibly expert-sharded layer,
        keeping only this rank's experts [first_expert, first_expert + L)."""
        lo = self.experts.first_expert
        hi = lo + self.experts.num_local
        local = {k: (v[lo:hi] if k.startswith("experts.w") else v) for k, v in state_dict.items()}
        return self.load_state_dict(local, strict=strict)
