"""FedProx (Li et al., 2020): FedAvg plus (mu/2)||θ - θ^t||² on the client, which limits client
drift when domains pull the shared weights apart; the server aggregates like FedAvg."""

from __future__ import annotations

import torch

from coordinator.models.tsfm import TSFM
from coordinator.pretrain.strategies import LocalContext, Strategy


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = mu

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        loss = super().local_loss(model, x, y, sub, ctx)
        prox = sum(torch.sum((p - ctx.global_params[n]) ** 2) for n, p in model.named_parameters())
        return loss + 0.5 * self.mu * prox
