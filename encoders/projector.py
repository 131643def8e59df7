"""Projectors from an encoder's width to the decoder's: linear, or a 2-layer MLP with GELU
(LLaVA-1.5's connector). Shape legend: N items, T tokens, E encoder width, D decoder width."""

from __future__ import annotations

from torch import Tensor, nn

from mmfm.errors import UserValueError


class Projector(nn.Module):
    """(N, T, E) encoder outputs -> (N, T, D) decoder-width embeddings."""

    def __init__(self, kind: str, d_in: int, d_out: int) -> None:
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(d_in, d_out)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
        else:
            raise UserValueError(f"projector kind {kind!r} is not one of linear, mlp")

    def forward(self, x_NTE: Tensor) -> Tensor:
        return self.net(x_NTE)
