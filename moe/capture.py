"""Capture each MoE layer's routing decisions during a forward, without touching the layers.

`capture_routing(model)` is a context manager that puts a forward hook on the router of every
`MoELayer` of a model (anything with `moe_layers()`, or a single layer) and removes the hooks on
exit, so nothing stays attached and no state outlives the `with` block. Routing analysis and the
trainer's periodic routing samples both use it; the records' on-disk format lives in
`mmfm.report.records`.

**Modality expert groups (MoMa).** `ModalityExperts` routes each token among its own
modality's experts, numbered per group. The capture records *global* expert ids instead: the
groups are laid end to end in the order text, image, audio (`MODALITIES`, groups the layer does
not have are left out), so with `{text: 6, image: 3, audio: 3}` text experts are 0-5, image
experts 6-8 and audio experts 9-11. `LayerRouting.groups` says where each group starts and how
many experts it has, and every token's ids are put back at its position in the forward.

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
from mmfm.moe.modality import MODALITIES, ModalityExperts


@dataclass
class LayerRouting:
    """What one MoE layer chose, forward after forward (CPU tensors, in call order)."""

    num_experts: int
    top_k: int
    experts_TK: list[Tensor] = field(default_factory=list)  # int64 expert ids
    weights_TK: list[Tensor] = field(default_factory=list)  # fp32 gate weights
    # Modality expert groups: name -> (first global expert id, number of experts), in the
    # order text, image, audio; None for one shared pool of experts.
    groups: dict[str, tuple[int, int]] | None = None

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

    Layers with modality expert groups record global expert ids (module docstring). Raises
    `UserValueError` when the model has no MoE layer.
    """
    layers = moe_layers_of(model)
    if not layers:
        raise UserValueError("the model has no MoE layers: there is no routing to capture")
    capture = RoutingCapture()
    handles: list = []
    try:
        for idx, layer in layers:
            if isinstance(layer, ModalityExperts):
                capture.layers[idx] = _hook_groups(layer, handles)
            else:
                record = LayerRouting(layer.cfg.num_experts, layer.cfg.top_k)
                capture.layers[idx] = record
                handles.append(layer.router.register_forward_hook(_recorder(record)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def group_slices(layer: ModalityExperts) -> dict[str, tuple[int, int]]:
    """name -> (first global expert id, number of experts) of each group, text, image, audio."""
    out, first = {}, 0
    for name in MODALITIES:
        if name in layer.groups:
            n = layer.groups[name].cfg.num_experts
            out[name], first = (first, n), first + n
    return out


def _recorder(record: LayerRouting):
    def hook(_router: nn.Module, _inputs, out) -> None:
        record.experts_TK.append(out.topk_idx_TK.detach().cpu())
        record.weights_TK.append(out.topk_weight_TK.detach().float().cpu())

    return hook


def _hook_groups(layer: ModalityExperts, handles: list) -> LayerRouting:
    """Hooks on each group's router (local ids -> global, kept until the layer's forward ends)
    and on the layer (puts each group's rows back at its tokens' positions)."""
    slices = group_slices(layer)
    top_k = next(iter(layer.groups.values())).cfg.top_k
    record = LayerRouting(sum(n for _, n in slices.values()), top_k, groups=slices)
    pending: dict[str, tuple[Tensor, Tensor]] = {}

    def group_hook(name: str):
        def hook(_router: nn.Module, _inputs, out) -> None:
            pending[name] = (out.topk_idx_TK.detach().cpu() + slices[name][0],
                             out.topk_weight_TK.detach().float().cpu())
        return hook

    def layer_hook(_layer: nn.Module, args, kwargs, _out) -> None:
        x_BSD = args[0] if args else kwargs["x_BSD"]
        modality_ids = args[1] if len(args) > 1 else kwargs.get("modality_ids_BS")
        T = x_BSD.shape[0] * x_BSD.shape[1]
        group_T = layer._token_groups(modality_ids, T, x_BSD.device).cpu()
        experts_TK = torch.full((T, top_k), -1, dtype=torch.int64)
        weights_TK = torch.zeros(T, top_k, dtype=torch.float32)
        for g, name in enumerate(layer.groups):
            if name in pending:
                idx = (group_T == g).nonzero().squeeze(1)
                experts_TK[idx], weights_TK[idx] = pending[name]
        pending.clear()
        assert bool((experts_TK >= 0).all()), "a token was routed by no expert group"
        record.experts_TK.append(experts_TK)
        record.weights_TK.append(weights_TK)

    for name, group in layer.groups.items():
        handles.append(group.router.register_forward_hook(group_hook(name)))
    handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    return record
