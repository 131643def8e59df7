"""Multimodal training through the generic Trainer on real media: the loss falls, the
per-modality breakdown is reported, a resumed run repeats the uninterrupted one, and the
config rules name their fields."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from test_mm_common import mm_shards, photo_items, speech_items  # noqa: F401 (fixtures)

from mmfm.config import ConfigError, load_config
from mmfm.train import Trainer
from mmfm.train.task import build_task


def mm_config(mm_shards, text_data, run_dir, **extra):  # noqa: F811
    values = {
        "run.out_dir": str(run_dir), "run.name": "mm",
        "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.ffn_hidden": 128, "model.max_seq_len": 64,
        "model.moe.num_experts": 4, "model.moe.top_k": 1, "model.moe.expert_hidden": 64,
        "data.tokenizer": str(text_data["tokenizer"]), "data.seq_len": 64, "data.num_workers": 0,
        "train.micro_batch_size": 4, "train.steps": 30, "train.warmup_steps": 3,
        "train.eval_every": 30, "train.eval_batches": 2, "train.ckpt_every": 30,
        "train.log_every": 5, "train.precision": "fp32", "metrics.console": False,
        "data.kind": "multimodal", "multimodal.moe_routing": "modality",
        "multimodal.shuffle_buffer": 4,
        "multimodal.modality_experts": "{text: 2, image: 1, audio: 1}",
        "multimodal.image.width": 32, "multimodal.image.layers": 1, "multimodal.image.heads": 2,
        "multimodal.image.image_size": 32, "multimodal.image.patch_size": 16,
        "multimodal.audio.width": 32, "multimodal.audio.layers": 1, "multimodal.audio.heads": 2,
        "multimodal.audio.n_mels": 40, "multimodal.audio.max_seconds": 4.0,
    }
    for name in ("photos", "speech"):
        values[f"multimodal.sources.{name}.train"] = str(mm_shards / name / "train")
        values[f"multimodal.sources.{name}.val"] = str(mm_shards / name / "val")
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.slow
def test_multimodal_loss_falls_on_real_media(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path)
    assert cfg.multimodal.moe_routing == "modality"
    result = Trainer(cfg).fit()
    losses = list(result.train_losses.values())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert result.val_loss is not None and result.val_loss < losses[0]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    train = [r for r in records if "train/loss" in r][-1]
    assert "moe/layer_00/image/tokens_per_expert" in train  # load broken down by modality
    assert "moe/layer_00/audio/tokens_per_expert" in train


def test_loss_breakdown_by_target_group(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path, **{"multimodal.moe_routing": "shared"})
    task = build_task(cfg)
    model = task.build_model()
    batch = next(task.train_loader())
    out = task.loss(model, batch)
    m = out.metrics
    assert {"loss/image", "media/image_items", "media/audio_items"} <= set(m)
    assert m["media/audio_items"] == 0 or "loss/audio" in m  # transcripts follow their audio
    weighted = sum(m[f"loss/{g}"] * m[f"targets/{g}"] for g in ("text", "image", "audio")
                   if f"loss/{g}" in m)
    assert weighted / out.num_targets == pytest.approx(out.lm_loss.item(), rel=1e-5)
    assert model.train_step == 1 and int(model.micro_batches) == 1  # grad_accum=1


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(mm_shards, text_data, tmp_path):  # noqa: F811
    extra = {"train.steps": 6, "train.ckpt_every": 3, "train.eval_every": 6,
             "multimodal.image.train_mode": "unfreeze_after",
             "multimodal.image.unfreeze_after_steps": 4}
    full = Trainer(mm_config(mm_shards, text_data, tmp_path / "full", **extra)).fit()
    cfg = mm_config(mm_shards, text_data, tmp_path / "split", **extra)
    Trainer(cfg).fit(stop_after=3)
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 3 and resumed.model.train_step == 3
    rest = resumed.fit()
    for step in (4, 5, 6):
        assert rest.train_losses[step] == pytest.approx(full.train_losses[step], rel=1e-5, abs=1e-6)
    assert torch.isfinite(torch.tensor(rest.val_loss))


def test_config_rules_name_their_fields(mm_shards, text_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"multimodal.modality_experts=.* hold 5 experts but "
                                          r"model.moe.num_experts=4"):
        mm_config(mm_shards, text_data, tmp_path,
                  **{"multimodal.modality_experts": "{text: 3, image: 1, audio: 1}"})
    with pytest.raises(ConfigError, match="multimodal.audio.subsample=3 must be a power of 2"):
        mm_config(mm_shards, text_data, tmp_path, **{"multimodal.audio.subsample": 3})
    with pytest.raises(ConfigError, match="multimodal.sources.photos.weight=0.0 must be > 0"):
        mm_config(mm_shards, text_data, tmp_path, **{"multimodal.sources.photos.weight": 0.0})
    with pytest.raises(ConfigError, match="data.kind=multimodal needs a multimodal"):
        load_config(None, ["data.kind=multimodal"])
    with pytest.raises(ConfigError, match="multimodal.image.kind='whisper' encodes audio"):
        mm_config(mm_shards, text_data, tmp_path, **{"multimodal.image.kind": "whisper"})


def test_tiny_preset_loads():
    cfg = load_config(ROOT / "configs" / "mm_moe_tiny.yaml")
    assert cfg.data.kind == "multimodal" and set(cfg.multimodal.sources) == {
        "images", "speech", "spoken_stamps"}
    assert sum(cfg.multimodal.modality_experts.values()) == cfg.model.moe.num_experts
