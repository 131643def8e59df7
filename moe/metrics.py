"""Per-expert load monitoring: accumulators (buffers) and the metrics derived from them.

Shape legend: E experts (global ids; under expert parallelism every rank counts the tokens it
routed, so summing `tokens_per_expert` over ranks gives the global load).

Counting happens only in training mode and never during a backward pass, so activation
checkpointing (reentrant or not), which re-runs the forward inside backward, does not count a
token twice. Each metric is returned with its cross-rank reduce op (OLMo-core convention):
per-rank derived values (imbalance, CV, ...) reduce by max/mean; recompute exact global values
from the summed `tokens_per_expert` with `load_stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfm.moe.utils import restore_fp32_buffers


def in_backward() -> bool:
    """True while the autograd engine runs a backward (e.g. checkpoint recomputation)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def load_stats(tokens_E: Tensor) -> dict[str, Tensor]:
    """Load summaries of a per-expert count vector; fractions of all routed assignments."""
    tokens_E = tokens_E.float()
    total = tokens_E.sum().clamp(min=1.0)
    mean = tokens_E.mean()
    return {
        "load_imbalance": tokens_E.max() / mean.clamp(min=1e-12) if mean > 0 else mean * 0,
        "load_cv": tokens_E.std(unbiased=False) / mean.clamp(min=1e-12),
        "min_load": tokens_E.min() / total,
        "max_load": tokens_E.max() / total,
    }


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Entropy (nats) of each token's routing distribution, shape (T,)."""
    p = probs_TE.float()
    return -(p * torch.log(p.clamp(min=1e-20))).sum(dim=-1)


class LoadMonitor(nn.Module):
    """Accumulates routing statistics since the last `reset()`; buffers stay fp32/int64."""

    _SUMS = ("aux_loss", "lb_loss", "seq_aux_loss", "z_loss", "entropy")
    _COUNTS = ("forwards", "tokens", "assignments", "dropped")

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("tokens_E", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        # Load since the last aux-loss-free bias update (separate from the logging window).
        self.register_buffer("bias_load_E", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        for name in self._SUMS:
            self.register_buffer(f"sum_{name}", torch.zeros((), dtype=torch.float32),
                                 persistent=False)
        for name in self._COUNTS:
            self.register_buffer(f"n_{name}", torch.zeros((), dtype=torch.int64),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        """Let `.to(device)` move the buffers but keep the float sums in fp32 under `.to(bf16)`."""
        super()._apply(fn, recurse)
        restore_fp32_buffers(self, tuple(f"sum_{name}" for name in self._SUMS))
        return self

    @torch.no_grad()
    def update(self, counts_E: Tensor, probs_TE: Tensor, num_dropped: Tensor | int,
               losses: dict[str, Tensor], count_for_bias: bool) -> None:
        """Add one forward's routing statistics (call only when counting is wanted)."""
        self.tokens_E.add_(counts_E)
        if count_for_bias:
            self.bias_load_E.add_(counts_E)
        self.n_forwards.add_(1)
        self.n_tokens.add_(probs_TE.shape[0])
        self.n_assignments.add_(counts_E.sum())
        self.n_dropped.add_(num_dropped)
        self.sum_entropy.add_(router_entropy(probs_TE).sum())
        for name, value in losses.items():
            getattr(self, f"sum_{name}").add_(value.detach().float())

    @torch.no_grad()
    def metrics(self, expert_bias_E: Tensor) -> dict[str, tuple[Tensor, str]]:
        """name -> (value, reduce_op) from the accumulators."""
        calls = self.n_forwards.clamp(min=1).float()
        out = {"tokens_per_expert": (self.tokens_E.clone(), "sum")}
        ops = {"load_imbalance": "max", "load_cv": "mean", "min_load": "min", "max_load": "max"}
        for name, value in load_stats(self.tokens_E).items():
            out[name] = (value, ops[name])
        out["router_entropy"] = (self.sum_entropy / self.n_tokens.clamp(min=1).float(), "mean")
        dropped = self.n_dropped.float() / self.n_assignments.clamp(min=1).float()
        out["dropped_fraction"] = (dropped, "mean")
        for name in ("aux_loss", "lb_loss", "seq_aux_loss", "z_loss"):
            out[name] = (getattr(self, f"sum_{name}") / calls, "mean")
        out["expert_bias"] = (expert_bias_E.detach().float().clone(), "mean")
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the logging window (not the bias load, which `update_bias` resets)."""
        self.tokens_E.zero_()
        for name in self._SUMS:
            getattr(self, f"sum_{name}").zero_()
        for name in self._COUNTS:
            getattr(self, f"n_{name}").zero_()
