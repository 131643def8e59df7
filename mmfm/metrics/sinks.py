"""Metric sinks behind one tiny interface: `write(step, metrics)` and `close()`.

Names are slash-namespaced (`train/loss`, `moe/layer_01/load_imbalance`, `perf/tflops`).
JSONL is always written; the console progress bar and Weights & Biases are optional.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm


class MetricSink(Protocol):
    def write(self, step: int, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per logged step, appended and flushed so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """A tqdm progress bar over training steps, showing the headline metrics."""

    SHOWN = ("train/loss", "val/loss", "train/lr", "perf/tokens_per_s", "moe/load_imbalance")

    def __init__(self, total_steps: int, start_step: int = 0) -> None:
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_step = start_step

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._bar.update(max(0, step - self._last_step))
        self._last_step = max(self._last_step, step)
        shown = {k.split("/", 1)[1] if k.startswith("train/") else k: v
                 for k, v in metrics.items() if k in self.SHOWN}
        if shown:
            self._bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=True)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        """Advance the bar for a step that is not logged (called every step, so a slow first
        `log_every` interval does not look like a hang); shows loss and tokens/s."""
        self.write(step, metrics)

    def close(self) -> None:
        self._bar.close()


class WandbSink:
    """Weights & Biases, offline by default: no account or network needed; `wandb sync` later."""

    def __init__(self, project: str, run_name: str, run_dir: Path, mode: str, config: dict) -> None:
        import wandb  # imported lazily: it is slow to import and optional at run time

        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode,
                               config=config, reinit="finish_previous")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsLogger:
    """Fans each record out to every sink."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        """Per-step liveness for sinks that show progress (the console bar); records files
        and W&B still get only the `log` calls."""
        for sink in self.sinks:
            if hasattr(sink, "progress"):
                sink.progress(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
