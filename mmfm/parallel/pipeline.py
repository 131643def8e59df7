"""Pipeline parallelism with `torch.distributed.pipelining`: stage modules cut from a Decoder,
and the GPipe / 1F1B / interleaved-1F1B schedules.

Stage k holds decoder layers `ParallelConfig.stage_layers(...)[k]`, stage 0 also the token
embedding, the last stage the final norm and LM head. Parameter names are the Decoder's
(`blocks.3.attn.wq.weight`), so checkpoints move between pipelined and flat layouts.

MoE auxiliary losses: the loss the schedule differentiates is the last stage's LM loss, so the
aux losses of layers on earlier stages would get no gradient. As Megatron-Core's
`MoEAuxLossAutoScaler` does, each stage attaches its layers' summed aux loss to its output
activation with an autograd function that passes the activation through unchanged and, in
backward, hands the aux loss the gradient 1 (the weight it has in the objective lm + aux).
The scale lives in the call, not in a global: the schedule's `scale_grads` later divides all
gradients, aux included, by the number of micro-batches, as it does the LM loss's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from mmfm.model.decoder import _attention_mask, lm_loss, rope_tables
from mmfm.parallel.config import ParallelConfig


class AttachAuxLoss(torch.autograd.Function):
    """y = x in forward; in backward, x gets y's gradient and `aux` gets `aux_grad`."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor, aux_grad: float) -> Tensor:
        ctx.aux_grad = aux_grad
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.aux_grad, dtype=dtype, device=device), None


def attach_aux_loss(x: Tensor, aux: Tensor, aux_grad: float = 1.0) -> Tensor:
    if not aux.requires_grad:
        return x
    return AttachAuxLoss.apply(x, aux, aux_grad)


class StageModule(nn.Module):
    """One pipeline stage of a Decoder: (embed) → its blocks → (norm, LM head)."""

    def __init__(self, decoder: nn.Module, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = decoder.cfg
        self.first, self.last = first, last
        self.layer_ids = list(layers)
        self.attention = decoder.cfg.attention  # the form of the document mask the blocks take
        self.embed = decoder.embed if first else None
        self.blocks = nn.ModuleDict({str(i): decoder.blocks[i] for i in layers})
        self.norm = decoder.norm if last else None
        self.lm_head = decoder.lm_head if last else None
        self.register_buffer("rope_cos", decoder.rope_cos, persistent=False)
        self.register_buffer("rope_sin", decoder.rope_sin, persistent=False)
        self.aux_losses: list[Tensor] = []  # detached, one per forward (for logging)

    def forward(self, x: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Token ids (first stage) or hidden states (B, T, D) -> hidden states or logits."""
        return self.run_blocks(self.embed(x) if self.first else x, doc_ids)

    def run_blocks(self, h_BTD: Tensor, doc_ids: Tensor | None = None,
                   modality_ids: Tensor | None = None) -> Tensor:
        """Embeddings or hidden states (B, T, D) through this stage's blocks (modality-aware
        MoE FFNs get `modality_ids`), then, on the last stage, norm and LM head."""
        T = h_BTD.shape[1]
        cos, sin = rope_tables(self.cfg, self.rope_cos, self.rope_sin, T)
        mask = _attention_mask(doc_ids, self.attention)
        aux = h_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks.values():
            h_BTD, block_aux = block(h_BTD, cos, sin, mask, modality_ids)
            aux = aux + block_aux
        self.aux_losses.append(aux.detach())
        h_BTD = attach_aux_loss(h_BTD, aux)
        return self.lm_head(self.norm(h_BTD)) if self.last else h_BTD

    def moe_layers(self):
        for block in self.blocks.values():
            if block.is_moe:
                yield block.layer_idx, block.ffn

    def pop_aux(self, microbatches: int) -> Tensor:
        """Sum of the aux losses of the last `microbatches` forwards (0 if none). Only the
        last ones: on its first step the schedule runs one extra forward on placeholder
        inputs to infer activation shapes (torch >= 2.12 "dynamic metadata inference")."""
        total = sum(self.aux_losses[-microbatches:], torch.zeros(()))
        self.aux_losses.clear()
        return total


def stage_ids(cfg: ParallelConfig, pp_rank: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank` (looped placement for interleaving)."""
    return [pp_rank + v * cfg.pp for v in range(cfg.pp_virtual_stages)]


def split_stages(decoder: nn.Module, cfg: ParallelConfig, pp_rank: int) -> list[StageModule]:
    """This rank's stage modules; the decoder's other layers are dropped (freed)."""
    layers = cfg.stage_layers(decoder.cfg.n_layers)
    last = cfg.num_stages - 1
    return [StageModule(decoder, layers[s], s == 0, s == last) for s in stage_ids(cfg, pp_rank)]


def _loss_fn(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    return lm_loss(logits_BTV, labels_BT)


def build_schedule(parts: list[StageModule], cfg: ParallelConfig, pp_rank: int,
                   pp_group: dist.ProcessGroup, device: torch.device):
    """The configured schedule over this rank's stages (gradients averaged over micro-batches)."""
    ids = stage_ids(cfg, pp_rank)
    stages = [PipelineStage(part, s, cfg.num_stages, device, group=pp_group)
              for part, s in zip(parts, ids, strict=True)]
    # A last stage may bring its own loss (the multimodal stage records per-token losses).
    loss_fn = next((p.pipeline_loss for p in parts if p.last and hasattr(p, "pipeline_loss")),
                   _loss_fn)
    if cfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, cfg.microbatches, loss_fn=loss_fn)
    cls = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], cfg.microbatches, loss_fn=loss_fn)
