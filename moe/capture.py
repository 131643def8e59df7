"""Capture each MoE layer's routing decisions during a forward, without touching the layers.

`capture_routing(model)` is a context manager that puts a forward hook on the router of every
`MoELayer` of a model (anything with `moe_layers()`, or a single layer) and removes the hooks on
exit, so nothing stays attached and no state outlives the `with` block. Routing analysis and the
trainer's periodic routing samples both use it; the records' on-disk format lives in
`mmfm.report.records`.

Shape legend: T tokens of one forward (flattened batch), K experts per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.moe.layer import MoELayer
from mmfm.moe.modality import ModalityExperts


@dataclass
class LayerRouting:
    """What one MoE layer chose, forward after forward (CPU tensors, in call order)."""

    num_experts: int
    top_k: int
    experts_TK: list[Tensor] = field(default_factory=list)  # int64 expert ids
    weights_TK: list[Tensor] = field(default_factory=list)  # fp32 gate weights

    def cat(self) -> tuple[Tensor, Tensor]:
        """All forwards' (expert ids, gate weights), concatenated along tokens."""
        return torch.cat(self.experts_TK), torch.cat(self.weights_TK)


@dataclass
class RoutingCapture:
    """Per MoE layer index, the routing of every forward run inside the `with` block."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)


def moe_layers_of(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE FFN) of a decoder, a wrapper with `.decoder`, or one MoE layer."""
    if isinstance(model, (MoELayer, ModalityExperts)):
        return [(0, model)]
    for owner in (model, getattr(model, "decoder", None)):
        if owner is not None and hasattr(owner, "moe_layers"):
            return list(owner.moe_layers())
    return []


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingCapture]:
    """Record the top-k expert ids and gate weights of every MoE layer while the block runs.

    Raises `UserValueError` when the model has no MoE layer, or when a layer routes within
    modality groups (MoMa), whose experts are numbered per group and not comparable.
    """
    layers = moe_layers_of(model)
    if not layers:
        raise UserValueError("the model has no MoE layers: there is no routing to capture")
    capture = RoutingCapture()
    handles = []
    try:
        for idx, layer in layers:
            if isinstance(layer, ModalityExperts):
                raise UserValueError(
                    "routing capture is not supported for modality expert groups "
                    "(multimodal.moe_routing=modality); use shared routing to analyse routing")
            record = LayerRouting(layer.cfg.num_experts, layer.cfg.top_k)
            capture.layers[idx] = record
            handles.append(layer.router.register_forward_hook(_recorder(record)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def _recorder(record: LayerRouting):
    def hook(_router: nn.Module, _inputs, out) -> None:
        record.experts_TK.append(out.topk_idx_TK.detach().cpu())
        record.weights_TK.append(out.topk_weight_TK.detach().float().cpu())

    return hook
