"""One distributed training step: forward and backward over this rank's micro-batches (flat or
through the pipeline schedule), then the step statistics reduced over the right ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmfm.model.decoder import lm_loss
from mmfm.parallel.api import ParallelModel


def forward_backward(pm: ParallelModel, batches: list, task,
                     autocast) -> tuple[float, float, list[dict[str, float]]]:
    """Local mean LM loss and aux loss over `batches` (this rank's micro-batches of one step),
    and the task's per-micro-batch metrics; gradients are left for `ParallelModel.step`."""
    if pm.dims.pp > 1:
        with autocast():
            return _pipeline_forward_backward(pm, batches, task)
    n = len(batches)
    lm = aux = 0.0
    metrics = []
    for batch in batches:
        with autocast():
            out = task.loss(pm.module, batch)
        loss = out.lm_loss + out.aux_loss
        # DeepSpeed divides by its gradient_accumulation_steps itself.
        pm.backward(loss if pm.engine is not None else loss / n)
        lm += float(out.lm_loss.detach()) / n
        aux += float(out.aux_loss.detach()) / n
        metrics.append(out.metrics)
    return lm, aux, metrics


def _pipeline_forward_backward(pm: ParallelModel, batches: list,
                               task) -> tuple[float, float, list[dict[str, float]]]:
    """All of this rank's rows go through one schedule step, cut into `microbatches`. The
    multimodal model's media, modality ids and per-group metrics: `mm_pipeline`."""
    from mmfm.parallel import mm_pipeline

    ids = torch.cat([b.input_ids for b in batches]).to(pm.dims.device)
    labels = torch.cat([b.labels for b in batches]).to(pm.dims.device)
    kwargs = {}
    if getattr(getattr(getattr(task, "cfg", None), "data", None), "document_mask", False):
        kwargs["doc_ids"] = torch.cat([b.doc_ids for b in batches]).to(pm.dims.device)
    multimodal = mm_pipeline.is_multimodal(pm.parts)
    if multimodal:
        kwargs.update(mm_pipeline.prepare_step(pm.parts, batches, ids, pm.cfg.microbatches))
    first = any(p.first for p in pm.parts)
    last = any(p.last for p in pm.parts)
    losses: list = []
    for part in pm.parts:
        part.aux_losses.clear()
    pm.schedule.step(*((ids,) if first else ()), target=labels if last else None,
                     losses=losses if last else None, **kwargs)
    lm = float(torch.stack([l.detach().float() for l in losses]).mean()) if last else 0.0
    n = pm.cfg.microbatches
    aux = sum(float(part.pop_aux(n)) for part in pm.parts) / n
    metrics = mm_pipeline.finish_step(pm, batches, task) if multimodal else []
    return lm, aux, metrics


def reduce_stats(pm: ParallelModel, values: list[float]) -> list[float]:
    """Sum over pipeline stages (each holds its share, the loss sits on the last), then mean
    over data-parallel replicas; tensor-parallel ranks already agree."""
    t = torch.tensor(values, dtype=torch.float64, device=pm.dims.device)
    if pm.dims.pp > 1:
        dist.all_reduce(t, group=pm.dims.pp_group)
    if pm.dims.dp > 1:
        dist.all_reduce(t, group=pm.dims.dp_group)
        t /= pm.dims.dp
    return t.tolist()


def pipeline_eval_loss(pm: ParallelModel, batch, document_mask: bool) -> tuple[float, int]:
    """Forward-only pass through the stages in order (no micro-batching): each rank runs its
    stages, activations go point-to-point to the next stage's rank; the loss is shared."""
    from mmfm.parallel import mm_pipeline
    from mmfm.parallel.pipeline import stage_ids

    dims = pm.dims
    ids = batch.input_ids.to(dims.device)
    doc_ids = batch.doc_ids.to(dims.device) if document_mask else None
    # The multimodal stages: the first looks the batch's media up, all take modality ids.
    extra = mm_pipeline.eval_kwargs(pm.parts, batch) if mm_pipeline.is_multimodal(pm.parts) \
        else {}
    mine = dict(zip(stage_ids(pm.cfg, dims.pp_rank), pm.parts, strict=True))
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
            out = mine[s](ids if s == 0 else h, doc_ids, **extra)
            if s == num_stages - 1:
                loss += float(lm_loss(out, batch.labels.to(dims.device)))
            else:
                h = out.float()
                if (s + 1) % dims.pp != owner:
                    dist.send(h, group=dims.pp_group, group_dst=(s + 1) % dims.pp)
    for part in pm.parts:
        part.aux_losses.clear()
    mm_pipeline.clear_tables(pm.parts)
    dist.all_reduce(loss, group=dims.pp_group)
    return float(loss), int((batch.labels != -100).sum())
