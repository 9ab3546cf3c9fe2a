"""FedAvg (McMahan et al., 2017): local ERM on the forecasting loss, sample-weighted averaging of
deltas by the fleet's :class:`coordinator.fleet.strategies.fedavg.FedAvg`.

`server_lr` (η_g, Reddi et al. 2021; Charles et al. 2021, "On large-cohort training") scales the mean delta.
Why it matters here: K silos that each take E local steps move the global model by about E steps a round, while
centralized training at the same windows takes K·E sequential steps; averaging is a large batch, and a large
batch wants a larger step. η_g = 1 is plain FedAvg; the foundation grid sweeps it on validation windows.

`weight_power` p weighs client k's delta by n_k^p: 1 is FedAvg's sample weighting, 0 every silo alike. Why: the
domain silos differ in size by 300x (traffic 414 windows, air quality 121k), and a small silo's AdamW steps, which
move its weights as far as a large silo's do, reach the global model scaled by its share of the windows (< 1 %);
centralized AdamW normalises each weight's step by its own gradient history instead, so a rare domain's consistent
gradient is not drowned. The validation mean counts every dataset alike."""

from __future__ import annotations

from coordinator.fleet.aggregation import Params
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.pretrain.strategies import State, Strategy, Upload, weighted_step


class FedAvgStrategy(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, weight_power: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError("FedAvg's server_lr must be positive")
        if not 0.0 <= weight_power <= 1.0:
            raise ValueError("FedAvg's weight_power must be in [0, 1] (0: every silo alike, 1: by windows)")
        self.server_lr, self.weight_power = server_lr, weight_power

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        if self.weight_power == 1.0:
            return FedAvg(server_lr=self.server_lr).aggregate(global_params, [u.update for u in uploads])
        weights = [float(u.update.n_samples) ** self.weight_power for u in uploads]
        return weighted_step(global_params, uploads, weights, lr=self.server_lr)
