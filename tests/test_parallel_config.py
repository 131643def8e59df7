"""Single-process checks of the parallel layer: layouts that do not fit are refused before any
compute with messages naming the fields, an incompatible checkpoint names its file and field,
`mmfm launch` prints the right commands, the SLURM script derives the rendezvous and forwards
the config, and the pieces with math of their own (aux-loss injection, aux domains) are right.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT

from mmfm.cli import main
from mmfm.config import ConfigError, ModelConfig, TrainConfig, load_config
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.pipeline import attach_aux_loss
from mmfm.parallel.runner import aux_domains, make_batches
from mmfm.train.checkpoint import CheckpointError

CONFIG = str(ROOT / "configs" / "text_moe_tiny.yaml")  # 8 heads, 4 kv heads, 8 experts, 4 layers


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.n_heads=8"),
    (["parallel.tp=8"], "parallel.tp=8 does not divide model.n_kv_heads=4"),
    (["parallel.tp=2", "model.qk_norm=full"], "parallel.tp=2 cannot shard model.qk_norm=full"),
    (["parallel.ep=4", "model.moe.num_experts=6"],
     "parallel.ep=4 does not divide model.moe.num_experts=6"),
    (["parallel.ep=2", "model.moe=null"], "parallel.ep=2 needs an MoE model, but model.moe is null"),
    (["parallel.pp=3", "parallel.microbatches=3"], "3 stages do not divide model.n_layers=4"),
    (["parallel.pp=2", "parallel.microbatches=2", "parallel.pp_split=[1,2]"],
     "parallel.pp_split=[1, 2] must list 2 positive layer counts summing to model.n_layers=4"),
    (["parallel.pp=2", "parallel.microbatches=1"],
     "parallel.pp_schedule=1f1b needs parallel.microbatches=1 >= the 2 pipeline stages"),
    (["parallel.pp=2", "parallel.microbatches=3", "parallel.pp_schedule=gpipe"],
     "parallel.microbatches=3 does not divide the 8 rows per step"),
    (["parallel.engine=fsdp", "parallel.zero_stage=1"],
     "parallel.zero_stage=1 is not available with parallel.engine=fsdp"),
    (["parallel.engine=megatron"], "parallel.engine='megatron' is not one of ddp, fsdp, deepspeed"),
    (["parallel.engine=deepspeed", "parallel.tp=2"],
     "parallel.engine=deepspeed composes with data and expert parallelism only"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.ep=2"],
     "cannot shard expert-parallel experts"),
    (["parallel.pp_schedule=zero_bubble"], "parallel.pp_schedule='zero_bubble' is not one of"),
])
def test_bad_layouts_fail_at_config_time_naming_fields(overrides, message):
    if "engine=deepspeed" in " ".join(overrides) and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, overrides)
    assert message in str(info.value)


def test_world_size_is_checked_when_known():
    cfg = ParallelConfig(dp=2, tp=2)
    with pytest.raises(ValueError, match=r"parallel.dp=2 × parallel.tp=2 × parallel.pp=1 = 4 "
                                         r"does not equal the world size 2"):
        cfg.validate(world_size=2)
    with pytest.raises(ValueError, match="parallel.ep=4 does not divide parallel.dp=2"):
        ParallelConfig(ep=4).validate(world_size=2)
    ParallelConfig(tp=2, ep=2).validate(world_size=8)  # dp = 8 / 2 = 4, ep 2 divides it


def test_missing_engine_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="parallel.engine=deepspeed needs the deepspeed package"):
        load_config(CONFIG, ["parallel.engine=deepspeed"])


def test_layout_too_big_for_one_process_fails_before_compute(capsys):
    """`mmfm train` with a 2-rank layout on one process: exit 2, one line, no process group."""
    had_group = torch.distributed.is_initialized()
    assert main(["train", CONFIG, "parallel.dp=2"]) == 2
    err = capsys.readouterr().err
    assert "does not equal the world size 1" in err
    assert torch.distributed.is_initialized() == had_group  # refused before any process group


def test_incompatible_checkpoint_names_file_and_field(tmp_path):
    from mmfm.parallel.checkpoint import check_compatible, read_meta

    model = ModelConfig(n_layers=2, moe=MoEConfig(num_experts=4))
    meta = {"format": "mmfm-dcp", "config": {"model": {**_model_dict(model), "n_layers": 3}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        check_compatible(tmp_path, read_meta(tmp_path), model)
    assert str(tmp_path) in str(info.value) and "meta.json" in str(info.value)
    assert "model.n_layers=3, but this run has model.n_layers=2" in str(info.value)
    meta["config"]["model"] = {**_model_dict(model), "moe": {**_model_dict(model)["moe"],
                                                             "num_experts": 8}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.moe.num_experts=8, but this run has "
                                              "model.moe.num_experts=4"):
        check_compatible(tmp_path, read_meta(tmp_path), model)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1, "step": 3}))
    with pytest.raises(CheckpointError, match="single-process checkpoint"):
        read_meta(tmp_path)


def _model_dict(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_launch_prints_commands(capsys):
    assert main(["launch", CONFIG, "parallel.tp=2", "train.steps=50", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "world 4 = pp 1 × dp 2 × tp 2" in out
    assert "-m torch.distributed.run --standalone --nproc-per-node 4 -m mmfm.cli train" in out
    assert out.rstrip().endswith(f"{CONFIG} parallel.tp=2 train.steps=50")
    assert main(["launch", CONFIG, "parallel.ep=2", "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "sbatch --nodes=2 --gpus-per-node=8" in out and "launchers/slurm.sbatch" in out
    assert main(["launch", CONFIG, "--nodes", "2", "--gpus-per-node", "2",
                 "--launcher", "torchrun", "--master-addr", "node0"]) == 0
    out = capsys.readouterr().out
    assert "--node-rank 1 --rdzv-backend c10d --rdzv-endpoint node0:29500" in out
    assert main(["launch", CONFIG, "parallel.tp=2", "--gpus-per-node", "3"]) == 2
    assert "does not equal the world size 3" in capsys.readouterr().err


def _stub(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_slurm_script_derives_rendezvous_and_forwards_config(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-node-17\\ngpu-node-18\\n"')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun_args')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "gpu-node-[17-18]", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "8"}
    out = subprocess.run(["bash", str(ROOT / "launchers" / "slurm.sbatch"), "cfg.yaml",
                          "train.steps=7", "run.name=with space"], env=env, capture_output=True,
                         text=True, check=True)
    assert "2 nodes x 8 processes, rendezvous gpu-node-17:24321" in out.stdout
    args = (tmp_path / "srun_args").read_text().splitlines()
    joined = " ".join(args)
    assert "--nnodes 2 --nproc-per-node 8" in joined
    assert "--rdzv-id 4321 --rdzv-backend c10d --rdzv-endpoint gpu-node-17:24321" in joined
    assert args[-5:] == ["mmfm.cli", "train", "cfg.yaml", "train.steps=7", "run.name=with space"]


def test_attach_aux_loss_passes_activations_and_injects_aux_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    aux = w * 3.0
    y = attach_aux_loss(x, aux, aux_grad=1.0)
    torch.testing.assert_close(y, x)
    g = torch.randn(2, 3)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(w.grad, torch.tensor(3.0))  # d(aux)/dw with weight 1


def test_aux_domains_group_ep_ranks_micro_batches():
    batch = make_batches(1, 8, 4, 50)[0]
    rows = batch.input_ids
    # dp 2, no ep, 2 chunks: each rank's half cut in two -> 4 domains of 2 rows.
    doms = aux_domains(batch, dp=2, ep=1, chunks=2)
    assert [d.input_ids.shape[0] for d in doms] == [2, 2, 2, 2]
    torch.testing.assert_close(doms[2].input_ids, rows[4:6])
    # dp 2, ep 2, 2 chunks: chunk j of both ranks together -> 2 domains of 4 rows.
    doms = aux_domains(batch, dp=2, ep=2, chunks=2)
    torch.testing.assert_close(doms[0].input_ids, torch.cat([rows[0:2], rows[4:6]]))
    torch.testing.assert_close(doms[1].input_ids, torch.cat([rows[2:4], rows[6:8]]))


def test_train_config_rows_must_split_into_microbatches():
    with pytest.raises(ValueError, match="parallel.microbatches=4 does not divide the 6 rows"):
        ParallelConfig(pp=2, microbatches=4).validate(
            train_cfg=TrainConfig(micro_batch_size=3, grad_accum=2))
