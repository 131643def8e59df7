"""Bookkeeping of a training run that is not the loop itself: merging a task's per-micro-batch
metrics, model-wide MoE summaries, the run's training clock and log intervals, and RNG states
in a form a checkpoint stores as JSON."""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any

import torch


def merge_task_metrics(per_micro_batch: list[dict[str, float]]) -> dict[str, float]:
    """Combine a task's per-micro-batch scalars into one step's `train/...` metrics: counts
    (`targets/X`, `media/...`, `data/...`) add up; `loss/X` is the mean weighted by
    `targets/X`, so a group with few targets in one micro-batch does not count fully."""
    sums: dict[str, float] = {}
    for metrics in per_micro_batch:
        for key, value in metrics.items():
            if key.startswith("loss/"):
                weight = metrics.get("targets/" + key[len("loss/"):], 1.0)
                sums[key] = sums.get(key, 0.0) + value * weight
            else:
                sums[key] = sums.get(key, 0.0) + value
    out = {}
    for key, value in sums.items():
        if key.startswith("loss/"):
            weight = sums.get("targets/" + key[len("loss/"):], float(len(per_micro_batch)))
            value = value / weight if weight else 0.0
        out[f"train/{key}"] = value
    return out


def moe_summaries(per_layer: dict[str, Any]) -> dict[str, float]:
    """`moe/<name>`: mean over layers of each scalar, and the max load imbalance."""
    by_name: dict[str, list[float]] = {}
    for key, value in per_layer.items():
        if isinstance(value, float):
            by_name.setdefault(key.rsplit("/", 1)[1], []).append(value)
    out = {f"moe/{name}": sum(v) / len(v) for name, v in by_name.items()}
    if "load_imbalance" in by_name:
        out["moe/max_load_imbalance"] = max(by_name["load_imbalance"])
    return out


@dataclass
class Clock:
    """Training time of the run so far, carried across resumes in checkpoint metadata."""

    wall_s: float = 0.0
    process_s: float = 0.0

    def add(self, wall_s: float, process_s: float) -> None:
        self.wall_s += wall_s
        self.process_s += process_s


class Interval:
    """Steps and seconds since the last log record."""

    def __init__(self) -> None:
        self.steps, self.seconds = 0, 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def take(self) -> tuple[int, float]:
        out = (self.steps, self.seconds)
        self.steps, self.seconds = 0, 0.0
        return out


def rng_state() -> dict[str, Any]:
    """This process's torch and Python RNG states as JSON-serializable values."""
    version, internal, gauss = random.getstate()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "python": [version, list(internal), gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
