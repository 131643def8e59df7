"""The fused LM head + cross entropy against torch's own `F.cross_entropy` on the logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

from mmfm.config import ModelConfig
from mmfm.model import Decoder
from mmfm.model.fused_loss import IGNORE_INDEX, fused_linear_cross_entropy
from mmfm.moe import MoEConfig


def _inputs(N: int = 150, D: int = 32, V: int = 500, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) * 0.3).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=gen)
    y[::7] = IGNORE_INDEX
    return h, w, y


def _reference(h, w, y):
    loss = F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE_INDEX)
    return (loss, *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("chunk_rows", [1, 16, 64, 1000])
def test_loss_and_gradients_equal_cross_entropy_fp32(chunk_rows):
    h, w, y = _inputs()
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    loss, rows = fused_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(loss, (h, w))
    N, D = h.shape
    V = w.shape[0]
    # Logits are D-term dot products; the loss sums V exponentials and then N rows; the head
    # gradient sums over V classes, the weight gradient over N rows.
    torch.testing.assert_close(loss, ref_loss, **tol(torch.float32, D + V + N, ref_loss.abs()))
    torch.testing.assert_close(gh, ref_gh, **tol(torch.float32, D + V, ref_gh.abs().max()))
    torch.testing.assert_close(gw, ref_gw, **tol(torch.float32, D + V + N, ref_gw.abs().max()))
    per_row = F.cross_entropy(F.linear(h, w), y, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(rows, per_row.detach(), **tol(torch.float32, D + V, per_row.max()))
    assert not rows.requires_grad


def test_bf16_autocast_matches_autocast_head_within_bf16_rounding():
    h, w, y = _inputs(N=300, D=64, V=1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_gh, ref_gw = _reference(h, w, y)
        loss, _ = fused_linear_cross_entropy(h, w, y, chunk_rows=64)
        gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    # bf16 keeps about 3 significant digits: compare against the gradients' scale.
    for got, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert (got - ref).abs().max() <= 0.01 * ref.abs().max()


def test_without_grad_gives_the_same_losses():
    h, w, y = _inputs()
    loss, rows = fused_linear_cross_entropy(h, w, y, chunk_rows=16)
    with torch.no_grad():
        loss_ng, rows_ng = fused_linear_cross_entropy(h, w, y, chunk_rows=16)
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows_ng, rows, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_still_gets_the_hidden_state_gradient():
    h, w, y = _inputs()
    _, ref_gh, _ = _reference(h, w, y)
    loss, _ = fused_linear_cross_entropy(h, w.detach(), y, chunk_rows=32)
    (gh,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-8)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    h, w, y = _inputs()
    y[:] = IGNORE_INDEX
    loss, rows = fused_linear_cross_entropy(h, w, y, chunk_rows=32)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and rows.abs().sum() == 0
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_a_target_whose_probability_underflows_still_gets_its_exact_loss():
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[200.0, 0.0], [-200.0, 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([1])  # logit -200 against +200: p underflows to 0 in fp32
    loss, _ = fused_linear_cross_entropy(h, w, y)
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss)
    gh, gw = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)


@pytest.mark.parametrize("tie", [True, False])
def test_decoder_fused_and_plain_losses_and_gradients_agree(tie):
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=16, tie_embeddings=tie, moe=moe)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    labels = ids[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX
    grads, losses = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = Decoder(dataclasses.replace(cfg, fused_loss=fused)).train()
        out = model(ids[:, :-1], labels_BT=labels)
        assert (out.logits is None) == fused
        (out.lm_loss + out.aux_loss).backward()
        losses.append((out.lm_loss.detach(), out.token_loss_BT))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # Only the head's reductions differ (chunked vs whole); the gradients then flow back
    # through both layers, whose widths add to the terms each gradient element sums.
    n = cfg.d_model + cfg.vocab_size + labels.numel() + cfg.n_layers * (cfg.d_model + cfg.ffn_hidden)
    torch.testing.assert_close(losses[0][0], losses[1][0], **tol(torch.float32, n, losses[1][0]))
    torch.testing.assert_close(losses[0][1], losses[1][1],
                               **tol(torch.float32, n, losses[1][1].max()))
    for name, grad in grads[0].items():
        ref = grads[1][name]
        torch.testing.assert_close(grad, ref, **tol(torch.float32, n, ref.abs().max()), msg=name)
