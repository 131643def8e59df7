"""Benchmark: training step time with frozen encoders, running the towers every step vs
reading their outputs from the feature cache (`mmfm data encode`).

    python bench/mm_feature_cache.py [--shards runs/demo/mm/shards]
        [--tokenizer runs/demo/data/tokenizer.json] [--presets tiny small] [--reps 5]
        [--out bench/results/mm_feature_cache.json]

For each preset (configs/mm_moe_{tiny,small}.yaml with both encoders frozen, fp32): writes
the caches beside the shards (`encode_config`), then times forward + backward + AdamW of the
same model on the same batches (the loaders yield the same documents; one set carries pixels
and log-mels, the other cached tower outputs), steps interleaved and the best of `--reps`
kept (bench/timing.py). Batches are loaded before timing, so only the step is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from mm_loader import preset
from timing import interleaved_best

FROZEN = ["multimodal.image.train_mode=frozen", "multimodal.audio.train_mode=frozen",
          "train.precision=fp32", "data.num_workers=0"]


def _stepper(cfg, batches):
    """A closure running one training step on the next of `batches` (cycling)."""
    from mmfm.train.multimodal import MultimodalTask
    from mmfm.train.optim import build_optimizer

    torch.manual_seed(cfg.run.seed)
    task = MultimodalTask(cfg)
    model = task.build_model().train()
    optimizer = build_optimizer(model, cfg.train)
    position = [0]

    def step() -> None:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        out = task.loss(model, batch)
        (out.lm_loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _batches(cfg, n: int):
    from mmfm.train.multimodal import MultimodalTask

    torch.manual_seed(cfg.run.seed)
    task = MultimodalTask(cfg)
    task.build_model()
    loader = task.train_loader()
    return [next(loader) for _ in range(n)]


def measure(name: str, shards: Path, tokenizer: Path, reps: int, n_batches: int,
            encode: bool = True) -> dict:
    from mmfm.data.mm_features import encode_config

    cfg = preset(name, shards, tokenizer, FROZEN)
    started = time.perf_counter()
    rows = encode_config(cfg) if encode else []
    encode_s = time.perf_counter() - started
    online_cfg = preset(name, shards, tokenizer, FROZEN + ["multimodal.feature_cache=false"])
    cached_b, online_b = _batches(cfg, n_batches), _batches(online_cfg, n_batches)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(cached_b, online_b, strict=True))
    assert all(m.fingerprint for b in cached_b for m in b.media.values())
    online, cached = interleaved_best([_stepper(online_cfg, online_b), _stepper(cfg, cached_b)],
                                      reps)
    items = {m: sum(len(b.media[m]) for b in online_b) / n_batches for m in ("image", "audio")}
    return {"seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
            "media_items_per_batch": items, "encode_s": encode_s,
            "encoded_items": sum(r["items"] for r in rows),
            "step_s_towers": online, "step_s_cached": cached, "speedup": online / cached}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=Path("runs/demo/mm/shards"))
    p.add_argument("--tokenizer", type=Path, default=Path("runs/demo/data/tokenizer.json"))
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--no-encode", action="store_true",
                   help="use the caches an earlier run wrote (refused if stale)")
    p.add_argument("--out", type=Path, default=Path("bench/results/mm_feature_cache.json"))
    args = p.parse_args()
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "load_average_at_start": os.getloadavg()},
               "command": "python bench/mm_feature_cache.py " + " ".join(
                   f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                   for k, v in vars(args).items()),
               "presets": {}}
    for name in args.presets:
        results["presets"][name] = measure(name, args.shards, args.tokenizer, args.reps,
                                           args.batches, encode=not args.no_encode)
        print(json.dumps({name: results["presets"][name]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
