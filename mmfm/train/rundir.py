"""Run-directory safety: one writer per run, no silent overwrite, lineage-aware resume.

- `RunLock`: an exclusive lock file `<run>/.lock` (created with O_EXCL, holding host and pid).
  A second `mmfm train` on the same run stops naming the holder; a lock left by a dead process
  on this host is detected and taken over. A lock from another host cannot be checked, so it is
  refused with the path to remove once that host's run is known to be gone.
- `prepare_run_dir`: a fresh run over an existing one is refused unless `--resume` or an
  explicit overwrite; `--resume` with no checkpoint is an error unless asked to start fresh (as
  the Hugging Face Trainer does with `resume_from_checkpoint=True`).
- `Lineage`: `<run>/checkpoints/lineage.json` names each checkpoint's parent and the head of
  the current lineage. Resuming follows the head, not the newest name; `--resume-from step_N`
  moves the checkpoints of the abandoned branch to `<run>/checkpoints/abandoned/` (kept, named
  in lineage.json, never resumed by accident).
- `truncate_metrics`: after resuming at step N, the records of steps > N in metrics.jsonl
  (written by the run that went on past N and crashed) move to `metrics.replayed.jsonl`, so
  metrics.jsonl holds one record per step of the lineage actually trained.

Checkpoint folders are `<run>/checkpoints/step_%08d` (mmfm.train.checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmfm.errors import MmfmError, UserValueError

LOCK_FILE = ".lock"
LINEAGE_FILE = "lineage.json"
ABANDONED_DIR = "abandoned"
REPLAYED_METRICS = "metrics.replayed.jsonl"
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.yaml")  # what makes a folder a run


class RunDirError(MmfmError, RuntimeError):
    """The run directory cannot be used as asked (locked, existing, nothing to resume)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(name: str) -> int:
    """The step of a `step_%08d` folder name; UserValueError for anything else."""
    prefix, _, digits = name.partition("_")
    if prefix != "step" or not digits.isdigit():
        raise UserValueError(f"{name!r} is not a checkpoint name (step_NNNNNNNN)")
    return int(digits)


# --- the lock ---------------------------------------------------------------------------------

class RunLock:
    """Exclusive lock on a run directory; use as a context manager around the whole run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(2):  # the second after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(read_lock(self.path))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            self.held = True
            return
        raise RunDirError(f"{self.path}: another process took the lock while a stale one was removed")

    def release(self) -> None:
        if self.held and read_lock(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _take_over_if_stale(self, holder: dict) -> None:
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            self.path.unlink(missing_ok=True)  # the holder died without releasing it
            return
        if host is None or pid is None:  # half-written by a process killed while creating it
            raise RunDirError(f"{self.path} exists but is unreadable; remove it if no run is "
                              "using this directory")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        hint = "" if host == socket.gethostname() else \
            f"; if that run is gone, remove {self.path}"
        raise RunDirError(f"run directory {self.path.parent} is in use by pid {pid} on {where}{hint}")


def read_lock(path: Path) -> dict:
    """The holder recorded in a lock file ({} when it is missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# --- fresh, resume, overwrite ------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool = False,
                    fresh_if_no_checkpoint: bool = False) -> str | None:
    """Decide how a run starts in `run_dir` (call with the lock held).

    Returns the checkpoint name to resume from, or None for a fresh start. Raises RunDirError
    for a fresh run over an existing one (unless `overwrite`, which deletes its outputs) and for
    `resume` with no checkpoint (unless `fresh_if_no_checkpoint`)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; choose one")
    if resume:
        head = Lineage.load(run_dir / "checkpoints").resume_point()
        if head is None and not fresh_if_no_checkpoint:
            raise RunDirError(f"--resume: {run_dir / 'checkpoints'} holds no checkpoint to resume; "
                              "start without --resume (or allow a fresh start)")
        return head
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirError(f"run directory {run_dir} already holds a run ({', '.join(existing)}); "
                          "continue it with --resume, replace it with --overwrite, or set run.name")
    for name in existing:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for stale in (REPLAYED_METRICS,):
        (run_dir / stale).unlink(missing_ok=True)
    return None


# --- lineage -----------------------------------------------------------------------------------

@dataclass
class Lineage:
    """Parent links of the checkpoints under `root` and the head of the current lineage."""

    root: Path
    head: str | None = None
    parents: dict[str, str | None] = field(default_factory=dict)
    abandoned: dict[str, str] = field(default_factory=dict)  # name -> why

    @classmethod
    def load(cls, root: Path) -> Lineage:
        """Read lineage.json; a run from before lineage is one chain in step order."""
        root = Path(root)
        path = root / LINEAGE_FILE
        if not path.is_file():
            names = on_disk(root)
            parents = {n: (names[i - 1] if i else None) for i, n in enumerate(names)}
            return cls(root=root, head=names[-1] if names else None, parents=parents)
        try:
            data = json.loads(path.read_text())
            return cls(root=root, head=data["head"], parents=dict(data["parents"]),
                       abandoned=dict(data.get("abandoned", {})))
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{path} is corrupt; fix or remove it (then checkpoints resume by "
                              "step order)") from None

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{LINEAGE_FILE}.tmp"
        tmp.write_text(json.dumps({"head": self.head, "parents": self.parents,
                                   "abandoned": self.abandoned}, indent=1, sort_keys=True))
        os.replace(tmp, self.root / LINEAGE_FILE)

    def record(self, name: str) -> None:
        """A checkpoint `name` was just written: its parent is the current head; it becomes
        the head. Call after the checkpoint folder is in place."""
        self.parents[name] = self.head
        self.head = name
        self.save()

    def forget(self, name: str) -> None:
        """A checkpoint was pruned: children now point at its parent."""
        parent = self.parents.pop(name, None)
        for child, p in self.parents.items():
            if p == name:
                self.parents[child] = parent
        if self.head == name:
            self.head = parent
        self.save()

    def chain(self) -> list[str]:
        """The current lineage, newest first (the head, its parent, ...)."""
        out, name = [], self.head
        while name is not None and name not in out:
            out.append(name)
            name = self.parents.get(name)
        return out

    def resume_point(self) -> str | None:
        """The newest checkpoint of the current lineage that exists on disk."""
        present = set(on_disk(self.root))
        return next((n for n in self.chain() if n in present), None)

    def resume_from(self, name: str) -> list[str]:
        """Make `name` the head (an explicit `--resume-from`); move every checkpoint not on its
        lineage and newer than it to `abandoned/`, recorded with the reason. Returns those."""
        if name not in on_disk(self.root):
            raise RunDirError(f"--resume-from {name}: no such checkpoint in {self.root}")
        self.head = name
        keep = set(self.chain())
        step = checkpoint_step(name)
        moved = [n for n in on_disk(self.root) if n not in keep and checkpoint_step(n) > step]
        aside = self.root / ABANDONED_DIR
        aside.mkdir(exist_ok=True)
        for n in moved:
            target = _free_name(aside, n)
            os.replace(self.root / n, aside / target)
            self.parents.pop(n, None)
            self.abandoned[target] = f"{n} abandoned when the run resumed from {name}"
        self.save()
        return moved


def _free_name(folder: Path, name: str) -> str:
    """`name`, or `name.2`, `name.3`... when a branch abandoned earlier used it already."""
    candidate, n = name, 1
    while (folder / candidate).exists():
        n += 1
        candidate = f"{name}.{n}"
    return candidate


def on_disk(root: Path) -> list[str]:
    """Checkpoint folder names under `root`, oldest first (temp and abandoned ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_"):
            try:
                checkpoint_step(p.name)
            except UserValueError:
                continue
            names.append(p.name)
    return sorted(names, key=checkpoint_step)


# --- metrics after a resume --------------------------------------------------------------------

def truncate_metrics(metrics_path: Path, resume_step: int) -> int:
    """Move the records of steps after `resume_step` out of metrics.jsonl into
    metrics.replayed.jsonl (each marked with `replayed_after`), before the resumed run appends.
    Returns how many records moved. The rewrite is atomic (temp file, then rename)."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return 0
    keep, moved = [], []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the crash
            continue
        is_later = isinstance(record, dict) and isinstance(record.get("step"), int) \
            and record["step"] > resume_step
        (moved if is_later else keep).append(record)
    if moved:
        with (metrics_path.parent / REPLAYED_METRICS).open("a") as f:
            for record in moved:
                f.write(json.dumps({**record, "replayed_after": resume_step}) + "\n")
    tmp = metrics_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, metrics_path)
    return len(moved)
