"""Server-side aggregation arithmetic over parameter deltas: plain functions on dicts of arrays.

These are shared by the fleet's strategies (:mod:`coordinator.fleet.strategies`) and by in-process federated
pretraining, so a rule behaves the same whether updates arrive over a broker or from a simulated silo. They stream
over updates (one running sum, :class:`RunningSum`), so aggregating 10,000 device updates needs the memory of one, and
the fleet server adds each update to the sum as it arrives instead of decoding every stored update again at the end.
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
    prototype: np.ndarray | None = None  # what the device's data looks like (strategies/prototype.py)


def global_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all parameters, accumulated in float64 (one dot product per array, no squared temporary)."""
    total = 0.0
    for v in delta.values():
        a = np.asarray(v, np.float64).ravel()
        total += float(a @ a)
    return float(np.sqrt(total))


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> Params:
    """Scale a delta down to `max_norm` (L2 over all parameters): one device, faulty or hostile,
    cannot move the global model further than any honest one could."""
    norm = global_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * factor for k, v in delta.items()}


@dataclass
class RunningSum:
    """Σ w_k·Δ_k and Σ w_k in float64, one update at a time: the whole state of a streaming weighted mean.

    Its size is one head, whatever the number of updates; partial sums (one per ingestion worker) merge by
    addition, so several processes can each sum the updates they received and one aggregator adds the parts.
    float64 keeps the order of additions from mattering at the float32 precision of the result (10,000 float16
    deltas summed in any order agree to ~1e-12 relative)."""

    sums: Params = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not (weight >= 0 and np.isfinite(weight)):
            raise ValueError(f"an update's weight must be finite and non-negative, got {weight}")
        for k, v in delta.items():
            acc = self.sums.get(k)
            if acc is None:
                acc = self.sums[k] = np.zeros(np.shape(v), np.float64)
            acc += weight * np.asarray(v, np.float64)
        self.weight += weight
        self.count += 1

    def merge(self, other: RunningSum) -> RunningSum:
        """self + other (a new object; neither input changes)."""
        out = RunningSum({k: v.copy() for k, v in self.sums.items()}, self.weight, self.count)
        for k, v in other.sums.items():
            if k in out.sums:
                out.sums[k] += v
            else:
                out.sums[k] = v.copy()
        out.weight += other.weight
        out.count += other.count
        return out

    def mean(self) -> Params:
        if self.weight <= 0:
            raise ValueError("aggregation needs at least one update with positive weight")
        return {k: v / self.weight for k, v in self.sums.items()}


def weighted_mean(deltas: Iterable[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Params:
    """Σ w_k Δ_k / Σ w_k, accumulated in float64 one update at a time (a :class:`RunningSum`)."""
    running = RunningSum()
    for delta, w in zip(deltas, weights, strict=True):
        running.add(delta, w)
    return running.mean()


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


@dataclass(frozen=True)
class BoundPlan:
    """A round's bounds worked out from scalars only (each update's norm and sample count): per update the factor its
    delta is scaled by (1: untouched) and the sample count it counts for."""

    norm_bound: float | None
    factors: list[float]
    counts: list[int]
    clipped: tuple[str, ...]
    capped: tuple[str, ...]


def plan_bounds(device_ids: Sequence[str], norms: Sequence[float], counts: Sequence[int], bounds: Bounds,
                caps: Callable[[str], int | None] = lambda _device: None) -> BoundPlan:
    """The adaptive norm bound and the sample-count caps of a round (see :class:`Bounds`)."""
    bound = bounds.norm_multiple * float(np.median(norms)) if bounds.norm_multiple and len(norms) else None
    weight_cap = bounds.weight_multiple * float(np.median(counts)) if bounds.weight_multiple and len(counts) else None
    factors, capped_counts, clipped, capped = [], [], [], []
    for device_id, norm, count in zip(device_ids, norms, counts, strict=True):
        factor = 1.0
        if bound is not None and norm > bound:
            factor = bound / norm
            clipped.append(device_id)
        limits = [c for c in (caps(device_id), bounds.max_samples, weight_cap) if c is not None]
        n = min([count, *[int(c) for c in limits]])
        if n < count:
            capped.append(device_id)
        factors.append(factor)
        capped_counts.append(max(n, 1) if count > 0 else 0)
    return BoundPlan(bound, factors, capped_counts, tuple(clipped), tuple(capped))


def bound_updates(updates: Sequence[ClientUpdate], bounds: Bounds,
                  caps: Callable[[str], int | None] = lambda _device: None) -> BoundedRound:
    """Clip every delta to the round's adaptive norm bound and cap every sample count (see :class:`Bounds`)."""
    if not updates:
        return BoundedRound([], None, (), ())
    plan = plan_bounds([u.device_id for u in updates], [global_norm(u.delta) for u in updates],
                       [u.n_samples for u in updates], bounds, caps)
    out = [ClientUpdate(u.device_id, n, clip_by_norm(u.delta, plan.norm_bound) if f < 1.0 else u.delta, u.metrics,
           getattr(u, "prototype", None))
           for u, f, n in zip(updates, plan.factors, plan.counts, strict=True)]
    return BoundedRound(out, plan.norm_bound, plan.clipped, plan.capped)


def summable(n_samples: int, norm: float, bounds: Bounds, reference_norm: float) -> bool:
    """Whether an update goes into a round's running sum as n·Δ when it arrives. One whose count is above the fleet's
    ceiling or whose delta is 10,000 times the model's norm (`reference_norm`, at least 1) is kept out and added
    with its bounded weight at the close instead: its raw n·Δ would dwarf the honest updates and cost the sum its
    precision when the bounds are subtracted again."""
    return (bounds.max_samples is None or n_samples <= bounds.max_samples) and norm <= 1e4 * max(reference_norm, 1.0)


def bounded_streamed_mean(running: RunningSum, rows: Sequence[tuple[str, int, float, bool]], plan: BoundPlan,
                          clip_norm: float | None,
                          fetch: Callable[[list[str]], Mapping[str, Mapping[str, np.ndarray]]]) -> Params:
    """Σ_k w'_k·c_k·Δ_k / Σ_k w'_k -- the bounded (and optionally norm-clipped) sample-weighted mean -- from a running
    sum of the raw n_k·Δ_k of the summable updates and the rows (device, n_k, ‖Δ_k‖, summed) of all of them: exactly
    what :func:`bound_updates` and a clipped weighted mean compute from every delta, but reading again (``fetch``)
    only the updates whose coefficient w'_k·c_k differs from what the sum holds for them (the clipped, the capped and
    the ones kept out of the sum: a few in an honest round), whose difference is added. Memory: one head plus four
    numbers per update."""
    extra: dict[str, float] = {}
    for (device_id, n, norm, summed), factor, w in zip(rows, plan.factors, plan.counts, strict=True):
        if clip_norm is not None and factor * norm > clip_norm:
            factor *= clip_norm / (factor * norm)
        held = n if summed else 0
        if w * factor != held:
            extra[device_id] = w * factor - held
    sums = {k: v.copy() for k, v in running.sums.items()}
    for device_id, delta in fetch(sorted(extra)).items():
        for k, v in delta.items():
            part = extra[device_id] * np.asarray(v, np.float64)
            if k in sums:
                sums[k] += part
            else:  # nothing of this round went into the raw sum
                sums[k] = part
    total = float(sum(plan.counts))
    if total <= 0:
        raise ValueError("aggregation needs at least one update with positive weight")
    return {k: v / total for k, v in sums.items()}


def apply(global_params: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray], lr: float = 1.0) -> Params:
    """global + lr·step in float64, checked finite in float32 before anyone can store or send it."""
    out = {k: np.asarray(v, np.float64) + lr * np.asarray(step[k], np.float64) for k, v in global_params.items()}
    check_finite(out, "aggregate")
    return {k: v.astype(np.float32) for k, v in out.items()}
