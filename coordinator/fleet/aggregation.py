"""Server-side aggregation arithmetic over parameter deltas: plain functions on dicts of arrays.

These are shared by the fleet's strategies (:mod:`coordinator.fleet.strategies`) and by in-process federated
pretraining, so a rule behaves the same whether updates arrive over a broker or from a simulated silo. They stream
over updates (one running sum), so aggregating 10,000 device updates needs the memory of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float, min_cut: int = 0) -> Params:
    """Coordinate-wise mean after dropping the `trim` fraction (at least `min_cut` values, while at least one stays)
    of largest and smallest values: robust to a minority of outlying devices (Yin et al., 2018)."""
    k = len(deltas)
    cut = max(int(np.floor(trim * k)), min(min_cut, (k - 1) // 2))
    if k - 2 * cut <= 0:
        raise ValueError(f"trim {trim} leaves no update out of {k}")
    out: Params = {}
    for name in deltas[0]:
        stacked = np.sort(np.stack([np.asarray(d[name], np.float64) for d in deltas]), axis=0)
        out[name] = stacked[cut : k - cut].mean(axis=0)
    return out


class NonFiniteModel(ValueError):
    """An aggregate that is NaN, inf, or too large for float32: never committed, the round fails instead."""


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(params: Mapping[str, np.ndarray], what: str = "model") -> None:
    """Raise NonFiniteModel unless every value is finite and fits float32 (the dtype models are stored and sent in:
    a finite float64 of 1e300 becomes inf when cast)."""
    for k, v in params.items():
        a = np.asarray(v)
        if not np.isfinite(a).all() or (a.size and float(np.max(np.abs(a))) > FLOAT32_MAX):
            raise NonFiniteModel(f"{what}.{k} is not finite in float32")


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Params:
    """Coordinate-wise median (Yin et al., 2018): each parameter moves as the middle device says, so fewer than half
    of the devices cannot move it outside the range of the honest ones."""
    if not deltas:
        raise ValueError("the median needs at least one update")
    return {name: np.median(np.stack([np.asarray(d[name], np.float64) for d in deltas]), axis=0) for name in deltas[0]}


def flat(delta: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """One float64 vector of the parameters in `keys`, in that order."""
    return np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in keys])


def krum_select(deltas: Sequence[Mapping[str, np.ndarray]], n_byzantine: int, n_selected: int) -> list[int]:
    """Multi-Krum (Blanchard et al., 2017): score each update by the summed squared distances to its
    K - f - 2 nearest neighbours and keep the `n_selected` lowest scores. An outlier is far from everyone, so it scores
    high; f attackers need K > 2f + 2 for the guarantee."""
    k = len(deltas)
    keys = sorted(deltas[0])
    x = np.stack([flat(d, keys) for d in deltas])
    sq = np.sum(x * x, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    neighbours = max(1, k - n_byzantine - 2)
    scores = [float(np.sum(np.sort(np.delete(dist[i], i))[:neighbours])) for i in range(k)]
    return sorted(np.argsort(scores, kind="stable")[: max(1, min(n_selected, k))].tolist())


@dataclass(frozen=True)
class Bounds:
    """What one update may weigh and how far it may move the model, fixed per round before any strategy runs.

    ``norm_multiple``: every delta is clipped to this multiple of the round's median delta norm (adaptive: no scale
    to tune per model, and honest devices, the majority, set it). ``weight_multiple``: a sample count counts at most
    this multiple of the round's median count. ``max_samples``: the fleet's ceiling; ``caps`` gives each device's
    own ceiling (what it declared when it was enrolled). None switches a bound off."""

    norm_multiple: float | None = 2.0
    weight_multiple: float | None = 2.0
    max_samples: int | None = 1_000_000


@dataclass(frozen=True)
class BoundedRound:
    updates: list[ClientUpdate]
    norm_bound: float | None
    clipped: tuple[str, ...]
    capped: tuple[str, ...]


def bound_updates(updates: Sequence[ClientUpdate], bounds: Bounds,
                  caps: Callable[[str], int | None] = lambda _device: None) -> BoundedRound:
    """Clip every delta to the round's adaptive norm bound and cap every sample count (see :class:`Bounds`)."""
    if not updates:
        return BoundedRound([], None, (), ())
    norms = [global_norm(u.delta) for u in updates]
    bound = bounds.norm_multiple * float(np.median(norms)) if bounds.norm_multiple else None
    counts = [u.n_samples for u in updates]
    weight_cap = bounds.weight_multiple * float(np.median(counts)) if bounds.weight_multiple else None
    out, clipped, capped = [], [], []
    for u, norm in zip(updates, norms, strict=True):
        delta: Mapping[str, np.ndarray] = u.delta
        if bound is not None and norm > bound:
            delta = clip_by_norm(u.delta, bound)
            clipped.append(u.device_id)
        limits = [c for c in (caps(u.device_id), bounds.max_samples, weight_cap) if c is not None]
        n = min([u.n_samples, *[int(c) for c in limits]])
        if n < u.n_samples:
            capped.append(u.device_id)
        out.append(ClientUpdate(u.device_id, max(n, 1) if u.n_samples > 0 else 0, delta, u.metrics))
    return BoundedRound(out, bound, tuple(clipped), tuple(capped))


def apply(global_params: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray], lr: float = 1.0) -> Params:
    """global + lr·step in float64, checked finite in float32 before anyone can store or send it."""
    out = {k: np.asarray(v, np.float64) + lr * np.asarray(step[k], np.float64) for k, v in global_params.items()}
    check_finite(out, "aggregate")
    return {k: v.astype(np.float32) for k, v in out.items()}
