"""Router auxiliary losses as pure functions (no module state, no side effects).

Shape legend: T tokens (flattened batch), E experts, K experts chosen per token,
B sequences, S tokens per sequence (T = B * S).

All three return a scalar fp32 tensor that equals `coef` times the textbook quantity, and equal
`coef` exactly (Switch, sequence-level) or `coef * ln(E)^2` (z-loss, all-zero logits) under
perfectly uniform routing, which the tests check.

Mapping to Hugging Face: `transformers...mixtral.modeling_mixtral.load_balancing_loss_func`
returns `E * sum_k sum_i (count_{k,i} / T) * P_i`, i.e. per-slot fractions summed over the K
slots, which is K times ours with coef=1 (ours normalizes f_i by T*K so uniform routing gives 1,
theirs gives K). Hence `switch_load_balancing_loss(p, idx, E, coef=c) == c * hf_loss / K`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tokens_per_expert(topk_idx_TK: Tensor, num_experts: int) -> Tensor:
    """Count of routed assignments per expert, shape (E,), int64."""
    return torch.bincount(topk_idx_TK.flatten(), minlength=num_experts)


def switch_load_balancing_loss(
    probs_TE: Tensor, topk_idx_TK: Tensor, num_experts: int, coef: float = 1.0,
    counts_E: Tensor | None = None,
) -> Tensor:
    """Switch Transformer loss `coef * E * sum_i f_i * P_i`.

    f_i = count_i / (T * K) is the fraction of assignments routed to expert i (no gradient);
    P_i = mean over tokens of `probs_TE[:, i]` (router probabilities over all E experts).
    `counts_E` overrides the counts (e.g. all-reduced over an expert-parallel group so that f is
    measured over the global batch); its total then defines the normalization.
    """
    if counts_E is None:
        counts_E = tokens_per_expert(topk_idx_TK, num_experts)
    f_E = counts_E.float() / counts_E.sum().clamp(min=1).float()
    P_E = probs_TE.float().mean(dim=0)
    return coef * num_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor, coef: float = 1.0) -> Tensor:
    """ST-MoE router z-loss `coef * mean_t logsumexp(logits_t)^2` (keeps logits small)."""
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def sequence_balance_loss(
    probs_TE: Tensor, topk_idx_TK: Tensor, batch_size: int, coef: float = 1.0
) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the B sequences.

    Per sequence: f_i = E / (K * S) * count_i and P_i = mean_t probs'_{t,i}, where probs' are
    the affinities normalized to sum to 1 per token; loss = coef * sum_i f_i * P_i.
    Tokens must be laid out sequence-major (T = B * S).
    """
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[1]
    S = T // batch_size
    probs_BSE = probs_TE.float().view(batch_size, S, E)
    probs_BSE = probs_BSE / probs_BSE.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    counts_BE = torch.zeros(batch_size, E, device=probs_TE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, topk_idx_TK.view(batch_size, S * K),
                           torch.ones(batch_size, S * K, device=probs_TE.device))
    f_BE = counts_BE * (E / (K * S))
    P_BE = probs_BSE.mean(dim=1)
    return coef * (f_BE * P_BE).sum(dim=-1).mean()
