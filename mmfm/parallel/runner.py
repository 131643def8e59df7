"""Train a model for a few steps on fixed global batches under a layout, through the real
`Trainer` and its training step, and the single-process run it must reproduce (a plain loop
written for the comparison). Used by the parity tests and the layout benchmarks.

Data: every step has one global batch of G rows; data-parallel rank r takes rows
[r·G/dp, (r+1)·G/dp) and cuts them into `chunks` micro-batches (train.grad_accum, or the
pipeline's parallel.microbatches). So data order is never what a comparison measures.

What the distributed objective is, and so what the reference computes: the mean over dp ranks of
each rank's mean over its chunks of (LM loss + MoE aux loss). The LM loss is a token mean and
every chunk has the same number of tokens, so its mean over chunks is the global token mean.
The aux losses are not linear in the tokens: the Switch loss of a chunk multiplies the chunk's
expert load by its mean router probabilities. Each chunk therefore is an "aux domain": without
expert parallelism a domain is one chunk of one rank; with expert parallelism the layer counts
expert load over the ep group (all-reduced), and the mean of the ep ranks' aux losses equals the
aux loss of one forward over the ep ranks' chunks concatenated, so a domain is chunk j of all ep
ranks of a group. The reference accumulates gradients over the domains with weight
1/num_domains, exactly the distributed objective (see `aux_domains`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmfm.data.loader import Batch
from mmfm.model import Decoder, lm_loss
from mmfm.parallel.config import ParallelConfig
from mmfm.train.optim import build_optimizer, build_scheduler


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    state: dict[str, Tensor] | None = None  # full weights after the last step
    step_seconds: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)  # task's train/loss/<group>


class FixedBatchTask:
    """A `Task` on in-memory batches (no shards, no tokenizer): the model is the Decoder of the
    config, the loader hands data-parallel rank r its rows of each global batch, cut into
    `train.grad_accum` micro-batches, and the loss is the text task's (labels passed to the
    model, so sharded layouts run the fused LM head + loss wherever the head is a plain tensor,
    while `reference_run` computes the plain head and `lm_loss`: the parity tests compare both)."""

    def __init__(self, model_cfg, batches: list[Batch], grad_accum: int) -> None:
        self.model_cfg, self.batches, self.grad_accum = model_cfg, batches, grad_accum

    def build_model(self) -> Decoder:
        return Decoder(self.model_cfg)

    def train_loader(self, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> FixedBatchLoader:
        return FixedBatchLoader(self.batches, rank, world_size, self.grad_accum)

    def eval_batches(self) -> list[Batch]:
        return []

    def loss(self, model, batch: Batch):
        from mmfm.train.task import LossOutput

        out = model(batch.input_ids, labels_BT=batch.labels)
        return LossOutput(out.lm_loss, out.aux_loss, int(batch.labels.numel()))


class FixedBatchLoader:
    """This rank's micro-batches of each global batch in turn; its position checkpoints."""

    def __init__(self, batches: list[Batch], rank: int, world_size: int, chunks: int) -> None:
        self.batches, self.rank, self.world_size, self.chunks = batches, rank, world_size, chunks
        self.position = 0  # micro-batches handed out

    def __iter__(self) -> FixedBatchLoader:
        return self

    def __next__(self) -> Batch:
        step, j = divmod(self.position, self.chunks)
        self.position += 1
        return local_chunks(self.batches[step], self.rank, self.world_size, self.chunks)[j]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def make_batches(steps: int, rows: int, seq_len: int, vocab: int, seed: int = 1) -> list[Batch]:
    """Random token batches, one (rows, seq_len) global batch per step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (rows, seq_len + 1), generator=gen)
        out.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                         torch.zeros(rows, seq_len, dtype=torch.int32)))
    return out


def rows_of(batch: Batch, lo: int, hi: int) -> Batch:
    return Batch(batch.input_ids[lo:hi], batch.labels[lo:hi], batch.doc_ids[lo:hi])


def local_chunks(batch: Batch, dp_rank: int, dp: int, chunks: int) -> list[Batch]:
    """Rank `dp_rank`'s rows of a global batch, cut into `chunks` micro-batches."""
    per_rank = batch.input_ids.shape[0] // dp
    per_chunk = per_rank // chunks
    start = dp_rank * per_rank
    return [rows_of(batch, start + j * per_chunk, start + (j + 1) * per_chunk)
            for j in range(chunks)]


def aux_domains(batch: Batch, dp: int, ep: int, chunks: int) -> list[Batch]:
    """The micro-batches over which one aux loss is computed (see the module docstring)."""
    per_rank = [local_chunks(batch, r, dp, chunks) for r in range(dp)]
    domains = []
    for group in range(dp // ep):
        members = range(group * ep, (group + 1) * ep)
        for j in range(chunks):
            parts = [per_rank[r][j] for r in members]
            domains.append(Batch(*(torch.cat([getattr(p, f) for p in parts])
                                   for f in ("input_ids", "labels", "doc_ids"))))
    return domains


def num_chunks(pcfg: ParallelConfig, tcfg) -> int:
    return pcfg.microbatches if pcfg.pp > 1 else tcfg.grad_accum


def reference_run(model_cfg, pcfg: ParallelConfig, tcfg, batches: list[Batch],
                  seed: int = 0) -> RunResult:
    """One process, gradient accumulation over the layout's aux domains."""
    torch.manual_seed(seed)
    model = Decoder(model_cfg)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    dp = pcfg.dp or 1
    result = RunResult()
    for batch in batches:
        domains = aux_domains(batch, dp, pcfg.ep, num_chunks(pcfg, tcfg))
        lm = aux = 0.0
        for dom in domains:
            out = model(dom.input_ids)
            loss_lm = lm_loss(out.logits, dom.labels)
            ((loss_lm + out.aux_loss) / len(domains)).backward()
            lm += float(loss_lm.detach()) / len(domains)
            aux += float(out.aux_loss.detach()) / len(domains)
        max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for _, layer in model.moe_layers():
            layer.update_bias()
        result.losses.append(lm)
        result.aux_losses.append(aux)
        result.grad_norms.append(float(norm))
    result.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result


def fixed_batch_trainer(model_cfg, pcfg: ParallelConfig, tcfg, batches: list,
                        seed: int = 0, load_from=None, run_dir: Path | None = None,
                        task=None):
    """A real `Trainer` under `pcfg` whose task is `task` (default `FixedBatchTask(batches)`;
    the multimodal harness passes its own) (collective: every rank calls it, in a process
    group of `pcfg`'s world size)."""
    from mmfm.config import DataConfig, ExperimentConfig, MetricsConfig, RunConfig
    from mmfm.parallel.mesh import launched_world_size
    from mmfm.train.trainer import Trainer

    rows, seq_len = batch_shape(batches[0])
    rows_per_micro_batch = rows // pcfg.resolved_dp(launched_world_size()) // tcfg.grad_accum
    cfg = ExperimentConfig(
        run=RunConfig(seed=seed, out_dir=str(run_dir or "runs"), name="parity"),
        model=model_cfg, data=DataConfig(seq_len=seq_len, document_mask=False),
        train=dataclasses.replace(tcfg, steps=max(tcfg.steps, len(batches)),
                                  micro_batch_size=rows_per_micro_batch),
        metrics=MetricsConfig(console=False), parallel=pcfg)
    task = task or FixedBatchTask(model_cfg, batches, tcfg.grad_accum)
    return Trainer(cfg, resume_from=str(load_from) if load_from else None, task=task,
                   manage_run_dir=False)


def batch_shape(batch) -> tuple[int, int]:
    """(rows, seq_len) of a fixed global batch: a `Batch`, or a list of multimodal `Row`s
    (each seq_len + 1 tokens)."""
    if isinstance(batch, list):
        return len(batch), len(batch[0].tokens) - 1
    return tuple(batch.input_ids.shape)


def distributed_run(model_cfg, pcfg: ParallelConfig, tcfg, batches: list,
                    seed: int = 0, steps: int | None = None, save_to=None, save_at: int | None = None,
                    load_from=None, gather: bool = True, task=None) -> RunResult:
    """Train under `pcfg` on this rank's share of `batches` with the real `Trainer` step
    (collective). `save_to`/`load_from`: a checkpoint folder written after step `save_at`
    (default: the last) / resumed before the first step (steps continue from its step).
    `task`: the task the trainer runs (default: text `FixedBatchTask`); its step metrics
    (e.g. the multimodal `train/loss/<group>`) are kept in `RunResult.metrics`."""
    from mmfm.parallel.state import full_state_dict

    trainer = fixed_batch_trainer(model_cfg, pcfg, tcfg, batches, seed, load_from, task=task)
    result = RunResult()
    stream = iter(trainer.loader)
    end = len(batches) if steps is None else trainer.step + steps
    while trainer.step < end:
        started = time.perf_counter()
        record = trainer.train_step(stream)
        trainer.step += 1
        result.losses.append(record["train/loss"])
        result.aux_losses.append(record["train/aux_loss"])
        result.grad_norms.append(record["train/grad_norm"])
        result.metrics.append({k: v for k, v in record.items() if k.startswith("train/loss/")})
        result.step_seconds.append(time.perf_counter() - started)
        if save_to is not None and trainer.step == (save_at or end):
            trainer.save(Path(save_to))
    if gather:
        result.state = full_state_dict(trainer.pm)
    return result
