"""Expert parallelism over gloo: 2 and 4 CPU processes, each with E/P experts, must reproduce
the single-process layer (outputs, input grads, expert/router grads, aux losses, load counts).

Each rank feeds its own slice of one global batch; the reference layer sees the whole batch.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfm.moe import MoEConfig, MoELayer

D, HIDDEN, B_PER_RANK, S = 8, 16, 2, 6
CASES = {
    "softmax_shared_seqloss": dict(num_experts=4, top_k=2, num_shared_experts=1,
                                   seq_aux_loss_coef=0.01),
    "sigmoid_groups": dict(num_experts=8, top_k=3, score_func="sigmoid", num_groups=4,
                           topk_groups=2),
    # Every token prefers experts 0 and 1 (rank 0): other ranks send and receive nothing.
    "skewed": dict(num_experts=8, top_k=2, bias_update_rate=0.1),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(case: str, ep_group=None) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"backend": "grouped_mm", **CASES[case]})
    layer = MoELayer(cfg, D, HIDDEN, init_std=0.3, ep_group=ep_group)
    if case == "skewed":
        layer.router.expert_bias[:2] = 100.0
    return layer


def _check_rank(rank: int, world: int, case: str) -> None:
    ref = _build(case)
    ep = _build(case, ep_group=dist.group.WORLD)
    ep.load_full_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    x_full = torch.randn(world * B_PER_RANK, S, D, generator=gen)
    g_full = torch.randn(world * B_PER_RANK, S, D, generator=gen)
    rows = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)

    x_ref = x_full.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * g_full).sum() + aux_ref).backward()

    x = x_full[rows].clone().requires_grad_()
    y, aux = ep(x)
    # Data-parallel convention: the global loss is the mean of the ranks' aux losses.
    ((y * g_full[rows]).sum() + aux / world).backward()

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref[rows], **close)
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **close)
    aux_mean = aux.detach().clone()
    dist.all_reduce(aux_mean)
    torch.testing.assert_close(aux_mean / world, aux_ref.detach(), **close)
    lo, hi = ep.experts.first_expert, ep.experts.first_expert + ep.experts.num_local
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(ep.experts, name).grad,
                                   getattr(ref.experts, name).grad[lo:hi], **close)
    dense = {n: p.grad for n, p in ep.named_parameters() if not n.startswith("experts.")}
    ref_grads = dict(ref.named_parameters())
    for n, grad in dense.items():
        dist.all_reduce(grad)  # what data-parallel gradient reduction does
        torch.testing.assert_close(grad, ref_grads[n].grad, **close)
    tokens = ep.compute_metrics()["tokens_per_expert"][0]
    dist.all_reduce(tokens)
    torch.testing.assert_close(tokens, ref.compute_metrics()["tokens_per_expert"][0])
    if ep.cfg.bias_update_rate:
        ep.update_bias(group=dist.group.WORLD)
        ref.update_bias()
        torch.testing.assert_close(ep.router.expert_bias, ref.router.expert_bias)


def _worker(rank: int, world: int, port: int, case: str, errors) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        _check_rank(rank, world, case)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        os._exit(1)  # peers then fail in their next collective or hit the test timeout
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo sometimes aborts during interpreter shutdown


def run_distributed(world: int, case: str, timeout: float = 60.0) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    failed = any(p.exitcode not in (None, 0) for p in procs)
    for p in procs:
        p.join(timeout=0.0 if failed else max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert failed or not hung, f"{len(hung)} rank(s) did not finish within {timeout}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_parallel_2_ranks(case):
    run_distributed(2, case)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sigmoid_groups", "skewed"])
def test_expert_parallel_4_ranks(case):
    run_distributed(4, case)
