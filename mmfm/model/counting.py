"""Analytic parameter and FLOP counts from a `ModelConfig`, and the dense-equivalent twin.

FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token =
6·N + 12·L·D·T, where N counts every weight used in a matrix multiply for that token (active
non-embedding weights plus the LM head; the input embedding is a lookup, not a matmul; norm
weights are included though negligible), L layers, D model width, T sequence length. The
attention term counts QKᵀ and AV forward and backward without a causal discount.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmfm.errors import UserValueError
from mmfm.moe.config import MoEConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter (tied embeddings counted once)
    active: int  # parameters a token touches: only top_k routed experts per MoE layer
    embedding: int  # input embedding table

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def _attention_params(cfg) -> int:
    kv = cfg.n_kv_heads * cfg.head_dim
    weights = cfg.d_model * cfg.d_model * 2 + cfg.d_model * kv * 2  # wq, wo, wk, wv
    bias = (cfg.d_model + 2 * kv) if cfg.qkv_bias else 0
    qk_norm = {"none": 0, "head": 2 * cfg.head_dim, "full": cfg.d_model + kv}[cfg.qk_norm]
    return weights + bias + qk_norm


def _swiglu_params(d_model: int, hidden: int) -> int:
    return 3 * d_model * hidden


def moe_ffn_params(moe: MoEConfig, d_model: int, ffn_hidden: int) -> tuple[int, int]:
    """(total, active) parameters of one MoE FFN: routed experts, shared experts, router."""
    expert = _swiglu_params(d_model, moe.expert_hidden or ffn_hidden)
    shared = moe.num_shared_experts * _swiglu_params(
        d_model, moe.shared_expert_hidden or moe.expert_hidden or ffn_hidden
    )
    router = d_model * moe.num_experts + (d_model if moe.shared_expert_gate else 0)
    return moe.num_experts * expert + shared + router, moe.top_k * expert + shared + router


def count_params(cfg) -> ParamCounts:
    """Total and active parameter counts; equals `sum(p.numel())` of the built model."""
    norms = 2 * cfg.d_model
    total = active = 0
    for layer in range(cfg.n_layers):
        base = _attention_params(cfg) + norms
        if cfg.moe is not None and cfg.moe.is_moe_layer(layer):
            ffn_total, ffn_active = moe_ffn_params(cfg.moe, cfg.d_model, cfg.ffn_hidden)
        else:
            ffn_total = ffn_active = _swiglu_params(cfg.d_model, cfg.ffn_hidden)
        total += base + ffn_total
        active += base + ffn_active
    embedding = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embedding
    final_norm = cfg.d_model
    total += embedding + head + final_norm
    active += embedding + head + final_norm
    return ParamCounts(total=total, active=active, embedding=embedding)


def flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per token, 6·N + 12·L·D·T (see module docstring)."""
    counts = count_params(cfg)
    matmul_params = counts.active_non_embedding + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * seq_len


def dense_equivalent(cfg):
    """The dense twin of an MoE config: same width, depth, attention and vocabulary, every layer a
    dense SwiGLU whose hidden size makes active parameters per token match the MoE model."""
    if cfg.moe is None:
        raise UserValueError("model.moe is null: the config is already dense")
    ffn_active = 0
    for layer in range(cfg.n_layers):
        if cfg.moe.is_moe_layer(layer):
            ffn_active += moe_ffn_params(cfg.moe, cfg.d_model, cfg.ffn_hidden)[1]
        else:
            ffn_active += _swiglu_params(cfg.d_model, cfg.ffn_hidden)
    hidden = round(ffn_active / (3 * cfg.d_model * cfg.n_layers))
    return dataclasses.replace(cfg, moe=None, ffn_hidden=hidden)
