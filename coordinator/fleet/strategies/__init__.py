"""Fleet aggregation strategies: one file each, behind one registry (:func:`fleet_strategy`).

Every strategy implements :class:`~coordinator.fleet.strategies.base.FleetStrategy`: the server hands it a closed
round (:class:`~coordinator.fleet.strategies.base.RoundInputs`) and publishes what it returns. To add one: write
``strategies/<name>.py`` with a dataclass that has ``name``, ``personalised`` and ``aggregate_round``, and add a line
to :data:`FLEET_STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.fleet.strategies.base import Aggregate, FleetStrategy, RoundInputs
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.fleet.strategies.fedprox import fedprox
from coordinator.fleet.strategies.krum import MultiKrum
from coordinator.fleet.strategies.median import CoordinateMedian
from coordinator.fleet.strategies.prototype import PrototypeAggregation
from coordinator.fleet.strategies.task_vector import TaskVectorAggregation
from coordinator.fleet.strategies.trimmed_mean import TrimmedMean

__all__ = ["FLEET_STRATEGIES", "Aggregate", "FleetStrategy", "RoundInputs", "fleet_strategy"]

# name -> builder(clip_norm, trim, tv_temperature); task_vector aggregates task vectors unclipped
FLEET_STRATEGIES: dict[str, Callable[[float | None, float, float], FleetStrategy]] = {
    "fedavg": lambda clip_norm, trim, temperature: FedAvg(clip_norm=clip_norm),
    "fedprox": lambda clip_norm, trim, temperature: fedprox(clip_norm),
    "trimmed_mean": lambda clip_norm, trim, temperature: TrimmedMean(trim=trim, clip_norm=clip_norm),
    "task_vector": lambda clip_norm, trim, temperature: TaskVectorAggregation(temperature=temperature),
    "median": lambda clip_norm, trim, temperature: CoordinateMedian(),
    "krum": lambda clip_norm, trim, temperature: MultiKrum(),
    "prototype": lambda clip_norm, trim, temperature: PrototypeAggregation(temperature=temperature),
}
# Whatever the strategy, the server bounds every update first (coordinator.fleet.aggregation.Bounds): an adaptive
# norm bound and capped sample weights. median, trimmed_mean and krum add robustness to a minority of attackers.


def fleet_strategy(name: str, *, clip_norm: float | None = None, trim: float = 0.1,
                   tv_temperature: float = 0.1) -> FleetStrategy:
    """The fleet strategy called `name`; a ValueError naming the choices for anything else."""
    if name not in FLEET_STRATEGIES:
        *others, last = FLEET_STRATEGIES
        raise ValueError(f"unknown aggregation strategy {name!r}; choose {', '.join(others)} or {last}")
    return FLEET_STRATEGIES[name](clip_norm, trim, tv_temperature)
