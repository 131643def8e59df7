"""Compute planning: how many parameters and tokens a FLOP budget buys, the loss to expect, and
how long it takes.

- Chinchilla Approach 1 (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
  Models"): compute-optimal N and D follow power laws in C. The paper publishes its Approach-1
  projections as Table 3 (nine model sizes, their FLOPs and tokens) and the exponents rounded to
  0.50; we use the least-squares power law through Table 3's rows, N_opt = G·C^a, D = C/(6N),
  whose exponent a lies inside the paper's 80% interval for Approach 1 (0.488, 0.502).
- Chinchilla Approach 3: the parametric loss L(N, D) = E + A/N^α + B/D^β with the published
  E=1.69, A=406.4, B=410.7, α=0.34, β=0.28, minimized under C = 6ND in closed form.
- Fine-grained MoE (Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts",
  ICML 2024, arXiv 2402.07871): L(N, D, G) = c + (g/G^γ + a)/N^α + b/D^β with their Table 1 fit
  a=18.1, α=0.115, b=30.8, β=0.147, g=2.1, γ=0.58, c=0.47, G granularity (dense FFN width over
  expert width), fitted at expansion rate E=64. N there is the *total* non-embedding parameter
  count, N = d_model²·(8E+4)·n_blocks (their §5 and §6.1), while compute is spent on active
  parameters, 12·d_model²·n_blocks per token; so N = N_act·(8E+4)/12 (43·N_act at E=64) and the
  law becomes a Chinchilla form in N_act whose optimum under C = 6·N_act·D is closed-form. It
  gives back their Table 2 (compute-optimal N_act, D, loss) within 6% in N_act, 19% in D and
  0.05 in loss; the gaps are their routing FLOPs, which C = 6·N_act·D leaves out.
- FLOPs per token of a preset in the project's convention (`mmfm.model.counting`), and
  wall-clock = C / (MFU × devices × peak FLOP/s per device).

Everything here is a pure function of numbers; `mmfm.plan_cli` prints and writes presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmfm.errors import UserValueError

# Hoffmann et al. 2022, Table 3: (parameters, training FLOPs, training tokens), Approach 1.
CHINCHILLA_TABLE3 = (
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12),
)
APPROACH1_EXPONENT_INTERVAL = (0.488, 0.502)  # Hoffmann et al. 2022, Table 2, N_opt ∝ C^a


@dataclass(frozen=True)
class ParametricLoss:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimizing the loss under C = 6ND (Hoffmann et al. 2022, eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        s = self.alpha + self.beta
        return g * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / g


CHINCHILLA_APPROACH3 = ParametricLoss(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@dataclass(frozen=True)
class GranularityLaw:
    """Krajewski et al. 2024, Table 1: L(N, D, G) = c + (g/G^γ + a)/N^α + b/D^β, N the total
    non-embedding parameters of a model of expansion rate `expansion_rate` (64 in the fit)."""

    a: float = 18.1
    alpha: float = 0.115
    b: float = 30.8
    beta: float = 0.147
    g: float = 2.1
    gamma: float = 0.58
    c: float = 0.47
    expansion_rate: int = 64

    @property
    def total_per_active(self) -> float:
        """N_total / N_act = d²(8E+4)n / (12 d² n): experts' FFNs plus attention over the
        active block (paper §6.1)."""
        return (8 * self.expansion_rate + 4) / 12

    def at(self, granularity: float) -> ParametricLoss:
        """The law at a fixed granularity, as a Chinchilla-form loss in (N_act, D): the total N
        of the law written as total_per_active × N_act, so `optimal` spends C = 6·N_act·D."""
        if granularity <= 0:
            raise UserValueError(f"--moe granularity={granularity} must be > 0")
        A = (self.g / granularity ** self.gamma + self.a) / self.total_per_active ** self.alpha
        return ParametricLoss(E=self.c, A=A, B=self.b, alpha=self.alpha, beta=self.beta)


def _fit_power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(coefficient, exponent) of the least-squares line through (log x, log y)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx)
    return math.exp(my - slope * mx), slope


@dataclass(frozen=True)
class Approach1:
    """N_opt = coef · C^exponent, D_opt = C / (6 N_opt), from Table 3's rows."""

    coef: float
    exponent: float

    @classmethod
    def from_table3(cls) -> Approach1:
        coef, exponent = _fit_power_law([r[1] for r in CHINCHILLA_TABLE3],
                                        [r[0] for r in CHINCHILLA_TABLE3])
        return cls(coef, exponent)

    def params_for_flops(self, flops: float) -> float:
        return self.coef * flops ** self.exponent

    def flops_for_params(self, params: float) -> float:
        return (params / self.coef) ** (1 / self.exponent)

    def flops_for_tokens(self, tokens: float) -> float:
        """Solve D = C / (6 coef C^a) = C^(1-a) / (6 coef) for C."""
        return (6 * self.coef * tokens) ** (1 / (1 - self.exponent))


@dataclass(frozen=True)
class Allocation:
    """One compute-optimal point and the loss the parametric law gives it."""

    params: float
    tokens: float
    flops: float
    loss: float


def plan_budget(flops: float | None = None, params: float | None = None,
                tokens: float | None = None) -> dict[str, Allocation]:
    """Approach-1 and Approach-3 allocations for one of a FLOP budget, a (dense, or active)
    parameter count, or a token count; exactly one must be given."""
    given = [v for v in (flops, params, tokens) if v is not None]
    if len(given) != 1:
        raise UserValueError("give exactly one of --flops, --params, --tokens")
    if given[0] <= 0:
        raise UserValueError(f"the budget {given[0]} must be > 0")
    a1 = Approach1.from_table3()
    if params is not None:
        flops = a1.flops_for_params(params)
    elif tokens is not None:
        flops = a1.flops_for_tokens(tokens)
    n1 = a1.params_for_flops(flops)
    d1 = flops / (6 * n1)
    n3, d3 = CHINCHILLA_APPROACH3.optimal(flops)
    return {
        "approach1": Allocation(n1, d1, flops, CHINCHILLA_APPROACH3.loss(n1, d1)),
        "approach3": Allocation(n3, d3, flops, CHINCHILLA_APPROACH3.loss(n3, d3)),
    }


def plan_moe(flops: float, granularity: float,
             law: GranularityLaw = GranularityLaw()) -> Allocation:
    """Compute-optimal active parameters and tokens of a fine-grained MoE at granularity G."""
    fixed = law.at(granularity)
    n, d = fixed.optimal(flops)
    return Allocation(n, d, flops, fixed.loss(n, d))


def wall_clock_s(flops: float, mfu: float, devices: int, peak_flops: float) -> float:
    """Seconds to spend `flops` at model FLOPs utilization `mfu` on `devices` devices of
    `peak_flops` FLOP/s each."""
    if not 0 < mfu <= 1:
        raise UserValueError(f"--mfu={mfu} must be in (0, 1]")
    if devices <= 0 or peak_flops <= 0:
        raise UserValueError(f"--devices={devices} and --peak-flops={peak_flops} must be > 0")
    return flops / (mfu * devices * peak_flops)


def parse_moe(spec: str) -> tuple[int, int, float]:
    """`E,k,granularity` -> (experts, top-k, granularity)."""
    parts = spec.split(",")
    try:
        experts, top_k, granularity = int(parts[0]), int(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise UserValueError(f"--moe {spec!r} is not E,k,granularity (e.g. 64,8,8)") from None
    if len(parts) != 3 or not 1 <= top_k <= experts:
        raise UserValueError(f"--moe {spec!r}: need 1 <= k <= E and exactly three values")
    return experts, top_k, granularity
