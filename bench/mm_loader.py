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
  the real media in the shards (inference mode, batch of 16 items);
* accelerator rate: images and audio seconds per second one loader worker delivers, against
  what one H100 step of the preset consumes (decoder FLOPs per token at 40% MFU of 989
  TFLOP/s, times the images and audio seconds per token of the measured mix), hence the
  workers needed per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str, shards: Path, tokenizer: Path, extra: list[str] = ()):
    from mmfm.config import load_config

    overrides = [f"data.tokenizer={tokenizer}", "metrics.console=false", *extra]
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
    rows = tokens = media = images = 0
    audio_s = 0.0
    for _ in range(batches):
        batch = next(loader)
        rows += batch.input_ids.shape[0]
        tokens += batch.input_ids.numel()
        media += sum(len(m) for m in batch.media.values())
        images += len(batch.media.get("image", ()))
        audio_s += _audio_seconds(cfg, batch)
    elapsed = time.perf_counter() - started
    docs = _docs(loader) - docs0
    loader.close()
    return {"workers": workers, "docs_per_s": docs / elapsed, "rows_per_s": rows / elapsed,
            "tokens_per_s": tokens / elapsed, "media_items_per_s": media / elapsed,
            "images_per_s": images / elapsed, "audio_seconds_per_s": audio_s / elapsed,
            "images_per_token": images / tokens, "audio_seconds_per_token": audio_s / tokens}


def _audio_seconds(cfg, batch) -> float:
    """Seconds of audio in a batch, from its log-mel frame counts (1 + samples // hop)."""
    audio = batch.media.get("audio")
    if audio is None or not len(audio):
        return 0.0
    enc = cfg.multimodal.audio
    return float((audio.lengths - 1).clamp(min=0).sum()) * enc.hop_length / enc.sample_rate


H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (as bench/parallel_mfu.py)
MFU = 0.40


def accelerator_demand(cfg, loader: dict[str, float]) -> dict[str, float]:
    """What one H100 at 40% MFU consumes training this preset's decoder: tokens/s from
    `flops_per_token` (decoder only: encoder FLOPs would only lower the rate), and the images
    and audio seconds per second those tokens carry in the measured data mix; then the loader
    workers needed at the measured per-worker rate."""
    from mmfm.model.counting import flops_per_token

    tokens_per_s = MFU * H100_BF16_PEAK / flops_per_token(cfg.model, cfg.data.seq_len)
    need_images = tokens_per_s * loader["images_per_token"]
    need_audio = tokens_per_s * loader["audio_seconds_per_token"]
    per_worker_images = loader["images_per_s"] / max(1, loader["workers"])
    per_worker_audio = loader["audio_seconds_per_s"] / max(1, loader["workers"])
    workers = max(need_images / per_worker_images if per_worker_images else 0.0,
                  need_audio / per_worker_audio if per_worker_audio else 0.0)
    return {"flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
            "h100_tokens_per_s": tokens_per_s, "h100_images_per_s": need_images,
            "h100_audio_seconds_per_s": need_audio,
            "per_worker_images_per_s": per_worker_images,
            "per_worker_audio_seconds_per_s": per_worker_audio,
            "workers_needed": math.ceil(workers)}


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
    p.add_argument("--skip-step", action="store_true",
                   help="measure only the loader and the H100 demand (no CPU training step)")
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
        entry["h100_demand"] = accelerator_demand(cfg, entry["loader"][1])  # 1 worker
        if not args.skip_step:
            entry["train_step"] = train_step_rate(cfg, args.steps)
            entry["encoders"] = encoder_times(cfg, args.shards)
        results["presets"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
