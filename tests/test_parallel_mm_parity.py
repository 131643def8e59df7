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
from pathlib import Path

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
TIED_HEAD = "decoder.lm_head.weight"
GROUPS_OF_EXPERTS = {"text": 4, "image": 2, "audio": 2}
TRAIN = TrainConfig(steps=STEPS, micro_batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0,
                    precision="fp32", grad_clip=0.5)


def model_cfg(n_layers: int = 2, fused_loss: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=SEQ, fused_loss=fused_loss,
                       moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=32,
                                     bias_update_rate=0.01, z_loss_coef=1e-3))


# name: (world size, parallel config, decoder layers, grad_accum, routing)
LAYOUTS = {
    "ddp_dp2_moma": (2, dict(engine="ddp"), 2, 2, "modality"),
    "fsdp_dp2_shared": (2, dict(engine="fsdp"), 2, 1, "shared"),
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
}
RUN_GROUPS = {
    "mm2": ["ddp_dp2_moma", "fsdp_dp2_shared"],
    "mm_pp2": ["pp2_gpipe_moma", "pp2_interleaved_ac_shared"],
    "mm_pp4": ["pp2_dp2_1f1b_fsdp_moma"],
}
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


def layout_model_cfg(name: str) -> ModelConfig:
    """The model of a layout's run and its reference. A pipeline's last stage computes the
    plain LM head and cross entropy (as the text pipeline does), so its reference does too:
    against the fused head + loss kernel, AdamW (lr 1e-2) turns the kernel's other summation
    order on weights with near-zero gradients into differences up to 6e-5 (2 of 24576 image
    patch weights), over the weight tolerance."""
    _, kw, layers, _, _ = LAYOUTS[name]
    return model_cfg(layers, fused_loss=kw.get("pp", 1) == 1)


def run_layout(name: str, data, reference: bool = False, **kwargs):
    world, _, _, _, routing = LAYOUTS[name]
    args = (layout_model_cfg(name), pcfg_of(name), train_cfg(name))
    if reference:
        return mm_reference_run(*args, world, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS,
                                **kwargs)
    return mm_distributed_run(*args, data, tiny_encoders(), routing, GROUPS_OF_EXPERTS, **kwargs)


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


def _train_group(names: list[str], ckpt_dir: str) -> dict:
    import torch.distributed as dist

    data = batches()
    out = {}
    for name in names:
        save = dict(save_to=ckpt_dir, save_at=CHECKPOINTED[1]) if name == CHECKPOINTED[0] else {}
        out[name] = run_layout(name, data, **save)
        if LAYOUTS[name][1].get("pp", 1) > 1:
            out[f"eval:{name}"] = eval_loss(name, data)
    return out if dist.get_rank() == 0 else {}


def _reference_group(names: list[str], ckpt_dir: str) -> dict:
    data = batches()
    out = {}
    for name in names:
        out[name] = run_layout(name, data, reference=True)
        if LAYOUTS[name][1].get("pp", 1) > 1:
            out[f"eval:{name}"] = eval_loss(name, data, reference=True)
    if CHECKPOINTED[0] in names:
        out["resume"] = _resume_on_one_process(data, ckpt_dir)
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
    """{layout: (distributed RunResult, reference RunResult)}, each group spawned once; and
    "resume": what `_resume_on_one_process` saw."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        layout = CHECKPOINTED[0] if name == "resume" else name.removeprefix("eval:")
        group = next(g for g, names in RUN_GROUPS.items() if layout in names)
        if name not in cache:
            world = LAYOUTS[RUN_GROUPS[group][0]][0]
            ckpt = str(tmp_path_factory.mktemp("mm_ckpt") / "ckpt")
            dist_out = spawn(_train_group, world, (RUN_GROUPS[group], ckpt), timeout_s=300)[0]
            ref_out = spawn(_reference_group, 1, (RUN_GROUPS[group], ckpt), timeout_s=300)[0]
            for key in dist_out:
                cache[key] = (dist_out[key], ref_out[key])
            if "resume" in ref_out:
                cache["resume"] = ref_out["resume"]
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
    assert_states_match(result.state, ref.state)


def assert_states_match(state: dict, ref_state: dict) -> None:
    """Same weights by name. A pipelined layout holds the tied LM head on the last stage
    under its own name, `decoder.lm_head.weight`: it must equal the embedding."""
    assert set(state) - set(ref_state) <= {TIED_HEAD}, set(state) - set(ref_state)
    assert set(ref_state) - set(state) <= {TIED_HEAD}, set(ref_state) - set(state)
    for key, value in state.items():
        if not value.is_floating_point():
            continue  # `micro_batches` counts this rank's micro-batches (the reference has more)
        want = ref_state[key if key in ref_state else "decoder.embed.weight"]
        torch.testing.assert_close(value, want, rtol=0, atol=WEIGHT_ATOL,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_multimodal_layout_matches_single_process(name, results):
    result, ref = results(name)
    assert_mm_matches(result, ref)


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
