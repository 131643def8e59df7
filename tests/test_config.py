"""Config loading, overrides and validation: every user error is one line naming the field."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.config import ConfigError, config_from_dict, load_config
from mmfm.errors import MissingDependencyError
from mmfm.model.counting import count_params, dense_equivalent

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "text_moe_tiny.yaml"


def test_all_presets_load_and_validate():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 3
    for preset in presets:
        load_config(preset)


def test_overrides_apply_with_types():
    cfg = load_config(TINY, ["train.steps=50", "model.moe.num_experts=4", "train.lr=1e-3"])
    assert cfg.train.steps == 50 and cfg.model.moe.num_experts == 4 and cfg.train.lr == 1e-3


def test_dense_override_with_null():
    cfg = load_config(TINY, ["model.moe=null"])
    assert cfg.model.moe is None


def test_dense_equivalent_preset_matches_moe_preset():
    moe = load_config(TINY).model
    dense = load_config(ROOT / "configs" / "text_dense_equiv_tiny.yaml").model
    assert dense.moe is None
    assert dense.ffn_hidden == dense_equivalent(moe).ffn_hidden
    assert abs(count_params(dense).active / count_params(moe).active - 1) < 0.01


def test_roundtrip_through_dict():
    cfg = load_config(TINY)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, fragment", [
    (["model.n_heads=6"], "model.d_model=256 is not divisible by model.n_heads=6"),
    (["model.n_kv_heads=3"], "model.n_heads=8 is not divisible by model.n_kv_heads=3"),
    (["model.moe.top_k=9"], "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
    (["model.moe.backend=cuda_magic"], "model.moe.backend='cuda_magic' is not one of"),
    (["model.moe.capacity_factor=0"], "model.moe.capacity_factor=0.0 must be > 0"),
    (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    (["train.precision=fp16"], "train.precision='fp16' is not one of auto, fp32, bf16, fp8"),
    (["train.device=tpu"], "train.device='tpu' is not one of auto, cpu, cuda"),
    (["train.device=cpu", "train.precision=fp8"], "train.precision=fp8 needs a GPU"),
    (["train.precision=fp8", "parallel.tp=2"], "train.precision=fp8 does not compose with "
                                                "parallel.tp=2"),
    (["model.attention=xformers"], "model.attention='xformers' is not one of sdpa, flash_attn"),
    (["train.warmup_steps=1000"], "train.warmup_steps=1000 must be in"),
    (["model.not_a_field=1"], "model.not_a_field"),
    (["train.steps=many"], "train.steps"),
    (["train.steps"], "is not of the form key.path=value"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, override)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  d_model: 3\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(unknown)


def test_cli_reports_one_line_and_exit_2(capsys):
    assert main(["info", str(TINY), "model.moe.top_k=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model.moe.top_k=9 exceeds model.moe.num_experts=8"


def test_cli_info_prints_counts_and_dense_equivalent(capsys):
    assert main(["info", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "active parameters" in out and "dense equivalent" in out and "6*N + 12*L*D*T" in out


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "mmfm.cli", "train", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--resume" in proc.stdout and "key.path=value" in proc.stdout


def test_embedded_defaults_are_the_tiny_preset():
    """`mmfm demo` trains the embedded defaults; the preset file must say the same thing."""
    defaults, preset = load_config(None), load_config(TINY)
    defaults.run.name = preset.run.name
    assert defaults == preset


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed here")
def test_flash_attn_without_the_package_names_it():
    with pytest.raises(MissingDependencyError) as info:
        load_config(TINY, ["model.attention=flash_attn", "train.precision=bf16"])
    assert "model.attention=flash_attn needs the flash-attn package" in str(info.value)
    assert "\n" not in str(info.value)


def test_flash_attn_refuses_fp32(monkeypatch):
    import mmfm.model.layers as layers

    monkeypatch.setattr(layers, "check_flash_attn_available", lambda path="model": None)
    with pytest.raises(ConfigError, match="flash_attn runs in bf16/fp16 only"):
        load_config(TINY, ["model.attention=flash_attn", "train.precision=fp32"])
