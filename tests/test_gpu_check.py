"""bench/gpu_check.py runs end to end: on the CPU as a tiny smoke run, on a GPU in full."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_prints_every_section(tmp_path, capsys):
    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for preset in ("text_moe_small", "text_dense_equiv_small", "text_moe_1b"):
        assert f"| {preset} |" in text
    assert "bf16 vs fp32 loss, 4 steps" in text and "PASS" in text
    assert "grouped_mm vs loop experts (float32)" in text
    assert "SDPA kernel: causal -> " in text and "causal -> ?" not in text
    results = json.loads(out.read_text())
    assert len(results["loss"]["bf16"]) == 4 and results["experts"]["ok"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in results["throughput"])


def test_peak_table_matches_device_names_most_specific_first(monkeypatch):
    gpu_check = _gpu_check()
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                       ("Some Other GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert gpu_check.peak_bf16_flops(cuda) == peak, name
    assert gpu_check.peak_bf16_flops(torch.device("cpu")) is None


def test_loss_tracking_fails_when_bf16_drifts(monkeypatch):
    """The tolerance check can fail: a bf16 run whose losses are 5% off is reported."""
    gpu_check = _gpu_check()
    real_step = gpu_check.train_step

    def drifting_step(model, optimizer, ids, precision, device, grad_clip):
        loss = real_step(model, optimizer, ids, precision, device, grad_clip)
        return loss * 1.05 if precision.name == "bf16" else loss

    monkeypatch.setattr(gpu_check, "train_step", drifting_step)
    result = gpu_check.loss_tracking(torch.device("cpu"), steps=2, tiny=True)
    assert not result["ok"] and result["max_rel_gap"] == pytest.approx(0.05, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_run_on_a_gpu(capsys):
    assert _gpu_check().main(["--device", "cuda"]) == 0
    assert "MFU" in capsys.readouterr().out
