"""Balance losses: closed-form values under uniform routing, direct formulas, and parity with
Hugging Face transformers' Mixtral `load_balancing_loss_func`."""

import math

import pytest
import torch

from mmfm.moe import (
    MoEConfig,
    MoELayer,
    round_robin_topk,
    router_z_loss,
    sequence_balance_loss,
    switch_load_balancing_loss,
)

E, K = 4, 2


def test_switch_loss_equals_coef_under_uniform_routing():
    T = 8
    probs = torch.full((T, E), 1.0 / E)
    idx = round_robin_topk(T, K, E, probs.device)
    assert switch_load_balancing_loss(probs, idx, E, coef=0.01).item() == pytest.approx(0.01)


def test_switch_loss_direct_formula_and_gradient_through_probs_only():
    torch.manual_seed(0)
    T = 10
    logits = torch.randn(T, E, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(K, dim=-1).indices
    loss = switch_load_balancing_loss(probs, idx, E, coef=0.5)
    f = torch.stack([(idx == i).sum() for i in range(E)]).float() / (T * K)
    P = probs.mean(0)
    assert loss.item() == pytest.approx(0.5 * E * float((f * P).sum().detach()), rel=1e-6)
    (grad_probs,) = torch.autograd.grad(loss, probs)
    torch.testing.assert_close(grad_probs, (0.5 * E * f / T).expand(T, E))


def test_z_loss_of_zero_logits():
    coef = 0.001
    loss = router_z_loss(torch.zeros(7, E), coef=coef)
    assert loss.item() == pytest.approx(coef * math.log(E) ** 2, rel=1e-6)


def test_sequence_balance_loss_uniform_and_direct():
    B, S = 3, 4  # S*K divisible by E: round robin is uniform inside every sequence
    probs = torch.full((B * S, E), 1.0 / E)
    idx = round_robin_topk(B * S, K, E, probs.device)
    assert sequence_balance_loss(probs, idx, B, coef=1e-4).item() == pytest.approx(1e-4)

    torch.manual_seed(1)
    scores = torch.rand(B * S, E)  # e.g. sigmoid affinities, not normalized
    idx = scores.topk(K, dim=-1).indices
    expected = 0.0
    for b in range(B):
        s = scores[b * S:(b + 1) * S]
        s = s / s.sum(-1, keepdim=True)
        sel = idx[b * S:(b + 1) * S]
        f = torch.stack([(sel == i).sum() for i in range(E)]).float() * E / (K * S)
        expected += float((f * s.mean(0)).sum()) / B
    assert sequence_balance_loss(scores, idx, B).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_matches_transformers_mixtral(top_k):
    """transformers' loss sums per-slot fractions count/T over the K slots, so it is K times
    ours at coef=1: ours(coef=c) == c * hf / K (one layer; for several layers HF pools the
    counts and probabilities of all layers before multiplying, which is not a per-layer mean)."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(2)
    T, n_exp, coef = 24, 6, 0.02
    logits = torch.randn(T, n_exp)
    hf = mixtral.load_balancing_loss_func((logits,), num_experts=n_exp, top_k=top_k)
    probs = logits.softmax(-1)
    ours = switch_load_balancing_loss(probs, probs.topk(top_k, -1).indices, n_exp, coef=coef)
    assert ours.item() == pytest.approx(coef * hf.item() / top_k, rel=1e-5)


def test_layer_aux_loss_matches_transformers_on_its_router_logits():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=E, top_k=K, aux_loss_coef=0.01, z_loss_coef=0.0)
    layer = MoELayer(cfg, d_model=8, default_expert_hidden=16, init_std=0.5)
    x = torch.randn(2, 5, 8)
    _, aux = layer(x)
    logits = x.reshape(-1, 8) @ layer.router.weight.T
    hf = mixtral.load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    assert aux.item() == pytest.approx(0.01 * hf.item() / K, rel=1e-5)
