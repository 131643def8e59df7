"""fp8 training (`train.precision: fp8`) through torchao's float8 linears, on GPUs that have
fp8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell).

`apply_fp8(model, device)` swaps the decoder blocks' `nn.Linear`s (attention projections, dense
and shared-expert FFNs) for torchao `Float8Linear`s with dynamic tensorwise scaling, torchao's
documented default recipe; everything else runs under bf16 autocast. Left in bf16, as
torchtitan does: the LM head and embedding (tied, and the loss is sensitive to them), the
router (tiny and precision-sensitive), and linears whose sides are not multiples of 16 (fp8
GEMMs need that). The routed experts stay in bf16 too: torchao's fp8 grouped GEMM is a
prototype (`torchao.prototype.moe_training`) that needs every expert's row count padded to a
multiple of 16, which mmfm's dispatcher does not do yet.

Untested on a GPU here (none was lent); the CPU tests check the errors and the filter.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from mmfm.errors import MissingDependencyError, UserValueError

FP8_MIN_CAPABILITY = (8, 9)
FP8_ALIGNMENT = 16  # fp8 GEMMs need both matrix sides to be multiples of 16
TORCHAO_MISSING = ("train.precision=fp8 needs the torchao package, which is not installed: "
                   "`pip install 'mmfm[fp8]'` (or torchao), or set train.precision=bf16")


class Fp8UnsupportedError(UserValueError):
    """fp8 was asked for on a device without fp8 tensor cores."""


def check_fp8_supported(device: torch.device) -> None:
    """Raise one line unless `device` is a CUDA GPU of capability >= 8.9 and torchao is there."""
    if device.type != "cuda":
        raise Fp8UnsupportedError(
            f"train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9 (H100, L4, ...); "
            f"this run is on {device.type}: use train.precision=auto")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise Fp8UnsupportedError(
            f"train.precision=fp8 needs compute capability >= 8.9; {name} has "
            f"{capability[0]}.{capability[1]}: use train.precision=bf16")
    if importlib.util.find_spec("torchao") is None:
        raise MissingDependencyError(TORCHAO_MISSING)


def fp8_linear_filter(module: nn.Module, fqn: str) -> bool:
    """Whether `apply_fp8` converts this module: an `nn.Linear` inside a decoder block whose
    sides are multiples of 16, not the LM head (see the module docstring)."""
    if not isinstance(module, nn.Linear) or "blocks." not in f".{fqn}":
        return False
    return module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The qualified names of the linears `apply_fp8` converts."""
    return [name for name, module in model.named_modules() if fp8_linear_filter(module, name)]


def apply_fp8(model: nn.Module, device: torch.device) -> list[str]:
    """Convert `model`'s block linears to torchao float8 training in place (before FSDP
    sharding and torch.compile, as torchao asks); returns the names converted."""
    check_fp8_supported(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = fp8_linear_names(model)
    convert_to_float8_training(model, config=Float8LinearConfig(),
                               module_filter_fn=fp8_linear_filter)
    return names
