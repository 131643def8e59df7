"""Checkpoint compatibility (mmfm.train.compat) and disk-full writes (mmfm.train.diskfull)."""

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from mmfm.config import load_config
from mmfm.errors import MmfmError
from mmfm.train.compat import (
    CheckpointMismatch,
    check_meta,
    check_resume_config,
    check_step_matches_state,
    config_differences,
)
from mmfm.train.diskfull import DiskFullError, checkpoint_write

TINY = Path(__file__).resolve().parents[1] / "configs" / "text_moe_tiny.yaml"
DIGEST = hashlib.sha256(b"x").hexdigest()


def saved(*overrides):
    return load_config(TINY, list(overrides)).to_dict()


def test_same_config_passes_and_schedule_or_compute_changes_are_allowed():
    check_resume_config(saved(), load_config(TINY), "step_00000010")
    check_resume_config(saved(), load_config(TINY, ["train.steps=500", "train.lr=1e-3",
                                                    "model.fused_loss=false",
                                                    "model.moe.backend=loop"]), "c")


def test_differences_are_all_named_in_one_line():
    with pytest.raises(CheckpointMismatch) as info:
        check_resume_config(saved(), load_config(TINY, ["model.moe.top_k=1", "model.d_model=128",
                                                        "train.weight_decay=0.0"]), "run/step_10")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, MmfmError)
    assert message.startswith("checkpoint run/step_10 was written with another config: ")
    for part in ("model.moe.top_k=2 in the checkpoint, 1 here",
                 "model.d_model=256 in the checkpoint, 128 here",
                 "train.weight_decay=0.1 in the checkpoint, 0.0 here"):
        assert part in message


def test_num_experts_and_vocab_mismatch_are_refused_before_loading_weights():
    diffs = config_differences(saved("model.moe.num_experts=4", "model.moe.top_k=2"),
                               load_config(TINY, ["model.vocab_size=4096"]).to_dict())
    assert diffs == ["model.moe.num_experts=4 in the checkpoint, 8 here",
                     "model.vocab_size=8192 in the checkpoint, 4096 here"]


def test_dense_versus_moe_is_one_line_not_one_per_field():
    diffs = config_differences(saved(), load_config(TINY, ["model.moe=null"]).to_dict())
    assert diffs == ["model.moe=set in the checkpoint, null here"]


def test_multimodal_encoder_shapes_are_compared_but_data_settings_are_not():
    mm = TINY.parent / "mm_moe_tiny.yaml"
    before = load_config(mm).to_dict()
    check_resume_config(before, load_config(mm, ["multimodal.shuffle_buffer=8",
                                                 "multimodal.strict=true"]), "c")
    diffs = config_differences(before, load_config(mm, ["multimodal.image.width=64"]).to_dict())
    assert diffs == ["multimodal.image.width=128 in the checkpoint, 64 here"]


def test_config_missing_from_meta_is_refused():
    with pytest.raises(CheckpointMismatch, match="has no saved config"):
        check_resume_config(None, load_config(TINY), "c")


@pytest.mark.parametrize("meta, fragment", [
    ({"step": -3, "sha256": {"model.safetensors": DIGEST, "state.pt": DIGEST}}, "step=-3"),
    ({"step": "5", "sha256": {"model.safetensors": DIGEST, "state.pt": DIGEST}}, "step='5'"),
    ({"step": 5, "sha256": {}}, "has no sha256 table"),
    ({"step": 5}, "has no sha256 table"),
    ({"step": 5, "sha256": {"model.safetensors": DIGEST}}, "sha256 lacks state.pt"),
    ({"step": 5, "sha256": {"model.safetensors": "abc", "state.pt": DIGEST}},
     "sha256 of model.safetensors is not a SHA-256"),
    ([1, 2], "not a JSON object"),
])
def test_meta_needs_a_valid_step_and_hashes(meta, fragment):
    with pytest.raises(CheckpointMismatch, match="checkpoint c: ") as info:
        check_meta(meta, "c")
    assert fragment in str(info.value)


def test_good_meta_returns_the_step():
    assert check_meta({"step": 7, "sha256": {"model.safetensors": DIGEST, "state.pt": DIGEST}}, "c") == 7
    model_dir = {"step": 0, "sha256": {"model.safetensors": DIGEST}}
    assert check_meta(model_dir, "imported", required=("model.safetensors",)) == 0


def test_step_is_checked_against_the_scheduler_state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(100):
        opt.step()
        sched.step()
    state = {"scheduler": sched.state_dict()}
    check_step_matches_state(100, state, "c")
    with pytest.raises(CheckpointMismatch, match="step=5000 but its saved trainer state is at step 100"):
        check_step_matches_state(5000, state, "c")
    with pytest.raises(CheckpointMismatch, match="no scheduler step count"):
        check_step_matches_state(100, {}, "c")


def test_checkpoint_write_renames_into_place(tmp_path):
    final = tmp_path / "checkpoints" / "step_00000010"
    with checkpoint_write(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 10)
    assert (final / "model.safetensors").read_bytes() == b"w" * 10
    assert sorted(os.listdir(final.parent)) == ["step_00000010"]


def test_disk_full_is_one_line_with_path_and_sizes_and_no_temp_left(tmp_path):
    previous = tmp_path / "checkpoints" / "step_00000005"
    previous.mkdir(parents=True)
    final = tmp_path / "checkpoints" / "step_00000010"
    with pytest.raises(DiskFullError) as info:
        with checkpoint_write(final, expected_bytes=3 * 2**20) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * 2048)
            raise OSError(errno.ENOSPC, "No space left on device")  # as the next write would
    message = str(info.value)
    assert message.startswith(f"no space left on device writing {final}: wrote 2.0 KiB of about "
                              "3.0 MiB, ")
    assert "free on" in message and "\n" not in message
    assert isinstance(info.value, MmfmError) and info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(final.parent)) == ["step_00000005"]  # the resume point stays


def test_other_errors_remove_the_temp_folder_and_propagate(tmp_path):
    final = tmp_path / "step_00000010"
    with pytest.raises(OSError) as info:
        with checkpoint_write(final):
            raise OSError(errno.EIO, "I/O error")
    assert not isinstance(info.value, DiskFullError)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint_write(final):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
