"""Atomic, verifiable checkpoints.

Layout: `<run>/checkpoints/step_00000100/{model.safetensors, state.pt, meta.json}`.
A checkpoint is written into a temporary folder, flushed to disk, then renamed into place, so
a crash never leaves a half-written `step_*` folder. `meta.json` records a SHA-256 of every file;
loading verifies them, and a corrupt or truncated checkpoint is reported with the newest good one
named. Model weights are safetensors; trainer state loads with `torch.load(weights_only=True)`,
so no checkpoint can run arbitrary pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from mmfm.errors import UserValueError

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
FORMAT_VERSION = 1


class CheckpointError(UserValueError):
    """A checkpoint that cannot be used; the message names it and, where one exists, a good one."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def load_model(self, model: torch.nn.Module) -> None:
        missing, unexpected = load_model(model, str(self.path / MODEL_FILE), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )

    def load_state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE_FILE, weights_only=True, map_location="cpu")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Initialize `model` from a checkpoint or model folder (hashes verified when it has a
    meta.json): the `train.init_from` path."""
    if (path / META_FILE).is_file():
        verify_checkpoint(path).load_model(model)
        return
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"train.init_from={path} holds no {MODEL_FILE}")
    Checkpoint(path=path, step=0, meta={}).load_model(model)


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep`."""
    final = step_dir(ckpt_root, step)
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    hashes = {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
    meta = {"format_version": FORMAT_VERSION, "step": step, "sha256": hashes, **meta}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    _prune(ckpt_root, keep)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)


def verify_checkpoint(path: Path) -> Checkpoint:
    """Read meta.json and check every file's hash; raise CheckpointError saying what is wrong."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE} (incomplete write?)")
    try:
        meta = json.loads(meta_path.read_text())
        hashes = meta["sha256"]
        step = int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is corrupt") from None
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch)")
    return Checkpoint(path=path, step=step, meta=meta)


def latest_checkpoint(ckpt_root: Path) -> Checkpoint | None:
    """The newest checkpoint, verified. If it is damaged, raise naming the newest good one, so
    the user decides (`--resume-from`) rather than silently losing steps."""
    candidates = list_checkpoints(ckpt_root)
    if not candidates:
        return None
    try:
        return verify_checkpoint(candidates[0])
    except CheckpointError as err:
        good = next((str(p) for p in candidates[1:] if _is_good(p)), None)
        hint = f"; the previous good checkpoint is {good} (resume from it with --resume-from {good})" \
            if good else "; no earlier good checkpoint exists"
        raise CheckpointError(f"{err}{hint}") from None


def _is_good(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


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
