"""Stage 1, one task of many: read a shard of every source, run its filter chain, and write
the kept documents with their exact hash and MinHash signature.

Task `rank` of `world` takes every source's documents whose index is ``rank mod world``
(every task reads each source but processes only its share; the read statistics come from
task 0, which sees every record). Its outputs, in ``WORK/process/``::

    {rank}.jsonl      kept documents (text + metadata)
    {rank}.meta.json  per kept document: [source, id, exact hash, words]
    {rank}.sig.npy    uint32 [docs, bands*rows] MinHash signatures (empty without near dedup)
    {rank}.stats.json per source and stage counts, removed examples, timings; written last
                      (temp + rename), so its presence means the task finished
    {rank}.count      documents this task has run through its chains so far (progress)
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.data.curation.filters import Stage, build_chain
from mmfm.data.curation.minhash import MinHasher, exact_hash, words
from mmfm.data.curation.progress import CountWriter
from mmfm.data.curation.recipe import Recipe, SourceSpec
from mmfm.data.curation.report import length_bin
from mmfm.data.curation.sources import SourceStats, iter_source

META_KEYS = ("source", "id")


def task_done(work: Path, rank: int) -> bool:
    return (work / "process" / f"{rank:05d}.stats.json").is_file()


def run_process_task(recipe: Recipe, rank: int, world: int, cache_dir: Path) -> dict[str, Any]:
    """Run (or, if its stats file exists, skip) task `rank`; returns its stats."""
    out = recipe.work_path() / "process"
    stats_path = out / f"{rank:05d}.stats.json"
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    hasher = MinHasher(recipe.dedup.bands * recipe.dedup.rows, recipe.dedup.seed,
                       recipe.dedup.ngram) if recipe.dedup.near else None
    writer = _TaskWriter(out, rank, hasher)
    started = time.monotonic()
    stats: dict[str, Any] = {"rank": rank, "world": world, "sources": {}}
    try:
        for src in recipe.sources:
            stats["sources"][src.name] = _process_source(recipe, src, rank, world, cache_dir,
                                                         writer)
    finally:
        writer.close()
    stats["seconds"] = round(time.monotonic() - started, 3)
    stats["filter_seconds"] = round(sum(s["filter_seconds"] for s in stats["sources"].values()), 3)
    stats["signature_seconds"] = round(writer.sig_seconds, 3)
    writer.commit()
    tmp = stats_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, stats_path)
    return stats


def _process_source(recipe: Recipe, src: SourceSpec, rank: int, world: int, cache_dir: Path,
                    writer: _TaskWriter) -> dict[str, Any]:
    chain = build_chain(recipe.chains[recipe.chain_for(src)], src.languages, src.lang_threshold)
    read = SourceStats()
    counts: dict[str, dict[str, Any]] = {
        s.name: {**dict.fromkeys(("docs_in", "docs_out", "chars_in", "chars_out", "modified"), 0),
                 "seconds": 0.0} for s in chain}
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    reasons: dict[str, int] = defaultdict(int)
    fired: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    lengths: dict[str, dict[str, int]] = {"read": defaultdict(int), "filtered": defaultdict(int)}
    k = recipe.report.examples_per_filter
    filter_s = 0.0
    note: str | None = None
    try:
        for i, doc in enumerate(iter_source(recipe, src, read, cache_dir)):
            if i % world != rank:
                continue
            writer.seen.add()
            lengths["read"][str(length_bin(len(doc["text"])))] += 1
            t0 = time.perf_counter()
            removed = _run_chain(chain, doc, counts, reasons, examples, k,
                                 recipe.report.example_chars, fired)
            filter_s += time.perf_counter() - t0
            if not removed:
                lengths["filtered"][str(length_bin(len(doc["text"])))] += 1
                writer.write(doc)
    except (OSError, ValueError, RuntimeError) as e:  # an optional source that is not here
        if not src.optional:
            raise
        note = f"optional source skipped: {e}"
    return {"read": read.as_dict() if rank == 0 else None, "stages": counts,
            "reasons": dict(reasons), "examples": dict(examples), "filter_seconds": filter_s,
            "fired_words": {r: dict(c) for r, c in fired.items()},
            "length_hist": {k: dict(v) for k, v in lengths.items()},
            "note": note}


def _run_chain(chain: list[Stage], doc: dict[str, Any], counts: dict[str, dict[str, int]],
               reasons: dict[str, int], examples: dict[str, list[dict[str, Any]]], k: int,
               example_chars: int, fired: dict[str, dict[str, int]] | None = None) -> bool:
    """Run one document through the chain, counting; True if a stage removed it. A stage
    that explains a removal (``doc["_evidence"]``: rule, words, spans) has its words counted
    in `fired` and its example cut around the first span, with the spans kept."""
    for stage in chain:
        c = counts[stage.name]
        before = doc["text"]
        c["docs_in"] += 1
        c["chars_in"] += len(before)
        t0 = time.perf_counter()
        reason = stage(doc)
        c["seconds"] += time.perf_counter() - t0
        evidence = doc.pop("_evidence", None)
        if reason is not None:
            reasons[reason] += 1
            if evidence and fired is not None:
                for w, n in evidence.get("words", {}).items():
                    fired[reason][w] += n
            if len(examples[reason]) < k:
                examples[reason].append({"id": doc.get("id"), "stage": stage.name,
                                         **example_window(before, example_chars, evidence)})
            return True
        c["docs_out"] += 1
        c["chars_out"] += len(doc["text"])
        c["modified"] += doc["text"] is not before and doc["text"] != before
    return False


def example_window(text: str, chars: int, evidence: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """The removed example: `chars` characters of `text`, starting a little before the first
    triggering span when there is one; spans re-based to the snippet, the rest dropped."""
    if not evidence:
        return {"text": text[:chars]}
    spans = evidence.get("spans") or []
    start = 0 if not spans or spans[0][1] <= chars else max(0, spans[0][0] - chars // 4)
    inside = [[a - start, b - start] for a, b in spans if a >= start and b <= start + chars]
    return {"text": text[start:start + chars], "offset": start, "rule": evidence.get("rule"),
            "words": evidence.get("words", {}), "spans": inside}


class _TaskWriter:
    """Writes one task's kept documents, metadata and signatures via temp names."""

    def __init__(self, out: Path, rank: int, hasher: MinHasher | None):
        self.out, self.rank, self.hasher = out, rank, hasher
        self.docs = open(out / f"{rank:05d}.jsonl.tmp", "w", encoding="utf-8")
        self.meta: list[list[Any]] = []
        self.sigs: list[np.ndarray] = []
        self.sig_seconds = 0.0
        self.seen = CountWriter(out / f"{rank:05d}.count")

    def write(self, doc: dict[str, Any]) -> None:
        text = doc["text"]
        self.docs.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.meta.append([doc["source"], str(doc["id"]), exact_hash(text), len(words(text))])
        if self.hasher is not None:
            t0 = time.perf_counter()
            self.sigs.append(self.hasher.signature(text))
            self.sig_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.docs.close()

    def commit(self) -> None:
        self.seen.flush()
        base = self.out / f"{self.rank:05d}"
        width = self.hasher.num_perm if self.hasher is not None else 0
        sigs = np.stack(self.sigs) if self.sigs else np.zeros((0, width), dtype=np.uint32)
        with open(f"{base}.sig.npy.tmp", "wb") as fh:
            np.save(fh, sigs)
        os.replace(f"{base}.sig.npy.tmp", f"{base}.sig.npy")
        Path(f"{base}.meta.json.tmp").write_text(json.dumps(self.meta))
        os.replace(f"{base}.meta.json.tmp", f"{base}.meta.json")
        os.replace(f"{base}.jsonl.tmp", f"{base}.jsonl")
