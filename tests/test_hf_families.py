"""Every transformers family mmfm converts, against transformers itself (a reference no one here
wrote): tiny random fp32 models of each family imported into mmfm give the same logits; mmfm
models of each recipe exported with `export_hf` load with `AutoModelForCausalLM.from_pretrained`
offline as the expected class and give the same logits, and import back to the same config.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mmfm.config import ModelConfig  # noqa: E402
from mmfm.convert.hf import export_hf, import_hf, to_hf_config  # noqa: E402
from mmfm.model.rope import RopeScalingConfig  # noqa: E402
from mmfm.moe import MoEConfig  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
V = 96
BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=64,
            rms_norm_eps=1e-6, initializer_range=0.15, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
MOE = dict(num_experts_per_tok=2, output_router_logits=False)

# model_type -> extra config fields for a tiny random model of that family.
HF_FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mixtral": MOE | dict(num_local_experts=4),
    "olmoe": MOE | dict(num_experts=8, norm_topk_prob=False),
    "qwen2_moe": MOE | dict(num_experts=4, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, norm_topk_prob=False,
                            mlp_only_layers=[0]),
    "qwen3_moe": MOE | dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True,
                            decoder_sparse_step=2),
    "glm4_moe": MOE | dict(n_routed_experts=8, moe_intermediate_size=24, n_shared_experts=1,
                           first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                           num_mtp_layers=0,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 1.0}),
}


def _hf_model(model_type: str, **extra):
    cfg = AutoConfig.for_model(model_type, **(BASE | HF_FAMILIES[model_type] | extra))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False).eval()
    with torch.no_grad():  # HF inits norms to 1 and the selection bias to 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", list(HF_FAMILIES))
def test_import_gives_equal_logits(model_type, ids):
    hf = _hf_model(model_type)
    cfg, model = import_hf(hf)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
    assert ref.abs().max() > 1.0  # not a degenerate near-zero comparison
    torch.testing.assert_close(ours, ref, **TOL)


def test_import_reads_each_familys_features():
    cfgs = {t: import_hf(_hf_model(t))[0] for t in ("olmoe", "qwen2_moe", "qwen3_moe", "glm4_moe",
                                                    "qwen2", "qwen3")}
    assert cfgs["olmoe"].qk_norm == "full" and not cfgs["olmoe"].moe.renormalize
    assert cfgs["qwen3"].qk_norm == "head" and cfgs["qwen2"].qkv_bias
    q2 = cfgs["qwen2_moe"].moe
    assert (q2.shared_expert_gate, q2.shared_expert_hidden, q2.first_dense) == (True, 40, 1)
    q3 = cfgs["qwen3_moe"].moe
    assert (q3.first_dense, q3.every, q3.renormalize) == (1, 2, True)
    g = cfgs["glm4_moe"].moe
    assert (g.score_func, g.num_groups, g.topk_groups, g.first_dense) == ("sigmoid", 4, 2, 1)


def _cfg(qk_norm="none", qkv_bias=False, **moe) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                       ffn_hidden=48, max_seq_len=64, norm_eps=1e-6, init_std=0.15,
                       tie_embeddings=False, qk_norm=qk_norm, qkv_bias=qkv_bias,
                       moe=MoEConfig(**moe) if moe else None)


# The recipes mmfm trains (configs/*.yaml shapes, tiny) and the class each must export to.
RECIPES = {
    "mixtral": ("MixtralForCausalLM", _cfg(num_experts=8, top_k=2, expert_hidden=24)),
    "olmoe": ("OlmoeForCausalLM", _cfg("full", num_experts=16, top_k=4, expert_hidden=12,
                                       renormalize=False)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", _cfg(qkv_bias=True, num_experts=4, top_k=2,
                                              expert_hidden=24, num_shared_experts=1,
                                              shared_expert_hidden=32, shared_expert_gate=True,
                                              renormalize=False, first_dense=1)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _cfg("head", num_experts=4, top_k=2, expert_hidden=24,
                                              every=2, first_dense=1)),
    "deepseek_v3_style": ("Glm4MoeForCausalLM", _cfg(
        num_experts=8, top_k=2, expert_hidden=24, num_shared_experts=1, score_func="sigmoid",
        bias_update_rate=1e-3, first_dense=1, num_groups=4, topk_groups=2)),
    "dense_llama": ("LlamaForCausalLM", _cfg()),
    "dense_qwen2": ("Qwen2ForCausalLM", _cfg(qkv_bias=True)),
    "dense_qwen3": ("Qwen3ForCausalLM", _cfg("head")),
}


def _randomize_extras(model) -> None:
    """Norm weights, q/k/v biases and selection biases start at 1 or 0: perturb them so a
    wrong mapping would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "shared_gate" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for _, layer in model.moe_layers():
            layer.router.expert_bias.copy_(torch.randn_like(layer.router.expert_bias) * 0.05)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_export_loads_with_from_pretrained_and_round_trips(recipe, tmp_path, ids):
    cls_name, cfg = RECIPES[recipe]
    torch.manual_seed(2)
    model = cfg.build().eval()
    if cfg.moe is not None and cfg.moe.score_func == "sigmoid":
        _randomize_extras(model)  # a trained aux-loss-free bias travels to Glm4Moe
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith(".bias") or "shared_gate" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    out = export_hf(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                              trust_remote_code=False).eval()
    assert type(hf).__name__ == cls_name
    back_cfg, back = import_hf(out)
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, ref, **TOL)
        torch.testing.assert_close(back(ids).logits, ref, **TOL)
    _assert_same_shape_and_routing(back_cfg, cfg)


def _assert_same_shape_and_routing(back: ModelConfig, cfg: ModelConfig) -> None:
    """Import restores every field that shapes the forward pass (training-only loss
    coefficients may differ: some classes have none)."""
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "qk_norm", "qkv_bias",
                 "max_seq_len", "rope_theta"):
        assert getattr(back, name) == getattr(cfg, name), name
    if cfg.moe is None:
        assert back.moe is None and back.ffn_hidden == cfg.ffn_hidden
        return
    for name in ("num_experts", "top_k", "expert_hidden", "num_shared_experts", "score_func",
                 "renormalize", "num_groups", "topk_groups", "shared_expert_gate"):
        assert getattr(back.moe, name) == getattr(cfg.moe, name), name
    for i in range(cfg.n_layers):
        assert back.moe.is_moe_layer(i) == cfg.moe.is_moe_layer(i)


@pytest.mark.parametrize("kind, extra", [
    ("linear", {}), ("dynamic", {}), ("yarn", dict(beta_fast=16.0)),
    ("llama3", dict(low_freq_factor=1.0, high_freq_factor=2.0)),
])
def test_rope_scaling_round_trips_through_llama_and_qwen3(kind, extra, tmp_path):
    """Scaled RoPE at a length past the original one, where the scaling matters."""
    ids = torch.randint(0, V, (1, 60), generator=torch.Generator().manual_seed(3))
    for qk in ("none", "head"):
        cfg = _cfg(qk)
        cfg.rope_scaling = RopeScalingConfig(type=kind, factor=4.0, original_max_seq_len=16,
                                             **extra)
        torch.manual_seed(4)
        model = cfg.build().eval()
        hf = AutoModelForCausalLM.from_pretrained(export_hf(model, cfg, tmp_path / f"{kind}{qk}"),
                                                  local_files_only=True).eval()
        back_cfg, back = import_hf(hf, max_seq_len=64)
        if kind == "linear":  # linear scaling has no original length to carry
            back_cfg.rope_scaling.original_max_seq_len = 16
        assert back_cfg.rope_scaling == cfg.rope_scaling
        with torch.no_grad():
            ref = model(ids).logits
            torch.testing.assert_close(hf(ids).logits, ref, **TOL)
            torch.testing.assert_close(back(ids).logits, ref, **TOL)


@pytest.mark.parametrize("cfg, field", [
    (_cfg(num_experts=4, top_k=2, capacity_factor=1.25), r"model\.moe\.capacity_factor="),
    (_cfg(num_experts=4, top_k=2, num_shared_experts=1), r"model\.moe\.shared_expert_gate="),
    (_cfg(num_experts=4, top_k=1), r"model\.moe\.top_k="),
    (_cfg("full", num_experts=4, top_k=2, every=2), r"model\.moe\.every="),
    (_cfg("full"), r"model\.qk_norm="),
    (_cfg("head", qkv_bias=True), r"model\.qk_norm="),  # Qwen2 (bias) has no QK-norm
    (_cfg(num_experts=4, top_k=2, bias_update_rate=1e-3), r"model\.moe\.bias_update_rate="),
    (_cfg(num_experts=8, top_k=2, score_func="sigmoid", num_shared_experts=1,
          shared_expert_hidden=40), r"model\.moe\.shared_expert_hidden="),
    (_cfg(num_experts=8, top_k=2, score_func="sigmoid", num_groups=8, topk_groups=2),
     r"model\.moe\.num_groups="),
    (_cfg(num_experts=8, top_k=2, score_func="sigmoid", every=2), r"model\.moe\.every="),
])
def test_export_refuses_what_no_class_holds(cfg, field):
    with pytest.raises(ValueError, match=field):
        to_hf_config(cfg)


@pytest.mark.parametrize("model_type, extra, field", [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    ("glm4_moe", dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                       "partial_rotary_factor": 0.5}), "rope_parameters"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("phi3", {}, "model_type"),
])
def test_import_refuses_what_mmfm_cannot_express(model_type, extra, field):
    from mmfm.convert.hf import from_hf_config

    base = HF_FAMILIES.get(model_type, {})
    hf_cfg = AutoConfig.for_model(model_type, **(BASE | base | extra))
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        from_hf_config(hf_cfg)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "linear", "factor": 2.0},
])
def test_import_of_rope_scaled_models_built_by_transformers(model_type, rope):
    """Models that transformers itself builds with scaled RoPE (not ours exported), read at a
    length past the original one."""
    max_pos = 16 if rope["rope_type"] == "dynamic" else 64
    hf = _hf_model(model_type, max_position_embeddings=max_pos,
                   rope_parameters={"rope_theta": 10000.0, **rope})
    ids = torch.randint(0, V, (1, 48), generator=torch.Generator().manual_seed(5))
    cfg, model = import_hf(hf, max_seq_len=64)
    assert cfg.rope_scaling.type == rope["rope_type"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, **TOL)
