"""The single-process training loop: gradient accumulation, bf16 autocast, clipping, warmup +
cosine LR, periodic validation, atomic checkpoints and exact resume.

Exact resume means the resumed run produces the same losses step for step as an uninterrupted
one: model, optimizer, scheduler, loader position and RNG states are all checkpointed.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmfm.config import ExperimentConfig, save_config
from mmfm.errors import UserValueError
from mmfm.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink, collect_moe_metrics
from mmfm.model.counting import count_params, flops_per_token
from mmfm.train.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_weights,
    save_checkpoint,
    verify_checkpoint,
)
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.task import build_task


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    train_losses: dict[int, float]  # step -> loss of that step (every step, for resume checks)
    val_loss: float | None
    checkpoint: Path | None


def autocast_context(precision: str):
    """bf16 autocast on CPU (matrix work runs ~5x faster than fp32 here) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class Trainer:
    """Owns one run: builds model, optimizer, data and sinks from a validated config."""

    is_main_process = True  # the distributed trainer (mmfm.parallel) logs from rank 0 only

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, resume_from: str | None = None,
                 show_progress: bool | None = None) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.ckpt_root = self.run_dir / "checkpoints"
        checkpoint = self._find_checkpoint(resume, resume_from)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.task = build_task(cfg)
        self.model = self.task.build_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = self.task.train_loader()
        self.step = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        elif cfg.train.init_from:
            load_weights(self.model, Path(cfg.train.init_from))
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.show_progress = cfg.metrics.console if show_progress is None else show_progress

    def _find_checkpoint(self, resume: bool, resume_from: str | None) -> Checkpoint | None:
        if resume_from:
            return verify_checkpoint(Path(resume_from))
        if resume:
            return latest_checkpoint(self.ckpt_root)
        return None

    def _restore(self, checkpoint: Checkpoint) -> None:
        checkpoint.load_model(self.model)
        state = checkpoint.load_state()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = checkpoint.step

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to `train.steps`, evaluating and checkpointing on the configured cadence.
        `stop_after` ends this invocation early after that many steps (as an interruption would);
        the schedule still spans `train.steps`, so `--resume` continues the same run."""
        tcfg = self.cfg.train
        if self.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        logger = self._build_logger()
        losses: dict[int, float] = {}
        val_loss, ckpt_path = None, None
        batches = iter(self.loader)
        tokens_per_step = tcfg.micro_batch_size * tcfg.grad_accum * self.cfg.data.seq_len
        last = tcfg.steps if stop_after is None else min(tcfg.steps, self.step + stop_after)
        try:
            while self.step < last:
                started = time.perf_counter()
                record = self._train_step(batches)
                self.step += 1
                losses[self.step] = record["train/loss"]
                elapsed = time.perf_counter() - started
                if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                    record.update(self._perf(tokens_per_step, elapsed))
                    record.update(self._moe_metrics())
                    logger.log(self.step, record)
                if self.step % tcfg.eval_every == 0 or self.step == tcfg.steps:
                    val_loss = self.evaluate()
                    logger.log(self.step, {"val/loss": val_loss,
                                           "val/ppl": float(torch.tensor(val_loss).exp())})
                if self.step % tcfg.ckpt_every == 0 or self.step == tcfg.steps:
                    ckpt_path = self.save()
        finally:
            logger.close()
        return TrainResult(self.run_dir, self.step, losses, val_loss, ckpt_path)

    def _train_step(self, batches) -> dict[str, Any]:
        tcfg = self.cfg.train
        self.model.train()
        lm_total = aux_total = 0.0
        task_metrics: list[dict[str, float]] = []
        for _ in range(tcfg.grad_accum):
            with autocast_context(tcfg.precision):
                out = self.task.loss(self.model, next(batches))
            ((out.lm_loss + out.aux_loss) / tcfg.grad_accum).backward()
            lm_total += out.lm_loss.item() / tcfg.grad_accum
            aux_total += out.aux_loss.item() / tcfg.grad_accum
            task_metrics.append(out.metrics)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for _, layer in self.model.moe_layers():
            layer.update_bias()
        return {"train/loss": lm_total, "train/aux_loss": aux_total,
                "train/grad_norm": float(grad_norm), "train/lr": lr,
                **merge_task_metrics(task_metrics)}

    def _moe_metrics(self) -> dict[str, Any]:
        return collect_moe_metrics(self.model)

    def _perf(self, tokens_per_step: int, elapsed: float) -> dict[str, float]:
        tokens_per_s = tokens_per_step / elapsed
        return {"perf/tokens_per_s": tokens_per_s, "perf/step_s": elapsed,
                "perf/tflops": tokens_per_s * self.flops_per_token / 1e12}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first `train.eval_batches` held-out batches (token-weighted)."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.task.eval_batches():
            with autocast_context(self.cfg.train.precision):
                out = self.task.loss(self.model, batch)
            total += out.lm_loss.item() * out.num_targets
            count += out.num_targets
        if count == 0:
            raise UserValueError(f"data.val_shards={self.cfg.data.val_shards} yielded no tokens")
        return total / count

    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        meta = {"config": self.cfg.to_dict(), "params": vars(count_params(self.cfg.model))}
        return save_checkpoint(self.ckpt_root, self.step, self.model, state, meta,
                               keep=self.cfg.train.keep_checkpoints)

    def _build_logger(self) -> MetricsLogger:
        sinks = [JsonlSink(self.run_dir / "metrics.jsonl")]
        if self.show_progress:
            sinks.append(ConsoleSink(self.cfg.train.steps, self.step))
        if self.cfg.metrics.wandb:
            sinks.append(WandbSink(self.cfg.metrics.wandb_project, self.cfg.run.name, self.run_dir,
                                   self.cfg.metrics.wandb_mode, self.cfg.to_dict()))
        return MetricsLogger(sinks)


def build_trainer(cfg: ExperimentConfig, resume: bool = False, resume_from: str | None = None,
                  show_progress: bool | None = None) -> Trainer:
    """`Trainer`, or `mmfm.parallel`'s distributed one when launched on several processes
    (torchrun), when `parallel` asks for a layout, or to resume a distributed checkpoint."""
    from mmfm.parallel.trainer import DistributedTrainer, wants_distributed

    cls = DistributedTrainer if wants_distributed(cfg, resume, resume_from) else Trainer
    return cls(cfg, resume=resume, resume_from=resume_from, show_progress=show_progress)
