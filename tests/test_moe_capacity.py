"""Capacity-factor mode drops exactly the assignments a direct computation drops."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.moe import MoEConfig, MoELayer, capacity_keep_mask, expert_capacity


def _direct_keep(idx, weight, capacity, policy):
    """Per expert, rank its assignments (by weight desc or by position) and keep the first C."""
    T, K = idx.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in idx.unique().tolist():
        slots = [(t, j) for t in range(T) for j in range(K) if idx[t, j] == e]
        if policy == "probs":
            slots.sort(key=lambda tj: -weight[tj].item())  # stable: ties keep position order
        for t, j in slots[:capacity]:
            keep[t, j] = True
    return keep


def test_expert_capacity():
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 1.25) == math.ceil(6.25)
    assert expert_capacity(1, 1, 64, 0.1) == 1


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_keep_mask_matches_direct(policy):
    torch.manual_seed(0)
    T, K, E = 20, 2, 4
    weight = torch.rand(T, K)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:12, 0] = 1  # overload expert 1
    keep = capacity_keep_mask(idx, weight, 4, E, policy)
    torch.testing.assert_close(keep, _direct_keep(idx, weight, 4, policy))


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_layer_capacity_output_and_dropped_fraction(policy):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5, drop_policy=policy,
                    backend="loop")
    layer = MoELayer(cfg, d_model=8, default_expert_hidden=16, init_std=0.3)
    x = torch.randn(2, 8, 8)
    y, _ = layer(x)
    x_TD = x.reshape(-1, 8)
    r = layer.router(x_TD)
    cap = expert_capacity(16, 2, 4, 0.5)
    keep = _direct_keep(r.topk_idx_TK, r.topk_weight_TK, cap, policy)
    ex = layer.experts
    ref = torch.zeros_like(x_TD)
    for t in range(16):
        for j in range(2):
            if keep[t, j]:
                e = int(r.topk_idx_TK[t, j])
                h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
                ref[t] += r.topk_weight_TK[t, j] * (h @ ex.w2[e])
    torch.testing.assert_close(y.reshape(-1, 8), ref)
    dropped, op = layer.compute_metrics()["dropped_fraction"]
    assert op == "mean"
    assert dropped.item() == pytest.approx((~keep).float().mean().item())
    assert dropped.item() > 0


def test_large_capacity_equals_dropless():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    outs = []
    for factor in (None, 4.0):
        torch.manual_seed(1)
        layer = MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=factor), 8, 16)
        outs.append(layer(x)[0])
    torch.testing.assert_close(outs[0], outs[1])
