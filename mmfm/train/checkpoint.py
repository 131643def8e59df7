"""Verifiable checkpoints: one training format at every world size, plus model directories.

A **training checkpoint** is `<run>/checkpoints/step_00000100/`, written by
`mmfm.parallel.checkpoint.save_distributed` at every world size (one process is a trivial
layout): torch.distributed.checkpoint (DCP) files holding tensors only, `objects.json` (loader
positions, RNG states) and `meta.json` (step, layout, config, SHA-256 of every file). It is
written into a temporary folder, flushed, and renamed into place, so a crash never leaves a
half-written `step_*` folder; any layout resumes it.

A **model directory** (`mmfm import hf`, `mmfm upcycle`, `mmfm export`) is consolidated
safetensors: `model.safetensors`, `config.yaml`, `meta.json`. It is the exchange format, read by
`train.init_from`, never a second training format.

A **legacy** checkpoint (model.safetensors + state.pt, written by single-process runs of older
mmfm) still resumes on one process: `Trainer` converts it on read.

This module reads all three without a process group: `verify_checkpoint` checks hashes,
`Checkpoint.model_state()` gives the full (unsharded) weights of any of them, so export, upcycle
and analysis work on checkpoints from any layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfm.errors import UserValueError

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
DCP_FORMAT = "mmfm-dcp"


class CheckpointError(UserValueError):
    """A checkpoint that cannot be used; the message names it and, where one exists, a good one."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        """"dcp" (training checkpoint), "legacy" (old single-process) or "model_dir"."""
        if self.meta.get("format") == DCP_FORMAT:
            return "dcp"
        return "legacy" if (self.path / STATE_FILE).is_file() else "model_dir"

    def model_state(self) -> dict[str, Tensor]:
        """Full weights and persistent buffers by their unsharded names, on the CPU."""
        if self.kind == "dcp":
            return _dcp_model_state(self.path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / MODEL_FILE))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint {self.path}: {MODEL_FILE} cannot be read "
                                  f"({str(err).splitlines()[0]})") from None

    def load_model(self, model: torch.nn.Module) -> None:
        """Copy this checkpoint's weights into an unwrapped model (same names and shapes)."""
        state = self.model_state()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state) - _tied_names(model))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}")
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise CheckpointError(
                    f"checkpoint {self.path} does not fit this model: {name} has shape "
                    f"{tuple(value.shape)} there, {tuple(expected[name].shape)} here")
        model.load_state_dict(state, strict=False)

    def load_legacy_state(self) -> dict[str, Any]:
        """Optimizer, scheduler, loader and RNG state of a legacy checkpoint (weights only)."""
        return torch.load(self.path / STATE_FILE, weights_only=True, map_location="cpu")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that alias another tensor (a tied LM head is saved once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied


def _dcp_model_state(path: Path) -> dict[str, Tensor]:
    """Read every `model.*` tensor of a DCP checkpoint on one process, with no process group;
    expert stacks saved one expert per key (`...w1#5`) are stacked again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    experts: dict[str, dict[int, Tensor]] = {}
    out = {}
    for key, value in state.items():
        name = key[len("model."):]
        if "#" in name:
            base, index = name.rsplit("#", 1)
            experts.setdefault(base, {})[int(index)] = value
        else:
            out[name] = value
    for base, pieces in experts.items():
        out[base] = torch.stack([pieces[i] for i in sorted(pieces)])
    return out


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Initialize `model` from a training checkpoint (any layout) or a model directory (hashes
    verified when it has a meta.json): the `train.init_from` path."""
    if (path / META_FILE).is_file():
        verify_checkpoint(path).load_model(model)
        return
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"train.init_from={path} holds no {MODEL_FILE} and no {META_FILE}")
    Checkpoint(path=path, step=0, meta={}).load_model(model)


def load_model_from_checkpoint(path: Path):
    """(ExperimentConfig, model in eval mode) of a checkpoint or model directory written by any
    layout: the saved config rebuilds the model (text Decoder or multimodal model), then the
    full weights are loaded. For analysis, export and upcycling."""
    from mmfm.config import config_from_dict

    ckpt = find_checkpoint(Path(path))
    if "config" not in ckpt.meta:
        raise CheckpointError(f"checkpoint {ckpt.path}: {META_FILE} has no config")
    cfg = config_from_dict(ckpt.meta["config"])
    if cfg.data.kind == "text":
        model = cfg.model.build()
    else:
        from mmfm.train.task import build_task

        model = build_task(cfg).build_model()
    ckpt.load_model(model)
    return cfg, model.eval()


def find_checkpoint(path: Path) -> Checkpoint:
    """A verified checkpoint: `path` itself, or the newest under path/checkpoints or path."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / META_FILE).is_file():
        return verify_checkpoint(path)
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path} holds no checkpoint ({META_FILE} or step_* folders)")


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)


def verify_checkpoint(path: Path) -> Checkpoint:
    """Read meta.json, check that its step and hash table are sound and that every file's hash
    matches; raise CheckpointError saying what is wrong."""
    from mmfm.train.compat import check_meta

    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE} (incomplete write?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is corrupt") from None
    step = check_meta(meta, str(path), required=_required_files(path, meta))
    for name, expected in meta["sha256"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch)")
    return Checkpoint(path=path, step=step, meta=meta)


def _required_files(path: Path, meta: dict[str, Any]) -> tuple[str, ...]:
    """The files meta.json must hash: a DCP checkpoint's metadata and extras, a legacy
    checkpoint's weights and state, a model directory's weights."""
    if isinstance(meta, dict) and meta.get("format") == DCP_FORMAT:
        return (".metadata", "objects.json") if meta.get("format_version", 1) >= 2 else (".metadata",)
    if (path / STATE_FILE).is_file():
        return (MODEL_FILE, STATE_FILE)
    return (MODEL_FILE,)


def latest_checkpoint(ckpt_root: Path) -> Checkpoint | None:
    """The newest checkpoint by name, verified (see `verify_or_name_good`); None if none."""
    candidates = list_checkpoints(ckpt_root)
    return verify_or_name_good(candidates[0]) if candidates else None


def verify_or_name_good(path: Path) -> Checkpoint:
    """`path` verified. If it is damaged, raise naming the newest good checkpoint beside it, so
    the user decides (`--resume-from`) rather than silently losing steps."""
    try:
        return verify_checkpoint(path)
    except CheckpointError as err:
        good = next((str(p) for p in list_checkpoints(path.parent)
                     if p != path and _is_good(p)), None)
        hint = f"; the previous good checkpoint is {good} (resume from it with --resume-from {good})" \
            if good else "; no earlier good checkpoint exists"
        raise CheckpointError(f"{err}{hint}") from None


def _is_good(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
