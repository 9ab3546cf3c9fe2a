"""FedAvg (McMahan et al., 2017): local ERM on the forecasting loss, sample-weighted averaging of
deltas by the fleet's :class:`coordinator.fleet.strategies.fedavg.FedAvg`.

`server_lr` (η_g, Reddi et al. 2021; Charles et al. 2021, "On large-cohort training") scales the mean delta.
Why it matters here: K silos that each take E local steps move the global model by about E steps a round, while
centralized training at the same windows takes K·E sequential steps; averaging is a large batch, and a large
batch wants a larger step. η_g = 1 is plain FedAvg; the foundation grid sweeps it on validation windows."""

from __future__ import annotations

from coordinator.fleet.aggregation import Params
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.pretrain.strategies import State, Strategy, Upload


class FedAvgStrategy(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError("FedAvg's server_lr must be positive")
        self.server_lr = server_lr

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        return FedAvg(server_lr=self.server_lr).aggregate(global_params, [u.update for u in uploads])
