"""The run's precision reaches the sharding engines explicitly: FSDP2's MixedPrecisionPolicy
and DeepSpeed's bf16 section for bf16 runs on CUDA, plain fp32 weights elsewhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed.fsdp as fsdp

from mmfm.config import ModelConfig, TrainConfig
from mmfm.device import PrecisionChoice
from mmfm.parallel.api import apply_fsdp, bf16_weights, fsdp_mp_policy
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.deepspeed_engine import ds_config

BF16 = PrecisionChoice("bf16", torch.bfloat16, "test")
FP32 = PrecisionChoice("fp32", torch.float32, "test")
FP8 = PrecisionChoice("fp8", torch.bfloat16, "test")
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("precision, device, expected", [
    (BF16, CUDA, True), (FP8, CUDA, True), (FP32, CUDA, False), (None, CUDA, False),
    (BF16, CPU, False),  # CPUs keep fp32 weights; autocast lowers the products
])
def test_bf16_weights_only_for_bf16_runs_on_cuda(precision, device, expected):
    assert bf16_weights(precision, device) is expected


def test_fsdp_policy_is_bf16_compute_and_fp32_reduction():
    policy = fsdp_mp_policy(BF16, CUDA)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mp_policy(FP32, CUDA) is None and fsdp_mp_policy(BF16, CPU) is None


def test_apply_fsdp_gives_every_unit_the_policy(monkeypatch):
    calls = []

    def fake_fully_shard(module, **kwargs):
        calls.append((type(module).__name__, kwargs["mp_policy"]))
        module.set_reduce_scatter_unused_params = lambda flag: None
        return module

    monkeypatch.setattr(fsdp, "fully_shard", fake_fully_shard)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=32, max_seq_len=16, moe=None)
    dims = SimpleNamespace(ep=1, edp=1, dp=2, dp_cp_mesh=None, device=CUDA)
    apply_fsdp(cfg.build(), dims, ParallelConfig(dp=2), BF16)
    assert [name for name, _ in calls] == ["Block", "Block", "Decoder"]
    assert all(p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
               for _, p in calls)
    calls.clear()
    apply_fsdp(cfg.build(), dims, ParallelConfig(dp=2), FP32)
    assert all(p == fsdp.MixedPrecisionPolicy() for _, p in calls)  # fp32 throughout


def test_deepspeed_config_has_the_bf16_section_when_asked():
    pcfg, tcfg = ParallelConfig(engine="fsdp"), TrainConfig()
    assert ds_config(pcfg, tcfg, 1, bf16=True)["bf16"] == {"enabled": True}
    assert ds_config(pcfg, tcfg, 1)["bf16"] == {"enabled": False}
