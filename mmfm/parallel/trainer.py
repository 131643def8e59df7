"""The distributed training path of `mmfm train`: the single-process `Trainer`'s loop, with the
model laid out by `parallelize`, a rank-aware loader, reduced metrics, rank-0 logging, and
distributed checkpoints that resume under another layout.

Launched by torchrun (or `mmfm launch`), one process per device. Per step each data-parallel
rank reads its own `train.micro_batch_size × train.grad_accum` rows (tensor- and
pipeline-parallel ranks of one replica read the same rows); the global batch is dp times that.
"""

from __future__ import annotations

import atexit
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmfm.config import ConfigError, ExperimentConfig
from mmfm.errors import UserValueError
from mmfm.metrics import MetricsLogger, collect_moe_metrics
from mmfm.model.counting import count_params, flops_per_token
from mmfm.model.decoder import lm_loss
from mmfm.parallel.api import ParallelModel, parallelize
from mmfm.parallel.checkpoint import (
    FORMAT,
    load_distributed,
    read_meta,
    save_distributed,
)
from mmfm.parallel.mesh import build_dims, init_distributed
from mmfm.parallel.step import forward_backward, reduce_stats
from mmfm.parallel.watchdog import RankWatchdog, explain_failure
from mmfm.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_weights,
)
from mmfm.train.optim import build_scheduler
from mmfm.train.task import build_task
from mmfm.train.trainer import Trainer, autocast_context


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed_checkpoint(path: Path) -> bool:
    try:
        return read_meta(path).get("format") == FORMAT
    except (CheckpointError, ValueError, OSError):
        return False


def wants_distributed(cfg: ExperimentConfig, resume: bool = False,
                      resume_from: str | None = None) -> bool:
    """Whether `mmfm train` takes the distributed path: launched on several processes, a
    non-trivial layout, or resuming a distributed checkpoint (which one process can read)."""
    if launched_world_size() > 1 or not cfg.parallel.is_trivial():
        return True
    if resume_from:
        return is_distributed_checkpoint(Path(resume_from))
    if resume:
        ckpts = sorted((cfg.run.dir / "checkpoints").glob("step_*"))
        return bool(ckpts) and is_distributed_checkpoint(ckpts[-1])
    return False


def _single_process_env() -> None:
    """Let one process without torchrun form a 1-rank group (to read a distributed checkpoint)."""
    if "MASTER_PORT" not in os.environ:
        from mmfm.parallel.local import free_port

        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


class DistributedTrainer(Trainer):
    """`Trainer` on a `ParallelModel`; every rank runs it, rank 0 logs and writes files."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, resume_from: str | None = None,
                 show_progress: bool | None = None) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.ckpt_root = self.run_dir / "checkpoints"
        world = launched_world_size()
        p = cfg.parallel
        if cfg.data.kind != "text" and max(p.tp, p.pp, p.ep) > 1:
            raise ConfigError(f"parallel.tp={p.tp}, parallel.pp={p.pp}, parallel.ep={p.ep}: "
                              f"only data parallelism is implemented for "
                              f"data.kind={cfg.data.kind!r} (tp, pp and ep need 1)")
        try:  # before any process group or compute
            cfg.parallel.validate("parallel", cfg.model, world_size=world, train_cfg=cfg.train)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if world == 1:
            _single_process_env()
        rank, world = init_distributed(cfg.parallel.timeout_s)
        self.watchdog = None
        if world > 1 and cfg.parallel.rank_timeout_s > 0:
            self.watchdog = RankWatchdog(rank, world, cfg.parallel.rank_timeout_s).start()
        self.dims = build_dims(cfg.parallel)
        checkpoint = self._find_checkpoint(resume, resume_from)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.task = build_task(cfg)
        model = self.task.build_model()
        if checkpoint is None and cfg.train.init_from:
            load_weights(model, Path(cfg.train.init_from))
        self.pm: ParallelModel = parallelize(model, self.dims, cfg.parallel)
        self.model = self.pm  # what the base loop's helpers iterate (moe_layers)
        self.optimizer = self.pm.build_optimizer(cfg.train, grad_accum=cfg.train.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = self.task.train_loader(self.dims.dp_rank, self.dims.dp)
        self.step = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        show = cfg.metrics.console if show_progress is None else show_progress
        self.show_progress = show and self.is_main_process

    @property
    def is_main_process(self) -> bool:
        return self.dims.is_logging_rank

    # ------------------------------------------------------------------ checkpoints

    def _find_checkpoint(self, resume: bool, resume_from: str | None) -> Checkpoint | None:
        checkpoint = super()._find_checkpoint(resume, resume_from)
        if checkpoint is not None and checkpoint.meta.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written by a single-process run; a "
                f"distributed run starts from its weights with train.init_from={checkpoint.path} "
                f"(optimizer state and data position are not carried over)")
        return checkpoint

    def _restore(self, checkpoint: Checkpoint) -> None:
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
                                  objects={loader_key: None, rng_key: None})
        if same_dp and loader_key in loaded.objects:
            self.loader.load_state_dict(loaded.objects[loader_key])
        elif not same_dp:
            warnings.warn(f"parallel.reshard_loader=true: data order restarts (checkpoint dp="
                          f"{layout.get('dp')}, run dp={self.dims.dp})", stacklevel=2)
        same_layout = {k: layout.get(k) for k in ("pp", "dp", "tp", "ep")} == \
            {"pp": self.dims.pp, "dp": self.dims.dp, "tp": self.dims.tp, "ep": self.dims.ep}
        if same_layout and rng_key in loaded.objects:
            torch_state, python_state = loaded.objects[rng_key]
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
        self.step = loaded.step

    def save(self) -> Path:
        objects = {f"loader.dp{self.dims.dp_rank}": self.loader.state_dict(),
                   f"rng.rank{self.dims.rank}": (torch.get_rng_state(), random.getstate())}
        meta = {"config": self.cfg.to_dict(), "params": vars(count_params(self.cfg.model))}
        return save_distributed(self.ckpt_root, self.pm, self.optimizer, self.scheduler,
                                self.step, meta, objects, keep=self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the step

    def _train_step(self, batches) -> dict[str, Any]:
        tcfg = self.cfg.train
        self.pm.train()
        mine = [next(batches) for _ in range(tcfg.grad_accum)]
        lm, aux = forward_backward(self.pm, mine, self.task,
                                   lambda: autocast_context(tcfg.precision))
        grad_norm = self.pm.step(self.optimizer, tcfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.pm.update_moe_bias()
        lm, aux = reduce_stats(self.pm, [lm, aux])
        return {"train/loss": lm, "train/aux_loss": aux, "train/grad_norm": grad_norm,
                "train/lr": lr}

    def _perf(self, tokens_per_step: int, elapsed: float) -> dict[str, float]:
        return super()._perf(tokens_per_step * self.dims.dp, elapsed)

    def _moe_metrics(self) -> dict[str, Any]:
        """Per-layer MoE metrics reduced over the data-parallel ranks (tensor-parallel ranks
        route the same tokens), gathered from every pipeline stage, then model-wide summaries."""
        group = self.dims.dp_group if self.dims.dp > 1 else None
        mine = {k: v for k, v in collect_moe_metrics(self.pm, group).items()
                if k.startswith("moe/layer_")}
        if self.dims.pp > 1:
            parts: list = [None] * self.dims.pp
            dist.all_gather_object(parts, mine, group=self.dims.pp_group)
            mine = {k: v for part in parts for k, v in part.items()}
        return {**mine, **moe_summaries(mine)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean LM loss over the eval batches; every rank evaluates them all
        (expert and tensor parallelism need every rank in each forward)."""
        self.pm.train(False)
        total, count = 0.0, 0
        for batch in self.task.eval_batches():
            with autocast_context(self.cfg.train.precision):
                if self.dims.pp > 1:
                    loss, n = pipeline_eval_loss(self.pm, batch, self.cfg.data.document_mask)
                else:
                    out = self.task.loss(self.pm.module, batch)
                    loss, n = float(out.lm_loss), out.num_targets
            total += loss * n
            count += n
        if count == 0:
            raise UserValueError(f"data.val_shards={self.cfg.data.val_shards} yielded no tokens")
        return total / count

    # ------------------------------------------------------------------ lifecycle

    def _build_logger(self) -> MetricsLogger:
        return super()._build_logger() if self.is_main_process else MetricsLogger([])

    def fit(self, stop_after: int | None = None):
        try:
            result = super().fit(stop_after)
        except Exception as err:
            self._name_failed_rank(err)
            raise
        if self.watchdog is not None:
            self.watchdog.stop()
        dist.barrier()
        _exit_cleanly_at_shutdown()
        return result

    def _name_failed_rank(self, err: Exception) -> None:
        """A collective failed: if a peer died, say which one instead of gloo's socket error."""
        explain_failure(self.watchdog, self.dims.rank, err)


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


def pipeline_eval_loss(pm: ParallelModel, batch, document_mask: bool) -> tuple[float, int]:
    """Forward-only pass through the stages in order (no micro-batching): each rank runs its
    stages, activations go point-to-point to the next stage's rank; the loss is shared."""
    dims = pm.dims
    ids = batch.input_ids.to(dims.device)
    doc_ids = batch.doc_ids.to(dims.device) if document_mask else None
    mine = {part_stage: part for part_stage, part in zip(_stage_ids(pm), pm.parts, strict=True)}
    num_stages = pm.cfg.num_stages
    B, T = ids.shape
    h = None
    loss = torch.zeros((), dtype=torch.float64, device=dims.device)
    for s in range(num_stages):
        owner = s % dims.pp
        if s in mine:
            if s > 0 and (s - 1) % dims.pp != dims.pp_rank:
                h = torch.empty(B, T, pm.parts[0].cfg.d_model, device=dims.device)
                dist.recv(h, group=dims.pp_group, group_src=(s - 1) % dims.pp)
            out = mine[s](ids if s == 0 else h, doc_ids)
            if s == num_stages - 1:
                loss += float(lm_loss(out, batch.labels.to(dims.device)))
            else:
                h = out.float()
                if (s + 1) % dims.pp != owner:
                    dist.send(h, group=dims.pp_group, group_dst=(s + 1) % dims.pp)
    for part in pm.parts:
        part.aux_losses.clear()
    dist.all_reduce(loss, group=dims.pp_group)
    return float(loss), int((batch.labels != -100).sum())


def _stage_ids(pm: ParallelModel) -> list[int]:
    from mmfm.parallel.pipeline import stage_ids

    return stage_ids(pm.cfg, pm.dims.pp_rank)


def _exit_cleanly_at_shutdown() -> None:
    """Destroy the process group before interpreter teardown: gloo sometimes aborts when its
    sockets are torn down by the garbage collector after a successful run."""
    def _destroy():
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(_destroy)
