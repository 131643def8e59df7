"""Sparse upcycling (Komatsuzaki et al. 2022; Megatron-Core `upcycling_utils`): start an MoE
layer from a trained dense SwiGLU FFN by copying it into every expert.

Shape legend: D model width, H hidden width (dense and expert hidden must be equal), L experts
held by this rank. Dense weights use nn.Linear layout: w1, w3: (H, D), w2: (D, H); experts store
the transposes stacked: w1, w3: (L, D, H), w2: (L, H, D).

With softmax scores renormalized over the top k (gate weights sum to 1) and no noise, the
upcycled layer computes exactly the dense FFN (plus shared experts, if any), whatever the router.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfm.errors import UserValueError


@torch.no_grad()
def upcycle_from_dense(layer: nn.Module, dense_ffn: nn.Module, noise_std: float = 0.0,
                       generator: torch.Generator | None = None) -> None:
    """Copy `dense_ffn` (with Linear w1, w3, w2) into every expert of `layer` (an MoELayer);
    `noise_std` > 0 adds N(0, noise_std) to each copy so experts can diverge."""
    experts = layer.experts
    dense = {"w1": dense_ffn.w1.weight.T, "w3": dense_ffn.w3.weight.T, "w2": dense_ffn.w2.weight.T}
    for name, w in dense.items():
        target: Tensor = getattr(experts, name)
        if target.shape[1:] != w.shape:
            raise UserValueError(
                f"cannot upcycle: expert {name} is {tuple(target.shape[1:])} but the dense FFN's "
                f"is {tuple(w.shape)}; set model.moe.expert_hidden to the dense ffn_hidden"
            )
        target.copy_(w.unsqueeze(0).expand_as(target))
        if noise_std > 0:
            noise = torch.randn(target.shape, generator=generator, dtype=torch.float32)
            target.add_((noise * noise_std).to(target.device, target.dtype))
