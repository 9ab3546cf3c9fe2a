"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the devices' deltas, optionally norm-clipped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from coordinator.fleet import aggregation  # through the module, so one spy sees every use of its functions
from coordinator.fleet.aggregation import Contribution, Params
from coordinator.fleet.strategies.base import Aggregate, RoundInputs


@dataclass(frozen=True)
class FedAvg:
    """Sample-weighted FedAvg of deltas, with optional norm clipping (one device, faulty or hostile, cannot move
    the global head further than any honest one could)."""

    clip_norm: float | None = None
    server_lr: float = 1.0
    name: str = "fedavg"
    personalised: ClassVar[bool] = False

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[Contribution]) -> Params:
        deltas = (aggregation.clip_by_norm(u.delta, self.clip_norm) if self.clip_norm else u.delta for u in updates)
        step = aggregation.weighted_mean(deltas, [float(u.n_samples) for u in updates])
        return aggregation.apply(global_params, step, self.server_lr)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        return Aggregate(self.aggregate(inputs.base, inputs.updates))
