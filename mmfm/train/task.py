"""What a training job is made of, apart from the loop: its model, its data and its loss.

The trainer is the same for every job; a `Task` supplies the parts that differ. `TextTask` is
the text-only job (token shards, packed sequences, next-token loss). The interleaved
multimodal job plugs in here as another task, chosen by `data.kind`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mmfm.data.loader import Batch, TokenLoader, iter_eval_batches
from mmfm.data.shards import check_disjoint_splits
from mmfm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from mmfm.errors import UserValueError
from mmfm.model import IGNORE_INDEX, Decoder
from mmfm.seq_len import SeqLenSchedule


@dataclass
class LossOutput:
    lm_loss: Tensor  # mean next-token loss over target positions (scalar)
    aux_loss: Tensor  # MoE auxiliary losses, coefficient-weighted (scalar)
    num_targets: int  # positions that carried a target, to weight evaluation means
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-batch scalars
    # (B, T) detached per-token losses, 0 where ignored: per-source validation losses
    # (mmfm.metrics.sources.SourceLosses); None when the model did not return them.
    token_loss_BT: Tensor | None = None


class StatefulLoader(Protocol):
    """An infinite batch iterator whose position a checkpoint can save and restore."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    def build_model(self) -> nn.Module: ...
    def train_loader(self, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> StatefulLoader: ...
    def eval_batches(self) -> Iterable[Any]: ...
    def loss(self, model: nn.Module, batch: Any) -> LossOutput: ...


class TextTask:
    """Text-only pretraining on WebDataset token shards."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.loader: TokenLoader | None = None
        self.schedule = SeqLenSchedule.from_config(cfg)

    def build_model(self) -> nn.Module:
        model = Decoder(self.cfg.model)
        if self.cfg.train.seq_len_schedule:
            # Short stages train with plain RoPE, longer ones with model.rope_scaling.
            model.scale_rope_beyond_original()
        return model

    def train_loader(self, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> TokenLoader:
        """The training loader, after checking every data input up front (shards exist, were
        written with this tokenizer, fit the vocabulary), so no error waits for step 1000.
        `pin_memory`: batches in page-locked memory, for non-blocking copies to a GPU."""
        dcfg, vocab = self.cfg.data, self.cfg.model.vocab_size
        tokenizer_sha = tokenizer_fingerprint(load_tokenizer(dcfg.tokenizer))
        first = self.schedule.stages[0]
        loader = TokenLoader(dcfg.train_shards, first.seq_len, first.rows,
                             rank=rank, world_size=world_size, num_workers=dcfg.num_workers,
                             seed=self.cfg.run.seed, vocab_size=vocab, tokenizer_sha256=tokenizer_sha,
                             strict=dcfg.strict, pin_memory=pin_memory,
                             seq_len_stages=self.schedule.loader_stages(self.cfg.train.grad_accum))
        next(iter_eval_batches(dcfg.val_shards, dcfg.seq_len, 1, 1, vocab, strict=dcfg.strict), None)
        check_disjoint_splits(dcfg.train_shards, dcfg.val_shards, "data.train_shards")
        self.loader = loader
        return loader

    def eval_batches(self) -> Iterable[Batch]:
        """Validation batches at the length (and rows) training runs at now: under a
        `train.seq_len_schedule`, the stage of the last training batch."""
        dcfg = self.cfg.data
        rows, seq_len = (self.loader.current_shape() if self.loader is not None
                         else (self.schedule.stages[0].rows, self.schedule.stages[0].seq_len))
        return iter_eval_batches(dcfg.val_shards, seq_len, rows,
                                 self.cfg.train.eval_batches, vocab_size=self.cfg.model.vocab_size,
                                 strict=dcfg.strict)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        doc_ids = batch.doc_ids if self.cfg.data.document_mask else None
        out = model(batch.input_ids, doc_ids, labels_BT=batch.labels)
        num_targets = int((batch.labels != IGNORE_INDEX).sum())
        # Damaged shards and samples missing against the index (lenient data.strict=false).
        skipped = self.loader.skipped if self.loader is not None else {}
        metrics = {f"data/skipped_{reason}": float(n) for reason, n in skipped.items()}
        return LossOutput(out.lm_loss, out.aux_loss, num_targets, metrics,
                          token_loss_BT=out.token_loss_BT)


def _multimodal_task(cfg) -> Task:
    from mmfm.train.multimodal import MultimodalTask  # encoders, torchaudio, open_clip: lazy

    return MultimodalTask(cfg)


TASKS = {"text": TextTask, "multimodal": _multimodal_task}


def build_task(cfg) -> Task:
    """The task for `cfg.data.kind`."""
    kind = getattr(cfg.data, "kind", "text")
    if kind not in TASKS:
        raise UserValueError(f"data.kind={kind!r} is not one of {', '.join(TASKS)}")
    return TASKS[kind](cfg)


def to_float(value: Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
