"""DeepSpeed ZeRO (stages 0-3) around an mmfm model, with expert parameters in their own
expert-data-parallel groups.

How DeepSpeed knows expert parameters (deepspeed/moe/utils.py): a parameter with
`allreduce = False` is an expert parameter and `group_name` (e.g. "ep_size_2") names its
expert-data-parallel group in `deepspeed.utils.groups`; the optimizer's param groups must be
split so that expert parameters sit in groups marked `moe: True` (DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer`); ZeRO-1/2 then partition and reduce
those groups over the expert-data-parallel group. The engine only enables this path when the
model contains a `deepspeed.moe.layer.MoE` module, so mmfm adds an empty marker subclass next to
the model (no parameters, never called). DeepSpeed keeps its groups in module globals; mmfm
registers its own groups there (the ones `ParallelDims` built), so both agree on every rank.

ZeRO-3: DeepSpeed's engine refuses ZeRO-3 with its native MoE ("use AutoEP or choose ZeRO stage
1/2"). mmfm's MoE layer is not DeepSpeed's, so with ep = 1 ZeRO-3 partitions the stacked expert
weights like any other weight (each rank stores 1/dp of every expert, gathered before the
experts' forward and backward). With ep > 1 DeepSpeed has no notion of partitioning a weight
over a subgroup, so that layout is refused at config time and FSDP2 is the engine for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmfm.parallel.expert_parallel import is_expert_sharded
from mmfm.train.optim import build_optimizer


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells DeepSpeed's engine the model has expert-parallel weights (see module doc)."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False):
            pass  # mmfm registered the groups already

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker


class DeepSpeedModel(nn.Module):
    """The model as DeepSpeed sees it: the mmfm model plus, under ep > 1, the marker."""

    def __init__(self, model: nn.Module, num_experts: int = 0, ep: int = 1) -> None:
        super().__init__()
        self.model = model
        self.ep_marker = _marker_class()(num_experts, ep) if ep > 1 else None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def register_expert_groups(dims) -> str:
    """Put mmfm's expert and expert-data-parallel groups into DeepSpeed's group registry."""
    from deepspeed.utils import groups

    name = f"ep_size_{dims.ep}"
    groups._EXPERT_PARALLEL_GROUP[name] = dims.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(dims.ep_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = dims.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(dims.edp_ranks)
    return name


def _register_router_weights(model: nn.Module) -> None:
    """ZeRO-3 re-gathers a module's weights in backward through hooks on the module's tensor
    outputs; the router returns a dataclass, so its weight is registered with the MoE layer
    (which returns tensors), DeepSpeed's documented way for weights used across modules."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for _, layer in model.moe_layers():
        register_external_parameter(layer, layer.router.weight)


def ds_config(pcfg, tcfg, grad_accum: int, bf16: bool = False) -> dict:
    """DeepSpeed's config for this layout; `bf16` turns on its bf16 section (bf16 weights for
    compute, fp32 master weights and optimizer state in the ZeRO optimizer)."""
    stage = pcfg.stage
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
            "reduce_scatter": True}
    return {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, the same optimizer as elsewhere
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bf16},
    }


def initialize(model: nn.Module, dims, pcfg, tcfg, grad_accum: int, bf16: bool = False):
    """(engine, the torch AdamW it steps) for `model` on this layout; `bf16` as in
    `ds_config` (`mmfm.parallel.api.bf16_weights` decides: bf16 runs on CUDA)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    moe = getattr(model, "decoder", model).cfg.moe
    num_experts = moe.num_experts if moe is not None else 0
    wrapped = DeepSpeedModel(model, num_experts, dims.ep)
    base = build_optimizer(model, tcfg, fused=False)  # DeepSpeed steps its own flat partitions
    groups = [{**g, "name": name} for g, name in zip(base.param_groups, ("decay", "no_decay"),
                                                        strict=True)]
    if dims.ep > 1:
        name = register_expert_groups(dims)
        for param in model.parameters():
            if is_expert_sharded(param):
                param.allreduce, param.group_name = False, name
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8)
    if pcfg.stage == 3:
        _register_router_weights(model)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                           config=ds_config(pcfg, tcfg, grad_accum, bf16),
                                           dist_init_required=False)
    assert dist.get_world_size() == dims.dp, "deepspeed layouts are dp (× ep) only"
    return engine, optimizer
