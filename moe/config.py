"""Typed configuration of an MoE feed-forward layer.

Kept beside the layer so that `mmfm.moe` is usable on its own; `mmfm.config` nests it
under `model.moe`. Validation raises `ValueError` naming the field path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mmfm.errors import UserValueError

ROUTER_SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_BACKENDS = ("loop", "grouped_mm", "megablocks")
DROP_POLICIES = ("probs", "position")
MEGABLOCKS_MISSING = (
    "{path}.backend=megablocks needs the megablocks package (CUDA only), which is not installed: "
    "it builds against CUDA and pins older torch versions, so it cannot be installed on CPU "
    "machines. Install it on a "
    "GPU machine with `pip install megablocks`, or set {path}.backend=grouped_mm or loop."
)


@dataclass(kw_only=True)
class MoEConfig:
    """An MoE FFN: which experts exist, how tokens are routed to them, how load is balanced."""

    num_experts: int = 8
    top_k: int = 2
    # Hidden size of one expert; None means the model's dense `ffn_hidden` (coarse experts).
    # Fine-grained MoE (DeepSeek, OLMoE) sets it smaller, independent of the dense FFN.
    expert_hidden: int | None = None
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    # Qwen2-MoE: scale the shared experts' output by sigmoid(x·w_g), a learned per-token gate.
    shared_expert_gate: bool = False
    # Which layers are MoE: layer i is MoE when i >= first_dense and (i - first_dense) % every == 0.
    every: int = 1
    first_dense: int = 0
    # Router.
    score_func: str = "softmax"
    renormalize: bool = True  # renormalize the chosen k scores (Mixtral) or not (OLMoE, Qwen-MoE)
    num_groups: int | None = None  # group-limited routing (DeepSeek-V3): experts split into groups
    topk_groups: int | None = None  # ... and tokens may pick only from this many best groups
    router_jitter: float = 0.0  # multiplicative input noise U(1-eps, 1+eps) in training
    force_uniform: bool = False  # round-robin routing, for dispatch tests and benchmarks
    # Balancing.
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-level balance loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing step size gamma (0 disables)
    # Capacity: None is dropless.
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    # Compute.
    backend: str = "grouped_mm"

    def validate(self, path: str = "model.moe") -> None:
        """Raise ValueError naming the first invalid field."""
        _positive(f"{path}.num_experts", self.num_experts)
        _positive(f"{path}.top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise UserValueError(
                f"{path}.top_k={self.top_k} exceeds {path}.num_experts={self.num_experts}"
            )
        for name in ("expert_hidden", "shared_expert_hidden"):
            value = getattr(self, name)
            if value is not None:
                _positive(f"{path}.{name}", value)
        if self.num_shared_experts < 0:
            raise UserValueError(f"{path}.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise UserValueError(f"{path}.shared_expert_gate=true needs {path}.num_shared_experts > 0")
        _positive(f"{path}.every", self.every)
        if self.first_dense < 0:
            raise UserValueError(f"{path}.first_dense={self.first_dense} must be >= 0")
        _choice(f"{path}.score_func", self.score_func, ROUTER_SCORE_FUNCS)
        _choice(f"{path}.backend", self.backend, EXPERT_BACKENDS)
        if self.backend == "megablocks" and importlib.util.find_spec("megablocks") is None:
            raise UserValueError(MEGABLOCKS_MISSING.format(path=path))
        _choice(f"{path}.drop_policy", self.drop_policy, DROP_POLICIES)
        self._validate_groups(path)
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate",
                     "router_jitter"):
            if getattr(self, name) < 0:
                raise UserValueError(f"{path}.{name}={getattr(self, name)} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserValueError(
                f"{path}.capacity_factor={self.capacity_factor} must be > 0 (or null for dropless)"
            )

    def _validate_groups(self, path: str) -> None:
        if (self.num_groups is None) != (self.topk_groups is None):
            raise UserValueError(f"{path}.num_groups and {path}.topk_groups must be set together")
        if self.num_groups is None:
            return
        _positive(f"{path}.num_groups", self.num_groups)
        if self.num_experts % self.num_groups:
            raise UserValueError(
                f"{path}.num_groups={self.num_groups} does not divide "
                f"{path}.num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise UserValueError(
                f"{path}.topk_groups={self.topk_groups} must be in [1, {path}.num_groups={self.num_groups}]"
            )
        per_group = self.num_experts // self.num_groups
        if self.top_k > self.topk_groups * per_group:
            raise UserValueError(
                f"{path}.top_k={self.top_k} exceeds the {self.topk_groups * per_group} experts "
                f"reachable in {path}.topk_groups={self.topk_groups} groups"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` (0-based) uses this MoE FFN."""
        return layer_idx >= self.first_dense and (layer_idx - self.first_dense) % self.every == 0


def _positive(path: str, value: int) -> None:
    if value <= 0:
        raise UserValueError(f"{path}={value} must be > 0")


def _choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserValueError(f"{path}={value!r} is not one of {', '.join(allowed)}")
