"""Whole-model training step tokens/s: mmfm's Decoder against Hugging Face `MixtralForCausalLM`
at the identical config and the same weights, in the same process with the same threads.

    .venv/bin/python bench/vs_hf_mixtral.py [--batch 8] [--seq 256] [--steps 5]
        [--precisions fp32 autocast] [--backend grouped_mm]

The model is the tiny preset's shape (vocab 8192, d_model 256, 4 layers, 8 heads / 4 KV heads,
8 experts of width 256, top-2 renormalized softmax), converted with `mmfm.convert.hf` so both
hold the same weights and route alike. A step is forward, loss (next-token cross entropy +
load-balancing loss; mmfm's z-loss is off because Mixtral has none), backward and an AdamW
step. mmfm computes its loss as `mmfm train` does: LM head fused with the cross entropy
(`model.fused_loss`, on by default). Both use torch's fused AdamW: the Hugging Face Trainer's
default optimizer (`adamw_torch_fused`) and what `mmfm train` builds. `autocast` is bf16
autocast on fp32 weights, as `mmfm train` does for bf16. The two models are stepped in turn
(mmfm, HF, mmfm, HF, ...) and the best step time of each is used: load from other processes on
a shared machine only adds time, and hits both alike. A third model, mmfm with
`model.fused_loss=false`, is stepped in the same rotation to measure what the fused head + loss
gives (the `fused-loss gain` column). `--components` also times the MoE block,
norm + attention, and final norm + LM head + loss on their own, to show where the gap is.

Writes bench/results/vs_hf_mixtral.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from timing import interleaved_best  # bench/ is on sys.path when a benchmark runs

from mmfm.config import ModelConfig
from mmfm.convert.hf import build_hf_model
from mmfm.model import Decoder
from mmfm.moe import MoEConfig

ROOT = Path(__file__).resolve().parents[1]


def model_config(seq: int, backend: str) -> ModelConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=256, aux_loss_coef=0.01,
                    z_loss_coef=0.0, backend=backend)
    return ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                       ffn_hidden=512, max_seq_len=seq, tie_embeddings=True, moe=moe)


def mmfm_step(model: Decoder, ids: torch.Tensor, precision: str) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            out = model(ids[:, :-1], labels_BT=ids[:, 1:])  # as `mmfm train` computes its loss
            loss = out.lm_loss + out.aux_loss
        loss.backward()
        opt.step()

    return step


def hf_step(hf, ids: torch.Tensor, precision: str) -> Callable[[], None]:
    """transformers shifts labels itself: same T inputs, T - 1 predictions (mmfm: T)."""
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

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
    # The same model with the plain LM head + cross entropy, to measure what the fusion gives.
    plain = Decoder(dataclasses.replace(cfg, fused_loss=False))
    plain.load_state_dict(model.state_dict())
    for m in (model, hf, plain):
        m.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    mmfm_s, hf_s, plain_s = interleaved_best(
        [mmfm_step(model, ids, precision), hf_step(hf, ids, precision),
         mmfm_step(plain, ids, precision)], args.steps)
    tokens = args.batch * args.seq
    return {"precision": precision, "batch": args.batch, "seq_len": args.seq,
            "mmfm_backend": args.backend,
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "hf_attn_implementation": hf.config._attn_implementation,
            "mmfm_step_s": mmfm_s, "hf_step_s": hf_s, "mmfm_plain_loss_step_s": plain_s,
            "mmfm_tokens_per_s": tokens / mmfm_s, "hf_tokens_per_s": tokens / hf_s,
            "speedup": hf_s / mmfm_s, "fused_loss_gain": plain_s / mmfm_s}


def _fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor | None, precision: str,
             module: torch.nn.Module) -> Callable[[], None]:
    """One forward (under autocast for `autocast`) and backward; grads freed after."""

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            out = forward()
        out.backward(None if grad is None else grad.to(out.dtype))
        module.zero_grad(set_to_none=True)

    return step


def component_steps(model: Decoder, hf, ids: torch.Tensor, precision: str) -> dict:
    """name -> (mmfm step, HF step): layer 0's MoE block, layer 0's norm + attention, and the
    final norm + LM head + loss, each forward+backward on the same random hidden states."""
    B, T = ids.shape[0], ids.shape[1] - 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, model.cfg.d_model, generator=gen).requires_grad_(True)
    grad = torch.randn(B, T, model.cfg.d_model, generator=gen)
    ours, theirs = model.blocks[0], hf.model.layers[0]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    positions = torch.arange(T).unsqueeze(0)

    def ours_moe():
        y, aux = ours.ffn(x)
        return y + 0 * aux  # aux joins the graph, as in training

    def theirs_attention():
        position_embeddings = hf.model.rotary_emb(x, positions)
        return theirs.self_attn(theirs.input_layernorm(x), position_embeddings=position_embeddings,
                                attention_mask=None)[0]

    labels = ids[:, 1:]
    return {
        "moe_block": (_fwd_bwd(ours_moe, grad, precision, model),
                      _fwd_bwd(lambda: theirs.mlp(x), grad, precision, hf)),
        "attention": (_fwd_bwd(lambda: ours.attn(ours.attn_norm(x), cos, sin, None), grad,
                               precision, model),
                      _fwd_bwd(theirs_attention, grad, precision, hf)),
        "head_loss": (_fwd_bwd(lambda: _mmfm_head_loss(model, x, labels), None, precision, model),
                      _fwd_bwd(lambda: hf.loss_function(
                          logits=hf.lm_head(hf.model.norm(x)), labels=ids[:, :-1],
                          vocab_size=model.cfg.vocab_size), None, precision, hf)),
    }


def _mmfm_head_loss(model: Decoder, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Final norm, then the LM head fused with the loss (what Decoder.forward does with labels)."""
    from mmfm.model.fused_loss import fused_linear_cross_entropy

    h = model.norm(x).flatten(0, 1)
    return fused_linear_cross_entropy(h, model.lm_head.weight, labels.flatten())[0]


def measure_components(args, precision: str) -> list[dict]:
    cfg = model_config(args.seq, args.backend)
    torch.manual_seed(0)
    model = Decoder(cfg).train()
    hf = build_hf_model(model, cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    for name, (ours, theirs) in component_steps(model, hf, ids, precision).items():
        mmfm_s, hf_s = interleaved_best([ours, theirs], args.steps)
        rows.append({"precision": precision, "component": name, "mmfm_ms": mmfm_s * 1e3,
                     "hf_ms": hf_s * 1e3, "speedup": hf_s / mmfm_s})
    return rows


def markdown_components(rows: list[dict]) -> str:
    lines = ["| precision | component (fwd+bwd) | mmfm ms | HF ms | mmfm / HF speed |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['component']} | {r['mmfm_ms']:.1f} | {r['hf_ms']:.1f} | "
              f"{r['speedup']:.2f}× |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| precision | batch × seq | mmfm tokens/s | HF Mixtral tokens/s | mmfm / HF | "
             "fused-loss gain |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['batch']} × {r['seq_len']} | "
                     f"{r['mmfm_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | "
                     f"{r['speedup']:.2f}× | {r['fused_loss_gain']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precisions", nargs="+", default=["fp32", "autocast"],
                   choices=["fp32", "autocast"])
    p.add_argument("--backend", default="grouped_mm", choices=["loop", "grouped_mm"])
    p.add_argument("--components", action="store_true",
                   help="also time the MoE block, attention and head+loss on their own")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every measurement (default: torch's own choice); "
                        "1 is far steadier on a machine shared with other jobs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_hf_mixtral.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    rows = [measure(args, prec) for prec in args.precisions]
    components = ([] if not args.components else
                  [r for prec in args.precisions for r in measure_components(args, prec)])
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": date.today().isoformat(), "machine": _cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows,
              "components": components}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    if components:
        print()
        print(markdown_components(components))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
