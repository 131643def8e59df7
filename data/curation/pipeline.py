"""`curate(recipe)`: run a recipe end to end, resuming whatever a previous run finished.

Three stages (see their modules):

1. :mod:`~mmfm.data.curation.process` -- per-shard read / normalize / filter / hash, as
   ``tasks`` independent tasks run by a datatrove executor: ``LocalPipelineExecutor`` (one
   process when ``workers: 1``, a process pool otherwise), ``SlurmPipelineExecutor`` or
   ``RayPipelineExecutor`` with the same task function;
2. :mod:`~mmfm.data.curation.dedup` -- exact + MinHash-LSH dedup across sources (one process,
   reads only hashes and signatures);
3. :mod:`~mmfm.data.curation.mixture` -- curated files, tokenizer, mixture, train/val corpus,
   then the report.

Restart: every task and stage writes its result under a temp name and renames it when done;
a rerun skips what exists. ``WORK/plan.json`` records the recipe fingerprint and task count:
if either changed, the old work directory no longer describes this recipe and is cleared.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, TypeVar

from mmfm.data.curation.dedup import run_dedup
from mmfm.data.curation.dedup_sharded import (
    DocTable,
    exact_removed,
    merge,
    run_bucket_task,
    run_cluster,
    run_exact_task,
)
from mmfm.data.curation.mixture import (
    count_tokens,
    get_tokenizer,
    plan_mixture,
    tokenizer_report,
    write_curated,
    write_mixture,
)
from mmfm.data.curation.process import run_process_task, task_done
from mmfm.data.curation.progress import TaskArrayProgress, print_summary, read_counts
from mmfm.data.curation.recipe import Recipe, recipe_from_dict
from mmfm.data.curation.report import build_report, merge_task_stats, write_report
from mmfm.errors import UserValueError

T = TypeVar("T")
DEFAULT_CACHE = Path.home() / ".cache" / "mmfm" / "packages"


class ProcessTask:
    """The stage-1 task as a datatrove pipeline step: ``(data, rank, world_size)``.

    Holds the recipe as a plain dict so it pickles to worker processes and cluster jobs."""

    def __init__(self, recipe: Recipe, cache_dir: Path):
        self.recipe_dict = recipe.to_dict()
        self.cache_dir = str(cache_dir)

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        from mmfm.data.corpus import PackageFetchError

        recipe = recipe_from_dict(self.recipe_dict, where="<task>")
        try:
            run_process_task(recipe, rank, world_size, Path(self.cache_dir))
        except PackageFetchError as e:  # a user-facing one-liner, like every data error
            raise UserValueError(f"{e} (mark the source `optional: true` to skip it)") from e


def prepare_work_dir(recipe: Recipe, fresh: bool = False) -> Path:
    """Create (or validate, or clear) the work directory; returns it."""
    work = recipe.work_path()
    plan = {"fingerprint": recipe.fingerprint(), "tasks": recipe.num_tasks()}
    plan_path = work / "plan.json"
    if work.exists() and (fresh or not plan_path.is_file()
                          or json.loads(plan_path.read_text()) != plan):
        if not fresh and plan_path.is_file():
            print(f"recipe or task count changed since the last run in {work}: starting over",
                  file=sys.stderr)
        shutil.rmtree(work)
        _clear_outputs(Path(recipe.output))
    work.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan))
    return work


def _clear_outputs(out: Path) -> None:
    shutil.rmtree(out / "curated", ignore_errors=True)
    for name in ("tokenizer.json", "manifest.json", "train.jsonl", "val.jsonl", "report.json",
                 "report.md", "report.html"):
        (out / name).unlink(missing_ok=True)


class ExactDedupTask:
    """Sharded dedup, exact step: task `rank` of `world_size` takes one hash partition."""

    def __init__(self, recipe: Recipe):
        # The validated dataclass itself: it pickles, and datatrove copies the pipeline per
        # task, where re-parsing the YAML dict through OmegaConf costs ~0.4 s a task.
        self.recipe = recipe

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        recipe = self.recipe
        run_exact_task(recipe, recipe.num_tasks(), rank, world_size)


class BucketDedupTask(ExactDedupTask):
    """Sharded dedup, bucket step: task `rank` takes one (band, hash range)."""

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        recipe = self.recipe
        run_bucket_task(recipe, recipe.num_tasks(), rank, recipe.dedup.hash_ranges,
                        recipe.dedup.exact_partitions)


def make_executor(recipe: Recipe, task: Any, logging_dir: Path, tasks: int | None = None,
                  step: str = "process") -> Any:
    """The datatrove executor the recipe asks for, running `task` as `tasks` tasks (default:
    the recipe's stage-1 task count, one per shard)."""
    ex = recipe.executor
    common = {"pipeline": [task], "tasks": tasks or recipe.num_tasks(),
              "logging_dir": str(logging_dir)}
    if ex.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: workers inherit the parent's imports instead of re-importing (2-3 s each).
        return LocalPipelineExecutor(**common, workers=ex.workers, start_method="fork")
    if ex.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        opts = {"time": "04:00:00", "partition": "cpu", "job_name": f"curate-{recipe.name}-{step}",
                "cpus_per_task": 1, "mem_per_cpu_gb": 4, **ex.slurm}
        return SlurmPipelineExecutor(**common, **opts)
    from datatrove.executor import RayPipelineExecutor  # needs `pip install ray`

    return RayPipelineExecutor(**common, **ex.ray)


def run_processing(recipe: Recipe, cache_dir: Path) -> list[dict[str, Any]] | None:
    """Run stage 1 on the recipe's executor; None when a cluster job was only submitted."""
    work = recipe.work_path()
    world = recipe.num_tasks()
    if not all(task_done(work, r) for r in range(world)):
        executor = make_executor(recipe, ProcessTask(recipe, cache_dir), work / "logs")
        (work / "logs").mkdir(parents=True, exist_ok=True)
        # Our stats file is the truth: a task whose outputs are gone runs again even where
        # datatrove's own completion marker survived.
        for r in range(world):
            if not task_done(work, r):
                (work / "logs" / "completions" / f"{r:05d}").unlink(missing_ok=True)
        progress = TaskArrayProgress(
            "stage 1 read/filter/sign", world,
            done=lambda: sum(task_done(work, r) for r in range(world)),
            docs=lambda: read_counts(work / "process" / f"{r:05d}.count" for r in range(world)))
        # datatrove logs each task's start, pipeline and stats to stderr: keep them in a file.
        with progress, executor_log(work / "logs" / "executor.log"):
            executor.run()
        if not all(task_done(work, r) for r in range(world)):
            if recipe.executor.kind == "local":
                missing = [r for r in range(world) if not task_done(work, r)]
                raise UserValueError(f"curation task(s) {missing} failed: {_last_error(work)} "
                                 f"(logs: {work / 'logs'})")
            return None
    return [json.loads((work / "process" / f"{r:05d}.stats.json").read_text())
            for r in range(world)]


def run_dedup_stage(recipe: Recipe) -> dict[str, Any] | None:
    """Stage 2: one process, or (``dedup.sharded``) exact and bucket task arrays on the
    executor, then clustering; None when a cluster job was only submitted."""
    if not recipe.dedup.sharded:
        return run_dedup(recipe, recipe.num_tasks())
    path = recipe.work_path() / "dedup.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.monotonic()
    d = recipe.dedup
    steps = [("exact", ExactDedupTask(recipe), d.exact_partitions, d.exact),
             ("buckets", BucketDedupTask(recipe), d.bands * d.hash_ranges, d.near)]
    _check_dedup_plan(recipe)
    DocTable(recipe, recipe.num_tasks()).offsets()  # once, before the tasks that read it
    seconds = {}
    for step, task, n, wanted in steps:
        t0 = time.monotonic()
        if wanted and not _run_tasks(recipe, step, task, n):
            return None
        if step == "exact":
            exact_removed(recipe, d.exact_partitions)  # once, before the bucket tasks
        seconds[f"{step}_seconds"] = round(time.monotonic() - t0, 3)
    t0 = time.monotonic()
    near = run_cluster(recipe, recipe.num_tasks(), d.bands * d.hash_ranges) if d.near else None
    result = merge(recipe, recipe.num_tasks(), d.exact_partitions, near)
    seconds["cluster_seconds"] = round(time.monotonic() - t0, 3)
    result.update(seconds=round(time.monotonic() - started, 3),
                  near_seconds=seconds["buckets_seconds"] + seconds["cluster_seconds"],
                  steps=seconds)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


@contextmanager
def executor_log(path: Path) -> Iterator[None]:
    """Send what datatrove writes to stderr (its loguru sink included) to `path`, and give
    the sink back to the terminal after. datatrove re-binds its sink to ``sys.stderr`` per
    in-process task; a process pool's driver keeps its own, so it is re-bound here too."""
    from datatrove.utils.logging import setup_default_logger

    try:
        with open(path, "a") as log, redirect_stderr(log):
            setup_default_logger()
            yield
    finally:
        setup_default_logger()


def _check_dedup_plan(recipe: Recipe) -> None:
    """The partitioning is not in the recipe fingerprint (it does not change the output), so
    partial results of another partitioning are cleared here instead."""
    folder = recipe.work_path() / "dedup"
    plan = {"exact_partitions": recipe.dedup.exact_partitions,
            "hash_ranges": recipe.dedup.hash_ranges}
    path = folder / "plan.json"
    if folder.exists() and (not path.is_file() or json.loads(path.read_text()) != plan):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))


def _run_tasks(recipe: Recipe, step: str, task: Any, n: int) -> bool:
    """Run a dedup task array of `n` tasks on the executor; True when all are done."""
    folder = recipe.work_path() / "dedup" / step
    suffix = ".json" if step == "exact" else ".npy"
    done = [folder / f"{r:05d}{suffix}" for r in range(n)]
    if all(p.is_file() for p in done):
        return True
    logs = recipe.work_path() / "logs" / f"dedup_{step}"
    logs.mkdir(parents=True, exist_ok=True)
    for r, p in enumerate(done):
        if not p.is_file():
            (logs / "completions" / f"{r:05d}").unlink(missing_ok=True)
    progress = TaskArrayProgress(f"dedup {step}", n, done=lambda: sum(p.is_file() for p in done))
    with progress, executor_log(logs / "executor.log"):
        make_executor(recipe, task, logs, tasks=n, step=f"dedup-{step}").run()
    if all(p.is_file() for p in done):
        return True
    if recipe.executor.kind == "local":
        raise UserValueError(f"dedup {step} task(s) failed (logs: {logs})")
    return False


def _last_error(work: Path) -> str:
    """The last exception line in the task logs, for a one-line failure message."""
    found = "see the logs"
    for log in sorted((work / "logs").rglob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            head = line.split(":", 1)[0].strip()
            if head.endswith(("Error", "Exception")) and " " not in head:
                found = line.strip()
    return found


def curate(recipe: Recipe, *, cache_dir: Path = DEFAULT_CACHE, fresh: bool = False
           ) -> dict[str, Any] | None:
    """Run `recipe`; returns the report (None if stage 1 was submitted to a cluster)."""
    out = Path(recipe.output)
    prepare_work_dir(recipe, fresh)
    done = out / "report.json"
    if done.is_file() and (out / "manifest.json").is_file():
        report = json.loads(done.read_text(encoding="utf-8"))
        if report.get("fingerprint") == recipe.fingerprint():
            report["resumed"] = "complete"
            return report
    timings: dict[str, Any] = {}
    t0 = time.monotonic()
    tasks = run_processing(recipe, cache_dir)
    if tasks is None:
        return None
    timings["process_wall_s"] = round(time.monotonic() - t0, 2)
    timings["filter_cpu_s"] = round(sum(t["filter_seconds"] for t in tasks), 2)
    timings["signature_cpu_s"] = round(sum(t["signature_seconds"] for t in tasks), 2)
    t0 = time.monotonic()
    dedup = run_dedup_stage(recipe)
    if dedup is None:
        return None
    timings["dedup_wall_s"] = round(time.monotonic() - t0, 2)
    print_summary("dedup", dedup["docs"], timings["dedup_wall_s"], _dedup_detail(dedup))
    t0 = time.monotonic()
    counts = _timed("curated files", lambda: write_curated(recipe, recipe.num_tasks(), dedup),
                    lambda c: sum(v["docs"] for v in c.values()))
    tok, tok_path = _timed("tokenizer", lambda: get_tokenizer(recipe, counts))
    tokens = _timed("token counts", lambda: count_tokens(recipe, tok, counts),
                    lambda t: sum(len(v) for v in t.values()))
    tok_rep = tokenizer_report(tok, tok_path, counts, tokens)
    plan = plan_mixture(recipe, tokens)
    entries = _timed("mixture", lambda: write_mixture(recipe, plan, tokens),
                     lambda e: sum(x["docs"]["train"] + x["docs"]["val"] for x in e))
    timings["mixture_tokenizer_wall_s"] = round(time.monotonic() - t0, 2)
    sources = merge_task_stats(recipe, tasks)
    report = build_report(recipe, sources, dedup, tok_rep, entries, timings, counts)
    _write_manifest(recipe, out, sources, entries, report)
    write_report(report, out, recipe.report.html)
    return report


def _timed(stage: str, fn: Callable[[], T], docs: Callable[[T], int] | None = None) -> T:
    """Run one stage-3 step and print its summary line."""
    t0 = time.monotonic()
    out = fn()
    print_summary(stage, docs(out) if docs else None, time.monotonic() - t0)
    return out


def _dedup_detail(dedup: dict[str, Any]) -> str:
    kinds = Counter(r[2] for r in dedup["removed"])
    return (f"removed {kinds['exact_duplicate']:,} exact + {kinds['near_duplicate']:,} near "
            f"duplicates")


def _write_manifest(recipe: Recipe, out: Path, sources: dict[str, Any],
                    entries: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """manifest.json in the corpus format, so `mmfm data shards --corpus OUT` reads it."""
    by_name = {s.name: s for s in recipe.sources}
    manifest = {
        "format": "mmfm-corpus", "version": 1,
        "files": {"train": "train.jsonl", "val": "val.jsonl"},
        "holdout_fraction": recipe.mixture.holdout_fraction, "seed": recipe.seed,
        "sources": [{"name": e["name"], "kind": by_name[e["name"]].kind,
                     "license": by_name[e["name"]].license,
                     "origin": {"builtin": by_name[e["name"]].builtin,
                                "path": by_name[e["name"]].path},
                     "docs": e["docs"], "chars": e["chars"], "tokens": e["tokens"],
                     "mixture": e["mixture"], "read_stats": sources[e["name"]]["read"]}
                    for e in entries],
        "skipped_sources": [{"source": n, "reason": "; ".join(s["notes"])}
                            for n, s in sources.items() if s["notes"]],
        "totals": {sp: {k: sum(e[k][sp] for e in entries) for k in ("docs", "chars", "tokens")}
                   for sp in ("train", "val")},
        "curation": {"recipe": recipe.name, "fingerprint": report["fingerprint"],
                     "report": "report.json", "tokenizer": report["tokenizer"]["path"]},
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
