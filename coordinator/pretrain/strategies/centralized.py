"""Centralized mixed-batch pretraining as a degenerate "federation": one client holding every
domain's windows, batches mixed across domains. It runs through the same round loop with the same
total number of gradient steps as the federated strategies, so the comparison is like for like."""

from __future__ import annotations

from coordinator.pretrain.silos import Silo, merge_silos
from coordinator.pretrain.strategies import Strategy


class Centralized(Strategy):
    """`balanced`: batches draw every silo equally often instead of in proportion to its windows -- the
    centralized counterpart of FedAvg with every silo weighted alike (`fedavg` with weight_power 0)."""

    name = "centralized"

    def __init__(self, balanced: bool = False) -> None:
        self.steps_multiplier = 1
        self.balanced = balanced

    def clients(self, silos: list[Silo]) -> list[Silo]:
        # K local budgets in one client: the same gradient steps as K federated clients.
        self.steps_multiplier = len(silos)
        return [merge_silos(silos, balanced=self.balanced)]
