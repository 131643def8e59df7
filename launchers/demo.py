"""`make demo`: the platform's jobs end to end on real data from packages, on CPU.

    python launchers/demo.py [--out runs/demo] [--steps N] [--skip-multimodal]

1. text: corpus (text shipped in packages) -> BPE tokenizer -> WebDataset token shards -> the
   tiny MoE preset and its dense twin (equal active parameters) trained on the same tokens;
2. interleaved multimodal: real images and speech from packages -> shard sets -> the tiny MoMa
   preset, with held-out loss per target group.

Finished data stages are skipped when run again; training runs start fresh each time (their
run folders are replaced). This script is orchestration only: it lives outside the installed
package and calls the library, as a user's own script would.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_PRESET = ROOT / "configs" / "text_moe_tiny.yaml"
MM_PRESET = ROOT / "configs" / "mm_moe_tiny.yaml"
MM_RECIPE = ROOT / "configs" / "data" / "mm_demo.yaml"
# Steps of each text run (the MoE and its twin): `make demo` must end within 10 minutes on a
# 2-core CPU without native bf16 (2-vCPU AMD EPYC: ~1 s per step of either model, fp32).
TEXT_STEPS = 170
MM_STEPS = 60  # ~65 s on the same machine; the loss falls from ~8 to ~5
ANALYZE_TOKENS = 16384  # held-out tokens routed through each checkpoint for the report
ROUTING_TRACE_EVERY = 25  # steps between routing samples taken while training
GROUP_LABELS = {"text": "plain text", "image": "captions (after an image)",
                "audio": "transcripts (after audio)"}


def log(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def build_text_data(out: Path) -> tuple[Path, Path]:
    """(tokenizer, shards folder): corpus -> tokenizer -> shards, each skipped when done."""
    from mmfm.data.corpus import build_default_corpus
    from mmfm.data.readers import read_jsonl
    from mmfm.data.shards import write_token_shards
    from mmfm.data.tokenizer import load_tokenizer, train_tokenizer

    data = out / "data"
    corpus, tokenizer, shards = data / "corpus", data / "tokenizer.json", data / "shards"
    if not (corpus / "manifest.json").is_file():
        started = time.perf_counter()
        manifest = build_default_corpus(corpus, out / "cache")
        names = ", ".join(f"{s['name']} ({s['docs']['train']})" for s in manifest["sources"])
        log(f"corpus: {names} documents in {time.perf_counter() - started:.0f}s -> {corpus}")
    if not tokenizer.is_file():
        started = time.perf_counter()
        tok = train_tokenizer((d["text"] for d in read_jsonl(corpus / "train.jsonl")),
                              vocab_size=8192, out_path=tokenizer)
        log(f"tokenizer: {tok.get_vocab_size()} tokens in {time.perf_counter() - started:.0f}s")
    if not (shards / "val" / "index.json").is_file():
        tok = load_tokenizer(tokenizer)
        for split in ("train", "val"):
            index = write_token_shards(read_jsonl(corpus / f"{split}.jsonl"), tok, shards / split)
            log(f"shards {split}: {index['num_samples']} documents, {index['num_tokens']:,} tokens")
    return tokenizer, shards


def train(cfg, label: str):
    """Train one run from scratch (its old run folder is replaced) and print its summary."""
    from mmfm.train.trainer import Trainer

    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    started = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    losses = list(result.train_losses.values())
    k = min(10, len(losses))
    log(f"{label}: {cfg.train.steps} steps in {time.perf_counter() - started:.0f}s "
        f"({trainer.precision.name}); train loss {sum(losses[:k]) / k:.3f} (first {k}) -> "
        f"{sum(losses[-k:]) / k:.3f} (last {k}); held-out loss {result.val_loss:.4f}")
    return trainer, result


def text_job(out: Path, steps: int | None) -> list[Path]:
    """The MoE preset and its dense twin on the same tokens; returns their run folders."""
    from mmfm.config import load_config
    from mmfm.model.counting import dense_equivalent

    tokenizer, shards = build_text_data(out)
    overrides = [f"run.out_dir={out}", "run.name=moe_tiny",
                 f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
                 f"data.tokenizer={tokenizer}", f"metrics.routing_trace_every={ROUTING_TRACE_EVERY}",
                 *schedule_overrides(steps or TEXT_STEPS)]
    moe_cfg = load_config(TEXT_PRESET, overrides)
    dense_cfg = load_config(TEXT_PRESET, overrides)
    dense_cfg.model = dense_equivalent(dense_cfg.model)
    dense_cfg.run.name = "moe_tiny_dense_equiv"
    dense_cfg.validate()
    moe = moe_cfg.model.moe
    _, moe_result = train(moe_cfg, f"MoE ({moe.num_experts} experts, top-{moe.top_k})")
    _, dense_result = train(dense_cfg, "dense twin (equal active parameters)")
    for result in (moe_result, dense_result):
        log(f"run {result.run_dir}: checkpoint {result.checkpoint}, metrics "
            f"{result.run_dir / 'metrics.jsonl'}, config {result.run_dir / 'config.yaml'}")
    reports(moe_result.run_dir, dense_result.run_dir)
    return [moe_result.run_dir, dense_result.run_dir]


def reports(moe_run: Path, dense_run: Path) -> None:
    """The third job: routing records of held-out tokens through the MoE run's checkpoints,
    the routing report, and the MoE-vs-twin comparison; prints their paths and headlines."""
    import json

    from mmfm.report.capture import analyze_run
    from mmfm.report.compare import compare_report
    from mmfm.report.routing import routing_report
    from mmfm.report.summary import compare_headlines, routing_headlines

    started = time.perf_counter()
    analyze_run(moe_run, ["all"], tokens=ANALYZE_TOKENS)
    html, summary = routing_report(moe_run)
    log(f"routing report: {html} ({time.perf_counter() - started:.0f}s)")
    for line in routing_headlines(json.loads(summary.read_text())):
        log(f"  {line}")
    html, summary = compare_report([moe_run, dense_run])
    log(f"comparison report: {html}")
    for line in compare_headlines(json.loads(summary.read_text())):
        log(f"  {line}")


def schedule_overrides(steps: int) -> list[str]:
    """A `steps`-long schedule: three evaluations and checkpoints (all kept, so the routing
    report can follow the router across them)."""
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.eval_every={max(1, steps // 3)}", f"train.ckpt_every={max(1, steps // 3)}",
            "train.keep_checkpoints=4", f"train.log_every={max(1, min(10, steps // 2))}"]


def multimodal_job(out: Path, steps: int | None) -> Path:
    """Real media -> shard sets -> the tiny MoMa preset -> held-out loss per target group.
    Shard sets whose media could not be fetched are left out of the mixture (and said so)."""
    from mmfm.config import load_config
    from mmfm.data.mm_build import build_mm_shards, load_recipe

    shards = out / "mm" / "shards"
    if not (shards / "manifest.json").is_file():
        log(f"multimodal shards: {MM_RECIPE} -> {shards}")
        recipe = load_recipe(MM_RECIPE, [f"out={shards}", f"cache={out / 'cache' / 'media'}"])
        build_mm_shards(recipe, log=lambda line: log(line.strip()))
    overrides = [f"run.out_dir={out}", "run.name=mm_moe_tiny",
                 f"data.tokenizer={out / 'data' / 'tokenizer.json'}",
                 *schedule_overrides(steps or MM_STEPS)]
    for name in ("images", "speech", "spoken_stamps"):
        overrides += [f"multimodal.sources.{name}.train={shards / name / 'train'}",
                      f"multimodal.sources.{name}.val={shards / name / 'val'}"]
    cfg = load_config(MM_PRESET, overrides)
    keep_written_sets(cfg, shards)
    log(f"multimodal train: sources { {n: s.weight for n, s in cfg.multimodal.sources.items()} }, "
        f"routing {cfg.multimodal.moe_routing} {dict(cfg.multimodal.modality_experts)}")
    trainer, result = train(cfg, "multimodal MoMa")
    by_group = loss_by_group(trainer)
    log("held-out loss by target: " + ", ".join(f"{GROUP_LABELS[g]} {v:.3f}"
                                                for g, v in by_group.items()))
    return result.run_dir


def loss_by_group(trainer) -> dict[str, float]:
    """Held-out loss per target group (text / after an image / after audio), target-weighted."""
    import torch

    from mmfm.encoders.config import MODALITIES

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.task.eval_batches():
            metrics = trainer.task.loss(trainer.model, batch).metrics
            for name in MODALITIES:
                n = metrics.get(f"targets/{name}", 0.0)
                sums[name] = sums.get(name, 0.0) + metrics.get(f"loss/{name}", 0.0) * n
                counts[name] = counts.get(name, 0.0) + n
    return {name: sums[name] / counts[name] for name in sums if counts[name]}


def keep_written_sets(cfg, shards: Path) -> None:
    """Drop sources whose shards were not written (their media were unavailable)."""
    from mmfm.errors import UserValueError

    for name in list(cfg.multimodal.sources):
        if not (shards / name / "train" / "index.json").is_file():
            log(f"shard set {name} was not written (media unavailable): left out")
            del cfg.multimodal.sources[name]
        elif not (shards / name / "val" / "index.json").is_file():
            cfg.multimodal.sources[name].val = None
    if not cfg.multimodal.sources:
        raise UserValueError(f"no multimodal shard set could be written under {shards}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="data and runs")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--skip-multimodal", action="store_true")
    args = parser.parse_args(argv)
    from mmfm.errors import MmfmError

    started = time.perf_counter()
    try:
        text_job(args.out, args.steps)
        if not args.skip_multimodal:
            multimodal_job(args.out, args.steps)
    except MmfmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
