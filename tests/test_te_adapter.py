"""The optional Transformer Engine adapter (mmfm.parallel.te) on a CPU: the missing-package
error, and the swap against a stand-in `transformer_engine.pytorch` whose Linear is torch's."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from mmfm.config import ModelConfig
from mmfm.errors import MissingDependencyError
from mmfm.parallel import te


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="transformer-engine is installed here")
def test_missing_package_is_named_in_one_line():
    with pytest.raises(MissingDependencyError) as info:
        te.apply_te_linears(nn.Linear(16, 16))
    assert "transformer-engine package" in str(info.value) and "\n" not in str(info.value)


class _StandInLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)


def test_block_linears_are_swapped_with_their_weights(monkeypatch):
    package = types.ModuleType("transformer_engine")
    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    te_pytorch.Linear = _StandInLinear
    package.pytorch = te_pytorch
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pytorch)
    monkeypatch.setattr(te, "check_te_available", lambda: None)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_hidden=48, max_seq_len=16, moe=None)
    torch.manual_seed(0)
    model = cfg.build().eval()
    ids = torch.randint(0, 64, (2, 8))
    before = model(ids).logits
    names = te.apply_te_linears(model)
    assert names == ["blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.0.attn.wo",
                     "blocks.0.ffn.w1", "blocks.0.ffn.w3", "blocks.0.ffn.w2"]
    assert all(isinstance(model.get_submodule(n), _StandInLinear) for n in names)
    assert type(model.lm_head) is nn.Linear  # the head stays
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
