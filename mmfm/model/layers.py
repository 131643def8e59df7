"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Shape legend: B batch, T sequence, D model width, H query heads, K key/value heads,
Dh head dim, F FFN hidden size, N = B·T packed tokens, S documents (segments) + 1.
Only math here: no distributed code.

Attention backends (`model.attention`): `sdpa` is torch's `scaled_dot_product_attention`,
which on CUDA picks the flash or memory-efficient kernel by itself (a boolean document mask
rules out flash, so packed documents then run the memory-efficient kernel); `flash_attn` calls
the flash-attn package (optional, CUDA, bf16/fp16 only), whose varlen kernel takes packed
documents as cumulative sequence lengths instead of a (T, T) mask.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.errors import MissingDependencyError
from mmfm.model.rope import rope_cos_sin  # noqa: F401  (re-exported: its old home)

QK_NORMS = ("none", "head", "full")

FLASH_ATTN_MISSING = ("{path}.attention=flash_attn needs the flash-attn package, which is not "
                      "installed (CUDA only): `pip install flash-attn`, or set "
                      "{path}.attention=sdpa (torch picks the flash kernel itself)")


def check_flash_attn_available(path: str = "model") -> None:
    """Raise MissingDependencyError naming flash-attn when it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        raise MissingDependencyError(FLASH_ATTN_MISSING.format(path=path))


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_f32 = x.float()
        normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def apply_rope(x_BHTDh: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
    """Rotate pairs (i, i + Dh/2) of each head vector by position-dependent angles."""
    half = x_BHTDh.shape[-1] // 2
    rotated = torch.cat([-x_BHTDh[..., half:], x_BHTDh[..., :half]], dim=-1)
    return (x_BHTDh * cos_TDh + rotated * sin_TDh).type_as(x_BHTDh)


def document_causal_mask(doc_ids_BT: Tensor) -> Tensor:
    """(B, 1, T, T) bool mask: causal, and a token attends only within its own document."""
    T = doc_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_doc_BTT & causal_TT)[:, None]


@dataclass(frozen=True)
class VarlenDocs:
    """Packed documents as flash-attn's varlen kernel wants them: the documents of all rows
    laid end to end, `cu_seqlens_S` their int32 start offsets plus the total, `max_len` the
    longest one."""

    cu_seqlens_S: Tensor
    max_len: int


def varlen_docs(doc_ids_BT: Tensor) -> VarlenDocs:
    """Document boundaries of a packed batch: a new document starts where the id changes
    within a row, and at every row start (rows never attend to each other)."""
    B, T = doc_ids_BT.shape
    starts_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    starts_N = starts_BT.flatten().nonzero().squeeze(1)
    total = torch.tensor([B * T], device=doc_ids_BT.device)
    cu_seqlens_S = torch.cat([starts_N, total]).to(torch.int32)
    return VarlenDocs(cu_seqlens_S, int((cu_seqlens_S[1:] - cu_seqlens_S[:-1]).max()))


def flash_attention(q_BHTDh: Tensor, k_BKTDh: Tensor, v_BKTDh: Tensor,
                    docs: VarlenDocs | None) -> Tensor:
    """Causal GQA attention through flash-attn (plain, or varlen over packed documents);
    returns (B, H, T, Dh) like SDPA. flash-attn takes (B, T, heads, Dh) and shares K heads
    among H query heads itself."""
    import flash_attn  # lazy: optional CUDA package, checked at config time

    B, H, T, Dh = q_BHTDh.shape
    q, k, v = (t.transpose(1, 2) for t in (q_BHTDh, k_BKTDh, v_BKTDh))  # (B, T, heads, Dh)
    if docs is None:
        out_BTHDh = flash_attn.flash_attn_func(q, k, v, causal=True)
    else:
        cu, n = docs.cu_seqlens_S, docs.max_len
        out_NHDh = flash_attn.flash_attn_varlen_func(
            q.reshape(B * T, H, Dh), k.reshape(B * T, -1, Dh), v.reshape(B * T, -1, Dh),
            cu, cu, n, n, causal=True)
        out_BTHDh = out_NHDh.view(B, T, H, Dh)
    return out_BTHDh.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention through `scaled_dot_product_attention` (or flash-attn).

    K key/value heads are shared by H/K query heads each; SDPA's `enable_gqa` avoids
    materializing repeated keys and values. Options that imported models need:
    `qkv_bias` (Qwen2) and QK-norm, an RMSNorm on queries and keys before RoPE that keeps
    attention logits bounded: `head` normalizes each head over Dh with one weight shared by
    the heads (Qwen3, OLMo-2 style per-head), `full` normalizes the whole projection over
    H·Dh (resp. K·Dh) features (OLMoE).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, backend: str = "sdpa", *,
                 qk_norm: str = "none", qkv_bias: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        assert qk_norm in QK_NORMS, qk_norm
        self.backend = backend
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.qk_norm = qk_norm
        # Context parallelism (`mmfm.parallel.context_parallel`) sets an object that trades
        # sequence shards for head shards around the attention; None: the whole sequence here.
        self.context_parallel = None
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        if qk_norm != "none":
            q_dim = self.head_dim if qk_norm == "head" else n_heads * self.head_dim
            k_dim = self.head_dim if qk_norm == "head" else n_kv_heads * self.head_dim
            self.q_norm, self.k_norm = RMSNorm(q_dim, norm_eps), RMSNorm(k_dim, norm_eps)

    def _project(self, x_BTD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, Dh), k and v (B, K, T, Dh), QK-normed when configured."""
        B, T, _ = x_BTD.shape
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 heads: under tensor parallelism wq/wk/wv hold only this rank's heads (H/tp, K/tp).
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor,
                mask: Tensor | VarlenDocs | None) -> Tensor:
        """`mask`: None (causal), a (B, 1, T, T) bool document mask (sdpa), or the packed
        documents' `VarlenDocs` (flash_attn)."""
        B, T, _ = x_BTD.shape
        q, k, v = self._project(x_BTD)
        cp = self.context_parallel
        if cp is not None:  # now the whole sequence (cos/sin cover it) for 1/cp of the heads
            q, k, v = cp.to_heads(q, k, v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if self.backend == "flash_attn":
            out = flash_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if cp is not None:
            out = cp.to_sequence(out)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, std=out_std)
        if self.qk_norm != "none":
            self.q_norm.weight.data.fill_(1.0)
            self.k_norm.weight.data.fill_(1.0)


class SwiGLU(nn.Module):
    """Dense gated FFN: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)


def output_std(init_std: float, n_layers: int) -> float:
    """Residual-branch output projections are scaled down with depth (GPT-2, OLMo)."""
    return init_std / math.sqrt(2 * n_layers)
