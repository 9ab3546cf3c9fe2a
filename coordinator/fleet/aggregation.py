"""Server-side aggregation arithmetic over parameter deltas: plain functions on dicts of arrays.

These are shared by the fleet's strategies (:mod:`coordinator.fleet.strategies`) and by in-process federated
pretraining, so a rule behaves the same whether updates arrive over a broker or from a simulated silo. They stream
over updates (one running sum), so aggregating 10,000 device updates needs the memory of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_client.learning.head import Params


class Contribution(Protocol):
    """What aggregation reads of one device's update: an :class:`edge_client.wire.Update` as it arrived in a
    fleet round, or a :class:`ClientUpdate` from in-process pretraining and simulations."""

    @property
    def device_id(self) -> str | None: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def delta(self) -> Mapping[str, np.ndarray]: ...


@dataclass(frozen=True)
class ClientUpdate:
    device_id: str
    n_samples: int
    delta: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)


def global_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in delta.values())))


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> Params:
    """Scale a delta down to `max_norm` (L2 over all parameters): one device, faulty or hostile,
    cannot move the global model further than any honest one could."""
    norm = global_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * factor for k, v in delta.items()}


def weighted_mean(deltas: Iterable[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Params:
    """Σ w_k Δ_k / Σ w_k, accumulated in float64 one update at a time."""
    total: Params = {}
    weight_sum = 0.0
    for delta, w in zip(deltas, weights, strict=True):
        for k, v in delta.items():
            acc = total.setdefault(k, np.zeros(np.shape(v), np.float64))
            acc += w * np.asarray(v, np.float64)
        weight_sum += w
    if weight_sum <= 0:
        raise ValueError("aggregation needs at least one update with positive weight")
    return {k: v / weight_sum for k, v in total.items()}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float) -> Params:
    """Coordinate-wise mean after dropping the `trim` fraction of largest and smallest values:
    robust to a minority of outlying devices (Yin et al., 2018)."""
    k = len(deltas)
    cut = int(np.floor(trim * k))
    if k - 2 * cut <= 0:
        raise ValueError(f"trim {trim} leaves no update out of {k}")
    out: Params = {}
    for name in deltas[0]:
        stacked = np.sort(np.stack([np.asarray(d[name], np.float64) for d in deltas]), axis=0)
        out[name] = stacked[cut : k - cut].mean(axis=0)
    return out


def apply(global_params: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray], lr: float = 1.0) -> Params:
    return {k: (np.asarray(v, np.float64) + lr * step[k]).astype(np.float32) for k, v in global_params.items()}
