"""Faults around a training run, end to end through the one trainer and the CLI: numerics that
blow up, two runs in one directory, rollback lineage, edited checkpoint metadata, a resume with
another model, a full disk. Each case failed on the trainer before the reliability work
(docs/reliability.md lists them)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config, tiny_overrides

from mmfm.cli import main
from mmfm.train import CheckpointError, Trainer
from mmfm.train.checkpoint import load_model_from_checkpoint
from mmfm.train.guards import UnrecoverableTraining

CONFIG = str(ROOT / "configs" / "text_moe_tiny.yaml")


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_exploding_run_skips_rolls_back_and_exits_non_zero(text_data, tmp_path, capsys):
    """train.lr=1e3 (the issue's reproduction): non-finite and spiking updates are skipped and
    counted, the run rolls back, then stops with one line and exit status 2; every checkpoint
    left on disk holds finite weights."""
    args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{
        "train.lr": 1000.0, "train.steps": 24, "train.warmup_steps": 0, "train.ckpt_every": 2,
        "train.eval_every": 24, "train.guard.min_history": 2, "train.guard.window": 4,
        "train.guard.max_consecutive_bad": 2, "train.guard.max_rollbacks": 1})]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad steps in a row" in err
    records = _records(tmp_path / "t")
    skipped = max(r.get("guard/skipped_nonfinite", 0) + r.get("guard/skipped_spike", 0)
                  for r in records)
    assert skipped > 0
    ckpts = sorted((tmp_path / "t" / "checkpoints").glob("step_*"))
    assert ckpts, "the finite checkpoints before the blow-up are kept"
    for ckpt in ckpts:
        _, model = load_model_from_checkpoint(ckpt)
        assert all(torch.isfinite(p).all() for p in model.parameters()), ckpt


def test_second_run_in_the_same_directory_is_refused(text_data, tmp_path, capsys):
    args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{"train.steps": 2,
                                                                     "train.ckpt_every": 2})]
    assert main(args) == 0
    before = (tmp_path / "t" / "metrics.jsonl").read_text()
    assert main(args) == 2  # a fresh run over an existing one
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "t" / "metrics.jsonl").read_text() == before  # nothing touched
    assert main([*args, "--overwrite"]) == 0
    assert [r["step"] for r in _records(tmp_path / "t") if "train/loss" in r] == [1, 2]


def test_resume_without_a_checkpoint_is_an_error_unless_fresh_is_allowed(text_data, tmp_path,
                                                                         capsys):
    args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{"train.steps": 2})]
    assert main([*args, "--resume"]) == 2
    assert "holds no checkpoint to resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--allow-fresh"]) == 0


def test_a_live_holder_of_the_run_directory_is_named(text_data, tmp_path, capsys):
    """Another live process holds the lock: refused, naming its pid and host. A lock left by a
    process that has died is taken over."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "t"
        run.mkdir()
        lock = {"host": os.uname().nodename, "pid": holder.pid, "since": 0}
        (run / ".lock").write_text(json.dumps(lock))
        args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{"train.steps": 1})]
        assert main(args) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock is stale and taken over


def test_resume_follows_the_lineage_not_the_newest_name(text_data, tmp_path):
    """--resume-from step_2 of a run that reached step_6, a crash at step 4 of the new branch,
    then --resume: it continues the new branch (step_4 of the new lineage), never the abandoned
    step_6, which is kept aside; metrics.jsonl has one record per step."""
    cfg = tiny_config(text_data, tmp_path, **{"train.ckpt_every": 2, "train.keep_checkpoints": 5,
                                              "train.eval_every": 100})
    Trainer(cfg).fit()
    ckpts = tmp_path / "t" / "checkpoints"
    Trainer(cfg, resume_from=str(ckpts / "step_00000002")).fit(stop_after=2)  # "crashes" at 4
    abandoned = sorted(p.name for p in (ckpts / "abandoned").iterdir())
    assert abandoned == ["step_00000004", "step_00000006"]
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 4
    resumed.fit()
    steps = [r["step"] for r in _records(tmp_path / "t") if "train/loss" in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


def test_edited_checkpoint_metadata_is_refused(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 3, "train.ckpt_every": 3})
    Trainer(cfg).fit()
    meta_path = tmp_path / "t" / "checkpoints" / "step_00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for edited, message in ((5000, "step=5000 but its saved trainer state is at step 3"),
                            (-3, "step=-3 must be an integer >= 0")):
        meta_path.write_text(json.dumps({**meta, "step": edited}))
        with pytest.raises(CheckpointError, match=message):
            Trainer(cfg, resume=True)
    meta_path.write_text(json.dumps({**meta, "sha256": {}}))
    with pytest.raises(CheckpointError, match="no sha256 table"):
        Trainer(cfg, resume=True)


def test_resume_with_another_model_config_names_every_field(text_data, tmp_path):
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 3, "train.ckpt_every": 3})
    Trainer(cfg).fit()
    other = tiny_config(text_data, tmp_path, **{"train.steps": 3, "model.moe.top_k": 1,
                                                "train.beta2": 0.9})
    with pytest.raises(CheckpointError) as info:
        Trainer(other, resume=True)
    assert "model.moe.top_k=2 in the checkpoint, 1 here" in str(info.value)
    assert "train.beta2=0.95 in the checkpoint, 0.9 here" in str(info.value)


def test_disk_full_while_checkpointing_keeps_the_previous_resume_point(text_data, tmp_path,
                                                                       monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 4, "train.ckpt_every": 2})
    trainer = Trainer(cfg)
    trainer.fit(stop_after=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    trainer = Trainer(cfg, resume=True)
    with pytest.raises(OSError, match="no space left on device writing .*step_00000004") as info:
        trainer.fit()
    assert "the previous checkpoint is still the resume point" in str(info.value)
    ckpts = tmp_path / "t" / "checkpoints"
    assert not list(ckpts.glob(".tmp_*"))
    monkeypatch.undo()
    assert Trainer(cfg, resume=True).step == 2


def test_overrides_after_flags(text_data, tmp_path):
    args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{"train.steps": 2})]
    assert main(args) == 0
    # `mmfm train CFG --resume train.steps=4`: the override after the flag takes effect.
    assert main([*args[:2], "--resume", *args[2:], "train.steps=4"]) == 0
    steps = [r["step"] for r in _records(tmp_path / "t") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]


def test_unhealthy_end_is_an_error(text_data, tmp_path):
    """A run whose last steps were all skipped ends with UnrecoverableTraining, not exit 0."""
    cfg = tiny_config(text_data, tmp_path, **{"train.steps": 2, "train.ckpt_every": 100,
                                              "train.guard.max_consecutive_bad": 50})
    trainer = Trainer(cfg)
    real = trainer.task.loss

    def nan_loss(model, batch):
        out = real(model, batch)
        out.lm_loss = out.lm_loss * float("nan")
        return out

    trainer.task.loss = nan_loss
    with pytest.raises(UnrecoverableTraining, match="ended unhealthy"):
        trainer.fit()
    # The run directory was released: a new run may replace it.
    assert Trainer(cfg, overwrite=True).step == 0


def test_init_from_weights_of_another_shape_is_one_line(text_data, tmp_path, capsys):
    from mmfm.convert.cli import write_model_dir

    other = tiny_config(text_data, tmp_path / "other", **{"model.d_model": 32})
    write_model_dir(tmp_path / "weights", other, other.model.build())
    args = ["train", CONFIG, *tiny_overrides(text_data, tmp_path, **{
        "train.steps": 1, "train.init_from": str(tmp_path / "weights")})]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this model" in err and "has shape" in err
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"\x00" * 64)  # damaged header
    assert main([*args, "--overwrite"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
