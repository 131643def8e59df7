"""One-GPU readiness check: throughput, MFU, bf16-vs-fp32 tracking, expert backends, SDPA kernel.

    .venv/bin/python bench/gpu_check.py                 # on one H100/H200: < 8 minutes
    .venv/bin/python bench/gpu_check.py --device cpu    # tiny smoke run (tests/test_gpu_check.py)

Prints Markdown tables and exits 1 when a check fails:

1. Throughput: for configs/text_moe_small.yaml, text_dense_equiv_small.yaml and
   text_moe_1b.yaml, tokens/s, model TFLOP/s and MFU of a full training step (forward with the
   fused head+loss, backward, clipping, fused AdamW) in bf16, and peak memory. MFU divides by
   the device's dense bf16 peak from `PEAK_BF16_FLOPS` (datasheet numbers, no sparsity).
2. bf16 vs fp32: the small MoE preset trained for `--loss-steps` (50) steps from one
   initialisation on one fixed set of random-token batches, in both precisions (TF32 off). It
   passes when every step's loss agrees within `LOSS_RTOL` (3%) of the fp32 loss: bf16 keeps 8
   significant bits, so single steps agree to ~0.5%, and 50 steps of AdamW let that grow.
3. Expert backends: `grouped_mm` against the reference `loop` (mmfm.moe.experts) on uneven
   routing with an empty expert, outputs and gradients, within a tolerance from the unit
   roundoff (see `expert_tolerance`).
4. The SDPA kernel torch actually ran (flash, memory-efficient, cuDNN, math), causal and with a
   packed-document mask, read from the profiler's op names.

Models are built directly (Decoder, build_optimizer) on synthetic token batches: no shards, no
downloads, nothing imported beyond torch and mmfm. On the CPU every preset is shrunk to a tiny
shape (same structure: MoE or dense) so the whole script runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's CPU-only machine chatter
import torch  # noqa: E402

from mmfm.config import ModelConfig, load_config  # noqa: E402
from mmfm.device import (  # noqa: E402
    PrecisionChoice,
    autocast_context,
    resolve_device,
    resolve_precision,
)
from mmfm.model import Decoder  # noqa: E402
from mmfm.model.counting import count_params, flops_per_token  # noqa: E402
from mmfm.moe.experts import swiglu_grouped_mm, swiglu_loop  # noqa: E402
from mmfm.train.optim import build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["configs/text_moe_small.yaml", "configs/text_dense_equiv_small.yaml",
           "configs/text_moe_1b.yaml"]
LOSS_PRESET = "configs/text_moe_small.yaml"
LOSS_RTOL = 0.03
# Dense bf16 tensor-core peak, FLOP/s, from NVIDIA's datasheets (without sparsity). Matched
# as substrings of torch.cuda.get_device_name, most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
)
SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash",
            "_scaled_dot_product_efficient_attention": "memory-efficient",
            "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "_scaled_dot_product_attention_math": "math"}
TINY_ROWS, TINY_SEQ = 2, 32  # the CPU smoke run's batch
BF16 = PrecisionChoice("bf16", torch.bfloat16, "gpu_check")
FP32 = PrecisionChoice("fp32", torch.float32, "gpu_check")


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def shrink(cfg: ModelConfig) -> ModelConfig:
    """A tiny model of the same kind, for the CPU smoke run."""
    moe = cfg.moe and dataclasses.replace(cfg.moe, num_experts=4, top_k=2, expert_hidden=64)
    return dataclasses.replace(cfg, vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                               n_kv_heads=2, ffn_hidden=128, max_seq_len=TINY_SEQ, moe=moe)


def synthetic_batches(vocab: int, batch: int, seq_len: int, count: int,
                      device: torch.device) -> list[torch.Tensor]:
    """`count` fixed (batch, seq_len + 1) random token batches (seeded: the same every run)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).to(device)
            for _ in range(count)]


def build(model_cfg: ModelConfig, tcfg, device: torch.device, seed: int = 0):
    """(model, optimizer), initialised directly on `device` with a fixed seed."""
    torch.manual_seed(seed)
    with device:
        model = Decoder(model_cfg).train()
    return model, build_optimizer(model, tcfg)


def train_step(model, optimizer, ids_BT1: torch.Tensor, precision: PrecisionChoice,
               device: torch.device, grad_clip: float) -> float:
    """One training step as the trainer takes it; returns the LM loss (no host sync inside
    the step beyond the returned loss)."""
    with autocast_context(precision, device):
        out = model(ids_BT1[:, :-1], labels_BT=ids_BT1[:, 1:])
    (out.lm_loss + out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.lm_loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory; on the CPU the process's peak resident size (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(preset: str, device: torch.device, precision: PrecisionChoice, steps: int,
               batch: int | None, tiny: bool) -> dict:
    """Tokens/s, TFLOP/s, MFU and peak memory of `steps` timed training steps after 2 warm-ups."""
    cfg = load_config(ROOT / preset)
    model_cfg = shrink(cfg.model) if tiny else cfg.model
    seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
    rows = batch or (TINY_ROWS if tiny else cfg.train.micro_batch_size)
    _reset_peak_memory(device)
    model, optimizer = build(model_cfg, cfg.train, device)
    batches = synthetic_batches(model_cfg.vocab_size, rows, seq_len, 2, device)
    for i in range(2):
        train_step(model, optimizer, batches[i % 2], precision, device, cfg.train.grad_clip)
    _sync(device)
    started = time.perf_counter()
    for i in range(steps):
        loss = train_step(model, optimizer, batches[i % 2], precision, device, cfg.train.grad_clip)
    float(loss)  # waits for the last step
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = rows * seq_len / seconds
    flops = tokens_per_s * flops_per_token(model_cfg, seq_len)
    peak = peak_bf16_flops(device)
    result = {"preset": Path(preset).stem, "precision": precision.name, "batch": rows,
              "seq_len": seq_len, "active_params": count_params(model_cfg).active,
              "step_s": seconds, "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
              "mfu": flops / peak if peak else None, "peak_mem_gb": _peak_memory_gb(device)}
    del model, optimizer
    return result


def loss_tracking(device: torch.device, steps: int, tiny: bool) -> dict:
    """Losses of the same run in bf16 and fp32, and the largest relative gap."""
    cfg = load_config(ROOT / LOSS_PRESET)
    model_cfg = shrink(cfg.model) if tiny else cfg.model
    seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
    rows = TINY_ROWS if tiny else cfg.train.micro_batch_size
    batches = synthetic_batches(model_cfg.vocab_size, rows, seq_len, 4, device)
    losses = {}
    for precision in (FP32, BF16):
        model, optimizer = build(model_cfg, cfg.train, device)
        losses[precision.name] = [
            float(train_step(model, optimizer, batches[i % 4], precision, device,
                             cfg.train.grad_clip)) for i in range(steps)]
        del model, optimizer
    gaps = [abs(b - f) / f for b, f in zip(losses["bf16"], losses["fp32"], strict=True)]
    worst = max(range(steps), key=gaps.__getitem__)
    return {"steps": steps, "fp32": losses["fp32"], "bf16": losses["bf16"],
            "max_rel_gap": gaps[worst], "at_step": worst + 1, "rtol": LOSS_RTOL,
            "ok": gaps[worst] <= LOSS_RTOL and all(map(math.isfinite, losses["bf16"]))}


def expert_tolerance(dtype: torch.dtype, reduction: int) -> float:
    """Relative-to-scale bound between two expert backends: both accumulate in fp32 in a
    different order (2·γ_n, n = the contraction length) and round h and the output to
    `dtype` (a few unit roundoffs each; 8u allows two roundings per operand path)."""
    u_acc, u_out = torch.finfo(torch.float32).eps / 2, torch.finfo(dtype).eps / 2
    return 2 * reduction * u_acc + 8 * u_out


def experts_parity(device: torch.device, dtype: torch.dtype) -> dict:
    """grouped_mm vs loop on uneven routing (expert 2 gets no rows): outputs and gradients."""
    gen = torch.Generator().manual_seed(7)
    E, D, H = 8, 256, 512
    counts = torch.tensor([300, 17, 0, 129, 64, 1, 250, 263])
    x = torch.randn(int(counts.sum()), D, generator=gen)
    weights = [torch.randn(E, D, H, generator=gen) * D**-0.5,
               torch.randn(E, D, H, generator=gen) * D**-0.5,
               torch.randn(E, H, D, generator=gen) * H**-0.5]
    grad_out = torch.randn(x.shape[0], D, generator=gen)
    results = {}
    for name, fn in (("loop", swiglu_loop), ("grouped_mm", swiglu_grouped_mm)):
        leaves = [t.to(device, dtype).requires_grad_() for t in (x, *weights)]
        out = fn(leaves[0], *leaves[1:], counts.to(device))
        out.backward(grad_out.to(device, dtype))
        results[name] = [out.detach().float()] + [t.grad.float() for t in leaves]
    bound = expert_tolerance(dtype, max(D, H) + int(counts.max()))
    gaps = {}
    for label, ref, got in zip(("out", "dx", "dw1", "dw3", "dw2"), results["loop"],
                               results["grouped_mm"], strict=True):
        gaps[label] = float((got - ref).abs().max() / ref.abs().max())
    return {"dtype": str(dtype).removeprefix("torch."), "rel_gaps": gaps, "bound": bound,
            "ok": all(g <= bound for g in gaps.values())}


def sdpa_kernels(device: torch.device, precision: PrecisionChoice) -> dict:
    """The SDPA op torch dispatched to, for the small presets' head shape, causal and with a
    packed-document mask (a boolean mask rules the flash kernel out)."""
    from mmfm.model.layers import document_causal_mask

    B, H, T, Dh = 4, 8, 256, 64
    q, k, v = (torch.randn(B, H, T, Dh, device=device) for _ in range(3))
    doc_ids = torch.arange(T, device=device).div(100, rounding_mode="floor").expand(B, T)
    found = {}
    for label, kwargs in (("causal", {"is_causal": True}),
                          ("document mask", {"attn_mask": document_causal_mask(doc_ids)})):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with autocast_context(precision, device):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
            _sync(device)
        names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
        found[label] = ", ".join(sorted({SDPA_OPS[n] for n in names if n in SDPA_OPS})) or "?"
    return found


def print_report(device: torch.device, rows: list[dict], loss: dict, experts: dict,
                 sdpa: dict) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny shapes)"
    peak = peak_bf16_flops(device)
    print(f"## gpu_check on {name}, torch {torch.__version__}"
          + (f", bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ", no bf16 peak known"))
    print("\n| preset | precision | batch x seq | active params | tokens/s | TFLOP/s | MFU | "
          "peak mem GB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['preset']} | {r['precision']} | {r['batch']}x{r['seq_len']} | "
              f"{r['active_params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | "
              f"{mfu} | {r['peak_mem_gb']:.2f} |")
    print(f"\nbf16 vs fp32 loss, {loss['steps']} steps of {Path(LOSS_PRESET).stem}: max relative "
          f"gap {loss['max_rel_gap']:.4f} at step {loss['at_step']} (tolerance {loss['rtol']}), "
          f"final fp32 {loss['fp32'][-1]:.4f} / bf16 {loss['bf16'][-1]:.4f}: "
          f"{'PASS' if loss['ok'] else 'FAIL'}")
    gaps = ", ".join(f"{k} {v:.1e}" for k, v in experts["rel_gaps"].items())
    print(f"grouped_mm vs loop experts ({experts['dtype']}): relative gaps {gaps} "
          f"(bound {experts['bound']:.1e}): {'PASS' if experts['ok'] else 'FAIL'}")
    print(f"SDPA kernel: causal -> {sdpa['causal']}; document mask -> {sdpa['document mask']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per preset (default 20 on a GPU, 2 on the CPU)")
    parser.add_argument("--loss-steps", type=int, default=None,
                        help="bf16 vs fp32 steps (default 50 on a GPU, 5 on the CPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows per step (default: each preset's train.micro_batch_size)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, 0)
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type != "cuda":
        # Tiny shapes gain nothing from a thread pool, and on a loaded machine each op would
        # wait ~35 ms for its threads to wake (measured on the shared 2-core EPYC).
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return run_checks(args, device)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def throughput_fitting(preset: str, device: torch.device, precision: PrecisionChoice,
                       steps: int, batch: int | None, tiny: bool) -> dict:
    """`throughput`, halving the batch while it runs out of GPU memory (the 1B preset's 4 rows
    need ~90 GB: fine on an H200, not on an 80 GB H100); the row says which batch ran."""
    while True:
        try:
            return throughput(preset, device, precision, steps, batch, tiny)
        except torch.OutOfMemoryError:
            rows = batch or load_config(ROOT / preset).train.micro_batch_size
            if rows == 1:
                raise
        # Outside the handler: the traceback (and the model in its frames) is gone by now.
        batch = rows // 2
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{preset}: out of memory, retrying with batch {batch}", file=sys.stderr)


def run_checks(args: argparse.Namespace, device: torch.device) -> int:
    tiny = device.type != "cuda"
    # Throughput in bf16 where native (every GPU the table knows); on the CPU what auto picks.
    precision = resolve_precision("bf16" if device.type == "cuda" else "auto", device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    loss_steps = args.loss_steps or (50 if device.type == "cuda" else 4)
    rows = [throughput_fitting(p, device, precision, steps, args.batch, tiny)
            for p in args.presets]
    loss = loss_tracking(device, loss_steps, tiny)
    experts = experts_parity(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    sdpa = sdpa_kernels(device, precision)
    print_report(device, rows, loss, experts, sdpa)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "throughput": rows, "loss": loss,
                                         "experts": experts, "sdpa": sdpa}, indent=1))
    return 0 if loss["ok"] and experts["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
