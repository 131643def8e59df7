"""Metric sinks behind one tiny interface: `write(step, metrics)` and `close()`.

Names are slash-namespaced (`train/loss`, `moe/layer_01/load_imbalance`, `perf/tflops`).
JSONL is always written; the console progress bar and Weights & Biases are optional.
"""

from __future__ import annotations

import json
import os
import secrets
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

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._advance(step)
        self._shown.update({k.split("/", 1)[1] if k.startswith("train/") else k: _short(v)
                            for k, v in metrics.items() if k in self.SHOWN})
        self._bar.set_postfix(self._shown, refresh=True)
        line = imbalance_summary(metrics)
        if line:
            self._bar.write(f"step {step}: {line}")

    def _advance(self, step: int) -> None:
        self._bar.update(max(0, step - self._last_step))
        self._last_step = max(self._last_step, step)

    def progress(self, step: int, metrics: dict[str, Any]) -> None:
        """Advance the bar for a step that is not logged (called every step, so a slow first
        `log_every` interval does not look like a hang); shows loss and tokens/s."""
        self.write(step, metrics)

    def close(self) -> None:
        self._bar.close()


class WandbSink:
    """Weights & Biases, offline by default: no account or network needed; `wandb sync` later.

    Besides the scalars: MaxVio per MoE layer (from the per-expert token counts), a
    layer x expert load table and heatmap at each evaluation (a record with `val/loss`, using
    the latest counts), `tokens` as the x-axis of every chart when records carry it, parameter
    counts and FLOPs per token in the run summary, the run grouped with its dense twin
    (`group`) and tagged moe or dense, and `resume=True` continuing the W&B run whose id the run
    folder keeps in `wandb_run_id`.
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, project: str, run_name: str, run_dir: Path, mode: str, config: dict,
                 resume: bool = False, group: str | None = None) -> None:
        import wandb  # imported lazily: it is slow to import and optional at run time

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        run_id = _wandb_run_id(run_dir / self.ID_FILE, resume)
        is_moe = bool((config.get("model") or {}).get("moe"))
        self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode,
                               config=config, reinit="finish_previous", id=run_id,
                               resume="allow" if resume else None,
                               group=group or twin_group(run_name),
                               tags=["moe" if is_moe else "dense"])
        self._run.define_metric("tokens")
        self._run.define_metric("*", step_metric="tokens")
        self._run.summary.update(model_summary(config))
        self._counts: dict[str, list[float]] = {}

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.update(maxvio_metrics(metrics))
        counts = load_vectors(metrics)
        if counts:
            self._counts = counts
        if "val/loss" in metrics and self._counts:
            scalars.update(self._load_media())
        self._run.log(scalars, step=step)

    def _load_media(self) -> dict[str, Any]:
        """The latest per-expert load as a table and a heatmap image."""
        rows = [[layer, e, share] for layer, counts in self._counts.items()
                for e, share in enumerate(_shares(counts))]
        table = self._wandb.Table(columns=["layer", "expert", "share"], data=rows)
        return {"moe/expert_load": table,
                "moe/expert_load_heatmap": self._wandb.Image(_heatmap_array(self._counts))}

    def close(self) -> None:
        self._run.finish()


def _wandb_run_id(path: Path, resume: bool) -> str:
    """The run folder's W&B id when resuming (so the W&B run continues), else a new one."""
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: short, lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def twin_group(run_name: str) -> str:
    """W&B group of an MoE run and its dense twin: the run name without a trailing
    moe / dense marker (`text_moe` and `text_dense` both give `text`)."""
    for marker in ("_moe", "-moe", "_dense", "-dense"):
        if run_name.endswith(marker) and len(run_name) > len(marker):
            return run_name[: -len(marker)]
    return run_name


def model_summary(config: dict) -> dict[str, float]:
    """Total and active parameters and training FLOPs per token, for the W&B summary."""
    from mmfm.config import ConfigError, config_from_dict
    from mmfm.model.counting import count_params, flops_per_token

    try:
        cfg = config_from_dict(config)
    except ConfigError:
        return {}
    counts = count_params(cfg.model)
    return {"params/total": counts.total, "params/active": counts.active,
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)}


def load_vectors(metrics: dict[str, Any]) -> dict[str, list[float]]:
    """{layer_XX (or layer_XX/<modality>): tokens per expert} of the MoE layers in a record."""
    return {k[len("moe/"):-len("/tokens_per_expert")]: v for k, v in metrics.items()
            if k.startswith("moe/layer_") and k.endswith("/tokens_per_expert")
            and isinstance(v, list)}


def maxvio_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """MaxVio = (max - mean) / mean load per layer (arXiv 2408.15664), and the worst layer's."""
    out = {}
    for layer, counts in load_vectors(metrics).items():
        mean = sum(counts) / len(counts)
        if mean > 0:
            out[f"moe/{layer}/maxvio"] = (max(counts) - mean) / mean
    if out:
        out["moe/maxvio"] = max(out.values())
    return out


def imbalance_summary(metrics: dict[str, Any]) -> str:
    """One line for the console: the worst layer's MaxVio, the least-loaded expert's share
    against uniform, the dropped fraction; empty without MoE metrics."""
    counts = load_vectors(metrics)
    vio = maxvio_metrics(metrics)
    if not counts or not vio:
        return ""
    worst = max((k for k in vio if k != "moe/maxvio"), key=vio.get)[len("moe/"):-len("/maxvio")]
    coldest = min(((layer, min(_shares(c)) * len(c)) for layer, c in counts.items()),
                  key=lambda item: item[1])
    dropped = metrics.get("moe/dropped_fraction", 0.0)
    return (f"MoE MaxVio {vio['moe/maxvio']:.2f} ({worst}), coldest expert "
            f"{coldest[1]:.2f}x uniform ({coldest[0]}), dropped {dropped:.1%}")


def _shares(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _heatmap_array(counts: dict[str, list[float]]):
    """(layers, experts) shares as an 8-bit image, scaled so the largest share is white."""
    import numpy as np

    width = max(len(c) for c in counts.values())  # modality groups may differ in size
    shares = np.array([_shares(c) + [0.0] * (width - len(c)) for _, c in sorted(counts.items())],
                      dtype=np.float64)
    scaled = shares / max(shares.max(), 1e-12)
    return np.kron((scaled * 255).astype(np.uint8), np.ones((16, 16), dtype=np.uint8))


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
