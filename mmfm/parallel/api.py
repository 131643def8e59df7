"""`parallelize(model, dims, cfg)`: one entry point that lays an mmfm Decoder out over processes.

Order (fixed): pipeline split (each rank keeps only its stages' layers) → move to the device →
fp8 conversion (train.precision=fp8) → tensor parallel → context parallel → expert parallel → activation
checkpointing → compile → sharding (FSDP2 `fully_shard`, or DeepSpeed ZeRO when the optimizer
is built, since DeepSpeed wraps both).

Precision is passed in as the run's `mmfm.device.PrecisionChoice`: a bf16 (or fp8) run on CUDA
shards with FSDP2's `MixedPrecisionPolicy` (bf16 parameters for compute and all-gathers, fp32
gradient reduction) and DeepSpeed's `bf16` section; elsewhere weights stay fp32 and autocast
alone lowers the matrix products. The result is a
`ParallelModel`: the local model parts plus what a training step needs (pipeline schedule,
DeepSpeed engine, gradient specs). Meshes and groups come from `dims`, never from globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from mmfm.device import PrecisionChoice
from mmfm.errors import UserValueError
from mmfm.parallel.config import ParallelConfig
from mmfm.parallel.context_parallel import apply_context_parallel
from mmfm.parallel.expert_parallel import apply_expert_parallel, is_routed_expert, moe_layers_of
from mmfm.parallel.grads import GradSpec, all_reduce_grads, clip_grads, sync_tied_grads
from mmfm.parallel.mesh import ParallelDims
from mmfm.parallel.pipeline import build_schedule, split_stages
from mmfm.parallel.tensor_parallel import apply_tensor_parallel

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The Decoder's parameter name, without wrapper prefixes (AC, compile)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def decoder_of(module: nn.Module) -> nn.Module:
    """The Decoder inside a model (the multimodal model wraps one as `.decoder`) or a stage."""
    return getattr(module, "decoder", module)


def blocks_of(part: nn.Module) -> dict[Any, nn.Module]:
    """{key in part.blocks: block} for a Decoder (ModuleList) or a stage (ModuleDict)."""
    blocks = decoder_of(part).blocks
    return dict(blocks.items()) if isinstance(blocks, nn.ModuleDict) else dict(enumerate(blocks))


def apply_activation_checkpointing(part: nn.Module) -> None:
    """Recompute every block in backward (non-reentrant); MoE load is counted once, since the
    layer skips counting inside backward."""
    for key, block in blocks_of(part).items():
        decoder_of(part).blocks[key] = checkpoint_wrapper(block)


def apply_compile(part: nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged)."""
    for block in blocks_of(part).values():
        block.compile()


def bf16_weights(precision: PrecisionChoice | None, device: torch.device) -> bool:
    """Whether sharding engines hold bf16 compute weights (fp32 master copy kept): a bf16 or
    fp8 run on CUDA. On CPUs the weights stay fp32 and autocast lowers the products."""
    return precision is not None and precision.name in ("bf16", "fp8") and device.type == "cuda"


def fsdp_mp_policy(precision: PrecisionChoice | None, device: torch.device):
    """FSDP2 mixed precision for the run: bf16 parameters for compute and all-gathers, fp32
    gradient reduce-scatters (as torchtitan's default); None keeps everything fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16_weights(precision, device):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(part: nn.Module, dims: ParallelDims, cfg: ParallelConfig,
               precision: PrecisionChoice | None = None) -> None:
    """FSDP2 over the dp × cp ranks (context-parallel ranks hold the same weights): one unit per
    block, experts of expert-parallel layers in their own unit on the expert-data-parallel mesh
    (their gradients divided by dp, not dp/ep), then the root; mixed precision as
    `fsdp_mp_policy` says."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reshard = cfg.stage == 3
    mp = fsdp_mp_policy(precision, dims.device) or MixedPrecisionPolicy()
    for block in blocks_of(part).values():
        ignored = set()
        if block.is_moe and dims.ep > 1:
            for layer in moe_layers_of(block.ffn):  # each modality group's experts (MoMa)
                experts = layer.experts
                if dims.edp == 1:  # nothing to shard: mmfm's reducer divides their grads by dp
                    ignored |= set(experts.parameters())
                    continue
                fully_shard(experts, mesh=dims.edp_mesh, reshard_after_forward=reshard,
                            mp_policy=mp)
                experts.set_gradient_divide_factor(float(dims.dp))
                if dims.device.type == "cpu":  # gloo has no PREMUL_SUM: sum, then divide
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dims.dp_cp_mesh, reshard_after_forward=reshard,
                    ignored_params=ignored or None, mp_policy=mp)
    fully_shard(part, mesh=dims.dp_cp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # Ranks may use different weights in a step (a modality absent from one rank's batch):
    # reduce zeros for unused ones so every rank issues the same collectives.
    part.set_reduce_scatter_unused_params(True)


def choose_head_path(part: nn.Module, cfg: ParallelConfig) -> None:
    """Tell the decoder whether its LM head may be fused with the loss: only where the head's
    weight is a plain local tensor in forward (not a tensor-parallel DTensor, not a DeepSpeed
    ZeRO-3 partition, which is gathered only inside the module's own forward). FSDP2 hands
    forward the unsharded plain weight, so it keeps the fused path."""
    from torch.distributed.tensor import DTensor

    decoder = decoder_of(part)
    head = getattr(decoder, "lm_head", None)
    if not hasattr(decoder, "fused_head") or head is None:
        return  # a pipeline stage computes its head and loss itself
    if isinstance(head.weight, DTensor) or (cfg.engine == "deepspeed" and cfg.stage == 3):
        decoder.fused_head = False


@dataclass
class ParallelModel:
    """This rank's share of the model and the machinery of a distributed training step."""

    parts: list[nn.Module]  # the Decoder (pp = 1) or this rank's pipeline stage modules
    dims: ParallelDims
    cfg: ParallelConfig
    precision: PrecisionChoice | None = None  # the run's choice (None: fp32 weights)
    schedule: Any = None  # torch.distributed.pipelining schedule (pp > 1)
    engine: Any = None  # DeepSpeed engine (engine=deepspeed, after build_optimizer)
    specs: list[GradSpec] = field(default_factory=list)

    @property
    def model_cfg(self):
        return decoder_of(self.parts[0]).cfg

    @property
    def module(self) -> nn.Module:
        """What a Task calls: the DeepSpeed engine or the (FSDP-wrapped) Decoder (pp = 1)."""
        assert self.dims.pp == 1, "a pipelined model is driven by its schedule"
        return self.engine if self.engine is not None else self.parts[0]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(Decoder-style name, local parameter) over all parts, each parameter once."""
        seen = set()
        for part in self.parts:
            for name, param in part.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield canonical_name(name), param

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """Persistent buffers (e.g. the aux-loss-free router bias), Decoder-style names."""
        for part in self.parts:
            persistent = {canonical_name(k) for k in part.state_dict(keep_vars=True)}
            for name, buf in part.named_buffers():
                if canonical_name(name) in persistent:
                    yield canonical_name(name), buf

    def moe_layers(self):
        for part in self.parts:
            yield from part.moe_layers()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def build_optimizer(self, tcfg, grad_accum: int = 1) -> torch.optim.Optimizer:
        """AdamW over the local parameters (DeepSpeed: wrapped by its ZeRO optimizer)."""
        if self.cfg.engine == "deepspeed":
            from mmfm.parallel.deepspeed_engine import initialize

            self.engine, optimizer = initialize(self.parts[0], self.dims, self.cfg, tcfg, grad_accum,
                                                bf16=bf16_weights(self.precision, self.dims.device))
            return optimizer
        return build_adamw(self.parts, self.named_parameters(), tcfg, self.model_cfg)

    def backward(self, loss: Tensor) -> None:
        if self.engine is not None:
            # DeepSpeed counts micro-steps in step(): called after every backward, it reduces,
            # clips and steps only at the gradient-accumulation boundary.
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float,
             apply: Callable[[float], bool] | None = None) -> tuple[float, bool]:
        """Reduce gradients, clip to `max_norm` (global norm) and step; returns (the norm
        before clipping, whether the update was applied). `apply(norm)` may veto the update
        (the numerics guard): the gradients are then discarded. DeepSpeed steps inside
        `backward` at the accumulation boundary, so its updates cannot be vetoed."""
        if self.engine is not None:  # the boundary step ran in backward()
            _relink_deepspeed_optimizer_state(self.engine)
            return float(self.engine.get_global_grad_norm() or 0.0), True
        all_reduce_grads(self.specs)
        sync_tied_grads(self.specs, self.dims.tied_group)
        norm = clip_grads(self.specs, max_norm)
        applied = apply is None or apply(norm)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def update_moe_bias(self) -> None:
        """Aux-loss-free bias step with loads summed over the data- and context-parallel ranks
        (tp ranks route the same tokens, so they are not summed)."""
        for _, layer in self.moe_layers():
            layer.update_bias(self.dims.dp_cp_group if self.dims.dp_cp > 1 else None)


def _relink_deepspeed_optimizer_state(engine, force: bool = False) -> None:
    """DeepSpeed ZeRO-1/2 links each weight to its optimizer-state fragments once, right after
    the first optimizer step of the *first* param group, when torch AdamW (lazy state) has no
    state yet for the other groups; their weights then report no `exp_avg`, and
    `safe_get_full_optimizer_state` fails. Re-link once all groups have state."""
    zero = getattr(engine, "optimizer", None)
    if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        return
    if getattr(zero, "_mmfm_relinked", False) and not force:
        return
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    zero._mmfm_relinked = True


def build_adamw(parts, named_params, tcfg, model_cfg) -> torch.optim.AdamW:
    """`mmfm.train.optim.build_optimizer`'s rule over a layout's local parameters; the tied
    LM head is found by name (a pipeline stage may hold it without the embedding)."""
    from mmfm.train.optim import adamw

    embeddings = {id(m.weight) for part in parts for m in part.modules()
                  if isinstance(m, nn.Embedding)}
    # (the multimodal model's decoder is `decoder.`)
    tied_head = {"lm_head.weight", "decoder.lm_head.weight"} if model_cfg.tie_embeddings \
        else set()
    return adamw(named_params, tcfg, no_decay_ids=embeddings, no_decay_names=tied_head)


def grad_specs(pm: ParallelModel) -> list[GradSpec]:
    dims, tied_names = pm.dims, set()
    if dims.pp > 1 and pm.model_cfg.tie_embeddings:
        tied_names = {"embed.weight", "lm_head.weight",
                      "decoder.embed.weight", "decoder.lm_head.weight"}  # text, multimodal
    specs = []
    replicas = dims.dp_cp  # context-parallel ranks hold the same weights as data-parallel ones
    for name, param in pm.named_parameters():
        expert = dims.ep > 1 and is_routed_expert(name)
        holders = replicas * dims.tp // (dims.ep if expert else 1)
        group = None
        if pm.cfg.engine == "ddp" and replicas > 1:
            group = dims.edp_group if expert else dims.dp_cp_group
        elif pm.cfg.engine == "fsdp" and expert and dims.edp == 1:  # left out of FSDP
            group = dims.edp_group
        specs.append(GradSpec(param, group, replicas, holders, name in tied_names))
    return specs


def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig,
                precision: PrecisionChoice | None = None) -> ParallelModel:
    """Lay `model` (a Decoder, identical on every rank) out as `cfg` says over `dims`, in the
    run's `precision` (from `mmfm.device.resolve_precision`; None: fp32 weights)."""
    cfg.validate("parallel", decoder_of(model).cfg, world_size=dims.world_size)
    multimodal = decoder_of(model) is not model
    if multimodal and dims.cp > 1:
        raise UserValueError(
            "parallel.cp > 1 is implemented for the text decoder; the multimodal model trains "
            "with parallel.dp, tp, ep and pp")
    if dims.pp > 1 and multimodal:
        from mmfm.parallel.mm_pipeline import split_multimodal_stages

        parts: list[nn.Module] = split_multimodal_stages(model, cfg, dims.pp_rank)
    elif dims.pp > 1:
        parts = split_stages(model, cfg, dims.pp_rank)
    else:
        parts = [model]
    for part in parts:
        part.to(dims.device)  # before any DTensor exists (moving DTensors swaps tensors)
        if precision is not None and precision.name == "fp8":
            from mmfm.parallel.fp8 import apply_fp8

            apply_fp8(part, dims.device)  # before sharding and compile, as torchao asks
        blocks = blocks_of(part)
        apply_tensor_parallel(blocks, dims.tp_mesh)
        apply_context_parallel(part, dims.cp_group)  # pp = 1 here: `part` is the Decoder
        choose_head_path(part, cfg)
        apply_expert_parallel(blocks, dims.ep_group)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(part)
        if cfg.compile:
            apply_compile(part)
        if cfg.engine == "fsdp" and dims.dp_cp > 1:
            apply_fsdp(part, dims, cfg, precision)
    pm = ParallelModel(parts, dims, cfg, precision)
    if dims.pp > 1:
        pm.schedule = build_schedule(parts, cfg, dims.pp_rank, dims.pp_group, dims.device)
    pm.specs = grad_specs(pm)
    _check_ready(pm)
    return pm


def _check_ready(pm: ParallelModel) -> None:
    """Internal invariant: every rank of a data-parallel group holds the same parameter set."""
    count = torch.tensor([sum(1 for _ in pm.named_parameters())])
    if pm.dims.dp_cp > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=pm.dims.dp_cp_group)
    assert count.item() == len(pm.specs)
