"""The trainer's control of its run directory: who may write it, where a run resumes, what is pruned.

The rules live in `mmfm.train.rundir` (lock, fresh/resume/overwrite, lineage, metrics after a
resume) and `mmfm.train.guards` (which checkpoints may be pruned); this module applies them for
`Trainer` at every world size: rank 0 decides and touches files, and every rank learns the
decision (or the one-line error) through a broadcast, so no rank waits for a peer that failed.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch.distributed as dist

from mmfm.errors import MmfmError
from mmfm.train.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from mmfm.train.guards import checkpoints_to_prune
from mmfm.train.rundir import (
    Lineage,
    RunDirError,
    RunLock,
    checkpoint_name,
    checkpoint_step,
    on_disk,
    prepare_run_dir,
    read_lock,
    truncate_metrics,
)


class TrainerRunDir:
    """The run directory of one `Trainer`: its lock (rank 0), lineage and checkpoint folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.lock = RunLock(self.run_dir)

    # ----------------------------------------------------------------- starting

    def open(self, *, resume: bool, resume_from: str | None, overwrite: bool,
             allow_fresh: bool) -> Path | None:
        """Take the lock and decide where the run starts (collective): the checkpoint folder
        to resume, or None for a fresh start. Errors are raised on every rank alike."""
        decision = _on_rank0(lambda: self._decide(resume, resume_from, overwrite, allow_fresh))
        return None if decision is None else Path(decision)

    def _decide(self, resume: bool, resume_from: str | None, overwrite: bool,
                allow_fresh: bool) -> str | None:
        holder = read_lock(self.lock.path)
        if (holder.get("host"), holder.get("pid")) != (socket.gethostname(), os.getpid()):
            self.lock.acquire()  # a second Trainer of this process on this run shares it
        if resume_from:
            path = Path(resume_from)
            if path.parent.resolve() == self.ckpt_root.resolve():
                moved = Lineage.load(self.ckpt_root).resume_from(path.name)
                if moved:
                    print(f"--resume-from {path.name}: newer checkpoints of the abandoned "
                          f"lineage kept aside in {self.ckpt_root / 'abandoned'}: "
                          f"{', '.join(moved)}", flush=True)
            return str(path)
        head = prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite,
                               fresh_if_no_checkpoint=allow_fresh)
        return None if head is None else str(self.ckpt_root / head)

    def after_restore(self, step: int) -> None:
        """Rank 0: metrics.jsonl records of steps after `step` (a crashed continuation) move
        to metrics.replayed.jsonl, so the resumed run appends one record per step."""
        if _is_rank0():
            truncate_metrics(self.run_dir / "metrics.jsonl", step)

    def close(self) -> None:
        if _is_rank0():
            self.lock.release()

    # ----------------------------------------------------------------- checkpoints

    def record(self, path: Path) -> None:
        """Rank 0, after a checkpoint folder is in place: it becomes the lineage's head."""
        if _is_rank0():
            Lineage.load(self.ckpt_root).record(path.name)

    def prune(self, keep: int) -> None:
        """Rank 0: keep the newest `keep` checkpoints and, whatever their number, the newest
        finite one (meta.json `finite`); pruned ones leave the lineage."""
        if not _is_rank0():
            return
        names = on_disk(self.ckpt_root)
        finite = {checkpoint_step(n): _is_finite(self.ckpt_root / n) for n in names}
        lineage = Lineage.load(self.ckpt_root)
        for step in checkpoints_to_prune(finite, keep, finite):
            shutil.rmtree(self.ckpt_root / checkpoint_name(step), ignore_errors=True)
            lineage.forget(checkpoint_name(step))

    def rollback_point(self) -> Checkpoint | None:
        """The newest checkpoint of the current lineage that verifies and holds finite
        weights: where the numerics guard rolls back to."""
        present = set(on_disk(self.ckpt_root))
        for name in Lineage.load(self.ckpt_root).chain():
            if name in present and _is_finite(self.ckpt_root / name):
                try:
                    return verify_checkpoint(self.ckpt_root / name)
                except CheckpointError:
                    continue
        return None

    def resume_lineage_at(self, checkpoint: Checkpoint) -> None:
        """Rank 0: make a rollback target the lineage's head (newer ones are kept aside)."""
        if _is_rank0() and checkpoint.path.parent.resolve() == self.ckpt_root.resolve():
            Lineage.load(self.ckpt_root).resume_from(checkpoint.path.name)


def _is_finite(path: Path) -> bool:
    import json

    try:
        return bool(json.loads((path / "meta.json").read_text()).get("finite", True))
    except (OSError, ValueError):
        return False


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _on_rank0(decide):
    """Run `decide` on rank 0 and broadcast its result, or its user error, to every rank
    (rank 0 raises the error itself, the others a RunDirError with the same message)."""
    outcome: list = [None]
    error: MmfmError | None = None
    if _is_rank0():
        try:
            outcome = [("ok", decide())]
        except MmfmError as err:
            error, outcome = err, [("error", str(err))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0][0] == "error":
        raise RunDirError(outcome[0][1])
    return outcome[0][1]
