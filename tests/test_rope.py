"""RoPE scaling against transformers' own frequency functions (`ROPE_INIT_FUNCTIONS`), and the
model options' parameter counts against the built model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from mmfm.config import ConfigError, load_config  # noqa: E402
from mmfm.model.counting import count_params  # noqa: E402
from mmfm.model.rope import RopeScalingConfig, rope_cos_sin, rope_inv_freq  # noqa: E402

HEAD_DIM, THETA, T0 = 32, 10000.0, 128


def _hf(kind: str, params: dict, seq_len: int | None = None):
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=T0,
                      rope_parameters={"rope_type": kind, "rope_theta": THETA, **params})
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("scaling, params", [
    (RopeScalingConfig(type="linear", factor=4.0), {"factor": 4.0}),
    (RopeScalingConfig(type="yarn", factor=8.0, original_max_seq_len=T0),
     {"factor": 8.0, "original_max_position_embeddings": T0}),
    (RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=T0, beta_fast=16.0,
                       beta_slow=2.0, attention_factor=1.3, truncate=False),
     {"factor": 4.0, "original_max_position_embeddings": T0, "beta_fast": 16.0,
      "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False}),
    (RopeScalingConfig(type="llama3", factor=8.0, original_max_seq_len=T0, low_freq_factor=1.0,
                       high_freq_factor=4.0),
     {"factor": 8.0, "original_max_position_embeddings": T0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}),
])
def test_scaled_frequencies_equal_transformers(scaling, params):
    ours, ours_attention = rope_inv_freq(HEAD_DIM, THETA, scaling, seq_len=4 * T0)
    ref, ref_attention = _hf(scaling.type, params)
    assert not torch.allclose(ours, rope_inv_freq(HEAD_DIM, THETA, None, 4 * T0)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours_attention == pytest.approx(ref_attention)


@pytest.mark.parametrize("seq_len", [T0 // 2, T0, 3 * T0])
def test_dynamic_ntk_depends_on_length_like_transformers(seq_len):
    scaling = RopeScalingConfig(type="dynamic", factor=2.0, original_max_seq_len=T0)
    ours, _ = rope_inv_freq(HEAD_DIM, THETA, scaling, seq_len)
    ref, _ = _hf("dynamic", {"factor": 2.0}, seq_len=seq_len)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_yarn_scales_cos_and_sin_by_its_attention_factor():
    scaling = RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=T0)
    cos, sin = rope_cos_sin(8, HEAD_DIM, THETA, scaling)
    # position 0: angle 0, so cos is the attention factor 0.1 ln 4 + 1 everywhere.
    torch.testing.assert_close(cos[0], torch.full((HEAD_DIM,), 0.1 * torch.tensor(4.0).log().item()
                                                  + 1.0))
    assert sin[0].abs().max() == 0


def test_bad_rope_scaling_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.type='ntk'"):
        load_config(None, ["model.rope_scaling.type=ntk"])
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.factor=0\.5"):
        load_config(None, ["model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"])
    with pytest.raises(ConfigError, match=r"model\.qk_norm='both'"):
        load_config(None, ["model.qk_norm=both"])
    with pytest.raises(ConfigError, match=r"model\.moe\.shared_expert_gate"):
        load_config(None, ["model.moe.shared_expert_gate=true"])


@pytest.mark.parametrize("overrides", [
    ["model.qk_norm=head", "model.qkv_bias=true"],
    ["model.qk_norm=full", "model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true"],
])
def test_counts_include_the_new_options(overrides):
    cfg = load_config(None, overrides).model
    model = cfg.build()
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total > count_params(load_config(None).model).total
