"""Small helpers shared by the MoE modules."""

from __future__ import annotations

import torch
from torch import nn


def restore_fp32_buffers(module: nn.Module, names: tuple[str, ...]) -> None:
    """Re-cast the named float buffers to fp32 after `module.to(dtype)` lowered them.

    Called from `_apply` overrides: `.to(device)` still moves them, but accumulators and the
    aux-loss-free bias must not lose precision when a model is cast to bf16.
    """
    for name in names:
        buf = getattr(module, name)
        if buf.is_floating_point() and buf.dtype != torch.float32:
            setattr(module, name, buf.float())
