"""Expert backends agree with the reference loop (forward and gradients); backend errors."""

import importlib.util

import pytest
import torch

from mmfm.moe import BackendUnavailableError, Experts, MoEConfig, SharedExperts
from mmfm.moe.experts import grouped_mm_supported, swiglu_grouped_mm, swiglu_loop


def _weights(E=4, D=8, H=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g) * 0.3).to(dtype).requires_grad_()
            for shape in ((E, D, H), (E, D, H), (E, H, D))]


def _run(fn, x, ws, counts, grad_out):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    y = fn(x, *ws, counts)
    y.backward(grad_out)
    return y, x.grad, [w.grad for w in ws]


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [0, 0, 0, 0]])
def test_grouped_mm_equals_loop_fp32(counts):
    ws = _weights()
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8)
    g = torch.randn(int(counts.sum()), 8)
    y_ref, gx_ref, gw_ref = _run(swiglu_loop, x, ws, counts, g)
    y, gx, gw = _run(swiglu_grouped_mm, x, ws, counts, g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gw, gw_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_mm_bf16_close_to_loop():
    ws = _weights(dtype=torch.bfloat16)
    counts = torch.tensor([4, 1, 0, 3])
    x = torch.randn(8, 8, dtype=torch.bfloat16)
    g = torch.randn(8, 8, dtype=torch.bfloat16)
    y_ref, gx_ref, _ = _run(swiglu_loop, x, ws, counts, g)
    y, gx, _ = _run(swiglu_grouped_mm, x, ws, counts, g)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)


def test_grouped_mm_accepts_non_contiguous_gradient():
    ws = _weights()
    counts = torch.tensor([2, 2, 2, 2])
    x = torch.randn(8, 8, requires_grad=True)
    y = swiglu_grouped_mm(x, *ws, counts)
    (y.t() * torch.randn(8, 8)).sum().backward()  # upstream grad arrives transposed
    assert x.grad is not None and ws[2].grad is not None


def test_misaligned_dims_fall_back_to_loop():
    ws = _weights(D=6, H=10)  # 24- and 40-byte rows: not multiples of 16
    assert not grouped_mm_supported(torch.zeros(1, 6), *ws)
    counts = torch.tensor([1, 2, 0, 3])
    x = torch.randn(6, 6)
    torch.testing.assert_close(swiglu_grouped_mm(x, *ws, counts), swiglu_loop(x, *ws, counts))


def test_experts_module_init_like_dense_ffn():
    torch.manual_seed(0)
    experts = Experts(8, 64, 128, backend="loop")
    experts.reset_parameters(init_std=0.02, out_std=0.005)
    assert experts.w1.shape == (8, 64, 128) and experts.w2.shape == (8, 128, 64)
    assert experts.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.w3.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.w2.std().item() == pytest.approx(0.005, rel=0.05)
    shared = SharedExperts(64, 256)
    shared.reset_parameters(init_std=0.02)
    assert shared.w2.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.skipif(importlib.util.find_spec("megablocks") is not None,
                    reason="megablocks is installed")
def test_megablocks_absent_message():
    expected = "model.moe.backend=megablocks needs the megablocks package (CUDA only)"
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(backend="megablocks").validate()
    with pytest.raises(BackendUnavailableError, match="needs the megablocks package"):
        Experts(2, 8, 16, backend="megablocks")
