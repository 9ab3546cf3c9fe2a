"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the devices' deltas, optionally norm-clipped.

Streaming: each update is clipped on its own and added to a float64 running sum as it arrives
(:class:`~coordinator.fleet.aggregation.RunningSum`), so a round of 10,000 devices holds one head in memory."""

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
    streaming: ClassVar[bool] = True

    def weigh(self, update: Contribution) -> tuple[Mapping[str, np.ndarray], float]:
        return update.delta, float(update.n_samples)

    def finish(self, base: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> Aggregate:
        return Aggregate(aggregation.apply(base, step, self.server_lr))

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[Contribution]) -> Params:
        deltas = (aggregation.clip_by_norm(u.delta, self.clip_norm) if self.clip_norm else u.delta for u in updates)
        step = aggregation.weighted_mean(deltas, [float(u.n_samples) for u in updates])
        return aggregation.apply(global_params, step, self.server_lr)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        return Aggregate(self.aggregate(inputs.base, inputs.updates))
