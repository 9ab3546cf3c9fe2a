"""FedProx (Li et al., 2020): the proximal term (mu/2)·||θ − θ_global||² acts on the device (the round's
``prox_mu``, :func:`edge_client.learning.head.train_head`); the server aggregates exactly like FedAvg."""

from __future__ import annotations

from coordinator.fleet.strategies.fedavg import FedAvg


def fedprox(clip_norm: float | None = None) -> FedAvg:
    """FedAvg's server side under FedProx's name (the name is what the round stores and reports)."""
    return FedAvg(clip_norm=clip_norm, name="fedprox")
