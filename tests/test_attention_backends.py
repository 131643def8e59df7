"""`model.attention=flash_attn` plumbing on a CPU: the varlen document boundaries against the
document mask, and the backend's wiring against SDPA through a stand-in flash_attn module that
does the math with SDPA per document (the real package is CUDA-only; gpu_check runs it)."""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from mmfm.model.layers import Attention, document_causal_mask, rope_cos_sin, varlen_docs


def _mask_from_cu_seqlens(cu_seqlens, B: int, T: int) -> torch.Tensor:
    """(B, 1, T, T) causal mask allowing attention only inside each [start, end) segment."""
    allowed = torch.zeros(B * T, B * T, dtype=torch.bool)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        allowed[start:end, start:end] = True
    allowed &= torch.ones(B * T, B * T, dtype=torch.bool).tril()
    rows = [allowed[b * T:(b + 1) * T, b * T:(b + 1) * T] for b in range(B)]
    return torch.stack(rows)[:, None]


def test_varlen_boundaries_equal_the_document_mask():
    # Row 1 starts with the id row 0 ended on: rows must still be separate documents.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [2, 2, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5]])
    docs = varlen_docs(doc_ids)
    assert docs.cu_seqlens_S.tolist() == [0, 3, 5, 6, 8, 12, 18]
    assert docs.cu_seqlens_S.dtype == torch.int32 and docs.max_len == 6
    torch.testing.assert_close(_mask_from_cu_seqlens(docs.cu_seqlens_S, 3, 6),
                               document_causal_mask(doc_ids))


def _stand_in_flash_attn() -> types.ModuleType:
    """flash-attn's two entry points with its layouts ((B, T, heads, Dh) / (N, heads, Dh),
    K kv heads shared by H/K query heads), computed with SDPA."""

    def attend(q, k, v):  # (T, heads, Dh) each, one causal sequence
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)),
                                             is_causal=True)
        return out.transpose(0, 1)

    def flash_attn_func(q, k, v, causal):
        assert causal
        return torch.stack([attend(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k
        bounds = list(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True))
        assert max(e - s for s, e in bounds) == max_q
        return torch.cat([attend(q[s:e], k[s:e], v[s:e]) for s, e in bounds])

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def test_flash_attn_backend_matches_sdpa_with_and_without_documents(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in_flash_attn())
    torch.manual_seed(0)
    sdpa = Attention(d_model=32, n_heads=8, n_kv_heads=2)
    flash = Attention(d_model=32, n_heads=8, n_kv_heads=2, backend="flash_attn")
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 10, 32)
    cos, sin = rope_cos_sin(10, 4, 10000.0)
    torch.testing.assert_close(flash(x, cos, sin, None), sdpa(x, cos, sin, None))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [1] * 7 + [2] * 3])
    torch.testing.assert_close(flash(x, cos, sin, varlen_docs(doc_ids)),
                               sdpa(x, cos, sin, document_causal_mask(doc_ids)))
