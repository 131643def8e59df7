"""Sparse upcycling: an MoE copied from a dense FFN computes the dense FFN."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfm.moe import MoEConfig, MoELayer
from mmfm.moe.upcycle import upcycle_from_dense


class _Dense(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def test_upcycled_layer_equals_dense_ffn():
    torch.manual_seed(0)
    dense = _Dense(8, 16)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2), 8, 16, init_std=0.5)
    upcycle_from_dense(layer, dense)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x)[0], dense(x))


def test_upcycle_noise_and_shape_check():
    torch.manual_seed(0)
    dense = _Dense(8, 16)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2), 8, 16)
    upcycle_from_dense(layer, dense, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(layer.experts.w1[0], layer.experts.w1[1])
    torch.testing.assert_close(layer.experts.w1[0], dense.w1.weight.T, atol=0.05, rtol=0)
    small = MoELayer(MoEConfig(num_experts=4, top_k=2, expert_hidden=4), 8, 16)
    with pytest.raises(ValueError, match="model.moe.expert_hidden"):
        upcycle_from_dense(small, dense)
