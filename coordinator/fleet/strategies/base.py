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
    ``personalised`` strategies get each device's head from :attr:`Aggregate.personal` sent in its next task."""

    name: str
    personalised: bool

    def aggregate_round(self, inputs: RoundInputs) -> Aggregate: ...
