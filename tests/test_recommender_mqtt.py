"""Recommender rounds over a real Mosquitto: the MQTT path gives the in-process simulation's numbers,
and devices and coordinator refuse malformed prototypes without changing any state.

A handful of users from the synthetic log (tests/conftest.py) and a tiny SASRec, so each test takes a couple of
seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from coordinator.recsys.fleet import run_federated_mqtt
from coordinator.recsys.simulation import RecSimConfig, build_test_sets, initial_shared, run_federated_rec
from edge_client.recsys.adapter import RecAdapterConfig
from edge_client.recsys.client import RecEdgeClient, RecLearner
from edge_client.recsys.data import continual_split, interactions_from_array
from edge_client.recsys.device import METHODS, RecDevice
from edge_client.recsys.encoder import load_encoder
from edge_client.wire import ALLOWED_DTYPES, ARRAY_EXT_CODE, GlobalModel, RoundTask, Topics, Update, decode, encode
from edge_client.wire.codec import pack_ext

CFG = RecSimConfig(adapter=RecAdapterConfig(rank=4, steps=5), top_m=3, seed=1)


@pytest.fixture(scope="module")
def split(rec_log):
    """Eight users: enough for prototype neighbours, few enough for one process and a few seconds."""
    return continual_split(interactions_from_array(rec_log), n_periods=3, pretrain_frac=0.4, users=8,
                           seed=0)


@pytest.mark.broker
@pytest.mark.parametrize("method", ["fcucr", "fedavg", "fcucr-clipped"])
def test_mqtt_rounds_match_the_in_process_simulation(method, split, bundle, mosquitto, tmp_path):
    """fcucr-clipped: every uploaded prototype clipped to a norm most exceed (prototype DP with σ = 0, the only
    deterministic setting), which the coordinator's task options must carry to the devices."""
    encoder, items = load_encoder(bundle["dir"])
    cfg = replace(CFG, proto_clip=0.05, proto_noise=0.0) if method == "fcucr-clipped" else CFG
    method = method.removesuffix("-clipped")
    tests = build_test_sets(split, encoder)
    local = run_federated_rec(method, split, encoder, items, tests, cfg)
    if cfg.proto_clip is not None:  # the clip bites: FCUCR's scores move with it
        exact = run_federated_rec(method, split, encoder, items, tests, CFG)
        assert [st.scores for st in exact.stages] != [st.scores for st in local.stages]
    wire = run_federated_mqtt(method, split, encoder, items, cfg, mosquitto.address, tmp_path / "fleet.sqlite",
                              fleet=f"rec-{method}", deadline_s=60)
    assert [st.period for st in wire.stages] == [1, 2, 3]
    for a, b in zip(local.stages, wire.stages, strict=True):
        assert b.scores == a.scores, (method, a.period)  # the devices measured exactly what the simulation did
        assert set(b.ranks) == set(a.ranks) and all(np.array_equal(b.ranks[s], a.ranks[s]) for s in a.ranks)
        assert (b.preq.n, b.preq.hits, b.preq.ndcg_sum) == (a.preq.n, a.preq.hits, a.preq.ndcg_sum) and a.preq.n > 0
        assert (b.trained_users, b.skipped_users) == (a.trained_users, a.skipped_users)
        assert b.mean_distill_weight == a.mean_distill_weight
        assert b.bytes_up > 0 and b.bytes_down > 0
    assert set(wire.final_global) == set(METHODS[method].shared)
    for k, v in local.final_global.items():  # FedAvg over the broker = FedAvg in process, bit for bit
        np.testing.assert_array_equal(wire.final_global[k], v)
    if method == "fcucr":
        assert wire.stages[-1].mean_distill_weight > 0
        assert any(st.mean_distill_weight != 0 for st in wire.stages)


class _Listener:
    """A raw MQTT client: publishes hand-made payloads and records what the device sends."""

    def __init__(self, address, topics: Topics) -> None:
        self.updates: list[bytes] = []
        self.got_update = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="rec-test",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.subscribe(topics.all_updates, qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.updates.append(bytes(message.payload))
        self.got_update.set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _fresh(task: RoundTask, **update) -> RoundTask:
    """The same task under a new message id (a receiver refuses a message id it has seen)."""
    return task.model_copy(update={"msg_id": uuid.uuid4().hex, **update})


def _raw_task(task: RoundTask, prototype) -> bytes:
    """A task whose prototype skipped pydantic on the sending side (what a broken coordinator sends)."""
    raw = _fresh(task).model_dump(mode="python")
    if isinstance(prototype, np.ndarray) and prototype.dtype.name not in ALLOWED_DTYPES:  # what pack_ext refuses
        prototype = msgpack.ExtType(ARRAY_EXT_CODE, msgpack.packb([prototype.dtype.name, list(prototype.shape),
                                                                  prototype.astype(prototype.dtype.newbyteorder("<"))
                                                                  .tobytes()]))
    raw["prototype"] = prototype
    return msgpack.packb(raw, default=pack_ext, use_bin_type=True)


def _wait(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.broker
def test_device_refuses_malformed_prototypes_and_keeps_working(split, bundle, mosquitto):
    encoder, items = load_encoder(bundle["dir"])
    d = items.shape[1]
    uid, log = next((u, lg) for u, lg in sorted(split.logs.items()) if len(lg.train_positions(1)) > 0)
    spec = METHODS["fcucr"]
    dev = RecDevice(str(uid), encoder, items, CFG.adapter, shared_keys=spec.shared, use_gate=True, seed=0,
                    item_adapter=True)
    client = RecEdgeClient("alice", "rec-bad", RecLearner(dev, log, "fcucr"), mosquitto.address).start()
    topics = Topics("rec-bad")
    raw = _Listener(mosquitto.address, topics)
    try:
        shared = initial_shared("fcucr", items, CFG)
        raw.publish(topics.global_model("rec"), encode(GlobalModel(fleet="rec-bad", task="rec", version=0,
                                                                   params=shared, backbone_sha256=encoder.sha256)),
                    retain=True)
        assert _wait(lambda: 0 in client.globals)
        history_before = len(dev.history)
        base = RoundTask(fleet="rec-bad", device_id="alice", round_id=1, task="rec", kind="train", model_version=0,
                         deadline_ts=time.time() + 60, options={"method": "fcucr", "period": 1})
        bad = [
            (_raw_task(base, np.ones(d + 1, np.float32)), "wrong_shape"),  # another model's dimension
            (_raw_task(base, np.full(d, np.nan, np.float32)), "non_finite"),
            (_raw_task(base, np.arange(d)), "wrong_dtype"),  # item ids are not a prototype
            (_raw_task(base, np.ones((2, d), np.float32)), "wrong_shape"),
            (_raw_task(base, b"\x00" * 64), "invalid"),
            (encode(_fresh(base, options={"method": "fedavg", "period": 1})), "invalid"),
            (encode(_fresh(base, options={"method": "fcucr", "period": 1, "proto_clip": -1.0})), "invalid"),
        ]
        for payload, _ in bad:
            raw.publish(topics.task("alice"), payload)
        want = {}
        for _, reason in bad:
            want[reason] = want.get(reason, 0) + 1
        assert _wait(lambda: dict(client.receiver.rejected) == want), client.receiver.rejected
        time.sleep(0.3)
        assert raw.updates == []  # nothing was trained or sent
        assert dev.p_tilde is None and len(dev.history) == history_before and dev.snapshot is None

        good = _fresh(base, prototype=np.full(d, 0.1, np.float32))
        raw.publish(topics.task("alice"), encode(good))
        assert raw.got_update.wait(20), "a valid task after the bad ones must still be answered"
        update = decode(raw.updates[0])
        assert isinstance(update, Update) and update.n_samples == len(log.train_positions(1))
        assert set(update.delta) == set(spec.shared) and update.prototype is None  # the personal parts never leave
        assert not {"u", "Wg", "bg"} & set(update.delta)
        np.testing.assert_array_equal(dev.p_tilde, np.full(d, 0.1, np.float32))
    finally:
        raw.stop()
        client.stop()


def test_coordinator_refuses_malformed_prototype_updates(tmp_path):
    from coordinator.fleet.server import FleetConfig
    from coordinator.fleet.state import FleetState
    from coordinator.recsys.fleet import RecFleetCoordinator
    from edge_client.wire import InvalidMessage, WrongShape
    from edge_client.wire.mqtt import BrokerAddress

    state = FleetState(tmp_path / "fleet.sqlite")
    coord = RecFleetCoordinator(FleetConfig(fleet="rec-c", task="rec"), BrokerAddress(), state, method="fcucr",
                                dim=16)
    coord.ensure_model({"U": np.zeros((16, 4), np.float32), "V": np.zeros((4, 16), np.float32)})
    state.upsert_device("bob", state="online")
    rec = state.open_round("rec", "evaluate", 0, ["bob"], 1, time.time() + 60, {})
    coord._set_open(rec)

    def update(prototype, kind="evaluate"):
        return Update(fleet="rec-c", device_id="bob", round_id=rec.round_id, task="rec", kind=kind, base_version=0,
                      n_samples=1, prototype=prototype)

    coord._check_update(update(np.zeros(16, np.float32)))  # the right size passes
    with pytest.raises(WrongShape):
        coord._check_update(update(np.zeros(17, np.float32)))
    fedavg = RecFleetCoordinator(FleetConfig(fleet="rec-c", task="rec"), BrokerAddress(), state, method="fedavg",
                                 dim=16)
    fedavg._set_open(rec)
    with pytest.raises(InvalidMessage):  # a method without prototype transfer takes none
        fedavg._check_update(update(np.zeros(16, np.float32)))
    state.close()


@pytest.mark.broker
def test_a_restarted_coordinator_rebuilds_the_prototype_server_and_p_tilde(split, bundle, mosquitto,
                                                                          tmp_path):
    """Two FCUCR periods over the broker, then a new coordinator on the same database (what a
    restart mid-run gets): it must hold the same prototypes, in the same order, and send the same
    p̃ as the first one, or the prototype transfer silently degrades after a restart."""
    from coordinator.fleet.server import FleetConfig
    from coordinator.fleet.state import FleetState
    from coordinator.recsys.fleet import RecFleetCoordinator, start_rec_devices
    from edge_client.recsys.client import TASK

    encoder, items = load_encoder(bundle["dir"])
    dim, fleet = items.shape[1], "rec-restart"
    cfg = FleetConfig(fleet=fleet, task=TASK, deadline_s=60, quorum_fraction=1.0, upload_dtype="float32",
                      seed=CFG.seed)

    def coordinator() -> RecFleetCoordinator:
        return RecFleetCoordinator(cfg, mosquitto.address, FleetState(tmp_path / "fleet.sqlite"), method="fcucr",
                                   dim=dim, top_m=CFG.top_m, temperature=CFG.proto_temperature)

    first = coordinator()
    clients = []
    try:
        first.start()
        first.ensure_model(initial_shared("fcucr", items, CFG), {"backbone_sha256": encoder.sha256})
        clients = start_rec_devices(split, encoder, items, CFG, "fcucr", mosquitto.address, fleet)
        everyone = [c.device_id for c in clients]
        assert len(first.wait_for_devices(len(everyone), timeout_s=60)) == len(everyone)
        for t in (1, 2):
            options = {"method": "fcucr", "period": t}
            evaluated = first.run_round("evaluate", devices=everyone, options=options)
            trainers = [d for d in sorted(evaluated.metrics) if evaluated.metrics[d].get("new_targets", 0) > 0]
            if trainers:
                first.run_round("train", devices=trainers, options=options)
    finally:
        for c in clients:
            c.stop()
        first.stop()
        first.state.close()
    assert first.prototypes is not None and len(first.prototypes.protos) >= 2 and first.p_tilde

    second = coordinator()  # never started: the rebuild must not wait for the broker or the devices
    try:
        assert second.prototypes is not None
        assert list(second.prototypes.protos) == list(first.prototypes.protos)  # same order: same neighbours
        for d, p in first.prototypes.protos.items():
            np.testing.assert_array_equal(second.prototypes.protos[d], p)
        assert sorted(second.p_tilde) == sorted(first.p_tilde)
        for d, p in first.p_tilde.items():
            np.testing.assert_array_equal(second.p_tilde[d], p)
        last = second.state.round(second.state.next_round_id() - 1)
        d = sorted(first.p_tilde)[0]
        np.testing.assert_array_equal(second.build_task(last, d).prototype, first.p_tilde[d])  # what goes out

        gone = next(iter(second.prototypes.protos))  # this user runs `fedge-edge forget-me`
        second._on_forget(gone)
        assert gone not in second.prototypes.protos and gone not in second.p_tilde
        assert set(second.prototypes.protos) == set(first.prototypes.protos) - {gone}
        changed = [u for u in second.p_tilde if not np.array_equal(second.p_tilde[u], first.p_tilde[u])]
        assert changed  # the others' mixes no longer draw on the forgotten user's prototype
    finally:
        second.state.close()


@pytest.mark.broker
def test_uneven_users_get_plain_fedavg_as_in_the_simulation(rec_log, bundle, mosquitto, tmp_path):
    """All 40 synthetic users, whose target counts differ by more than twice the median: the fleet's default adaptive
    bounds would cap and clip them (a different aggregate from the simulation's, as rec_fleet found at 943 users);
    the recommender's fleet runs the benchmarked plain FedAvg, so the shared adapter still matches bit for bit."""
    everyone = continual_split(interactions_from_array(rec_log), n_periods=3, pretrain_frac=0.4)
    cfg = RecSimConfig(adapter=RecAdapterConfig(rank=4, steps=5, lr=1e-2), top_m=3, seed=2)
    encoder, items = load_encoder(bundle["dir"])
    local = run_federated_rec("fedavg", everyone, encoder, items, build_test_sets(everyone, encoder), cfg)
    wire = run_federated_mqtt("fedavg", everyone, encoder, items, cfg, mosquitto.address, tmp_path / "fleet.sqlite",
                              fleet="rec-uneven", deadline_s=60)
    for a, b in zip(local.stages, wire.stages, strict=True):
        assert all(np.array_equal(b.ranks[s], a.ranks[s]) for s in a.ranks)
    for k, v in local.final_global.items():
        np.testing.assert_array_equal(wire.final_global[k], v)
