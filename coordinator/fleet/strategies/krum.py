"""Multi-Krum (Blanchard et al., NeurIPS 2017): average only the updates that sit closest to their neighbours."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import ClientUpdate, Params
from coordinator.fleet.strategies.base import Aggregate, RoundInputs


@dataclass(frozen=True)
class MultiKrum:
    """Score each update by its squared distances to its K - f - 2 nearest neighbours, keep the K - f best, and take
    their sample-weighted mean. ``n_byzantine`` (f) defaults to the most the rule tolerates, ⌊(K - 3) / 2⌋ (at least
    1): an outlying update is far from every honest one and is left out; honest ones that agree are all kept."""

    n_byzantine: int | None = None
    server_lr: float = 1.0
    name: str = "krum"
    personalised: ClassVar[bool] = False
    streaming: ClassVar[bool] = False  # needs every update at once

    def selected(self, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        k = len(updates)
        f = self.n_byzantine if self.n_byzantine is not None else max(1, (k - 3) // 2)
        keep = aggregation.krum_select([u.delta for u in updates], f, k - f)
        return [updates[i] for i in keep]

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Params:
        chosen = self.selected(updates)
        step = aggregation.weighted_mean((u.delta for u in chosen), [float(u.n_samples) for u in chosen])
        return aggregation.apply(global_params, step, self.server_lr)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        return Aggregate(self.aggregate(inputs.base, inputs.updates))
