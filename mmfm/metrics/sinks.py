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
        self._shown: dict[str, str] = {}

    def progress(self, step: int, tokens_per_s: float) -> None:
        """Every step: advance the bar and show this step's throughput, so a slow first
        logging interval does not look like a hang."""
        self._advance(step)
        self._shown["tok/s"] = f"{tokens_per_s:.0f}"
        self._bar.set_postfix(self._shown, refresh=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._advance(step)
        self._shown.update({k.split("/", 1)[1] if k.startswith("train/") else k: _short(v)
                            for k, v in metrics.items() if k in self.SHOWN})
        self._bar.set_postfix(self._shown, refresh=True)

    def _advance(self, step: int) -> None:
        self._bar.update(max(0, step - self._last_step))
        self._last_step = max(self._last_step, step)

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

    def progress(self, step: int, tokens_per_s: float) -> None:
        """A per-step heartbeat for the sinks that show progress (the console bar)."""
        for sink in self.sinks:
            if hasattr(sink, "progress"):
                sink.progress(step, tokens_per_s)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
