"""Routing analyses: pure functions from routing records (or logged metrics) to numbers.

Every function here takes arrays or `RoutingRecords` and returns plain numbers, lists and
dicts (JSON-ready); the report draws its figures from these. Each is tested on planted routings
whose answer is known (tests/test_routing_analysis.py). Definitions and papers:
docs/analysis.md.

**Modality expert groups (MoMa).** Records of such runs hold global expert ids (groups end to
end: text, image, audio; `RoutingRecords.expert_groups`), so E is the total number of experts
and the per-layer counts, co-activation and specialization tables cover every expert. A token
can only reach its own group's experts, so a "uniform" baseline is per group: a uniformly
routed modality puts 1/E_group of its first choices (k/E_group of its top-k assignments) on
each of its group's experts. Functions that compare with uniform routing take the group into
account (`dead_and_hot`, `group_maxvio`) or give the baseline per group (`*_by_group`).

Shape legend: N tokens, L MoE layers, K experts per token, E experts, S sources / groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmfm.errors import UserValueError
from mmfm.report.records import RoutingRecords

# ----------------------------------------------------------------------------- load


def maxvio(counts_E: Sequence[float] | np.ndarray) -> float:
    """MaxVio = (max load - mean load) / mean load (Wang et al. 2024, arXiv 2408.15664);
    0 for a perfectly balanced layer, E - 1 when one expert takes everything."""
    counts_E = np.asarray(counts_E, dtype=np.float64)
    mean = counts_E.mean()
    return float((counts_E.max() - mean) / mean) if mean > 0 else 0.0


def expert_counts(records: RoutingRecords) -> np.ndarray:
    """(L, E) top-k assignments per expert, over real (non-padding) tokens."""
    real_N = records.source_N >= 0
    return np.stack([np.bincount(layer_NK[real_N].ravel(), minlength=records.num_experts)
                     for layer_NK in records.experts_LNK]).astype(np.int64)


def group_maxvio(counts_E: np.ndarray, groups: Sequence[tuple[str, int, int]]) -> dict[str, float]:
    """MaxVio of each expert group's slice of the counts (groups: (name, first, count), as
    `RoutingRecords.group_slices`); a group's tokens can only reach its own experts."""
    return {name: maxvio(counts_E[a:a + n]) for name, a, n in groups}


def dead_and_hot(counts_LE: np.ndarray, layers: Sequence[int], dead_below: float = 0.1,
                 hot_above: float = 3.0, groups: Sequence[tuple[str, int, int]] | None = None
                 ) -> dict[str, list[dict[str, Any]]]:
    """Experts whose load is under `dead_below` or over `hot_above` times the uniform load
    (1/E of the assignments; with expert `groups` (name, first, count), 1/E_group of that
    group's assignments), as {layer, expert, load_vs_uniform[, group]} lists."""
    out: dict[str, list[dict[str, Any]]] = {"dead": [], "hot": []}
    slices = groups or [("all", 0, counts_LE.shape[1])]
    group_of = {e: name for name, a, n in slices for e in range(a, a + n)}
    for layer, counts_E in zip(layers, counts_LE, strict=True):
        ratio_E = np.zeros(len(counts_E), dtype=np.float64)
        for _, a, n in slices:
            ratio_E[a:a + n] = counts_E[a:a + n] / max(counts_E[a:a + n].mean(), 1e-12)
        for e, ratio in enumerate(ratio_E.tolist()):
            item = {"layer": int(layer), "expert": e, "load_vs_uniform": round(ratio, 4)}
            if groups:
                item["group"] = group_of[e]
            if ratio < dead_below:
                out["dead"].append(item)
            elif ratio > hot_above:
                out["hot"].append(item)
    return out


def load_over_training(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per MoE layer, from metrics.jsonl records: steps, each expert's token share per logged
    step, batch MaxVio, dropped fraction, router entropy and aux-loss-free bias per step.
    Series are named `layer_XX`, or `layer_XX/<modality>` for the per-modality counts of
    multimodal runs (modality expert groups, or shared routing tracked by modality)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for key, value in row.items():
            if not (key.startswith("moe/layer_") and key.endswith("/tokens_per_expert")):
                continue
            layer = key[len("moe/"):-len("/tokens_per_expert")]
            counts_E = np.asarray(value, dtype=np.float64)
            series = out.setdefault(layer, {"steps": [], "share": [], "maxvio": [], "dropped": [],
                                            "entropy": [], "bias": []})
            series["steps"].append(int(row["step"]))
            series["share"].append((counts_E / max(counts_E.sum(), 1e-12)).round(5).tolist())
            series["maxvio"].append(maxvio(counts_E))
            series["dropped"].append(row.get(f"moe/{layer}/dropped_fraction"))
            series["entropy"].append(row.get(f"moe/{layer}/router_entropy"))
            series["bias"].append(row.get(f"moe/{layer}/expert_bias"))
    return out


# ----------------------------------------------------------------------------- saturation


def router_saturation(early: RoutingRecords, final: RoutingRecords) -> dict[str, list[float]]:
    """OLMoE §5: per layer, the mean over tokens of |E_t ∩ E_T| / k (top-k) and the share of
    tokens whose first choice is the same (top-1), between two checkpoints' routings of the
    same tokens. Random routing gives k/E and 1/E."""
    if not np.array_equal(early.token_N, final.token_N) or not np.array_equal(
            early.layers_L, final.layers_L):
        raise UserValueError(f"router saturation needs the same held-out tokens and layers at "
                             f"step {early.step} and step {final.step}")
    real_N = final.source_N >= 0
    top1, topk = [], []
    for a_NK, b_NK in zip(early.experts_LNK, final.experts_LNK, strict=True):
        a_NK, b_NK = a_NK[real_N], b_NK[real_N]
        top1.append(float((a_NK[:, 0] == b_NK[:, 0]).mean()))
        topk.append(float(_overlap_NK(a_NK, b_NK).mean() / final.top_k))
    return {"top1": top1, "topk": topk}


def _overlap_NK(a_NK: np.ndarray, b_NK: np.ndarray) -> np.ndarray:
    """|a_n ∩ b_n| per token (top-k sets hold distinct experts)."""
    return (a_NK[:, :, None] == b_NK[:, None, :]).any(axis=2).sum(axis=1)


# ----------------------------------------------------------------------------- co-activation


def coactivation(records: RoutingRecords) -> list[list[list[float]]]:
    """Per layer, an (E, E) matrix of P(expert j in top-k | expert i in top-k), over all pairs
    within each token's top-k set (the diagonal is 0)."""
    E, real_N = records.num_experts, records.source_N >= 0
    out = []
    for layer_NK in records.experts_LNK:
        onehot_NE = np.zeros((int(real_N.sum()), E), dtype=np.float64)
        np.put_along_axis(onehot_NE, layer_NK[real_N].astype(np.int64), 1.0, axis=1)
        both_EE = onehot_NE.T @ onehot_NE
        alone_E = np.diag(both_EE).copy()
        np.fill_diagonal(both_EE, 0.0)
        out.append((both_EE / np.maximum(alone_E, 1)[:, None]).round(5).tolist())
    return out


# ----------------------------------------------------------------------------- specialization


def specialization(records: RoutingRecords, group_N: np.ndarray,
                   names: Sequence[str]) -> dict[str, Any]:
    """Share of each group's tokens with expert e in their top-k ((L, S, E); uniform k/E) and a
    specialization score per layer: the generalized Jensen-Shannon divergence of P(expert |
    group) from P(expert), i.e. Σ_s w_s KL(P(e|s) || P(e)) = I(group; expert) in bits, divided
    by H(group) so that 1 means each group has experts of its own and 0 means routing ignores
    the group. Groups are indices into `names`; negative ones (padding) are left out."""
    keep = [s for s in range(len(names)) if (group_N == s).any()]
    share, score, bits = [], [], []
    for layer_NK in records.experts_LNK:
        counts_SE = np.stack([np.bincount(layer_NK[group_N == s].ravel(),
                                          minlength=records.num_experts) for s in keep])
        tokens_S = np.array([(group_N == s).sum() for s in keep], dtype=np.float64)
        share.append((counts_SE / tokens_S[:, None]).round(5).tolist())
        info = _mutual_information(counts_SE.astype(np.float64))
        h = _entropy(tokens_S / tokens_S.sum())
        bits.append(info)
        score.append(info / h if h > 0 else 0.0)
    by_group = {name: records.top_k / n for name, _, n in records.group_slices()}
    return {"groups": [names[s] for s in keep], "share": share, "js_bits": bits, "score": score,
            "uniform": None if records.expert_groups else records.top_k / records.num_experts,
            "uniform_by_group": by_group,
            "expert_groups": {name: [a, n] for name, a, n in records.group_slices()}}


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _mutual_information(joint_SE: np.ndarray) -> float:
    """I(S; E) in bits from a count table: the weighted JS divergence of the rows from their
    mixture."""
    p_SE = joint_SE / joint_SE.sum()
    p_S, p_E = p_SE.sum(1, keepdims=True), p_SE.sum(0, keepdims=True)
    nz = p_SE > 0
    return float((p_SE[nz] * np.log2(p_SE[nz] / (p_S @ p_E)[nz])).sum())


# ----------------------------------------------------------------------------- vocabulary


def vocabulary_specialization(records: RoutingRecords, column: str = "token_N",
                              min_count: int = 10) -> dict[str, Any]:
    """OLMoE Fig. 23 on first choices: for every token id seen at least `min_count` times in
    `column` (token_N, next_N or predicted_N), the share of its occurrences whose first-choice
    expert is its most frequent one; per layer the occurrence-weighted mean. Routing that
    ignores the token gives about 1/E (more for rare tokens)."""
    ids_N = getattr(records, column)
    valid_N = (ids_N >= 0) & (records.source_N >= 0)
    ids, inverse, counts = np.unique(ids_N[valid_N], return_inverse=True, return_counts=True)
    frequent = counts >= min_count
    per_layer = []
    for layer_NK in records.experts_LNK:
        table_IE = np.zeros((len(ids), records.num_experts), dtype=np.int64)
        np.add.at(table_IE, (inverse, layer_NK[valid_N, 0].astype(np.int64)), 1)
        top_I = table_IE.max(axis=1)
        weighted = top_I[frequent].sum() / max(counts[frequent].sum(), 1)
        per_layer.append(float(weighted) if frequent.any() else None)
    return {"column": column, "tokens": int(frequent.sum()), "mean": per_layer,
            "baseline": 1 / records.num_experts,
            "baseline_by_group": {name: 1 / n for name, _, n in records.group_slices()}}


def top_tokens_per_expert(records: RoutingRecords, layer_pos: int, top: int = 8,
                          min_count: int = 10) -> list[list[tuple[int, float]]]:
    """Per expert of the layer at position `layer_pos`, the token ids (seen >= min_count times)
    most often sent to it as first choice, with the share of their occurrences that were."""
    valid_N = records.source_N >= 0
    ids, inverse, counts = np.unique(records.token_N[valid_N], return_inverse=True,
                                     return_counts=True)
    table_IE = np.zeros((len(ids), records.num_experts), dtype=np.int64)
    first_N = records.experts_LNK[layer_pos][valid_N, 0].astype(np.int64)
    np.add.at(table_IE, (inverse, first_N), 1)
    share_IE = np.where((counts >= min_count)[:, None], table_IE / counts[:, None], 0.0)
    out = []
    for e in range(records.num_experts):
        order = np.argsort(-share_IE[:, e], kind="stable")[:top]
        out.append([(int(ids[i]), round(float(share_IE[i, e]), 4)) for i in order
                    if share_IE[i, e] > 0])
    return out


# ----------------------------------------------------------------------------- consecutive


def consecutive_baselines(num_experts: int, top_k: int) -> dict[str, float]:
    """Random routing: same first choice 1/E; top-k sets intersect 1 - C(E-k, k) / C(E, k)."""
    return {"top1": 1 / num_experts,
            "topk": 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)}


def consecutive_rates(records: RoutingRecords, group_N: np.ndarray | None = None,
                      names: Sequence[str] = ()) -> dict[str, Any]:
    """Mixtral Table 5: per layer, the share of neighbouring token pairs (t, t+1 in the same
    held-out row, neither padding) whose first choices agree, and whose top-k sets share an
    expert; overall and, given groups, per group of token t. `baseline` is random routing over
    all E experts; with modality expert groups the one that applies is `baseline_by_group`
    (two neighbours in different modalities never share an expert)."""
    pair_N = (records.row_N[1:] == records.row_N[:-1]) & (records.source_N[1:] >= 0) & (
        records.source_N[:-1] >= 0)
    out: dict[str, Any] = {"all": _pair_rates(records, pair_N),
                           "baseline": consecutive_baselines(records.num_experts, records.top_k),
                           "baseline_by_group": {name: consecutive_baselines(n, records.top_k)
                                                 for name, _, n in records.group_slices()}}
    if group_N is not None:
        out["by_group"] = {name: _pair_rates(records, pair_N & (group_N[:-1] == s))
                           for s, name in enumerate(names) if (pair_N & (group_N[:-1] == s)).any()}
    return out


def _pair_rates(records: RoutingRecords, pair_N: np.ndarray) -> dict[str, list[float]]:
    top1, topk = [], []
    for layer_NK in records.experts_LNK:
        a_NK, b_NK = layer_NK[:-1][pair_N], layer_NK[1:][pair_N]
        top1.append(float((a_NK[:, 0] == b_NK[:, 0]).mean()) if len(a_NK) else 0.0)
        topk.append(float((_overlap_NK(a_NK, b_NK) > 0).mean()) if len(a_NK) else 0.0)
    return {"top1": top1, "topk": topk, "pairs": int(pair_N.sum())}


# ----------------------------------------------------------------------------- token view


def token_view(records: RoutingRecords, layer_pos: int, rows_per_source: int = 2,
               max_tokens: int = 64) -> list[dict[str, Any]]:
    """A few held-out passages per source: token ids with their first-choice expert in the
    layer at `layer_pos` (Mixtral Fig. 8)."""
    out = []
    for s, name in enumerate(records.sources):
        rows = np.unique(records.row_N[records.source_N == s])[:rows_per_source]
        for row in rows.tolist():
            sel_N = np.flatnonzero((records.row_N == row) & (records.source_N == s))[:max_tokens]
            out.append({"source": name, "row": int(row),
                        "tokens": records.token_N[sel_N].tolist(),
                        "experts": records.experts_LNK[layer_pos][sel_N, 0].tolist()})
    return out
