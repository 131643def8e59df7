"""Per-expert load monitoring, aux-loss-free bias updates, routing trace, memory shape."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from mmfm.moe import MoEConfig, MoELayer, capture_routing

NAMES = {"tokens_per_expert": "sum", "load_imbalance": "max", "load_cv": "mean",
         "min_load": "min", "max_load": "max", "router_entropy": "mean",
         "dropped_fraction": "mean", "aux_loss": "mean", "lb_loss": "mean",
         "seq_aux_loss": "mean", "z_loss": "mean", "expert_bias": "mean"}


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**{"num_experts": 4, "top_k": 2, **kw}), 8, 16, init_std=0.3)


def test_metric_names_ops_and_values():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    _, aux = layer(x)
    m = layer.compute_metrics(reset=False)
    assert {k: op for k, (_, op) in m.items()} == NAMES
    idx = layer.router(x.reshape(-1, 8)).topk_idx_TK
    counts = torch.bincount(idx.flatten(), minlength=4)
    torch.testing.assert_close(m["tokens_per_expert"][0], counts)
    assert m["load_imbalance"][0].item() == pytest.approx(counts.max().item() / counts.float().mean().item())
    assert m["max_load"][0].item() == pytest.approx(counts.max().item() / 20)
    assert m["aux_loss"][0].item() == pytest.approx(aux.item())
    assert 0 < m["router_entropy"][0].item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert m["seq_aux_loss"][0].item() > 0  # reported although its coefficient is 0
    layer.compute_metrics(reset=True)
    assert layer.compute_metrics()["tokens_per_expert"][0].sum().item() == 0


def test_counts_only_in_training():
    layer = _layer()
    layer.eval()
    layer(torch.randn(2, 5, 8))
    assert layer.compute_metrics()["tokens_per_expert"][0].sum().item() == 0
    layer.train()
    layer(torch.randn(2, 5, 8))
    layer(torch.randn(1, 5, 8))
    assert layer.compute_metrics()["tokens_per_expert"][0].sum().item() == 15 * 2


@pytest.mark.parametrize("use_reentrant,early_stop", [(False, True), (False, False), (True, True)])
def test_activation_checkpointing_counts_once(use_reentrant, early_stop):
    """Recomputation runs inside backward (reentrant: always; non-reentrant: to the end of the
    layer when early stop is off) and must not count the tokens again."""
    layer = _layer()
    x = torch.randn(2, 5, 8, requires_grad=True)
    with set_checkpoint_early_stop(early_stop):
        y, aux = checkpoint(layer, x, use_reentrant=use_reentrant)
        (y.sum() + aux).backward()
    assert layer.compute_metrics()["tokens_per_expert"][0].sum().item() == 10 * 2
    assert layer.router.weight.grad is not None


def test_update_bias_moves_toward_balance():
    layer = _layer(bias_update_rate=0.01, aux_loss_coef=0.0)
    layer.router.expert_bias[0] = 0.5  # start badly imbalanced toward expert 0
    x = torch.randn(4, 16, 8)
    weights_before = layer.router(x.reshape(-1, 8)).scores_TE

    def max_load() -> float:
        layer(x)
        counts = layer.compute_metrics()["tokens_per_expert"][0]
        return counts.max().item() / counts.sum().item()

    start = max_load()
    layer.load.bias_load_E.zero_()
    for _ in range(60):
        layer(x)
        layer.update_bias()
    assert max_load() < start
    assert layer.router.expert_bias[0].item() < 0.5
    torch.testing.assert_close(layer.router(x.reshape(-1, 8)).scores_TE, weights_before)


def test_update_bias_is_noop_at_rate_zero():
    layer = _layer()
    layer(torch.randn(2, 5, 8))
    layer.update_bias()
    assert layer.router.expert_bias.abs().sum().item() == 0


def test_capture_routing_records_the_routers_choice_and_detaches(tmp_path):
    layer = _layer()
    x = torch.randn(2, 3, 8)
    with capture_routing(layer) as capture:
        layer(x)
        layer(x[:1])
    experts_TK, weights_TK = capture.layers[0].cat()
    r = layer.router(x.reshape(-1, 8))
    assert experts_TK.shape == (9, 2)
    assert torch.equal(experts_TK[:6], r.topk_idx_TK)
    torch.testing.assert_close(weights_TK[:6], r.topk_weight_TK)
    layer(x)  # hooks are gone after the block: nothing more is recorded
    assert capture.layers[0].cat()[0].shape[0] == 9
    assert not layer.router._forward_hooks


class _MaxNumel(TorchDispatchMode):
    """Largest tensor produced by any op (parameters themselves are not op outputs)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_no_dense_token_expert_model_intermediate(backend):
    """No op materializes anything near (T, E, D): the largest tensor is O(T*K*H) or weights."""
    T, E, K, D, H = 64, 32, 2, 8, 8
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=E, top_k=K, backend=backend), D, H)
    x = torch.randn(1, T, D, requires_grad=True)
    with _MaxNumel() as probe:
        y, aux = layer(x)
        (y.sum() + aux).backward()
    assert probe.max_numel <= max(T * K * max(D, H), E * D * H, T * E)
    assert probe.max_numel < T * E * D // 4
