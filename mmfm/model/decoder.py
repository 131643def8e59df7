"""The decoder-only transformer: embeddings, N pre-norm blocks (attention + dense-or-MoE FFN),
final norm and LM head. Returns logits and the summed MoE auxiliary loss; given labels, also the
loss (the LM head fused with the cross entropy where it can be, see `fused_loss.py`).

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.model.fused_loss import IGNORE_INDEX, fused_linear_cross_entropy
from mmfm.model.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    VarlenDocs,
    document_causal_mask,
    output_std,
    varlen_docs,
)
from mmfm.model.rope import depends_on_length, rope_cos_sin
from mmfm.moe import MoELayer


@dataclass
class DecoderOutput:
    logits: Tensor | None  # (B, T, V); None when the loss was fused with the LM head
    aux_loss: Tensor  # scalar: summed, coefficient-weighted MoE losses (0 for dense models)
    # Given labels: mean cross entropy over non-ignored targets, and its per-token values
    # (B, T), detached, 0 where ignored (for per-group metrics).
    lm_loss: Tensor | None = None
    token_loss_BT: Tensor | None = None


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + ffn(norm(h)); the FFN is dense or MoE."""

    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.attention,
                              qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.moe is not None and cfg.moe.is_moe_layer(layer_idx)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, cfg.d_model, cfg.ffn_hidden, init_std=cfg.init_std)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, h_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | VarlenDocs | None,
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
        # Whether forward(labels_BT=...) may fuse the head with the loss, reading the head's
        # weight directly. `mmfm.parallel.parallelize` turns it off where the weight is not a
        # plain local tensor (a tensor-parallel DTensor, a DeepSpeed ZeRO-3 partition).
        self.fused_head = cfg.fused_loss
        # Context parallelism (`mmfm.parallel.context_parallel`): forward takes full sequences,
        # keeps this rank's chunk and returns whole-sequence losses; None: no splitting.
        self.context_parallel = None
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Not persistent: derived from the config, so checkpoints stay portable.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Sequences up to this length use plain RoPE (see scale_rope_beyond_original); None:
        # model.rope_scaling applies at every length.
        self.plain_rope_up_to: int | None = None
        self.reset_parameters()

    def scale_rope_beyond_original(self) -> None:
        """Apply `model.rope_scaling` only to sequences longer than its
        `original_max_seq_len`; shorter ones rotate with plain RoPE, as the model was trained
        before its context was extended. The rule of length-scheduled training
        (`train.seq_len_schedule`, mmfm/seq_len.py); without this call (imported models,
        inference, unscheduled runs) the scaling applies at every length, as transformers does."""
        scaling = self.cfg.rope_scaling
        if scaling is None:
            return
        up_to = min(scaling.original_max_seq_len, self.cfg.max_seq_len)
        cos, sin = rope_cos_sin(up_to, self.cfg.head_dim, self.cfg.rope_theta, None,
                                device=self.rope_cos.device)
        self.register_buffer("rope_cos_plain", cos.to(self.rope_cos.dtype), persistent=False)
        self.register_buffer("rope_sin_plain", sin.to(self.rope_sin.dtype), persistent=False)
        self.plain_rope_up_to = up_to

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
                modality_ids_BT: Tensor | None = None,
                labels_BT: Tensor | None = None) -> DecoderOutput:
        """Logits for `input_ids_BT`; `inputs_embeds_BTD`, when given, replaces the token
        embedding lookup (multimodal fusion scatters media embeddings into it first);
        `modality_ids_BT` (0 text, 1 image, 2 audio) reaches modality-aware MoE FFNs.

        With `labels_BT` the output also holds the loss; where the LM head is a plain local
        weight, head and loss are fused (`fused_linear_cross_entropy`) and no logits are made.
        """
        T = input_ids_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise UserValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self._rope_tables(T)  # whole sequences, also under context parallelism
        mask = _attention_mask(doc_ids_BT, self.cfg.attention)
        cp = self.context_parallel
        if cp is not None:  # this rank's chunk of every sequence from here to the loss
            input_ids_BT, inputs_embeds_BTD, modality_ids_BT, labels_BT = (
                cp.local(t) for t in (input_ids_BT, inputs_embeds_BTD, modality_ids_BT, labels_BT))
        h_BTD = self.embed(input_ids_BT) if inputs_embeds_BTD is None else inputs_embeds_BTD
        aux = h_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h_BTD, block_aux = block(h_BTD, cos, sin, mask, modality_ids_BT)
            aux = aux + block_aux
        out = self._head(self.norm(h_BTD), aux, labels_BT)
        return out if cp is None else _whole_sequences(cp, out, labels_BT)

    def _head(self, h_BTD: Tensor, aux: Tensor, labels_BT: Tensor | None) -> DecoderOutput:
        """LM head and, given labels, the loss (fused with the head where it can be)."""
        if labels_BT is not None and self.fused_head:
            loss, token_loss_N = fused_linear_cross_entropy(
                h_BTD.flatten(0, 1), self.lm_head.weight, labels_BT.flatten())
            return DecoderOutput(None, aux, loss, token_loss_N.view_as(labels_BT))
        logits_BTV = self.lm_head(h_BTD)
        if labels_BT is None:
            return DecoderOutput(logits_BTV, aux)
        token_loss_BT = token_losses(logits_BTV, labels_BT)
        num_targets = (labels_BT != IGNORE_INDEX).sum().clamp(min=1)
        return DecoderOutput(logits_BTV, aux, token_loss_BT.sum() / num_targets,
                             token_loss_BT.detach())

    def _rope_tables(self, T: int) -> tuple[Tensor, Tensor]:
        if self.plain_rope_up_to is not None and T <= self.plain_rope_up_to:
            return self.rope_cos_plain[:T], self.rope_sin_plain[:T]
        return rope_tables(self.cfg, self.rope_cos, self.rope_sin, T)

    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(layer index, MoE layer) for every MoE block, for metrics and bias updates."""
        for block in self.blocks:
            if block.is_moe:
                yield block.layer_idx, block.ffn


def _whole_sequences(cp, out: DecoderOutput, labels_Bt: Tensor | None) -> DecoderOutput:
    """A context-parallel rank's output as one process's: whole-sequence losses (see
    `mmfm.parallel.context_parallel`), per-token losses and label-free logits gathered (no
    gradient); logits of a forward with labels are not kept (the loss is what it is for)."""
    lm, aux = cp.global_losses(out.lm_loss, labels_Bt, out.aux_loss)
    if labels_Bt is None:
        return DecoderOutput(cp.gather(out.logits), aux)
    return DecoderOutput(None, aux, lm, cp.gather(out.token_loss_BT))


def rope_tables(cfg, cos_cache: Tensor, sin_cache: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """(T, Dh) cos and sin: a slice of the cached tables, or for dynamic NTK scaling (whose
    frequencies depend on the sequence length) tables built for this T. Pipeline stages share
    it, so every layout rotates alike."""
    if depends_on_length(cfg.rope_scaling):
        cos, sin = rope_cos_sin(T, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                device=cos_cache.device)
        return cos.to(cos_cache.dtype), sin.to(sin_cache.dtype)
    return cos_cache[:T], sin_cache[:T]


def _attention_mask(doc_ids_BT: Tensor | None, backend: str = "sdpa"
                    ) -> Tensor | VarlenDocs | None:
    """None (plain causal, the fast path) unless some row packs more than one document; then
    the document mask in the form the attention backend takes."""
    if doc_ids_BT is None or bool((doc_ids_BT == doc_ids_BT[:, :1]).all()):
        return None
    if backend == "flash_attn":
        return varlen_docs(doc_ids_BT)
    return document_causal_mask(doc_ids_BT)


def token_losses(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Per-token next-token cross entropy (fp32), 0 where the label is IGNORE_INDEX."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none").view_as(labels_BT)


def lm_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Mean next-token cross entropy over positions whose label is not IGNORE_INDEX (fp32)."""
    return F.cross_entropy(
        logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX
    )
