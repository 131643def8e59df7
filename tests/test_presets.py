"""The published-recipe presets (configs/*_moe_tiny.yaml) and their dense twins: each builds,
its twin matches its active parameters, its transformers export picks the documented class (or
is refused naming the field), and each trains a few fp32 steps on the fixture corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmfm.config import load_config
from mmfm.convert.hf import to_hf_config
from mmfm.model.counting import count_params, dense_equivalent
from mmfm.train import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# recipe -> transformers model_type its export uses, or the field that refuses it.
RECIPES = {"switch": "capacity_factor", "mixtral": "mixtral", "olmoe": "olmoe",
           "deepseek_v3": "glm4_moe"}


def _load(name: str, overrides=()):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dense_twin_matches_active_parameters(recipe):
    moe, twin = _load(f"{recipe}_moe_tiny").model, _load(f"{recipe}_dense_tiny").model
    assert twin.moe is None and twin.ffn_hidden == dense_equivalent(moe).ffn_hidden
    ratio = count_params(twin).active / count_params(moe).active
    assert abs(ratio - 1) < 0.002
    assert count_params(moe).total > count_params(twin).total


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_export_class_or_refusal(recipe):
    cfg = _load(f"{recipe}_moe_tiny").model
    expected = RECIPES[recipe]
    if expected == "capacity_factor":
        with pytest.raises(ValueError, match=r"model\.moe\.capacity_factor="):
            to_hf_config(cfg)
    else:
        assert to_hf_config(cfg).model_type == expected


def _shrink(data: dict[str, Path], run_dir: Path, name: str) -> list[str]:
    """Narrow the model and run 2 fp32 steps on the fixture data; the routing shape (experts,
    top-k, groups, shared, dense layers) stays as the preset has it."""
    values = {
        "run.out_dir": str(run_dir), "run.name": name,
        "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.max_seq_len": 64,
        "data.train_shards": str(data["train"]), "data.val_shards": str(data["val"]),
        "data.tokenizer": str(data["tokenizer"]), "data.seq_len": 64,
        "train.micro_batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
        "train.eval_every": 2, "train.eval_batches": 1, "train.ckpt_every": 2,
        "train.log_every": 1, "train.precision": "fp32", "metrics.console": False,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("name", [f"{r}_{kind}_tiny" for r in RECIPES for kind in ("moe", "dense")])
def test_preset_trains(name, text_data, tmp_path, capsys):
    cfg = _load(name, _shrink(text_data, tmp_path, name))
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.final_step == 2 and all(math.isfinite(x) for x in result.train_losses.values())
    assert math.isfinite(result.val_loss)
    if cfg.model.moe is not None and cfg.model.moe.bias_update_rate > 0:
        # aux-loss-free balancing ran: the selection bias moved off zero
        assert any(bool(layer.router.expert_bias.any()) for _, layer in trainer.model.moe_layers())
    if name.endswith("_moe_tiny"):
        _export_and_reimport(name, tmp_path / name, tmp_path, trainer.model, capsys)


def _export_and_reimport(name: str, run_dir: Path, tmp_path: Path, trained, capsys) -> None:
    """`mmfm export hf` on the trained run: the class the recipe maps to, equal logits through
    transformers and back through `mmfm import hf`; or one error line naming the field."""
    import torch

    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from mmfm.cli import main
    from mmfm.convert.cli import load_model_dir

    code = main(["export", "hf", str(run_dir), str(tmp_path / "hf"), "--no-tokenizer"])
    if RECIPES[name.removesuffix("_moe_tiny")] == "capacity_factor":
        assert code == 2
        assert "model.moe.capacity_factor=1.25 cannot be exported" in capsys.readouterr().err
        return
    assert code == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                              trust_remote_code=False).eval()
    assert hf.config.model_type == RECIPES[name.removesuffix("_moe_tiny")]
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, back = load_model_dir(tmp_path / "back")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        ref = trained(ids).logits
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.eval()(ids).logits, ref, rtol=1e-5, atol=1e-5)
