"""Pipeline parallelism for the multimodal model: stage modules cut from a `MultimodalModel`,
the per-step media side table of the first stage, and per-target-group metrics from the last.

Stage 0 holds the encoders, projectors, the fusion (`mmfm.model.fusion.fuse_media`), the
token embedding and its decoder blocks; the last stage the final norm, the LM head and the
loss. Parameter names stay the full model's (`slots.image.encoder...`,
`decoder.blocks.3...`, `decoder.embed.weight`, the `micro_batches` counter), so checkpoints
move between pipelined and flat layouts.

How media travel. `torch.distributed.pipelining` cuts every tensor argument of a step along
dim 0 into micro-batches, but a micro-batch's media (per modality: padded items, lengths,
token counts) is not row-aligned and cannot be cut that way. So the step cuts the rank's rows
into the schedule's micro-batches itself (equal row ranges, as the schedule cuts the token
ids), selects each range's media items (items belong to rows in row-major order: counting
each row's placeholder runs says which), stores them in the first stage's side table
`micro_batch_media` before `schedule.step`, and passes the schedule the kwarg
`media_index = arange(M)`, which the schedule cuts into one index per micro-batch. The first
stage looks its media up there. The table lives on the stage module (no global state) and is
cleared after the step. Every stage gets `modality_ids` (0 text, 1 image, 2 audio) as a cut
kwarg, as `doc_ids`: modality-aware MoE FFNs (MoMa groups, shared-routing load tracking) need
them in every block. Gradients reach the encoders through stage 0's own autograd graph: the
schedule back-propagates stage 0's output gradient through fusion, projectors and encoders.

Per-modality losses. The schedule's loss function sees (logits, labels) only, so the last
stage's `pipeline_loss` records each micro-batch's per-token losses; after the step they are
cut back into the loader's micro-batches, the task turns them into its `loss/<group>` metrics
(`token_loss_metrics`), and the last pipeline rank broadcasts them over the pipeline group so
the logging rank (global rank 0, on stage 0) merges them over data-parallel ranks as usual.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.encoders.media import MediaTensors
from mmfm.model.decoder import token_losses
from mmfm.model.fused_loss import IGNORE_INDEX
from mmfm.model.fusion import fuse_media, modality_ids_of, run_starts
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.pipeline import StageModule, split_stages


class MultimodalStage(nn.Module):
    """One pipeline stage of a `MultimodalModel`: its decoder stage (`.decoder`, a
    `StageModule`), and on the first stage the encoder slots and the micro-batch counter."""

    def __init__(self, model: nn.Module, stage: StageModule) -> None:
        super().__init__()
        self.decoder = stage
        self.placeholder_ids = dict(model.placeholder_ids)  # every stage: for modality ids
        self.grad_accum = model.grad_accum
        self.slots = model.slots if stage.first else None
        if stage.first:  # the unfreeze-after-N counter travels with the encoders
            self.register_buffer("micro_batches", model.micro_batches)
        self.micro_batch_media: list[dict[str, MediaTensors]] = []  # side table, one step
        self.token_losses: list[Tensor] = []  # last stage: (B, T) per micro-batch, detached

    # What the schedule, the step and `ParallelModel` read off a stage.
    @property
    def first(self) -> bool:
        return self.decoder.first

    @property
    def last(self) -> bool:
        return self.decoder.last

    @property
    def cfg(self):
        return self.decoder.cfg

    @property
    def aux_losses(self) -> list[Tensor]:
        return self.decoder.aux_losses

    def pop_aux(self, microbatches: int) -> Tensor:
        return self.decoder.pop_aux(microbatches)

    def moe_layers(self):
        return self.decoder.moe_layers()

    @property
    def train_step(self) -> int:
        """Optimizer steps taken so far (first stage), as `MultimodalModel.train_step`."""
        return int(self.micro_batches) // self.grad_accum

    def count_micro_batches(self, n: int) -> None:
        """Add `n` loader micro-batches to the counter (the flat task counts one per loss)."""
        self.micro_batches += n

    def forward(self, x: Tensor, doc_ids: Tensor | None = None,
                modality_ids: Tensor | None = None, media_index: Tensor | None = None) -> Tensor:
        """First stage: token ids (B, T) and the index of this micro-batch's media in the side
        table -> fused embeddings through its blocks. Later stages: hidden states (B, T, D)."""
        if self.first:
            if media_index is None or not self.micro_batch_media:
                raise RuntimeError("the first multimodal stage needs its micro-batch media: "
                                   "set micro_batch_media and pass media_index")
            media = self.micro_batch_media[int(media_index.reshape(-1)[0])]
            h_BTD = fuse_media(self.decoder.embed(x), x, media, self.slots,
                               self.placeholder_ids, self.train_step)
        else:
            h_BTD = x
        return self.decoder.run_blocks(h_BTD, doc_ids, modality_ids)

    def pipeline_loss(self, logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
        """The schedule's loss on the last stage: mean next-token loss over targets (as the
        flat model's), recording the per-token losses for the per-group metrics."""
        token_loss_BT = token_losses(logits_BTV, labels_BT)
        self.token_losses.append(token_loss_BT.detach())
        return token_loss_BT.sum() / (labels_BT != IGNORE_INDEX).sum().clamp(min=1)


def split_multimodal_stages(model: nn.Module, cfg: ParallelConfig,
                            pp_rank: int) -> list[MultimodalStage]:
    """This rank's stages of `model` (a `MultimodalModel`); other ranks' layers are dropped."""
    return [MultimodalStage(model, stage) for stage in split_stages(model.decoder, cfg, pp_rank)]


def is_multimodal(parts: list[nn.Module]) -> bool:
    return any(isinstance(p, MultimodalStage) for p in parts)


# ----------------------------------------------------------------------------- media per micro-batch

def items_per_row(input_ids_BT: Tensor, placeholder_id: int) -> Tensor:
    """(B,) number of placeholder runs (media items) in each row."""
    return run_starts(input_ids_BT == placeholder_id).sum(1)


def slice_media(items: MediaTensors, lo: int, hi: int) -> MediaTensors:
    return MediaTensors(items.data[lo:hi], items.lengths[lo:hi], items.num_tokens[lo:hi],
                        fingerprint=items.fingerprint)


def concat_media(pieces: list[MediaTensors]) -> MediaTensors:
    """Items of several batches as one, each item zero-padded to the largest shape (as the
    preprocessors' collate pads; encoders read only each item's `lengths`)."""
    if len(pieces) == 1:
        return pieces[0]
    shape = [max(p.data.shape[d] for p in pieces) for d in range(1, pieces[0].data.dim())]
    padded = []
    for p in pieces:
        pad: list[int] = []
        for d in reversed(range(1, p.data.dim())):
            pad += [0, shape[d - 1] - p.data.shape[d]]
        padded.append(F.pad(p.data, pad))
    return MediaTensors(torch.cat(padded), torch.cat([p.lengths for p in pieces]),
                        torch.cat([p.num_tokens for p in pieces]),
                        fingerprint=pieces[0].fingerprint)


def micro_batch_media(batches: list, microbatches: int,
                      placeholder_ids: dict[str, int]) -> list[dict[str, MediaTensors]]:
    """The media of each of the schedule's `microbatches` equal row ranges over the
    concatenated rows of `batches` (the loader's micro-batches). Where a range is exactly one
    loader batch (train.grad_accum = parallel.microbatches) its media are used as they are."""
    if len(batches) == microbatches:
        return [dict(b.media) for b in batches]
    rows = [(i, r) for i, b in enumerate(batches) for r in range(b.input_ids.shape[0])]
    per_mb = len(rows) // microbatches
    # Per loader batch and modality: index of the first item of each row (and the end).
    starts = [{m: torch.cumsum(F.pad(items_per_row(b.input_ids, t), (1, 0)), 0).tolist()
               for m, t in placeholder_ids.items() if m in b.media} for b in batches]
    out = []
    for k in range(microbatches):
        span = rows[k * per_mb:(k + 1) * per_mb]
        pieces: dict[str, list[MediaTensors]] = {}
        for i in sorted({i for i, _ in span}):  # source batches in order
            mine = [r for j, r in span if j == i]
            lo, hi = mine[0], mine[-1] + 1
            for m, first in starts[i].items():
                pieces.setdefault(m, []).append(slice_media(batches[i].media[m], first[lo],
                                                            first[hi]))
        out.append({m: concat_media(p) for m, p in pieces.items()})
    return out


# ----------------------------------------------------------------------------- one step

def prepare_step(parts: list[nn.Module], batches: list, ids_BT: Tensor,
                 microbatches: int) -> dict[str, Tensor]:
    """Fill the first stage's side table for this step; the kwargs every stage gets."""
    placeholder_ids = next(p for p in parts if isinstance(p, MultimodalStage)).placeholder_ids
    for part in parts:
        if part.first:
            part.micro_batch_media = micro_batch_media(batches, microbatches, placeholder_ids)
    return {"modality_ids": modality_ids_of(ids_BT, placeholder_ids),
            "media_index": torch.arange(microbatches, device=ids_BT.device)}


def finish_step(pm, batches: list, task) -> list[dict[str, float]]:
    """After `schedule.step`: count the micro-batches for the encoders' unfreeze schedule,
    clear the side table, and return the task's per-loader-micro-batch metrics, computed on
    the last stage from its recorded token losses and broadcast over the pipeline group."""
    metrics: list[dict[str, float]] | None = None
    for part in pm.parts:
        if part.first:
            part.micro_batch_media = []
            part.count_micro_batches(len(batches))
        if part.last:
            recorded = part.token_losses[-pm.cfg.microbatches:]  # not metadata inference's
            part.token_losses.clear()
            metrics = _loader_batch_metrics(batches, torch.cat(recorded), task)
    box = [metrics]
    dist.broadcast_object_list(box, group=pm.dims.pp_group, group_src=pm.dims.pp - 1)
    return box[0]


def _loader_batch_metrics(batches: list, token_loss_BT: Tensor, task) -> list[dict[str, float]]:
    metric_fn = getattr(task, "token_loss_metrics", None)
    if metric_fn is None:
        return []
    out, start = [], 0
    for batch in batches:
        rows = batch.input_ids.shape[0]
        out.append(metric_fn(batch, token_loss_BT[start:start + rows]))
        start += rows
    return out


def eval_kwargs(parts: list[nn.Module], batch) -> dict[str, Tensor]:
    """Evaluation (one micro-batch, stages called in order): the side table holds the batch's
    media; the kwargs every stage gets."""
    ids_BT = batch.input_ids
    placeholder_ids = next(p for p in parts if isinstance(p, MultimodalStage)).placeholder_ids
    for part in parts:
        if part.first:
            part.micro_batch_media = [dict(batch.media)]
    return {"modality_ids": modality_ids_of(ids_BT, placeholder_ids),
            "media_index": torch.zeros(1, dtype=torch.long, device=ids_BT.device)}


def clear_tables(parts: list[nn.Module]) -> None:
    for part in parts:
        if isinstance(part, MultimodalStage):
            part.micro_batch_media = []
