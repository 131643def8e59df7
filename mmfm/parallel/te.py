"""Optional Transformer Engine adapter: swap the decoder blocks' linears for
`transformer_engine.pytorch.Linear`, whose GEMMs run in fp8 inside TE's own `fp8_autocast`.

Imported lazily, like MegaBlocks (mmfm.moe.experts): Transformer Engine needs CUDA to build, so
it is never installed on CPU machines, and asking for it without the package is a one-line
error naming it. mmfm's own fp8 path is torchao (`mmfm.parallel.fp8`); this adapter is for
clusters that standardise on TE. The same modules are converted as there (`fp8_linear_filter`).
Untested on a GPU here (none was lent); the CPU test swaps against a stand-in module.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from mmfm.errors import MissingDependencyError
from mmfm.parallel.fp8 import fp8_linear_filter

TE_MISSING = ("the Transformer Engine adapter needs the transformer-engine package, which is "
              "not installed (CUDA only): `pip install 'transformer-engine[pytorch]'` "
              "(or mmfm's `gpu` extra)")


def check_te_available() -> None:
    """Raise MissingDependencyError naming transformer-engine when it is not installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        raise MissingDependencyError(TE_MISSING)


def _te_linear(linear: nn.Linear, te_pytorch) -> nn.Module:
    """A TE Linear with `linear`'s shape and weights (bias-free, as every mmfm projection)."""
    assert linear.bias is None, "mmfm projections carry no bias"
    weight = linear.weight
    new = te_pytorch.Linear(linear.in_features, linear.out_features, bias=False,
                            params_dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
    return new


def apply_te_linears(model: nn.Module) -> list[str]:
    """Replace the block linears `fp8_linear_filter` selects with TE Linears in place;
    returns their qualified names."""
    check_te_available()
    te_pytorch = importlib.import_module("transformer_engine.pytorch")
    names = [name for name, module in model.named_modules() if fp8_linear_filter(module, name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _te_linear(getattr(parent, child), te_pytorch))
    return names
