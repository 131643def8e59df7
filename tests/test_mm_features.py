"""Frozen-encoder feature caches (`mmfm data encode`): a cached run sees the same batches and
the same loss as one that runs the towers, and stale, partial or foreign caches are refused
with a one-line message naming the cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_mm_common import mm_shards, photo_items, speech_items  # noqa: F401 (fixtures)
from test_mm_train import mm_config

from mmfm.cli import main
from mmfm.config import save_config
from mmfm.data.mm_features import cache_dir, encode_config
from mmfm.encoders.features import FeatureCacheError
from mmfm.errors import UserValueError
from mmfm.train.multimodal import MultimodalTask

FROZEN = {"multimodal.image.train_mode": "frozen", "multimodal.audio.train_mode": "frozen",
          "train.micro_batch_size": 2, "train.eval_batches": 3}


@pytest.fixture
def shards(mm_shards, tmp_path):  # noqa: F811
    """A private copy of the shard sets: caches are written beside them."""
    return shutil.copytree(mm_shards, tmp_path / "shards")


def _task(shards, text_data, tmp_path, **extra) -> MultimodalTask:
    cfg = mm_config(shards, text_data, tmp_path / "run", **{**FROZEN, **extra})
    task = MultimodalTask(cfg)
    torch.manual_seed(cfg.run.seed)  # as the trainer and `mmfm data encode` do
    task.built_model = task.build_model()
    return task


def _eval_losses(task: MultimodalTask) -> list[tuple[float, dict[str, bool]]]:
    model = task.built_model.eval()
    out = []
    with torch.no_grad():
        for batch in task.eval_batches():
            loss = task.loss(model, batch).lm_loss
            out.append((float(loss), {m: v.fingerprint is not None for m, v in batch.media.items()}))
    return out


def test_cached_features_give_the_same_batches_and_loss(shards, text_data, tmp_path):
    rows = encode_config(mm_config(shards, text_data, tmp_path / "run", **FROZEN), batch_size=5)
    items = {m: sum(r["items"] for r in rows if r["modality"] == m) for m in ("image", "audio")}
    assert min(items.values()) > 0 and len(rows) == 8  # 2 modalities x 2 sets x train/val
    cached = _task(shards, text_data, tmp_path)
    online = _task(shards, text_data, tmp_path, **{"multimodal.feature_cache": False})
    got, want = _eval_losses(cached), _eval_losses(online)
    assert [flags for _, flags in got] == [{"image": True, "audio": True}] * len(got)
    assert [flags for _, flags in want] == [{"image": False, "audio": False}] * len(want)
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in want], rel=1e-5)
    # Training batches: same tokens, and the cached features equal the tower's output.
    b_cached = next(cached.train_loader())
    b_online = next(online.train_loader())
    assert torch.equal(b_cached.input_ids, b_online.input_ids)
    slot = online.slots["image"]
    with torch.no_grad():
        tower = slot.encoder(b_online.media["image"].data)
    assert torch.allclose(b_cached.media["image"].data, tower, atol=1e-5)


def _encode_cli(cfg, tmp_path) -> int:
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return main(["data", "encode", str(path), "--batch-size", "4"])


def test_stale_cache_is_refused(shards, text_data, tmp_path, capsys):
    assert _encode_cli(mm_config(shards, text_data, tmp_path / "run", **FROZEN), tmp_path) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 8 and all("items encoded" in line for line in printed)
    other_seed = _task(shards, text_data, tmp_path, **{"run.seed": 1})  # other tower weights
    with pytest.raises(FeatureCacheError, match=r"features/image: stale image feature cache, "
                                                r"made by encoder \w{12} but this run's"):
        other_seed.train_loader()
    other_pre = _task(shards, text_data, tmp_path, **{"multimodal.audio.max_seconds": 3.0})
    with pytest.raises(FeatureCacheError, match="stale audio feature cache"):
        other_pre.train_loader()


def test_model_refuses_features_of_another_encoder(shards, text_data, tmp_path):
    encode_config(mm_config(shards, text_data, tmp_path / "run", **FROZEN))
    batch = next(_task(shards, text_data, tmp_path).train_loader())
    other = _task(shards, text_data, tmp_path, **{"run.seed": 1})
    with pytest.raises(FeatureCacheError, match="the feature cache is stale"):
        other.loss(other.built_model, batch)


def test_partial_or_foreign_caches_are_refused(shards, text_data, tmp_path):
    encode_config(mm_config(shards, text_data, tmp_path / "run", **FROZEN))
    shutil.rmtree(cache_dir(shards / "speech" / "train", "image"))
    with pytest.raises(FeatureCacheError, match="speech/train/features/image has no image "
                                                "feature cache but other shard sets"):
        _task(shards, text_data, tmp_path).train_loader()
    index_path = cache_dir(shards / "photos" / "train", "audio") / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["bytes"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(FeatureCacheError, match="made for other shards"):
        _task(shards, text_data, tmp_path, **{"multimodal.image.train_mode": "trainable"}
              ).train_loader()


def test_encode_needs_a_frozen_encoder(shards, text_data, tmp_path, capsys):
    cfg = mm_config(shards, text_data, tmp_path / "run")
    with pytest.raises(UserValueError, match="no frozen encoder to cache: set "
                                             r"multimodal.<image\|audio>.train_mode=frozen"):
        encode_config(cfg)
    assert _encode_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no frozen encoder to cache") and err.count("\n") == 1
