"""Whole-model training step tokens/s: mmfm's Decoder against Hugging Face `MixtralForCausalLM`
at the identical config and the same weights, in the same process with the same threads.

    .venv/bin/python bench/vs_hf_mixtral.py [--batch 8] [--seq 256] [--steps 5]
        [--precisions fp32 autocast] [--backend grouped_mm]

The model is the tiny preset's shape (vocab 8192, d_model 256, 4 layers, 8 heads / 4 KV heads,
8 experts of width 256, top-2 renormalized softmax), converted with `mmfm.convert.hf` so both
hold the same weights and route alike. A step is forward, loss (next-token cross entropy +
load-balancing loss; mmfm's z-loss is off because Mixtral has none), backward and an AdamW
step. `autocast` is bf16 autocast on fp32 weights, as `mmfm train` does for bf16. The two
models are stepped in turn (mmfm, HF, mmfm, HF, ...) and the best step time of each is used:
load from other processes on a shared machine only adds time, and hits both alike.

Writes bench/results/vs_hf_mixtral.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from timing import interleaved_best  # bench/ is on sys.path when a benchmark runs

from mmfm.config import ModelConfig
from mmfm.convert.hf import build_hf_model
from mmfm.model import Decoder, lm_loss
from mmfm.moe import MoEConfig

ROOT = Path(__file__).resolve().parents[1]


def model_config(seq: int, backend: str) -> ModelConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=256, aux_loss_coef=0.01,
                    z_loss_coef=0.0, backend=backend)
    return ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                       ffn_hidden=512, max_seq_len=seq, tie_embeddings=True, moe=moe)


def mmfm_step(model: Decoder, ids: torch.Tensor, precision: str) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            out = model(ids[:, :-1])
            loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
        loss.backward()
        opt.step()

    return step


def hf_step(hf, ids: torch.Tensor, precision: str) -> Callable[[], None]:
    """transformers shifts labels itself: same T inputs, T - 1 predictions (mmfm: T)."""
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            loss = hf(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
        loss.backward()
        opt.step()

    return step


def measure(args, precision: str) -> dict:
    cfg = model_config(args.seq, args.backend)
    torch.manual_seed(0)
    model = Decoder(cfg)
    hf = build_hf_model(model, cfg)
    hf.config.output_router_logits = True  # so HF also computes its load-balancing loss
    model.train()
    hf.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    mmfm_s, hf_s = interleaved_best(
        [mmfm_step(model, ids, precision), hf_step(hf, ids, precision)], args.steps)
    tokens = args.batch * args.seq
    return {"precision": precision, "batch": args.batch, "seq_len": args.seq,
            "mmfm_backend": args.backend,
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "hf_attn_implementation": hf.config._attn_implementation,
            "mmfm_step_s": mmfm_s, "hf_step_s": hf_s, "mmfm_tokens_per_s": tokens / mmfm_s,
            "hf_tokens_per_s": tokens / hf_s, "speedup": hf_s / mmfm_s}


def markdown(rows: list[dict]) -> str:
    lines = ["| precision | batch × seq | mmfm tokens/s | HF Mixtral tokens/s | mmfm / HF |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['batch']} × {r['seq_len']} | "
                     f"{r['mmfm_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | "
                     f"{r['speedup']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precisions", nargs="+", default=["fp32", "autocast"],
                   choices=["fp32", "autocast"])
    p.add_argument("--backend", default="grouped_mm", choices=["loop", "grouped_mm"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every measurement (default: torch's own choice); "
                        "1 is far steadier on a machine shared with other jobs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_hf_mixtral.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    rows = [measure(args, prec) for prec in args.precisions]
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": date.today().isoformat(), "machine": _cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(rows))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
