"""Issue #11, total decoding and exactly-once against a real Mosquitto with TLS, client certificates and the fleet's
ACL (what `fedge broker config` writes), the coordinator holding the fleet registry: no message stops the
coordinator's network thread, a poisoned retained message is counted and skipped on every restart, an update with an
impossible sample count is answered with a Reject instead of being dropped, and an update that arrives while its
round closes is refused, never stored and left out. The attacker is an enrolled device (a stolen one): it can only
publish on its own topics."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from coordinator.fleet.broker import start_secure_mosquitto
from coordinator.fleet.pki import FleetPKI
from coordinator.fleet.registry import DeviceRegistry
from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.identity import Identity
from edge_client.wire import codec
from edge_client.wire.mqtt import connect, make_client, publish
from tests.waiting import wait_for

pytestmark = pytest.mark.broker
FLEET = "hostile"
POISON_19 = msgpack.packb({"v": np.zeros(1, np.float16)}, default=codec.pack_ext, use_bin_type=True)
DEVICES = ("evil", "dev-1", "dev-2", "honest-0", "honest-1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FleetPKI:
    pki = FleetPKI(tmp_path_factory.mktemp("fleet"))
    pki.init(FLEET)
    for device in DEVICES:
        pki.enroll(device)
    return pki


@pytest.fixture
def mosquitto(pki):  # this module's broker: TLS, client certificates, the fleet's ACL
    broker = start_secure_mosquitto(pki.root)
    yield broker
    broker.stop()


class _Devices:
    """Raw MQTT clients holding enrolled devices' certificates (one connection per device: the broker makes the
    certificate's name the client id), signing what they send."""

    def __init__(self, broker, pki: FleetPKI) -> None:
        self.broker, self.pki, self.clients, self.keys = broker, pki, {}, {}

    def __call__(self, name: str):
        if name not in self.clients:
            ident = Identity.load(self.pki.root / "enroll" / name, name)
            client = make_client(name)
            connect(client, self.broker.address.with_identity(ident.ca_file, ident.cert_file, ident.key_file),
                    persistent=False)
            self.clients[name], self.keys[name] = client, ident.key
        return self.clients[name]

    def signed(self, name: str, msg: P.Message) -> bytes:
        self(name)
        return P.encode(P.sign(msg, self.keys[name]))

    def close(self) -> None:
        for c in self.clients.values():
            c.disconnect()
            c.loop_stop()


@pytest.fixture
def devices(mosquitto, pki):
    d = _Devices(mosquitto, pki)
    yield d
    d.close()


def _hello(devices: _Devices, device_id: str) -> bytes:
    return devices.signed(device_id, P.Hello(fleet=FLEET, device_id=device_id, runtime="test", n_train=10, n_eval=2))


def _coordinator(broker, db, pki: FleetPKI, **cfg) -> FleetCoordinator:
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, **{"deadline_s": 30, **cfg}), broker, FleetState(db),
                             registry=DeviceRegistry(pki.root)).start()
    coord.ensure_model({"w": np.zeros(4, np.float32)})
    return coord


def test_poisoned_retained_message_is_skipped_by_every_restart_and_the_thread_lives(mosquitto, pki, devices,
                                                                                    tmp_path) -> None:
    topics = P.Topics(FLEET)
    # a stolen device poisons the one topic the ACL lets it retain a message on: its own hello
    publish(devices("evil"), topics.hello("evil"), POISON_19, retain=True).wait_for_publish(5)
    for attempt in range(2):  # the retained poison is delivered again to the restarted coordinator
        coord = _coordinator(mosquitto.address, tmp_path / "fleet.sqlite", pki)
        try:
            wait_for(lambda c=coord: c.receiver.rejected["schema_version"] >= 1, what="the poison to be counted")
            name = f"honest-{attempt}"
            publish(devices(name), topics.hello(name), _hello(devices, name)).wait_for_publish(5)
            wait_for(lambda c=coord, n=name: c.state.has_device(n), what="a later hello to register")
            assert coord.client.is_connected()
        finally:
            coord.stop()
            coord.state.close()


def test_an_update_whose_sample_count_overflows_is_answered_with_a_reject(mosquitto, pki, devices, tmp_path) -> None:
    topics = P.Topics(FLEET)
    coord = _coordinator(mosquitto.address, tmp_path / "fleet.sqlite", pki)
    inbox: list[P.Message] = []
    dev = devices("dev-1")
    dev.on_message = lambda c, u, m: inbox.append(P.decode(m.payload))
    dev.subscribe(topics.task("dev-1"), qos=1)
    publish(dev, topics.hello("dev-1"), _hello(devices, "dev-1")).wait_for_publish(5)
    wait_for(lambda: coord.state.has_device("dev-1"))
    raw = P.Update(fleet=FLEET, device_id="dev-1", round_id=1, base_version=0, n_samples=1,
                   delta={"w": np.ones(4, np.float16)}).model_dump(mode="python")
    raw["n_samples"] = 1 << 63
    publish(dev, topics.update(1, "dev-1"), msgpack.packb(raw, default=codec.pack_ext, use_bin_type=True))
    wait_for(lambda: any(isinstance(m, P.Reject) and m.reason == "invalid" for m in inbox), what="a Reject")
    assert coord.receiver.rejected["invalid"] == 1 and coord.client.is_connected()
    coord.stop()


def test_every_stored_update_gets_a_receipt_and_a_late_one_a_reject_never_silence(mosquitto, pki, devices,
                                                                                   tmp_path) -> None:
    """An update that arrives while its round is being aggregated is either in the aggregate or refused with a
    Reject: the round's 'closing' state is taken under the lock that storing an update takes."""
    topics = P.Topics(FLEET)
    coord = _coordinator(mosquitto.address, tmp_path / "fleet.sqlite", pki, deadline_s=2, quorum_fraction=0.5)
    inbox: dict[str, list[P.Message]] = {"dev-1": [], "dev-2": []}
    sent: list[bytes] = []

    def update(d: str, round_id: int) -> bytes:
        return devices.signed(d, P.Update(fleet=FLEET, device_id=d, round_id=round_id, base_version=0, n_samples=10,
                                          delta={"w": np.full(4, 0.5, np.float16)}))

    def on_message(c, u, m) -> None:  # dev-1 answers its task; dev-2 stays silent until the round closes
        msg = P.decode(m.payload)
        inbox[topics.device_of(m.topic)].append(msg)
        if isinstance(msg, P.RoundTask) and msg.device_id == "dev-1":
            sent.append(update("dev-1", msg.round_id))
            publish(c, topics.update(msg.round_id, "dev-1"), sent[-1])

    for d in inbox:
        client = devices(d)
        client.on_message = on_message
        client.subscribe(topics.task(d), qos=1)
        publish(client, topics.hello(d), _hello(devices, d)).wait_for_publish(5)
    wait_for(lambda: all(coord.state.has_device(d) for d in inbox))

    late: list[P.Update] = []
    flush = coord.writer.flush  # the close's first step: the round is refusing updates, the writer not yet drained

    def closing(timeout_s: float = 60.0) -> bool:  # dev-2's update lands exactly while the round is closing
        if not late and coord._closing:
            round_id = next(iter(coord._closing))
            payload = update("dev-2", round_id)
            late.append(P.decode(payload))
            publish(devices("dev-2"), topics.update(round_id, "dev-2"), payload)
            wait_for(lambda: any(isinstance(m, P.Reject) for m in inbox["dev-2"]), what="the late update's Reject")
        return flush(timeout_s)

    coord.writer.flush = closing
    result = coord.run_round("train", devices=["dev-1", "dev-2"])
    first = P.decode(sent[0])
    assert result.state == "closed" and list(result.n_samples) == ["dev-1"]
    receipts = [m for m in inbox["dev-1"] if isinstance(m, P.Receipt)]
    assert [(r.round_id, r.ref_msg_id) for r in receipts] == [(first.round_id, first.msg_id)]
    reject = next(m for m in inbox["dev-2"] if isinstance(m, P.Reject))
    assert (reject.reason, reject.ref_msg_id, reject.round_id) == ("round_closed", late[0].msg_id, result.round_id)
    assert coord.state.reported(result.round_id) == {"dev-1"}
    publish(devices("dev-1"), topics.update(first.round_id, "dev-1"), sent[0]).wait_for_publish(5)  # a re-send
    wait_for(lambda: sum(isinstance(m, P.Receipt) for m in inbox["dev-1"]) == 2, what="the receipt, again")
    assert coord.duplicates == 1
    assert all(m.sig for box in inbox.values() for m in box)  # everything the coordinator sent was signed
    coord.stop()
