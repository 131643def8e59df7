"""`mmfm demo`: the whole text job end to end on the embedded default config.

corpus (text shipped in packages) -> BPE tokenizer -> WebDataset token shards -> train the tiny
MoE model -> evaluate on held-out text; then the multimodal job (real images and speech from
packages -> interleaved shards -> the tiny MoMa model). Finished stages are skipped when run
again.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmfm.config import load_config
from mmfm.errors import UserValueError


def _stage(name: str, done_marker: Path, argv: list[str]) -> None:
    from mmfm.cli import main

    if done_marker.exists():
        print(f"[demo] {name}: already done ({done_marker})")
        return
    started = time.perf_counter()
    print(f"[demo] {name}: mmfm {' '.join(argv)}", flush=True)
    if main(argv) != 0:
        raise UserValueError(f"demo stage {name!r} failed (see the error above)")
    print(f"[demo] {name}: {time.perf_counter() - started:.0f}s", flush=True)


def run_demo(out_dir: str = "runs/demo", steps: int | None = None) -> int:
    """Run every stage into `out_dir`; print where the checkpoint, metrics and config are."""
    from mmfm.train import Trainer

    out = Path(out_dir)
    data = out / "data"
    corpus, tokenizer, shards = data / "corpus", data / "tokenizer.json", data / "shards"
    _stage("corpus", corpus / "manifest.json",
           ["data", "corpus", "--out", str(corpus), "--cache", str(out / "cache")])
    _stage("tokenizer", tokenizer,
           ["data", "tokenizer", "--corpus", str(corpus), "--out", str(tokenizer)])
    _stage("shards", shards / "val" / "index.json",
           ["data", "shards", "--corpus", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(shards)])
    overrides = [f"run.out_dir={out}", "run.name=moe_tiny",
                 f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
                 f"data.tokenizer={tokenizer}"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                      f"train.eval_every={max(1, steps // 3)}", f"train.ckpt_every={max(1, steps // 3)}"]
    cfg = load_config(None, overrides)
    print(f"[demo] train: {cfg.train.steps} steps of the embedded default MoE model "
          f"({cfg.model.moe.num_experts} experts, top-{cfg.model.moe.top_k}, {cfg.train.precision})")
    started = time.perf_counter()
    result = Trainer(cfg).fit()
    losses = result.train_losses
    first = sum(list(losses.values())[:10]) / min(10, len(losses))
    last = sum(list(losses.values())[-10:]) / min(10, len(losses))
    print(f"[demo] train: {time.perf_counter() - started:.0f}s; "
          f"train loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10 steps)")
    print(f"[demo] held-out validation loss: {result.val_loss:.4f}")
    print(f"[demo] checkpoint:      {result.checkpoint}")
    print(f"[demo] metrics:         {result.run_dir / 'metrics.jsonl'}")
    print(f"[demo] resolved config: {result.run_dir / 'config.yaml'}")
    print(f"[demo] data manifest:   {corpus / 'manifest.json'}")
    from mmfm.train.multimodal import run_multimodal_demo  # the interleaved job, after text

    return run_multimodal_demo(str(out), str(tokenizer), steps)
