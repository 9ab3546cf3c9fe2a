"""Centralized mixed-batch pretraining as a degenerate "federation": one client holding every
domain's windows, batches mixed across domains. It runs through the same round loop with the same
total number of gradient steps as the federated strategies, so the comparison is like for like."""

from __future__ import annotations

from coordinator.pretrain.silos import Silo, merge_silos
from coordinator.pretrain.strategies import Strategy


class Centralized(Strategy):
    name = "centralized"

    def __init__(self) -> None:
        self.steps_multiplier = 1

    def clients(self, silos: list[Silo]) -> list[Silo]:
        # K local budgets in one client: the same gradient steps as K federated clients.
        self.steps_multiplier = len(silos)
        return [merge_silos(silos)]
