"""Human-readable summary of a config's size: `mmfm info`."""

from __future__ import annotations

from mmfm.model.counting import count_params, dense_equivalent, flops_per_token
from mmfm.model.memory import estimate_memory

CONVENTION = ("FLOPs/token = 6*N + 12*L*D*T (PaLM convention; N = active matmul weights incl. "
              "LM head, attention term without causal discount)")


def _summary(model_cfg, seq_len: int) -> list[str]:
    counts = count_params(model_cfg)
    return [
        f"  total parameters:   {counts.total:,}",
        f"  active parameters:  {counts.active:,} ({counts.active_non_embedding:,} non-embedding)",
        f"  training FLOPs/token at T={seq_len}: {flops_per_token(model_cfg, seq_len):,}",
    ]


def describe(cfg) -> str:
    m = cfg.model
    kind = f"MoE (E={m.moe.num_experts}, k={m.moe.top_k})" if m.moe else "dense"
    lines = [f"{cfg.run.name}: {kind}, {m.n_layers} layers, d_model={m.d_model}, "
             f"heads={m.n_heads}/{m.n_kv_heads} kv, ffn_hidden={m.ffn_hidden}"]
    lines += _summary(m, cfg.data.seq_len)
    lines.append(f"  memory per process (estimate, see mmfm.model.memory): "
                 f"{estimate_memory(cfg).describe()}")
    if m.moe is not None:
        twin = dense_equivalent(m)
        ratio = count_params(twin).active / count_params(m).active
        lines.append(f"dense equivalent: ffn_hidden={twin.ffn_hidden} "
                     f"(active params ratio {ratio:.4f})")
        lines += _summary(twin, cfg.data.seq_len)
    lines.append(CONVENTION)
    return "\n".join(lines)
