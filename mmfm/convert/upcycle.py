"""Sparse upcycling: initialize an MoE decoder from a dense one (Komatsuzaki et al. 2022;
Megatron-Core's `upcycling_utils`).

Embeddings, attention, norms and the LM head are copied; in every MoE layer each expert gets a
copy of that layer's dense SwiGLU FFN, optionally plus independent Gaussian noise to break the
symmetry between experts (`mmfm.moe.upcycle.upcycle_from_dense` does the per-layer copy);
dense layers of the MoE config copy their FFN as is. The
router starts random (N(0, init_std), seeded), so with `noise_std=0` every expert computes the
same function and, when the chosen k gate weights sum to 1 (softmax or sigmoid scores with
`renormalize: true`), the upcycled model computes exactly what the dense model did.
"""

from __future__ import annotations

import torch

from mmfm.config import ModelConfig
from mmfm.errors import UserValueError
from mmfm.model import Decoder
from mmfm.moe.upcycle import upcycle_from_dense

_SHARED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "tie_embeddings", "qk_norm", "qkv_bias")  # the last two add attention weights


def check_upcyclable(dense_cfg: ModelConfig, moe_cfg: ModelConfig) -> None:
    """Raise ValueError naming the first field that makes `moe_cfg` not an upcycle of
    `dense_cfg` (shapes differ, expert width differs from the dense FFN width, ...)."""
    if dense_cfg.moe is not None:
        raise UserValueError("dense model: model.moe must be null (the source must be dense)")
    if moe_cfg.moe is None:
        raise UserValueError("model.moe is null: the upcycling target must be an MoE config")
    moe_cfg.validate()
    for name in _SHARED_FIELDS:
        mine, theirs = getattr(moe_cfg, name), getattr(dense_cfg, name)
        if mine != theirs:
            raise UserValueError(f"model.{name}={mine} differs from the dense model's {name}={theirs}")
    expert_hidden = moe_cfg.moe.expert_hidden or moe_cfg.ffn_hidden
    if expert_hidden != dense_cfg.ffn_hidden:
        raise UserValueError(
            f"model.moe.expert_hidden={expert_hidden} must equal the dense model's "
            f"ffn_hidden={dense_cfg.ffn_hidden} (each expert is a copy of the dense FFN)")
    has_dense_layers = any(not moe_cfg.moe.is_moe_layer(i) for i in range(moe_cfg.n_layers))
    if has_dense_layers and moe_cfg.ffn_hidden != dense_cfg.ffn_hidden:
        raise UserValueError(
            f"model.ffn_hidden={moe_cfg.ffn_hidden} must equal the dense model's "
            f"ffn_hidden={dense_cfg.ffn_hidden} (its dense layers copy the dense FFN)")
    if moe_cfg.moe.num_shared_experts:
        raise UserValueError(
            f"model.moe.num_shared_experts={moe_cfg.moe.num_shared_experts}: upcycling copies the "
            "dense FFN into routed experts only; set it to 0")


def _copy_non_moe_state(dense: Decoder, moe_model: Decoder) -> None:
    """Load everything but the MoE FFNs: embeddings, attention, norms, LM head, dense FFNs."""
    moe_ffns = tuple(f"blocks.{idx}.ffn." for idx, _ in moe_model.moe_layers())
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith(moe_ffns)}
    missing, unexpected = moe_model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(moe_ffns) for k in missing), missing


def upcycle_dense_to_moe(dense_model: Decoder, moe_model_cfg: ModelConfig,
                         noise_std: float = 0.0, seed: int = 0) -> Decoder:
    """An MoE `Decoder` for `moe_model_cfg` initialized from `dense_model` (see module doc).

    `seed` fixes the router init and the noise; `noise_std` is the standard deviation of the
    additive Gaussian noise on every expert weight (0: exact copies)."""
    if noise_std < 0:
        raise UserValueError(f"noise_std={noise_std} must be >= 0")
    check_upcyclable(dense_model.cfg, moe_model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe_model = Decoder(moe_model_cfg).to(dense_model.embed.weight.dtype)
    _copy_non_moe_state(dense_model, moe_model)
    gen = torch.Generator().manual_seed(seed + 1)
    for idx, layer in moe_model.moe_layers():
        upcycle_from_dense(layer, dense_model.blocks[idx].ffn, noise_std, generator=gen)
    return moe_model.train(dense_model.training)
