"""Model math against direct computations written independently of the model code."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.config import ModelConfig
from mmfm.model import Decoder
from mmfm.model.counting import count_params, dense_equivalent, flops_per_token
from mmfm.model.layers import Attention, RMSNorm, apply_rope, rope_cos_sin
from mmfm.moe.config import MoEConfig


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=24))
    base.update(kw)
    return ModelConfig(**base)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_matches_complex_rotation():
    """RoPE rotates each pair (i, i+Dh/2) by angle pos * theta^(-2i/Dh): check it as a complex
    multiplication, computed here without the model's tables."""
    T, Dh, theta = 7, 8, 10000.0
    x = torch.randn(1, 2, T, Dh)
    cos, sin = rope_cos_sin(T, Dh, theta)
    got = apply_rope(x, cos, sin)
    half = Dh // 2
    for pos in range(T):
        for i in range(half):
            angle = pos * theta ** (-2 * i / Dh)
            z = torch.complex(x[..., pos, i], x[..., pos, i + half]) * complex(math.cos(angle), math.sin(angle))
            torch.testing.assert_close(got[..., pos, i], z.real, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[..., pos, i + half], z.imag, atol=1e-5, rtol=1e-5)


def test_rope_relative_position_property():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    Dh = 16
    cos, sin = rope_cos_sin(32, Dh, 10000.0)
    q, k = torch.randn(Dh), torch.randn(Dh)

    def at(v, p):
        return apply_rope(v.view(1, 1, 1, Dh), cos[p:p + 1], sin[p:p + 1]).flatten()

    torch.testing.assert_close(at(q, 5) @ at(k, 2), at(q, 20) @ at(k, 17), atol=1e-4, rtol=1e-4)


def naive_attention(attn: Attention, x, cos, sin, mask=None):
    """Repeated-KV attention with an explicit softmax (what GQA must equal)."""
    B, T, _ = x.shape
    H, K, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = apply_rope(attn.wq(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(B, T, K, Dh).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(B, T, K, Dh).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.wo(out.transpose(1, 2).reshape(B, T, -1))


def test_gqa_equals_repeated_kv_attention():
    torch.manual_seed(0)
    attn = Attention(d_model=32, n_heads=8, n_kv_heads=2)
    x = torch.randn(2, 10, 32)
    cos, sin = rope_cos_sin(10, 4, 10000.0)
    torch.testing.assert_close(attn(x, cos, sin, None), naive_attention(attn, x, cos, sin),
                               atol=1e-5, rtol=1e-5)


def test_document_mask_blocks_cross_document_attention():
    torch.manual_seed(0)
    model = Decoder(tiny_cfg(moe=None)).eval()
    ids = torch.randint(0, 97, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    changed = ids.clone()
    changed[0, :5] = torch.randint(0, 97, (5,))
    a = model(ids, doc_ids).logits
    b = model(changed, doc_ids).logits
    torch.testing.assert_close(a[0, 5:], b[0, 5:])  # doc 1 does not see doc 0
    assert not torch.allclose(a[0, :5], b[0, :5])
    # Without the mask, doc 1 does see doc 0.
    assert not torch.allclose(model(ids).logits[0, 5:], model(changed).logits[0, 5:])


def test_causality():
    torch.manual_seed(0)
    model = Decoder(tiny_cfg()).eval()
    ids = torch.randint(0, 97, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    torch.testing.assert_close(model(ids).logits[:, :6], model(changed).logits[:, :6])


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, top_k=2, expert_hidden=24,
                                                 num_shared_experts=1, every=2, first_dense=0)])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_built_model(moe, tie):
    cfg = tiny_cfg(moe=moe, tie_embeddings=tie, n_layers=3)
    model = Decoder(cfg)
    numel = sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total == numel


def test_output_shapes_and_aux_loss():
    model = Decoder(tiny_cfg())
    out = model(torch.randint(0, 97, (3, 16)))
    assert out.logits.shape == (3, 16, 97)
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    dense = Decoder(tiny_cfg(moe=None))
    assert dense(torch.randint(0, 97, (3, 16))).aux_loss.item() == 0


def test_dense_equivalent_matches_active_params_within_one_percent():
    cfg = tiny_cfg(d_model=256, n_layers=4, ffn_hidden=512, vocab_size=8192,
                   moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=256, first_dense=1))
    twin = dense_equivalent(cfg)
    assert twin.moe is None and twin.d_model == cfg.d_model and twin.n_layers == cfg.n_layers
    ratio = count_params(twin).active / count_params(cfg).active
    assert abs(ratio - 1) < 0.01
    assert flops_per_token(twin, 256) == pytest.approx(flops_per_token(cfg, 256), rel=0.01)


def test_moe_active_params_fewer_than_total():
    counts = count_params(tiny_cfg())
    assert counts.active < counts.total


def test_flops_convention():
    cfg = tiny_cfg(moe=None)
    counts = count_params(cfg)
    expected = 6 * (counts.active - counts.embedding + 97 * 32) + 12 * 2 * 32 * 16
    assert flops_per_token(cfg, 16) == expected


def test_sequence_longer_than_max_raises():
    model = Decoder(tiny_cfg())
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gradients_reach_every_parameter():
    model = Decoder(dataclasses.replace(tiny_cfg(), tie_embeddings=False))
    ids = torch.randint(0, 97, (4, 16))
    out = model(ids)
    (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
