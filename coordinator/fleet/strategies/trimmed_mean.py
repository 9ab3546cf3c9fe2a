"""Coordinate-wise trimmed mean (Yin et al., 2018): robust to a minority of outlying devices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import Contribution, Params
from coordinator.fleet.strategies.base import Aggregate, RoundInputs


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean of (optionally clipped) deltas, unweighted. It always trims at least one device
    from each end once three or more answered (10 % of fewer than ten devices would trim nothing)."""

    trim: float = 0.1
    clip_norm: float | None = None
    server_lr: float = 1.0
    name: str = "trimmed_mean"
    personalised: ClassVar[bool] = False
    streaming: ClassVar[bool] = False  # needs every update at once

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[Contribution]) -> Params:
        deltas = [aggregation.clip_by_norm(u.delta, self.clip_norm) if self.clip_norm else u.delta for u in updates]
        return aggregation.apply(global_params, aggregation.trimmed_mean(deltas, self.trim, min_cut=1), self.server_lr)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        return Aggregate(self.aggregate(inputs.base, inputs.updates))
