"""Server-side aggregation rules over parameter deltas: plain functions on dicts of arrays.

These are shared by the MQTT fleet rounds and by in-process federated pretraining, so a rule
behaves the same whether updates arrive over a broker or from a simulated silo. They stream
over updates (one running sum), so aggregating 10,000 device updates needs the memory of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Params = dict[str, np.ndarray]


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


@dataclass(frozen=True)
class FedAvg:
    """Sample-weighted FedAvg of deltas (McMahan et al., 2017), with optional norm clipping.
    FedProx differs only on the device (the proximal term), so it aggregates the same way."""

    clip_norm: float | None = None
    server_lr: float = 1.0
    name: str = "fedavg"

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Params:
        deltas = (clip_by_norm(u.delta, self.clip_norm) if self.clip_norm else u.delta for u in updates)
        step = weighted_mean(deltas, [float(u.n_samples) for u in updates])
        return apply(global_params, step, self.server_lr)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean of (optionally clipped) deltas, unweighted."""

    trim: float = 0.1
    clip_norm: float | None = None
    server_lr: float = 1.0
    name: str = "trimmed_mean"

    def aggregate(self, global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Params:
        deltas = [clip_by_norm(u.delta, self.clip_norm) if self.clip_norm else u.delta for u in updates]
        return apply(global_params, trimmed_mean(deltas, self.trim), self.server_lr)


def make_strategy(name: str, *, clip_norm: float | None = None, trim: float = 0.1) -> FedAvg | TrimmedMean:
    if name in ("fedavg", "fedprox"):
        return FedAvg(clip_norm=clip_norm, name=name)
    if name == "trimmed_mean":
        return TrimmedMean(trim=trim, clip_norm=clip_norm)
    if name == "task_vector":  # personalised on top of FedAvg: coordinator.fleet.server does the per-device part
        return FedAvg(clip_norm=clip_norm, name=name)
    raise ValueError(f"unknown aggregation strategy {name!r}; choose fedavg, fedprox, trimmed_mean or task_vector")
