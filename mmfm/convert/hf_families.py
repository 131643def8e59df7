"""Which transformers class holds an mmfm model, and the config mapping both ways.

Export picks the first family that can express the model (`export_family`):

    moe: null, qk_norm none, no qkv bias      LlamaForCausalLM
    moe: null, qkv_bias                       Qwen2ForCausalLM
    moe: null, qk_norm head                   Qwen3ForCausalLM
    sigmoid router (DeepSeek-V3 style)        Glm4MoeForCausalLM: sigmoid scores, aux-loss-free
                                              selection bias (e_score_correction_bias), shared
                                              experts, dense first layers, group-limited top-k,
                                              and standard grouped-query attention (DeepSeek-V3's
                                              own class needs MLA attention, which mmfm lacks)
    softmax + shared experts                  Qwen2MoeForCausalLM (needs the sigmoid shared gate)
    softmax + qk_norm head                    Qwen3MoeForCausalLM
    softmax + qk_norm full                    OlmoeForCausalLM
    softmax otherwise                         MixtralForCausalLM

Each family lists rules (field, holds?, why); the first broken rule is raised as one
`UserValueError` naming the field. Import reads the same families (and Glm4Moe back).

Load-balancing coefficient (Mixtral, OLMoE, Qwen-MoE). Per layer, transformers'
`load_balancing_loss_func` is K times mmfm's Switch loss (it normalizes expert counts by tokens,
mmfm by tokens × K). mmfm sums `aux_loss_coef × loss` over its L MoE layers; transformers computes
one loss over all layers' router logits pooled (a mean, not a sum). We export
`router_aux_loss_coef = aux_loss_coef × L / K`, which gives equal values under uniform routing
and equal gradients whenever the layers' loads agree; import inverts it. None of these classes
has a router z-loss or a sequence-level loss: export drops them (training-only), import sets them
to 0. Glm4Moe has no auxiliary loss at all: import sets aux_loss_coef to 0 too.
"""

from __future__ import annotations

from typing import Any

from mmfm.config import ModelConfig
from mmfm.errors import UserValueError
from mmfm.model.rope import RopeScalingConfig
from mmfm.moe import MoEConfig

# model_type -> transformers class name, for messages and docs.
CLASS_NAMES = {
    "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
    "olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "glm4_moe": "Glm4Moe",
}
_SOFTMAX_MOE = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_DENSE = ("llama", "qwen2", "qwen3")


# ---------------------------------------------------------------- which family


def export_family(cfg: ModelConfig) -> str:
    """The transformers model_type that will hold `cfg` (its rules are checked separately)."""
    if cfg.moe is None:
        if cfg.qkv_bias:
            return "qwen2"
        return "qwen3" if cfg.qk_norm == "head" else "llama"
    if cfg.moe.score_func == "sigmoid":
        return "glm4_moe"
    if cfg.moe.num_shared_experts:
        return "qwen2_moe"
    return {"head": "qwen3_moe", "full": "olmoe"}.get(cfg.qk_norm, "mixtral")


def _model_rules(cfg: ModelConfig, family: str) -> list[tuple[str, bool, str]]:
    """(field under `model.`, holds?, why) for the attention side."""
    qk = {"llama": "none", "qwen2": "none", "qwen3": "head", "mixtral": "none", "olmoe": "full",
          "qwen2_moe": "none", "qwen3_moe": "head"}.get(family)
    rules = []
    if qk is not None:
        rules.append(("qk_norm", cfg.qk_norm == qk, f"it has qk_norm={qk}"))
    elif cfg.qk_norm == "full":  # glm4_moe: per-head only
        rules.append(("qk_norm", False, "its QK-norm is per head (use head)"))
    if family not in ("qwen2", "qwen2_moe", "glm4_moe"):
        rules.append(("qkv_bias", not cfg.qkv_bias, "its q/k/v projections have no bias"))
    if family == "qwen2":
        rules.append(("qkv_bias", cfg.qkv_bias, "its q/k/v projections always have a bias"))
    return rules


def _moe_rules(moe: MoEConfig, family: str) -> list[tuple[str, bool, str]]:
    """(field under `model.moe.`, holds?, why) for the routed FFN."""
    rules = [
        ("capacity_factor", moe.capacity_factor is None,
         "transformers MoE classes are dropless (use null)"),
        ("force_uniform", not moe.force_uniform, "transformers routes by the router"),
        ("shared_expert_gate", moe.shared_expert_gate == (family == "qwen2_moe"),
         "only Qwen2-MoE gates its shared expert, and it always does"),
    ]
    if family in _SOFTMAX_MOE:
        rules += [
            ("bias_update_rate", moe.bias_update_rate == 0, "it has no aux-loss-free selection bias"),
            ("num_groups", moe.num_groups is None, "it has no group-limited routing"),
        ]
    if family == "mixtral":
        rules += [
            ("renormalize", moe.renormalize, "Mixtral renormalizes the chosen k scores"),
            ("top_k", moe.top_k >= 2, "with top_k=1 mmfm scales the expert output by its router "
                                      "probability (Switch) while Mixtral renormalizes it to 1"),
        ]
    else:
        rules.append(("top_k", moe.top_k >= 2 or not moe.renormalize,
                      "with top_k=1 and renormalize mmfm keeps the probability while "
                      "transformers renormalizes it to 1 (set renormalize=false)"))
    if family in ("mixtral", "olmoe"):
        rules += [("first_dense", moe.first_dense == 0, "every layer is MoE"),
                  ("every", moe.every == 1, "every layer is MoE")]
    if family in ("mixtral", "olmoe", "qwen3_moe"):
        rules.append(("num_shared_experts", moe.num_shared_experts == 0, "it has no shared experts"))
    if family == "qwen2_moe":
        rules.append(("num_shared_experts", moe.num_shared_experts == 1,
                      "Qwen2-MoE has exactly one shared expert (widen shared_expert_hidden)"))
    if family == "glm4_moe":
        rules += [
            ("every", moe.every == 1, "Glm4Moe's MoE layers are all those after the dense ones"),
            ("shared_expert_hidden",
             moe.shared_expert_hidden in (None, moe.expert_hidden),
             "Glm4Moe's shared experts are as wide as the routed ones"),
            ("num_groups", moe.num_groups is None
             or moe.num_experts // moe.num_groups >= 2,
             "Glm4Moe scores a group by its two best experts: groups need >= 2 experts"),
        ]
    return rules


def check_exportable(cfg: ModelConfig, family: str | None = None) -> str:
    """The family that holds `cfg`; raise UserValueError naming the first field it cannot."""
    family = family or export_family(cfg)
    name = CLASS_NAMES[family]
    for field, ok, why in _model_rules(cfg, family):
        if not ok:
            raise UserValueError(
                f"model.{field}={getattr(cfg, field)!r} cannot be exported to {name}: {why}")
    if cfg.moe is not None:
        for field, ok, why in _moe_rules(cfg.moe, family):
            if not ok:
                raise UserValueError(f"model.moe.{field}={getattr(cfg.moe, field)!r} cannot be "
                                     f"exported to {name}: {why}")
    return family


def check_mixtral_compatible(moe: MoEConfig, path: str = "model.moe") -> None:
    """Raise UserValueError naming the first MoE field Mixtral cannot express (kept for callers
    that need Mixtral specifically, e.g. the transformers Mixtral benchmark)."""
    rules = [("score_func", moe.score_func == "softmax", "Mixtral routes with softmax scores"),
             ("num_shared_experts", moe.num_shared_experts == 0, "Mixtral has no shared experts")]
    for field, ok, why in rules + _moe_rules(moe, "mixtral"):
        if not ok:
            raise UserValueError(
                f"{path}.{field}={getattr(moe, field)!r} cannot be exported to Mixtral: {why}")


# ---------------------------------------------------------------- configs: mmfm -> HF


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` for the model's RoPE (and scaling)."""
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    s = cfg.rope_scaling
    if s is None:
        return out
    out.update(rope_type=s.type, factor=float(s.factor))
    if s.type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


def _common_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Fields every family shares. Dynamic NTK scaling reads its original length from
    max_position_embeddings in transformers, so that is what we write for it."""
    max_pos = cfg.max_seq_len
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic":
        max_pos = cfg.rope_scaling.original_max_seq_len
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=max_pos,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_parameters(cfg),
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def _num_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.moe.is_moe_layer(i) for i in range(cfg.n_layers))


def _hf_aux_coef(cfg: ModelConfig) -> float:
    return cfg.moe.aux_loss_coef * _num_moe_layers(cfg) / cfg.moe.top_k


def _sparse_layout(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen-MoE's layer layout: MoE when (i+1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers; mmfm's dense prefix goes to mlp_only_layers."""
    moe = cfg.moe
    dense = [i for i in range(cfg.n_layers) if not moe.is_moe_layer(i)]
    return dict(decoder_sparse_step=1, mlp_only_layers=dense)


def _moe_kwargs(cfg: ModelConfig, family: str) -> dict[str, Any]:
    moe = cfg.moe
    hidden = moe.expert_hidden or cfg.ffn_hidden
    kw: dict[str, Any] = dict(num_experts_per_tok=moe.top_k, output_router_logits=False)
    if family == "mixtral":
        return kw | dict(intermediate_size=hidden, num_local_experts=moe.num_experts,
                         router_aux_loss_coef=_hf_aux_coef(cfg),
                         router_jitter_noise=moe.router_jitter, sliding_window=None)
    if family == "glm4_moe":
        return kw | dict(
            intermediate_size=cfg.ffn_hidden, moe_intermediate_size=hidden,
            n_routed_experts=moe.num_experts, n_shared_experts=moe.num_shared_experts,
            routed_scaling_factor=1.0, n_group=moe.num_groups or 1,
            topk_group=moe.topk_groups or 1, first_k_dense_replace=moe.first_dense,
            norm_topk_prob=moe.renormalize, use_qk_norm=cfg.qk_norm == "head",
            attention_bias=cfg.qkv_bias, num_mtp_layers=0,
            # Glm4Moe rotates half of each head by default; mmfm rotates all of it.
            partial_rotary_factor=1.0,
            rope_parameters=rope_parameters(cfg) | {"partial_rotary_factor": 1.0})
    kw |= dict(num_experts=moe.num_experts, norm_topk_prob=moe.renormalize,
               router_aux_loss_coef=_hf_aux_coef(cfg))
    if family == "olmoe":
        return kw | dict(intermediate_size=hidden, clip_qkv=None, attention_bias=False)
    kw |= dict(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=hidden,
               use_sliding_window=False, **_sparse_layout(cfg))
    if family == "qwen3_moe":
        return kw | dict(attention_bias=False, sliding_window=None)
    shared = (moe.shared_expert_hidden or hidden) * moe.num_shared_experts
    return kw | dict(shared_expert_intermediate_size=shared, qkv_bias=cfg.qkv_bias)


def to_hf_config(model_cfg: ModelConfig):
    """The transformers config of the same architecture (family per `export_family`). Raises
    UserValueError naming the first field the family cannot express."""
    from transformers import AutoConfig

    model_cfg.validate()
    family = check_exportable(model_cfg)
    kwargs = _common_hf_kwargs(model_cfg)
    if family in _DENSE:
        kwargs["intermediate_size"] = model_cfg.ffn_hidden
        if family == "llama":
            kwargs.update(attention_bias=False, mlp_bias=False)
        if family in ("qwen2", "qwen3"):
            kwargs.update(use_sliding_window=False, sliding_window=None)
        if family == "qwen3":
            kwargs["attention_bias"] = False
    else:
        kwargs.update(_moe_kwargs(model_cfg, family))
    return AutoConfig.for_model(family, **kwargs)


# ---------------------------------------------------------------- configs: HF -> mmfm


def _hf_field(hf_cfg, name: str, default: Any = None) -> Any:
    return getattr(hf_cfg, name, default)


def _rope_rules(hf_cfg) -> list[tuple[str, bool, str]]:
    rope = _hf_field(hf_cfg, "rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    return [
        ("rope_parameters", kind in ("default", "linear", "dynamic", "yarn", "llama3"),
         f"mmfm has no {kind!r} RoPE scaling"),
        ("rope_parameters", rope.get("partial_rotary_factor", 1.0) == 1.0,
         "mmfm rotates the whole head (partial_rotary_factor must be 1)"),
        ("rope_parameters", not (rope.get("mscale") or rope.get("mscale_all_dim")),
         "mmfm's YaRN has no mscale/mscale_all_dim"),
    ]


def _import_rules(hf_cfg) -> list[tuple[str, bool, str]]:
    kind = hf_cfg.model_type
    head_dim = _hf_field(hf_cfg, "head_dim") or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rules = [
        ("hidden_act", hf_cfg.hidden_act == "silu", "mmfm FFNs are SwiGLU (silu)"),
        ("head_dim", head_dim * hf_cfg.num_attention_heads == hf_cfg.hidden_size,
         "mmfm needs head_dim == hidden_size / num_attention_heads"),
        ("use_sliding_window", not _hf_field(hf_cfg, "use_sliding_window", False),
         "mmfm has no sliding-window attention"),
        ("mlp_bias", not _hf_field(hf_cfg, "mlp_bias", False), "mmfm FFNs have no bias"),
        ("clip_qkv", _hf_field(hf_cfg, "clip_qkv") is None, "mmfm does not clip q/k/v"),
        ("routed_scaling_factor", _hf_field(hf_cfg, "routed_scaling_factor", 1.0) == 1.0,
         "mmfm does not scale routed expert outputs"),
    ]
    if kind == "mixtral":
        rules.append(("sliding_window", _hf_field(hf_cfg, "sliding_window") is None,
                      "mmfm has no sliding-window attention"))
    if kind not in ("qwen2_moe", "glm4_moe"):  # their flags are q/k/v-only biases
        rules.append(("attention_bias", not _hf_field(hf_cfg, "attention_bias", False),
                      "mmfm's output projection has no bias"))
    topk_norm = _hf_field(hf_cfg, "norm_topk_prob", kind == "mixtral")
    rules.append(("num_experts_per_tok", _hf_field(hf_cfg, "num_experts_per_tok", 2) > 1
                  or not topk_norm,
                  "top-1 with norm_topk_prob: mmfm keeps the probability, not 1"))
    if kind == "qwen2_moe":
        rules.append(("shared_expert_intermediate_size",
                      hf_cfg.shared_expert_intermediate_size > 0, "mmfm needs a shared expert"))
    return rules + _rope_rules(hf_cfg)


def check_importable(hf_cfg) -> None:
    """Raise UserValueError naming the first transformers config field mmfm cannot express."""
    kind = hf_cfg.model_type
    if kind not in CLASS_NAMES:
        raise UserValueError(f"config.model_type={kind!r}: mmfm imports only "
                             f"{', '.join(CLASS_NAMES)}")
    for name, ok, why in _import_rules(hf_cfg):
        if not ok:
            raise UserValueError(
                f"config.{name}={_hf_field(hf_cfg, name)!r} cannot be imported: {why}")


def _rope_from_hf(hf_cfg) -> tuple[float, RopeScalingConfig | None]:
    rope = _hf_field(hf_cfg, "rope_parameters") or {}
    theta = float(rope.get("rope_theta", _hf_field(hf_cfg, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return theta, None
    original = rope.get("original_max_position_embeddings") or hf_cfg.max_position_embeddings
    if kind == "dynamic":
        original = hf_cfg.max_position_embeddings
    s = RopeScalingConfig(type=kind, factor=float(rope["factor"]), original_max_seq_len=original)
    for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor"):
        if rope.get(name) is not None:
            setattr(s, name, float(rope[name]))
    s.truncate = bool(rope.get("truncate", True))
    return theta, s


def _layer_layout(hf_cfg) -> tuple[int, int]:
    """(first_dense, every) reproducing the family's set of MoE layers; raises naming
    mlp_only_layers when no such pair exists."""
    L = hf_cfg.num_hidden_layers
    kind = hf_cfg.model_type
    if kind == "glm4_moe":
        return hf_cfg.first_k_dense_replace, 1
    if kind not in ("qwen2_moe", "qwen3_moe"):
        return 0, 1
    step, only = hf_cfg.decoder_sparse_step, set(hf_cfg.mlp_only_layers or ())
    want = [i not in only and (i + 1) % step == 0 for i in range(L)]
    for first in range(L):
        for every in range(1, L + 1):
            if [i >= first and (i - first) % every == 0 for i in range(L)] == want:
                return first, every
    raise UserValueError(f"config.mlp_only_layers={sorted(only)} with decoder_sparse_step={step} "
                         "cannot be imported: mmfm's MoE layers are a dense prefix then every "
                         "n-th layer")


def _moe_from_hf(hf_cfg) -> MoEConfig | None:
    kind = hf_cfg.model_type
    if kind in _DENSE:
        return None
    K = hf_cfg.num_experts_per_tok
    first, every = _layer_layout(hf_cfg)
    moe = MoEConfig(top_k=K, first_dense=first, every=every, z_loss_coef=0.0,
                    seq_aux_loss_coef=0.0, renormalize=bool(_hf_field(hf_cfg, "norm_topk_prob",
                                                                   kind == "mixtral")))
    if kind == "glm4_moe":
        groups = hf_cfg.n_group if hf_cfg.n_group > 1 else None
        return _replace(moe, num_experts=hf_cfg.n_routed_experts, score_func="sigmoid",
                        expert_hidden=hf_cfg.moe_intermediate_size,
                        num_shared_experts=hf_cfg.n_shared_experts, num_groups=groups,
                        topk_groups=hf_cfg.topk_group if groups else None, aux_loss_coef=0.0)
    moe.num_experts = hf_cfg.num_local_experts if kind == "mixtral" else hf_cfg.num_experts
    moe.expert_hidden = (hf_cfg.intermediate_size if kind in ("mixtral", "olmoe")
                         else hf_cfg.moe_intermediate_size)
    n_moe = sum(moe.is_moe_layer(i) for i in range(hf_cfg.num_hidden_layers))
    moe.aux_loss_coef = hf_cfg.router_aux_loss_coef * K / max(n_moe, 1)
    moe.router_jitter = _hf_field(hf_cfg, "router_jitter_noise", 0.0) or 0.0
    if kind == "qwen2_moe":
        moe.num_shared_experts, moe.shared_expert_gate = 1, True
        moe.shared_expert_hidden = hf_cfg.shared_expert_intermediate_size
    return moe


def _replace(moe: MoEConfig, **changes) -> MoEConfig:
    for name, value in changes.items():
        setattr(moe, name, value)
    return moe


def _attention_from_hf(hf_cfg) -> dict[str, Any]:
    kind = hf_cfg.model_type
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(kind, "none")
    if kind == "glm4_moe" and hf_cfg.use_qk_norm:
        qk_norm = "head"
    qkv_bias = {"qwen2": True, "qwen2_moe": _hf_field(hf_cfg, "qkv_bias", False),
                "glm4_moe": _hf_field(hf_cfg, "attention_bias", False)}.get(kind, False)
    return dict(qk_norm=qk_norm, qkv_bias=bool(qkv_bias))


def from_hf_config(hf_cfg, max_seq_len: int | None = None) -> ModelConfig:
    """The mmfm `ModelConfig` of a transformers config of a supported family. `max_seq_len`
    overrides max_position_embeddings (for dynamic NTK scaling, where transformers stores the
    original length there, the default is max_position_embeddings × factor)."""
    check_importable(hf_cfg)
    theta, scaling = _rope_from_hf(hf_cfg)
    default_len = hf_cfg.max_position_embeddings
    if scaling is not None and scaling.type == "dynamic":
        default_len = int(default_len * scaling.factor)
    cfg = ModelConfig(
        vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers, n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
        ffn_hidden=hf_cfg.intermediate_size, max_seq_len=max_seq_len or default_len,
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings), init_std=hf_cfg.initializer_range,
        moe=_moe_from_hf(hf_cfg), **_attention_from_hf(hf_cfg))
    cfg.validate()
    return cfg
