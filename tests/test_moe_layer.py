"""MoELayer: shapes, aux loss, dropless output equal to a direct dense computation."""

import pytest
import torch
import torch.nn.functional as F

from mmfm.moe import MoEConfig, MoELayer


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
    return MoELayer(cfg, d_model=8, default_expert_hidden=16, init_std=0.2)


def _dense_reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """For each token: sum over chosen experts of gate * SwiGLU_e(x), plus shared experts."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    r = layer.router(x_TD)
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(layer.cfg.top_k):
            e = int(r.topk_idx_TK[t, j])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            out[t] += r.topk_weight_TK[t, j] * (h @ ex.w2[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out.view_as(x_BSD)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("shared", [0, 1])
def test_dropless_equals_dense_reference(backend, shared):
    layer = _layer(backend=backend, num_shared_experts=shared)
    x = torch.randn(2, 5, 8)
    y, aux = layer(x)
    torch.testing.assert_close(y, _dense_reference(layer, x))
    assert aux.shape == () and aux.item() > 0


def test_aux_zero_when_coefs_zero():
    layer = _layer(aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    _, aux = layer(torch.randn(2, 3, 8))
    assert aux.item() == 0.0
