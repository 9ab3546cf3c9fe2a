"""The recommender device on the fleet: a user's phone or set-top box taking part in continual
federated rounds over MQTT (numpy + ONNX Runtime, no torch).

Two parts, so the learning can be tested without a broker and the transport is not written twice:

* :class:`RecLearner` -- what the device does with a round task: observe the interactions of the
  period the coordinator's clock says has started, evaluate its current model on its own held-out
  items, report a prototype (FCUCR), train the personal adapter, and build the :class:`Update`.
* :class:`RecEdgeClient` -- :class:`edge_client.daemon.client.EdgeClient` with the recommender's learner:
  hello/status/last will, the worker thread, the outbox and idempotent re-sends are the TSFM
  device's own code; only the checks of a global model and the task handling differ.

A period t of the continual protocol is two rounds (``coordinator.recsys.fleet`` runs them):

1. **evaluate** (every device, option ``period`` = t): the device first takes in period t's
   interactions, then scores its *current* model (the one after period t−1) on the held-out item of
   every period s ≤ t it has -- next-period and forgetting metrics, measured where the data is --
   and answers with those metrics, the number of new training targets and, for FCUCR, its user
   prototype (d floats: the mean of the encoder states of its latest positions; no item ids).
2. **train** (devices with new targets): the task carries the FedAvg'd shared adapter (the global
   model) and, for FCUCR, p̃ -- the mix of the prototypes of the most similar other users; the device
   trains its adapter on period t's targets and uploads the change of the shared part.

After the last period one more evaluate round (period P + 1) scores the final models. The task's
``prototype`` is the coordinator's latest p̃ for this user in *every* task, so a device that had no
training target in a period still scores with the p̃ of that period, as in the in-process simulation.

In this simulation the device holds its whole MovieLens log and "observes" a period when told; a
real device would simply have received those interactions by then. The log never leaves it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from edge_client.daemon.client import EdgeClient, prototype_dp_options
from edge_client.learning.head import Params
from edge_client.recsys.adapter import full_scores, represent
from edge_client.recsys.data import UserLog, hit_ndcg, prequential_totals, ranks
from edge_client.recsys.device import METHODS, RecDevice
from edge_client.wire import (
    InvalidMessage,
    Message,
    ProtocolError,
    RoundTask,
    Update,
    WrongShape,
    check_arrays,
)
from edge_client.wire.mqtt import BrokerAddress
from edge_client.wire.mqtt_loop import NetworkLoop

log = logging.getLogger("fedge.edge.rec")

TASK = "rec"
K = 10


def metric_key(metric: str, period: int) -> str:
    """Metric names of evaluate updates, e.g. ``hr@10/p3``: the coordinator averages them per period."""
    return f"{metric}@{K}/p{period}"


PREQ_KEYS = ("next/n", "next/hits", "next/ndcg_sum")  # this period's interactions ranked before training on them


def rank_key(period: int) -> str:
    """The rank of the device's held-out item of `period` (the per-user breakdowns are built from it)."""
    return f"rank/p{period}"


class RecLearner:
    """One user's recommender on the device, driven by round tasks (no I/O here).

    `device` is built for `method` (which adapter parts are shared, gate or not); `log` is the user's
    interaction history with its periods and held-out items. Period 0 (the coordinator's pretraining
    period) is on the device from the start."""

    def __init__(self, device: RecDevice, log: UserLog, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        self.spec = METHODS[method]
        if (tuple(device.shared_keys) != self.spec.shared or device.use_gate != self.spec.gate
                or device.item_adapter != self.spec.item_adapter):
            raise ValueError(f"device model (shared {device.shared_keys}, gate {device.use_gate}) is not {method}")
        self.method = method
        self.device = device
        self.log = log
        self.backbone = device.encoder  # runtime, sha256 and spec, read by EdgeClient (hello, manifest)
        self.period = -1  # nothing observed yet
        self.scored_until = 0  # the last period whose interactions were scored prequentially
        self._observe(0)

    # ------------------------------------------------------------------ what EdgeClient's hello reports
    @property
    def n_train(self) -> int:
        return int(sum(len(self.log.train_positions(p)) for p in range(1, self.period + 1)))

    @property
    def n_eval(self) -> int:
        return int(self.log.is_test[self.log.period <= self.period].sum())

    # ------------------------------------------------------------------ model checks
    def shared_shapes(self) -> dict[str, tuple[int, ...]]:
        (n1, d), r, ri = self.device.items.shape, self.device.cfg.rank, self.device.cfg.item_rank
        shapes = {"U": (d, r), "V": (r, d), "u": (d,), "item_b": (n1,), "item_A": (n1, ri), "item_B": (ri, d)}
        return {k: shapes[k] for k in self.spec.shared}

    def check_global(self, params: Mapping[str, np.ndarray]) -> None:
        check_arrays(params, self.shared_shapes(), what="global")

    # ------------------------------------------------------------------ tasks
    def _observe(self, period: int) -> None:
        """Take in the interactions of the periods up to `period` not seen yet (they stay here)."""
        sel = (self.log.period > self.period) & (self.log.period <= period)
        if sel.any():
            self.device.receive(self.log.items[sel], self.log.ts[sel])
        self.period = max(self.period, period)

    def check_task(self, task: RoundTask) -> int:
        """Everything a task must satisfy before it may touch the device's state; returns its period."""
        if task.task != TASK:
            raise InvalidMessage(f"task {task.task!r} sent to a recommender device")
        if task.options.get("method") != self.method:
            raise InvalidMessage(f"task for method {task.options.get('method')!r}, this device runs {self.method!r}")
        period = task.options.get("period")
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise InvalidMessage(f"task option 'period' must be an integer ≥ 1, got {period!r}")
        if period < self.period:
            raise InvalidMessage(f"task for period {period}, the device is already in period {self.period}")
        if task.prototype is not None:
            d = self.device.items.shape[1]
            if not self.spec.prototypes:
                raise InvalidMessage(f"{self.method} does not use prototypes, the task carries one")
            if task.prototype.shape != (d,):
                raise WrongShape(f"task.prototype: expected shape ({d},), got {tuple(task.prototype.shape)}")
        if task.kind == "train" and len(self.log.train_positions(period)) == 0:
            raise InvalidMessage(f"asked to train on period {period}, which has no training target here")
        prototype_dp_options(task.options)  # refused on arrival, not when the prototype is due
        return period

    def _start(self, task: RoundTask, global_params: Mapping[str, np.ndarray]) -> int:
        """Check the task, then apply the global shared adapter and p̃ and observe the period."""
        period = self.check_task(task)
        self.check_global(global_params)
        self.device.set_shared(global_params)
        self.device.proto_dp = prototype_dp_options(task.options)  # what is sent, and how p̃ is bounded on arrival
        if task.prototype is not None:
            self.device.set_p_tilde(task.prototype)
        self._observe(period)
        return period

    def evaluate(self, task: RoundTask, global_params: Mapping[str, np.ndarray]) -> Update:
        """Observe period t, score the current model on the held-out items of periods ≤ t, report."""
        period = self._start(task, global_params)
        metrics: dict[str, float] = {}
        periods = [s for s in range(1, period + 1) if self.log.test_position(s) is not None]
        for s in periods:
            rank = self.rank_held_out(s)
            metrics[metric_key("hr", s)], metrics[metric_key("ndcg", s)] = hit_ndcg(np.array([rank]), K)
            metrics[rank_key(s)] = float(rank)
        active = self.log.active(period)
        if period > self.scored_until:  # test, then train: this period's interactions, before any training on them
            pos = self.log.period_positions(period)
            hits, ndcg = prequential_totals(self.device.rank_history(pos)) if len(pos) else (0.0, 0.0)
            metrics.update({PREQ_KEYS[0]: float(len(pos)), PREQ_KEYS[1]: hits, PREQ_KEYS[2]: ndcg})
            self.scored_until = period
        metrics["active"] = float(active)
        metrics["new_targets"] = float(len(self.log.train_positions(period)))
        prototype = self.device.upload_prototype() if active and self.spec.prototypes else None
        return Update(fleet=task.fleet, device_id=task.device_id, round_id=task.round_id, task=task.task,
                      kind="evaluate", base_version=task.model_version, n_samples=len(periods), metrics=metrics,
                      prototype=prototype)

    def rank_held_out(self, period: int) -> int:
        """Rank of the held-out item of `period`: full ranking over all items, the user's earlier items
        excluded (the same rule as the coordinator-side simulation)."""
        j = self.log.test_position(period)
        if j is None:
            raise ValueError(f"no held-out item in period {period}")
        params = self.device.params()
        z = represent(params, self.device.reprs(np.array([j])), self.device.p_tilde)
        return int(ranks(full_scores(z, self.device.items, params), self.log.items[[j]], [self.log.items[:j]])[0])

    def train(self, task: RoundTask, global_params: Mapping[str, np.ndarray]) -> Update:
        """Train the adapter on period t's targets (FCUCR: with time-aware self-distillation)."""
        period = self._start(task, global_params)
        positions = self.log.train_positions(period)
        stats = self.device.train(positions, distill=self.spec.distill)
        msg = self.device.upload(with_prototype=False)
        metrics = {"loss_first": stats.loss_first, "loss_last": stats.loss_last,
                   "distill_weight": stats.distill_weight, "gap_days": stats.gap_days}
        return Update(fleet=task.fleet, device_id=task.device_id, round_id=task.round_id, task=task.task,
                      base_version=task.model_version, n_samples=msg["n_samples"], delta=msg["delta"],
                      metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)})


class RecEdgeClient(EdgeClient):
    """A recommender device on the fleet: the TSFM device's transport with :class:`RecLearner` as
    its learner (``task="rec"`` topics). A malformed global model or task (wrong shapes, wrong
    method, a prototype of the wrong size) is refused with a logged, counted reason, and the device's
    state is left as it was."""

    learner: RecLearner

    def __init__(self, device_id: str, fleet: str, learner: RecLearner, broker: BrokerAddress, *,
                 seed: int = 0, profile: str = "generic", network: NetworkLoop | None = None) -> None:
        super().__init__(device_id, fleet, learner, broker, profile=profile, domain="movielens", seed=seed,
                         task=TASK, network=network)  # type: ignore[arg-type]  # RecLearner offers what EdgeClient reads

    def _check_params(self, params: Params) -> None:
        self.learner.check_global(params)

    def _dispatch(self, msg: Message) -> None:
        """Refuse a malformed task on arrival (logged, counted), before it is queued for the worker."""
        if isinstance(msg, RoundTask):
            try:
                self.learner.check_task(msg)
            except ProtocolError as err:
                self.receiver.reject(err, self.topics.task(self.device_id))
                return
        super()._dispatch(msg)

    def _compute(self, task: RoundTask) -> Update:
        global_params: Params = self.global_models[task.model_version].params
        try:
            if task.kind == "evaluate":
                return self.learner.evaluate(task, global_params)
            update = self.learner.train(task, global_params)
        except ProtocolError as err:  # checked again here: the device may have moved on since arrival
            self.receiver.reject(err, self.topics.task(self.device_id))
            raise
        self.stats.rounds += 1
        self.stats.last_metrics = dict(update.metrics)
        return update
