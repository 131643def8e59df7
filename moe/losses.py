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


def token_mean(values_T: Tensor, mean_over: Tensor | float | None = None) -> Tensor:
    """Sum over dim 0 divided by `mean_over` (default: the number of rows). Zero rows give 0
    with a zero gradient, never NaN. Expert parallelism passes the ep group's tokens / ep, so
    that the mean of the ranks' results is the mean over all the group's tokens even when the
    ranks hold different token counts (see `mmfm.moe.layer.MoELayer`)."""
    if mean_over is None:
        mean_over = values_T.shape[0]
    if torch.is_tensor(mean_over):
        mean_over = mean_over.to(values_T.device, torch.float32)
        mean_over = torch.where(mean_over > 0, mean_over, torch.ones_like(mean_over))
    else:
        mean_over = float(mean_over) if mean_over > 0 else 1.0
    return values_T.sum(dim=0) / mean_over


def switch_load_balancing_loss(
    probs_TE: Tensor, topk_idx_TK: Tensor, num_experts: int, coef: float = 1.0,
    counts_E: Tensor | None = None, mean_over: Tensor | float | None = None,
) -> Tensor:
    """Switch Transformer loss `coef * E * sum_i f_i * P_i`.

    f_i = count_i / (T * K) is the fraction of assignments routed to expert i (no gradient);
    P_i = mean over tokens of `probs_TE[:, i]` (router probabilities over all E experts).
    `counts_E` overrides the counts (e.g. all-reduced over an expert-parallel group so that f is
    measured over the global batch); its total then defines the normalization. `mean_over`
    overrides the token count P divides by (`token_mean`). No tokens: 0.
    """
    if counts_E is None:
        counts_E = tokens_per_expert(topk_idx_TK, num_experts)
    f_E = counts_E.float() / counts_E.sum().clamp(min=1).float()
    P_E = token_mean(probs_TE.float(), mean_over)
    return coef * num_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor, coef: float = 1.0,
                  mean_over: Tensor | float | None = None) -> Tensor:
    """ST-MoE router z-loss `coef * mean_t logsumexp(logits_t)^2` (keeps logits small);
    `mean_over` as in `token_mean`. No tokens: 0."""
    return coef * token_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), mean_over)


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
    if T == 0:  # an expert group with no token of its modality here
        return probs_TE.float().sum() * 0.0
    S = T // batch_size
    probs_BSE = probs_TE.float().view(batch_size, S, E)
    probs_BSE = probs_BSE / probs_BSE.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    counts_BE = torch.zeros(batch_size, E, device=probs_TE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, topk_idx_TK.view(batch_size, S * K),
                           torch.ones(batch_size, S * K, device=probs_TE.device))
    f_BE = counts_BE * (E / (K * S))
    P_BE = probs_BSE.mean(dim=1)
    return coef * (f_BE * P_BE).sum(dim=-1).mean()
