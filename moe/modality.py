"""Modality-aware Mixture-of-Experts (MoMa, Lin et al. 2024) and per-modality load tracking.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, E experts, M modalities.
Modality ids: 0 text, 1 image, 2 audio (``MODALITIES``).

* :class:`ModalityExperts`: experts partitioned into modality groups, each group an ordinary
  :class:`~mmfm.moe.MoELayer` with its own router, so a token is routed only among its own
  modality's experts. Modalities without a group use the text group. The auxiliary loss is
  the sum of the groups' losses, each balancing its group over its own tokens.
* :class:`ModalityTrackedMoELayer`: plain shared routing (one router over all tokens,
  exactly ``MoELayer``, same state-dict keys) that also counts each modality's tokens per
  expert, for the "which experts serve images" metrics.

Both take ``(x, modality_ids)``; the decoder block passes the ids when an FFN sets
``takes_modality_ids``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.moe.config import MoEConfig
from mmfm.moe.layer import MoELayer
from mmfm.moe.losses import tokens_per_expert
from mmfm.moe.metrics import in_backward, load_stats

MODALITIES = ("text", "image", "audio")


class ModalityExperts(nn.Module):
    """Expert groups per modality, each with its own router (MoMa)."""

    takes_modality_ids = True

    def __init__(self, cfg: MoEConfig, groups: dict[str, int], d_model: int,
                 default_expert_hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        if "text" not in groups or set(groups) - set(MODALITIES):
            raise UserValueError(f"modality expert groups {dict(groups)} must include 'text' and "
                             f"only name {', '.join(MODALITIES)}")
        self.groups = nn.ModuleDict({
            name: MoELayer(dataclasses.replace(cfg, num_experts=n), d_model,
                           default_expert_hidden, init_std=init_std)
            for name, n in groups.items()})
        # modality id -> index into self.groups (missing modalities fall back to text)
        names = list(self.groups)
        self.group_of = [names.index(m) if m in groups else names.index("text")
                         for m in MODALITIES]

    def reset_parameters(self, out_std: float | None = None) -> None:
        for layer in self.groups.values():
            layer.reset_parameters(out_std)

    def forward(self, x_BSD: Tensor, modality_ids_BS: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, S, D) -> (y (B, S, D), summed aux loss), each token through its group."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        group_T = self._token_groups(modality_ids_BS, B * S, x_BSD.device)
        y_TD = torch.zeros_like(x_TD)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        for g, layer in enumerate(self.groups.values()):
            idx = (group_T == g).nonzero().squeeze(1)
            if idx.numel() == 0 and not layer.expert_parallel:
                # No token of this modality: the group sits out. Under expert parallelism it
                # cannot: the other ranks of its ep group may hold such tokens, and every rank
                # must enter the group's collectives (it routes 0 tokens, adds 0 loss).
                continue
            y_1ND, group_aux = layer(x_TD.index_select(0, idx)[None])
            y_TD = y_TD.index_copy(0, idx, y_1ND[0].to(y_TD.dtype))
            aux = aux + group_aux
        return y_TD.view(B, S, D), aux

    def _token_groups(self, modality_ids_BS: Tensor | None, T: int, device) -> Tensor:
        lookup = torch.tensor(self.group_of, device=device)
        if modality_ids_BS is None:
            return lookup[0].expand(T)
        return lookup[modality_ids_BS.reshape(T).long()]

    def compute_metrics(self, reset: bool = True) -> dict[str, tuple[Tensor, str]]:
        """Each group's load metrics, named `<modality>/<metric>`."""
        return {f"{name}/{metric}": value
                for name, layer in self.groups.items()
                for metric, value in layer.compute_metrics(reset=reset).items()}

    @torch.no_grad()
    def update_bias(self, group: dist.ProcessGroup | None = None) -> None:
        for layer in self.groups.values():
            layer.update_bias(group)


class ModalityTrackedMoELayer(MoELayer):
    """`MoELayer` (shared routing) that also counts tokens per expert for each modality.

    The per-modality counts are non-persistent buffers, so checkpoints are interchangeable
    with a plain `MoELayer`'s.
    """

    takes_modality_ids = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("modality_tokens_ME",
                             torch.zeros(len(MODALITIES), self.cfg.num_experts, dtype=torch.int64),
                             persistent=False)
        self._modality_ids_T: Tensor | None = None
        self.router.register_forward_hook(self._count_by_modality)

    def forward(self, x: Tensor, modality_ids_BS: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._modality_ids_T = None if modality_ids_BS is None else modality_ids_BS.reshape(-1)
        try:
            return super().forward(x)
        finally:
            self._modality_ids_T = None

    @torch.no_grad()
    def _count_by_modality(self, router: nn.Module, inputs, out) -> None:
        ids_T = self._modality_ids_T
        if ids_T is None or not self.training or in_backward():
            return
        E = self.cfg.num_experts
        for m in range(len(MODALITIES)):
            sel_T = ids_T == m
            if bool(sel_T.any()):
                self.modality_tokens_ME[m].add_(tokens_per_expert(out.topk_idx_TK[sel_T], E))

    def compute_metrics(self, reset: bool = True) -> dict[str, tuple[Tensor, str]]:
        """MoELayer's metrics plus `<modality>/tokens_per_expert` and `<modality>/load_imbalance`
        for every modality (zeros for one not routed since the last reset): every rank returns
        the same names, since distributed runs reduce them name by name over the ranks."""
        out = super().compute_metrics(reset=reset)
        for m, name in enumerate(MODALITIES):
            counts_E = self.modality_tokens_ME[m]
            out[f"{name}/tokens_per_expert"] = (counts_E.clone(), "sum")
            out[f"{name}/load_imbalance"] = (load_stats(counts_E)["load_imbalance"], "max")
        if reset:
            self.modality_tokens_ME.zero_()
        return out
