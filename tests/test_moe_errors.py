"""Bad configurations fail before any compute, with messages naming the field and values."""

import re

import pytest
import torch

import mmfm.moe.dispatcher as dispatcher_mod
from mmfm.moe import AllToAllDispatcher, MoEConfig, MoELayer


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=4, top_k=5), "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    (dict(capacity_factor=0.0), "model.moe.capacity_factor=0.0 must be > 0 (or null for dropless)"),
    (dict(capacity_factor=-1.5), "model.moe.capacity_factor=-1.5 must be > 0"),
    (dict(backend="triton"), "model.moe.backend='triton' is not one of loop, grouped_mm, megablocks"),
    (dict(score_func="relu"), "model.moe.score_func='relu' is not one of softmax, sigmoid"),
    (dict(drop_policy="random"), "model.moe.drop_policy='random' is not one of probs, position"),
    (dict(num_experts=6, num_groups=4, topk_groups=1),
     "model.moe.num_groups=4 does not divide model.moe.num_experts=6"),
])
def test_bad_config_messages(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoEConfig(**kwargs).validate()
    with pytest.raises(ValueError, match=re.escape(message)):
        MoELayer(MoEConfig(**kwargs), d_model=8, default_expert_hidden=16)


def test_ep_must_divide_experts(monkeypatch):
    monkeypatch.setattr(dispatcher_mod.dist, "get_world_size", lambda group=None: 3)
    with pytest.raises(ValueError, match=re.escape(
            "parallel.ep=3 does not divide model.moe.num_experts=8")):
        AllToAllDispatcher(8, group=object())


def test_layer_validates_with_custom_path():
    with pytest.raises(ValueError, match=re.escape("cfg.top_k=9 exceeds cfg.num_experts=8")):
        MoEConfig(top_k=9).validate(path="cfg")
    assert torch.is_tensor(MoELayer(MoEConfig(), 8, 16)(torch.randn(1, 2, 8))[0])
