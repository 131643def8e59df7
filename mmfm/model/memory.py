"""Memory estimate of one training process, checked before the model is built.

An impossible size (`model.d_model=10000000`, `model.vocab_size=1099511627776`) used to allocate
for minutes and die; `check_fits_memory(cfg)` refuses it in milliseconds, from the analytic
parameter count alone, with the estimate in the message.

The estimate per process (bytes):

- parameters: fp32 master weights, 4 bytes each (bf16 runs autocast; the weights stay fp32);
- gradients: 4 bytes each;
- optimizer state: AdamW's two fp32 moments, 8 bytes each;
- activations of one micro-batch kept for backward: per layer and token about
  `16·D + 3·F_active` values (norm inputs, q/k/v/o, the attention output, the SwiGLU inputs and
  gate of the routed experts a token uses), plus the `(B, H, T, T)` attention scores when the
  math kernel materializes them, plus the `(B, T, V)` logits and their gradient when the loss is
  not fused. Activation checkpointing keeps one block's activations plus each block's input.

Parameter, gradient and optimizer bytes are divided by the model-sharding degree of the parallel
layout (tp × pp, and dp × cp when FSDP or ZeRO-3 shards the weights; ZeRO-1/2 shard only the
optimizer and gradients). It is a lower bound in spirit: allocator slack, temporary buffers and
the framework itself come on top, so only a size that cannot fit even by this count is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.errors import UserValueError
from mmfm.model.counting import count_params

FP32 = 4
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32


class DoesNotFitError(UserValueError):
    """The configured model cannot fit the memory of one process."""


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # bytes of weights per process
    grads: int
    optimizer: int
    activations: int  # one micro-batch

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{gib(self.total)} (params {gib(self.params)}, grads {gib(self.grads)}, "
                f"optimizer {gib(self.optimizer)}, activations {gib(self.activations)})")


def gib(n_bytes: float) -> str:
    """Bytes as a short human string, e.g. `3.2 GiB`, `1.1e+06 GiB`."""
    value = n_bytes / 2**30
    return f"{value:.3g} GiB" if value < 1e5 else f"{value:.2e} GiB"


def estimate_memory(cfg) -> MemoryEstimate:
    """Estimate the bytes one training process needs for `cfg` (an ExperimentConfig)."""
    counts = count_params(cfg.model)
    weight_shards, state_shards = _shard_degrees(cfg.parallel)
    params = counts.total * FP32 // weight_shards
    return MemoryEstimate(
        params=params,
        grads=counts.total * FP32 // state_shards,
        optimizer=counts.total * ADAMW_STATE_BYTES // state_shards,
        # Context parallelism splits tokens (and attention heads) over cp ranks.
        activations=_activation_bytes(cfg) // (cfg.parallel.tp * cfg.parallel.pp
                                               * cfg.parallel.cp),
    )


def _shard_degrees(par) -> tuple[int, int]:
    """(weight sharding, gradient/optimizer sharding) degrees of a parallel layout."""
    model_split = par.tp * par.pp
    # dp unknown until launch: assume no sharding by dp (the safe side); cp ranks hold
    # replicas that FSDP/ZeRO shard like dp ranks.
    dp = (par.dp or 1) * par.cp
    weights = model_split * (dp if par.stage == 3 else 1)
    states = model_split * (dp if par.stage >= 1 else 1)
    return weights, states


def _activation_bytes(cfg) -> int:
    model, tokens = cfg.model, cfg.train.micro_batch_size * cfg.data.seq_len
    moe = model.moe
    values_per_token = 0
    for layer in range(model.n_layers):
        hidden = model.ffn_hidden
        if moe is not None and moe.is_moe_layer(layer):
            hidden = moe.top_k * (moe.expert_hidden or model.ffn_hidden) + moe.num_shared_experts * (
                moe.shared_expert_hidden or moe.expert_hidden or model.ffn_hidden)
        values_per_token += 16 * model.d_model + 3 * hidden
    if cfg.parallel.activation_checkpointing:
        values_per_token = values_per_token // model.n_layers + model.n_layers * model.d_model
    scores = cfg.train.micro_batch_size * model.n_heads * cfg.data.seq_len ** 2
    logits = 0 if model.fused_loss else 2 * tokens * model.vocab_size
    bytes_per_value = 2 if cfg.train.precision == "bf16" else FP32
    return (tokens * values_per_token + scores + logits) * bytes_per_value


def available_memory(device: str = "cpu") -> int:
    """Bytes one process can still allocate: free accelerator memory on CUDA, else the host's
    available RAM (what the kernel could give without swapping)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    import psutil

    return psutil.virtual_memory().available


def check_fits_memory(cfg, available: int | None = None, device: str = "cpu") -> MemoryEstimate:
    """Refuse a config whose estimate exceeds `available` bytes (default: what `device` has
    free now), naming the estimate; return the estimate otherwise. Call before building."""
    estimate = estimate_memory(cfg)
    if available is None:
        available = available_memory(device)
    if estimate.total > available:
        raise DoesNotFitError(
            f"model does not fit: this config needs about {estimate.describe()} per process, more than the "
            f"{gib(available)} available on {device}; shrink the model (d_model, n_layers, "
            "vocab_size, moe.num_experts), train.micro_batch_size or data.seq_len, or shard it "
            "(parallel.*)"
        )
    return estimate
