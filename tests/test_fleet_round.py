"""A full federated round over a real Mosquitto: coordinator, three edge clients on real data,
exact FedAvg of what the devices sent, and bad input that is refused without harm."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest

from coordinator.fleet.aggregation import ClientUpdate, bound_updates
from coordinator.fleet.server import FleetConfig, FleetCoordinator, RoundInterrupted
from coordinator.fleet.simulation import carve_devices, start_devices
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.learning.head import slice_head
from edge_client.wire import codec
from edge_client.wire.mqtt import connect, make_client
from tests.waiting import wait_for

pytestmark = pytest.mark.broker
FLEET = "t1"


@pytest.fixture
def fleet(mosquitto, tiny_export, tmp_path):
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, deadline_s=60, local_epochs=1, lr=3e-3, min_devices=3),
                             mosquitto.address, FleetState(tmp_path / "fleet.sqlite")).start()
    coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
    devices = carve_devices(3, seed=1)
    clients = start_devices(devices, tiny_export["backbone"], mosquitto.address, FLEET, horizon=24)
    assert len(coord.wait_for_devices(3, 15)) == 3
    yield coord, clients
    for c in clients:
        c.stop()
    coord.stop()


def _assert_bounded_fedavg(coord, base, stored) -> None:
    """The new global head is the FedAvg of what the devices sent, after the default bounds (adaptive norm clip,
    capped weights)."""
    bounded = bound_updates([ClientUpdate(u.device_id, u.n_samples, u.delta) for u in stored], coord.cfg.bounds)
    n = np.array([u.n_samples for u in bounded.updates], np.float64)
    _, new = coord.current_model()
    for k in base:
        expected = base[k] + sum(w * np.asarray(u.delta[k], np.float64)
                                 for w, u in zip(n / n.sum(), bounded.updates, strict=True))
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)


def test_one_round_with_three_devices_aggregates_exact_fedavg(fleet) -> None:
    coord, clients = fleet
    base_version, base = coord.current_model()
    result = coord.run_round("train")

    assert result.state == "closed" and result.new_version == base_version + 1
    assert sorted(result.metrics) == sorted(c.device_id for c in clients)
    stored = [P.decode(p) for _, p in coord.state.updates(result.round_id)]
    assert len(stored) == 3
    _assert_bounded_fedavg(coord, base, stored)
    for u in stored:  # what left each device: deltas and metrics, float16, under the 32 KB budget
        assert set(u.delta) == set(base) and all(v.dtype == np.float16 for v in u.delta.values())
        assert {"global_mse", "personal_mse", "naive_mse"} <= set(u.metrics)
    assert 0 < result.bytes_up / 3 < 32 * 1024
    wait_for(lambda: all(result.new_version in c.globals for c in clients))  # everyone got the new head

    evaluation = coord.run_round("evaluate")
    assert evaluation.new_version is None and len(evaluation.metrics) == 3
    for m in evaluation.metrics.values():
        assert np.isfinite([m["global_mse"], m["personal_mse"], m["naive_mse"]]).all()


def test_bad_updates_are_refused_counted_and_the_round_still_completes(fleet, mosquitto) -> None:
    coord, clients = fleet
    topics = P.Topics(FLEET)
    victim = clients[0].device_id
    for c in clients:  # hold the real updates back until the attack is over
        c.learner.run_round = _delayed(c.learner.run_round, 2.0)
    inbox: list[P.Message] = []
    spy = make_client("spy")
    spy.on_message = lambda c, u, m: inbox.append(P.decode(m.payload))
    connect(spy, mosquitto.address, persistent=False)
    spy.subscribe(topics.task(victim), qos=1)
    evil = make_client("evil")
    connect(evil, mosquitto.address, persistent=False)

    runner = threading.Thread(target=lambda: results.append(coord.run_round("train")))
    results: list = []
    runner.start()
    wait_for(lambda: coord.state.open_rounds("tsfm"))
    (rec,) = coord.state.open_rounds("tsfm")
    base = coord.state.model(rec.base_version)
    good = {k: np.zeros(v.shape, np.float16) for k, v in base.items()}

    def update(**kw) -> P.Update:
        fields = dict(fleet=FLEET, device_id=victim, round_id=rec.round_id, base_version=rec.base_version,
                      n_samples=5, delta=good)
        fields.update(kw)
        return P.Update(**fields)

    raw = update().model_dump(mode="python")
    raw["delta"] = {**good, "point_bias": np.full(good["point_bias"].shape, np.nan, np.float32)}
    t = topics.update(rec.round_id, victim)
    attacks = [
        (t, b"\xc1not msgpack"),
        (t, msgpack.packb(raw, default=codec.pack_ext, use_bin_type=True)),  # NaN
        (t, P.encode(update(delta={**good, "point_bias": np.zeros(3, np.float16)}))),  # wrong shape
        (t, P.encode(update(round_id=rec.round_id + 7))),  # stale round
        (t, P.encode(update(base_version=rec.base_version + 5))),  # stale base model
        (t, P.encode(update(device_id="intruder"))),  # impersonation on the victim's topic
        (topics.update(rec.round_id, "ghost"), P.encode(update(device_id="ghost"))),  # unknown device
        (t, b"\x00" * (P.DEFAULT_LIMITS.max_payload_bytes + 10)),  # oversized
    ]
    for topic, payload in attacks:
        evil.publish(topic, payload, qos=1).wait_for_publish(5)
    wait_for(lambda: sum(coord.receiver.rejected.values()) >= len(attacks))
    assert coord.state.reported(rec.round_id) == set()  # nothing bad was stored
    runner.join(60)

    counted = coord.receiver.rejected
    for reason in ("malformed", "non_finite", "wrong_shape", "stale_round", "identity_mismatch", "unknown_device",
                   "oversized"):
        assert counted[reason] >= 1, (reason, counted)
    (result,) = results
    assert result.state == "closed" and len(result.metrics) == 3  # the real updates all counted, once
    wait_for(lambda: any(isinstance(m, P.Reject) for m in inbox))
    assert {m.reason for m in inbox if isinstance(m, P.Reject)} >= {"malformed", "non_finite", "wrong_shape"}
    for c in (spy, evil):
        c.disconnect()
        c.loop_stop()


def _delayed(fn, seconds: float):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


def test_device_refuses_a_global_head_of_the_wrong_shape_or_for_another_backbone(fleet, mosquitto) -> None:
    coord, clients = fleet
    before = dict(clients[0].globals)
    pub = make_client("bad-coordinator")
    connect(pub, mosquitto.address, persistent=False)
    bad = P.GlobalModel(fleet=FLEET, version=99, params={"point_weight": np.zeros((24, 3), np.float32)})
    pub.publish(P.Topics(FLEET).global_model("tsfm"), P.encode(bad), qos=1).wait_for_publish(5)
    wait_for(lambda: clients[0].receiver.rejected["wrong_shape"] >= 1)
    _, head = coord.current_model()
    other = P.GlobalModel(fleet=FLEET, version=98, params=head, backbone_sha256="f" * 64)
    pub.publish(P.Topics(FLEET).global_model("tsfm"), P.encode(other), qos=1).wait_for_publish(5)
    wait_for(lambda: clients[0].receiver.rejected["model_mismatch"] >= 1)
    # the model id outranks the file hash: the device's own file with another export's id is still refused
    mine = clients[0].learner.backbone.sha256
    other_id = P.GlobalModel(fleet=FLEET, version=97, params=head, backbone_sha256=mine, backbone_id="tsfm-0ther")
    pub.publish(P.Topics(FLEET).global_model("tsfm"), P.encode(other_id), qos=1).wait_for_publish(5)
    wait_for(lambda: clients[0].receiver.rejected["model_mismatch"] >= 2)
    assert {97, 98, 99}.isdisjoint(clients[0].globals) and set(before) <= set(clients[0].globals)
    pub.disconnect()
    pub.loop_stop()


def test_broker_publish_with_paho_v5_reaches_device_queue_when_offline(mosquitto) -> None:
    """The property restarts rely on: a persistent v5 session gets QoS 1 messages sent while it was away."""
    got: list[bytes] = []
    sub = make_client("persistent-sub")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    connect(sub, mosquitto.address, persistent=True)
    sub.subscribe("fedge/v1/x/q", qos=1)
    time.sleep(0.2)
    sub.disconnect()
    sub.loop_stop()
    pub = make_client("pub")
    connect(pub, mosquitto.address, persistent=False)
    pub.publish("fedge/v1/x/q", b"while-away", qos=1).wait_for_publish(5)
    sub2 = make_client("persistent-sub")
    sub2.on_message = lambda c, u, m: got.append(m.payload)
    connect(sub2, mosquitto.address, persistent=True)
    wait_for(lambda: got == [b"while-away"])
    assert sub2.protocol == paho.MQTTv5  # the persistent session is an MQTT v5 one (session expiry)
    for c in (pub, sub2):
        c.disconnect()
        c.loop_stop()


def test_task_vector_strategy_sends_each_device_its_own_aggregate(mosquitto, tiny_export, tmp_path) -> None:
    from coordinator.fleet.strategies.task_vector import personalized_aggregates

    coord = FleetCoordinator(FleetConfig(fleet="tv", deadline_s=60, local_epochs=1, lr=3e-3, min_devices=3,
                                         strategy="task_vector"),
                             mosquitto.address, FleetState(tmp_path / "tv.sqlite")).start()
    pre = slice_head(tiny_export["model"].head_state(), 24)
    coord.ensure_model(pre)
    clients = start_devices(carve_devices(3, seed=3), tiny_export["backbone"], mosquitto.address, "tv", horizon=24)
    try:
        assert len(coord.wait_for_devices(3, 15)) == 3
        first = coord.run_round("train")
        second = coord.run_round("train")
    finally:
        for c in clients:
            c.stop()
        coord.stop()
    assert first.state == second.state == "closed"
    starts = {d: coord.state.personal(d) for d in first.selected}
    assert all(p is not None for p in starts.values())
    # the stored personalised heads are pre + softmax(cos/T)-weighted task vectors of round 2
    taus = {}
    for _, payload in coord.state.updates(second.round_id):
        u = P.decode(payload)
        start = _personal_after_round(coord, first.round_id, u.device_id)  # what the device trained from
        taus[u.device_id] = {k: start[k].astype(np.float64) + u.delta[k] - pre[k] for k in pre}
    expected, w = personalized_aggregates(pre, taus, temperature=0.1)
    for d, params in expected.items():
        for k in pre:
            np.testing.assert_allclose(starts[d][k], params[k], rtol=1e-4, atol=1e-5)
    assert not np.allclose(starts[first.selected[0]]["point_weight"], starts[first.selected[1]]["point_weight"])
    assert np.allclose(w.sum(axis=1), 1.0)


def test_prototype_strategy_gives_each_device_the_heads_of_devices_like_it_and_places_a_new_one(
        mosquitto, tiny_export, tmp_path) -> None:
    """Devices send a feature prototype with their update (the strategy asks through the task options); each gets
    the prototype-weighted mix of the trained heads; a new device that announces its prototype in its hello trains
    its first round from the head it was placed at, not from the global head."""
    from coordinator.fleet.strategies.prototype import mix, place, prototype_weights
    from edge_client.daemon.client import EdgeClient
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.learning.prototype import PROTOTYPE_DIM, feature_prototype
    from edge_client.runtime.backbone import BackboneRunner

    coord = FleetCoordinator(FleetConfig(fleet="pr", deadline_s=60, local_epochs=1, lr=3e-3, min_devices=3,
                                         strategy="prototype"),
                             mosquitto.address, FleetState(tmp_path / "pr.sqlite")).start()
    pre = slice_head(tiny_export["model"].head_state(), 24)
    coord.ensure_model(pre)
    devices = carve_devices(4, seed=3)
    clients = start_devices(devices[:3], tiny_export["backbone"], mosquitto.address, "pr", horizon=24)
    try:
        assert len(coord.wait_for_devices(3, 15)) == 3
        first = coord.run_round("train")
        assert first.state == "closed"
        updates = [P.decode(p) for _, p in coord.state.updates(first.round_id)]
        by_id = {c.device_id: c for c in clients}
        for u in updates:  # each prototype is the device's own: 32 floats from its training features
            assert u.prototype.shape == (PROTOTYPE_DIM,)
            np.testing.assert_allclose(u.prototype, feature_prototype(by_id[u.device_id].learner.f_train.feats),
                                       rtol=1e-5)
        w = prototype_weights(np.stack([u.prototype for u in updates]).astype(np.float64), 0.1)
        heads = [{k: pre[k].astype(np.float64) + u.delta[k] for k in pre} for u in updates]
        for i, u in enumerate(updates):
            expected = mix(heads, w[i])
            for k in pre:
                np.testing.assert_allclose(coord.state.personal(u.device_id)[k], expected[k], rtol=1e-4, atol=1e-5)

        series, season, _ = devices[3].source.load()
        learner = DeviceLearner(BackboneRunner(tiny_export["backbone"]), series, season=season,
                                split=SplitConfig(horizon=24))
        newcomer = EdgeClient(devices[3].device_id, "pr", learner, mosquitto.address, seed=9,
                              announce_prototype=True).start()
        clients.append(newcomer)
        assert len(coord.wait_for_devices(4, 15)) == 4
        placed = place(feature_prototype(learner.f_train.feats), np.stack([u.prototype for u in updates]),
                       [coord.state.personal(u.device_id) for u in updates])
        second = coord.run_round("train")
    finally:
        for c in clients:
            c.stop()
        coord.stop()
    assert second.state == "closed"
    m = second.metrics[devices[3].device_id]  # "global" is what the device trained from: the placed head
    assert m["global_mse"] == pytest.approx(learner.evaluate(placed, "g")["g_mse"], rel=1e-4)
    assert m["global_mse"] != pytest.approx(learner.evaluate(coord.state.model(first.new_version), "g")["g_mse"],
                                            rel=1e-4)


def _personal_after_round(coord, round_id: int, device_id: str):
    """Round 1 had no personal heads yet: every device started from global v0 + its delta of round 1,
    and the coordinator then stored pre + mixed task vectors; recompute that start from round 1."""
    from coordinator.fleet.strategies.task_vector import personalized_aggregates

    pre = coord.state.model(0)
    taus = {}
    for _, payload in coord.state.updates(round_id):
        u = P.decode(payload)
        taus[u.device_id] = {k: u.delta[k].astype(np.float64) for k in pre}
    mixed, _ = personalized_aggregates(pre, taus, temperature=0.1)
    return {k: mixed[device_id][k].astype(np.float32) for k in pre}


def test_rounds_can_ask_devices_for_personalisation_methods(fleet) -> None:
    import dataclasses

    coord, clients = fleet
    coord.cfg = dataclasses.replace(coord.cfg, personalize=(("rank", 4.0), ("self_distill", 0.5),
                                                            ("feature_distance", 0.1), ("epochs", 2.0)))
    for _ in range(2):  # the second round has a previous personal model to distil from
        result = coord.run_round("train")
        assert result.state == "closed" and len(result.metrics) == 3
    for c in clients:
        model = c.learner.personal_model
        assert model is not None and model.params["adapter_A"].shape[1] == 4
        assert model.cfg.self_distill == 0.5 and model.cfg.feature_distance == 0.1
        assert np.abs(model.params["adapter_B"]).sum() > 0  # the adapter trained
    for m in result.metrics.values():
        assert np.isfinite(m["personal_mse"])


@pytest.mark.parametrize("upload", ["int8", "topk"])
def test_compressed_uploads_are_small_and_aggregate_exactly_what_arrived(fleet, upload) -> None:
    """`fedge serve --upload-dtype int8|topk`: devices send int8 values (and top-k positions); the coordinator
    averages the dequantised deltas; a top-k upload of the horizon-24 head fits in 4 KB of payload."""
    import dataclasses

    coord, clients = fleet
    coord.cfg = dataclasses.replace(coord.cfg, upload_dtype=upload)
    _, base = coord.current_model()
    result = coord.run_round("train")
    assert result.state == "closed"
    payloads = [p for _, p in coord.state.updates(result.round_id)]
    stored = [P.decode(p) for p in payloads]
    n_params = sum(v.size for v in base.values())
    for u, raw in zip(stored, payloads, strict=True):
        assert u.packed is not None and set(u.delta) == set(base)
        assert all(v.dtype == np.float32 for v in u.delta.values())
        assert len(raw) < (n_params + 2048 if upload == "int8" else 0.2 * 3 * n_params + 2048)
    _assert_bounded_fedavg(coord, base, stored)
    if upload == "topk":
        assert all(c.learner.upload_residual is not None for c in clients)  # error feedback kept for next round


def _trained_parts(client) -> dict[str, float]:
    return client.learner.personal_model.log.parts


# one fleet round per device method, over the real broker: (option pairs, what shows the method ran)
METHOD_CHECKS = {
    "adapter": ((("rank", 4.0),), lambda c, m: np.abs(c.learner.personal_model.params["adapter_B"]).sum() > 0),
    "self_distill": ((("rank", 2.0), ("self_distill", 0.5)), lambda c, m: _trained_parts(c).get("distill", 0) > 0),
    "fedoa": ((("rank", 2.0), ("feature_distance", 0.5)),
              lambda c, m: _trained_parts(c).get("feature_distance", 0) > 0),
    "gate": ((("rank", 2.0), ("gate", 1.0)), lambda c, m: c.learner.served.gate is not None and "gate_c" in m),
    "consistency": ((("rank", 2.0), ("consistency", 0.1), ("meta", 1.0)),
                    lambda c, m: _trained_parts(c).get("consistency", 0) > 0 and "meta_test" in _trained_parts(c)),
    "rules": ((("rank", 2.0), ("rules", 1.0)), lambda c, m: c.learner.served.guard is not None
              and "rule_hit_rate" in m),
    "track_record": ((("rank", 2.0), ("track_record", 0.5)), lambda c, m: "served_prior" in m
                     and {"global", "prior", "personal"} <= set(c.learner.track.scores)),
    "track_combine": ((("rank", 2.0), ("track_record", 0.5), ("track_combine", 1.0), ("naive_prior", 1.0)),
                      lambda c, m: set(c.learner.track.weights) <= {"global", "prior", "personal", "naive"}
                      and sum(v for k, v in m.items() if k.startswith("track_w_")) == pytest.approx(1.0)),
    "repair": ((("rank", 2.0), ("repair", 1.0)), lambda c, m: c.learner.repair is not None and "repair_imputed" in m),
    "huber": ((("rank", 2.0), ("huber", 0.5)), lambda c, m: c.learner.personal_model.cfg.huber == 0.5),
}


@pytest.mark.parametrize("method", sorted(METHOD_CHECKS))
def test_every_device_method_runs_in_fleet_rounds_and_never_serves_worse_than_global(fleet, method) -> None:
    """`fedge serve --personalize` switches each method on through the task options; the device runs it and
    serves the personal predictor only where it validated better than the global head (else the global one)."""
    import dataclasses

    coord, clients = fleet
    pairs, ran = METHOD_CHECKS[method]
    coord.cfg = dataclasses.replace(coord.cfg, personalize=(*pairs, ("epochs", 2.0)))
    for _ in range(2):  # the second round has a previous personal model (self-distillation's teacher)
        result = coord.run_round("train")
        assert result.state == "closed" and len(result.metrics) == 3
    for c in clients:
        m = result.metrics[c.device_id]
        assert ran(c, m), (method, m)
        served = c.learner.served
        assert m["personal_fallback"] == float(served.fallback)
        if not served.fallback:
            assert m["val_personal_mse"] < m["val_global_mse"]
            assert c.personal is served.personal
        else:
            kept = served.prior if served.serve_prior else served.glob
            assert all(np.array_equal(c.personal[k], kept[k]) for k in kept)
        assert np.isfinite(m["personal_mse"])
    evaluated = coord.run_round("evaluate")  # an evaluate round scores the same served predictor
    for c in clients:
        assert evaluated.metrics[c.device_id]["personal_mse"] == pytest.approx(c.learner.evaluate(
            c.learner.served, "personal")["personal_mse"])


def test_a_new_backbone_keeps_heads_of_the_same_export_and_drops_the_rest(fleet) -> None:
    """After a bundle switch the device re-checks the heads it holds: another export's head is refused and the
    personal head (trained on the old features) is gone; a new bundle of the same export keeps its heads."""
    coord, clients = fleet
    client = clients[0]
    _, head = coord.current_model()
    mine = client.learner.backbone.spec.model_id
    client._on_global(P.GlobalModel(fleet=FLEET, version=50, params=head, backbone_id=mine))
    client.personal = {k: v.copy() for k, v in head.items()}
    client.backbone_changed()  # same export (a re-signed bundle): the head stays usable
    assert 50 in client.globals and client.personal is None
    before = client.receiver.rejected["model_mismatch"]
    client._backbone_identity = lambda: ("tsfm-an0ther", "0" * 64)  # what the newly loaded backbone reports
    client.backbone_changed()
    assert 50 not in client.globals and client.receiver.rejected["model_mismatch"] > before


def test_a_stop_request_leaves_the_collecting_round_open_and_a_new_run_resumes_it(fleet) -> None:
    """`fedge serve` on Ctrl-C / SIGTERM: the round loop returns within a poll, the round stays open with what
    arrived, and the next run_round resumes that round instead of opening another."""
    coord, clients = fleet
    for c in clients:  # the devices answer after the stop request
        c.learner.run_round = _delayed(c.learner.run_round, 2.0)
    timer = threading.Timer(0.3, coord.request_stop)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(RoundInterrupted) as stopped:
        coord.run_round("train")
    assert time.monotonic() - t0 < 1.8  # before any device answered: the stop did not wait for the round
    assert [r.round_id for r in coord.state.open_rounds(coord.cfg.task)] == [stopped.value.round_id]
    coord._stop_requested.clear()  # a restarted process starts without the request
    resumed = coord.run_round("train")
    assert resumed.round_id == stopped.value.round_id and resumed.resumed and resumed.state == "closed"
