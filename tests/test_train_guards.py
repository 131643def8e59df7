"""Numerics guards: non-finite skip, spike detection, rollback policy, checkpoint gating and
pruning (mmfm.train.guards). Planted loss curves where the right verdict is known."""

import math

import pytest
import torch

from mmfm.config import ConfigError
from mmfm.errors import MmfmError
from mmfm.train.guards import (
    GuardConfig,
    StepGuard,
    UnrecoverableTraining,
    checkpoints_to_prune,
    may_checkpoint,
)


def warm(guard: StepGuard, n: int = 30, start: int = 0) -> None:
    for i in range(n):  # a noisy, slowly falling loss around 3.0
        assert guard.observe(start + i, 3.0 - 0.001 * i + 0.02 * (-1) ** i, 1.0).apply


@pytest.mark.parametrize("loss, grad_norm", [(math.nan, 1.0), (math.inf, 1.0), (2.0, math.inf),
                                             (2.0, math.nan), (torch.tensor(math.nan), 1.0)])
def test_non_finite_loss_or_grad_norm_skips_the_update(loss, grad_norm):
    guard = StepGuard()
    verdict = guard.observe(1, loss, grad_norm)
    assert not verdict.apply and verdict.reason == "nonfinite" and not verdict.rollback
    assert guard.metrics()["guard/skipped_nonfinite"] == 1


def test_spike_over_rolling_mean_is_skipped_but_noise_is_not():
    guard = StepGuard()
    warm(guard)
    assert guard.observe(30, 3.1, 1.0).apply  # ordinary noise
    verdict = guard.observe(31, 2.1e7, 1.0)  # the lr=1e3 run at step 2
    assert not verdict.apply and verdict.reason == "spike"
    assert guard.counters["skipped_spike"] == 1
    assert guard.observe(32, 2.9, 1.0).apply  # recovers: the spike did not enter the window
    assert guard.counters["consecutive_bad"] == 0


def test_no_spike_detection_before_min_history():
    guard = StepGuard(GuardConfig(min_history=10))
    for i in range(5):
        guard.observe(i, 10.0 - i, 1.0)
    assert guard.spike_threshold() is None
    assert guard.observe(5, 1e6, 1.0).apply  # early training may jump; only NaN/inf skip


def test_flat_curve_uses_the_std_floor():
    guard = StepGuard(GuardConfig(min_history=5, z_threshold=6.0, min_rel_std=0.05))
    for i in range(10):
        guard.observe(i, 2.0, 1.0)  # std exactly 0
    assert guard.spike_threshold() == pytest.approx(2.0 * (1 + 6 * 0.05))
    assert guard.observe(10, 2.1, 1.0).apply
    assert not guard.observe(11, 2.7, 1.0).apply


def test_consecutive_bad_steps_ask_for_rollback_then_stop():
    guard = StepGuard(GuardConfig(max_consecutive_bad=3, max_rollbacks=1))
    warm(guard)
    verdicts = [guard.observe(40 + i, math.nan, math.inf) for i in range(3)]
    assert [v.rollback for v in verdicts] == [False, False, True]
    guard.rolled_back(42, to_step=20)
    assert guard.counters["rollbacks"] == 1 and guard.counters["consecutive_bad"] == 0
    assert guard.spike_threshold() is None  # statistics restart after a rollback
    for i in range(3):
        verdict = guard.observe(43 + i, math.nan, 1.0)
    assert verdict.rollback
    with pytest.raises(UnrecoverableTraining, match=r"after 1 rollbacks .* step 20") as info:
        guard.rolled_back(45, to_step=20)
    assert isinstance(info.value, MmfmError) and "\n" not in str(info.value)


def test_rollback_without_a_finite_checkpoint_stops_clearly():
    guard = StepGuard(GuardConfig(max_consecutive_bad=1))
    assert guard.observe(3, math.inf, 1.0).rollback
    with pytest.raises(UnrecoverableTraining, match="no finite checkpoint to roll back to"):
        guard.rolled_back(3, to_step=None)


def test_run_ending_unhealthy_raises():
    guard = StepGuard()
    warm(guard)
    guard.raise_if_unhealthy(2.9)  # healthy
    with pytest.raises(UnrecoverableTraining, match="final loss nan"):
        guard.raise_if_unhealthy(math.nan)
    guard.observe(99, math.nan, 1.0)
    with pytest.raises(UnrecoverableTraining, match="last 1 steps were skipped"):
        guard.raise_if_unhealthy()


def test_state_dict_roundtrip_keeps_counters_and_window():
    guard = StepGuard()
    warm(guard)
    guard.observe(30, math.nan, 1.0)
    other = StepGuard()
    other.load_state_dict(guard.state_dict())
    assert other.counters == guard.counters
    assert other.spike_threshold() == pytest.approx(guard.spike_threshold())


def test_may_checkpoint_only_finite_weights_and_moments():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert may_checkpoint(model, opt)
    opt.state[model.weight]["exp_avg_sq"][0, 0] = math.inf
    assert may_checkpoint(model) and not may_checkpoint(model, opt)
    with torch.no_grad():
        model.bias[1] = math.nan
    assert not may_checkpoint(model)


def test_pruning_never_removes_the_newest_finite_checkpoint():
    # The issue: steps 8 and 12 held NaN weights, keep=2 pruned step 4, the last finite one.
    finite = {4: True, 8: False, 12: False}
    assert checkpoints_to_prune([4, 8, 12], keep=2, finite=finite) == []
    finite = {4: True, 8: True, 12: False, 16: False}
    assert checkpoints_to_prune([4, 8, 12, 16], keep=2, finite=finite) == [4]
    assert checkpoints_to_prune([4, 8, 12], keep=2, finite={4: True, 8: True, 12: True}) == [4]


def test_guard_config_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"train.guard.z_threshold=nan"):
        GuardConfig(z_threshold=math.nan).validate()
    with pytest.raises(ConfigError, match=r"train.guard.min_history=200 exceeds"):
        GuardConfig(min_history=200).validate()


def test_guard_is_a_train_config_section():
    from pathlib import Path

    from mmfm.config import load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "text_moe_tiny.yaml"
    cfg = load_config(tiny, ["train.guard.max_rollbacks=1", "train.guard.window=50"])
    assert StepGuard(cfg.train.guard).cfg.max_rollbacks == 1
    with pytest.raises(ConfigError, match=r"train.guard.window=0 must be > 0"):
        load_config(tiny, ["train.guard.window=0"])
    with pytest.raises(ConfigError, match=r"train.guard.z_threshold=inf must be a finite number"):
        load_config(tiny, ["train.guard.z_threshold=inf"])
