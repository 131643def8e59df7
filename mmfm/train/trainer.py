"""The training loop, one for every world size (as torchtitan has it).

One process is a trivial layout: a 1-rank process group (an in-memory store, no port), a
`ParallelDims` of all ones and a `ParallelModel` with nothing sharded. torchrun (or `mmfm
launch`) starts N processes that run the same code with a real layout. So there is one step
function, one optimizer builder, one metrics merge and one checkpoint format
(torch.distributed.checkpoint), and a checkpoint written under any layout resumes under any
other.

Per step each data-parallel rank reads its own `train.micro_batch_size × train.grad_accum` rows
(tensor- and pipeline-parallel ranks of one replica read the same rows); the global batch is dp
times that. Gradient accumulation, clipping, warmup + cosine LR, periodic validation, atomic
checkpoints and exact resume (model, optimizer, scheduler, loader position and RNG states).
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmfm.config import ConfigError, ExperimentConfig, save_config
from mmfm.device import autocast_context, move_batch, resolve_run
from mmfm.errors import UserValueError
from mmfm.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink, collect_moe_metrics
from mmfm.model import IGNORE_INDEX
from mmfm.model.counting import count_params, flops_per_token
from mmfm.model.memory import check_fits_memory
from mmfm.parallel.api import ParallelModel, parallelize
from mmfm.parallel.checkpoint import load_distributed, save_distributed
from mmfm.parallel.mesh import ParallelDims, build_dims, init_distributed, launched_world_size
from mmfm.parallel.step import forward_backward, pipeline_eval_loss, reduce_stats
from mmfm.parallel.watchdog import RankWatchdog, explain_failure
from mmfm.seq_len import SeqLenSchedule
from mmfm.train.bookkeeping import (
    Clock,
    Interval,
    merge_task_metrics,
    moe_summaries,
    rng_state,
    set_rng_state,
)
from mmfm.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_weights,
    step_dir,
    verify_checkpoint,
    verify_or_name_good,
)
from mmfm.train.compat import check_resume_config, check_step_matches_state
from mmfm.train.guards import StepGuard, Verdict, tensors_finite
from mmfm.train.optim import build_scheduler
from mmfm.train.run_control import TrainerRunDir
from mmfm.train.task import Task, build_task

POS_BUCKETS = 4  # validation loss by position: quarters of the sequence (val/loss_pos_*)


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    train_losses: dict[int, float]  # step -> loss of that step (every step, for resume checks)
    val_loss: float | None
    checkpoint: Path | None


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def start_process_group(cfg: ExperimentConfig) -> tuple[int, int]:
    """Validate the layout against the launched world size, then join (or, for one process
    started without torchrun, create) the default process group. Returns (rank, world)."""
    world = launched_world_size()
    try:  # before any process group or compute
        cfg.parallel.validate("parallel", cfg.model, world_size=world, train_cfg=cfg.train)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return init_distributed(cfg.parallel.timeout_s)


class Trainer:
    """Owns one run on this rank: layout, model, optimizer, data and sinks from a validated
    config. Every rank runs it; rank 0 logs and writes files."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, resume_from: str | None = None,
                 show_progress: bool | None = None, task: Task | None = None,
                 overwrite: bool = False, allow_fresh: bool = False,
                 manage_run_dir: bool = True) -> None:
        """`resume`: continue the run's current lineage (an error when it has no checkpoint,
        unless `allow_fresh`); `resume_from`: continue from that checkpoint; `overwrite`:
        replace an existing run of this name (without it a fresh run over one is refused).
        `manage_run_dir=False` (fixed-batch parity runs) skips the lock and these rules."""
        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.device, self.precision = resolve_run(cfg.train, local_rank())
        self.seq_len_schedule = SeqLenSchedule.from_config(cfg)  # one stage without a schedule
        for stage_cfg in self.seq_len_schedule.stage_configs(cfg):
            check_fits_memory(stage_cfg, device=self.device.type)
        rank, world = start_process_group(cfg)
        self.watchdog = None
        if world > 1 and cfg.parallel.rank_timeout_s > 0:
            self.watchdog = RankWatchdog(rank, world, cfg.parallel.rank_timeout_s).start()
        self.dims: ParallelDims = build_dims(cfg.parallel, self.device)
        if self.dims.is_logging_rank and show_progress is not False:
            print(f"device {self.device}, precision {self.precision.name}: "
                  f"{self.precision.reason}", flush=True)
        self.files = TrainerRunDir(self.run_dir) if manage_run_dir else None
        checkpoint = self._find_checkpoint(resume, resume_from, overwrite, allow_fresh)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.task = task if task is not None else build_task(cfg)
        model = self.task.build_model()
        if checkpoint is not None and checkpoint.kind == "legacy":
            self._check_legacy_layout(checkpoint)
            checkpoint.load_model(model)
        elif checkpoint is None and cfg.train.init_from:
            load_weights(model, Path(cfg.train.init_from))
        self.pm: ParallelModel = parallelize(model, self.dims, cfg.parallel, self.precision)
        self.optimizer = self.pm.build_optimizer(cfg.train, grad_accum=cfg.train.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = self.task.train_loader(self.dims.dp_rank, self.dims.dp,
                                             pin_memory=self.device.type == "cuda")
        self.step = 0
        self.clock = Clock()
        self.guard = StepGuard(cfg.train.guard)
        self._verdict: Verdict | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
            self.clock = Clock(**checkpoint.meta.get("time", {}))
            if self.files is not None:
                self.files.after_restore(self.step)
        show = cfg.metrics.console if show_progress is None else show_progress
        self.show_progress = show and self.is_main_process
        self.resumed = checkpoint is not None
        self._routing_batch = None
        if (cfg.metrics.routing_trace_every and cfg.model.moe is not None
                and self.is_main_process and self.dims.pp == 1):
            from mmfm.report.capture import routing_sample_batch

            self._routing_batch = routing_sample_batch(self.task.eval_batches(),
                                                       cfg.metrics.routing_trace_tokens)

    @property
    def is_main_process(self) -> bool:
        return self.dims.is_logging_rank

    @property
    def model(self) -> torch.nn.Module:
        """The (possibly wrapped) model of this rank; a pipeline stage has no whole model."""
        if self.dims.pp > 1:
            raise AttributeError("a pipeline-parallel rank holds stages, not the model: use .pm")
        return self.pm.parts[0]

    # ------------------------------------------------------------------ checkpoints

    def _find_checkpoint(self, resume: bool, resume_from: str | None, overwrite: bool,
                         allow_fresh: bool) -> Checkpoint | None:
        """The checkpoint to start from, verified: along the run's current lineage for
        `resume`; None for a fresh start (refused over an existing run unless `overwrite`)."""
        if self.files is not None:
            found = self.files.open(resume=resume, resume_from=resume_from, overwrite=overwrite,
                                    allow_fresh=allow_fresh)
            if found is None:
                return None
            if resume and not resume_from:
                return verify_or_name_good(found)
            return verify_checkpoint(found)
        if resume_from:
            return verify_checkpoint(Path(resume_from))
        if resume:
            return latest_checkpoint(self.ckpt_root)
        return None

    def _check_legacy_layout(self, checkpoint: Checkpoint) -> None:
        if self.dims.world_size > 1 or self.cfg.parallel.engine == "deepspeed":
            raise CheckpointError(
                f"checkpoint {checkpoint.path} is a single-process checkpoint of an older mmfm "
                f"(model.safetensors + state.pt): resume it on one process without "
                f"parallel.engine=deepspeed first (it is converted on read; the next checkpoint "
                f"resumes under any layout), or start from its weights with "
                f"train.init_from={checkpoint.path}")

    def _restore(self, checkpoint: Checkpoint) -> None:
        check_resume_config(checkpoint.meta.get("config"), self.cfg, str(checkpoint.path))
        if checkpoint.kind == "legacy":
            self._restore_legacy(checkpoint)
            return
        layout = checkpoint.meta.get("layout", {})
        same_dp = layout.get("dp") == self.dims.dp
        if not same_dp and not self.cfg.parallel.reshard_loader:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written with parallel.dp={layout.get('dp')} "
                f"data-parallel loader positions, this run has parallel.dp={self.dims.dp}: the "
                f"loader splits shards by data-parallel rank, so positions do not carry over; "
                f"set parallel.reshard_loader=true to restart the data order")
        loader_key = f"loader.dp{self.dims.dp_rank}"
        rng_key = f"rng.rank{self.dims.rank}"
        loaded = load_distributed(checkpoint.path, self.pm, self.optimizer, self.scheduler,
                                  objects={loader_key: None, rng_key: None, "trainer": None})
        trainer_state = loaded.objects.get("trainer")
        if trainer_state is not None:  # checkpoints of format 2 carry it (hashed)
            check_step_matches_state(loaded.step, {"scheduler": {"last_epoch":
                                     trainer_state["step"]}}, str(checkpoint.path))
            self.guard.load_state_dict(trainer_state["guard"])
        if same_dp and loader_key in loaded.objects:
            self.loader.load_state_dict(loaded.objects[loader_key])
        elif same_dp:
            warnings.warn(f"checkpoint {checkpoint.path} holds no data loader position (written "
                          f"by an older mmfm): the data order restarts", stacklevel=2)
        else:
            warnings.warn(f"parallel.reshard_loader=true: data order restarts (checkpoint dp="
                          f"{layout.get('dp')}, run dp={self.dims.dp})", stacklevel=2)
        same_layout = {k: layout.get(k, 1 if k == "cp" else None)  # cp: absent before cp
                       for k in ("pp", "dp", "tp", "ep", "cp")} == \
            {"pp": self.dims.pp, "dp": self.dims.dp, "tp": self.dims.tp, "ep": self.dims.ep,
             "cp": self.dims.cp}
        if same_layout and rng_key in loaded.objects:
            set_rng_state(loaded.objects[rng_key])
        self.step = loaded.step

    def _restore_legacy(self, checkpoint: Checkpoint) -> None:
        """Old single-process state.pt (weights already loaded): optimizer, schedule, data
        position and RNG, into the same single-process layout."""
        state = checkpoint.load_legacy_state()
        check_step_matches_state(checkpoint.step, state, str(checkpoint.path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = checkpoint.step

    def save(self, path: Path | None = None) -> Path | None:
        """Checkpoint this step (collective): into `run/checkpoints/step_*` (the lineage's new
        head; older ones pruned to `train.keep_checkpoints`, never the newest finite one), or
        into the folder `path`. Non-finite weights or optimizer state are never written:
        returns None then."""
        if not self._all_finite():
            if self.is_main_process:
                print(f"step {self.step}: weights or optimizer state are not finite; no "
                      f"checkpoint written", flush=True)
            return None
        objects = {f"loader.dp{self.dims.dp_rank}": self.loader.state_dict(),
                   f"rng.rank{self.dims.rank}": rng_state(),
                   "trainer": {"step": self.step, "guard": self.guard.state_dict()}}
        meta = {"config": self.cfg.to_dict(), "params": vars(count_params(self.cfg.model)),
                "time": {"wall_s": self.clock.wall_s, "process_s": self.clock.process_s},
                "finite": True}
        target = Path(path) if path is not None else step_dir(self.ckpt_root, self.step)
        written = save_distributed(target, self.pm, self.optimizer, self.scheduler, self.step,
                                   meta, objects)
        if path is None and self.files is not None:
            self.files.record(written)
            self.files.prune(self.cfg.train.keep_checkpoints)
        return written

    def _all_finite(self) -> bool:
        """Whether every rank's weights and optimizer moments are finite (collective)."""
        from mmfm.parallel.grads import local

        tensors = [local(p.detach()) for _, p in self.pm.named_parameters()]
        tensors += [local(v) for state in getattr(self.optimizer, "state", {}).values()
                    for v in state.values() if isinstance(v, torch.Tensor)]
        ok = torch.tensor([1.0 if tensors_finite(tensors) else 0.0])
        if dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to `train.steps`, evaluating and checkpointing on the configured cadence.
        `stop_after` ends this invocation early after that many steps (as an interruption would);
        the schedule still spans `train.steps`, so `--resume` continues the same run."""
        try:
            result = self._fit(stop_after)
        except Exception as err:
            explain_failure(self.watchdog, self.dims.rank, err)  # name a dead peer, if any
            raise
        finally:
            if self.files is not None:
                self.files.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        dist.barrier()
        # A run that ends on non-finite losses or skipped steps exits non-zero (MmfmError).
        self.guard.raise_if_unhealthy(result.val_loss)
        return result

    def _fit(self, stop_after: int | None) -> TrainResult:
        tcfg = self.cfg.train
        if self.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        logger = self._build_logger()
        losses: dict[int, float] = {}
        val_loss, ckpt_path = None, None
        batches = iter(self.loader)
        last = tcfg.steps if stop_after is None else min(tcfg.steps, self.step + stop_after)
        interval = Interval()
        try:
            while self.step < last:
                started, cpu_started = time.perf_counter(), time.process_time()
                record = self.train_step(batches)
                self.step += 1
                losses[self.step] = record["train/loss"]
                if self._verdict is not None and self._verdict.rollback:
                    self._roll_back()
                    continue
                elapsed = time.perf_counter() - started
                self.clock.add(elapsed, time.process_time() - cpu_started)
                interval.add(elapsed)
                logger.progress(self.step, {"train/loss": record["train/loss"],
                                            "perf/tokens_per_s": self.tokens_per_step / elapsed})
                if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                    record.update(self._perf(interval.take()))
                    record.update(self._moe_metrics())
                    logger.log(self.step, {**record, **self.guard.metrics(),
                                           **self._progress_fields()})
                if self._routing_batch is not None and \
                        self.step % self.cfg.metrics.routing_trace_every == 0:
                    self._record_routing()
                if self.step % tcfg.eval_every == 0 or self.step == tcfg.steps:
                    val = self.evaluate_by_source()
                    val_loss = val["val/loss"]
                    logger.log(self.step, {**val, "val/ppl": float(torch.tensor(val_loss).exp()),
                                           **self._progress_fields()})
                if self.step % tcfg.ckpt_every == 0 or self.step == tcfg.steps:
                    ckpt_path = self.save()
        finally:
            logger.close()
        return TrainResult(self.run_dir, self.step, losses, val_loss, ckpt_path)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of the last optimizer step over all data-parallel ranks (its stage's rows ×
        seq_len under a `train.seq_len_schedule`)."""
        stage = self.seq_len_schedule.at(self.step - 1)
        return stage.tokens * self.cfg.train.grad_accum * self.dims.dp

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token at the last step's sequence length."""
        return flops_per_token(self.cfg.model, self.seq_len_schedule.at(self.step - 1).seq_len)

    def _progress_fields(self) -> dict[str, float]:
        """What a comparison of runs needs on every record: tokens seen, cumulative training
        FLOPs (the `mmfm info` convention, 6·N_active + attention, each stage's tokens at its
        own length) and the run's wall and process time (summed over resumes)."""
        ga, dp = self.cfg.train.grad_accum, self.dims.dp
        tokens = self.seq_len_schedule.tokens_through(self.step, ga) * dp
        flops = self.seq_len_schedule.flops_through(
            self.step, ga, lambda seq_len: flops_per_token(self.cfg.model, seq_len)) * dp
        return {"tokens": tokens, "flops": float(flops),
                "time/wall_s": self.clock.wall_s, "time/process_s": self.clock.process_s}

    def train_step(self, batches: Iterator[Any]) -> dict[str, Any]:
        """One optimizer step on this rank's next `train.grad_accum` micro-batches: forward and
        backward (flat or through the pipeline schedule), gradient reduction, clipping, the
        numerics guard's verdict, AdamW, LR schedule and the aux-loss-free bias update;
        statistics reduced over the ranks. A step the guard rejects (non-finite loss or
        gradient norm, a loss spike) discards its gradients and routing counts."""
        tcfg = self.cfg.train
        self.pm.train()
        mine = [move_batch(next(batches), self.device) for _ in range(tcfg.grad_accum)]
        lm, aux, task_metrics = forward_backward(self.pm, mine, self.task, self._autocast)
        lm, aux = reduce_stats(self.pm, [lm, aux])  # every rank judges the same numbers
        self._verdict = None

        def judge(norm: float) -> bool:
            self._verdict = self.guard.observe(self.step + 1, lm, norm)
            return self._verdict.apply

        grad_norm, applied = self.pm.step(self.optimizer, tcfg.grad_clip, judge)
        if self._verdict is None:  # DeepSpeed stepped inside backward: judged, not vetoed
            self._verdict = self.guard.observe(self.step + 1, lm, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if applied:
            self.pm.update_moe_bias()
        else:
            for _, layer in self.pm.moe_layers():
                layer.load.bias_load_E.zero_()
        return {"train/loss": lm, "train/aux_loss": aux, "train/grad_norm": grad_norm,
                "train/lr": lr, "train/update_skipped": float(not applied),
                "train/seq_len": float(mine[0].input_ids.shape[-1]),
                **self._merge_over_ranks(merge_task_metrics(task_metrics))}

    def _roll_back(self) -> None:
        """After `train.guard.max_consecutive_bad` rejected steps: reload the newest finite
        checkpoint of the current lineage (weights, optimizer, schedule; the data loader keeps
        its position, so the batches that went bad are not replayed), or stop with a one-line
        error (`UnrecoverableTraining`) when there is none or too many rollbacks happened."""
        target = self.files.rollback_point() if self.files is not None else None
        self.guard.rolled_back(self.step, None if target is None else target.step)
        if self.is_main_process:
            print(f"step {self.step}: {self.cfg.train.guard.max_consecutive_bad} bad steps in a "
                  f"row; rolling back to {target.path}", flush=True)
        loaded = load_distributed(target.path, self.pm, self.optimizer, self.scheduler)
        self.step = loaded.step
        self.files.resume_lineage_at(target)

    def _autocast(self):
        """Autocast of this run's precision on its device's type (nothing for fp32)."""
        return autocast_context(self.precision, self.device)

    def _merge_over_ranks(self, merged: dict[str, float]) -> dict[str, float]:
        """A task's step metrics over the data-parallel ranks: counts add up, `loss/X` is
        weighted by `targets/X` (ranks may see different modalities)."""
        if self.dims.dp == 1:
            return merged
        parts: list = [None] * self.dims.dp
        dist.all_gather_object(parts, merged, group=self.dims.dp_group)
        unprefixed = [{k[len("train/"):]: v for k, v in part.items()} for part in parts]
        return merge_task_metrics(unprefixed)

    def _perf(self, interval: tuple[int, float]) -> dict[str, float]:
        """Throughput over the steps since the last log (not one step: one slow step, e.g. a
        checkpoint write, would otherwise speak for the whole interval)."""
        steps, seconds = interval
        tokens_per_s = steps * self.tokens_per_step / seconds
        return {"perf/tokens_per_s": tokens_per_s, "perf/step_s": seconds / steps,
                "perf/tflops": tokens_per_s * self.flops_per_token / 1e12}

    def _moe_metrics(self) -> dict[str, Any]:
        """Per-layer MoE metrics reduced over the data-parallel ranks (tensor-parallel ranks
        route the same tokens), gathered from every pipeline stage, then model-wide summaries."""
        group = self.dims.dp_cp_group if self.dims.dp_cp > 1 else None  # cp: other tokens
        mine = {k: v for k, v in collect_moe_metrics(self.pm, group).items()
                if k.startswith("moe/layer_")}
        if self.dims.pp > 1:
            parts: list = [None] * self.dims.pp
            dist.all_gather_object(parts, mine, group=self.dims.pp_group)
            mine = {k: v for part in parts for k, v in part.items()}
        return {**mine, **moe_summaries(mine)}

    def evaluate(self) -> float:
        """Token-weighted mean LM loss over the eval batches."""
        return self.evaluate_by_source()["val/loss"]

    @torch.no_grad()
    def evaluate_by_source(self) -> dict[str, float]:
        """`val/loss` (token-weighted mean LM loss over the eval batches) and
        `val/loss/<source>` for each data source the batches name; every rank evaluates them
        all (expert and tensor parallelism need every rank in each forward)."""
        from mmfm.metrics.position import bucket_metrics, bucket_sums
        from mmfm.metrics.sources import SourceLosses

        self.pm.train(False)
        total, count = 0.0, 0
        by_source = SourceLosses()
        by_position, eval_len = None, self.cfg.data.seq_len
        for batch in self.task.eval_batches():
            batch = move_batch(batch, self.device)
            with self._autocast():
                if self.dims.pp > 1:
                    loss, n = pipeline_eval_loss(self.pm, batch, self.cfg.data.document_mask)
                else:
                    out = self.task.loss(self.pm.module, batch)
                    loss, n = float(out.lm_loss), out.num_targets
            if self.dims.pp == 1 and out.token_loss_BT is not None:
                eval_len = out.token_loss_BT.shape[1]  # the stage's length, under a schedule
                by_source.add_batch(batch, out.token_loss_BT)
                sums = bucket_sums(out.token_loss_BT, batch.labels != IGNORE_INDEX, POS_BUCKETS)
                by_position = sums if by_position is None else \
                    tuple(a + b for a, b in zip(by_position, sums, strict=True))
            total += loss * n
            count += n
        if count == 0:
            raise UserValueError(f"data.val_shards={self.cfg.data.val_shards} yielded no tokens")
        out = {"val/loss": total / count, **by_source.metrics()}
        if by_position is not None:  # every rank saw every batch: nothing to reduce
            out.update(bucket_metrics(*by_position, eval_len, prefix="val/loss_pos"))
        return out

    def _record_routing(self) -> None:
        """Routing of the fixed sample batch at this step, into RUN/routing/train/."""
        from mmfm.report.capture import TRAIN_SAMPLES, record_routing, records_path

        record_routing(self.model, move_batch(self._routing_batch, self.device), self.step,
                       records_path(self.run_dir, TRAIN_SAMPLES, self.step),
                       document_mask=self.cfg.data.document_mask)

    def _build_logger(self) -> MetricsLogger:
        if not self.is_main_process:
            return MetricsLogger([])
        sinks = [JsonlSink(self.run_dir / "metrics.jsonl")]
        if self.show_progress:
            sinks.append(ConsoleSink(self.cfg.train.steps, self.step))
        if self.cfg.metrics.wandb:
            sinks.append(WandbSink(self.cfg.metrics.wandb_project, self.cfg.run.name, self.run_dir,
                                   self.cfg.metrics.wandb_mode, self.cfg.to_dict(),
                                   resume=self.resumed))
        return MetricsLogger(sinks)
