"""Context parallelism (parallel.cp) trains like one process on 1024-token sequences.

Each layout trains 3 AdamW steps through the real `Trainer` step on fixed global batches
(4 rows × 1024 tokens) and is compared with `mmfm.parallel.runner.reference_run`, a single
process. cp ranks share their rows and split every sequence, so the aux domains are those of
the data-parallel layout alone (one per dp rank and grad-accum chunk, whole sequences): the MoE
layers count expert load over the cp group, so the mean of the cp ranks' Switch losses is the
whole-sequence loss. Tolerances are tests/test_parallel_parity.py's (fp32; the runs differ only
in summation order). Measured: losses within 1e-7 relative, aux losses and gradient norms
within 2e-7, final weights within 1.3e-5 absolute (the largest in routed-expert weights, where
AdamW, eps 1e-8, scales rounding in near-zero gradient entries up to whole steps; with 2 rows
instead of 4 the experts see fewer tokens and this reached 2.3e-5, so the test keeps 4). The aux-loss-free router bias is on, so a bias whose load was not summed
over the cp ranks would drift and change routing.

Also checked: one forward/backward of the Decoder with packed documents (doc_ids crossing the
chunk boundary) and ignored labels spread unevenly over the chunks (the loss is the token mean
over whole sequences, not the mean of the chunks' means), label-free logits; a checkpoint
written under cp2 × FSDP (weights sharded over the cp ranks) resumed under tp2 (another layout
with the same aux domains); and the validation messages.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re

import pytest
import torch
from test_parallel_parity import assert_matches

from mmfm.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from mmfm.errors import UserValueError
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.local import spawn
from mmfm.parallel.runner import distributed_run, make_batches, reference_run

STEPS, ROWS, SEQ, VOCAB = 3, 4, 1024, 128
TRAIN = TrainConfig(steps=STEPS, micro_batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=0,
                    precision="fp32", grad_clip=0.5)


def model_cfg(n_kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                       ffn_hidden=64, max_seq_len=SEQ,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, z_loss_coef=1e-3,
                                     bias_update_rate=0.01))


# name: (world size, parallel config, n_kv_heads, grad_accum)
LAYOUTS = {
    "cp2_fsdp_ac_accum2": (2, dict(engine="fsdp", cp=2, activation_checkpointing=True), 2, 2),
    "dp2_cp2_fsdp": (4, dict(engine="fsdp", cp=2), 2, 1),
    # (H/tp)/cp and (K/tp)/cp heads per rank: 4 query and 4 key/value heads.
    "tp2_cp2_ddp": (4, dict(engine="ddp", tp=2, cp=2), 4, 1),
}
GROUPS = {2: ["cp2_fsdp_ac_accum2"], 4: ["dp2_cp2_fsdp", "tp2_cp2_ddp"]}
# Written by cp2_fsdp_ac_accum2 after step 2, resumed for step 3 under tp2 (cp = 1, dp = 1,
# grad_accum 2: the same aux domains).
RESUME = ("cp2_fsdp_ac_accum2", 2, dict(engine="ddp", tp=2, dp=1))


def pcfg_of(name: str) -> ParallelConfig:
    world, kw, _, _ = LAYOUTS[name]
    pcfg = ParallelConfig(**kw)
    pcfg.dp = pcfg.resolved_dp(world)
    return pcfg


def train_cfg(name: str) -> TrainConfig:
    return dataclasses.replace(TRAIN, grad_accum=LAYOUTS[name][3])


@functools.cache
def reference(name: str):
    """The single-process run a layout must reproduce; layouts with the same model and aux
    domains (dp × grad_accum chunks of the rows) share one."""
    _, _, kv_heads, accum = LAYOUTS[name]
    return _reference(kv_heads, pcfg_of(name).dp * accum)


@functools.cache
def _reference(kv_heads: int, domains: int):
    # One intra-op thread: on a busy 2-core machine OpenMP's spinning threads cost 5-10× the
    # CPU time of this small run (as the spawned workers, which use one thread each).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_run(model_cfg(kv_heads), ParallelConfig(dp=domains),
                             dataclasses.replace(TRAIN, grad_accum=1),
                             make_batches(STEPS, ROWS, SEQ, VOCAB))
    finally:
        torch.set_num_threads(threads)


def _decoder_check() -> dict[str, float]:
    """Max |difference| between one Decoder forward/backward under cp (gradients averaged over
    the cp ranks, as the dp × cp reduction does) and the same model in one piece."""
    import torch.distributed as dist

    from mmfm.model import Decoder
    from mmfm.parallel.context_parallel import apply_context_parallel

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfg(), max_seq_len=64)
    ref = Decoder(cfg)
    model = copy.deepcopy(ref)
    apply_context_parallel(model, dist.group.WORLD)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 64), generator=gen)
    labels = torch.randint(0, VOCAB, (2, 64), generator=gen)
    labels[:, :20] = -100  # 20 ignored targets in chunk 0, none in chunk 1
    doc_ids = torch.zeros(2, 64, dtype=torch.int32)
    doc_ids[0, 25:] = 1  # a document crossing the chunk boundary (position 32)
    doc_ids[1, 40:] = 2
    want = ref(ids, doc_ids, labels_BT=labels)
    (want.lm_loss + want.aux_loss).backward()
    got = model(ids, doc_ids, labels_BT=labels)
    (got.lm_loss + got.aux_loss).backward()
    grad = 0.0
    for (_, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        g = p.grad.clone()
        dist.all_reduce(g)
        grad = max(grad, float((g / 2 - p_ref.grad).abs().max()))
    with torch.no_grad():
        logits = float((ref(ids, doc_ids).logits - model(ids, doc_ids).logits).abs().max())
    return {"lm": float((want.lm_loss - got.lm_loss).abs()),
            "aux": float((want.aux_loss - got.aux_loss).abs()),
            "token_loss": float((want.token_loss_BT - got.token_loss_BT).abs().max()),
            "grad": grad, "logits": logits}


def _train_group(names: list[str], ckpt_dir: str) -> dict:
    """Worker: train each layout of the group in these processes (rank 0 returns results)."""
    import torch.distributed as dist

    batches = make_batches(STEPS, ROWS, SEQ, VOCAB)
    out = {}
    if dist.get_world_size() == 2:
        out["decoder"] = _decoder_check()
    for name in names:
        save = name == RESUME[0]
        out[name] = distributed_run(model_cfg(LAYOUTS[name][2]), pcfg_of(name), train_cfg(name),
                                    batches, save_to=ckpt_dir if save else None,
                                    save_at=RESUME[1] if save else None)
    if RESUME[0] in names:
        out["resume"] = distributed_run(model_cfg(), ParallelConfig(**RESUME[2]),
                                        train_cfg(RESUME[0]), batches, load_from=ckpt_dir)
    return out if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Lazily run each group (by world size) once per module: {name: result}."""
    cache: dict[int, dict] = {}
    ckpt_dir = str(tmp_path_factory.mktemp("cp_ckpt") / "step2")

    def get(world: int) -> dict:
        if world not in cache:
            cache[world] = spawn(_train_group, world, (GROUPS[world], ckpt_dir), timeout_s=300)[0]
        return cache[world]

    return get


@pytest.mark.distributed
def test_decoder_forward_backward_matches_one_piece(group_results):
    errors = group_results(2)["decoder"]
    assert errors["lm"] < 1e-5 and errors["aux"] < 1e-6, errors
    assert errors["token_loss"] < 1e-5 and errors["logits"] < 1e-5, errors
    assert errors["grad"] < 1e-6, errors


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, group_results):
    result = group_results(LAYOUTS[name][0])[name]
    ref = reference(name)
    assert len(result.losses) == STEPS
    assert_matches(result, ref)


@pytest.mark.distributed
def test_checkpoint_from_cp_resumes_under_tensor_parallel(group_results):
    """Saved by cp2 × FSDP (each weight sharded over the two cp ranks) after step 2, resumed
    under tp2: step 3 and the final weights equal the uninterrupted single-process run."""
    resumed = group_results(2)["resume"]
    ref = reference(RESUME[0])
    assert len(resumed.losses) == STEPS - RESUME[1]
    assert_matches(resumed, ref, steps=slice(RESUME[1], None))


@pytest.mark.parametrize("kw, model_kw, message", [
    (dict(cp=2, pp=2, microbatches=2), {}, "parallel.cp=2 does not compose with parallel.pp=2"),
    (dict(cp=2, ep=2), {}, "parallel.cp=2 does not compose with parallel.ep=2"),
    (dict(cp=2, compile=True), {}, "parallel.compile=true is untested"),
    (dict(cp=4), {}, "parallel.cp=4 does not divide model.n_kv_heads=2"),
    (dict(cp=2, tp=2), {}, "parallel.cp=2 does not divide model.n_kv_heads=2 / parallel.tp=2"),
    (dict(cp=2), dict(seq_aux_loss_coef=0.01), "model.moe.seq_aux_loss_coef=0.01"),
    (dict(cp=0), {}, "parallel.cp=0 must be >= 1"),
])
def test_invalid_layouts_are_refused_by_name(kw, model_kw, message):
    mcfg = model_cfg()
    mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, **model_kw))
    with pytest.raises(UserValueError, match=re.escape(message)):
        ParallelConfig(**kw).validate("parallel", mcfg)


def test_world_size_and_seq_len_are_checked():
    with pytest.raises(UserValueError, match=r"parallel\.dp=1 × parallel\.tp=1 × parallel\.pp=1 "
                                             r"× parallel\.cp=2 = 2 does not equal the world size 4"):
        ParallelConfig(dp=1, cp=2).validate("parallel", world_size=4)
    assert ParallelConfig(cp=2).resolved_dp(8) == 4
    cfg = ExperimentConfig(model=model_cfg(), data=DataConfig(seq_len=1023),
                           parallel=ParallelConfig(cp=2))
    with pytest.raises(ConfigError, match=r"parallel\.cp=2 does not divide data\.seq_len=1023"):
        cfg.validate()
    cfg = ExperimentConfig(model=model_cfg(), data=DataConfig(seq_len=1024),
                           parallel=ParallelConfig(cp=2))
    cfg.metrics.routing_trace_every = 10
    with pytest.raises(ConfigError, match=r"metrics\.routing_trace_every=10 is not available "
                                          r"with parallel\.cp=2"):
        cfg.validate()


def test_deepspeed_with_cp_is_refused():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (its own message comes first)")
    with pytest.raises(UserValueError, match=r"parallel\.cp=2 does not compose with "
                                             r"parallel\.engine=deepspeed"):
        ParallelConfig(cp=2, engine="deepspeed").validate("parallel")


def test_memory_estimate_splits_activations_and_shards_over_cp():
    from pathlib import Path

    from mmfm.config import load_config
    from mmfm.model.memory import estimate_memory

    tiny = Path(__file__).resolve().parents[1] / "configs" / "text_moe_tiny.yaml"
    plain = estimate_memory(load_config(tiny, ["parallel.dp=1", "parallel.engine=fsdp"]))
    cp2 = estimate_memory(load_config(tiny, ["parallel.dp=1", "parallel.engine=fsdp",
                                             "parallel.cp=2"]))
    assert cp2.activations * 2 == plain.activations
    assert cp2.params * 2 == plain.params and cp2.optimizer * 2 == plain.optimizer
