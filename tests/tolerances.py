"""Tolerances for comparing two computations of the same quantity that differ only in the
order of their floating-point operations (a split batch, a fused kernel, another library).

Grounded in the unit roundoff u = eps/2 of the dtype (2⁻²⁴ for fp32, 2⁻⁸ for bf16): summing n
terms in any order errs by at most γ_n·Σ|terms| with γ_n = n·u/(1 - n·u) (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1 and §4.2). Two orders of the same sum can
differ by twice that. The bound is on the sum of the *magnitudes*, so `atol` takes the scale
of the terms; near-cancelling sums are only ever close in absolute terms.

    torch.testing.assert_close(a, b, **tol(torch.float32, reduction_size=512, scale=a.abs().max()))
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2: the largest relative error of rounding one real number to `dtype`."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's γ_n = n·u/(1 - n·u), the relative error bound of an n-term sum or dot product."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"γ_n is undefined for n={n} in {dtype} (n·u >= 1)"
    return nu / (1 - nu)


def tol(dtype: torch.dtype, reduction_size: int, scale: float | torch.Tensor = 1.0) -> dict[str, float]:
    """`rtol`/`atol` for `torch.testing.assert_close` between two orderings of reductions of
    `reduction_size` terms in `dtype` whose magnitudes are about `scale`: 2·γ_n each."""
    bound = 2 * gamma(max(1, int(reduction_size)), dtype)
    scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
    return {"rtol": bound, "atol": bound * scale}
