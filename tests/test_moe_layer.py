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
@pytest.mark.parametrize("extra", [
    {}, {"num_shared_experts": 2, "shared_expert_hidden": 8}, {"top_k": 1},
    {"score_func": "sigmoid", "num_groups": 2, "topk_groups": 1},
    {"renormalize": False, "expert_hidden": 4}, {"force_uniform": True},
])
def test_dropless_equals_dense_reference(backend, extra):
    layer = _layer(backend=backend, **extra)
    x = torch.randn(2, 5, 8)
    y, aux = layer(x)
    torch.testing.assert_close(y, _dense_reference(layer, x))
    assert aux.shape == () and aux.item() > 0


def test_aux_zero_when_coefs_zero():
    layer = _layer(aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    _, aux = layer(torch.randn(2, 3, 8))
    assert aux.item() == 0.0


def test_backends_equal_through_layer_forward_and_grads():
    x = torch.randn(3, 4, 8)
    results = []
    for backend in ("loop", "grouped_mm"):
        layer = _layer(backend=backend, seq_aux_loss_coef=0.1)
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y.square().sum() + aux).backward()
        grads = [p.grad for p in layer.parameters()]
        results.append((y, aux, xi.grad, grads))
    (y0, a0, gx0, g0), (y1, a1, gx1, g1) = results
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(gx0, gx1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_layer_runs_with_fp32_router_and_aux():
    layer = _layer().to(torch.bfloat16)
    y, aux = layer(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32


def test_load_full_state_dict_roundtrip():
    a, b = _layer(), _layer(num_shared_experts=0)
    torch.manual_seed(5)
    b.reset_parameters()
    b.load_full_state_dict(a.state_dict())
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(a(x)[0], b(x)[0])


@pytest.mark.slow
def test_torch_compile_matches_eager_and_counts_once():
    layer = _layer()
    x = torch.randn(2, 5, 8, requires_grad=True)
    y0, a0 = layer(x)
    y, a = torch.compile(layer, backend="aot_eager")(x)
    (y.sum() + a).backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(a, a0)
    assert layer.compute_metrics()["tokens_per_expert"][0].sum().item() == 2 * 10 * 2


def test_experts_run_in_the_autocast_dtype():
    """Under CPU bf16 autocast the experts compute in bf16 like the dense FFN, for every backend
    (grouped_mm is not on autocast's cast list, so the layer casts itself)."""
    from mmfm.moe.experts import Experts

    for backend in ("loop", "grouped_mm"):
        experts = Experts(2, 16, 32, backend)
        experts.reset_parameters(0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = experts(torch.randn(6, 16), torch.tensor([2, 4]))
        assert out.dtype == torch.bfloat16, backend
