"""mmfm.parallel: distributed layouts (data/ZeRO, tensor, pipeline and expert parallel) applied
to an mmfm model by one `parallelize(model, dims, cfg)`; meshes and process groups are passed
explicitly and nothing reads a global parallel state. See docs/distributed.md.

Only the config is imported eagerly (mmfm.config needs it); the rest loads on first use.
"""

from __future__ import annotations

import importlib

from mmfm.parallel.config import ParallelConfig

_LAZY = {
    "ParallelDims": "mmfm.parallel.mesh",
    "init_distributed": "mmfm.parallel.mesh",
    "parallelize": "mmfm.parallel.api",
    "ParallelModel": "mmfm.parallel.api",
}

__all__ = ["ParallelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmfm.parallel' has no attribute {name!r}")
