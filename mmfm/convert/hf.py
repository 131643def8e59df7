"""Convert mmfm text models to and from Hugging Face transformers (Mixtral and Llama).

An MoE model maps to `MixtralForCausalLM` when Mixtral can express it (every layer MoE,
softmax router with the chosen k >= 2 scores renormalized, no shared experts, dropless); a
dense model (`moe: null`) maps to `LlamaForCausalLM`. Anything else raises `ValueError` naming
the field, before any weight is touched.

Weights (shape legend: E experts, D model width, I expert hidden, F dense FFN hidden):

    mmfm                                    transformers 5 (in-memory state dict)
    embed.weight                            model.embed_tokens.weight
    blocks.i.attn.wq|wk|wv|wo.weight        model.layers.i.self_attn.q|k|v|o_proj.weight
    blocks.i.attn_norm.weight               model.layers.i.input_layernorm.weight
    blocks.i.ffn_norm.weight                model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.router.weight (E, D)       model.layers.i.mlp.gate.weight (E, D)
    blocks.i.ffn.experts.w1 (E, D, I)  ─┐   model.layers.i.mlp.experts.gate_up_proj (E, 2I, D):
    blocks.i.ffn.experts.w3 (E, D, I)  ─┘     rows [:I] = w1ᵀ (gate), rows [I:] = w3ᵀ (up)
    blocks.i.ffn.experts.w2 (E, I, D)       model.layers.i.mlp.experts.down_proj (E, D, I) = w2ᵀ
    blocks.i.ffn.w1|w3|w2.weight (dense)    model.layers.i.mlp.gate_proj|up_proj|down_proj.weight
    norm.weight, lm_head.weight             model.norm.weight, lm_head.weight

Both sides use the rotate-half RoPE layout, so q/k projections copy unpermuted. We always go
through an in-memory transformers model: `save_pretrained` writes the Hub's per-expert layout
(`block_sparse_moe.experts.j.w1|w2|w3`) and `from_pretrained` fuses it back, so the files on disk
are what Mixtral checkpoints on the Hub look like.

Load-balancing coefficient. Per layer, transformers' `load_balancing_loss_func` is K times
mmfm's Switch loss (it normalizes expert counts by tokens, mmfm by tokens × K). mmfm sums
`aux_loss_coef × loss` over the L layers; transformers computes one loss over all layers'
router logits pooled (a mean, not a sum). We export
`router_aux_loss_coef = aux_loss_coef × L / K`, which gives equal values under uniform routing
and equal gradients whenever the layers' loads agree; import inverts it. Mixtral has no router
z-loss or sequence-level loss: export drops them (training-only), import sets them to 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfm.config import ModelConfig
from mmfm.convert.weights import read_shapes
from mmfm.errors import MissingDependencyError, UserValueError
from mmfm.model import Decoder
from mmfm.moe import MoEConfig

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_DENSE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


# ---------------------------------------------------------------- configs: mmfm -> HF


def check_mixtral_compatible(moe: MoEConfig, path: str = "model.moe") -> None:
    """Raise ValueError naming the first MoE field whose value Mixtral cannot express."""
    rules = [
        ("score_func", moe.score_func == "softmax", "Mixtral routes with softmax scores"),
        ("renormalize", moe.renormalize, "Mixtral renormalizes the chosen k scores"),
        ("top_k", moe.top_k >= 2, "with top_k=1 mmfm scales the expert output by its router "
                                  "probability (Switch) while Mixtral renormalizes it to 1"),
        ("num_shared_experts", moe.num_shared_experts == 0, "Mixtral has no shared experts"),
        ("first_dense", moe.first_dense == 0, "every Mixtral layer is MoE"),
        ("every", moe.every == 1, "every Mixtral layer is MoE"),
        ("num_groups", moe.num_groups is None, "Mixtral has no group-limited routing"),
        ("capacity_factor", moe.capacity_factor is None, "Mixtral is dropless (use null)"),
        ("force_uniform", not moe.force_uniform, "Mixtral routes by its router"),
        ("bias_update_rate", moe.bias_update_rate == 0,
         "Mixtral has no aux-loss-free selection bias"),
    ]
    for name, ok, why in rules:
        if not ok:
            raise UserValueError(
                f"{path}.{name}={getattr(moe, name)!r} cannot be exported to Mixtral: {why}")


def _common_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Fields Llama and Mixtral share."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def to_hf_config(model_cfg: ModelConfig):
    """The transformers config of the same architecture: `MixtralConfig` for an MoE model,
    `LlamaConfig` for a dense one. Raises ValueError naming a field Mixtral cannot express."""
    LlamaConfig, MixtralConfig = _transformers("LlamaConfig", "MixtralConfig")
    model_cfg.validate()
    kwargs = _common_hf_kwargs(model_cfg)
    moe = model_cfg.moe
    if moe is None:
        return LlamaConfig(intermediate_size=model_cfg.ffn_hidden, attention_bias=False,
                           mlp_bias=False, **kwargs)
    check_mixtral_compatible(moe)
    return MixtralConfig(
        intermediate_size=moe.expert_hidden or model_cfg.ffn_hidden,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef * model_cfg.n_layers / moe.top_k,
        router_jitter_noise=moe.router_jitter, sliding_window=None, **kwargs)


# ---------------------------------------------------------------- configs: HF -> mmfm


def _hf_field(hf_cfg, name: str, default: Any = None) -> Any:
    return getattr(hf_cfg, name, default)


def _check_hf_expressible(hf_cfg) -> None:
    """Raise ValueError naming the first transformers config field mmfm cannot express."""
    kind = hf_cfg.model_type
    if kind not in ("mixtral", "llama"):
        raise UserValueError(f"config.model_type={kind!r}: only mixtral and llama can be imported")
    head_dim = _hf_field(hf_cfg, "head_dim") or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rope = _hf_field(hf_cfg, "rope_parameters") or {}
    rules = [
        ("hidden_act", hf_cfg.hidden_act == "silu", "mmfm FFNs are SwiGLU (silu)"),
        ("head_dim", head_dim * hf_cfg.num_attention_heads == hf_cfg.hidden_size,
         "mmfm needs head_dim == hidden_size / num_attention_heads"),
        ("rope_parameters", rope.get("rope_type", "default") == "default",
         "mmfm implements only default (unscaled) RoPE"),
        ("sliding_window", _hf_field(hf_cfg, "sliding_window") is None,
         "mmfm has no sliding-window attention"),
        ("attention_bias", not _hf_field(hf_cfg, "attention_bias", False),
         "mmfm projections have no bias"),
        ("mlp_bias", not _hf_field(hf_cfg, "mlp_bias", False), "mmfm projections have no bias"),
    ]
    for name, ok, why in rules:
        if not ok:
            raise UserValueError(
                f"config.{name}={_hf_field(hf_cfg, name)!r} cannot be imported: {why}")


def from_hf_config(hf_cfg, max_seq_len: int | None = None) -> ModelConfig:
    """The mmfm `ModelConfig` of a Mixtral or Llama transformers config (see module doc for
    the aux-loss coefficient mapping). `max_seq_len` overrides max_position_embeddings."""
    _check_hf_expressible(hf_cfg)
    moe = None
    if hf_cfg.model_type == "mixtral":
        K, L = hf_cfg.num_experts_per_tok, hf_cfg.num_hidden_layers
        moe = MoEConfig(num_experts=hf_cfg.num_local_experts, top_k=K,
                        expert_hidden=hf_cfg.intermediate_size, score_func="softmax",
                        renormalize=True, aux_loss_coef=hf_cfg.router_aux_loss_coef * K / L,
                        z_loss_coef=0.0, seq_aux_loss_coef=0.0,
                        router_jitter=hf_cfg.router_jitter_noise)
    rope = _hf_field(hf_cfg, "rope_parameters") or {}
    cfg = ModelConfig(
        vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers, n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        ffn_hidden=hf_cfg.intermediate_size,
        max_seq_len=max_seq_len or hf_cfg.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", _hf_field(hf_cfg, "rope_theta", 10000.0))),
        norm_eps=hf_cfg.rms_norm_eps, tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=hf_cfg.initializer_range, moe=moe)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- weights


def _layer_to_hf(sd: dict[str, Tensor], i: int, is_moe: bool) -> dict[str, Tensor]:
    """One decoder block's mmfm tensors under their transformers names."""
    src, dst = f"blocks.{i}.", f"model.layers.{i}."
    out = {f"{dst}self_attn.{h}.weight": sd[f"{src}attn.{m}.weight"] for m, h in _ATTN.items()}
    out.update({f"{dst}{h}.weight": sd[f"{src}{m}.weight"] for m, h in _NORMS.items()})
    if not is_moe:
        out.update({f"{dst}mlp.{h}.weight": sd[f"{src}ffn.{m}.weight"] for m, h in _DENSE.items()})
        return out
    w1, w3, w2 = (sd[f"{src}ffn.experts.{w}"] for w in ("w1", "w3", "w2"))  # (E,D,I) x2, (E,I,D)
    out[f"{dst}mlp.gate.weight"] = sd[f"{src}ffn.router.weight"]
    out[f"{dst}mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
    out[f"{dst}mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
    return out


def _layer_from_hf(sd: dict[str, Tensor], i: int, is_moe: bool) -> dict[str, Tensor]:
    """One transformers layer's tensors under their mmfm names (inverse of `_layer_to_hf`)."""
    src, dst = f"model.layers.{i}.", f"blocks.{i}."
    out = {f"{dst}attn.{m}.weight": sd[f"{src}self_attn.{h}.weight"] for m, h in _ATTN.items()}
    out.update({f"{dst}{m}.weight": sd[f"{src}{h}.weight"] for m, h in _NORMS.items()})
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


def to_hf_state_dict(model: Decoder) -> dict[str, Tensor]:
    """The decoder's weights under transformers' in-memory names and layouts."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for block in model.blocks:
        out.update(_layer_to_hf(sd, block.layer_idx, block.is_moe))
    return out


def from_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A transformers Mixtral/Llama state dict under mmfm's names (tied lm_head omitted)."""
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        out.update(_layer_from_hf(sd, i, cfg.moe is not None and cfg.moe.is_moe_layer(i)))
    return out


def _check_no_selection_bias(model: Decoder) -> None:
    """A trained aux-loss-free bias changes which experts are chosen; Mixtral has none."""
    for idx, layer in model.moe_layers():
        if bool(layer.router.expert_bias.any()):
            raise UserValueError(
                f"blocks.{idx}.ffn.router.expert_bias is nonzero (aux-loss-free balancing): "
                "Mixtral selects experts without a bias, so the exported model would route "
                "differently")


# ---------------------------------------------------------------- export / import


def build_hf_model(model: Decoder, model_cfg: ModelConfig):
    """An in-memory transformers model (Mixtral or Llama) holding `model`'s weights."""
    AutoModelForCausalLM = _transformers("AutoModelForCausalLM")

    hf_cfg = to_hf_config(model_cfg)
    _check_no_selection_bias(model)
    dtype = model.embed.weight.dtype
    hf_cfg.dtype = dtype
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, trust_remote_code=False)
    state = {k: v.detach().clone() for k, v in to_hf_state_dict(model).items()}
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
    """(ModelConfig, fp32 Decoder) from an in-memory transformers Mixtral/Llama model or a
    directory `from_pretrained` can read. Raises ValueError naming an inexpressible field."""
    hf = hf_model_or_dir
    if isinstance(hf, (str, Path)):
        hf = _load_hf_dir(Path(hf))
    cfg = from_hf_config(hf.config, max_seq_len=max_seq_len)
    model = Decoder(cfg)
    state = from_hf_state_dict(hf.state_dict(), cfg)
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
    _check_hf_expressible(AutoConfig.from_pretrained(path, **offline))
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
            "repository's own Python code; mmfm import hf never runs it (only mixtral and llama "
            "are imported, with transformers' built-in classes)")
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

