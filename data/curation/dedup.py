"""Stage 2, one process: exact then near (MinHash-LSH) dedup across all sources.

Reads every task's ``meta.json`` and ``sig.npy`` (small: no text), so it scales with the
number of documents, not their size. Documents are addressed globally as (task, line).

Exact: documents with the same :func:`exact_hash` (case- and whitespace-insensitive) form a
cluster. Near: the survivors are banded and joined by union-find. In each cluster one
document is kept by :func:`choose_keeper` (most preferred source, then most words, then
smallest id); the others are removed and recorded with the id they duplicate.
Output ``WORK/dedup.json``: removed documents as [task, line, reason, kept id, own id],
per source counts, cluster-size histograms and a few example clusters.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.data.curation.minhash import UnionFind, choose_keeper, lsh_clusters
from mmfm.data.curation.recipe import Recipe

MAX_EXAMPLE_CLUSTERS = 5


def run_dedup(recipe: Recipe, world: int) -> dict[str, Any]:
    work = recipe.work_path()
    path = work / "dedup.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.monotonic()
    meta, sigs, where = _load(work / "process", world)
    order = recipe.dedup.priority or [s.name for s in recipe.sources]
    rank = {name: i for i, name in enumerate(order)}
    priority = [rank.get(m[0], len(order)) for m in meta]
    n_words = [m[3] for m in meta]
    ids = [m[1] if m[1].startswith(f"{m[0]}/") else f"{m[0]}/{m[1]}" for m in meta]
    removed: dict[int, tuple[str, int]] = {}  # doc -> (reason, kept doc)
    exact_sizes: Counter[int] = Counter()
    near_sizes: Counter[int] = Counter()
    examples: dict[str, list[list[str]]] = {"exact": [], "near": []}
    if recipe.dedup.exact:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, m in enumerate(meta):
            groups[m[2]].append(i)
        _resolve(list(groups.values()), "exact", priority, n_words, ids, removed, exact_sizes,
                 examples["exact"])
    near_s = 0.0
    if recipe.dedup.near and len(meta):
        t0 = time.monotonic()
        alive = np.array([i for i in range(len(meta)) if i not in removed], dtype=np.int64)
        uf = lsh_clusters(sigs[alive], recipe.dedup.bands, recipe.dedup.rows)
        clusters = [[int(alive[j]) for j in members] for members in uf.clusters().values()]
        _resolve(clusters, "near", priority, n_words, ids, removed, near_sizes, examples["near"])
        near_s = time.monotonic() - t0
    result = {
        "docs": len(meta),
        "removed": [[*where[i], reason, ids[kept], ids[i]]
                    for i, (reason, kept) in sorted(removed.items())],
        "per_source": _per_source(meta, removed),
        "exact_cluster_sizes": _hist(exact_sizes),
        "near_cluster_sizes": _hist(near_sizes),
        "example_clusters": examples,
        "seconds": round(time.monotonic() - started, 3),
        "near_seconds": round(near_s, 3),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def _load(process: Path, world: int) -> tuple[list[list[Any]], np.ndarray, list[tuple[int, int]]]:
    meta: list[list[Any]] = []
    sigs: list[np.ndarray] = []
    where: list[tuple[int, int]] = []
    for rank in range(world):
        m = json.loads((process / f"{rank:05d}.meta.json").read_text())
        s = np.load(process / f"{rank:05d}.sig.npy")
        meta.extend(m)
        sigs.append(s)
        where.extend((rank, line) for line in range(len(m)))
    width = max((s.shape[1] for s in sigs), default=0)
    stacked = np.concatenate([s.reshape(-1, width) for s in sigs]) if sigs else np.zeros((0, 0))
    return meta, stacked, where


def _resolve(clusters: list[list[int]], reason: str, priority: list[int], n_words: list[int],
             ids: list[str], removed: dict[int, tuple[str, int]], sizes: Counter[int],
             examples: list[list[str]]) -> None:
    for members in clusters:
        if len(members) < 2:
            continue
        sizes[len(members)] += 1
        keep = choose_keeper(members, priority, n_words, ids)
        for i in members:
            if i != keep:
                removed[i] = (f"{reason}_duplicate", keep)
        if len(examples) < MAX_EXAMPLE_CLUSTERS:
            examples.append([ids[keep]] + sorted(ids[i] for i in members if i != keep)[:9])


def _per_source(meta: list[list[Any]], removed: dict[int, tuple[str, int]]) -> dict[str, Any]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, m in enumerate(meta):
        out[m[0]]["docs_in"] += 1
        if i in removed:
            out[m[0]][removed[i][0]] += 1
        else:
            out[m[0]]["docs_out"] += 1
    return {k: dict(v) for k, v in out.items()}


def _hist(sizes: Counter[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(sizes.items())}


def cluster_sizes_of(uf: UnionFind) -> Counter[int]:
    return Counter(len(m) for m in uf.clusters().values() if len(m) > 1)
