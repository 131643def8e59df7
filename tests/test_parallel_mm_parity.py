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
ranks; shared routing too), tensor parallel (with per-group shared experts split), ep × tp ×
dp, and pipeline parallel (encoders, projectors and fusion on stage 0), alone and composed
with dp, ep and tp; plus a checkpoint
written under dp2 × ep2 (2 processes) resumed under dp2 × ep2 × tp2 (4), and a pp2 checkpoint
loaded and resumed on one process. Layouts run in groups so one set of processes (one torch
import) trains several, and layouts with the same single-process reference share one
reference run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from test_parallel_parity import LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL, assert_step_stats

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
TIED_HEAD = "decoder.lm_head.weight"
GROUPS_OF_EXPERTS = {"text": 4, "image": 2, "audio": 2}
TRAIN = TrainConfig(steps=STEPS, micro_batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0,
                    precision="fp32", grad_clip=0.5)


def model_cfg(n_layers: int = 2, fused_loss: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=SEQ, fused_loss=fused_loss,
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
    # Pipeline: encoders, projectors and fusion on stage 0. grad_accum = microbatches: the
    # loader's micro-batches are the pipeline's; grad_accum 1: the step cuts the loader's
    # rows (and their media) into the pipeline's micro-batches itself.
    "pp2_gpipe_moma": (2, dict(engine="ddp", pp=2, microbatches=2, pp_schedule="gpipe"), 2, 2,
                       "modality"),
    "pp2_interleaved_ac_shared": (2, dict(engine="ddp", pp=2, microbatches=4,
                                          pp_virtual_stages=2, pp_schedule="interleaved_1f1b",
                                          activation_checkpointing=True), 4, 1, "shared"),
    "pp2_dp2_1f1b_fsdp_moma": (4, dict(engine="fsdp", pp=2, microbatches=2, pp_schedule="1f1b"),
                               2, 1, "modality"),
    # Pipeline composed with expert parallelism (micro-batch j of both ep ranks is one aux
    # domain) and with tensor parallelism.
    "pp2_dp2_ep2_gpipe_fsdp_moma": (4, dict(engine="fsdp", pp=2, ep=2, microbatches=2,
                                            pp_schedule="gpipe"), 2, 1, "modality"),
    "pp2_tp2_1f1b_moma": (4, dict(engine="ddp", pp=2, tp=2, microbatches=2, pp_schedule="1f1b"),
                          2, 2, "modality"),
}
RUN_GROUPS = {
    "mm2": ["ddp_dp2_moma", "fsdp_dp2_shared", "fsdp_dp2_ep2_moma", "ddp_dp2_ep2_shared"],
    "mm4": ["ddp_dp2_tp2_moma", "fsdp_dp2_ep2_tp2_moma"],
    "mm_pp2": ["pp2_gpipe_moma", "pp2_interleaved_ac_shared"],
    "mm_pp4": ["pp2_dp2_1f1b_fsdp_moma", "pp2_dp2_ep2_gpipe_fsdp_moma", "pp2_tp2_1f1b_moma"],
}
# Cross-layout resume: the checkpoint SAVE writes after step 2 (2 processes, experts of each
# modality group split over 2 ranks) is continued for step 3 by RESUME (4 processes, the same
# ep group now also split by tp). Both have one aux domain per step, so one reference serves.
SAVE, RESUME = "fsdp_dp2_ep2_moma", "fsdp_dp2_ep2_tp2_moma"
# Checkpointed after this step of this layout's run, then resumed on one process.
CHECKPOINTED = ("pp2_gpipe_moma", 2)


def pcfg_of(name: str) -> ParallelConfig:
    world, kw, _, _, _ = LAYOUTS[name]
    pcfg = ParallelConfig(**kw)
    pcfg.dp = pcfg.resolved_dp(world)
    return pcfg


def train_cfg(name: str) -> TrainConfig:
    return dataclasses.replace(TRAIN, grad_accum=LAYOUTS[name][3])


def batches():
    return make_mm_rows(STEPS, ROWS, SEQ, VOCAB, tiny_encoders())


def is_pipeline(name: str) -> bool:
    return LAYOUTS[name][1].get("pp", 1) > 1


def layout_model_cfg(name: str) -> ModelConfig:
    """The model of a layout's run and its reference. A pipeline's last stage computes the
    plain LM head and cross entropy (as the text pipeline does), so its reference does too:
    against the fused head + loss kernel, AdamW (lr 1e-2) turns the kernel's other summation
    order on weights with near-zero gradients into differences up to 6e-5 (2 of 24576 image
    patch weights), over the weight tolerance."""
    return model_cfg(LAYOUTS[name][2], fused_loss=not is_pipeline(name))


def run_layout(name: str, data, reference: bool = False, **kwargs):
    world, _, _, _, routing = LAYOUTS[name]
    args = (layout_model_cfg(name), pcfg_of(name), train_cfg(name))
    if reference:
        return mm_reference_run(*args, world, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS,
                                **kwargs)
    return mm_distributed_run(*args, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS, **kwargs)


def reference_key(name: str) -> tuple:
    """What a layout's single-process reference depends on (layouts sharing it share one run)."""
    world, _, layers, _, routing = LAYOUTS[name]
    pcfg = pcfg_of(name)
    return (aux_domains_per_step(pcfg, train_cfg(name), world), pcfg.ep, routing, layers,
            is_pipeline(name))


def eval_loss(name: str, data, reference: bool = False) -> float:
    """`Trainer.evaluate` of the freshly built model (same seed on every layout) on one
    validation batch of 8 rows (step 1's: media in half the rows), under the layout (pipeline:
    `pipeline_eval_loss`) or on one process."""
    from mmfm.parallel.mm_runner import FixedMMTask
    from mmfm.parallel.runner import fixed_batch_trainer

    pcfg = ParallelConfig(engine="ddp") if reference else pcfg_of(name)
    task = FixedMMTask(layout_model_cfg(name), tiny_encoders(), LAYOUTS[name][4],
                       GROUPS_OF_EXPERTS, data, train_cfg(name).grad_accum, eval_rows=data[1])
    trainer = fixed_batch_trainer(layout_model_cfg(name), pcfg, train_cfg(name), data, task=task)
    return trainer.evaluate()


def _train_group(names: list[str], ckpt_dirs: dict[str, str]) -> dict:
    """Worker: train each layout of the group (and evaluate pipelined ones); SAVE and the
    CHECKPOINTED layout write their checkpoints after step 2, and RESUME (in the group of its
    world size) continues SAVE's for step 3."""
    import torch.distributed as dist

    data = batches()
    out = {}
    for name in names:
        save = {}
        if name == SAVE:
            save = {"save_to": ckpt_dirs["ep"], "save_at": 2}
        elif name == CHECKPOINTED[0]:
            save = {"save_to": ckpt_dirs["pp"], "save_at": CHECKPOINTED[1]}
        out[name] = run_layout(name, data, **save)
        if is_pipeline(name):
            out[f"eval:{name}"] = eval_loss(name, data)
    if RESUME in names and os.path.isdir(ckpt_dirs["ep"]):
        out["resumed"] = run_layout(RESUME, data, load_from=ckpt_dirs["ep"], steps=1)
    return out if dist.get_rank() == 0 else {}


def _reference_group(names: list[str], evals: list[str], pp_ckpt: str | None) -> dict:
    """One process: the references of `names` (by `reference_key`), the evaluation of the
    fresh model for the pipelined layouts `evals`, and the pp checkpoint's one-process
    resume when `pp_ckpt` is given."""
    data = batches()
    out: dict = {reference_key(name): run_layout(name, data, reference=True) for name in names}
    for name in evals:
        out[f"eval:{name}"] = eval_loss(name, data, reference=True)
    if pp_ckpt is not None:
        out["resume"] = _resume_on_one_process(data, pp_ckpt)
    return out


def _resume_on_one_process(data, ckpt_dir: str) -> dict:
    """The pipelined run's checkpoint on one process: read into the full model by
    `Checkpoint.load_model` (names and shapes must fit), restored by the one-process Trainer
    (weights must equal those), and resumed there for the remaining steps."""
    from mmfm.parallel.mm_runner import FixedMMTask
    from mmfm.train.checkpoint import find_checkpoint

    name = CHECKPOINTED[0]
    model = FixedMMTask(layout_model_cfg(name), tiny_encoders(), LAYOUTS[name][4],
                        GROUPS_OF_EXPERTS, data, 1).build_model()
    find_checkpoint(Path(ckpt_dir)).load_model(model)
    restored = run_layout(name, data, reference=True, load_from=ckpt_dir, steps=0)
    resumed = run_layout(name, data, reference=True, load_from=ckpt_dir)
    return {"load_model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "restored": restored.state, "resumed": resumed}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{layout: (distributed RunResult, reference RunResult)}, each group spawned once, each
    distinct reference run once; "eval:<layout>": (pipelined, one-process) validation loss;
    "resumed": SAVE's checkpoint continued by RESUME; "resume": what
    `_resume_on_one_process` saw. The group holding RESUME runs after the one holding SAVE."""
    cache: dict[str, tuple] = {}
    references: dict = {}
    root = tmp_path_factory.mktemp("mm_ckpt")
    ckpt_dirs = {"ep": str(root / "ep_step2"), "pp": str(root / "pp_step2")}

    def run_group(group: str) -> None:
        if RESUME in RUN_GROUPS[group] and SAVE not in cache:
            run_group(next(g for g, names in RUN_GROUPS.items() if SAVE in names))
        names = RUN_GROUPS[group]
        world = LAYOUTS[names[0]][0]
        dist_out = spawn(_train_group, world, (names, ckpt_dirs), timeout_s=300)[0]
        missing = {reference_key(n): n for n in names if reference_key(n) not in references}
        evals = [n for n in names if is_pipeline(n)]
        pp_ckpt = ckpt_dirs["pp"] if CHECKPOINTED[0] in names else None
        ref_out = spawn(_reference_group, 1, (list(missing.values()), evals, pp_ckpt),
                        timeout_s=300)[0]
        references.update({k: v for k, v in ref_out.items() if isinstance(k, tuple)})
        for layout in names:
            cache[layout] = (dist_out[layout], references[reference_key(layout)])
        for layout in evals:
            cache[f"eval:{layout}"] = (dist_out[f"eval:{layout}"], ref_out[f"eval:{layout}"])
        if "resumed" in dist_out:
            cache["resumed"] = (dist_out["resumed"], references[reference_key(RESUME)])
        if "resume" in ref_out:
            cache["resume"] = ref_out["resume"]

    def layout_of(name: str) -> str:
        if name == "resumed":
            return RESUME
        if name == "resume":
            return CHECKPOINTED[0]
        return name.removeprefix("eval:")

    def get(name: str):
        if name not in cache:
            layout = layout_of(name)
            run_group(next(g for g, names in RUN_GROUPS.items() if layout in names))
        return cache[name]

    return get


def assert_mm_matches(result, ref, first_step: int = 0, adam_outliers: bool = False) -> None:
    """`result` (steps first_step+1..STEPS) equals the reference: losses, aux losses, gradient
    norms, per-group losses, then the final weights (see `assert_states_match`)."""
    steps = slice(first_step, STEPS)
    assert len(result.losses) == STEPS - first_step and len(ref.losses) == STEPS
    assert_step_stats(result, ref, steps)
    for got, want in zip(result.metrics, ref.metrics[steps], strict=True):
        assert set(got) == set(want) and {"train/loss/image", "train/loss/audio"} <= set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=LOSS_RTOL, atol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert_states_match(result.state, ref.state, adam_outliers)


def assert_states_match(state: dict, ref_state: dict, adam_outliers: bool = False) -> None:
    """Same weights by name. A pipelined layout holds the tied LM head on the last stage
    under its own name, `decoder.lm_head.weight`: it must equal the embedding."""
    assert set(state) - set(ref_state) <= {TIED_HEAD}, set(state) - set(ref_state)
    assert set(ref_state) - set(state) <= {TIED_HEAD}, set(ref_state) - set(state)
    for key, value in state.items():
        if not value.is_floating_point():
            continue  # `micro_batches` counts this rank's micro-batches (the reference has more)
        want = ref_state[key if key in ref_state else "decoder.embed.weight"]
        assert_weights_close(key, value, want, adam_outliers)


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


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n, layout in LAYOUTS.items() if layout[1].get("pp", 1) > 1])
def test_pipeline_evaluation_matches_single_process(name, results):
    """Validation through the pipeline (media looked up by the first stage, the loss on the
    last) gives the one-process loss of the same weights."""
    got, want = results(f"eval:{name}")
    assert abs(got - want) <= LOSS_RTOL * abs(want), (got, want)


@pytest.mark.distributed
def test_pipeline_checkpoint_loads_and_resumes_on_one_process(results):
    """The pp2 run's step-2 checkpoint: `load_model` reads it into the full multimodal model
    (encoders included) with the weights the one-process Trainer restores, and one process
    resumed from it trains step 3 as the uninterrupted reference does."""
    _, ref = results(CHECKPOINTED[0])
    seen = results("resume")
    restored = seen["restored"]
    for key, value in restored.items():
        loaded = seen["load_model"][key]
        assert torch.equal(loaded, value), key
    assert any(key.startswith("slots.audio.encoder.") for key in restored)
    resumed = seen["resumed"]
    step = CHECKPOINTED[1]
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(ref.losses[step:]),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(resumed.grad_norms),
                               torch.tensor(ref.grad_norms[step:]), rtol=NORM_RTOL, atol=0)
    for got, want in zip(resumed.metrics, ref.metrics[step:], strict=True):
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0)
    assert_states_match(resumed.state, ref.state)


def test_harness_rows_have_equal_targets_and_uneven_media():
    """The property the reference rests on (equal targets per row) and the case the layouts
    must handle (a rank's rows without any media on odd steps)."""
    data = batches()
    targets = {int((row.groups[1:] >= 0).sum()) for step in data for row in step}
    assert len(targets) == 1
    assert any(row.media for row in data[1][:ROWS // 2])
    assert not any(row.media for row in data[1][ROWS // 2:])


def test_pipeline_micro_batches_carry_their_rows_media():
    """The step's cut of loader micro-batches into pipeline micro-batches: each range of rows
    gets exactly the media items (data up to padding, lengths, token counts) that collating
    those rows directly gives, whether it splits one loader batch or joins two."""
    from mmfm.data.mm_pack import collate_rows
    from mmfm.parallel.mm_pipeline import micro_batch_media
    from mmfm.parallel.mm_runner import preprocessors, special_ids

    rows = batches()[0]
    pre = preprocessors(tiny_encoders())
    ids = {m: special_ids(VOCAB)[m] for m in ("image", "audio")}
    loader = [collate_rows(rows[i:i + 2], pre) for i in range(0, 8, 2)]
    for microbatches in (8, 2):  # split each loader batch in two / join two loader batches
        per = len(rows) // microbatches
        got = micro_batch_media(loader, microbatches, ids)
        for k, media in enumerate(got):
            want = collate_rows(rows[k * per:(k + 1) * per], pre).media
            for m in ids:
                assert torch.equal(media[m].num_tokens, want[m].num_tokens), (microbatches, k, m)
                assert torch.equal(media[m].lengths, want[m].lengths)
                trimmed = media[m].data[(...,) + tuple(slice(0, n) for n in want[m].data.shape[1:])]
                assert torch.equal(trimmed, want[m].data)
    assert sum(len(mb["audio"]) for mb in got) == sum(len(b.media["audio"]) for b in loader) > 0


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
