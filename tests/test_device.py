"""Device and precision choice (mmfm.device): CPU bf16 detection on faked /proc/cpuinfo text,
the measured probe, the slow-bf16 warning, the one-line errors, autocast and batch moves."""

from __future__ import annotations

import warnings

import pytest
import torch

from mmfm.data.loader import Batch
from mmfm.device import (
    DeviceError,
    PrecisionChoice,
    ProbeResult,
    SlowPrecisionWarning,
    autocast_context,
    cpu_feature_flags,
    move_batch,
    native_bf16_flags,
    probe_bf16,
    resolve_device,
    resolve_precision,
    resolve_run,
)
from mmfm.parallel.fp8 import Fp8UnsupportedError, fp8_linear_names

CPU = torch.device("cpu")
# Abridged /proc/cpuinfo of the machines in question (flag lists as the kernel prints them).
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve asimdbf16 bf16 i8mm
CPU implementer\t: 0x41
"""
SLOW = ProbeResult(size=256, fp32_s=0.001, bf16_s=0.075)  # the AVX2 EPYC's ~75x
FAST = ProbeResult(size=256, fp32_s=0.002, bf16_s=0.001)


def _no_probe():
    pytest.fail("the probe must not run where the CPU flags decide")


def test_flags_are_read_from_x86_and_arm_cpuinfo():
    assert native_bf16_flags(cpu_feature_flags(EPYC_AVX2)) == []
    assert native_bf16_flags(cpu_feature_flags(SAPPHIRE_RAPIDS)) == ["avx512_bf16", "amx_bf16"]
    assert native_bf16_flags(cpu_feature_flags(GRAVITON3)) == ["bf16"]
    assert cpu_feature_flags("") is None  # no /proc/cpuinfo (macOS): the flags cannot tell
    assert cpu_feature_flags("processor\t: 0\nmodel name\t: something\n") is None


def test_auto_takes_bf16_where_the_cpu_has_it_natively():
    choice = resolve_precision("auto", CPU, cpuinfo=SAPPHIRE_RAPIDS, probe=_no_probe)
    assert (choice.name, choice.dtype, choice.probe) == ("bf16", torch.bfloat16, None)
    assert "avx512_bf16+amx_bf16" in choice.reason


def test_auto_takes_fp32_on_avx2_and_logs_the_measured_slowdown():
    choice = resolve_precision("auto", CPU, cpuinfo=EPYC_AVX2, probe=lambda: SLOW)
    assert (choice.name, choice.dtype, choice.probe) == ("fp32", torch.float32, SLOW)
    assert "no AVX512-BF16/AMX-BF16" in choice.reason and "75.0x slower" in choice.reason


def test_auto_without_flags_follows_the_probe():
    assert resolve_precision("auto", CPU, cpuinfo="", probe=lambda: FAST).name == "bf16"
    slow = resolve_precision("auto", CPU, cpuinfo="", probe=lambda: SLOW)
    assert slow.name == "fp32" and "CPU flags unknown" in slow.reason


def test_explicit_bf16_without_native_support_warns_with_the_slowdown():
    with pytest.warns(SlowPrecisionWarning, match=r"75\.0x slower than fp32") as record:
        choice = resolve_precision("bf16", CPU, cpuinfo=EPYC_AVX2, probe=lambda: SLOW)
    assert len(record) == 1
    assert choice.name == "bf16" and choice.probe == SLOW  # honoured: slow but correct


def test_explicit_bf16_on_native_hardware_and_fp32_do_not_warn_or_probe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU, cpuinfo=GRAVITON3, probe=_no_probe).name == "bf16"
        assert resolve_precision("fp32", CPU, cpuinfo=EPYC_AVX2, probe=_no_probe).name == "fp32"


def test_fp8_on_the_cpu_is_a_one_line_error():
    with pytest.raises(Fp8UnsupportedError) as info:
        resolve_precision("fp8", CPU, cpuinfo=SAPPHIRE_RAPIDS, probe=_no_probe)
    assert "train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_settings_name_the_field():
    with pytest.raises(DeviceError, match="train.precision='fp16' is not one of"):
        resolve_precision("fp16", CPU)
    with pytest.raises(DeviceError, match="train.device='tpu' is not one of"):
        resolve_device("tpu", 0)


def test_the_real_probe_measures_both_dtypes():
    result = probe_bf16(size=64, repeats=2)
    assert result.size == 64 and result.fp32_s > 0 and result.bf16_s > 0
    assert result.slowdown == pytest.approx(result.bf16_s / result.fp32_s)


def test_device_auto_and_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == CPU
    assert resolve_device("cpu", 0) == CPU
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda", 0)
    assert "train.device=cuda but torch sees no CUDA device" in str(info.value)
    assert "\n" not in str(info.value)


def test_device_is_one_gpu_per_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="local rank 2 has no GPU of its own"):
        resolve_device("cuda", 2)


def test_autocast_follows_the_choice_on_the_cpu():
    a = torch.randn(4, 4)
    bf16 = PrecisionChoice("bf16", torch.bfloat16, "test")
    with autocast_context(bf16, CPU):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_context("fp32", CPU):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(AssertionError, match="unresolved precision 'auto'"):
        autocast_context("auto", CPU)


class _RecordingBatch:
    """Stands in for a Batch on a GPU-less machine: records how it is moved."""

    def __init__(self):
        self.calls = []

    def pin_memory(self):
        self.calls.append("pin")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append((str(device), non_blocking))
        return self


def test_move_batch_pins_and_copies_non_blocking_to_a_gpu():
    batch = _RecordingBatch()
    move_batch(batch, torch.device("cuda", 0))
    assert batch.calls == ["pin", ("cuda:0", True)]


def test_move_batch_to_the_cpu_keeps_the_tensors():
    ids = torch.arange(6).view(2, 3)
    moved = move_batch(Batch(ids, ids, ids.int()), CPU)
    assert moved.input_ids.data_ptr() == ids.data_ptr()


def test_fp8_converts_block_linears_but_not_the_head_or_odd_sizes():
    from mmfm.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_hidden=40, max_seq_len=16, moe=None)
    names = fp8_linear_names(cfg.build())
    # ffn_hidden=40 is not a multiple of 16: the FFN stays in bf16; lm_head is never converted.
    assert names == ["blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.0.attn.wo"]


def test_the_probe_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    probe_bf16(size=32, repeats=1)
    assert torch.get_num_threads() == before


def test_resolve_run_reads_the_train_config():
    from mmfm.config import TrainConfig

    device, precision = resolve_run(TrainConfig(device="cpu", precision="fp32"))
    assert device == CPU and precision.name == "fp32" and precision.reason == "train.precision=fp32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_auto_picks_it_and_batches_arrive_intact():
    from mmfm.config import TrainConfig

    device, precision = resolve_run(TrainConfig())
    assert device == torch.device("cuda", 0)
    assert precision.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    ids = torch.arange(12).view(3, 4)
    moved = move_batch(Batch(ids, ids + 1, ids.int()), device)
    assert moved.input_ids.device == device
    torch.testing.assert_close(moved.labels.cpu(), ids + 1)
    with autocast_context(precision, device):
        a = torch.randn(8, 8, device=device)
        assert (a @ a).dtype == precision.dtype
