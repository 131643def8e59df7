"""The compute planner against the published numbers: Chinchilla's Table 3 (Hoffmann et al.
2022), its Approach-1 exponent interval, and the Approach-3 closed form against a brute-force
minimum of the published parametric loss."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from mmfm.config import load_config
from mmfm.errors import UserValueError
from mmfm.model.counting import count_params
from mmfm.plan import (
    APPROACH1_EXPONENT_INTERVAL,
    CHINCHILLA_APPROACH3,
    CHINCHILLA_TABLE3,
    Approach1,
    GranularityLaw,
    parse_moe,
    plan_budget,
    plan_moe,
    wall_clock_s,
)
from mmfm.plan_cli import plan_lines, register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("params, flops, tokens", CHINCHILLA_TABLE3)
def test_reproduces_table3(params, flops, tokens):
    plan = plan_budget(params=params)["approach1"]
    assert plan.flops == pytest.approx(flops, rel=0.03)
    # The 67B row prints 1.5T tokens, but its own FLOPs give 5.76e23 / (6·67e9) = 1.43T:
    # compare with what the row's FLOPs imply where the printed tokens are rounded that far.
    want = tokens if abs(flops / (6 * params) / tokens - 1) < 0.03 else flops / (6 * params)
    assert plan.tokens == pytest.approx(want, rel=0.03)
    back = plan_budget(tokens=plan.tokens)["approach1"]
    assert back.params == pytest.approx(params, rel=1e-6)


def test_approach1_exponent_is_inside_the_papers_interval():
    lo, hi = APPROACH1_EXPONENT_INTERVAL
    assert lo <= Approach1.from_table3().exponent <= hi


def test_approach3_optimum_is_the_brute_force_minimum():
    C = 5.76e23  # Gopher's and Chinchilla's budget
    n_opt, d_opt = CHINCHILLA_APPROACH3.optimal(C)
    assert 6 * n_opt * d_opt == pytest.approx(C)
    grid = [10 ** (9 + i / 2000) for i in range(6000)]  # 1e9 .. 1e12 parameters
    best = min(grid, key=lambda n: CHINCHILLA_APPROACH3.loss(n, C / (6 * n)))
    assert n_opt == pytest.approx(best, rel=2e-3)
    # L = E + A/N^α + B/D^β with the published E, A, B, α, β, by hand at Chinchilla's 70B/1.4T.
    assert CHINCHILLA_APPROACH3.loss(70e9, 1.4e12) == pytest.approx(
        1.69 + 406.4 / 70e9 ** 0.34 + 410.7 / 1.4e12 ** 0.28)


def test_finer_experts_lower_the_moe_loss_at_equal_compute():
    coarse, fine = plan_moe(1e21, 1), plan_moe(1e21, 8)
    assert fine.loss < coarse.loss
    law = GranularityLaw().at(8)
    assert fine.loss == pytest.approx(law.loss(fine.params, fine.tokens))


# Krajewski et al. 2024, Table 2: compute-optimal (N_act, D, G, FLOPs, loss) of E=64 models.
KRAJEWSKI_TABLE2 = ((100e6, 4.37e9, 8, 2.95e18, 3.133), (1e9, 28.94e9, 16, 1.93e20, 2.491),
                    (3e9, 72.90e9, 16, 1.41e21, 2.245), (7e9, 137.60e9, 32, 6.46e21, 2.076),
                    (70e9, 941.07e9, 32, 4.16e23, 1.694), (300e9, 2.96e12, 64, 5.69e24, 1.503),
                    (1e12, 7.94e12, 64, 4.97e25, 1.367))


@pytest.mark.parametrize("n_act, tokens, granularity, flops, loss", KRAJEWSKI_TABLE2)
def test_moe_plan_gives_back_the_papers_compute_optimal_table(n_act, tokens, granularity, flops,
                                                               loss):
    """N in the law is total parameters (43 × active at E=64): read so, the plan matches the
    paper's optima; our C = 6·N_act·D omits their routing FLOPs, hence D within 19%.
    (Reading N as active parameters, as mmfm did before, gave 5x the N_act and +0.7 loss.)"""
    plan = plan_moe(flops, granularity)
    assert plan.params == pytest.approx(n_act, rel=0.06)
    assert plan.tokens == pytest.approx(tokens, rel=0.2)
    assert plan.loss == pytest.approx(loss, abs=0.05)
    assert GranularityLaw().at(granularity).loss(n_act, tokens) == pytest.approx(loss, abs=0.03)


def test_wall_clock():
    assert wall_clock_s(1e21, 0.5, 8, 1e15) == pytest.approx(1e21 / 4e15)
    with pytest.raises(UserValueError, match="--mfu=1.5"):
        wall_clock_s(1e21, 1.5, 1, 1e15)


def test_bad_inputs_name_the_flag():
    with pytest.raises(UserValueError, match="exactly one"):
        plan_budget(flops=1e20, params=1e9)
    with pytest.raises(UserValueError, match="--moe '64,8'"):
        parse_moe("64,8")
    with pytest.raises(UserValueError, match="k <= E"):
        parse_moe("8,16,2")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["plan", *argv])


def test_cli_reports_preset_flops_and_writes_a_sized_preset(tmp_path):
    out = tmp_path / "planned.yaml"
    lines = plan_lines(_args("--flops", "1e17", "--moe", "64,8,8", "--preset",
                             str(CONFIGS / "olmoe_moe_tiny.yaml"), "--write-preset", str(out)))
    text = "\n".join(lines)
    assert "approach 1" in text and "Krajewski" in text and "FLOPs/token" in text
    sized = load_config(out)
    target = plan_moe(1e17, 8)
    active = count_params(sized.model).active
    assert abs(math.log(active / target.params)) < 0.5  # nearest width in steps of one head
    tokens = sized.train.steps * sized.train.micro_batch_size * sized.data.seq_len
    assert tokens == pytest.approx(target.tokens, rel=0.01)
    assert (sized.model.moe.num_experts, sized.model.moe.top_k) == (64, 8)
    assert sized.model.moe.expert_hidden == round(sized.model.ffn_hidden / 8)
    assert sized.model.qk_norm == "full"


def test_moe_shape_is_applied_to_the_preset():
    lines = plan_lines(_args("--flops", "1e17", "--moe", "16,2,4", "--preset",
                             str(CONFIGS / "mixtral_moe_tiny.yaml")))
    import dataclasses

    base = load_config(CONFIGS / "mixtral_moe_tiny.yaml").model
    shaped = dataclasses.replace(base, moe=dataclasses.replace(
        base.moe, num_experts=16, top_k=2, expert_hidden=base.ffn_hidden // 4))
    assert f"{count_params(shaped).total:.3g} total" in lines[-1]
    with pytest.raises(UserValueError, match="dense --preset"):
        plan_lines(_args("--flops", "1e17", "--moe", "16,2,4", "--preset",
                         str(CONFIGS / "mixtral_dense_tiny.yaml")))


def test_write_preset_needs_a_preset(tmp_path):
    with pytest.raises(UserValueError, match="--write-preset needs --preset"):
        plan_lines(_args("--flops", "1e17", "--write-preset", str(tmp_path / "x.yaml")))
