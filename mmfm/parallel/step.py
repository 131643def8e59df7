"""One distributed training step: forward and backward over this rank's micro-batches (flat or
through the pipeline schedule), then the step statistics reduced over the right ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmfm.parallel.api import ParallelModel


def forward_backward(pm: ParallelModel, batches: list, task, autocast) -> tuple[float, float]:
    """Local mean LM loss and aux loss over `batches` (this rank's micro-batches of one step);
    gradients are left for `ParallelModel.step`."""
    if pm.dims.pp > 1:
        with autocast():
            return _pipeline_forward_backward(pm, batches, task)
    n = len(batches)
    lm = aux = 0.0
    for batch in batches:
        with autocast():
            out = task.loss(pm.module, batch)
        loss = out.lm_loss + out.aux_loss
        # DeepSpeed divides by its gradient_accumulation_steps itself.
        pm.backward(loss if pm.engine is not None else loss / n)
        lm += float(out.lm_loss.detach()) / n
        aux += float(out.aux_loss.detach()) / n
    return lm, aux


def _pipeline_forward_backward(pm: ParallelModel, batches: list, task) -> tuple[float, float]:
    """All of this rank's rows go through one schedule step, cut into `microbatches`."""
    ids = torch.cat([b.input_ids for b in batches]).to(pm.dims.device)
    labels = torch.cat([b.labels for b in batches]).to(pm.dims.device)
    kwargs = {}
    if getattr(getattr(getattr(task, "cfg", None), "data", None), "document_mask", False):
        kwargs["doc_ids"] = torch.cat([b.doc_ids for b in batches]).to(pm.dims.device)
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
    return lm, aux


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
