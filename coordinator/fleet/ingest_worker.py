"""`fedge ingest`: one of several processes that store a fleet's updates, sharing them through an MQTT v5 shared
subscription (``$share/…``), while one `fedge serve` runs the rounds and aggregates.

Why: decoding and validating 10,000 updates of 13 KB is the part of a round that grows with the fleet, and one
Python process does it on one core. With ``fedge serve --ingest-workers K`` (or ``fedge ingest`` started on other
hosts against the same PostgreSQL database), the broker hands each update to one of the K workers; each worker runs
the same checks as the coordinator (:func:`coordinator.fleet.checks.check_update`), batches its writes
(:class:`~coordinator.fleet.ingest.BatchWriter`), adds what it stored to its own running sum row of the round in the
same transaction, and acknowledges to the broker only after the commit. The coordinator closes the round from the
sum of those rows, in the transaction that reads them, so a worker can neither add an update to a closed round nor
have one counted twice (each stored update is answered with a Receipt, as the coordinator does); a worker that dies
leaves its unacknowledged updates to the broker, which re-delivers them to another worker (a shared subscription's
session) or to it when it returns.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import numpy as np

from coordinator.fleet.aggregation import Bounds, global_norm, summable
from coordinator.fleet.checks import check_update, send_reject
from coordinator.fleet.ingest import BatchWriter
from coordinator.fleet.state import CONFLICT, DUPLICATE, STORED, FleetState, RoundRecord, UpdateRow
from coordinator.fleet.strategies import FleetStrategy, fleet_strategy
from edge_client.wire import (
    DuplicateUpdate,
    ProtocolError,
    Receipt,
    Receiver,
    RoundClosed,
    StaleRound,
    Topics,
    Update,
    encode,
)
from edge_client.wire import mqtt as M

log = logging.getLogger("fedge.ingest")


def shared_updates_filter(topics: Topics) -> str:
    """The shared subscription all of a fleet's ingest workers join (one group per fleet)."""
    return f"$share/fedge-{topics.fleet}-ingest/{topics.all_updates}"


class IngestWorker:
    def __init__(self, state_url: str, broker: M.BrokerAddress, fleet: str, index: int) -> None:
        if broker.mqtt311:
            raise ValueError("shared subscriptions need MQTT v5; in 3.1.1 mode the coordinator ingests alone")
        self.state = FleetState(state_url)
        self.broker = broker
        self.topics = Topics(fleet)
        self.name = f"ingest-{index}"
        self.receiver = Receiver(self.name)
        self.writer = BatchWriter(self.state, ingester=self.name)
        self.stored = 0
        self._rounds: dict[int, tuple[RoundRecord, FleetStrategy, dict[str, tuple[int, ...]], float]] = {}
        self.client = M.make_client(f"fedge-{fleet}-{self.name}", manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.writer.submit(lambda st: st.mark_subscribed(self.name))

    def start(self) -> IngestWorker:
        M.connect(self.client, self.broker, persistent=True)
        return self

    def stop(self) -> None:
        self.writer.flush()  # commits (and acknowledges) what is queued while the session can still PUBACK
        self.client.disconnect()
        self.client.loop_stop()
        self.writer.stop()  # what paho delivered while disconnecting is committed, never acknowledged
        self.state.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            client.subscribe(shared_updates_filter(self.topics), qos=1)
            log.info("%s subscribed to %s", self.name, shared_updates_filter(self.topics))

    def _round(self, round_id: int) -> tuple[RoundRecord, FleetStrategy, dict[str, tuple[int, ...]], float]:
        """The open round an update claims, with its strategy and head shapes (read once per round)."""
        if round_id not in self._rounds:
            try:
                rec = self.state.round(round_id)
            except KeyError:
                raise StaleRound(f"no round {round_id}") from None
            if rec.state != "open":
                raise StaleRound(f"round {round_id} is {rec.state}")
            c = rec.config
            strategy = fleet_strategy(c.get("strategy", "fedavg"), clip_norm=c.get("clip_norm"),
                                      tv_temperature=c.get("tv_temperature", 0.1))
            base = self.state.model(rec.base_version)
            shapes = {k: tuple(np.shape(v)) for k, v in base.items()}
            self._rounds = {round_id: (rec, strategy, shapes, global_norm(base))}  # one open round at a time
        return self._rounds[round_id]

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        mid, qos = message.mid, message.qos
        deferred = False
        try:
            deferred = self._handle(message, lambda _result: client.ack(mid, qos))
        except Exception:  # never let a bug kill paho's network thread
            log.exception("%s: error handling message on %s", self.name, message.topic)
        finally:
            if not deferred:
                client.ack(mid, qos)

    def _handle(self, message: Any, ack: Any) -> bool:
        device = self.topics.device_of(message.topic)
        try:
            msg = self.receiver.accept(message.topic, message.payload, self.topics)
        except ProtocolError as err:
            send_reject(self.client, self.topics, device, err, "-")
            return False
        if not isinstance(msg, Update):
            return False
        try:
            rec, strategy, shapes, reference = self._round(msg.round_id)
            check_update(msg, rec, registered=self.state.has_device(msg.device_id), expected_shapes=shapes)
        except ProtocolError as err:
            self.receiver.reject(err, message.topic, len(message.payload))
            send_reject(self.client, self.topics, device, err, msg.msg_id)
            return False
        norm = global_norm(msg.delta) if rec.kind == "train" else None
        weighted = None
        if rec.kind == "train" and strategy.streaming and summable(msg.n_samples, norm or 0.0, Bounds(**rec.config.get(
                "bounds", {})), reference):
            weighted = strategy.weigh(msg)
        row = UpdateRow(msg.round_id, msg.device_id, msg.msg_id, msg.n_samples, bytes(message.payload), msg.metrics,
                        weighted, norm)

        def stored(result: object) -> None:
            if result in (STORED, DUPLICATE):
                M.publish(self.client, self.topics.task(msg.device_id), encode(Receipt(
                    fleet=self.topics.fleet, device_id=msg.device_id, round_id=msg.round_id, ref_msg_id=msg.msg_id)),
                    expiry_s=3600)
            else:
                err = (DuplicateUpdate(f"device {msg.device_id} already sent another update for round {msg.round_id}")
                       if result == CONFLICT else RoundClosed(f"round {msg.round_id} closed before this update"))
                self.receiver.reject(err, message.topic, len(message.payload))
                send_reject(self.client, self.topics, msg.device_id, err, msg.msg_id)
            ack(result)

        self.writer.submit(row, stored)
        return True


def run_worker(state_url: str, broker: M.BrokerAddress, fleet: str, index: int) -> None:
    """Run until SIGTERM/SIGINT (what `fedge ingest` and `fedge serve --ingest-workers` call)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    worker = IngestWorker(state_url, broker, fleet, index).start()
    try:
        done.wait()
    finally:
        worker.stop()
