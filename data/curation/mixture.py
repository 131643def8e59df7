"""Stage 3, one process: curated files per source, tokenizer, mixture, train/val corpus.

1. ``OUTPUT/curated/{source}.jsonl``: each source's documents that survived filters and
   dedup (in task order).
2. Tokenizer: byte-level BPE (:mod:`mmfm.data.tokenizer`) trained on a sample of the curated
   documents drawn by the target shares (each source contributes ``share x sample_chars``
   characters, taken by a stable hash of the id), unless the recipe names one. The tokenizer
   report gives vocab size and bytes per token per source.
3. Mixture: real token counts per source with that tokenizer; a source with target share
   ``w`` gets ``w x total`` tokens, i.e. ``epochs = w x total / tokens`` passes over it
   (< 1: a hash-chosen subset, > 1: whole repeats plus a subset), capped at ``max_epochs``.
   Target, realized tokens and epochs go to the manifest.
4. ``OUTPUT/train.jsonl`` / ``val.jsonl`` + ``manifest.json`` in the corpus format of
   :mod:`mmfm.data.corpus`, so ``mmfm data shards --corpus OUTPUT`` writes training shards.
   Validation documents are held out per source before any repetition.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfm.data.corpus import choose_holdout, holdout_score
from mmfm.data.curation.recipe import Recipe
from mmfm.data.curation.report import length_bin

SPLITS = ("train", "val")


def write_curated(recipe: Recipe, world: int, dedup: dict[str, Any]) -> dict[str, Any]:
    """Split the task outputs into one JSONL per source, without the removed documents."""
    out = Path(recipe.output) / "curated"
    done = out / "curated.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    removed = {(r, line) for r, line, *_ in dedup["removed"]}
    names = [s.name for s in recipe.sources]
    files = {n: open(out / f".{n}.jsonl.tmp", "w", encoding="utf-8") for n in names}
    counts: dict[str, Any] = {n: {"docs": 0, "chars": 0, "bytes": 0, "length_hist": {}}
                              for n in names}
    try:
        for rank in range(world):
            path = recipe.work_path() / "process" / f"{rank:05d}.jsonl"
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh):
                    if (rank, line_no) in removed:
                        continue
                    doc = json.loads(line)
                    files[doc["source"]].write(line)
                    c = counts[doc["source"]]
                    c["docs"] += 1
                    c["chars"] += len(doc["text"])
                    c["bytes"] += len(doc["text"].encode("utf-8"))
                    b = str(length_bin(len(doc["text"])))
                    c["length_hist"][b] = c["length_hist"].get(b, 0) + 1
    finally:
        for fh in files.values():
            fh.close()
    for n in names:
        os.replace(out / f".{n}.jsonl.tmp", out / f"{n}.jsonl")
    _atomic_json(done, counts)
    return counts


def iter_curated(recipe: Recipe, name: str) -> Iterator[dict[str, Any]]:
    with open(Path(recipe.output) / "curated" / f"{name}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def target_shares(recipe: Recipe, counts: dict[str, dict[str, int]], key: str) -> dict[str, float]:
    """The recipe's target shares, or each source's natural share of `key` when unset."""
    if recipe.sources[0].target_share is not None:
        return {s.name: float(s.target_share) for s in recipe.sources}  # type: ignore[arg-type]
    total = sum(c[key] for c in counts.values()) or 1
    return {n: c[key] / total for n, c in counts.items()}


def tokenizer_sample(recipe: Recipe, counts: dict[str, dict[str, int]]) -> Iterator[str]:
    """Texts for tokenizer training: about ``share x sample_chars`` characters per source."""
    shares = target_shares(recipe, counts, "chars")
    for s in recipe.sources:
        have = counts[s.name]["chars"]
        if not have:
            continue
        frac = min(1.0, shares[s.name] * recipe.tokenizer.sample_chars / have)
        for doc in iter_curated(recipe, s.name):
            if holdout_score(f"tok:{doc['id']}", recipe.seed) < frac:
                yield doc["text"]


def get_tokenizer(recipe: Recipe, counts: dict[str, dict[str, int]]) -> tuple[Any, Path]:
    from mmfm.data.tokenizer import load_tokenizer, train_tokenizer

    if recipe.tokenizer.path:
        path = Path(recipe.tokenizer.path)
        return load_tokenizer(path), path
    path = Path(recipe.output) / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path), path
    tok = train_tokenizer(tokenizer_sample(recipe, counts), recipe.tokenizer.vocab_size, path)
    return tok, path


def count_tokens(recipe: Recipe, tok: Any, counts: dict[str, dict[str, int]]
                 ) -> dict[str, list[int]]:
    """Tokens of every curated document, per source (in file order)."""
    from mmfm.data.tokenizer import encode_plain

    out: dict[str, list[int]] = {}
    for s in recipe.sources:
        lens: list[int] = []
        batch: list[str] = []
        for doc in iter_curated(recipe, s.name):
            batch.append(doc["text"])
            if len(batch) == 256:
                lens.extend(len(x) for x in encode_plain(tok, batch))
                batch = []
        if batch:
            lens.extend(len(x) for x in encode_plain(tok, batch))
        out[s.name] = lens
    return out


def tokenizer_report(tok: Any, path: Path, counts: dict[str, dict[str, int]],
                     tokens: dict[str, list[int]]) -> dict[str, Any]:
    per_source = {}
    for name, c in counts.items():
        t = sum(tokens[name])
        per_source[name] = {"docs": c["docs"], "bytes": c["bytes"], "chars": c["chars"],
                            "tokens": t, "bytes_per_token": round(c["bytes"] / t, 3) if t else None}
    total_b = sum(c["bytes"] for c in counts.values())
    total_t = sum(sum(v) for v in tokens.values())
    return {"path": str(path), "vocab_size": tok.get_vocab_size(),
            "bytes_per_token": round(total_b / total_t, 3) if total_t else None,
            "per_source": per_source}


def plan_mixture(recipe: Recipe, tokens: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Epochs per source so each gets its target share of the mixture's tokens.

    A source that would need more than ``max_epochs`` passes is capped there (``capped``)
    and the tokens it cannot supply are shared among the others in proportion to their
    targets, so the mixture keeps its size and the uncapped sources their relative shares."""
    have = {n: sum(v) for n, v in tokens.items()}
    shares = target_shares(recipe, {n: {"tokens": t} for n, t in have.items()}, "tokens")
    total = recipe.mixture.total_tokens or sum(have.values())
    cap = recipe.mixture.max_epochs
    fixed: dict[str, float] = {n: 0.0 for n, t in have.items() if not t}
    while True:
        free = [n for n in have if n not in fixed]
        budget = total - sum(fixed[n] * have[n] for n in fixed)
        weight = sum(shares[n] for n in free) or 1.0
        over = [n for n in free if shares[n] / weight * budget > cap * have[n]]
        if not over:
            break
        for n in over:
            fixed[n] = cap
    plan = {}
    for name, t in have.items():
        epochs = fixed[name] if name in fixed else shares[name] / weight * budget / t
        plan[name] = {"tokens": t, "target_share": round(shares[name], 6),
                      "target_tokens": int(shares[name] * total), "epochs": round(epochs, 4),
                      "capped": name in fixed and t > 0}
    return plan


def extra_copies(ids: list[str], toks: list[int], fraction: float, seed: int) -> set[str]:
    """The documents that get one more pass for the fractional part of the epochs: taken in
    a stable hash order until their tokens reach ``fraction`` of the source's (so a source
    of a few huge documents still lands near its target, unlike a coin flip per document)."""
    if fraction <= 0:
        return set()
    goal = fraction * sum(toks)
    chosen, got = set(), 0
    for i in sorted(range(len(ids)), key=lambda i: holdout_score(f"mix:{ids[i]}", seed)):
        if got >= goal:
            break
        chosen.add(ids[i])
        got += toks[i]
    return chosen


def write_mixture(recipe: Recipe, plan: dict[str, dict[str, Any]],
                  tokens: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Write train.jsonl / val.jsonl; returns per source split counts (docs, chars, tokens)."""
    out = Path(recipe.output)
    staged = []
    for s in recipe.sources:
        ids = [d["id"] for d in iter_curated(recipe, s.name)]
        held = choose_holdout(ids, recipe.mixture.holdout_fraction, recipe.seed)
        epochs = plan[s.name]["epochs"]
        train = [(i, t) for i, t in zip(ids, tokens[s.name], strict=True) if i not in held]
        extra = extra_copies([i for i, _ in train], [t for _, t in train],
                             epochs - math.floor(epochs), recipe.seed)
        reps = [0 if i in held else math.floor(epochs) + (i in extra) for i in ids]
        staged.append((s.name, held, reps))
    entries = _interleave(recipe, out, staged, tokens)
    for e in entries:
        p = plan[e["name"]]
        e["mixture"] = {**p, "realized_tokens": e["tokens"]["train"]}
    total = sum(e["tokens"]["train"] for e in entries) or 1
    for e in entries:
        e["mixture"]["realized_share"] = round(e["tokens"]["train"] / total, 6)
    return entries


def _interleave(recipe: Recipe, out: Path, staged: list[tuple[str, set[str], list[int]]],
                tokens: dict[str, list[int]]) -> list[dict[str, Any]]:
    rng = random.Random(recipe.seed)
    streams = [_expand(recipe, name, held, reps, tokens[name]) for name, held, reps in staged]
    remaining = [sum(reps) + len(held) for _, held, reps in staged]
    counts = [{k: dict.fromkeys(SPLITS, 0) for k in ("docs", "chars", "tokens")} for _ in staged]
    writers = {sp: open(out / f".{sp}.jsonl.tmp", "w", encoding="utf-8") for sp in SPLITS}
    try:
        while any(remaining):
            i = rng.choices(range(len(staged)), weights=remaining)[0]
            remaining[i] -= 1
            split, line, n_chars, n_tok = next(streams[i])
            writers[split].write(line)
            c = counts[i]
            c["docs"][split] += 1
            c["chars"][split] += n_chars
            c["tokens"][split] += n_tok
    finally:
        for fh in writers.values():
            fh.close()
    for sp in SPLITS:
        os.replace(out / f".{sp}.jsonl.tmp", out / f"{sp}.jsonl")
    return [{"name": name, **c} for (name, _, _), c in zip(staged, counts, strict=True)]


def _expand(recipe: Recipe, name: str, held: set[str], reps: list[int], toks: list[int]
            ) -> Iterator[tuple[str, str, int, int]]:
    """(split, json line, chars, tokens) for each copy: epoch by epoch over the source."""
    for epoch in range(max(reps, default=0) or (1 if held else 0)):
        for doc, r, t in zip(iter_curated(recipe, name), reps, toks, strict=True):
            if doc["id"] in held:
                if epoch == 0:
                    yield "val", json.dumps(doc, ensure_ascii=False) + "\n", len(doc["text"]), t
                continue
            if r > epoch:
                if epoch:
                    doc["epoch"] = epoch
                yield "train", json.dumps(doc, ensure_ascii=False) + "\n", len(doc["text"]), t


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
