"""Stage 2 scaled out: exact and MinHash-LSH near dedup as independent tasks.

The single-process path (:mod:`~mmfm.data.curation.dedup`) holds every signature at once
(112 x 4 bytes per document: ~450 GB at a billion documents). Here the same clusters come
from four steps, the first two of which are task arrays run by the recipe's datatrove
executor (Local / Slurm / Ray), like stage 1::

    exact    P tasks    task p groups the documents whose exact hash falls in partition p
                        and applies the keep rule per group
    buckets  B x R      task (band b, range r) reads band b of every signature file, keeps
             tasks      the documents whose band's first value is r mod R, sorts their band
                        keys and writes one edge (first, other) per shared bucket
    cluster  1 process  connected components (scipy.sparse.csgraph) over the edge graph,
                        whose nodes are only the documents that share a bucket; keep rule
                        per cluster
    merge    1 process  dedup.json in the single-process format

Documents are numbered globally (``gid = offset[task] + line``, the single-process order),
clusters are ordered by their smallest member and ties in the keep rule break on ids, so
``dedup.json``'s removed list, counts and example clusters equal the single-process ones
(tests/test_curate_dedup_sharded.py checks it, on planted duplicates and end to end).

Memory per task, N documents in all, D of them removed as exact duplicates, E edges:
exact task ~ N/P x (hash + id + 2 ints); bucket task ~ N/R x 16 bytes (band key + gid), plus
one stage-1 task's slice of the exact-removed gids and of its signature file (both
memory-mapped);
cluster step ~ E x 40 bytes (edges + graph), E <= B x (documents that share a bucket);
merge ~ the removed list (which is dedup.json itself).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.data.curation.minhash import band_keys, choose_keeper
from mmfm.data.curation.recipe import Recipe

MAX_EXAMPLE_CLUSTERS = 5
_PARTITION_HEX = 15  # hex digits of the exact hash that pick its partition (fits in int64)


class DocTable:
    """The per-document facts the keep rule needs, read from stage 1's ``meta.json`` files
    one task at a time (never all at once): source rank, words, id."""

    def __init__(self, recipe: Recipe, world: int):
        self.process = recipe.work_path() / "process"
        self.world = world
        order = recipe.dedup.priority or [s.name for s in recipe.sources]
        self.rank = {name: i for i, name in enumerate(order)}
        self.n_order = len(order)

    def offsets(self) -> np.ndarray:
        """``[world + 1]`` first gid of each task; cached in ``WORK/dedup/offsets.npy``."""
        path = self.process.parent / "dedup" / "offsets.npy"
        if path.is_file():
            return np.load(path)
        counts = [len(self.meta(t)) for t in range(self.world)]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        _save_npy(path, offsets)
        return offsets

    def meta(self, task: int) -> list[list[Any]]:
        return json.loads((self.process / f"{task:05d}.meta.json").read_text())

    def facts(self, m: list[Any]) -> tuple[int, int, str]:
        """(priority rank, words, id) of one meta row, as the single-process path has them."""
        doc_id = m[1] if m[1].startswith(f"{m[0]}/") else f"{m[0]}/{m[1]}"
        return self.rank.get(m[0], self.n_order), m[3], doc_id

    def rows(self) -> Iterator[tuple[int, list[Any]]]:
        """(gid, meta row) for every document, task by task."""
        gid = 0
        for t in range(self.world):
            for m in self.meta(t):
                yield gid, m
                gid += 1


def exact_partition(hash_hex: str, parts: int) -> int:
    return int(hash_hex[:_PARTITION_HEX], 16) % parts


def resolve(clusters: list[list[int]], facts: dict[int, tuple[int, int, str]], reason: str
            ) -> dict[str, Any]:
    """Keep rule per cluster. Returns removed rows ``[gid, reason, kept id, own id]``, the
    cluster-size counts and the first example clusters (ordered by smallest member)."""
    priority = {g: f[0] for g, f in facts.items()}
    n_words = {g: f[1] for g, f in facts.items()}
    ids = {g: f[2] for g, f in facts.items()}
    removed: list[list[Any]] = []
    sizes: Counter[int] = Counter()
    examples: list[list[Any]] = []
    for members in sorted((c for c in clusters if len(c) > 1), key=min):
        sizes[len(members)] += 1
        keep = choose_keeper(members, priority, n_words, ids)  # type: ignore[arg-type]
        removed += [[g, f"{reason}_duplicate", ids[keep], ids[g]] for g in members if g != keep]
        if len(examples) < MAX_EXAMPLE_CLUSTERS:
            others = sorted(ids[g] for g in members if g != keep)[:9]
            examples.append([min(members), [ids[keep], *others]])
    return {"removed": removed, "sizes": {str(k): v for k, v in sizes.items()},
            "examples": examples}


def run_exact_task(recipe: Recipe, world: int, part: int, parts: int) -> None:
    """Exact dedup of the documents whose hash falls in partition `part` of `parts`."""
    out = _dir(recipe, "exact") / f"{part:05d}.json"
    if out.is_file():
        return
    table = DocTable(recipe, world)
    groups: dict[str, list[int]] = defaultdict(list)
    facts: dict[int, tuple[int, int, str]] = {}
    for gid, m in table.rows():
        if exact_partition(m[2], parts) == part:
            groups[m[2]].append(gid)
            facts[gid] = table.facts(m)
    _save_json(out, resolve(list(groups.values()), facts, "exact"))


def exact_removed(recipe: Recipe, parts: int) -> np.ndarray:
    """Sorted gids removed by exact dedup (all partitions), memory-mapped from
    ``WORK/dedup/exact_removed.npy`` (written once, by the first caller)."""
    path = recipe.work_path() / "dedup" / "exact_removed.npy"
    if not path.is_file():
        gids = [r[0] for p in range(parts)
                for r in _load_json(_dir(recipe, "exact"), p)["removed"]] \
            if recipe.dedup.exact else []
        _save_npy(path, np.sort(np.asarray(gids, dtype=np.int64)))
    return np.load(path, mmap_mode="r")


def run_bucket_task(recipe: Recipe, world: int, task: int, ranges: int, exact_parts: int
                    ) -> None:
    """Band ``task // ranges``, hash range ``task % ranges``: edges between the surviving
    documents that share a bucket of that band."""
    out = _dir(recipe, "buckets") / f"{task:05d}.npy"
    if out.is_file():
        return
    band, rng = divmod(task, ranges)
    rows = recipe.dedup.rows
    offsets = DocTable(recipe, world).offsets()
    dropped = exact_removed(recipe, exact_parts)
    keys, gids = [], []
    for t in range(world):
        sig = np.load(recipe.work_path() / "process" / f"{t:05d}.sig.npy", mmap_mode="r")
        part = np.asarray(sig[:, band * rows:(band + 1) * rows])
        gid = np.arange(offsets[t], offsets[t + 1], dtype=np.int64)
        lo, hi = np.searchsorted(dropped, [offsets[t], offsets[t + 1]])
        mine = (part[:, 0] % ranges == rng) & ~np.isin(gid, dropped[lo:hi])
        if mine.any():
            keys.append(band_keys(part[mine], 1, rows)[:, 0])
            gids.append(gid[mine])
    edges = bucket_edges(np.concatenate(keys) if keys else np.empty(0, np.uint64),
                         np.concatenate(gids) if gids else np.empty(0, np.int64))
    _save_npy(out, edges)


def bucket_edges(keys: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """``[E, 2]`` edges joining each bucket's smallest gid to its other members."""
    order = np.lexsort((gids, keys))
    keys, gids = keys[order], gids[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    first = gids[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
    return np.stack([first[~starts], gids[~starts]], axis=1).astype(np.int64)


def run_cluster(recipe: Recipe, world: int, buckets: int) -> dict[str, Any]:
    """Connected components over every bucket task's edges; keep rule per cluster."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    files = [_dir(recipe, "buckets") / f"{b:05d}.npy" for b in range(buckets)]
    edges = np.concatenate([np.load(f) for f in files]) if files else np.empty((0, 2), np.int64)
    nodes = np.unique(edges)
    if len(nodes) == 0:
        return resolve([], {}, "near")
    a, b = np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(nodes),) * 2)
    _, labels = connected_components(graph, directed=False)
    clusters: dict[int, list[int]] = defaultdict(list)
    for gid, label in zip(nodes.tolist(), labels.tolist(), strict=True):
        clusters[label].append(gid)
    table = DocTable(recipe, world)
    wanted = set(nodes.tolist())
    facts = {gid: table.facts(m) for gid, m in table.rows() if gid in wanted}
    return resolve(list(clusters.values()), facts, "near")


def merge(recipe: Recipe, world: int, exact_parts: int, near: dict[str, Any] | None
          ) -> dict[str, Any]:
    """dedup.json's content (without timings) from the partition results."""
    table = DocTable(recipe, world)
    offsets = table.offsets()
    parts = [_load_json(_dir(recipe, "exact"), p) for p in range(exact_parts)] \
        if recipe.dedup.exact else []
    results = {"exact": parts, "near": [near] if near else []}
    removed = sorted(r for res in results.values() for p in res for r in p["removed"])
    reason_of = {r[0]: r[1] for r in removed}
    per_source: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for gid, m in table.rows():
        per_source[m[0]]["docs_in"] += 1
        per_source[m[0]][reason_of.get(gid, "docs_out")] += 1
    out: dict[str, Any] = {"docs": int(offsets[-1]), "removed": [], "per_source": {}}
    for gid, reason, kept, own in removed:
        t = int(np.searchsorted(offsets, gid, side="right") - 1)
        out["removed"].append([t, gid - int(offsets[t]), reason, kept, own])
    out["per_source"] = {k: dict(v) for k, v in per_source.items()}
    for kind, res in results.items():
        sizes: Counter[int] = Counter()
        for p in res:
            sizes.update({int(k): v for k, v in p["sizes"].items()})
        out[f"{kind}_cluster_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    out["example_clusters"] = {
        kind: [c for _, c in sorted(e for p in res for e in p["examples"])][
            :MAX_EXAMPLE_CLUSTERS] for kind, res in results.items()}
    return out


def _dir(recipe: Recipe, step: str) -> Path:
    path = recipe.work_path() / "dedup" / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_json(folder: Path, part: int) -> dict[str, Any]:
    return json.loads((folder / f"{part:05d}.json").read_text())


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # tasks may race to write shared files
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # tasks may race to write shared files
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)
