"""Issue #11, total decoding against a real broker: no message stops the coordinator's network thread, a poisoned
retained message is counted and skipped on every restart, and an update with an impossible sample count is
answered with a Reject instead of being dropped."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.wire import codec
from edge_client.wire.mqtt import connect, make_client, publish
from tests.waiting import wait_for

pytestmark = pytest.mark.broker
FLEET = "hostile"
POISON_19 = msgpack.packb({"v": np.zeros(1, np.float16)}, default=codec.pack_ext, use_bin_type=True)


def _hello(device_id: str) -> bytes:
    return P.encode(P.Hello(fleet=FLEET, device_id=device_id, runtime="test", n_train=10, n_eval=2))


def _coordinator(broker, db) -> FleetCoordinator:
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, deadline_s=30), broker, FleetState(db)).start()
    coord.ensure_model({"w": np.zeros(4, np.float32)})
    return coord


def test_poisoned_retained_message_is_skipped_by_every_restart_and_the_thread_lives(mosquitto, tmp_path) -> None:
    topics = P.Topics(FLEET)
    evil = make_client("evil")
    connect(evil, mosquitto.address, persistent=False)
    publish(evil, topics.hello("victim"), POISON_19, retain=True).wait_for_publish(5)
    for attempt in range(2):  # the retained poison is delivered again to the restarted coordinator
        coord = _coordinator(mosquitto.address, tmp_path / "fleet.sqlite")
        try:
            wait_for(lambda c=coord: c.receiver.rejected["schema_version"] >= 1, what="the poison to be counted")
            publish(evil, topics.hello(f"honest-{attempt}"), _hello(f"honest-{attempt}")).wait_for_publish(5)
            wait_for(lambda c=coord, a=attempt: c.state.has_device(f"honest-{a}"), what="a later hello to register")
            assert coord.client.is_connected()
        finally:
            coord.stop()
            coord.state.close()
    evil.disconnect()


def test_an_update_whose_sample_count_overflows_is_answered_with_a_reject(mosquitto, tmp_path) -> None:
    topics = P.Topics(FLEET)
    coord = _coordinator(mosquitto.address, tmp_path / "fleet.sqlite")
    inbox: list[P.Message] = []
    dev = make_client("dev-1-client")
    dev.on_message = lambda c, u, m: inbox.append(P.decode(m.payload))
    connect(dev, mosquitto.address, persistent=False)
    dev.subscribe(topics.task("dev-1"), qos=1)
    publish(dev, topics.hello("dev-1"), _hello("dev-1")).wait_for_publish(5)
    wait_for(lambda: coord.state.has_device("dev-1"))
    raw = P.Update(fleet=FLEET, device_id="dev-1", round_id=1, base_version=0, n_samples=1,
                   delta={"w": np.ones(4, np.float16)}).model_dump(mode="python")
    raw["n_samples"] = 1 << 63
    publish(dev, topics.update(1, "dev-1"), msgpack.packb(raw, default=codec.pack_ext, use_bin_type=True))
    wait_for(lambda: any(isinstance(m, P.Reject) and m.reason == "invalid" for m in inbox), what="a Reject")
    assert coord.receiver.rejected["invalid"] == 1 and coord.client.is_connected()
    dev.disconnect()
    coord.stop()


def test_every_stored_update_gets_a_receipt_and_a_late_one_a_reject_never_silence(mosquitto, tmp_path) -> None:
    """An update that arrives while its round is being aggregated is either in the aggregate or refused with a
    Reject: the round's 'closing' state is taken under the lock that storing an update takes."""
    topics = P.Topics(FLEET)
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, deadline_s=2, quorum_fraction=0.5), mosquitto.address,
                             FleetState(tmp_path / "fleet.sqlite")).start()
    coord.ensure_model({"w": np.zeros(4, np.float32)})
    inbox: dict[str, list[P.Message]] = {"dev-1": [], "dev-2": []}
    sent: list[P.Update] = []

    def on_message(c, u, m) -> None:  # dev-1 answers its task; dev-2 stays silent until the round closes
        msg = P.decode(m.payload)
        inbox[topics.device_of(m.topic)].append(msg)
        if isinstance(msg, P.RoundTask) and msg.device_id == "dev-1":
            sent.append(update("dev-1", msg.round_id))
            publish(c, topics.update(msg.round_id, "dev-1"), P.encode(sent[-1]))

    dev = make_client("devices")
    dev.on_message = on_message
    connect(dev, mosquitto.address, persistent=False)
    for d in inbox:
        dev.subscribe(topics.task(d), qos=1)
        publish(dev, topics.hello(d), _hello(d)).wait_for_publish(5)
    wait_for(lambda: all(coord.state.has_device(d) for d in inbox))

    def update(d: str, round_id: int) -> P.Update:
        return P.Update(fleet=FLEET, device_id=d, round_id=round_id, base_version=0, n_samples=10,
                        delta={"w": np.full(4, 0.5, np.float16)})

    late: list[P.Update] = []
    aggregate = coord._round_updates

    def closing(round_id: int):  # dev-2's update lands exactly while the round is closing
        late.append(update("dev-2", round_id))
        publish(dev, topics.update(round_id, "dev-2"), P.encode(late[0]))
        wait_for(lambda: any(isinstance(m, P.Reject) for m in inbox["dev-2"]), what="the late update's Reject")
        return aggregate(round_id)

    coord._round_updates = closing
    result = coord.run_round("train", devices=["dev-1", "dev-2"])
    first = sent[0]
    assert result.state == "closed" and list(result.n_samples) == ["dev-1"]
    receipts = [m for m in inbox["dev-1"] if isinstance(m, P.Receipt)]
    assert [(r.round_id, r.ref_msg_id) for r in receipts] == [(first.round_id, first.msg_id)]
    reject = next(m for m in inbox["dev-2"] if isinstance(m, P.Reject))
    assert (reject.reason, reject.ref_msg_id, reject.round_id) == ("round_closed", late[0].msg_id, result.round_id)
    assert coord.state.reported(result.round_id) == {"dev-1"}
    publish(dev, topics.update(first.round_id, "dev-1"), P.encode(first)).wait_for_publish(5)  # a re-send
    wait_for(lambda: sum(isinstance(m, P.Receipt) for m in inbox["dev-1"]) == 2, what="the receipt, again")
    assert coord.duplicates == 1
    dev.disconnect()
    coord.stop()
