"""`mmfm train` under torchrun-like launches: the distributed trainer on real token shards.

A 2-process pipeline run started by `mmfm launch --run` (torchrun; pp=2, 1F1B, the decoder's two MoE layers on two ranks) logs from
rank 0 only, reports both stages' MoE metrics and a validation loss computed through the
pipeline, and writes distributed checkpoints. One process then resumes its step-2 checkpoint
without any parallel layout and reproduces steps 3 and 4: weights, AdamW state, LR schedule and
data position crossed from a 2-stage layout to a flat one. Both runs feed the same loader
batches to the same aux domains (grad_accum=2 flat, 2 pipeline micro-batches per step), so the
losses agree up to fp32 summation order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_overrides

from mmfm.parallel.local import spawn

CONFIG = str(ROOT / "configs" / "text_moe_tiny.yaml")


def _train(argv: list[str]) -> int:
    from mmfm.cli import main

    return main(argv)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_pipeline_run_logs_once_and_resumes_on_one_process(text_data, tmp_path):
    common = {"train.micro_batch_size": 2, "train.grad_accum": 2, "train.steps": 4,
              "train.ckpt_every": 2, "train.eval_every": 2, "train.eval_batches": 2,
              "model.n_layers": 2}
    first = tiny_overrides(text_data, tmp_path, **common, **{
        "run.name": "pp", "parallel.pp": 2, "parallel.microbatches": 2,
        "parallel.pp_schedule": "1f1b", "parallel.engine": "ddp"})
    # Through `mmfm launch --run`, i.e. a real torchrun (2 CPU processes over gloo).
    launched = subprocess.run([sys.executable, "-m", "mmfm.cli", "launch", CONFIG, *first,
                               "--gpus-per-node", "2", "--run"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2" in launched.stdout
    assert launched.stdout.count("final validation loss") == 1  # rank 0 prints the summary

    run = tmp_path / "pp"
    records = _records(run)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # rank 0 alone wrote the metrics
    keys = set().union(*records)
    for key in ("moe/layer_00/tokens_per_expert", "moe/layer_01/tokens_per_expert",
                "moe/max_load_imbalance", "train/aux_loss", "val/loss", "perf/tokens_per_s"):
        assert key in keys, key
    counts = next(r["moe/layer_01/tokens_per_expert"] for r in records
                  if "moe/layer_01/tokens_per_expert" in r)
    assert sum(counts) == 2 * 2 * 64 * 2  # one step: 4 rows × 64 tokens × top-2
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["format"] == "mmfm-dcp" and meta["layout"]["pp"] == 2
    # Export, upcycling and analysis read a pipeline checkpoint's full weights on one process.
    from mmfm.convert.cli import load_model_dir

    _, model = load_model_dir(run)
    assert sum(1 for _ in model.moe_layers()) == 2

    resumed_args = tiny_overrides(text_data, tmp_path, **common, **{"run.name": "flat"})
    ckpt = str(run / "checkpoints" / "step_00000002")
    assert spawn(_train, 1, (["train", CONFIG, *resumed_args, "--resume-from", ckpt],),
                 timeout_s=240) == [0]
    flat = _records(tmp_path / "flat")
    pp_loss = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    flat_loss = {r["step"]: r["train/loss"] for r in flat if "train/loss" in r}
    assert sorted(flat_loss) == [3, 4]
    for step in (3, 4):
        assert flat_loss[step] == pytest.approx(pp_loss[step], rel=1e-5), step
    pp_val = [r["val/loss"] for r in records if "val/loss" in r][-1]
    flat_val = [r["val/loss"] for r in flat if "val/loss" in r][-1]
    assert flat_val == pytest.approx(pp_val, rel=1e-5)


@pytest.mark.distributed
def test_deepspeed_launcher_runs_zero2_with_expert_parallelism(text_data, tmp_path):
    """`mmfm launch --launcher deepspeed --run`: DeepSpeed's own launcher (2 CPU processes)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    args = tiny_overrides(text_data, tmp_path, **{
        "run.name": "ds", "train.steps": 2, "train.ckpt_every": 2, "train.eval_every": 2,
        "train.eval_batches": 1, "train.micro_batch_size": 2, "parallel.engine": "deepspeed",
        "parallel.zero_stage": 2, "parallel.ep": 2})
    bin_dir = os.path.dirname(sys.executable)  # the `deepspeed` script of this environment
    launched = subprocess.run([sys.executable, "-m", "mmfm.cli", "launch", CONFIG, *args,
                               "--gpus-per-node", "2", "--launcher", "deepspeed", "--run"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    records = _records(tmp_path / "ds")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    meta = json.loads((tmp_path / "ds" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["layout"]["engine"] == "deepspeed" and meta["layout"]["ep"] == 2
