"""Parity against Hugging Face transformers, a reference no one here wrote.

A tiny random-init fp32 `MixtralForCausalLM` imported into mmfm must give the same logits and
the same load-balancing loss (transformers' own `load_balancing_loss_func`); mmfm models
exported with `export_hf` must load with `AutoModelForCausalLM.from_pretrained` offline and
give the same logits (Mixtral for MoE, Llama for dense).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from mmfm.config import ModelConfig  # noqa: E402
from mmfm.convert.hf import export_hf, from_hf_config, import_hf, to_hf_config  # noqa: E402
from mmfm.moe import MoEConfig, switch_load_balancing_loss  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
L, E, K, V = 2, 4, 2, 128


@pytest.fixture(scope="module")
def mixtral() -> MixtralForCausalLM:
    """Tiny fp32 Mixtral; a wide init so routing and logits are far from uniform."""
    cfg = MixtralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
        num_experts_per_tok=K, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        initializer_range=0.15, router_aux_loss_coef=0.02, output_router_logits=True,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(1))


def _moe_cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=64, n_layers=L, n_heads=4, n_kv_heads=2,
                       ffn_hidden=48, max_seq_len=64, rope_theta=20000.0, norm_eps=1e-6,
                       init_std=0.15,
                       moe=MoEConfig(**{"num_experts": E, "top_k": K, "expert_hidden": 32, **moe}))


def _router_outputs(model) -> list:
    """Forward hooks collecting each MoE layer's RouterOutput, in layer order."""
    outs: list = []
    for _, layer in model.moe_layers():
        layer.router.register_forward_hook(lambda _m, _i, out: outs.append(out))
    return outs


def test_import_mixtral_gives_equal_logits(mixtral, ids):
    cfg, model = import_hf(mixtral)
    assert (cfg.d_model, cfg.n_layers, cfg.moe.num_experts, cfg.moe.expert_hidden) == (64, L, E, 32)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (5000.0, 1e-6, False)
    with torch.no_grad():
        ref = mixtral(ids).logits
        ours = model(ids).logits
    assert ref.abs().max() > 1.0  # not a degenerate near-zero comparison
    torch.testing.assert_close(ours, ref, **TOL)


def test_load_balancing_loss_equals_transformers(mixtral, ids):
    """Per layer, transformers' loss is K x mmfm's Switch loss (counts / T vs / (T*K)); mmfm sums
    coef x loss over layers, so mmfm aux == coef * sum_l hf(layer l) / K when the z-loss is off
    (import sets z_loss_coef=0: Mixtral has none). transformers' own aux_loss pools all layers'
    logits into one loss; that equals K x mmfm's Switch loss on the layers' routing pooled."""
    cfg, model = import_hf(mixtral)
    assert cfg.moe.z_loss_coef == 0 and cfg.moe.seq_aux_loss_coef == 0
    assert cfg.moe.aux_loss_coef == pytest.approx(0.02 * K / L)
    routed = _router_outputs(model)
    with torch.no_grad():
        ref = mixtral(ids, output_router_logits=True)
        ours = model(ids)
    for r, hf_logits in zip(routed, ref.router_logits, strict=True):
        torch.testing.assert_close(r.logits_TE, hf_logits.float(), **TOL)
    per_layer = [load_balancing_loss_func((g,), E, K) for g in ref.router_logits]
    torch.testing.assert_close(ours.aux_loss, cfg.moe.aux_loss_coef * sum(per_layer) / K,
                               rtol=1e-6, atol=0)
    pooled = switch_load_balancing_loss(torch.cat([r.probs_TE for r in routed]),
                                        torch.cat([r.topk_idx_TK for r in routed]), E)
    torch.testing.assert_close(ref.aux_loss, K * pooled, rtol=1e-6, atol=0)


def test_export_mixtral_loads_with_from_pretrained(tmp_path, ids):
    cfg = _moe_cfg()
    cfg.tie_embeddings = True
    torch.manual_seed(2)
    model = cfg.build().eval()
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer_path=_tiny_tokenizer(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, **TOL)
    back_cfg, back = import_hf(out)
    assert back_cfg.moe.num_experts == E and back_cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, **TOL)


def test_exported_tokenizer_is_a_fast_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    out = export_hf(_moe_cfg().build(), _moe_cfg(), tmp_path / "hf",
                    tokenizer_path=_tiny_tokenizer(tmp_path))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.is_fast and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("hello world").input_ids) == "hello world"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id


def test_dense_llama_round_trip(tmp_path, ids):
    cfg = _moe_cfg()
    cfg.moe, cfg.tie_embeddings = None, False
    torch.manual_seed(3)
    model = cfg.build().eval()
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, cfg, tmp_path / "hf"),
                                              local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    back_cfg, back = import_hf(hf)
    assert back_cfg == cfg
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, ref, **TOL)
        torch.testing.assert_close(back(ids).logits, ref, **TOL)


def test_config_mapping():
    cfg = _moe_cfg(aux_loss_coef=0.01)
    cfg.n_layers = 4
    hf = to_hf_config(cfg)
    assert hf.head_dim == 16 and hf.rms_norm_eps == 1e-6 and hf.tie_word_embeddings is True
    assert hf.rope_parameters["rope_theta"] == 20000.0
    assert hf.router_aux_loss_coef == pytest.approx(0.01 * 4 / K)
    back = from_hf_config(hf)
    assert back.moe.aux_loss_coef == pytest.approx(0.01)
    assert (back.max_seq_len, back.n_kv_heads, back.moe.expert_hidden) == (64, 2, 32)


@pytest.mark.parametrize("field, value", [
    ("first_dense", 1),
    ("top_k", 1), ("renormalize", False), ("capacity_factor", 1.25),
    ("bias_update_rate", 1e-3), ("every", 2),
])
def test_export_refuses_what_mixtral_cannot_express(field, value):
    """Softmax routing with no shared experts and no QK-norm goes to Mixtral; sigmoid routing
    and shared experts go to other classes (tests/test_hf_families.py)."""
    with pytest.raises(ValueError, match=rf"model\.moe\.{field}="):
        to_hf_config(_moe_cfg(**{field: value}))


def test_export_refuses_trained_selection_bias(tmp_path):
    model = _moe_cfg().build()
    model.blocks[1].ffn.router.expert_bias[0] = 0.5
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.router\.expert_bias"):
        export_hf(model, _moe_cfg(), tmp_path / "hf")


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("mlp_bias", True),
                                          ("attention_bias", True)])
def test_import_refuses_what_mmfm_cannot_express(field, value):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=4, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        from_hf_config(hf)


def test_import_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        import_hf(tmp_path)


def _tiny_tokenizer(tmp_path):
    """A byte-level BPE tokenizer.json with mmfm's end-of-text and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"] * 4, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path
