"""Federated continual recommendation over MQTT: the same method as :func:`run_federated_rec`, but every
user is a :class:`edge_client.recsys.client.RecEdgeClient` behind a real broker and the coordinator
is the fleet's :class:`coordinator.fleet.server.FleetCoordinator` (SQLite round state, deadlines,
validation, FedAvg of the shared adapter from :mod:`coordinator.fleet.strategies.fedavg`).

What the recommender adds to the fleet coordinator (:class:`RecFleetCoordinator`): it chooses the
devices of a round itself (everyone for an evaluate round, the users with new training targets for
a train round), it keeps FCUCR's :class:`PrototypeServer` fed with the prototypes that arrive in
evaluate updates, and it puts each user's p̃ into that user's tasks. A period t is an evaluate round
(the devices observe period t, score their current models on their own held-out items and send
their prototypes) followed by a train round; one more evaluate round scores the final models (see
:mod:`edge_client.recsys.client`). The metrics come from the devices, so the coordinator never sees
an item id -- and yet, for the same seed, the numbers equal the in-process simulation's: the devices
run the same code on the same data in the same order, and the wire carries float32, as the
simulation does (``tests/test_recommender_mqtt.py`` checks this).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from coordinator.fleet.aggregation import Bounds
from coordinator.fleet.broker import raise_fd_limit
from coordinator.fleet.server import FleetConfig, FleetCoordinator, RoundResult
from coordinator.fleet.state import FleetState, RoundRecord
from coordinator.recsys.simulation import (
    MethodResult,
    Prequential,
    PrototypeServer,
    RecSimConfig,
    StageCallback,
    StageLog,
    initial_shared,
)
from edge_client.recsys.client import PREQ_KEYS, TASK, RecEdgeClient, RecLearner, rank_key
from edge_client.recsys.data import ContinualSplit
from edge_client.recsys.device import METHODS, RecDevice
from edge_client.recsys.encoder import SequenceEncoder
from edge_client.wire import InvalidMessage, RoundTask, Update, WrongShape
from edge_client.wire.mqtt import BrokerAddress
from edge_client.wire.mqtt_loop import NetworkLoop

log = logging.getLogger("fedge.coordinator.rec")

# The recommender's FedAvg weighs every user by their period's training targets, heavy users most (the method the
# simulation and benchmarks/recommender.py measure). The fleet's default adaptive bounds would cap a count at twice
# the round's median and clip deltas at twice the median norm: at 943 users both bite (heavy users, lr 1e-2), and
# the fleet would then run a different method from the one benchmarked (rec_fleet found the ranks differing).
PLAIN_FEDAVG = Bounds(norm_multiple=None, weight_multiple=None, max_samples=None)


def device_id(user: int) -> str:
    """Zero-padded, so the fleet's sorted order (SQLite, aggregation) is the users' numeric order."""
    return f"user{int(user):04d}"


class RecFleetCoordinator(FleetCoordinator):
    """The fleet coordinator for task ``rec`` with FCUCR's prototype exchange.

    Restart-safe without a table of its own: the prototype server and every device's p̃ are a pure
    function of the evaluate updates already in SQLite (stored byte for byte, ordered by round and
    device id), so a new coordinator on the same database replays the closed evaluate rounds and
    ends with the same prototypes, in the same order, and bit-identical p̃. Persisting the server's
    state as well would store the same facts twice and could disagree with the updates after a
    crash between the two writes. The replay holds because the exchange belongs to closing an
    evaluate round (:meth:`_close`), not to the caller: every closed evaluate round has been
    exchanged, and one that closed just before a crash is exchanged by the replay.
    """

    def __init__(self, cfg: FleetConfig, broker: BrokerAddress, state: FleetState, *, method: str, dim: int,
                 top_m: int = 10, temperature: float = 0.1) -> None:
        if cfg.task != TASK:
            raise ValueError(f"a recommender fleet runs task {TASK!r}, not {cfg.task!r}")
        super().__init__(cfg, broker, state)
        self.method = method
        self.spec = METHODS[method]
        self.dim = dim
        self.top_m, self.temperature = top_m, temperature
        self.replay_prototypes()  # a restart: rebuild from what SQLite holds

    def replay_prototypes(self) -> None:
        """Rebuild the prototype server and every p̃ from the closed evaluate rounds in SQLite."""
        self.prototypes = PrototypeServer(self.top_m, self.temperature) if self.spec.prototypes else None
        self.p_tilde: dict[str, np.ndarray] = {}  # device -> the latest mix of its neighbours' prototypes
        for round_id in self.state.closed_rounds(self.cfg.task, "evaluate"):
            self.exchange_prototypes(round_id)

    def _on_forget(self, device_id: str) -> None:
        """The device's updates are gone from SQLite, so replaying drops its prototype from the server
        and from every other user's p̃ (the next tasks carry mixes without it)."""
        super()._on_forget(device_id)
        with self._changed:
            self.replay_prototypes()

    def build_task(self, rec, device_id: str) -> RoundTask:  # type: ignore[no-untyped-def]
        task = super().build_task(rec, device_id)
        p = self.p_tilde.get(device_id)
        return task if p is None else task.model_copy(update={"prototype": p})

    def _check_update(self, msg: Update) -> RoundRecord:
        rec = super()._check_update(msg)
        if msg.prototype is None:
            return rec
        if self.prototypes is None:
            raise InvalidMessage(f"{self.method} does not exchange prototypes; the update carries one")
        if msg.kind != "evaluate":
            raise InvalidMessage("prototypes travel in evaluate updates")
        if msg.prototype.shape != (self.dim,):
            raise WrongShape(f"prototype: expected shape ({self.dim},), got {tuple(msg.prototype.shape)}")
        return rec

    def _close(self, rec: RoundRecord, base: dict[str, np.ndarray], t0: float, resumed: bool) -> RoundResult:
        """Close the round; an evaluate round's prototypes go to the prototype server right away."""
        result = super()._close(rec, base, t0, resumed)
        if rec.kind == "evaluate":
            self.exchange_prototypes(rec.round_id)
        return result

    def exchange_prototypes(self, round_id: int) -> dict[str, np.ndarray]:
        """Feed the prototypes of an evaluate round to the prototype server (in device order, as the
        simulation does) and compute p̃ for every device that sent one; returns those p̃."""
        if self.prototypes is None:
            return {}
        sent = self.stored_updates(round_id)  # ordered by device id
        senders = [u.device_id for u in sent if u.prototype is not None]
        for u in sent:
            if u.prototype is not None:
                self.prototypes.submit(u.device_id, u.prototype)
        mixed = {d: p.astype(np.float32) for d, p in self.prototypes.neighbours(senders).items()}
        self.p_tilde.update(mixed)
        return mixed


def prequential_of(result: RoundResult) -> Prequential:
    """The period's prequential totals, added up over the devices in device order (as the simulation adds
    them up user by user)."""
    n, hits, ndcg = 0, 0.0, 0.0
    for d in sorted(result.metrics):
        m = result.metrics[d]
        if PREQ_KEYS[0] in m:
            n, hits, ndcg = n + int(m[PREQ_KEYS[0]]), hits + m[PREQ_KEYS[1]], ndcg + m[PREQ_KEYS[2]]
    return Prequential(n, hits, ndcg)


def ranks_by_period(result: RoundResult, periods: range) -> dict[int, np.ndarray]:
    """Per period, the rank each device reported for its held-out item, in device order (= the users'
    order in the simulation's test sets, device ids being zero-padded user ids)."""
    return {s: np.array([result.metrics[d][rank_key(s)] for d in sorted(result.metrics)
                         if rank_key(s) in result.metrics[d]], np.int64) for s in periods}


def start_rec_devices(split: ContinualSplit, encoder: SequenceEncoder, items: np.ndarray, cfg: RecSimConfig,
                      method: str, broker: BrokerAddress, fleet: str, network: NetworkLoop | None = None
                      ) -> list[RecEdgeClient]:
    """One connected device per user, seeded exactly as :func:`run_federated_rec` seeds its devices. The
    devices of this one process share the ONNX session, the item table (read-only) and, given
    `network`, one network thread (paho's thread per client stops at ~340 clients per process, see
    :mod:`edge_client.wire.mqtt_loop`)."""
    spec = METHODS[method]
    clients = []
    for i, (uid, log_) in enumerate(sorted(split.logs.items())):
        dev = RecDevice(str(uid), encoder, items, cfg.adapter, shared_keys=spec.shared, use_gate=spec.gate,
                        seed=cfg.seed * 100_003 + i, item_adapter=spec.item_adapter)
        client = RecEdgeClient(device_id(uid), fleet, RecLearner(dev, log_, method), broker, seed=cfg.seed + i,
                               network=network)
        clients.append(client.start())
    return clients


def run_federated_mqtt(
    name: str,
    split: ContinualSplit,
    encoder: SequenceEncoder,
    items: np.ndarray,
    cfg: RecSimConfig,
    broker: BrokerAddress,
    db: str | Path,
    *,
    fleet: str = "rec",
    deadline_s: float = 600.0,
    on_stage: StageCallback | None = None,
    on_round: Callable[[str, int, int], None] | None = None,
) -> MethodResult:
    """`name` (a key of METHODS) through every period over MQTT; the result has the simulation's shape.

    StageLog.bytes_up/bytes_down are what crossed the broker in the period's rounds (updates up;
    global model and tasks down), measured by the coordinator."""
    with threadpool_limits(limits=1):  # see below
        return _run_federated_mqtt(name, split, encoder, items, cfg, broker, db, fleet=fleet, deadline_s=deadline_s,
                                   on_stage=on_stage, on_round=on_round)


def _run_federated_mqtt(name: str, split: ContinualSplit, encoder: SequenceEncoder, items: np.ndarray,
                        cfg: RecSimConfig, broker: BrokerAddress, db: str | Path, *, fleet: str, deadline_s: float,
                        on_stage: StageCallback | None, on_round: Callable[[str, int, int], None] | None
                        ) -> MethodResult:
    """The body of :func:`run_federated_mqtt`, run with one BLAS thread: every simulated device trains
    on its own worker thread in this one process, and a multi-threaded BLAS under each of them
    oversubscribes the cores (60 devices on 2 cores: 161 s instead of 6.6 s for four periods)."""
    dim = items.shape[1]
    initial = initial_shared(name, items, cfg)
    coordinator = RecFleetCoordinator(
        FleetConfig(fleet=fleet, task=TASK, deadline_s=deadline_s, quorum_fraction=1.0, upload_dtype="float32",
                    seed=cfg.seed, bounds=PLAIN_FEDAVG), broker, FleetState(db), method=name, dim=dim, top_m=cfg.top_m,
        temperature=cfg.proto_temperature)
    clients: list[RecEdgeClient] = []
    raise_fd_limit()  # one socket per device in this process (the default soft limit is 1024)
    network = NetworkLoop(f"rec-{fleet}-devices")
    result = MethodResult(name)
    try:
        coordinator.start()
        coordinator.ensure_model(initial, {"backbone_sha256": encoder.sha256})
        clients = start_rec_devices(split, encoder, items, cfg, name, broker, fleet, network)
        everyone = [c.device_id for c in clients]
        online = coordinator.wait_for_devices(len(everyone), timeout_s=60)
        if len(online) < len(everyone):
            raise RuntimeError(f"only {len(online)} of {len(everyone)} recommender devices came online")
        options = {"method": name, **cfg.prototype_options()}
        stage: StageLog | None = None
        start = time.perf_counter()
        for t in range(1, split.n_periods + 2):
            progress = (lambda done, total, t=t: on_round("evaluate", t, done)) if on_round else None
            evaluated = coordinator.run_round("evaluate", progress, devices=everyone, options={**options, "period": t})
            if stage is not None:  # the models after period t−1, scored on periods ≤ t by the devices
                for s, r in ranks_by_period(evaluated, range(1, min(t, split.n_periods) + 1)).items():
                    stage.score(s, r)
                stage.bytes_up += evaluated.bytes_up
                stage.bytes_down += evaluated.bytes_down
                stage.wall_s = time.perf_counter() - start
                result.stages.append(stage)
                if on_stage:
                    on_stage(name, stage)
            if t > split.n_periods:
                break
            start = time.perf_counter()
            stage = StageLog(t, preq=prequential_of(evaluated))
            active = [d for d in sorted(evaluated.metrics) if evaluated.metrics[d].get("active")]
            trainers = [d for d in active if evaluated.metrics[d].get("new_targets", 0) > 0]
            stage.skipped_users = len(active) - len(trainers)
            if trainers:
                progress = (lambda done, total, t=t: on_round("train", t, done)) if on_round else None
                trained = coordinator.run_round("train", progress, devices=trainers, options={**options, "period": t})
                stage.trained_users = len(trained.n_samples)
                weights = [trained.metrics[d].get("distill_weight", 0.0) for d in sorted(trained.metrics)]
                stage.mean_distill_weight = float(np.mean(weights)) if weights else 0.0
                stage.bytes_up += trained.bytes_up
                stage.bytes_down += trained.bytes_down
                if trained.state != "closed":
                    log.warning("period %d: train round %d %s", t, trained.round_id, trained.state)
        result.final_global = coordinator.current_model()[1]
        return result
    finally:
        for c in clients:
            c.stop()
        network.stop()
        coordinator.stop()
        coordinator.state.close()
