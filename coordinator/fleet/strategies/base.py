"""What a fleet strategy sees of a round and what it returns: the one interface every strategy file implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from coordinator.fleet.aggregation import Contribution, Params


@dataclass(frozen=True)
class RoundInputs:
    """A closed round's training updates and what a strategy may look up beside them."""

    base: Mapping[str, np.ndarray]  # the global head the round trained from
    updates: Sequence[Contribution]  # deltas from `base` (or from the device's own head, for personalised tasks)
    initial: Callable[[], Params]  # the first global head (version 0): the pretrained reference
    personal: Callable[[str], Params | None]  # the head a device last got for itself, if any


@dataclass(frozen=True)
class Aggregate:
    """The new global head, and for personalised strategies each device's own next starting head."""

    global_params: Params
    personal: dict[str, Params] = field(default_factory=dict)


class FleetStrategy(Protocol):
    """A plain object that never touches the transport: the server hands it a round, it returns the aggregate.
    ``personalised`` strategies get each device's head from :attr:`Aggregate.personal` sent in its next task.

    A ``streaming`` strategy (:class:`StreamingStrategy`) is also summed as updates arrive: memory of one head
    whatever the fleet size, nothing decoded twice. Strategies that need all updates at once (coordinate-wise
    trimmed mean or median, Krum, task-vector similarities) cannot stream: the server hands them every stored
    update at the close (decoded once, then), so they cost memory and time in proportion to the round's size."""

    name: str
    personalised: bool
    streaming: bool

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate: ...


class StreamingStrategy(FleetStrategy, Protocol):
    """A strategy whose aggregate is a function of the bounded, sample-weighted mean of the deltas only (FedAvg,
    FedProx's server side, norm-clipped FedAvg): the server keeps Σ n_k·Δ_k as updates arrive and works the
    round's bounds and ``clip_norm`` in exactly at the close (:func:`~coordinator.fleet.aggregation.
    bounded_streamed_mean`)."""

    clip_norm: float | None

    def weigh(self, update: Contribution) -> tuple[Mapping[str, np.ndarray], float]:
        """What one update adds to the running sum: (Δ_k, n_k)."""
        ...

    def finish(self, base: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> Aggregate:
        """The new global head from the round's base and the round's mean step."""
        ...
