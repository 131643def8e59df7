"""Sparse upcycling: with exact expert copies and gate weights summing to 1, the MoE model
computes what the dense model did, whatever the (random) router chooses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmfm.cli import main
from mmfm.config import ExperimentConfig, ModelConfig
from mmfm.convert.cli import load_model_dir, write_model_dir
from mmfm.convert.upcycle import upcycle_dense_to_moe
from mmfm.moe import MoEConfig

V = 96


def _dense_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=32, init_std=0.2, moe=None)


def _moe_cfg(**moe) -> ModelConfig:
    fields = {"num_experts": 4, "top_k": 2, "expert_hidden": 64, "backend": "loop", **moe}
    return dataclasses.replace(_dense_cfg(), moe=MoEConfig(**fields))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return _dense_cfg().build().eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("moe", [
    {},  # Mixtral-style: softmax, top-2 renormalized
    {"score_func": "sigmoid", "top_k": 3, "backend": "grouped_mm"},
    {"first_dense": 1, "every": 2, "num_experts": 8, "top_k": 4},
])
def test_upcycled_model_equals_dense(dense, ids, moe):
    model = upcycle_dense_to_moe(dense, _moe_cfg(**moe)).eval()
    with torch.no_grad():
        ref, out = dense(ids).logits, model(ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert out.aux_loss > 0  # routers are live, not a degenerate copy
    idx, layer = next(model.moe_layers())
    for name in ("w1", "w3"):  # every expert holds the dense FFN (transposed to (D, H))
        stacked = getattr(layer.experts, name)
        dense_w = getattr(dense.blocks[idx].ffn, name).weight.t()
        assert all(torch.equal(stacked[e], dense_w) for e in range(stacked.shape[0]))


def test_noise_breaks_symmetry_deterministically(dense, ids):
    a = upcycle_dense_to_moe(dense, _moe_cfg(), noise_std=1e-4, seed=5)
    b = upcycle_dense_to_moe(dense, _moe_cfg(), noise_std=1e-4, seed=5)
    w1 = a.blocks[0].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1])
    assert torch.equal(w1, b.blocks[0].ffn.experts.w1)
    assert torch.equal(a.blocks[0].ffn.router.weight, b.blocks[0].ffn.router.weight)
    with torch.no_grad():
        diff = (a.eval()(ids).logits - dense(ids).logits).abs().max()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("moe, cfg_change, field", [
    ({"expert_hidden": 32}, {}, r"model\.moe\.expert_hidden=32"),
    ({"num_shared_experts": 1}, {}, r"model\.moe\.num_shared_experts=1"),
    ({}, {"d_model": 64}, r"model\.d_model=64"),
    ({}, {"n_layers": 2}, r"model\.n_layers=2"),
    ({}, {"qk_norm": "head"}, r"model\.qk_norm=head"),
])
def test_bad_upcycle_targets_name_the_field(dense, moe, cfg_change, field):
    cfg = dataclasses.replace(_moe_cfg(**moe), **cfg_change)
    with pytest.raises(ValueError, match=field):
        upcycle_dense_to_moe(dense, cfg)


def test_source_must_be_dense():
    moe_model = _moe_cfg().build()
    with pytest.raises(ValueError, match=r"model\.moe must be null"):
        upcycle_dense_to_moe(moe_model, _moe_cfg())


def test_upcycle_and_export_commands(tmp_path, dense, ids):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    write_model_dir(tmp_path / "dense", ExperimentConfig(model=_dense_cfg()), dense)
    preset = tmp_path / "moe.yaml"
    preset.write_text("model:\n  vocab_size: 96\n  d_model: 32\n  n_layers: 3\n  n_heads: 4\n"
                      "  n_kv_heads: 2\n  ffn_hidden: 64\n  max_seq_len: 32\n"
                      "  moe: {num_experts: 4, top_k: 2, expert_hidden: 64}\n"
                      "data: {seq_len: 32}\n")
    assert main(["upcycle", str(tmp_path / "dense"), str(preset), str(tmp_path / "moe"),
                 "model.moe.num_experts=8"]) == 0
    cfg, moe_model = load_model_dir(tmp_path / "moe")
    assert cfg.model.moe.num_experts == 8
    assert main(["export", "hf", str(tmp_path / "moe"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, back = load_model_dir(tmp_path / "back")
    with torch.no_grad():
        ref = dense(ids).logits
        torch.testing.assert_close(moe_model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "hf", str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert "does not exist" in capsys.readouterr().err
