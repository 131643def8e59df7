"""Rotary position embeddings (Su et al. 2021) and their context-extension variants.

`model.rope_scaling` selects how the inverse frequencies are stretched to reach beyond the
length a model was trained at (`original_max_seq_len`):

- linear: position interpolation (Chen et al. 2023), every frequency divided by `factor`.
- dynamic: NTK-aware scaling (bloc97 2023, as in transformers' "dynamic"): the base theta grows
  with the current sequence length T once T exceeds `original_max_seq_len`; shorter sequences
  use the unscaled frequencies, so the table depends on T.
- yarn: NTK-by-parts interpolation plus attention temperature (Peng et al. 2023, YaRN).
- llama3: Llama 3.1's wavelength-banded interpolation (low/high frequency factors).

The formulas follow the papers as transformers implements them (`modeling_rope_utils`), so an
imported Llama/Qwen model that uses them gives equal logits; tests/test_rope.py checks that.
Shape legend: T sequence, Dh head dim, F = Dh/2 frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclass(kw_only=True)
class RopeScalingConfig:
    """How RoPE frequencies are scaled for contexts longer than `original_max_seq_len`."""

    type: str = "linear"
    factor: float = 1.0
    # Length the unscaled model was trained at (dynamic, yarn, llama3 read it).
    original_max_seq_len: int = 256
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations at which extrapolation ends
    beta_slow: float = 1.0  # yarn: rotations at which interpolation starts
    attention_factor: float | None = None  # yarn: None means 0.1·ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dims

    def validate(self, path: str = "model.rope_scaling") -> None:
        from mmfm.errors import UserValueError

        if self.type not in ROPE_SCALING_TYPES:
            raise UserValueError(
                f"{path}.type={self.type!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
        if self.factor < 1:
            raise UserValueError(f"{path}.factor={self.factor} must be >= 1")
        if self.original_max_seq_len <= 0:
            raise UserValueError(
                f"{path}.original_max_seq_len={self.original_max_seq_len} must be > 0")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise UserValueError(
                f"{path}.high_freq_factor={self.high_freq_factor} must exceed "
                f"{path}.low_freq_factor={self.low_freq_factor}")


def default_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """(F,) inverse frequencies theta^(-2i/Dh) of plain RoPE."""
    exponents_F = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents_F)


def _linear(head_dim: int, theta: float, s: RopeScalingConfig, seq_len: int):
    return default_inv_freq(head_dim, theta) / s.factor, 1.0


def _dynamic(head_dim: int, theta: float, s: RopeScalingConfig, seq_len: int):
    """NTK-aware: theta' = theta·(factor·T/T0 - (factor-1))^(Dh/(Dh-2)) once T > T0."""
    T0 = s.original_max_seq_len
    if seq_len <= T0:
        return default_inv_freq(head_dim, theta), 1.0
    base = theta * ((s.factor * seq_len / T0) - (s.factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, base), 1.0


def _yarn_correction_range(s: RopeScalingConfig, head_dim: int, theta: float) -> tuple[float, float]:
    """Dims [low, high] between which YaRN blends interpolation and extrapolation."""

    def dim_of(rotations: float) -> float:
        ratio = s.original_max_seq_len / (rotations * 2 * math.pi)
        return head_dim * math.log(ratio) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def _yarn(head_dim: int, theta: float, s: RopeScalingConfig, seq_len: int):
    """NTK-by-parts: high frequencies kept, low ones interpolated, a linear ramp between."""
    low, high = _yarn_correction_range(s, head_dim, theta)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_F = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate_F = 1 - ramp_F  # 1 where the frequency is kept as trained
    inv_F = default_inv_freq(head_dim, theta)
    inv_F = (inv_F / s.factor) * (1 - extrapolate_F) + inv_F * extrapolate_F
    attention = s.attention_factor
    if attention is None:
        attention = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_F, attention


def _llama3(head_dim: int, theta: float, s: RopeScalingConfig, seq_len: int):
    """Wavelengths above T0/low_freq_factor are divided by factor, below T0/high_freq_factor
    kept, and smoothly interpolated in between (Llama 3.1)."""
    inv_F = default_inv_freq(head_dim, theta)
    T0 = s.original_max_seq_len
    wavelen_F = 2 * math.pi / inv_F
    scaled_F = torch.where(wavelen_F > T0 / s.low_freq_factor, inv_F / s.factor, inv_F)
    smooth_F = (T0 / wavelen_F - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed_F = (1 - smooth_F) * scaled_F / s.factor + smooth_F * scaled_F
    medium_F = (wavelen_F >= T0 / s.high_freq_factor) & (wavelen_F <= T0 / s.low_freq_factor)
    return torch.where(medium_F, smoothed_F, scaled_F), 1.0


_SCALERS = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3}


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None,
                  seq_len: int) -> tuple[Tensor, float]:
    """(F,) inverse frequencies and the factor cos/sin are multiplied by (YaRN's attention
    temperature; 1 otherwise) for sequences of length `seq_len`."""
    if scaling is None:
        return default_inv_freq(head_dim, theta), 1.0
    return _SCALERS[scaling.type](head_dim, theta, scaling, seq_len)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float,
                 scaling: RopeScalingConfig | None = None, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (T, Dh) in the rotate-half layout used by Llama/Mixtral."""
    inv_freq_F, attention = rope_inv_freq(head_dim, theta, scaling, seq_len)
    positions_T = torch.arange(seq_len, device=device).float()
    angles_TF = torch.outer(positions_T, inv_freq_F.to(device))
    angles_TDh = torch.cat([angles_TF, angles_TF], dim=-1)
    return angles_TDh.cos() * attention, angles_TDh.sin() * attention


def depends_on_length(scaling: RopeScalingConfig | None) -> bool:
    """Whether the cos/sin table must be rebuilt per sequence length (dynamic NTK)."""
    return scaling is not None and scaling.type == "dynamic"
