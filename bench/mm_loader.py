"""Benchmark: multimodal loader throughput vs the training step's consumption, and encoder
forward time per image / per second of audio.

    python bench/mm_loader.py [--shards runs/demo/mm/shards] [--tokenizer runs/demo/data/tokenizer.json]
                              [--presets tiny small] [--batches 20] [--out bench/results/mm_loader.json]

Needs the demo's shard sets (`mmfm data shards --multimodal configs/data/mm_demo.yaml`) and
tokenizer. For each preset (configs/mm_moe_{tiny,small}.yaml):

* loader: documents/s, rows/s and tokens/s (text + media placeholders) with 0, 1, 2 DataLoader
  workers, after the first batch (workers started, buffers filled);
* training step: forward + backward + AdamW of the preset's model on batches already loaded,
  giving the rows/s the step consumes; the loader keeps up when its rows/s exceed that;
* encoders: forward time of each configured encoder per image and per second of audio, on
  the real media in the shards (inference mode, batch of 16 items).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str, shards: Path, tokenizer: Path):
    from mmfm.config import load_config

    overrides = [f"data.tokenizer={tokenizer}", "metrics.console=false"]
    for s in ("images", "speech", "spoken_stamps"):
        overrides += [f"multimodal.sources.{s}.train={shards / s / 'train'}",
                      f"multimodal.sources.{s}.val={shards / s / 'val'}"]
    return load_config(ROOT / "configs" / f"mm_moe_{name}.yaml", overrides)


def loader_rate(cfg, workers: int, batches: int) -> dict[str, float]:
    """Documents, rows and tokens per second of the training loader with `workers`."""
    from mmfm.train.multimodal import MultimodalTask

    cfg.data.num_workers = workers
    loader = MultimodalTask(cfg).train_loader()
    next(loader)  # start workers, fill shuffle buffers
    docs0 = _docs(loader)
    started = time.perf_counter()
    rows = tokens = media = 0
    for _ in range(batches):
        batch = next(loader)
        rows += batch.input_ids.shape[0]
        tokens += batch.input_ids.numel()
        media += sum(len(m) for m in batch.media.values())
    elapsed = time.perf_counter() - started
    docs = _docs(loader) - docs0
    loader.close()
    return {"workers": workers, "docs_per_s": docs / elapsed, "rows_per_s": rows / elapsed,
            "tokens_per_s": tokens / elapsed, "media_items_per_s": media / elapsed}


def _docs(loader) -> int:
    """Documents drawn so far (mixture draws, summed over workers)."""
    return sum((s or {}).get("mix_draws", 0) for s in loader.state_dict()["worker_states"])


def train_step_rate(cfg, steps: int) -> dict[str, float]:
    """Rows/s and tokens/s one training step consumes (loading excluded)."""
    from mmfm.device import autocast_context, resolve_precision
    from mmfm.train.multimodal import MultimodalTask
    from mmfm.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg.data.num_workers = 0
    task = MultimodalTask(cfg)
    model = task.build_model().train()
    optimizer = build_optimizer(model, cfg.train)
    loader = task.train_loader()
    batches = [next(loader) for _ in range(steps + 2)]
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    times = []
    for batch in batches:
        started = time.perf_counter()
        with autocast_context(precision, "cpu"):
            out = task.loss(model, batch)
        (out.lm_loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    step = sum(times[2:]) / steps  # the first two warm up
    rows = cfg.train.micro_batch_size
    return {"step_s": step, "rows_per_s": rows / step, "tokens_per_s": rows * cfg.data.seq_len / step,
            "params": sum(p.numel() for p in model.parameters())}


@torch.inference_mode()
def encoder_times(cfg, shards: Path, items: int = 16, repeats: int = 3) -> dict[str, dict]:
    """Forward seconds per image and per second of audio for each configured encoder."""
    from mmfm.data.mm_loader import ShardSet
    from mmfm.data.mm_shards import decode_document, iter_raw_samples
    from mmfm.encoders.registry import default_registry

    raws = {"image": [], "audio": []}
    for name in ("images", "speech"):
        src = ShardSet.open(name, shards / name / "train")
        for shard in src.shards:
            for raw in iter_raw_samples(src.dir / shard):
                for kind, value in decode_document(raw)[0]:
                    if kind in raws and len(raws[kind]) < items:
                        raws[kind].append(value)
    out = {}
    for modality, enc_cfg in cfg.multimodal.encoders().items():
        enc = default_registry().build(enc_cfg.kind, cfg=enc_cfg).eval()
        data, lengths = enc.preprocessor.collate([enc.preprocess(r) for r in raws[modality]])
        enc(data, lengths)  # warm up
        started = time.perf_counter()
        for _ in range(repeats):
            enc(data, lengths)
        per_batch = (time.perf_counter() - started) / repeats
        n = len(raws[modality])
        if modality == "audio":
            seconds = sum(min(r.seconds, enc_cfg.max_seconds) for r in raws[modality])
            out[modality] = {"encoder": enc_cfg.kind, "clips": n, "audio_seconds": seconds,
                             "ms_per_audio_second": 1000 * per_batch / seconds}
        else:
            out[modality] = {"encoder": enc_cfg.kind, "images": n,
                             "ms_per_image": 1000 * per_batch / n}
        out[modality]["tokens_per_item"] = float(enc.output_lengths(lengths).float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=Path("runs/demo/mm/shards"))
    p.add_argument("--tokenizer", type=Path, default=Path("runs/demo/data/tokenizer.json"))
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/mm_loader.json"))
    args = p.parse_args()
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__,
                           "load_average_at_start": os.getloadavg()},  # shared machines
               "presets": {}}
    for name in args.presets:
        cfg = preset(name, args.shards, args.tokenizer)
        entry = {"seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
                 "precision": cfg.train.precision}
        entry["loader"] = [loader_rate(cfg, w, args.batches) for w in (0, 1, 2)]
        entry["train_step"] = train_step_rate(cfg, args.steps)
        entry["encoders"] = encoder_times(cfg, args.shards)
        results["presets"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
