"""The decoder-only transformer: embeddings, N pre-norm blocks (attention + dense-or-MoE FFN),
final norm and LM head. Returns logits and the summed MoE auxiliary loss.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.model.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    document_causal_mask,
    output_std,
    rope_cos_sin,
)
from mmfm.moe import MoELayer

IGNORE_INDEX = -100


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, V)
    aux_loss: Tensor  # scalar: summed, coefficient-weighted MoE losses (0 for dense models)


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + ffn(norm(h)); the FFN is dense or MoE."""

    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.moe is not None and cfg.moe.is_moe_layer(layer_idx)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, cfg.d_model, cfg.ffn_hidden, init_std=cfg.init_std)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, h_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                modality_ids_BT: Tensor | None = None):
        h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD), cos, sin, mask)
        if self.is_moe and getattr(self.ffn, "takes_modality_ids", False):
            # Modality-aware experts (mmfm.moe.modality) route each token within its group.
            ffn_out, aux = self.ffn(self.ffn_norm(h_BTD), modality_ids_BT)
        elif self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(h_BTD))
        else:
            ffn_out, aux = self.ffn(self.ffn_norm(h_BTD)), h_BTD.new_zeros((), dtype=torch.float32)
        return h_BTD + ffn_out, aux


class Decoder(nn.Module):
    """Decoder-only MoE (or dense) language model described by a `ModelConfig`."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay portable.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, output_std(self.cfg.init_std, self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            block.attn.reset_parameters(std, out_std)
            block.attn_norm.weight.data.fill_(1.0)
            block.ffn_norm.weight.data.fill_(1.0)
            if block.is_moe:
                block.ffn.reset_parameters(out_std)
            else:
                block.ffn.reset_parameters(std, out_std)
        self.norm.weight.data.fill_(1.0)

    def forward(self, input_ids_BT: Tensor, doc_ids_BT: Tensor | None = None,
                inputs_embeds_BTD: Tensor | None = None,
                modality_ids_BT: Tensor | None = None) -> DecoderOutput:
        """Logits for `input_ids_BT`; `inputs_embeds_BTD`, when given, replaces the token
        embedding lookup (multimodal fusion scatters media embeddings into it first);
        `modality_ids_BT` (0 text, 1 image, 2 audio) reaches modality-aware MoE FFNs."""
        T = input_ids_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = _attention_mask(doc_ids_BT)
        h_BTD = self.embed(input_ids_BT) if inputs_embeds_BTD is None else inputs_embeds_BTD
        aux = h_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h_BTD, block_aux = block(h_BTD, cos, sin, mask, modality_ids_BT)
            aux = aux + block_aux
        return DecoderOutput(self.lm_head(self.norm(h_BTD)), aux)

    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(layer index, MoE layer) for every MoE block, for metrics and bias updates."""
        for block in self.blocks:
            if block.is_moe:
                yield block.layer_idx, block.ffn


def _attention_mask(doc_ids_BT: Tensor | None) -> Tensor | None:
    """None (plain causal, the fast path) unless some row packs more than one document."""
    if doc_ids_BT is None or bool((doc_ids_BT == doc_ids_BT[:, :1]).all()):
        return None
    return document_causal_mask(doc_ids_BT)


def lm_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Mean next-token cross entropy over positions whose label is not IGNORE_INDEX (fp32)."""
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX
    )
