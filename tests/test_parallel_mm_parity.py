"""Every layout trains the multimodal model (image and audio encoders, projectors, fusion,
modality expert groups) like one process does (CPU, gloo, fp32).

Harness: `mmfm.parallel.mm_runner` — 3 AdamW steps on fixed interleaved batches of 8 rows × 32
tokens with real image/audio preprocessing; on odd steps half the ranks see no media at all.
The reference is the same `Trainer` on one process with gradient accumulation over the
layout's aux domains (see the harness docstring for why that is the same objective). Compared:
LM loss, aux loss, per-target-group losses (`train/loss/text|image|audio`), gradient norms and
the final weights, with the tolerances of tests/test_parallel_parity.py (the runs differ only
in summation order).

Layouts run in groups so one set of processes (one torch import) trains several.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_parallel_parity import LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL

from mmfm.config import ModelConfig, TrainConfig
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.local import spawn
from mmfm.parallel.mm_runner import (
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
                                     bias_update_rate=0.01, z_loss_coef=1e-3))


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


def pcfg_of(name: str) -> ParallelConfig:
    world, kw, _, _, _ = LAYOUTS[name]
    pcfg = ParallelConfig(**kw)
    pcfg.dp = pcfg.resolved_dp(world)
    return pcfg


def train_cfg(name: str) -> TrainConfig:
    return dataclasses.replace(TRAIN, grad_accum=LAYOUTS[name][3])


def batches():
    return make_mm_rows(STEPS, ROWS, SEQ, VOCAB, tiny_encoders())


def run_layout(name: str, data, reference: bool = False):
    world, _, layers, _, routing = LAYOUTS[name]
    args = (model_cfg(layers), pcfg_of(name), train_cfg(name))
    if reference:
        return mm_reference_run(*args, world, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS)
    return mm_distributed_run(*args, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS)


def _train_group(names: list[str]) -> dict:
    import torch.distributed as dist

    data = batches()
    out = {name: run_layout(name, data) for name in names}
    return out if dist.get_rank() == 0 else {}


def _reference_group(names: list[str]) -> dict:
    data = batches()
    return {name: run_layout(name, data, reference=True) for name in names}


@pytest.fixture(scope="module")
def results():
    """{layout: (distributed RunResult, reference RunResult)}, each group spawned once."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        group = next(g for g, names in RUN_GROUPS.items() if name in names)
        if name not in cache:
            world = LAYOUTS[RUN_GROUPS[group][0]][0]
            dist_out = spawn(_train_group, world, (RUN_GROUPS[group],), timeout_s=300)[0]
            ref_out = spawn(_reference_group, 1, (RUN_GROUPS[group],), timeout_s=300)[0]
            for layout in RUN_GROUPS[group]:
                cache[layout] = (dist_out[layout], ref_out[layout])
        return cache[name]

    return get


def assert_mm_matches(result, ref) -> None:
    assert len(result.losses) == len(ref.losses) == STEPS
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref.losses),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor(ref.aux_losses),
                               rtol=NORM_RTOL, atol=1e-7)
    torch.testing.assert_close(torch.tensor(result.grad_norms), torch.tensor(ref.grad_norms),
                               rtol=NORM_RTOL, atol=0)
    for got, want in zip(result.metrics, ref.metrics, strict=True):
        assert set(got) == set(want) and {"train/loss/image", "train/loss/audio"} <= set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=LOSS_RTOL, atol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert set(result.state) == set(ref.state) - {"lm_head.weight"} or \
        set(result.state) == set(ref.state)
    for key, value in result.state.items():
        if not value.is_floating_point():
            continue  # `micro_batches` counts this rank's micro-batches (the reference has more)
        torch.testing.assert_close(value, ref.state[key], rtol=0, atol=WEIGHT_ATOL,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_multimodal_layout_matches_single_process(name, results):
    result, ref = results(name)
    assert_mm_matches(result, ref)


def test_harness_rows_have_equal_targets_and_uneven_media():
    """The property the reference rests on (equal targets per row) and the case the layouts
    must handle (a rank's rows without any media on odd steps)."""
    data = batches()
    targets = {int((row.groups[1:] >= 0).sum()) for step in data for row in step}
    assert len(targets) == 1
    assert any(row.media for row in data[1][:ROWS // 2])
    assert not any(row.media for row in data[1][ROWS // 2:])
