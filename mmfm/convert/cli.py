"""`mmfm export hf`, `mmfm import hf` and `mmfm upcycle`: model conversion commands.

The lead CLI (`mmfm.cli`) calls :func:`register` with its subparsers. User errors are raised as
ValueError, which the lead CLI prints as one `error: ...` line (exit status 2).

Converted models are written as a *model directory*: `model.safetensors`, `config.yaml` (the
experiment config whose `model` section describes the weights) and `meta.json` (step 0, SHA-256
of the weights, the config), so `verify_checkpoint` reads it like a training checkpoint and it
can be passed back to `mmfm export hf` or `mmfm upcycle`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from mmfm.config import ExperimentConfig, load_config, save_config
from mmfm.errors import UserValueError

MODEL_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "config.yaml", "meta.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `export hf`, `import hf` and `upcycle` to the `mmfm` command line."""
    _add_export(subparsers)
    _add_import(subparsers)
    _add_upcycle(subparsers)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="export a checkpoint to another format",
        description="Export an mmfm checkpoint to another ecosystem's format.")
    sub = export.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    p = sub.add_parser(
        "hf", help="to a Hugging Face transformers directory (the class that holds the model)",
        description="Write a directory that transformers' AutoModelForCausalLM.from_pretrained "
                    "loads offline (trust_remote_code=False), in the class that holds the "
                    "model: Llama, Qwen2 (q/k/v bias) or Qwen3 (QK-norm) for dense models; "
                    "Mixtral (softmax, renormalized top-k>=2), OLMoE (QK-norm over the whole "
                    "projection), Qwen3-MoE (per-head QK-norm), Qwen2-MoE (gated shared "
                    "expert) or Glm4Moe (DeepSeek-V3-style sigmoid routing with selection "
                    "bias, shared experts, dense first layers, group-limited top-k) for MoE. "
                    "Anything no class can express is refused naming the field. The run's "
                    "tokenizer is written beside it.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                   help="a checkpoint folder (step_*), a run directory (its newest checkpoint) "
                        "or a model directory from `mmfm import hf` / `mmfm upcycle`")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="output directory")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to include (default: the run config's data.tokenizer "
                        "when that file exists)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    p.set_defaults(func=cmd_export_hf)


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser(
        "import", help="import a model from another format",
        description="Import a model from another ecosystem's format into an mmfm model dir.")
    sub = imp.add_subparsers(dest="import_format", required=True, metavar="FORMAT")
    p = sub.add_parser(
        "hf", help="from a Hugging Face directory (Llama, Qwen2/3, Mixtral, OLMoE, Qwen-MoE, ...)",
        description="Read a transformers Llama, Qwen2, Qwen3, Mixtral, OLMoE, Qwen2-MoE, "
                    "Qwen3-MoE or Glm4Moe directory (from_pretrained, offline if cached, "
                    "trust_remote_code=False; RoPE scaling linear/dynamic/yarn/llama3 is kept) "
                    "and write OUT_DIR/model.safetensors, config.yaml and meta.json. A field "
                    "mmfm cannot express is refused by name.")
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="transformers model directory")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="output model directory")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="RoPE table length (default: the model's max_position_embeddings)")
    p.set_defaults(func=cmd_import_hf)


def _add_upcycle(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upcycle", help="initialize an MoE model from a dense checkpoint",
        description="Sparse upcycling: every expert of each MoE layer starts as a copy of the "
                    "dense model's FFN of that layer (plus optional noise), attention, norms and "
                    "embeddings are copied, routers start random. The MoE config must match the "
                    "dense model's shapes and have model.moe.expert_hidden equal to its "
                    "ffn_hidden.")
    p.add_argument("dense", type=Path, metavar="DENSE_CKPT_DIR",
                   help="dense checkpoint folder, run directory or model directory")
    p.add_argument("config", metavar="CONFIG", help="YAML preset of the MoE model")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="output model directory")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides of CONFIG, e.g. model.moe.num_experts=8")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="std of Gaussian noise added to each expert copy (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of router init and noise")
    p.set_defaults(func=cmd_upcycle)


# ---------------------------------------------------------------- commands


def cmd_export_hf(args: argparse.Namespace) -> int:
    from mmfm.convert.hf import export_hf
    from mmfm.convert.hf_families import CLASS_NAMES, export_family

    cfg, model = load_model_dir(args.checkpoint)
    tokenizer = None if args.no_tokenizer else (args.tokenizer or _run_tokenizer(cfg))
    out = export_hf(model, cfg.model, args.out, tokenizer_path=tokenizer)
    print(f"wrote {out} ({CLASS_NAMES[export_family(cfg.model)]}"
          f"{', with tokenizer' if tokenizer else ''})")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from mmfm.convert.hf import import_hf

    model_cfg, model = import_hf(args.hf_dir, max_seq_len=args.max_seq_len)
    write_model_dir(args.out, ExperimentConfig(model=model_cfg), model,
                    extra={"source": str(args.hf_dir)})
    print(f"wrote {args.out}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from mmfm.convert.upcycle import upcycle_dense_to_moe

    target = load_config(args.config, args.overrides)
    _, dense = load_model_dir(args.dense)
    moe_model = upcycle_dense_to_moe(dense, target.model, noise_std=args.noise_std,
                                     seed=args.seed)
    write_model_dir(args.out, target, moe_model,
                    extra={"upcycled_from": str(args.dense), "noise_std": args.noise_std})
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- model directories


def load_model_dir(path: Path) -> tuple[ExperimentConfig, Any]:
    """(experiment config, Decoder with the weights) of a training checkpoint written under any
    layout, a run directory (its newest checkpoint) or a model directory."""
    from mmfm.train.checkpoint import load_model_from_checkpoint

    cfg, model = load_model_from_checkpoint(path)
    if cfg.data.kind != "text":
        raise UserValueError(f"{path}: a data.kind={cfg.data.kind!r} model; conversion takes "
                             f"text decoders (data.kind=text)")
    return cfg, model


def write_model_dir(out: Path, cfg: ExperimentConfig, model, extra: dict | None = None) -> None:
    """model.safetensors + config.yaml + meta.json (readable by `verify_checkpoint`).
    `data.seq_len` is capped at `model.max_seq_len` so that the saved config validates."""
    from safetensors.torch import save_model

    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, seq_len=min(cfg.data.seq_len,
                                                            cfg.model.max_seq_len)))

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / MODEL_FILE))
    save_config(cfg, out / CONFIG_FILE)
    meta = {"format_version": 1, "step": 0, "sha256": {MODEL_FILE: _sha256(out / MODEL_FILE)},
            "config": cfg.to_dict(), **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))


def _run_tokenizer(cfg: ExperimentConfig) -> Path | None:
    path = Path(cfg.data.tokenizer)
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

