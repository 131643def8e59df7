"""Numerics guards for the training loop: skip bad updates, detect loss spikes, roll back, stop.

What large-run users rely on (PaLM and OLMo skip and roll back around spikes; DeepSpeed skips
overflowed steps), as pure logic the trainer drives once per optimizer step:

    guard = StepGuard(GuardConfig())
    ...  # forward + backward, grad_norm = clip_grad_norm_(...)
    verdict = guard.observe(step, loss, grad_norm)
    if verdict.apply:
        optimizer.step()
    optimizer.zero_grad()          # a skipped step discards its gradients
    if verdict.rollback:
        ckpt = newest finite checkpoint on the current lineage (or None)
        guard.rolled_back(step, ckpt_step)   # raises UnrecoverableTraining when it cannot
        load model + optimizer from it; keep the data loader where it is, so the batches that
        went bad are not replayed
    ...
    if may_checkpoint(model, optimizer): save ...
    guard.raise_if_unhealthy(final_val_loss)  # the run exits non-zero when it ends unhealthy

Rules (each counted in `guard.counters` for the metrics log):

- **non-finite**: a loss or gradient norm that is NaN or ±inf skips the update.
- **spike**: once `min_history` good losses are in the rolling window of the last `window`
  good steps, a loss above `mean + z_threshold · std` is a spike and skips the update. The std
  is floored at `min_rel_std · mean` so that a very flat loss curve (std near zero) does not
  flag ordinary noise; a loss below the mean is never a spike. We chose the z-score over a
  plain ratio because it adapts to how noisy the run is; the floor gives it the ratio's
  robustness on flat curves (`mean · (1 + z · min_rel_std)` is the least a spike can be).
  Skipped losses never enter the window, so a spike cannot raise its own threshold.
- **rollback**: after `max_consecutive_bad` bad steps in a row the verdict asks for a rollback
  to the newest finite checkpoint; the window is cleared (the old statistics belonged to a
  state the run left). Nothing (learning rate, clip) is lowered: a change of recipe is the
  user's call, not a silent one.
- **stop**: with no finite checkpoint to roll back to, or after `max_rollbacks` rollbacks,
  `rolled_back` raises `UnrecoverableTraining` (an `MmfmError`, so the CLI prints one line and
  exits non-zero).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mmfm.config import GuardConfig
from mmfm.errors import MmfmError


class UnrecoverableTraining(MmfmError, RuntimeError):
    """Training went non-finite or kept spiking and rolling back did not (or cannot) help."""


@dataclass(frozen=True)
class Verdict:
    """What to do with one step: `apply` the update or not, and whether to roll back now."""

    apply: bool
    reason: str  # "ok", "nonfinite" or "spike"
    rollback: bool = False


@dataclass
class StepGuard:
    """Per-step decisions and their counters; `state_dict` travels with checkpoints."""

    cfg: GuardConfig = field(default_factory=GuardConfig)
    counters: dict[str, int] = field(default_factory=lambda: {
        "skipped_nonfinite": 0, "skipped_spike": 0, "rollbacks": 0, "consecutive_bad": 0})
    last_loss: float = 0.0

    def __post_init__(self) -> None:
        self._losses: deque[float] = deque(maxlen=self.cfg.window)

    def observe(self, step: int, loss: float, grad_norm: float | None = None) -> Verdict:
        """Judge one step from its loss and (pre-clip) gradient norm."""
        self.last_loss = float(loss)
        if not is_finite(loss) or (grad_norm is not None and not is_finite(grad_norm)):
            return self._bad("nonfinite")
        if self.cfg.detect_spikes and self.is_spike(loss):
            return self._bad("spike")
        self.counters["consecutive_bad"] = 0
        self._losses.append(float(loss))
        return Verdict(apply=True, reason="ok")

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is above the rolling threshold (False until `min_history` steps)."""
        threshold = self.spike_threshold()
        return threshold is not None and loss > threshold

    def spike_threshold(self) -> float | None:
        """`mean + z · max(std, min_rel_std · |mean|)` over the window, or None too early."""
        if len(self._losses) < self.cfg.min_history:
            return None
        n = len(self._losses)
        mean = sum(self._losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self._losses) / n)
        return mean + self.cfg.z_threshold * max(std, self.cfg.min_rel_std * abs(mean))

    def rolled_back(self, step: int, to_step: int | None) -> None:
        """Record a rollback at `step` to the checkpoint of `to_step` (None: there is none);
        raise `UnrecoverableTraining` when the run cannot recover."""
        bad = self.counters["consecutive_bad"]
        if to_step is None:
            raise UnrecoverableTraining(
                f"step {step}: {bad} bad steps in a row (last loss {self.last_loss:.4g}) and no "
                "finite checkpoint to roll back to; lower train.lr or check the data, then restart")
        if self.counters["rollbacks"] >= self.cfg.max_rollbacks:
            raise UnrecoverableTraining(
                f"step {step}: still {bad} bad steps in a row (last loss {self.last_loss:.4g}) "
                f"after {self.counters['rollbacks']} rollbacks (train.guard.max_rollbacks); "
                f"the last finite checkpoint is step {to_step}: lower train.lr or check the data, "
                "then resume from it with --resume-from")
        self.counters["rollbacks"] += 1
        self.counters["consecutive_bad"] = 0
        self._losses.clear()

    def raise_if_unhealthy(self, final_loss: float | None = None) -> None:
        """At the end of a run: raise when it ends on a non-finite loss, or bad steps in a row."""
        if final_loss is not None and not is_finite(final_loss):
            raise UnrecoverableTraining(f"the run ended unhealthy: final loss {final_loss}")
        if self.counters["consecutive_bad"]:
            raise UnrecoverableTraining(
                f"the run ended unhealthy: its last {self.counters['consecutive_bad']} steps were "
                f"skipped (last loss {self.last_loss:.4g})")

    def metrics(self) -> dict[str, int]:
        """Counters under slash names for the metrics sinks."""
        return {f"guard/{name}": value for name, value in self.counters.items()}

    def state_dict(self) -> dict:
        return {"counters": dict(self.counters), "losses": list(self._losses)}

    def load_state_dict(self, state: dict) -> None:
        self.counters.update(state["counters"])
        self._losses.clear()
        self._losses.extend(float(x) for x in state["losses"])

    def _bad(self, reason: str) -> Verdict:
        self.counters[f"skipped_{reason}"] += 1
        self.counters["consecutive_bad"] += 1
        rollback = self.counters["consecutive_bad"] >= self.cfg.max_consecutive_bad
        return Verdict(apply=False, reason=reason, rollback=rollback)


def is_finite(value: float | torch.Tensor) -> bool:
    """Whether a Python number or a tensor (all its elements) is finite."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def tensors_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating tensor in `tensors` is all finite (others are ignored)."""
    return all(is_finite(t.detach()) for t in tensors if t.is_floating_point())


def may_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether the model weights (and optimizer moments) are all finite, so a checkpoint of
    them is a valid rollback point. A checkpoint is never written from non-finite weights."""
    if not tensors_finite(model.parameters()):
        return False
    if optimizer is None:
        return True
    return tensors_finite(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def checkpoints_to_prune(steps: Iterable[int], keep: int, finite: dict[int, bool]) -> list[int]:
    """The checkpoint steps to delete when keeping the newest `keep`: never the newest finite
    one, even when `keep` newer non-finite ones exist. `finite[step]` says whether a checkpoint
    holds finite weights (missing = unknown, treated as not finite)."""
    assert keep > 0, "keep_checkpoints is validated > 0"
    newest_first = sorted(set(steps), reverse=True)
    kept = set(newest_first[:keep])
    newest_finite = next((s for s in newest_first if finite.get(s, False)), None)
    if newest_finite is not None:
        kept.add(newest_finite)
    return [s for s in newest_first if s not in kept]
