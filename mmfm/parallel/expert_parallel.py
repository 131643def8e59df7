"""Expert parallelism applied to a built model: each MoE layer keeps E/ep of its experts and
routes tokens to the others by all-to-all over the expert-parallel group.

The ep ranks are data-parallel ranks (dp2ep): they see different tokens, exchange them, and each
runs its own experts on everything routed to them. Gradients of the local experts therefore
already sum the contributions of the whole ep group; they are averaged over the
expert-data-parallel group (the dp/ep ranks holding the same experts) with divisor dp, the
same scale as every other gradient (see `mmfm.parallel.grads`).

Modality expert groups (MoMa, `mmfm.moe.modality.ModalityExperts`) are MoE layers of their
own: each group's experts are sharded over the same ep group (every rank holds n_g/ep experts
of every group, so each group's compute is spread evenly), tokens stay within their modality's
group, and every rank enters every group's all-to-all, also with no token of that modality.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from mmfm.moe import AllToAllDispatcher, Experts, MoELayer

# Attribute set on expert parameters sharded by expert parallelism; DeepSpeed's
# `is_moe_param` reads `allreduce=False`, mmfm's reducers read this flag.
EXPERT_ATTR = "_mmfm_expert_parallel"


def shard_experts(layer: MoELayer, ep_group: dist.ProcessGroup) -> None:
    """Replace `layer`'s experts by this rank's E/ep slice and its dispatcher by all-to-all.

    In place, so whatever was applied to the router and shared experts (e.g. tensor
    parallelism) stays. The layer's Switch loss then counts expert load over the ep group."""
    cfg = layer.cfg
    dispatcher = AllToAllDispatcher(cfg.num_experts, ep_group)
    full = layer.experts
    num_local = dispatcher.num_local
    first = dist.get_rank(ep_group) * num_local
    _, d_model, hidden = full.w1.shape
    local = Experts(num_local, d_model, hidden, full.backend, first_expert=first)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(local, name).copy_(getattr(full, name)[first:first + num_local])
    for param in local.parameters():
        setattr(param, EXPERT_ATTR, True)
    layer.experts, layer.dispatcher, layer.ep_group = local, dispatcher, ep_group


# Routed-expert weights of a block: `blocks.3.ffn.experts.w1`, or a modality group's
# `blocks.3.ffn.groups.image.experts.w1` (any wrapper prefixes stripped first).
_ROUTED_EXPERT = re.compile(r"\.ffn\.(groups\.[^.]+\.)?experts\.")


def is_routed_expert(name: str) -> bool:
    """Whether a (canonical) parameter name is a routed-expert stack, the tensors expert
    parallelism shards on dim 0 and checkpoints save one expert per key."""
    return _ROUTED_EXPERT.search(name) is not None


def named_moe_layers(ffn: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name relative to the FFN, MoE layer) inside a block's FFN: ("", the FFN itself), or
    ("groups.<modality>", layer) for each modality group of a MoMa FFN."""
    groups = getattr(ffn, "groups", None)
    if isinstance(groups, nn.ModuleDict):
        return [(f"groups.{name}", layer) for name, layer in groups.items()]
    return [("", ffn)]


def moe_layers_of(ffn: nn.Module) -> list[MoELayer]:
    """The MoE layers inside a block's FFN: itself, or each modality group (MoMa)."""
    return [layer for _, layer in named_moe_layers(ffn)]


def apply_expert_parallel(blocks: dict[str, nn.Module], ep_group: dist.ProcessGroup) -> None:
    """Shard the experts of every MoE block, each modality group separately (a no-op for a
    1-rank group)."""
    if dist.get_world_size(ep_group) == 1:
        return
    for block in blocks.values():
        if block.is_moe:
            for layer in moe_layers_of(block.ffn):
                shard_experts(layer, ep_group)


def is_expert_sharded(param: torch.Tensor) -> bool:
    return getattr(param, EXPERT_ATTR, False)
