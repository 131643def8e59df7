"""The scaled-out dedup (exact partitions, band x hash-range bucket tasks, connected
components) gives the single-process path's clusters, removed list and report numbers,
on real text with planted exact and near duplicates, whatever the partitioning."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from test_curate_pipeline import _recipe_dict, _write_recipe, corpus  # noqa: F401

from mmfm.data.curation.dedup import run_dedup
from mmfm.data.curation.dedup_sharded import (
    bucket_edges,
    merge,
    run_bucket_task,
    run_cluster,
    run_exact_task,
)
from mmfm.data.curation.minhash import MinHasher, exact_hash, jaccard
from mmfm.data.curation.pipeline import curate
from mmfm.data.curation.process import _TaskWriter
from mmfm.data.curation.recipe import load_recipe, recipe_from_dict

COPYRIGHT = sorted(p for p in Path("/usr/share/doc").glob("*/copyright")
                   if p.is_file() and not p.is_symlink())[:160]
TIMING_KEYS = ("seconds", "near_seconds", "steps")


def mutate(text: str, rng: random.Random, frac: float) -> str:
    """Replace a fraction of the words by a marker: a near duplicate of known closeness."""
    words = text.split()
    for i in rng.sample(range(len(words)), int(frac * len(words))):
        words[i] = f"zz{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted() -> list[dict]:
    if len(COPYRIGHT) < 100:
        pytest.skip("this machine has few /usr/share/doc/*/copyright files")
    rng = random.Random(0)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in COPYRIGHT]
    unique = {exact_hash(t): t for t in texts if len(t.split()) > 80}  # planted: the only
    texts = sorted(unique.values())                                    # exact duplicates
    docs = [{"source": "a" if i % 2 else "b", "id": f"d{i}", "text": t}
            for i, t in enumerate(texts)]
    for i, t in enumerate(texts[:30]):  # exact (case/space) and near copies, in both sources
        docs.append({"source": "b", "id": f"exact{i}", "text": t.upper() if i % 2 else
                     "  ".join(t.split())})
        docs.append({"source": "a", "id": f"near{i}", "text": mutate(t, rng, 0.01)})
        if i < 5:  # a chain: a copy of the copy
            docs.append({"source": "b", "id": f"near2_{i}", "text": mutate(t, rng, 0.01)})
    rng.shuffle(docs)
    return docs


def _recipe(work: Path, **dedup) -> object:
    raw = {"name": "t", "output": str(work / "out"), "work_dir": str(work),
           "sources": [{"name": n, "path": "x", "format": "jsonl"} for n in ("a", "b")],
           "chains": {"prose": ["normalize"]}, "dedup": {"priority": ["b", "a"], **dedup}}
    return recipe_from_dict(raw, check_paths=False)


def _stage1(recipe, docs: list[dict], world: int) -> None:
    d = recipe.dedup
    out = recipe.work_path() / "process"
    out.mkdir(parents=True)
    for rank in range(world):
        writer = _TaskWriter(out, rank, MinHasher(d.bands * d.rows, d.seed, d.ngram))
        for doc in docs[rank::world]:
            writer.write(doc)
        writer.close()
        writer.commit()


def _sharded(recipe, world: int) -> dict:
    d = recipe.dedup
    for p in range(d.exact_partitions):
        run_exact_task(recipe, world, p, d.exact_partitions)
    for b in range(d.bands * d.hash_ranges):
        run_bucket_task(recipe, world, b, d.hash_ranges, d.exact_partitions)
    return merge(recipe, world, d.exact_partitions,
                 run_cluster(recipe, world, d.bands * d.hash_ranges))


def _without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("world,parts,ranges", [(1, 1, 1), (3, 4, 1), (3, 5, 3)])
def test_sharded_equals_single_process(planted, tmp_path, world, parts, ranges):
    single = run_dedup(_stage1_recipe(tmp_path / "one", planted, world), world)
    recipe = _stage1_recipe(tmp_path / "many", planted, world, exact_partitions=parts,
                            hash_ranges=ranges)
    sharded = _sharded(recipe, world)
    assert json.dumps(_without_timings(sharded)) == json.dumps(_without_timings(single))
    # the planted duplicates are what was found
    reason = {r[4].split("/")[1]: r[2] for r in single["removed"]}
    for i in range(30):  # one of each planted exact pair goes, the preferred source stays
        pair = [reason.get(f"d{i}"), reason.get(f"exact{i}")]
        assert pair.count("exact_duplicate") == 1, (i, pair)
        loser = f"exact{i}" if i % 2 == 0 else f"d{i}"  # d{i} in source b wins the tie
        assert reason[loser] == "exact_duplicate", i
    assert sum(single["near_cluster_sizes"].values()) >= 25
    assert single["exact_cluster_sizes"].get("2", 0) >= 25


def _stage1_recipe(work: Path, docs: list[dict], world: int, **dedup):
    recipe = _recipe(work, **dedup)
    _stage1(recipe, docs, world)
    return recipe


def test_planted_near_copies_are_close_and_removed(planted, tmp_path):
    by_id = {d["id"]: d["text"] for d in planted}
    near = [i for i in range(30) if f"near{i}" in by_id]
    original = {i: next(d["text"] for d in planted if d["id"] == f"d{i}") for i in near}
    assert min(jaccard(original[i], by_id[f"near{i}"]) for i in near) > 0.85
    recipe = _stage1_recipe(tmp_path, planted, 2, exact_partitions=3, hash_ranges=2)
    removed = {r[4].split("/")[1]: r for r in _sharded(recipe, 2)["removed"]}
    for i in near:  # near{i} (source a) loses to d{i} or exact{i} when those are in source b
        pair = {f"near{i}", f"d{i}"}
        assert pair & set(removed), i


def test_bucket_edges_join_each_bucket_to_its_smallest_member():
    keys = np.array([7, 3, 7, 9, 3, 7], dtype=np.uint64)
    gids = np.array([10, 4, 2, 5, 8, 6], dtype=np.int64)
    edges = bucket_edges(keys, gids)
    assert sorted(map(tuple, edges.tolist())) == [(2, 6), (2, 10), (4, 8)]
    assert bucket_edges(np.empty(0, np.uint64), np.empty(0, np.int64)).shape == (0, 2)


def test_bad_partition_counts_are_one_line_errors(tmp_path):
    from mmfm.data.curation.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"dedup\.hash_ranges: 0 must be > 0"):
        _recipe(tmp_path, hash_ranges=0)
    with pytest.raises(RecipeError, match=r"dedup\.exact_partitions: -1 must be > 0"):
        _recipe(tmp_path, exact_partitions=-1)



def test_curate_sharded_output_is_byte_identical(corpus, tmp_path, capsys):  # noqa: F811
    """End to end through the executor (a process pool of 2): the curated corpus is the
    same bytes as with the single-process dedup; each stage prints its summary line."""
    outs = []
    for name, extra in (("one", {}), ("sharded", {"sharded": True, "exact_partitions": 3,
                                                  "hash_ranges": 2})):
        d = _recipe_dict(corpus, tmp_path / name / "out")
        d["dedup"].update(extra)
        d["executor"] = {"workers": 2 if extra else 1, "tasks": 2}
        (tmp_path / name).mkdir()
        curate(load_recipe(_write_recipe(tmp_path / name, d)), cache_dir=tmp_path / "cache")
        outs.append(tmp_path / name / "out")
        err = capsys.readouterr().err
        for stage in ("stage 1 read/filter/sign", "dedup", "curated files", "tokenizer",
                      "token counts", "mixture") + (("dedup exact", "dedup buckets")
                                                    if extra else ()):
            assert re.search(rf"^{stage}: ", err, re.M), (stage, err)
    files = ["train.jsonl", "val.jsonl", *sorted(p.relative_to(outs[0]).as_posix()
                                                 for p in (outs[0] / "curated").glob("*"))]
    assert len(files) > 3
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    one, many = (json.loads((o / ".work" / "dedup.json").read_text()) for o in outs)
    assert _without_timings(one) == _without_timings(many)
    assert sum(one["exact_cluster_sizes"].values()) >= 1
    assert "steps" in many and "steps" not in one  # the sharded path did run


def test_a_new_partitioning_clears_partial_results(planted, tmp_path):
    from mmfm.data.curation.pipeline import run_dedup_stage

    single = run_dedup(_stage1_recipe(tmp_path / "one", planted, 2), 2)
    recipe = _stage1_recipe(tmp_path / "many", planted, 2, sharded=True, exact_partitions=2)
    for p in range(2):  # a run that stopped after its exact step
        run_exact_task(recipe, 2, p, 2)
    (tmp_path / "many" / "dedup" / "plan.json").write_text(
        json.dumps({"exact_partitions": 2, "hash_ranges": 1}))
    again = _recipe(tmp_path / "many", sharded=True, exact_partitions=3, hash_ranges=2)
    again.executor.tasks = 2
    result = run_dedup_stage(again)
    assert _without_timings(result) == _without_timings(single)
    assert sorted(p.name for p in (tmp_path / "many" / "dedup" / "exact").glob("*.json")) == \
        ["00000.json", "00001.json", "00002.json"]
