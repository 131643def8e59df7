"""Collect per-expert load metrics from every MoE layer of a model into slash-named scalars.

Each `MoELayer.compute_metrics()` returns `{name: (tensor, reduce_op)}`; the reduce op says how
the value combines across ranks (OLMo-core's convention), so a distributed run can all-reduce
each metric correctly before logging. Vectors (tokens per expert, bias) are logged as lists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "mean": "SUM"}


def reduce_metric(value: Tensor, op: str, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce one metric over `group` by its declared op (mean = sum / world size)."""
    if group is None or not dist.is_initialized():
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    return value / dist.get_world_size(group) if op == "mean" else value


def collect_moe_metrics(model: torch.nn.Module, group: dist.ProcessGroup | None = None,
                        reset: bool = True) -> dict[str, Any]:
    """`moe/layer_XX/<name>` for every MoE layer, plus model-wide `moe/<name>` summaries
    (mean over layers of scalars, max of the load imbalance)."""
    out: dict[str, Any] = {}
    per_name: dict[str, list[float]] = {}
    for layer_idx, layer in model.moe_layers():
        for name, (value, op) in layer.compute_metrics(reset=reset).items():
            value = reduce_metric(value, op, group)
            key = f"moe/layer_{layer_idx:02d}/{name}"
            if value.numel() == 1:
                out[key] = float(value)
                per_name.setdefault(name, []).append(float(value))
            else:
                out[key] = [round(float(v), 6) for v in value.flatten()]
    for name, values in per_name.items():
        out[f"moe/{name}"] = sum(values) / len(values)
    if "load_imbalance" in per_name:
        out["moe/max_load_imbalance"] = max(per_name["load_imbalance"])
    return out
