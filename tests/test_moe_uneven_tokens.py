"""MoE layers with no token, and expert parallelism over ranks holding different token counts
(what modality expert groups see: a rank's batch may hold no image at all).

- Empty input: the balance losses are 0 with a zero (not NaN) gradient, the output is empty,
  and nothing is counted in the load metrics.
- Expert parallelism over 2 gloo ranks holding 7 and 3 tokens, or 6 and 0: the mean of the
  ranks' aux losses (Switch + z-loss) and the sum of their router gradients / 2 equal one
  process's on all 10 (or 6) tokens, and every token's output is the one process's. Without
  the share weighting (`MoELayer` docstring) the aux loss is off by 2e-4 relative in the 7/3
  case and by half in the 6/0 case (measured), both far outside the 1e-6 asserted.
- A MoMa FFN (`ModalityExperts`) under expert parallelism where one rank has no image token:
  every rank enters the image group's all-to-all, and outputs and aux loss match one process.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmfm.moe import MoEConfig, MoELayer
from mmfm.moe.losses import router_z_loss, sequence_balance_loss, switch_load_balancing_loss
from mmfm.moe.metrics import load_stats
from mmfm.moe.modality import ModalityExperts
from mmfm.parallel.local import spawn

D, HIDDEN = 8, 16
CFG = MoEConfig(num_experts=4, top_k=2, expert_hidden=HIDDEN, aux_loss_coef=0.01,
                z_loss_coef=0.001, backend="loop")


def _layer(seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(CFG, D, HIDDEN).train()


def test_loss_functions_are_zero_on_no_tokens():
    probs = torch.zeros(0, 4, requires_grad=True)
    idx = torch.zeros(0, 2, dtype=torch.long)
    for loss in (switch_load_balancing_loss(probs, idx, 4), router_z_loss(probs),
                 switch_load_balancing_loss(probs, idx, 4, mean_over=torch.tensor(0.0)),
                 sequence_balance_loss(probs, idx, batch_size=1)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, probs, allow_unused=True)
        assert grad is None or grad.numel() == 0
    assert all(torch.isfinite(v).all() for v in load_stats(torch.zeros(4)).values())


def test_layer_with_no_tokens_has_zero_loss_and_gradient():
    layer = _layer()
    x = torch.zeros(1, 0, D, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (1, 0, D) and aux.item() == 0.0
    (y.sum() + aux).backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    metrics = layer.compute_metrics()
    assert int(metrics["tokens_per_expert"][0].sum()) == 0  # an empty forward counts nothing
    assert all(torch.isfinite(v).all() for v, _ in metrics.values())


def _ep_worker(counts: list[int]) -> dict:
    """Rank r holds tokens [sum(counts[:r]), ...): compare with one process on all of them."""
    import torch.distributed as dist

    from mmfm.parallel.expert_parallel import shard_experts

    rank, world = dist.get_rank(), dist.get_world_size()
    x_all = torch.randn(1, sum(counts), D, generator=torch.Generator().manual_seed(1))
    reference = _layer()
    y_ref, aux_ref = reference(x_all)
    aux_ref.backward()
    layer = _layer()
    shard_experts(layer, dist.group.WORLD)
    lo = sum(counts[:rank])
    y, aux = layer(x_all[:, lo:lo + counts[rank]])
    (aux / world).backward()  # the trainer's objective: mean over the ranks
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    mean_aux = aux.detach().clone()
    dist.all_reduce(mean_aux)
    torch.testing.assert_close(y, y_ref[:, lo:lo + counts[rank]])
    return {"aux": (float(mean_aux) / world, float(aux_ref)),
            "router_grad": (router_grad, reference.router.weight.grad)}


@pytest.mark.distributed
@pytest.mark.parametrize("counts", [[7, 3], [6, 0]])
def test_expert_parallel_losses_are_exact_with_unequal_token_counts(counts):
    for out in spawn(_ep_worker, 2, (counts,), timeout_s=120):
        got, want = out["aux"]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
        torch.testing.assert_close(*out["router_grad"], rtol=1e-5, atol=1e-9)


def _moma_worker() -> dict:
    """Rank 0: text and image tokens; rank 1: text only (its image group routes 0 tokens)."""
    import torch.distributed as dist

    from mmfm.parallel.expert_parallel import apply_expert_parallel

    rank = dist.get_rank()
    groups = {"text": 2, "image": 2}
    torch.manual_seed(0)
    ffn = ModalityExperts(CFG, groups, D, HIDDEN).train()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(2, 6, dtype=torch.long)
    ids[0, 2:5] = 1  # three image tokens in row 0 only
    y_ref, aux_ref = copy.deepcopy(ffn)(x.reshape(1, 12, D), ids.reshape(1, 12))

    class Block(torch.nn.Module):
        is_moe = True

    block = Block()
    block.ffn = ffn
    apply_expert_parallel({"0": block}, dist.group.WORLD)
    y, aux = ffn(x[rank:rank + 1], ids[rank:rank + 1])
    mean_aux = aux.detach().clone()
    dist.all_reduce(mean_aux)
    torch.testing.assert_close(y[0], y_ref[0, rank * 6:(rank + 1) * 6])
    metrics = ffn.compute_metrics()
    return {"aux": (float(mean_aux) / 2, float(aux_ref)),
            "image_tokens": int(metrics["image/tokens_per_expert"][0].sum())}


@pytest.mark.distributed
def test_moma_groups_under_expert_parallelism_with_an_absent_modality():
    outs = spawn(_moma_worker, 2, timeout_s=120)
    for out in outs:
        got, want = out["aux"]
        assert got == pytest.approx(want, rel=1e-6)
    assert [out["image_tokens"] for out in outs] == [3 * CFG.top_k, 0]
