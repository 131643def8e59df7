"""Tensor parallelism (Megatron-style) for mmfm blocks through DTensor `parallelize_module`.

Per block: wq/wk/wv and the FFN's w1/w3 are column-parallel (each rank holds H/tp heads, K/tp
key/value heads, F/tp hidden units), wo and w2 are row-parallel (their partial outputs are
all-reduced), so one block costs two all-reduces of (B, T, D) forward and two backward (one
per block with an MoE FFN, whose routed experts are not split). The Attention module infers its
local head count from the projection width.

Replicated across the tp ranks: embeddings, norms, LM head, router and the routed experts (which
are sharded by expert parallelism instead). Shared experts are split like the dense FFN, those
of every modality group of a MoMa FFN too. The multimodal model's encoders and projectors are
replicated (small next to the decoder): every tp rank encodes the same media, so their
gradients agree and count once per tp group in the gradient norm (`GradSpec.holders`).
Sequence parallelism (norms on sequence shards) is not applied: see docs/distributed.md.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from mmfm.parallel.expert_parallel import named_moe_layers


def _replicated_input(n_args: int) -> PrepareModuleInput:
    """Make the first argument a replicated DTensor once, at the module boundary: the column-
    parallel projections that share it (wq/wk/wv, w1/w3) then sum their partial input
    gradients as DTensors, and one all-reduce runs in backward instead of one per projection."""
    layouts = (Replicate(),) + (None,) * (n_args - 1)
    return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts)


def block_plan(block: nn.Module) -> dict:
    """The `parallelize_module` plan of one decoder block (FQNs relative to the block)."""
    plan = {"attn": _replicated_input(4),  # (x, cos, sin, mask)
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel()}
    if block.is_moe:
        for name, layer in named_moe_layers(block.ffn):  # each modality group's too (MoMa)
            if layer.shared_experts is not None:
                shared = ".".join(filter(None, ("ffn", name, "shared_experts")))
                plan.update({shared: _replicated_input(1),
                             f"{shared}.w1": ColwiseParallel(),
                             f"{shared}.w3": ColwiseParallel(),
                             f"{shared}.w2": RowwiseParallel()})
    else:
        plan.update({"ffn": _replicated_input(1), "ffn.w1": ColwiseParallel(),
                     "ffn.w3": ColwiseParallel(), "ffn.w2": RowwiseParallel()})
    return plan


def apply_tensor_parallel(blocks: dict[str, nn.Module], tp_mesh: DeviceMesh) -> None:
    """Shard every block in place over `tp_mesh` (a no-op for a 1-rank mesh)."""
    if tp_mesh.size() == 1:
        return
    for block in blocks.values():
        parallelize_module(block, tp_mesh, block_plan(block))
