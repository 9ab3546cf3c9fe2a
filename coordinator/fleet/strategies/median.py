"""Coordinate-wise median (Yin et al., 2018): robust to any minority of devices, whatever they send."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import ClientUpdate, Params
from coordinator.fleet.strategies.base import Aggregate, RoundInputs


@dataclass(frozen=True)
class CoordinateMedian:
    """Each parameter moves by the median of the devices' deltas, unweighted: a device's sample count cannot buy it
    influence, and fewer than half of the devices cannot move a parameter outside the honest devices' range."""

    server_lr: float = 1.0
    name: str = "median"
    personalised: ClassVar[bool] = False
    streaming: ClassVar[bool] = False  # needs every update at once

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Params:
        step = aggregation.coordinate_median([u.delta for u in updates])
        return aggregation.apply(global_params, step, self.server_lr)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        return Aggregate(self.aggregate(inputs.base, inputs.updates))
