"""Convert mmfm text models to and from Hugging Face transformers.

`mmfm.convert.hf_families` picks the transformers class that holds a model (Llama, Qwen2,
Qwen3, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Glm4Moe for DeepSeek-V3-style routing) and maps the
configs; anything no class can express raises `UserValueError` naming the field, before any
weight is touched. This module maps the weights and writes/reads directories.

Weights (shape legend: E experts, D model width, I expert hidden, F dense FFN hidden):

    mmfm                                    transformers 5 (in-memory state dict)
    embed.weight                            model.embed_tokens.weight
    blocks.i.attn.wq|wk|wv|wo.weight        model.layers.i.self_attn.q|k|v|o_proj.weight
    blocks.i.attn.wq|wk|wv.bias (qkv_bias)  model.layers.i.self_attn.q|k|v_proj.bias
    blocks.i.attn.q_norm|k_norm.weight      model.layers.i.self_attn.q_norm|k_norm.weight
    blocks.i.attn_norm.weight               model.layers.i.input_layernorm.weight
    blocks.i.ffn_norm.weight                model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.router.weight (E, D)       model.layers.i.mlp.gate.weight (E, D)
    blocks.i.ffn.router.expert_bias (E)     model.layers.i.mlp.gate.e_score_correction_bias (Glm4Moe)
    blocks.i.ffn.experts.w1 (E, D, I)  ─┐   model.layers.i.mlp.experts.gate_up_proj (E, 2I, D):
    blocks.i.ffn.experts.w3 (E, D, I)  ─┘     rows [:I] = w1ᵀ (gate), rows [I:] = w3ᵀ (up)
    blocks.i.ffn.experts.w2 (E, I, D)       model.layers.i.mlp.experts.down_proj (E, D, I) = w2ᵀ
    blocks.i.ffn.shared_experts.w1|w3|w2    model.layers.i.mlp.shared_expert.gate|up|down_proj
                                              (Qwen2-MoE; Glm4Moe: mlp.shared_experts.*)
    blocks.i.ffn.shared_gate.weight (1, D)  model.layers.i.mlp.shared_expert_gate.weight (Qwen2-MoE)
    blocks.i.ffn.w1|w3|w2.weight (dense)    model.layers.i.mlp.gate_proj|up_proj|down_proj.weight
    norm.weight, lm_head.weight             model.norm.weight, lm_head.weight

Both sides use the rotate-half RoPE layout, so q/k projections copy unpermuted. We always go
through an in-memory transformers model: `save_pretrained` writes the Hub's per-expert layout
and `from_pretrained` fuses it back, so the files on disk are what checkpoints of that family on
the Hub look like. `trust_remote_code` is never set: only classes shipped in transformers load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfm.config import ModelConfig
from mmfm.convert.hf_families import (  # noqa: F401  (re-exported: the public conversion API)
    check_exportable,
    check_importable,
    check_mixtral_compatible,
    export_family,
    from_hf_config,
    to_hf_config,
)
from mmfm.convert.weights import read_shapes
from mmfm.errors import MissingDependencyError, UserValueError
from mmfm.model import Decoder

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_DENSE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Optional per-layer tensors, present when the model has them: mmfm suffix -> HF suffix.
_OPTIONAL = {
    "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.shared_gate.weight": "mlp.shared_expert_gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
}
_SHARED_PREFIX = {"qwen2_moe": "mlp.shared_expert.", "glm4_moe": "mlp.shared_experts."}


# ---------------------------------------------------------------- weights


def _optional_names(sd: dict[str, Tensor], family: str, src: str, dst: str,
                    to_hf: bool) -> dict[str, str]:
    """{source key: destination key} of the optional per-layer tensors present in `sd`."""
    pairs = dict(_OPTIONAL)
    prefix = _SHARED_PREFIX.get(family)
    if prefix is not None:
        pairs.update({f"ffn.shared_experts.{m}.weight": f"{prefix}{h}.weight"
                      for m, h in _DENSE.items()})
    if family != "glm4_moe":  # only Glm4Moe holds a selection bias (export checks it is zero)
        pairs.pop("ffn.router.expert_bias")
    names = {f"{src}{m}": f"{dst}{h}" for m, h in pairs.items()} if to_hf else \
        {f"{src}{h}": f"{dst}{m}" for m, h in pairs.items()}
    return {k: v for k, v in names.items() if k in sd}


def _layer_to_hf(sd: dict[str, Tensor], i: int, is_moe: bool, family: str) -> dict[str, Tensor]:
    """One decoder block's mmfm tensors under their transformers names."""
    src, dst = f"blocks.{i}.", f"model.layers.{i}."
    out = {f"{dst}self_attn.{h}.weight": sd[f"{src}attn.{m}.weight"] for m, h in _ATTN.items()}
    out.update({f"{dst}{h}.weight": sd[f"{src}{m}.weight"] for m, h in _NORMS.items()})
    out.update({d: sd[s] for s, d in _optional_names(sd, family, src, dst, True).items()})
    if not is_moe:
        out.update({f"{dst}mlp.{h}.weight": sd[f"{src}ffn.{m}.weight"] for m, h in _DENSE.items()})
        return out
    w1, w3, w2 = (sd[f"{src}ffn.experts.{w}"] for w in ("w1", "w3", "w2"))  # (E,D,I) x2, (E,I,D)
    out[f"{dst}mlp.gate.weight"] = sd[f"{src}ffn.router.weight"]
    out[f"{dst}mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
    out[f"{dst}mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
    return out


def _layer_from_hf(sd: dict[str, Tensor], i: int, is_moe: bool, family: str) -> dict[str, Tensor]:
    """One transformers layer's tensors under their mmfm names (inverse of `_layer_to_hf`)."""
    src, dst = f"model.layers.{i}.", f"blocks.{i}."
    out = {f"{dst}attn.{m}.weight": sd[f"{src}self_attn.{h}.weight"] for m, h in _ATTN.items()}
    out.update({f"{dst}{m}.weight": sd[f"{src}{h}.weight"] for m, h in _NORMS.items()})
    out.update({d: sd[s] for s, d in _optional_names(sd, family, src, dst, False).items()})
    if not is_moe:
        out.update({f"{dst}ffn.{m}.weight": sd[f"{src}mlp.{h}.weight"] for m, h in _DENSE.items()})
        return out
    gate_up = sd[f"{src}mlp.experts.gate_up_proj"]  # (E, 2I, D)
    I = gate_up.shape[1] // 2
    out[f"{dst}ffn.router.weight"] = sd[f"{src}mlp.gate.weight"]
    out[f"{dst}ffn.experts.w1"] = gate_up[:, :I].transpose(1, 2).contiguous()
    out[f"{dst}ffn.experts.w3"] = gate_up[:, I:].transpose(1, 2).contiguous()
    out[f"{dst}ffn.experts.w2"] = sd[f"{src}mlp.experts.down_proj"].transpose(1, 2).contiguous()
    return out


def to_hf_state_dict(model: Decoder, family: str | None = None) -> dict[str, Tensor]:
    """The decoder's weights under transformers' in-memory names and layouts."""
    family = family or export_family(model.cfg)
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for block in model.blocks:
        out.update(_layer_to_hf(sd, block.layer_idx, block.is_moe, family))
    return out


def from_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig,
                       family: str) -> dict[str, Tensor]:
    """A transformers state dict of `family` under mmfm's names (tied lm_head omitted)."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        out.update(_layer_from_hf(sd, i, cfg.moe is not None and cfg.moe.is_moe_layer(i), family))
    return out


def _check_no_selection_bias(model: Decoder, family: str) -> None:
    """A trained aux-loss-free bias changes which experts are chosen; only Glm4Moe holds one."""
    if family == "glm4_moe":
        return
    for idx, layer in model.moe_layers():
        if bool(layer.router.expert_bias.any()):
            raise UserValueError(
                f"blocks.{idx}.ffn.router.expert_bias is nonzero (aux-loss-free balancing): "
                f"{family} selects experts without a bias, so the exported model would route "
                "differently")


# ---------------------------------------------------------------- export / import


def build_hf_model(model: Decoder, model_cfg: ModelConfig):
    """An in-memory transformers model (family per `export_family`) holding `model`'s weights."""
    AutoModelForCausalLM = _transformers("AutoModelForCausalLM")
    hf_cfg = to_hf_config(model_cfg)
    family = hf_cfg.model_type
    _check_no_selection_bias(model, family)
    dtype = model.embed.weight.dtype
    hf_cfg.dtype = dtype
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, trust_remote_code=False)
    state = {k: v.detach().clone() for k, v in to_hf_state_dict(model, family).items()}
    if model_cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    hf.tie_weights()
    _rebuild_rotary(hf)
    return hf.eval()


def _rebuild_rotary(hf) -> None:
    """Recreate the rotary-embedding buffers that the meta-device build left empty."""
    rotary = hf.model.rotary_emb
    fresh = type(rotary)(config=hf.config)
    hf.model.rotary_emb = fresh


def export_hf(model: Decoder, model_cfg: ModelConfig, out_dir: str | Path,
              tokenizer_path: str | Path | None = None) -> Path:
    """Write `out_dir` so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads the model
    offline (config.json, generation_config.json, model.safetensors). With `tokenizer_path`
    (a `tokenizers` tokenizer.json) also write a `PreTrainedTokenizerFast` for it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = build_hf_model(model, model_cfg)
    if tokenizer_path is not None:
        _set_special_token_ids(hf, save_tokenizer(tokenizer_path, out))
    hf.save_pretrained(out)
    return out


def save_tokenizer(tokenizer_path: str | Path, out_dir: Path) -> dict[str, int]:
    """Save tokenizer.json + tokenizer_config.json loadable by `AutoTokenizer`; returns the
    ids of the end-of-text and padding tokens found in it."""
    PreTrainedTokenizerFast = _transformers("PreTrainedTokenizerFast")
    path = Path(tokenizer_path)
    if not path.is_file():
        raise UserValueError(f"tokenizer {path} does not exist")
    specials = _known_special_tokens(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **specials)
    tok.save_pretrained(out_dir)
    if not (out_dir / "tokenizer.json").is_file():  # older transformers wrote only vocab files
        shutil.copyfile(path, out_dir / "tokenizer.json")
    return {name: tok.convert_tokens_to_ids(t) for name, t in specials.items()}


def _known_special_tokens(path: Path) -> dict[str, str]:
    """mmfm's end-of-text and padding tokens (see mmfm.data.tokenizer), where present."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    wanted = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    return {k: t for k, t in wanted.items() if tok.token_to_id(t) is not None}


def _set_special_token_ids(hf, ids: dict[str, int]) -> None:
    for name, value in ids.items():
        setattr(hf.config, f"{name}_id", value)
        setattr(hf.generation_config, f"{name}_id", value)


def import_hf(hf_model_or_dir, max_seq_len: int | None = None) -> tuple[ModelConfig, Decoder]:
    """(ModelConfig, fp32 Decoder) from an in-memory transformers model of a supported family
    or a directory `from_pretrained` can read. Raises UserValueError naming an inexpressible
    field."""
    hf = hf_model_or_dir
    if isinstance(hf, (str, Path)):
        hf = _load_hf_dir(Path(hf))
    cfg = from_hf_config(hf.config, max_seq_len=max_seq_len)
    model = Decoder(cfg)
    state = from_hf_state_dict(hf.state_dict(), cfg, hf.config.model_type)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {k for k in model.state_dict() if k.endswith("router.expert_bias")}
    if cfg.tie_embeddings:
        allowed.add("lm_head.weight")
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    return cfg, model.eval()


def _load_hf_dir(path: Path):
    """Load a local transformers directory without ever running its own code: `auto_map`
    (which points transformers at Python files in the repository) is refused before
    transformers reads the config, remote code is off, and nothing is downloaded."""
    refuse_remote_code(path)
    for weights in sorted(path.glob("*.safetensors")):
        read_shapes(weights)  # a damaged header: one line naming the file
    AutoConfig, AutoModelForCausalLM = _transformers("AutoConfig", "AutoModelForCausalLM")
    offline = {"trust_remote_code": False, "local_files_only": True}
    check_importable(AutoConfig.from_pretrained(path, **offline))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                **offline)


def refuse_remote_code(path: Path) -> dict[str, Any]:
    """Read `path/config.json` as plain JSON; refuse it when it is not a model config or names
    repository code (`auto_map`). Returns the parsed config."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        data = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserValueError(f"{config_file} is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserValueError(f"{config_file} must hold a JSON object")
    if "auto_map" in data:
        raise UserValueError(
            f"{config_file}: config.auto_map={data['auto_map']!r} asks transformers to run the "
            "repository's own Python code; mmfm import hf never runs it (only the families "
            "built into transformers are imported, with its own classes)")
    return data


def _transformers(*names: str):
    """Classes from transformers, or a one-line MissingDependencyError when it is absent."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "this command needs the transformers package, which is not installed: "
            "pip install 'transformers>=4.46'") from None
    found = tuple(getattr(transformers, name) for name in names)
    return found[0] if len(found) == 1 else found
