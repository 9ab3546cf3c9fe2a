"""Task-vector personalised aggregation (ALGORITHMS.md §5; the server half of Yang et al.'s bi-level
personalisation -- not the pretraining strategy ``bilevel``, which is about domain heterogeneity).

Why: one FedAvg model is a compromise between devices whose data disagree (an energy meter and an
exchange rate pull a shared head in different directions). Here each device k gets its own aggregate

    a_k = a_pre + Σ_{j ∈ top-M(k)} softmax_j(cos(τ_k, τ_j)/T) · τ_j,

where τ_j = a_j^after − a_pre is device j's task vector (its fine-tuned parameters minus the
*pretrained* ones). Devices whose updates point the same way share; dissimilar or conflicting ones
(negative cosine) get little or no weight. Removing the mean task vector first (optional) amplifies
differences, because all fine-tuned deltas of one foundation model tend to share a common component.

Plain functions on dicts of arrays, like :mod:`coordinator.fleet.aggregation`, plus the fleet strategy
object. The server stores one aggregate per device (head-sized) and sends it in the device's next task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from coordinator.fleet.aggregation import Contribution, Params, flat, weighted_mean
from coordinator.fleet.strategies.base import Aggregate, RoundInputs


def flatten(delta: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> np.ndarray:
    """One float64 vector of the parameters in `keys` (default: sorted keys, a stable order)."""
    return flat(delta, sorted(delta) if keys is None else keys)


def cosine_matrix(vectors: np.ndarray, remove_mean: bool = False) -> np.ndarray:
    """S_kj = cos(τ_k, τ_j) for the rows of `vectors` (K, P); a zero vector has similarity 0
    to the others and 1 to itself."""
    v = np.asarray(vectors, np.float64)
    if remove_mean and len(v) > 1:
        v = v - v.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 1e-12, norms, 1.0)[:, None]
    sim = unit @ unit.T
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def personalized_weights(sim: np.ndarray, temperature: float = 0.1, top_m: int | None = None,
                         positive_only: bool = False) -> np.ndarray:
    """W_kj = softmax_j(S_kj / T) over device k's top-M most similar devices (self included, as it
    is always its own most similar). Rows sum to 1. `positive_only` also drops conflicting devices."""
    k = len(sim)
    m = max(1, min(k, math.ceil(k / 3) if top_m is None else top_m))
    weights = np.zeros_like(sim, dtype=np.float64)
    for i in range(k):
        order = np.argsort(-sim[i], kind="stable")
        keep = [i, *[j for j in order if j != i][: m - 1]]
        if positive_only:
            keep = [j for j in keep if j == i or sim[i, j] > 0]
        logits = sim[i, keep] / max(temperature, 1e-9)
        p = np.exp(logits - logits.max())
        weights[i, keep] = p / p.sum()
    return weights


def personalized_aggregates(
    pre: Mapping[str, np.ndarray],
    task_vectors: Mapping[str, Mapping[str, np.ndarray]],
    *,
    temperature: float = 0.1,
    top_m: int | None = None,
    remove_mean: bool = False,
    positive_only: bool = False,
) -> tuple[dict[str, Params], np.ndarray]:
    """a_k for every device id in `task_vectors`, and the weight matrix W (rows in the same order)."""
    ids = list(task_vectors)
    if not ids:
        raise ValueError("personalised aggregation needs at least one task vector")
    keys = sorted(pre)
    vecs = np.stack([flatten(task_vectors[i], keys) for i in ids])
    w = personalized_weights(cosine_matrix(vecs, remove_mean), temperature, top_m, positive_only)
    out: dict[str, Params] = {}
    for row, dev in enumerate(ids):
        mixed = w[row] @ vecs
        out[dev] = _unflatten(mixed, pre, keys)
    return out, w


def _unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray], keys: Sequence[str]) -> Params:
    out: Params = {}
    pos = 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = (ref.astype(np.float64) + vec[pos : pos + ref.size].reshape(ref.shape)).astype(np.float32)
        pos += ref.size
    return out


@dataclass(frozen=True)
class TaskVectorAggregation:
    """The fleet strategy, and the task-vector mix for callers whose updates already carry τ_k as `delta`."""

    temperature: float = 0.1
    top_m: int | None = None  # None: ⌈K/3⌉
    remove_mean: bool = False
    positive_only: bool = False
    name: str = "task_vector"
    personalised: ClassVar[bool] = True
    streaming: ClassVar[bool] = False  # needs every update at once

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        """Task-vector personalised aggregation (Yang et al., AAAI 2026) of a fleet round: a device trained from its
        own head (or the global one), so its trained head is that start plus its delta and its task vector is
        that head minus the *initial* (pretrained) head; its next start is the initial head plus the
        softmax(cos/T)-weighted mix of its most similar peers' task vectors. The global head (for new devices
        and evaluation) stays the sample-weighted mean of the trained heads."""
        pre = inputs.initial()
        afters, taus = {}, {}
        for u in inputs.updates:
            start = inputs.personal(u.device_id) or inputs.base
            afters[u.device_id] = {k: np.asarray(start[k], np.float64) + u.delta[k] for k in inputs.base}
            taus[u.device_id] = {k: afters[u.device_id][k] - pre[k] for k in inputs.base}
        personal, _ = personalized_aggregates(pre, taus, temperature=self.temperature, top_m=self.top_m,
                                              remove_mean=self.remove_mean, positive_only=self.positive_only)
        weights = [float(u.n_samples) for u in inputs.updates]
        mean = weighted_mean([afters[u.device_id] for u in inputs.updates], weights)
        return Aggregate({k: np.asarray(v, np.float32) for k, v in mean.items()},
                         {d: {k: np.asarray(v, np.float32) for k, v in p.items()} for d, p in personal.items()})

    def aggregate_personal(self, pre: Mapping[str, np.ndarray], updates: Sequence[Contribution]) -> dict[str, Params]:
        taus = {u.device_id: u.delta for u in updates}
        out, _ = personalized_aggregates(pre, taus, temperature=self.temperature, top_m=self.top_m,
                                         remove_mean=self.remove_mean, positive_only=self.positive_only)
        return out

    def aggregate_for(self, pre: Mapping[str, np.ndarray], own: Mapping[str, np.ndarray],
                      updates: Sequence[Contribution]) -> Params:
        """The aggregate for a device that is not (yet) in the federation, e.g. a new device: its
        first task vector `own` is compared with the fleet's."""
        taus = {"__new__": own, **{u.device_id: u.delta for u in updates}}
        out, _ = personalized_aggregates(pre, taus, temperature=self.temperature, top_m=self.top_m,
                                         remove_mean=self.remove_mean, positive_only=self.positive_only)
        return out["__new__"]
