"""Prototype-weighted personalised aggregation for forecasting devices (the forecasting side of the mission's
"exchange prototypes": FCUCR's prototype transfer, ALGORITHMS.md §4, applied to heads instead of user vectors).

Why: FedAvg gives an exchange-rate device the head of energy meters; task vectors (task_vector.py) compare what
devices *learned*, which is noisy after a few steps and unknown for a device that has not trained. A prototype
(edge_client/learning/prototype.py: a projection of the mean and spread of a device's backbone features) says what
its *data* looks like, before any training. Each device k gets

    head_k = Σ_{j ∈ top-M(k)} softmax_j(cos(p_k, p_j)/T) · head_j^after,

the mix of the trained heads of the devices whose prototypes are most like its own (itself included); cosine
after removing the fleet's mean prototype, so the shared component does not make every device look alike. A new
device is placed the same way from its prototype alone (:func:`place`). The global head stays FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from coordinator.fleet.aggregation import Params, weighted_mean
from coordinator.fleet.strategies.base import Aggregate, RoundInputs
from coordinator.fleet.strategies.task_vector import cosine_matrix, personalized_weights
from edge_client.learning.prototype import PROTOTYPE_DIM


def prototype_weights(prototypes: np.ndarray, temperature: float = 0.1, top_m: int | None = None) -> np.ndarray:
    """W (K, K): row k mixes device k's top-M prototype neighbours (self included), softmax(cos/T)."""
    return personalized_weights(cosine_matrix(prototypes, remove_mean=True), temperature, top_m)


def mix(heads: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray) -> Params:
    """Σ_j w_j · head_j in float64, returned as float32."""
    keys = heads[0].keys()
    return {k: np.asarray(sum(float(w) * np.asarray(h[k], np.float64) for w, h in zip(weights, heads, strict=True)),
                          np.float32) for k in keys}


def place(prototype: np.ndarray, prototypes: np.ndarray, heads: Sequence[Mapping[str, np.ndarray]],
          temperature: float = 0.1, top_m: int | None = None) -> Params:
    """The head for a device that has not trained: the mix of the heads of the fleet devices whose prototypes
    are most like its own (its own row of :func:`prototype_weights` over the fleet plus itself, self left out)."""
    allp = np.vstack([prototypes, np.asarray(prototype, np.float64)[None, :]])
    w = prototype_weights(allp, temperature, top_m)[-1, :-1]
    if w.sum() <= 0:
        w = np.full(len(heads), 1.0 / len(heads))
    return mix(heads, w / w.sum())


@dataclass(frozen=True)
class PrototypeAggregation:
    """The fleet strategy: devices send a prototype with each update (task option ``prototype``)."""

    temperature: float = 0.1
    top_m: int | None = None  # None: ⌈K/3⌉
    name: str = "prototype"
    personalised: ClassVar[bool] = True
    streaming: ClassVar[bool] = False  # needs every update (and prototype) at once
    task_options: ClassVar[dict[str, bool]] = {"prototype": True}
    # the last round's (prototype, head) per device: where a new device is placed (in memory; after a restart a
    # new device gets the global head until the next round closes)
    fleet: dict[str, tuple[np.ndarray, Params]] = field(default_factory=dict, compare=False, repr=False)

    def place_head(self, prototype: np.ndarray) -> Params | None:
        """The head for a device that has not trained, from its announced prototype; None before any round."""
        if not self.fleet or np.shape(prototype) != (PROTOTYPE_DIM,):
            return None
        protos = np.stack([p for p, _ in self.fleet.values()])
        return place(prototype, protos, [h for _, h in self.fleet.values()], self.temperature, self.top_m)

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate:
        """Trained heads (each device's start + its delta), FedAvg of them as the global head, and each device's
        prototype-weighted mix as its next start. Updates without a prototype keep the global head."""
        afters = {}
        for u in inputs.updates:
            start = inputs.personal(u.device_id) or inputs.base
            afters[u.device_id] = {k: np.asarray(start[k], np.float64) + u.delta[k] for k in inputs.base}
        weights = [float(u.n_samples) for u in inputs.updates]
        mean = weighted_mean([afters[u.device_id] for u in inputs.updates], weights)
        glob = {k: np.asarray(v, np.float32) for k, v in mean.items()}
        with_proto = [u for u in inputs.updates
                      if getattr(u, "prototype", None) is not None and np.shape(u.prototype) == (PROTOTYPE_DIM,)]
        personal: dict[str, Params] = {}
        if with_proto:
            protos = np.stack([np.asarray(u.prototype, np.float64) for u in with_proto])
            w = prototype_weights(protos, self.temperature, self.top_m)
            heads = [afters[u.device_id] for u in with_proto]
            personal = {u.device_id: mix(heads, w[i]) for i, u in enumerate(with_proto)}
            self.fleet.clear()
            self.fleet.update({u.device_id: (protos[i], personal[u.device_id]) for i, u in enumerate(with_proto)})
        return Aggregate(glob, personal)
