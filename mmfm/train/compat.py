"""Is a checkpoint usable by this run? Pure checks on its `meta.json` and saved config.

- `check_resume_config`: the checkpoint's saved config (meta["config"]) against the current
  `ExperimentConfig`, field by field over the model and the optimizer settings whose state the
  checkpoint carries; one `CheckpointMismatch` line names every differing field, e.g.
  `model.moe.top_k=2 in the checkpoint, 1 here`. Settings that change only how the same weights
  compute (`model.fused_loss`, `model.moe.backend`) or the schedule (`train.lr`, `train.steps`:
  extending a run is legitimate) may differ.
- `check_meta`: meta.json must carry a non-empty SHA-256 table naming the weight and state
  files, and a step that is a non-negative integer (an edited `"step": -3` or an emptied hash
  table over corrupt weights used to load and train).
- `check_step_matches_state`: the meta step against the scheduler's own step count in state.pt
  (an edited `"step": 5000` on a step-100 state is refused).
"""

from __future__ import annotations

from typing import Any

from mmfm.train.checkpoint import CheckpointError

# Config sections/fields whose values shape the weights or the optimizer state (the encoders
# and projectors of a multimodal model are weights too).
COMPARED_SECTIONS = ("model", "multimodal.image", "multimodal.audio", "multimodal.moe_routing",
                     "multimodal.modality_experts")
COMPARED_FIELDS = ("train.beta1", "train.beta2", "train.weight_decay", "data.kind")
# Same weights, computed another way, or used only before the first step: free to differ.
COMPUTE_ONLY = frozenset({"model.fused_loss", "model.moe.backend",
                          "multimodal.image.pretrained_path", "multimodal.audio.pretrained_path"})
REQUIRED_FILES = ("model.safetensors", "state.pt")


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not belong to this run's config, or whose metadata is wrong."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.moe.top_k': 2, ...} from a nested dict; None and leaves stay as values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field=saved in the checkpoint, current here` for every compared field that differs."""
    old, new = flatten(saved), flatten(current)
    keys = {k for k in old.keys() | new.keys() if _compared(k)}
    diffs = []
    # A section set on one side and null on the other (model.moe): one line, not one per field.
    for key in sorted(k for k in keys if old.get(k, 0) is None or new.get(k, 0) is None):
        inner = {k for k in keys if k.startswith(key + ".")}
        if inner:
            keys -= inner | {key}
            diffs.append(f"{key}={'null' if old.get(key, 0) is None else 'set'} in the checkpoint, "
                         f"{'null' if new.get(key, 0) is None else 'set'} here")
    for key in sorted(keys):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b and not _same_number(a, b):
            diffs.append(f"{key}={_show(a)} in the checkpoint, {_show(b)} here")
    return diffs


def check_resume_config(saved: dict[str, Any] | None, current, checkpoint: str) -> None:
    """Raise CheckpointMismatch naming every model/optimizer field where the checkpoint's saved
    config differs from `current` (an ExperimentConfig or its `to_dict()`)."""
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json has no saved config to "
                                 "compare with this run")
    now = current if isinstance(current, dict) else current.to_dict()
    diffs = config_differences(saved, now)
    if diffs:
        raise CheckpointMismatch(f"checkpoint {checkpoint} was written with another config: "
                                 + "; ".join(diffs))


def check_meta(meta: Any, checkpoint: str, required: tuple[str, ...] = REQUIRED_FILES) -> int:
    """Validate meta.json's step and hash table; return the step. A model directory (from
    `mmfm import hf` or `mmfm upcycle`, used by train.init_from) passes
    `required=("model.safetensors",)`: it has no trainer state."""
    if not isinstance(meta, dict):
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json is not a JSON object")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json step={step!r} must be an "
                                 "integer >= 0")
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json has no sha256 table; "
                                 "the files cannot be verified")
    missing = [name for name in required if name not in hashes]
    if missing:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json sha256 lacks "
                                 f"{', '.join(missing)}")
    bad = [name for name, digest in hashes.items() if not _is_sha256(digest)]
    if bad:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json sha256 of {', '.join(bad)} "
                                 "is not a SHA-256 hex digest")
    return step


def check_step_matches_state(meta_step: int, state: dict[str, Any], checkpoint: str) -> None:
    """The scheduler in state.pt counts the steps it was stepped; it must equal meta's step."""
    scheduler = state.get("scheduler") if isinstance(state, dict) else None
    counted = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    if counted is None:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: state.pt has no scheduler step count")
    if int(counted) != meta_step:
        raise CheckpointMismatch(f"checkpoint {checkpoint}: meta.json step={meta_step} but its "
                                 f"saved trainer state is at step {counted}")


def _compared(key: str) -> bool:
    if key in COMPUTE_ONLY:
        return False
    return key in COMPARED_FIELDS or any(key == s or key.startswith(s + ".")
                                         for s in COMPARED_SECTIONS)


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) \
        and not isinstance(b, bool) and float(a) == float(b)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _is_sha256(digest: Any) -> bool:
    return isinstance(digest, str) and len(digest) == 64 and \
        all(c in "0123456789abcdef" for c in digest.lower())
