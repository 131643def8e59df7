"""End-to-end training on real text: loss falls, resume is exact, bad input is reported."""

import json

import pytest
import torch
from conftest import ROOT, tiny_config, tiny_overrides
from tolerances import tol

from mmfm.cli import main
from mmfm.train import CheckpointError, Trainer


@pytest.mark.slow
def test_loss_falls_and_outputs_are_written(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 40, "train.eval_every": 40,
                                              "train.lr": 0.01, "train.ckpt_every": 40})
    result = Trainer(cfg).fit()
    first = result.train_losses[1]
    last = sum(result.train_losses[s] for s in range(36, 41)) / 5
    # ln(512) = 6.24 at init; 40 steps on ~60 real documents reach about 5.3.
    assert last < first - 0.7, (first, last)
    assert result.val_loss is not None and result.val_loss < first
    run = tmp_path / "t"
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ("train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s", "perf/tflops",
                "val/loss", "moe/layer_00/tokens_per_expert", "moe/layer_01/load_imbalance"):
        assert key in keys, key
    counts = next(r["moe/layer_00/tokens_per_expert"] for r in records
                  if "moe/layer_00/tokens_per_expert" in r)
    # log_every=1: one step of 4x64 tokens, each routed to k=2 experts.
    assert sum(counts) == 4 * 64 * 2
    # Every record says how far the run is: tokens seen, cumulative FLOPs, wall/process time.
    train = [r for r in records if "train/loss" in r]
    assert [r["tokens"] for r in train] == [r["step"] * 4 * 64 for r in train]
    per_token = train[0]["flops"] / train[0]["tokens"]
    assert per_token > 0 and all(r["flops"] == r["tokens"] * per_token for r in train)
    walls = [r["time/wall_s"] for r in records]
    assert walls == sorted(walls) and all(r["time/process_s"] > 0 for r in records)


@pytest.mark.parametrize("precision, moe", [("fp32", True), ("bf16", False)])
def test_resume_matches_uninterrupted_run(text_data, tmp_path, precision, moe):
    extra = {"train.precision": precision, "train.grad_accum": 2}
    if not moe:
        extra["model.moe"] = "null"
    full = Trainer(tiny_config(text_data, tmp_path / "full", **extra)).fit()
    cfg = tiny_config(text_data, tmp_path / "split", **extra)
    first = Trainer(cfg).fit(stop_after=3)
    assert first.final_step == 3
    resumed = Trainer(cfg, resume=True).fit()
    assert resumed.final_step == 6
    for step in (4, 5, 6):
        assert resumed.train_losses[step] == full.train_losses[step], step
    full_state = Trainer(tiny_config(text_data, tmp_path / "full", **extra), resume=True).model.state_dict()
    split_state = Trainer(cfg, resume=True).model.state_dict()
    for name, value in full_state.items():
        torch.testing.assert_close(split_state[name], value, rtol=0, atol=0)


class _FixedBatches:
    """A loader stand-in that replays given batches (for comparing batch layouts)."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)

    def state_dict(self):
        return {}


def test_gradient_accumulation_equals_larger_batch(text_data, tmp_path):
    """Two micro-batches of 4 rows accumulate to the gradient of one batch of 8 rows.

    Compared before the optimizer step: AdamW divides each gradient by its own magnitude, so an
    element whose gradient nearly cancels amplifies a last-bit difference up to the learning
    rate (an AVX2 machine showed 3.2e-6 on 1 of 8192 weights after two steps). The gradients
    themselves differ only in summation order, within `tol` of the tokens summed per step."""
    from mmfm.data.loader import Batch

    common = {"train.steps": 1, "model.moe": "null", "train.ckpt_every": 10, "train.eval_every": 10}
    a = Trainer(tiny_config(text_data, tmp_path / "a", **common, **{"train.micro_batch_size": 4,
                                                                    "train.grad_accum": 2}))
    b = Trainer(tiny_config(text_data, tmp_path / "b", **common, **{"train.micro_batch_size": 8,
                                                                    "train.grad_accum": 1}))
    micro = [next(a.loader) for _ in range(2)]
    a.loader = _FixedBatches(micro)
    b.loader = _FixedBatches([
        Batch(*(torch.cat([getattr(x, f), getattr(y, f)]) for f in ("input_ids", "labels", "doc_ids")))
        for x, y in [micro]])
    grads = {}

    def keep_grads(name, model):
        def hook(optimizer, args, kwargs):  # runs before the optimizer step
            grads.setdefault(name, [p.grad.clone() for p in model.parameters()])
        return hook

    for name, trainer in (("a", a), ("b", b)):
        trainer.optimizer.register_step_pre_hook(keep_grads(name, trainer.model))
    ra, rb = a.fit(), b.fit()
    tokens = 8 * a.cfg.data.seq_len  # terms summed into each weight gradient
    assert ra.train_losses[1] == pytest.approx(rb.train_losses[1],
                                               rel=tol(torch.float32, tokens)["rtol"])
    for ga, gb in zip(grads["a"], grads["b"], strict=True):
        torch.testing.assert_close(ga, gb, **tol(torch.float32, tokens, scale=gb.abs().max()))


def test_corrupt_checkpoint_is_detected_and_previous_named(text_data, tmp_path, capsys):
    cfg = tiny_config(text_data, tmp_path)
    Trainer(cfg).fit()
    ckpts = sorted((tmp_path / "t" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    model_file = next(ckpts[-1].glob("*.distcp"))
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError) as info:
        Trainer(cfg, resume=True)
    assert "step_00000006" in str(info.value) and "truncated" in str(info.value)
    assert "previous good checkpoint is" in str(info.value) and "step_00000003" in str(info.value)
    # The CLI says the same in one line, and --resume-from the good one works.
    args = ["train", str(ROOT / "configs" / "text_moe_tiny.yaml"), *tiny_overrides(text_data, tmp_path)]
    assert main([*args, "--resume"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*args, "--resume-from", str(ckpts[0])]) == 0


def test_incomplete_checkpoint_without_meta_is_rejected(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 3})
    Trainer(cfg).fit()
    (tmp_path / "t" / "checkpoints" / "step_00000003" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json"):
        Trainer(cfg, resume=True)


def test_checkpoint_from_another_model_is_rejected(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 3})
    Trainer(cfg).fit()
    other = tiny_config(text_data, tmp_path, **{"train.steps": 3, "model.moe": "null"})
    with pytest.raises(CheckpointError, match="model.moe=set in the checkpoint, null here"):
        Trainer(other, resume=True)


def test_vocab_mismatch_is_reported(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"model.vocab_size": 256})
    with pytest.raises(ValueError, match="512") as info:
        Trainer(cfg)
    assert "256" in str(info.value)


def test_tokenizer_mismatch_is_reported(text_data, tmp_path):
    from mmfm.data.tokenizer import train_tokenizer

    other = tmp_path / "other_tokenizer.json"
    train_tokenizer(["a different corpus entirely " * 50], vocab_size=300, out_path=other)
    cfg = tiny_config(text_data, tmp_path, **{"data.tokenizer": str(other)})
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        Trainer(cfg)


@pytest.mark.parametrize("field", ["data.train_shards", "data.val_shards", "data.tokenizer"])
def test_missing_data_paths_are_named(text_data, tmp_path, field, capsys):
    missing = tmp_path / "nowhere"
    args = ["train", str(ROOT / "configs" / "text_moe_tiny.yaml"),
            *tiny_overrides(text_data, tmp_path, **{field: str(missing)})]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


def test_empty_shard_dir_is_reported(text_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(text_data, tmp_path, **{"data.train_shards": str(empty)})
    with pytest.raises(ValueError, match=str(empty)):
        Trainer(cfg)


def test_dense_equivalent_switch(text_data, tmp_path, capsys):
    args = ["train", str(ROOT / "configs" / "text_moe_tiny.yaml"),
            *tiny_overrides(text_data, tmp_path, **{"train.steps": 2}), "--dense-equivalent"]
    assert main(args) == 0
    saved = (tmp_path / "t_dense_equiv" / "config.yaml").read_text()
    assert "moe: null" in saved


def test_checkpoints_hold_only_tensors_and_json(text_data, tmp_path):
    """Nothing in a checkpoint is unpickled on load: the DCP files hold tensors only (DCP reads
    them with weights_only=True), loader positions and RNG states are JSON."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    Trainer(tiny_config(text_data, tmp_path, **{"train.steps": 3})).fit()
    ckpt = tmp_path / "t" / "checkpoints" / "step_00000003"
    items = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert items and all(isinstance(m, TensorStorageMetadata) for m in items.values())
    objects = json.loads((ckpt / "objects.json").read_text())
    assert set(objects) == {"loader.dp0", "rng.rank0", "trainer"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "mmfm-dcp" and meta["layout"]["world_size"] == 1
    assert meta["scheduler_last_epoch"] == 3 and "objects.json" in meta["sha256"]


def _write_legacy_checkpoint(trainer, path):
    """The single-process format of mmfm before the one-trainer change: model.safetensors,
    state.pt (optimizer, scheduler, loader, rng) and meta.json with their hashes."""
    import random

    from safetensors.torch import save_model

    from mmfm.train.checkpoint import _sha256

    path.mkdir(parents=True)
    save_model(trainer.model, str(path / "model.safetensors"))
    torch.save({"optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "loader": trainer.loader.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               path / "state.pt")
    hashes = {n: _sha256(path / n) for n in ("model.safetensors", "state.pt")}
    meta = {"format_version": 1, "step": trainer.step, "sha256": hashes,
            "config": trainer.cfg.to_dict()}
    (path / "meta.json").write_text(json.dumps(meta))


def test_legacy_single_process_checkpoint_is_converted_on_read(text_data, tmp_path):
    """A checkpoint of the old single-process format resumes exactly (converted on read), and
    the run's next checkpoint is in the one format."""
    full = Trainer(tiny_config(text_data, tmp_path / "full")).fit()
    cfg = tiny_config(text_data, tmp_path / "old")
    first = Trainer(cfg)
    first.fit(stop_after=3)
    legacy = tmp_path / "legacy" / "step_00000003"
    _write_legacy_checkpoint(first, legacy)
    resumed = Trainer(cfg, resume_from=str(legacy)).fit()
    for step in (4, 5, 6):
        assert resumed.train_losses[step] == full.train_losses[step], step
    meta = json.loads((resumed.checkpoint / "meta.json").read_text())
    assert meta["format"] == "mmfm-dcp"


def test_checkpoint_weights_load_without_a_process_group(text_data, tmp_path):
    """Export, upcycle and analysis read a training checkpoint's full weights on one process:
    `load_model_from_checkpoint` rebuilds the model from the saved config."""
    from mmfm.train.checkpoint import load_model_from_checkpoint

    trainer = Trainer(tiny_config(text_data, tmp_path, **{"train.steps": 3}))
    trainer.fit()
    cfg, model = load_model_from_checkpoint(tmp_path / "t")
    assert cfg.model == trainer.cfg.model and not model.training
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_init_from_upcycled_dense_checkpoint(text_data, tmp_path):
    """Train a dense model, upcycle it to MoE, and start an MoE run from those weights: its first
    loss equals the dense model's loss on the same batch (identical experts, gates summing to 1)."""
    from mmfm.convert.cli import write_model_dir
    from mmfm.convert.upcycle import upcycle_dense_to_moe

    dense_cfg = tiny_config(text_data, tmp_path / "dense", **{"model.moe": "null",
                                                             "model.ffn_hidden": 64, "train.steps": 3})
    dense = Trainer(dense_cfg)
    dense.fit()
    moe_cfg = tiny_config(text_data, tmp_path / "moe", **{"train.steps": 1})
    moe_model = upcycle_dense_to_moe(dense.model, moe_cfg.model)
    init = tmp_path / "upcycled"
    write_model_dir(init, moe_cfg, moe_model)
    moe_cfg.train.init_from = str(init)
    trainer = Trainer(moe_cfg)
    batch = next(iter(trainer.loader))
    with torch.no_grad():
        ours = trainer.task.loss(trainer.model, batch).lm_loss
        reference = dense.task.loss(dense.model, batch).lm_loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_init_from_missing_weights_is_named(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.init_from": str(tmp_path)})
    with pytest.raises(CheckpointError, match="holds no model.safetensors and no meta.json"):
        Trainer(cfg)


def test_task_metrics_merge_weights_losses_by_targets():
    from mmfm.train.trainer import merge_task_metrics

    merged = merge_task_metrics([
        {"loss/text": 2.0, "targets/text": 30.0, "media/image_items": 1.0},
        {"loss/text": 4.0, "targets/text": 10.0, "loss/audio_caption": 1.0, "targets/audio_caption": 5.0},
    ])
    assert merged["train/loss/text"] == pytest.approx((2 * 30 + 4 * 10) / 40)
    assert merged["train/targets/text"] == 40.0
    assert merged["train/loss/audio_caption"] == pytest.approx(1.0)
    assert merged["train/media/image_items"] == 1.0
