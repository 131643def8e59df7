"""The multimodal model (decoder + encoders, modality-aware MoE) trains data-parallel under
FSDP2 on 2 processes: losses are finite, rank 0 logs the per-modality load, and pipeline
parallelism is refused for it with a message naming the field."""

from __future__ import annotations

import json

import pytest
from test_mm_common import mm_shards, photo_items, speech_items  # noqa: F401 (fixtures)
from test_mm_train import mm_config

from mmfm.parallel.local import spawn


def _fit(cfg) -> dict:
    from mmfm.train.trainer import Trainer

    return Trainer(cfg).fit().train_losses


@pytest.mark.distributed
def test_multimodal_trains_data_parallel(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path, **{
        "train.steps": 2, "train.warmup_steps": 1, "train.eval_every": 2, "train.ckpt_every": 2,
        "train.log_every": 1, "train.micro_batch_size": 2, "parallel.engine": "fsdp"})
    losses = spawn(_fit, 2, (cfg,), timeout_s=240)
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2]
    records = [json.loads(line) for line in (tmp_path / "mm" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert any("moe/layer_00/image/tokens_per_expert" in r for r in records)


def test_multimodal_refuses_model_parallel_layouts(mm_shards, text_data, tmp_path):  # noqa: F811
    import torch.distributed as dist

    from mmfm.config import ConfigError

    had_group = dist.is_initialized()
    # refused by config validation, before any process group (tp and ep are supported)
    with pytest.raises(ConfigError, match=r"parallel.pp=2: pipeline parallelism is not "
                                          "implemented for data.kind='multimodal'"):
        mm_config(mm_shards, text_data, tmp_path, **{"parallel.pp": 2,
                                                     "parallel.microbatches": 2})
    assert dist.is_initialized() == had_group
