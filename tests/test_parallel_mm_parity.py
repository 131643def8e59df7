"""Every layout trains the multimodal model (image and audio encoders, projectors, fusion,
modality expert groups) like one process does (CPU, gloo, fp32).

Harness: `mmfm.parallel.mm_runner` — 3 AdamW steps on fixed interleaved batches of 8 rows × 32
tokens with real image/audio preprocessing; on odd steps half the ranks see no media at all.
The reference is the same `Trainer` on one process with gradient accumulation over the
layout's aux domains (see the harness docstring for why that is the same objective). Compared:
LM loss, aux loss, per-target-group losses (`train/loss/text|image|audio`), gradient norms and
the final weights, with the tolerances of tests/test_parallel_parity.py (the runs differ only
in summation order).

Layouts: data parallel, expert parallel (each modality group's experts split over the ep
ranks; shared routing too), tensor parallel (with per-group shared experts split) and ep × tp ×
dp; plus a checkpoint written under dp2 × ep2 (2 processes) resumed under dp2 × ep2 × tp2 (4).
Layouts run in groups so one set of processes (one torch import) trains several, and layouts
with the same single-process reference share one reference run.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from test_parallel_parity import LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL

from mmfm.config import ModelConfig, TrainConfig
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.local import spawn
from mmfm.parallel.mm_runner import (
    aux_domains_per_step,
    make_mm_rows,
    mm_distributed_run,
    mm_reference_run,
    tiny_encoders,
)

STEPS, ROWS, SEQ, VOCAB = 3, 8, 32, 128
GROUPS_OF_EXPERTS = {"text": 4, "image": 2, "audio": 2}
TRAIN = TrainConfig(steps=STEPS, micro_batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0,
                    precision="fp32", grad_clip=0.5)


def model_cfg(n_layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=SEQ,
                       moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=32,
                                     bias_update_rate=0.01, z_loss_coef=1e-3,
                                     num_shared_experts=1))  # split by tp, in every group


# name: (world size, parallel config, decoder layers, grad_accum, routing)
LAYOUTS = {
    "ddp_dp2_moma": (2, dict(engine="ddp"), 2, 2, "modality"),
    "fsdp_dp2_shared": (2, dict(engine="fsdp"), 2, 1, "shared"),
    # Expert parallel: each modality group's experts split over the 2 ranks (one micro-batch
    # per rank: the harness pairs an ep group with one reference micro-batch).
    "fsdp_dp2_ep2_moma": (2, dict(engine="fsdp", ep=2), 2, 1, "modality"),
    "ddp_dp2_ep2_shared": (2, dict(engine="ddp", ep=2), 2, 1, "shared"),
    # 4 processes: tensor parallel, and ep × tp × dp composed.
    "ddp_dp2_tp2_moma": (4, dict(engine="ddp", tp=2), 2, 1, "modality"),
    "fsdp_dp2_ep2_tp2_moma": (4, dict(engine="fsdp", tp=2, ep=2), 2, 1, "modality"),
}
RUN_GROUPS = {
    "mm2": ["ddp_dp2_moma", "fsdp_dp2_shared", "fsdp_dp2_ep2_moma", "ddp_dp2_ep2_shared"],
    "mm4": ["ddp_dp2_tp2_moma", "fsdp_dp2_ep2_tp2_moma"],
}
# Cross-layout resume: the checkpoint SAVE writes after step 2 (2 processes, experts of each
# modality group split over 2 ranks) is continued for step 3 by RESUME (4 processes, the same
# ep group now also split by tp). Both have one aux domain per step, so one reference serves.
SAVE, RESUME = "fsdp_dp2_ep2_moma", "fsdp_dp2_ep2_tp2_moma"


def pcfg_of(name: str) -> ParallelConfig:
    world, kw, _, _, _ = LAYOUTS[name]
    pcfg = ParallelConfig(**kw)
    pcfg.dp = pcfg.resolved_dp(world)
    return pcfg


def train_cfg(name: str) -> TrainConfig:
    return dataclasses.replace(TRAIN, grad_accum=LAYOUTS[name][3])


def batches():
    return make_mm_rows(STEPS, ROWS, SEQ, VOCAB, tiny_encoders())


def run_layout(name: str, data, reference: bool = False, **kwargs):
    world, _, layers, _, routing = LAYOUTS[name]
    args = (model_cfg(layers), pcfg_of(name), train_cfg(name))
    if reference:
        return mm_reference_run(*args, world, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS)
    return mm_distributed_run(*args, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS, **kwargs)


def reference_key(name: str) -> tuple:
    """What a layout's single-process reference depends on (layouts sharing it share one run)."""
    world, _, layers, _, routing = LAYOUTS[name]
    return aux_domains_per_step(pcfg_of(name), train_cfg(name), world), routing, layers


def _train_group(names: list[str], ckpt_dir: str) -> dict:
    """Worker: train each layout of the group; the SAVE layout writes its checkpoint after
    step 2, and the RESUME layout (in the group of its world size) continues it for step 3."""
    import torch.distributed as dist

    data = batches()
    out = {}
    for name in names:
        save = {"save_to": ckpt_dir, "save_at": 2} if name == SAVE else {}
        out[name] = run_layout(name, data, **save)
    if RESUME in names and os.path.isdir(ckpt_dir):
        out["resumed"] = run_layout(RESUME, data, load_from=ckpt_dir, steps=1)
    return out if dist.get_rank() == 0 else {}


def _reference_group(names: list[str]) -> dict:
    data = batches()
    return {reference_key(name): run_layout(name, data, reference=True) for name in names}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{layout: (distributed RunResult, reference RunResult)}, each group spawned once, each
    distinct reference run once; the group holding RESUME runs after the one holding SAVE."""
    cache: dict[str, tuple] = {}
    references: dict[tuple, object] = {}
    ckpt_dir = str(tmp_path_factory.mktemp("mm_ckpt") / "step2")

    def run_group(group: str) -> None:
        if RESUME in RUN_GROUPS[group] and SAVE not in cache:
            run_group(next(g for g, names in RUN_GROUPS.items() if SAVE in names))
        names = RUN_GROUPS[group]
        world = LAYOUTS[names[0]][0]
        dist_out = spawn(_train_group, world, (names, ckpt_dir), timeout_s=300)[0]
        missing = {reference_key(n): n for n in names if reference_key(n) not in references}
        if missing:
            references.update(spawn(_reference_group, 1, (list(missing.values()),),
                                    timeout_s=300)[0])
        for layout in names:
            cache[layout] = (dist_out[layout], references[reference_key(layout)])
        if "resumed" in dist_out:
            cache["resumed"] = (dist_out["resumed"], references[reference_key(RESUME)])

    def get(name: str):
        if name not in cache:
            run_group(next(g for g, names in RUN_GROUPS.items() if (name if name != "resumed"
                                                                     else RESUME) in names))
        return cache[name]

    return get


def assert_mm_matches(result, ref, first_step: int = 0, adam_outliers: bool = False) -> None:
    """`result` (steps first_step+1..STEPS) equals the reference: losses, aux losses, gradient
    norms, per-group losses, then the final weights (see `assert_weights_close`)."""
    steps = slice(first_step, STEPS)
    assert len(result.losses) == STEPS - first_step and len(ref.losses) == STEPS
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref.losses[steps]),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses),
                               torch.tensor(ref.aux_losses[steps]), rtol=NORM_RTOL, atol=1e-7)
    torch.testing.assert_close(torch.tensor(result.grad_norms),
                               torch.tensor(ref.grad_norms[steps]), rtol=NORM_RTOL, atol=0)
    for got, want in zip(result.metrics, ref.metrics[steps], strict=True):
        assert set(got) == set(want) and {"train/loss/image", "train/loss/audio"} <= set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=LOSS_RTOL, atol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert set(result.state) == set(ref.state) - {"lm_head.weight"} or \
        set(result.state) == set(ref.state)
    for key, value in result.state.items():
        if not value.is_floating_point():
            continue  # `micro_batches` counts this rank's micro-batches (the reference has more)
        assert_weights_close(key, value, ref.state[key], adam_outliers)


def assert_weights_close(key: str, got: torch.Tensor, want: torch.Tensor,
                         adam_outliers: bool) -> None:
    """Weights within WEIGHT_ATOL. With `adam_outliers` (layouts that split matmuls, tp), a
    few elements per 10⁴ may differ up to 10× more: AdamW divides each gradient element by
    its RMS + eps (1e-8), so an element whose gradient happens to be ~1e-9 (seen: the image
    patch weights, -2.4e-9 at one element) moves by an amount that the 1e-7 relative rounding
    of a split matmul decides (seen: 1.1e-4 on 3 of 24576 elements, with the model before
    it had shared experts). A real bug (a
    mis-scaled or missing gradient) moves whole tensors, which this still catches."""
    if not adam_outliers:
        torch.testing.assert_close(got, want, rtol=0, atol=WEIGHT_ATOL,
                                   msg=lambda m: f"{key}: {m}")
        return
    err = (got.float() - want.float()).abs()
    far = int((err > WEIGHT_ATOL).sum())
    assert far <= 1e-3 * err.numel() and float(err.max()) <= 10 * WEIGHT_ATOL, (
        f"{key}: {far} of {err.numel()} elements differ by more than {WEIGHT_ATOL}, "
        f"max {float(err.max()):.2e}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_multimodal_layout_matches_single_process(name, results):
    result, ref = results(name)
    assert_mm_matches(result, ref, adam_outliers=LAYOUTS[name][1].get("tp", 1) > 1)


@pytest.mark.distributed
def test_multimodal_resumes_under_another_layout(results):
    """Saved by SAVE after step 2, continued by RESUME for step 3: step 3 and the final weights
    equal the uninterrupted single-process run (expert stacks of every modality group are
    saved one expert per key, so the new layout reads the experts it holds)."""
    result, ref = results("resumed")
    assert_mm_matches(result, ref, first_step=2, adam_outliers=True)


def test_harness_rows_have_equal_targets_and_uneven_media():
    """The property the reference rests on (equal targets per row) and the case the layouts
    must handle (a rank's rows without any media on odd steps)."""
    data = batches()
    targets = {int((row.groups[1:] >= 0).sum()) for step in data for row in step}
    assert len(targets) == 1
    assert any(row.media for row in data[1][:ROWS // 2])
    assert not any(row.media for row in data[1][ROWS // 2:])


def test_expert_parallel_must_divide_every_modality_group():
    """Each modality group's experts are sharded over the ep ranks, so ep divides each group
    (refused at config time, before any process starts)."""
    from pathlib import Path

    from mmfm.config import ConfigError, load_config

    preset = Path(__file__).resolve().parents[1] / "configs" / "mm_moe_tiny.yaml"
    assert load_config(preset, ["parallel.ep=4"]).parallel.ep == 4  # groups 8, 4, 4
    with pytest.raises(ConfigError, match=r"parallel.ep=8 does not divide "
                                          r"multimodal.modality_experts.image=4"):
        load_config(preset, ["parallel.ep=8"])
