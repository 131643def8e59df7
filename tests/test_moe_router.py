"""Router selection and gate weights against direct computations."""

import pytest
import torch

from mmfm.moe import MoEConfig, Router


def _router(**kw) -> Router:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, **kw})
    cfg.validate()
    router = Router(cfg, d_model=6)
    router.reset_parameters(init_std=1.0)
    return router


def _logits(router: Router, x: torch.Tensor) -> torch.Tensor:
    return x @ router.weight.T


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(renormalize):
    router = _router(renormalize=renormalize)
    x = torch.randn(10, 6)
    out = router(x)
    probs = _logits(router, x).softmax(-1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(out.topk_idx_TK, top.indices)
    expected = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    torch.testing.assert_close(out.topk_weight_TK, expected)
    torch.testing.assert_close(out.probs_TE, probs)


def test_sigmoid_weights_normalized_over_k():
    router = _router(score_func="sigmoid", top_k=3)
    x = torch.randn(10, 6)
    out = router(x)
    s = _logits(router, x).sigmoid()
    top = s.topk(3, dim=-1)
    torch.testing.assert_close(out.topk_idx_TK, top.indices)
    torch.testing.assert_close(out.topk_weight_TK, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.probs_TE, s / s.sum(-1, keepdim=True))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_matches_direct_loop(score_func):
    G, top_groups, K = 4, 2, 3
    router = _router(score_func=score_func, top_k=K, num_groups=G, topk_groups=top_groups)
    x = torch.randn(16, 6)
    out = router(x)
    s = _logits(router, x)
    s = s.softmax(-1) if score_func == "softmax" else s.sigmoid()
    per = 8 // G
    for t in range(16):
        group_scores = [sorted(s[t, g * per:(g + 1) * per].tolist())[-2:] for g in range(G)]
        best = sorted(range(G), key=lambda g: -sum(group_scores[g]))[:top_groups]
        allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -s[t, e].item())[:K]
        assert sorted(out.topk_idx_TK[t].tolist()) == sorted(chosen)
        w = s[t, out.topk_idx_TK[t]]
        torch.testing.assert_close(out.topk_weight_TK[t], w / w.sum())


def test_bias_changes_selection_not_weights():
    router = _router(renormalize=False)
    x = torch.randn(12, 6)
    router.expert_bias[5] = 10.0  # expert 5 wins every token's selection...
    out = router(x)
    assert (out.topk_idx_TK == 5).any(dim=-1).all()
    probs = _logits(router, x).softmax(-1)
    # ... but its gate weight is its unbiased probability.
    torch.testing.assert_close(out.topk_weight_TK, probs.gather(1, out.topk_idx_TK))
    torch.testing.assert_close(out.scores_TE, probs)


def test_force_uniform_round_robin():
    router = _router(force_uniform=True, top_k=3)
    out = router(torch.randn(8, 6))
    expected = (torch.arange(24) % 8).view(8, 3)
    torch.testing.assert_close(out.topk_idx_TK, expected)
    assert torch.bincount(out.topk_idx_TK.flatten(), minlength=8).tolist() == [3] * 8


def test_router_runs_in_fp32_for_bf16_input():
    router = _router().to(torch.bfloat16)
    out = router(torch.randn(4, 6, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == out.topk_weight_TK.dtype == torch.float32
    assert router.expert_bias.dtype == torch.float32


def test_jitter_only_in_training():
    router = _router(router_jitter=0.5)
    x = torch.randn(5, 6)
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, _logits(router, x))
    router.train()
    assert not torch.allclose(router(x).logits_TE, _logits(router, x))
