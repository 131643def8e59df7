"""Tensor parallelism (Megatron-style) for mmfm blocks through DTensor `parallelize_module`.

Per block: wq/wk/wv and the FFN's w1/w3 are column-parallel (each rank holds H/tp heads, K/tp
key/value heads, F/tp hidden units), wo and w2 are row-parallel (their partial outputs are
all-reduced), so one block costs two all-reduces of (B, T, D) forward and two backward (one
per block with an MoE FFN, whose routed experts are not split). The Attention module infers its
local head count from the projection width.

Replicated across the tp ranks: embeddings, norms, LM head, router and the routed experts (which
are sharded by expert parallelism instead). Shared experts are split like the dense FFN.
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
        if block.ffn.shared_experts is not None:
            plan.update({"ffn.shared_experts": _replicated_input(1),
                         "ffn.shared_experts.w1": ColwiseParallel(),
                         "ffn.shared_experts.w3": ColwiseParallel(),
                         "ffn.shared_experts.w2": RowwiseParallel()})
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
