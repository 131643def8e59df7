"""Config values that make no sense (NaN, infinity, negative, out of range) are refused by name
before any compute, and an impossible model size is refused from its memory estimate."""

from pathlib import Path

import pytest

from mmfm.config import ConfigError, ExperimentConfig, load_config
from mmfm.model.counting import count_params
from mmfm.model.memory import DoesNotFitError, check_fits_memory, estimate_memory

TINY = Path(__file__).resolve().parents[1] / "configs" / "text_moe_tiny.yaml"


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.grad_clip=nan", "train.grad_clip=nan must be a finite number"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("train.beta2=1.5", "train.beta2=1.5 must be in [0, 1)"),
    ("train.min_lr_ratio=nan", "train.min_lr_ratio=nan"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.init_std=-1", "model.init_std=-1.0 must be > 0"),
    ("model.moe.bias_update_rate=nan", "model.moe.bias_update_rate=nan must be a finite number"),
    ("model.moe.aux_loss_coef=nan", "model.moe.aux_loss_coef=nan must be a finite number"),
    ("model.moe.z_loss_coef=-inf", "model.moe.z_loss_coef=-inf must be a finite number"),
    ("model.moe.capacity_factor=inf", "model.moe.capacity_factor=inf"),
    ("model.moe.first_dense=4", "model.moe.first_dense=4 leaves no MoE layer"),
    ("parallel.timeout_s=nan", "parallel.timeout_s=nan"),
    ("run.name=../escaped", "run.name='../escaped' must be a relative folder name"),
    ("run.name=/tmp/elsewhere", "run.name='/tmp/elsewhere' must be a relative folder name"),
    ("run.name=a/../../b", "run.name='a/../../b'"),
    ("run.name=.", "run.name='.'"),
])
def test_meaningless_values_are_refused_by_name(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_nested_run_name_inside_out_dir_is_fine():
    assert load_config(TINY, ["run.name=sweeps/lr_3e-3"]).run.name == "sweeps/lr_3e-3"


def test_multimodal_floats_are_checked_too():
    cfg = load_config(Path(TINY).parent / "mm_moe_tiny.yaml")
    cfg.multimodal.audio.max_seconds = float("inf")
    with pytest.raises(ConfigError, match=r"multimodal\.audio\.max_seconds=inf"):
        cfg.validate()


def test_estimate_counts_params_grads_and_adam_state():
    cfg = load_config(TINY, ["train.precision=fp32"])
    est = estimate_memory(cfg)
    n = count_params(cfg.model).total
    assert (est.params, est.grads, est.optimizer) == (4 * n, 4 * n, 8 * n)
    # Activations grow linearly with the micro-batch (scores and all are per sample).
    double = estimate_memory(load_config(TINY, ["train.precision=fp32", "train.micro_batch_size=16"]))
    assert double.activations == 2 * est.activations
    # The tiny demo fits in a gigabyte.
    assert check_fits_memory(cfg, available=2**30) == est


def test_sharding_divides_the_states():
    plain = estimate_memory(load_config(TINY, ["parallel.dp=4", "parallel.engine=ddp"]))
    fsdp = estimate_memory(load_config(TINY, ["parallel.dp=4", "parallel.engine=fsdp"]))
    assert fsdp.params * 4 == plain.params and fsdp.optimizer * 4 == plain.optimizer


@pytest.mark.parametrize("override", [
    "model.d_model=10000000",
    f"model.vocab_size={2**40}",
    "model.moe.num_experts=100000",
])
def test_impossible_sizes_are_refused_fast_with_the_estimate(override):
    cfg = load_config(TINY, [override, "model.n_heads=8", "model.n_kv_heads=4"])
    with pytest.raises(DoesNotFitError) as info:
        check_fits_memory(cfg, available=128 * 2**30)
    message = str(info.value)
    assert "per process" in message and "GiB" in message and "params" in message
    assert "\n" not in message


def test_check_reads_the_host_memory_by_default():
    # The tiny default model fits any machine that can run the tests.
    assert check_fits_memory(ExperimentConfig()).total > 0


def test_info_shows_the_estimate(capsys):
    from mmfm.cli import main

    assert main(["info", str(TINY), "model.vocab_size=1099511627776"]) == 0
    out = capsys.readouterr().out
    assert "memory per process (estimate" in out and "params 1.05e+06 GiB" in out  # 2^40 x 256 x 4 bytes
