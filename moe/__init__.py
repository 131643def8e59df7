"""mmfm.moe: Mixture-of-Experts layers (routers, balancing losses, dispatchers, experts,
per-expert load monitoring). Import as `mmfm.moe`, never as a bare `moe`."""

from mmfm.moe.capacity import capacity_keep_mask, expert_capacity
from mmfm.moe.capture import LayerRouting, RoutingCapture, capture_routing
from mmfm.moe.config import MoEConfig
from mmfm.moe.dispatcher import AllToAllDispatcher, LocalDispatcher, all_to_all, permute, unpermute
from mmfm.moe.experts import (
    MEGABLOCKS_MISSING,
    BackendUnavailableError,
    Experts,
    SharedExperts,
    check_backend_available,
)
from mmfm.moe.layer import MoELayer
from mmfm.moe.losses import (
    router_z_loss,
    sequence_balance_loss,
    switch_load_balancing_loss,
    tokens_per_expert,
)
from mmfm.moe.metrics import LoadMonitor, load_stats, router_entropy
from mmfm.moe.router import Router, RouterOutput, mask_to_top_groups, round_robin_topk
from mmfm.moe.upcycle import upcycle_from_dense

__all__ = [
    "AllToAllDispatcher", "BackendUnavailableError", "Experts", "LayerRouting", "LoadMonitor", "LocalDispatcher",
    "MEGABLOCKS_MISSING", "MoEConfig", "MoELayer", "Router", "RouterOutput", "RoutingCapture",
    "SharedExperts", "all_to_all", "capture_routing", "capacity_keep_mask", "check_backend_available",
    "expert_capacity", "load_stats", "mask_to_top_groups", "permute",
    "round_robin_topk", "router_entropy", "router_z_loss", "sequence_balance_loss",
    "switch_load_balancing_loss", "tokens_per_expert", "unpermute", "upcycle_from_dense",
]
