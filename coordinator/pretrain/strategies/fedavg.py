"""FedAvg (McMahan et al., 2017): local ERM on the forecasting loss, sample-weighted averaging of
deltas by the fleet's :class:`coordinator.fleet.strategies.fedavg.FedAvg` (the base class behaviour)."""

from __future__ import annotations

from coordinator.pretrain.strategies import Strategy


class FedAvgStrategy(Strategy):
    name = "fedavg"
