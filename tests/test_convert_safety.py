"""Hostile model directories and weights files (mmfm.convert.hf, mmfm.convert.weights): no
repository code runs, damaged or misfit weights are one line naming file and field."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file, save_model

from mmfm.cli import main
from mmfm.config import ModelConfig
from mmfm.convert.hf import export_hf, import_hf
from mmfm.convert.weights import WeightsError, check_fits, read_shapes
from mmfm.errors import MissingDependencyError, MmfmError
from mmfm.model import Decoder
from mmfm.moe import MoEConfig


def tiny_cfg(**kw) -> ModelConfig:
    args = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    return ModelConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "mixtral"
    cfg = tiny_cfg()
    export_hf(Decoder(cfg), cfg, out)
    return out


def plant_remote_code(hf_dir, tmp_path):
    """A copy of `hf_dir` whose config asks for repository code that would leave a marker."""
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in hf_dir.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran.txt"
    (evil / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('foreign code ran')\n"
        "from transformers import MixtralForCausalLM as EvilForCausalLM\n")
    (evil / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('foreign code ran')\n"
        "from transformers import MixtralConfig as EvilConfig\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (evil / "config.json").write_text(json.dumps(config))
    return evil, marker


def test_clean_directory_still_imports(hf_dir):
    cfg, _model = import_hf(hf_dir)
    assert cfg.moe.num_experts == 4


def test_auto_map_is_refused_by_name_and_no_code_runs(hf_dir, tmp_path, capsys):
    evil, marker = plant_remote_code(hf_dir, tmp_path)
    with pytest.raises(MmfmError, match=r"config.auto_map=.* never runs it"):
        import_hf(evil)
    assert main(["import", "hf", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "auto_map" in err and err.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_remote_code_is_off_even_when_transformers_is_asked_directly(hf_dir, tmp_path, monkeypatch):
    # Belt and braces: were the auto_map check bypassed, transformers itself must not run the
    # code because every call passes trust_remote_code=False (it then refuses, never prompts).
    import mmfm.convert.hf as hf

    evil, marker = plant_remote_code(hf_dir, tmp_path)
    monkeypatch.setattr(hf, "refuse_remote_code", lambda path: {})
    cfg, _model = import_hf(evil)  # built-in Mixtral classes, the auto_map ignored
    assert cfg.moe.num_experts == 4 and not marker.exists()
    config = json.loads((evil / "config.json").read_text())
    config["model_type"] = "evil"  # now only the repository's code could read it
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):  # transformers refuses instead of running (or prompting)
        import_hf(evil)
    assert not marker.exists()


def test_corrupt_safetensors_in_a_hf_directory_is_one_line(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # header length garbage
    with pytest.raises(WeightsError, match=r"model.safetensors: not a valid safetensors file") as info:
        import_hf(bad)
    assert "\n" not in str(info.value)


def test_config_json_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(MmfmError, match=r"config.json is not valid JSON"):
        import_hf(tmp_path)


def test_missing_transformers_is_a_missing_dependency(monkeypatch, tmp_path):
    cfg = tiny_cfg()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependencyError, match=r"needs the transformers package.*pip install"):
        export_hf(Decoder(cfg), cfg, tmp_path / "hf")


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:30], "invalid header length"),
    (lambda b: b[:-8], "incomplete metadata"),
    (lambda b: b[:8] + b"\xff\xfe" + b[10:], "invalid UTF-8"),
    (lambda b: b"", "header too small"),
])
def test_damaged_safetensors_header_names_the_file(tmp_path, damage, reason):
    good = tmp_path / "good.safetensors"
    save_file({"embed.weight": torch.zeros(8, 4)}, str(good))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    assert read_shapes(good) == {"embed.weight": (8, 4)}
    with pytest.raises(WeightsError) as info:
        read_shapes(bad)
    assert str(bad) in str(info.value) and reason in str(info.value)
    assert "\n" not in str(info.value)


def test_init_from_with_wrong_shapes_names_field_file_and_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(Decoder(tiny_cfg(vocab_size=256)), str(path))
    check_fits(path, Decoder(tiny_cfg(vocab_size=256)), "train.init_from")  # tied head: fine
    with pytest.raises(WeightsError) as info:
        check_fits(path, Decoder(tiny_cfg()), "train.init_from")
    message = str(info.value)
    assert message.startswith(f"train.init_from={path} does not fit this model: ")
    assert "embed.weight has shape [256, 64] in the file, [128, 64] in the model" in message
    assert "\n" not in message
    with pytest.raises(WeightsError, match=r"missing blocks.0.ffn.w1.weight.*unexpected "):
        check_fits(path, Decoder(tiny_cfg(vocab_size=256, moe=None)), "train.init_from")
