"""Shared pieces of the distributed-layout benchmarks (bench/parallel_layouts.py on CPU,
bench/parallel_mfu.py on GPUs): one timed training loop per layout, communication accounting
from the torch profiler, and the analytical bytes each layout should move.

Communication is read from the profiler's backend events (`gloo:all_reduce`, `nccl:...`,
`c10d::_reduce_scatter_base_` ...) on rank 0: their summed duration is the time spent in
collectives, their input sizes the payload. Payload convention, per rank and optimizer step:
the bytes a rank hands to each collective (all-reduce: the tensor; all-gather: its shard;
reduce-scatter: the full input; all-to-all and send: the rows it sends). A ring algorithm puts
about 2(n-1)/n of an all-reduce payload on the wire and (n-1)/n of the others.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from mmfm.config import ModelConfig, TrainConfig
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig

ELEMENT_BYTES = 4  # the CPU benchmark trains in fp32; payloads below count fp32 elements


def bench_model(d_model: int = 128, n_layers: int = 4, seq: int = 64) -> ModelConfig:
    return ModelConfig(vocab_size=1024, d_model=d_model, n_layers=n_layers, n_heads=8,
                       n_kv_heads=4, ffn_hidden=2 * d_model, max_seq_len=seq,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=d_model))


# ----------------------------------------------------------------------------- measuring

_OP_OF = {name: name for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                  "send", "recv", "broadcast", "scatter", "reduce", "gather")}
_OP_OF.update({"allreduce": "all_reduce", "allgather": "all_gather", "alltoall": "all_to_all",
               "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base":
               "reduce_scatter"})


def comm_events(prof) -> dict[str, dict[str, float]]:
    """{op: {"seconds", "bytes", "calls"}} from the backend's own collective events
    (`gloo:all_reduce`, `nccl:all_gather` ...). gloo has no reduce-scatter: it emulates one with
    an all-reduce of the full input (same payload), which is what shows up here."""
    stats: dict[str, dict[str, float]] = defaultdict(
        lambda: {"seconds": 0.0, "bytes": 0.0, "calls": 0})
    for e in prof.events():
        if not e.name.startswith(("gloo:", "nccl:")):
            continue
        op = _OP_OF.get(e.name.split(":", 1)[1])
        if op is None:
            continue
        shapes = e.input_shapes or []
        s = stats[op]
        s["seconds"] += e.cpu_time_total / 1e6
        s["calls"] += 1
        if op != "recv" and shapes:  # a transfer counts once, at its sender
            s["bytes"] += _numel(shapes[0]) * ELEMENT_BYTES
    return dict(stats)


def _numel(shape) -> int:
    n = 1
    for d in shape or []:
        n *= int(d)
    return n if shape else 0


# ----------------------------------------------------------------------------- analytical

def local_params(cfg: ModelConfig, pcfg: ParallelConfig, pp_rank: int) -> dict[str, int]:
    """{"dense", "expert"} parameter counts this rank holds before any ZeRO sharding."""
    from mmfm.parallel.pipeline import stage_ids

    tp, ep = pcfg.tp, pcfg.ep
    D, Dh, K = cfg.d_model, cfg.head_dim, cfg.n_kv_heads
    stages = stage_ids(pcfg, pp_rank) if pcfg.pp > 1 else [0]
    layers = pcfg.stage_layers(cfg.n_layers) if pcfg.pp > 1 else [list(range(cfg.n_layers))]
    last = pcfg.num_stages - 1 if pcfg.pp > 1 else 0
    dense = expert = 0
    for s in stages:
        for i in layers[s]:
            dense += (2 * D * D + 2 * D * K * Dh) // tp + 2 * D
            moe = cfg.moe
            if moe is not None and moe.is_moe_layer(i):
                hidden = moe.expert_hidden or cfg.ffn_hidden
                dense += moe.num_experts * D
                expert += 3 * (moe.num_experts // ep) * D * hidden
            else:
                dense += 3 * D * cfg.ffn_hidden // tp
        if s == 0:
            dense += cfg.vocab_size * D
        if s == last:
            dense += D + (0 if cfg.tie_embeddings and s == 0 else cfg.vocab_size * D
                          if not cfg.tie_embeddings or pcfg.pp > 1 else 0)
    return {"dense": dense, "expert": expert}


def analytic_bytes(cfg: ModelConfig, pcfg: ParallelConfig, dp: int, rows_per_rank: int,
                   seq: int, chunks: int) -> dict[str, float]:
    """Payload bytes per rank (pipeline rank 0) and step that the layout needs, by op."""
    out: dict[str, float] = defaultdict(float)
    p = local_params(cfg, pcfg, 0)
    dense, experts = p["dense"], p["expert"]
    edp = dp // pcfg.ep
    stage = pcfg.stage
    if dp > 1 or (pcfg.ep > 1 and pcfg.engine != "deepspeed"):
        if pcfg.engine == "ddp":
            out["all_reduce"] += dense + experts
        elif pcfg.engine == "fsdp":
            gathers = 2 if stage == 3 else 1
            sharded_experts = experts if pcfg.ep == 1 or edp > 1 else 0
            shards = dense / dp + (sharded_experts / (dp if pcfg.ep == 1 else edp))
            out["all_gather"] += gathers * shards
            out["reduce_scatter"] += dense + sharded_experts
            out["all_reduce"] += experts - sharded_experts
        else:  # DeepSpeed: gradients to their owners, then updated weights all-gathered.
            # ZeRO-3 keeps gathered weights for reuse within stage3_max_reuse_distance (1e9
            # parameters by default), so a model this small is gathered once per step.
            gathers = 1
            out["reduce_scatter"] += dense + experts
            out["all_gather"] += gathers * (dense / dp + experts / edp)
    tokens = rows_per_rank * seq  # per step, all chunks
    D = cfg.d_model
    n_moe = sum(1 for i in range(cfg.n_layers) if cfg.moe and cfg.moe.is_moe_layer(i))
    n_dense = cfg.n_layers - n_moe
    layers_here = cfg.n_layers // pcfg.pp if pcfg.pp > 1 else cfg.n_layers
    frac = layers_here / cfg.n_layers
    if pcfg.tp > 1:  # attention: fwd all-reduce of wo's output, bwd of wq/wk/wv's input grad
        out["all_reduce"] += frac * (2 * (n_moe + 2 * n_dense)) * tokens * D
    if pcfg.ep > 1:  # dispatch + combine, forward and backward, k copies of each token
        out["all_to_all"] += frac * 4 * n_moe * tokens * cfg.moe.top_k * D
    if pcfg.pp > 1:  # stage 0 sends activations forward; gradients come back (received)
        out["send"] += tokens * D
        if cfg.tie_embeddings:  # first and last stage sum the tied embedding's gradient
            out["all_reduce"] += cfg.vocab_size * D
    return {k: v * ELEMENT_BYTES for k, v in out.items()}


# ----------------------------------------------------------------------------- one layout

def run_layout(model_cfg: ModelConfig, pcfg: ParallelConfig, tcfg: TrainConfig,
               global_rows: int, seq: int, warmup: int, timed: int, profiled: int) -> dict:
    """Collective: train `warmup + timed + profiled` steps; rank 0 returns the measurements."""
    from torch.profiler import ProfilerActivity, profile

    from mmfm.parallel.runner import fixed_batch_trainer, make_batches, num_chunks

    steps = warmup + timed + profiled
    tcfg = dataclasses.replace(tcfg, grad_accum=1 if pcfg.pp > 1 else tcfg.grad_accum)
    batches = make_batches(steps, global_rows, seq, model_cfg.vocab_size)
    trainer = fixed_batch_trainer(model_cfg, pcfg, tcfg, batches)
    dims, chunks = trainer.dims, num_chunks(pcfg, tcfg)
    stream = iter(trainer.loader)

    def one(step: int) -> float:
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step(stream)
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for step in range(warmup):
        one(step)
    dist.barrier()
    times = [one(warmup + i) for i in range(timed)]
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=True) as prof:
        prof_times = [one(warmup + timed + i) for i in range(profiled)]
    comm = comm_events(prof) if dims.rank == 0 else {}
    step_s = statistics.median(times)
    out = {}
    if dims.rank == 0:
        comm_s = sum(v["seconds"] for v in comm.values()) / profiled
        measured = {op: v["bytes"] / profiled for op, v in comm.items()}
        rows_per_rank = global_rows // dims.dp
        analytic = analytic_bytes(model_cfg, pcfg, dims.dp, rows_per_rank, seq, chunks)
        out = {"step_s": step_s, "profiled_step_s": statistics.median(prof_times),
               "comm_s": comm_s, "comm_share": comm_s / statistics.median(prof_times),
               "measured_bytes": measured, "analytic_bytes": analytic,
               "calls": {op: v["calls"] / profiled for op, v in comm.items()},
               "world": dims.world_size, "tokens_per_step": global_rows * seq}
    return out
