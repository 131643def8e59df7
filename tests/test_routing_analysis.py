"""Routing analyses on planted routings whose answers are known, and the records file format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmfm.errors import UserValueError
from mmfm.report import analysis as A
from mmfm.report.records import (
    RoutingRecords,
    RoutingRecordsError,
    load_records,
    save_records,
)

E, K = 8, 2


def _random_topk(rng, L: int, N: int, E: int = E, K: int = K) -> np.ndarray:
    """Uniform random routing: K distinct experts per token."""
    return np.argsort(rng.random((L, N, E)), axis=2)[:, :, :K]


def _records(experts_LNK, token_N=None, source_N=None, row_N=None, sources=("a",), step=0,
             num_experts=E) -> RoutingRecords:
    L, N, k = experts_LNK.shape
    token_N = np.zeros(N, np.int32) if token_N is None else token_N
    return RoutingRecords(
        step=step, num_experts=num_experts, top_k=k, layers_L=np.arange(L),
        experts_LNK=experts_LNK, weights_LNK=np.full((L, N, k), 1 / k, np.float32),
        token_N=token_N, next_N=np.roll(token_N, -1), predicted_N=token_N,
        source_N=np.zeros(N, np.int16) if source_N is None else source_N,
        modality_N=np.zeros(N, np.int8), row_N=np.zeros(N, np.int32) if row_N is None else row_N,
        sources=list(sources))


def test_maxvio_matches_the_papers_definition():
    assert A.maxvio([10, 10, 10, 10]) == 0.0
    assert A.maxvio([40, 0, 0, 0]) == pytest.approx(3.0)  # E - 1
    assert A.maxvio([3, 1, 1, 3]) == pytest.approx(0.5)


def test_dead_and_hot_experts_against_uniform_load():
    counts_LE = np.array([[1, 100, 100, 99], [400, 0, 0, 0]])
    found = A.dead_and_hot(counts_LE, layers=[0, 3])
    assert [(d["layer"], d["expert"]) for d in found["dead"]] == [(0, 0), (3, 1), (3, 2), (3, 3)]
    assert [(h["layer"], h["expert"]) for h in found["hot"]] == [(3, 0)]
    assert found["hot"][0]["load_vs_uniform"] == pytest.approx(4.0)


def test_load_over_training_reads_logged_vectors():
    rows = [{"step": 10, "moe/layer_01/tokens_per_expert": [30.0, 10.0],
             "moe/layer_01/image/tokens_per_expert": [5.0, 0.0],
             "moe/layer_01/expert_bias": [0.0, 0.1], "moe/layer_01/router_entropy": 0.6},
            {"step": 20, "moe/layer_01/tokens_per_expert": [20.0, 20.0]}, {"step": 20, "val/loss": 1}]
    all_series = A.load_over_training(rows)
    assert all_series["layer_01/image"]["share"] == [[1.0, 0.0]]  # per-modality counts apart
    series = all_series["layer_01"]
    assert series["steps"] == [10, 20]
    assert series["share"] == [[0.75, 0.25], [0.5, 0.5]]
    assert series["maxvio"] == [pytest.approx(0.5), 0.0]
    assert series["bias"][0] == [0.0, 0.1] and series["entropy"] == [0.6, None]


def test_saturation_is_total_for_identical_checkpoints():
    r = _records(_random_topk(np.random.default_rng(0), 2, 1000))
    assert A.router_saturation(r, r) == {"top1": [1.0, 1.0], "topk": [1.0, 1.0]}


def test_saturation_of_independent_random_routings_is_the_random_baseline():
    rng = np.random.default_rng(1)
    N = 20000
    a, b = _records(_random_topk(rng, 2, N)), _records(_random_topk(rng, 2, N))
    sat = A.router_saturation(a, b)
    for top1, topk in zip(sat["top1"], sat["topk"], strict=True):
        assert abs(top1 - 1 / E) < 4 * math.sqrt((1 / E) * (1 - 1 / E) / N)
        assert abs(topk - K / E) < 0.01


def test_saturation_refuses_different_tokens():
    rng = np.random.default_rng(2)
    a = _records(_random_topk(rng, 1, 10), token_N=np.arange(10, dtype=np.int32))
    b = _records(_random_topk(rng, 1, 10))
    with pytest.raises(UserValueError, match="same held-out tokens"):
        A.router_saturation(a, b)


def test_consecutive_rates_of_random_routing_are_the_random_baselines():
    rng = np.random.default_rng(3)
    N = 40000
    r = _records(_random_topk(rng, 2, N), row_N=np.arange(N, dtype=np.int32) // 100)
    rates = A.consecutive_rates(r)
    base = rates["baseline"]
    assert base["topk"] == pytest.approx(1 - 15 / 28)  # Mixtral's 46% for E=8, k=2
    pairs = rates["all"]["pairs"]
    assert pairs == N - N // 100  # pairs never cross a row
    for top1, topk in zip(rates["all"]["top1"], rates["all"]["topk"], strict=True):
        assert abs(top1 - base["top1"]) < 4 * math.sqrt(base["top1"] * (1 - base["top1"]) / pairs)
        assert abs(topk - base["topk"]) < 4 * math.sqrt(base["topk"] * (1 - base["topk"]) / pairs)


def test_consecutive_rates_of_sticky_routing_are_one():
    experts = np.tile(np.array([[3, 5]]), (1, 50, 1))
    assert A.consecutive_rates(_records(experts))["all"]["top1"] == [1.0]


def test_vocabulary_specialization_of_a_router_forced_by_token_id_is_one():
    rng = np.random.default_rng(4)
    N = 5000
    token_N = rng.integers(0, 50, N).astype(np.int32)
    forced = np.stack([token_N % E, (token_N + 1) % E], axis=1)[None]
    spec = A.vocabulary_specialization(_records(forced, token_N=token_N))
    assert spec["mean"] == [1.0] and spec["tokens"] == 50
    top = A.top_tokens_per_expert(_records(forced, token_N=token_N), 0)
    assert {t for t, share in top[3]} == {3, 11, 19, 27, 35, 43}  # ids = 3 mod 8, all share 1
    assert all(share == 1.0 for _, share in top[3])


def test_vocabulary_specialization_of_random_routing_is_near_one_over_e():
    rng = np.random.default_rng(5)
    N = 50000
    token_N = rng.integers(0, 20, N).astype(np.int32)  # ~2500 occurrences per id
    spec = A.vocabulary_specialization(_records(_random_topk(rng, 1, N), token_N=token_N))
    assert 1 / E < spec["mean"][0] < 1 / E + 0.03


def test_specialization_is_maximal_when_each_source_has_its_own_experts():
    rng = np.random.default_rng(6)
    N = 4000
    source_N = rng.integers(0, 2, N).astype(np.int16)
    own = np.where(source_N[:, None] == 0, np.array([0, 1]), np.array([2, 3]))[None]
    spec = A.specialization(_records(own, source_N=source_N, sources=("code", "prose")),
                            source_N, ["code", "prose"])
    assert spec["score"] == [pytest.approx(1.0)]
    assert spec["share"][0][0][:4] == [1.0, 1.0, 0.0, 0.0]
    assert spec["uniform"] == K / E


def test_specialization_of_source_blind_routing_is_near_zero():
    rng = np.random.default_rng(7)
    N = 40000
    source_N = rng.integers(0, 3, N).astype(np.int16)
    spec = A.specialization(_records(_random_topk(rng, 1, N), source_N=source_N,
                                     sources=("a", "b", "c")), source_N, ["a", "b", "c"])
    assert spec["score"][0] < 0.005


def test_coactivation_of_planted_pairs():
    experts = np.array([[[0, 1], [1, 0], [2, 3], [0, 2]]])
    P = np.array(A.coactivation(_records(experts, num_experts=4))[0])
    assert P[0, 1] == pytest.approx(2 / 3, abs=1e-4) and P[0, 2] == pytest.approx(1 / 3, abs=1e-4)
    assert P[1, 0] == 1.0 and P[3, 2] == 1.0 and P[0, 0] == 0.0


def test_records_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    r = _records(_random_topk(rng, 3, 100), token_N=np.arange(100, dtype=np.int32), step=7)
    back = load_records(save_records(r, tmp_path / "step_00000007.npz"))
    assert back.step == 7 and back.sources == ["a"] and back.experts_LNK.dtype == np.uint8
    assert np.array_equal(back.experts_LNK, r.experts_LNK)
    assert np.array_equal(back.token_N, r.token_N)
    np.testing.assert_allclose(back.weights_LNK, r.weights_LNK, rtol=1e-3)


def test_truncated_records_file_is_one_line_naming_it(tmp_path):
    r = _records(_random_topk(np.random.default_rng(9), 2, 1000))
    path = save_records(r, tmp_path / "step_00000001.npz")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RoutingRecordsError, match=f"{path} are truncated") as err:
        load_records(path)
    assert "\n" not in str(err.value)


def test_inconsistent_records_are_refused(tmp_path):
    r = _records(_random_topk(np.random.default_rng(10), 2, 10))
    r.token_N = r.token_N[:5]
    with pytest.raises(RoutingRecordsError, match="token_N has shape"):
        save_records(r, tmp_path / "x.npz")


def test_headlines_name_the_expert_each_source_leans_to():
    from mmfm.report.summary import compare_headlines, routing_headlines

    numbers = {"moe_layers": [1, 3],
               "heldout_load": {"step": 9, "maxvio_global": [0.2, 1.5], "dead": [{}], "hot": []},
               "specialization_by_source": {
                   "groups": ["code", "prose"], "uniform": 0.5, "score": [0.1, 0.9],
                   "share": [[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]]}}
    lines = routing_headlines(numbers)
    assert lines[0] == "held-out load at step 9: worst global MaxVio 1.50; 1 dead and 0 hot expert(s)"
    assert "strongest in layer_03" in lines[1]
    assert lines[2].startswith("  code: expert 0 of layer_03 takes 100% of its tokens (+50%")
    assert lines[3].startswith("  prose: expert 1 of layer_03")
    cmp = {"runs": [{"name": "moe", "val_loss": [3.0], "tokens": [1000], "finished": False}],
           "reach": [{"run": "moe", "reaches": "dense", "tokens_ratio": 0.5, "flops_ratio": 0.6,
                      "wall_s_ratio": 0.7}]}
    assert compare_headlines(cmp) == [
        "moe: final val loss 3.0000 after 1e+03 tokens (in progress)",
        "moe reaches dense's final loss with 0.50x its tokens, 0.60x its FLOPs, 0.70x its wall time"]
