"""SwiGLU experts with weights stacked over experts, behind interchangeable compute backends.

Shape legend: A routed assignments (rows sorted by expert), D model width, H expert hidden,
L experts held by this module (all E, or E/ep under expert parallelism).

Each expert computes `w2(silu(x @ w1) * (x @ w3))` with w1, w3: (L, D, H) and w2: (L, H, D).
Input rows arrive grouped by expert: the first `counts_L[0]` rows belong to expert 0, etc.

Backends (numerically equal, checked in tests):
- `loop`: reference; one matmul per expert (a host sync for the counts).
- `grouped_mm`: `torch.nn.functional.grouped_mm` (torch >= 2.9; else `torch._grouped_mm`).
  In torch 2.14 it runs on CPU for fp32/bf16/fp16 as well as on CUDA (bf16, SM >= 80), but it
  needs every row stride to be a multiple of 16 bytes (D and H divisible by 4 in fp32, by 8 in
  bf16) and its backward fails on a non-contiguous gradient, so we make the gradient
  contiguous. When strides are misaligned we fall back to `loop` for that call (documented,
  not silent: see `grouped_mm_supported`). Under torch.compile grouped_mm's meta kernel accepts
  only bf16/fp16, so compiled fp32 runs use `loop` too.
- `megablocks`: grouped GEMM from MegaBlocks (`megablocks.grouped_gemm_util`), imported lazily.
  MegaBlocks needs CUDA to build and pins older torch versions, so it is never installed on
  CPU machines; selecting it without the package raises a clear error at config time.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.moe.config import MEGABLOCKS_MISSING


class BackendUnavailableError(UserValueError):
    """A configured compute backend cannot run here (missing package or hardware)."""


def check_backend_available(backend: str) -> None:
    """Raise BackendUnavailableError when `backend` needs a package that is not installed."""
    if backend == "megablocks" and importlib.util.find_spec("megablocks") is None:
        raise BackendUnavailableError(MEGABLOCKS_MISSING.format(path="model.moe"))


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or torch._grouped_mm


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm_supported(x_AD: Tensor, *weights: Tensor) -> bool:
    """Whether grouped_mm can take these operands: 16-byte row strides, and 16-bit floats when
    traced by torch.compile (its meta kernel rejects fp32 although the eager CPU kernel runs)."""
    if torch.compiler.is_compiling() and x_AD.dtype not in (torch.bfloat16, torch.float16):
        return False
    size = x_AD.element_size()
    return all((w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0
               for w in weights)


def swiglu_loop(x_AD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, counts_L: Tensor) -> Tensor:
    """Reference: one dense SwiGLU per expert on its slice of rows.

    Weights are split with `unbind` (whose backward stacks the per-expert grads once) rather
    than indexed `w[e]` (whose backward materializes a full (L, ...) zero grad per expert).
    """
    outs = []
    experts = zip(x_AD.split(counts_L.tolist(), dim=0), w1.unbind(0), w3.unbind(0), w2.unbind(0),
                  strict=True)
    for x_aD, w1_DH, w3_DH, w2_HD in experts:
        outs.append((F.silu(x_aD @ w1_DH) * (x_aD @ w3_DH)) @ w2_HD)
    return torch.cat(outs, dim=0) if outs else x_AD.new_zeros(0, w2.shape[-1])


def swiglu_grouped_mm(x_AD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                      counts_L: Tensor) -> Tensor:
    """All experts in three grouped GEMMs; offsets are the int32 cumulative counts."""
    if not grouped_mm_supported(x_AD, w1, w2):
        return swiglu_loop(x_AD, w1, w3, w2, counts_L)
    gmm = _grouped_mm_fn()
    offs = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
    w1, w3, w2 = (w.to(x_AD.dtype) for w in (w1, w3, w2))
    h_AH = F.silu(gmm(x_AD, w1, offs=offs)) * gmm(x_AD, w3, offs=offs)
    return _with_contiguous_grad(gmm(_ContiguousGrad.apply(h_AH), w2, offs=offs))


def _with_contiguous_grad(out: Tensor) -> Tensor:
    """`out` itself (not a view: FSDP2 warns about, and would mishandle in-place ops on, a
    module output that is a view), with a hook that makes its incoming gradient contiguous
    before grouped_mm's backward sees it."""
    if out.requires_grad:
        out.register_hook(lambda grad: grad.contiguous())
    return out


def swiglu_megablocks(x_AD: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                      counts_L: Tensor) -> Tensor:
    """MegaBlocks' grouped GEMM: `gmm(a (A, K), b (L, K, N), batch_sizes on the CPU)`.

    Untested here (no CUDA machine): it follows grouped_gemm's documented contract, which wants
    contiguous operands and int64 batch sizes on the host.
    """
    check_backend_available("megablocks")
    from megablocks import grouped_gemm_util as gg  # lazy: CUDA-only package

    if not gg.grouped_gemm_is_available():
        raise BackendUnavailableError(MEGABLOCKS_MISSING.format(path="model.moe"))
    sizes = counts_L.to("cpu", torch.int64)
    x_AD = x_AD.contiguous()
    h_AH = F.silu(gg.ops.gmm(x_AD, w1, sizes)) * gg.ops.gmm(x_AD, w3, sizes)
    return gg.ops.gmm(h_AH.contiguous(), w2, sizes)


BACKENDS = {"loop": swiglu_loop, "grouped_mm": swiglu_grouped_mm, "megablocks": swiglu_megablocks}


class Experts(nn.Module):
    """`num_local` SwiGLU experts of width `hidden`, weights stacked on dim 0."""

    def __init__(self, num_local: int, d_model: int, hidden: int, backend: str = "grouped_mm",
                 first_expert: int = 0) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise UserValueError(f"model.moe.backend={backend!r} is not one of {', '.join(BACKENDS)}")
        check_backend_available(backend)
        self.backend = backend
        self.num_local = num_local
        self.first_expert = first_expert  # global id of local expert 0 (expert parallelism)
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(num_local, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, d_model))

    def reset_parameters(self, init_std: float, out_std: float | None = None) -> None:
        """Like a dense SwiGLU FFN: N(0, init_std) for w1 and w3, N(0, out_std) for w2."""
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=init_std if out_std is None else out_std)

    def forward(self, x_AD: Tensor, counts_L: Tensor) -> Tensor:
        """Rows grouped by expert (counts_L rows each, in order) -> (A, D) expert outputs."""
        device = x_AD.device.type
        if torch.is_autocast_enabled(device):
            # Autocast casts only the ops on its list; grouped_mm is not on the CPU one, so
            # without this the experts would run in fp32 while the dense twin runs in bf16.
            x_AD = x_AD.to(torch.get_autocast_dtype(device))
        return BACKENDS[self.backend](x_AD, self.w1, self.w3, self.w2, counts_L)


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeek, Qwen2-MoE), fused into one dense SwiGLU of width n*hidden."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, init_std: float, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=init_std if out_std is None else out_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))
