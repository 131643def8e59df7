"""Multimodal checkpoints whose modality groups' expert stacks were saved under one key (the
form before those stacks counted as routed experts, same FORMAT_VERSION 2) are converted on
read: they resume on one process and under dp2 × ep2, and `Checkpoint.load_model` (the reader
of `load_model_from_checkpoint`) reads them.

The old form is written by today's code with `is_routed_expert` in mmfm.parallel.checkpoint
patched to the rule it had then (`".ffn.experts." in name`); the test first checks that the
checkpoint really holds each group's stack (and its moments) under one key. Harness and
tolerances: tests/test_parallel_mm_parity.py (3 AdamW steps; the checkpoint after step 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parallel_mm_parity import (
    GROUPS_OF_EXPERTS,
    assert_mm_matches,
    assert_states_match,
    batches,
    layout_model_cfg,
    train_cfg,
)

from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.local import spawn
from mmfm.parallel.mm_runner import mm_distributed_run, mm_reference_run, tiny_encoders

SAVED_AT = 2
LAYOUT = "fsdp_dp2_ep2_moma"  # the parity table's model and train config for this layout
IMAGE_W1 = "decoder.blocks.0.ffn.groups.image.experts.w1"


def _old_rule(name: str) -> bool:
    return ".ffn.experts." in name


def _layout(engine: str, reshard_loader: bool = False) -> ParallelConfig:
    return ParallelConfig(engine=engine, dp=2, ep=2, reshard_loader=reshard_loader)


def _run(pcfg: ParallelConfig, data, groups=GROUPS_OF_EXPERTS, **kwargs):
    """The layout's run (under `pcfg`) on the parity harness's multimodal model."""
    return mm_distributed_run(layout_model_cfg(LAYOUT), pcfg, train_cfg(LAYOUT), data,
                              tiny_encoders(), "modality", groups, **kwargs)


def _reference(data, **kwargs):
    """The one-process run that dp2 × ep2 must reproduce (one micro-batch per step)."""
    return mm_reference_run(layout_model_cfg(LAYOUT), _layout("fsdp"), train_cfg(LAYOUT), 2, data,
                            tiny_encoders(), "modality", GROUPS_OF_EXPERTS, **kwargs)


def _one_process(ckpt: str) -> dict:
    """Worker (world 1): the uninterrupted reference, saving the old form after step 2; then,
    with today's rule, that checkpoint read by `load_model`, restored (no step), resumed, and
    resumed into a model whose image group has more experts than the checkpoint's."""
    from mmfm.parallel.mm_runner import FixedMMTask
    from mmfm.train.checkpoint import CheckpointError, find_checkpoint

    data = batches()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmfm.parallel.checkpoint.is_routed_expert", _old_rule)
        ref = _reference(data, save_to=ckpt, save_at=SAVED_AT)
    model = FixedMMTask(layout_model_cfg(LAYOUT), tiny_encoders(), "modality",
                        GROUPS_OF_EXPERTS, data, 1).build_model()
    find_checkpoint(Path(ckpt)).load_model(model)
    restored = _reference(data, load_from=ckpt, steps=0)
    resumed = _reference(data, load_from=ckpt)
    try:
        _run(ParallelConfig(engine="ddp"), data, {**GROUPS_OF_EXPERTS, "image": 4},
             load_from=ckpt, steps=0)
        misfit = ""
    except CheckpointError as err:
        misfit = str(err)
    return {"ref": ref, "restored": restored.state, "resumed": resumed, "misfit": misfit,
            "load_model": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _dp2_ep2(ckpt: str) -> dict:
    """Worker (world 2): the old-form one-process checkpoint resumed under dp2 × ep2, FSDP
    (each rank's expert stack a DTensor) and DDP (a plain local tensor). The loader positions
    of dp 1 do not carry over to dp 2 (`reshard_loader`: the data order restarts), so the
    resumed run is handed the batches from step 3 on."""
    import torch.distributed as dist

    rest = batches()[SAVED_AT:]
    out = {engine: _run(_layout(engine, reshard_loader=True), rest, load_from=ckpt, steps=1)
           for engine in ("fsdp", "ddp")}
    return out if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def old_form(tmp_path_factory) -> tuple[str, dict]:
    ckpt = str(tmp_path_factory.mktemp("old_form") / "step2")
    return ckpt, spawn(_one_process, 1, (ckpt,), timeout_s=300)[0]


def test_checkpoint_is_in_the_old_form(old_form):
    """Each modality group's expert stack and its moments sit under one key, (E_g, ...)."""
    from mmfm.parallel.checkpoint import FORMAT_VERSION
    from mmfm.parallel.checkpoint import read_meta as read

    ckpt, _ = old_form
    keys = _saved_keys(ckpt)
    for prefix in (f"model.{IMAGE_W1}", f"optim.{IMAGE_W1}.exp_avg", f"optim.{IMAGE_W1}.exp_avg_sq"):
        assert keys[prefix][0] == GROUPS_OF_EXPERTS["image"], prefix
        assert f"{prefix}#0" not in keys
    assert not any("#" in k for k in keys)
    assert read(Path(ckpt))["format_version"] == FORMAT_VERSION == 2


def _saved_keys(path: str) -> dict[str, tuple[int, ...]]:
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: tuple(m.size) for k, m in meta.items() if hasattr(m, "size")}


def test_old_form_resumes_on_one_process(old_form):
    """Restored weights equal what `load_model` reads; the resumed step 3 and final weights
    equal the uninterrupted run's exactly (same process, same order of operations)."""
    _, seen = old_form
    ref, resumed = seen["ref"], seen["resumed"]
    assert f"{IMAGE_W1}" in seen["restored"]
    for key, value in seen["restored"].items():
        assert torch.equal(seen["load_model"][key], value), key
    assert resumed.losses == ref.losses[SAVED_AT:]
    assert resumed.grad_norms == ref.grad_norms[SAVED_AT:]
    for key, value in ref.state.items():
        assert torch.equal(resumed.state[key], value), key


def test_old_form_stack_that_does_not_fit_is_refused(old_form):
    _, seen = old_form
    assert "does not fit this model" in seen["misfit"]
    assert f"model.{IMAGE_W1} has shape (2, 32, 32)" in seen["misfit"], seen["misfit"]


@pytest.mark.distributed
def test_old_form_resumes_under_dp2_ep2(old_form):
    """The one-process old-form checkpoint continued by 2 processes, each holding one expert
    of each modality group: step 3 and the final weights equal the uninterrupted run."""
    ckpt, seen = old_form
    out = spawn(_dp2_ep2, 2, (ckpt,), timeout_s=300)[0]
    for engine in ("fsdp", "ddp"):
        assert_mm_matches(out[engine], seen["ref"], first_step=SAVED_AT)
    assert_states_match(out["fsdp"].state, out["ddp"].state)
