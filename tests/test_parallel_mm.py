"""The multimodal model (decoder + encoders, modality-aware MoE) trains data-parallel under
FSDP2 on 2 processes: losses are finite, rank 0 logs the per-modality load, and context
parallelism is refused for it with a message naming the field, while tensor, expert and
pipeline parallelism pass validation (their parity: tests/test_parallel_mm_parity.py)."""

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


def _fit_and_load(cfg) -> dict:
    """Train, then (rank 0, after every rank finished) read the checkpoint on one process."""
    import torch.distributed as dist

    from mmfm.train.checkpoint import load_model_from_checkpoint
    from mmfm.train.trainer import Trainer

    result = Trainer(cfg).fit()
    if dist.get_rank() != 0:
        return {}
    _, model = load_model_from_checkpoint(cfg.run.dir)
    return {"losses": result.train_losses, "val_loss": result.val_loss,
            "params": sorted(name for name, _ in model.named_parameters())}


@pytest.mark.distributed
def test_multimodal_trains_pipeline_parallel(mm_shards, text_data, tmp_path):  # noqa: F811
    """The real multimodal task through a 2-stage 1F1B pipeline: the step cuts the loader's
    micro-batch (with its media) into the pipeline's two, rank 0 (stage 0) logs the per-group
    losses computed on the last stage, validation runs through the stages, and the checkpoint
    loads into the full model on one process."""
    cfg = mm_config(mm_shards, text_data, tmp_path, **{
        "train.steps": 2, "train.warmup_steps": 1, "train.eval_every": 2, "train.ckpt_every": 2,
        "train.log_every": 1, "train.micro_batch_size": 4, "parallel.pp": 2,
        "parallel.microbatches": 2})
    out = spawn(_fit_and_load, 2, (cfg,), timeout_s=240)[0]
    assert sorted(out["losses"]) == [1, 2] and out["val_loss"] is not None
    assert any(name.startswith("slots.image.encoder.") for name in out["params"])
    records = [json.loads(line) for line in (tmp_path / "mm" / "metrics.jsonl").open()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    groups = {k for r in train for k in r if k.startswith("train/loss/")}
    assert {"train/loss/image", "train/loss/audio"} <= groups, groups
    assert any("val/loss" in r for r in records)


def test_multimodal_refuses_model_parallel_layouts(mm_shards, text_data, tmp_path):  # noqa: F811
    import torch.distributed as dist

    from mmfm.config import ConfigError

    had_group = dist.is_initialized()
    # refused by config validation, before any process group
    with pytest.raises(ConfigError, match=r"parallel.cp=2: context parallelism is not "
                                          "implemented for data.kind='multimodal'"):
        mm_config(mm_shards, text_data, tmp_path, **{"parallel.cp": 2})
    with pytest.raises(ConfigError, match=r"parallel.engine=deepspeed does not train "
                                          "data.kind='multimodal'"):
        mm_config(mm_shards, text_data, tmp_path, **{"parallel.engine": "deepspeed"})
    even_groups = {"model.moe.num_experts": 8,
                   "multimodal.modality_experts": "{text: 4, image: 2, audio: 2}"}
    for field, extra in {"tp": {}, "ep": even_groups, "pp": {"parallel.microbatches": 2}}.items():
        cfg = mm_config(mm_shards, text_data, tmp_path, **{f"parallel.{field}": 2, **extra})
        assert getattr(cfg.parallel, field) == 2
    assert dist.is_initialized() == had_group
